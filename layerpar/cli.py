"""The `layerpar` console script: one entry point for every command.

    layerpar train --config digits --set parallel.workers=0
    layerpar serve --config digits --checkpoint runs/my-run
    layerpar scale ...            layerpar predict ...
    layerpar compress RUN_DIR --branches 4 --out RUN_DIR_K
    layerpar expand RUN_DIR --add 2 --out RUN_DIR_M
    layerpar import-reference STATE_DICT.pt --out RUN_DIR
    layerpar <command> --help

Each command runs the same code as its launch/ script. A command is a function `cli_main(argv) -> int`
inside the package (so an installed package works without the repository); while a command only
exists as a launch/<name>.py script of this checkout, its `main(argv)` is run instead.
A layerpar error (bad config, missing data, bad checkpoint, ...) prints one line and exits with 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

# command -> (package function "module:function", launch script name, one-line summary)
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "train": ("layerpar.train.loop:cli_main", "train.py", "train a Para-Former (or the ViT baseline)"),
    "serve": ("layerpar.serve.server:cli_main", "serve.py", "serve a checkpoint over gRPC"),
    "scale": ("layerpar.bench.scale:cli_main", "scale.py", "run a scaling study"),
    "predict": ("layerpar.serve.predict:cli_main", "predict.py", "classify images with a served model"),
    "compress": ("layerpar.lifecycle.compress:cli_main", None, "keep the first K branches of a run"),
    "expand": ("layerpar.lifecycle.expand:cli_main", None, "append and train M new branches"),
    "import-reference": ("layerpar.lifecycle.reference:cli_main", None,
                         "convert the authors' Para-Former state dict into a run"),
}
LAUNCH_DIR = Path(__file__).resolve().parent.parent / "launch"  # present in a source checkout


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: layerpar <command> [options]   (layerpar <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(command: str) -> Callable[[list[str]], int | None]:
    """The function that runs `command`: the package's cli_main, else the launch script's main."""
    target, script, _ = COMMANDS[command]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # a dependency is missing, not the command's module: show the real error
        module = None
    func = getattr(module, func_name, None) if module is not None else None
    if func is not None:
        return func
    path = LAUNCH_DIR / script if script else None
    if path is not None and path.is_file():
        spec = importlib.util.spec_from_file_location(f"layerpar_launch_{path.stem}", path)
        launch = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(launch)
        if callable(getattr(launch, "main", None)):
            return launch.main
    where = f"{target}" + (f" or launch/{script}" if script else "")
    raise LookupError(f"command {command!r} is not available in this installation (looked for {where})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"layerpar: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        func = resolve(command)
    except LookupError as exc:
        print(f"layerpar {command}: error: {exc}", file=sys.stderr)
        return 2
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
