"""`layerpar generate` / launch/generate.py on a real tiny LM checkpoint (written the way training
writes one): one JSON line holding `text`, greedy equal to lm.generate, seeded sampling reproducible,
bad input one sentence and exit 2. The W-worker run is in tests/serve/test_generate.py (it needs Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerpar.config import load_config
from layerpar.model.lm import build_lm, generate
from layerpar.serve.generate_cli import generate_main
from layerpar.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BOS = 256
LM_SETS = ["model.kind=paraformer_lm", "data.name=text", "model.dim=32", "model.heads=2", "model.mlp_dim=64",
           "model.num_branches=3", "model.branch_depth=1", "model.context=32", "train.seed=3"]


def piece(name: str) -> str:
    return "branch." + name.split(".")[1] if name.startswith("branches.") else "trunk"


def write_lm_checkpoint(run_dir: Path, sets=LM_SETS):
    """A tiny LM's checkpoint in a run directory, and the model it holds."""
    cfg = load_config(None, list(sets))
    model = build_lm(cfg.model, seed=11)  # not the config's seed: the weights must come from the file
    pieces: dict = {}
    for k, v in model.state_dict().items():
        pieces.setdefault(piece(k), {})[k] = v
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run_dir, pieces, config=cfg, step=5, epoch=1)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("lm") / "run"
    return run, write_lm_checkpoint(run)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_greedy_equals_generate(ckpt, capsys):
    run, model = ckpt
    assert generate_main(["--checkpoint", str(run), "--prompt", "def f(", "--max-tokens", "7", "--greedy",
                          "--quiet"]) == 0
    out = last_json(capsys.readouterr().out)
    ref = generate(model, [[BOS, *b"def f("]], 7)[0]
    assert out["tokens"] == ref and out["stop_reason"] == "length" and out["completion_tokens"] == 7
    assert out["text"] == bytes(t for t in ref if t < 256).decode("utf-8", "replace")
    assert len(out["token_ms"]) == 7 and out["num_branches"] == 3 and out["workers"] == 0


def test_sampling_reproducible_and_prefix(ckpt, capsys):
    run, model = ckpt
    args = ["--checkpoint", str(run), "--prompt", "x", "--max-tokens", "9", "--temperature", "1.2",
            "--top-k", "6", "--seed", "4", "--quiet"]
    assert generate_main(args) == 0
    a = last_json(capsys.readouterr().out)
    assert generate_main(args) == 0
    b = last_json(capsys.readouterr().out)
    assert a["tokens"] == b["tokens"] and a["seed"] == 4 and not a["greedy"]
    assert generate_main(["--checkpoint", str(run), "--prompt", "x", "--max-tokens", "4", "--greedy",
                          "--num-branches", "1", "--quiet"]) == 0
    k1 = last_json(capsys.readouterr().out)
    assert k1["tokens"] == generate(model, [[BOS, *b"x"]], 4, num_branches=1)[0] and k1["num_branches"] == 1


@pytest.mark.parametrize("extra, words", [
    (["--prompt", "", "--max-tokens", "3"], "empty"),
    (["--prompt", "y" * 40, "--max-tokens", "3"], "context holds 32"),
    (["--prompt", "hi", "--max-tokens", "0"], "at least 1"),
    (["--prompt", "hi", "--max-tokens", "100000000"], "more than this server allows"),
    (["--prompt", "bad \udcff bytes", "--max-tokens", "3"], "not valid UTF-8"),
    (["--prompt", "hi", "--max-tokens", "3", "--greedy", "--temperature", "0.5"], "contradict"),
    (["--prompt", "hi", "--max-tokens", "3", "--num-branches", "7"], "num_branches"),
    (["--prompt", "hi", "--max-tokens", "3", "--set", "model.nope=1"], "nope"),
])
def test_bad_input_exit_2(ckpt, capsys, extra, words):
    run, _ = ckpt
    assert generate_main(["--checkpoint", str(run), "--quiet", *extra]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "error" in last_json(captured.out)


def test_missing_checkpoint_and_image_checkpoint(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert generate_main(["--checkpoint", missing, "--prompt", "a", "--max-tokens", "2"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert generate_main(["--config", "tiny", "--prompt", "a", "--max-tokens", "2"]) == 2
    assert "not a language model" in capsys.readouterr().err


def test_launch_script_one_json_line(ckpt):
    run, model = ckpt
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), "--checkpoint", str(run),
                           "--prompt", "import ", "--max-tokens", "5", "--greedy"],
                          capture_output=True, text=True, errors="replace", timeout=120, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["tokens"] == generate(model, [[BOS, *b"import "]], 5)[0] and isinstance(out["text"], str)
    from layerpar.serve.generate_cli import build_parser

    help_text = build_parser().format_help()
    assert "--max-tokens" in help_text and "--workers" in help_text and "JSON" in help_text
