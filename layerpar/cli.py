"""The `layerpar` console script: one entry point for every command.

    layerpar train --config digits --set parallel.workers=0
    layerpar serve --config digits --checkpoint runs/my-run
    layerpar scale ...            layerpar predict ...
    layerpar compress RUN_DIR --branches 4 --out RUN_DIR_K
    layerpar expand RUN_DIR --add 2 --out RUN_DIR_M
    layerpar import-reference STATE_DICT.pt --out RUN_DIR
    layerpar <command> --help

Each command runs the same code as its launch/ script: a function `cli_main(argv) -> int` inside the
package, so an installed package works without the repository.
A layerpar error (bad config, missing data, bad checkpoint, ...) prints one line and exits with 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

# command -> (the function that runs it, "module:function"; one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("layerpar.train.loop:cli_main", "train a Para-Former (or the ViT baseline)"),
    "serve": ("layerpar.serve.launcher:serve_main", "serve a checkpoint over gRPC"),
    "scale": ("layerpar.bench.scale:cli_main", "run a scaling study"),
    "predict": ("layerpar.serve.predict:cli_main", "classify images with a served model"),
    "generate": ("layerpar.serve.generate_cli:generate_main", "generate text from a language model"),
    "compress": ("layerpar.lifecycle.compress:cli_main", "keep the first K branches of a run"),
    "expand": ("layerpar.lifecycle.expand:cli_main", "append and train M new branches"),
    "import-reference": ("layerpar.lifecycle.reference:cli_main",
                         "convert the authors' Para-Former state dict into a run"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: layerpar <command> [options]   (layerpar <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(command: str) -> Callable[[list[str]], int | None]:
    """The package function that runs `command` (imported only when that command is used)."""
    module_name, func_name = COMMANDS[command][0].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"layerpar: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "train":  # Ray's worker output goes to the run's log, not the terminal (loop.py)
        os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")
    func = resolve(command)
    try:
        code = func(rest)
    except SystemExit as exc:  # argparse --help / usage errors inside the command
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(f"layerpar {command}: error: {exc.code}", file=sys.stderr)  # sys.exit("message")
        return 1
    except Exception as exc:
        if not type(exc).__module__.startswith("layerpar."):
            raise  # a bug, not a user error: keep the traceback
        print(f"layerpar {command}: error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
