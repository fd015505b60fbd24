"""The `layerpar` console script: every command's --help, unknown commands, errors for people.

    .venv/bin/python -m pytest -q tests/unit/test_cli.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from layerpar.cli import COMMANDS, main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_every_command(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


def test_top_level_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main([]) == 2
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "import-reference" in err


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nowhere"), "--branches", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerpar compress: error:") and "does not exist" in err and "\n" not in err
    assert main(["compress", str(tmp_path), "--out", str(tmp_path / "o")]) == 2  # --branches missing
    assert "required" in capsys.readouterr().err


def test_import_reference_through_the_console_script(tmp_path):
    from test_lifecycle import reference_state  # tests/unit is on sys.path under pytest

    torch.save(reference_state(branches=2, depth=1), tmp_path / "ref.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "layerpar.cli", "import-reference", str(tmp_path / "ref.pt"),
         "--out", str(tmp_path / "run"), "--set", "data.name=synthetic"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])  # the last stdout line is one JSON object
    assert report["model"]["num_branches"] == 2 and report["run_dir"] == str(tmp_path / "run")
