"""`make setup` reinstalls torch when TORCH_SPEC changes (a CUDA build after `make demo`), and only
then: the venv keeps the spec it was installed with in .venv/.torch-spec. Checked with `make -n` on a
stand-in venv directory (nothing is installed)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU = "torch==2.13.0"
CUDA = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(venv: Path, spec: str) -> str:
    """The commands `make setup TORCH_SPEC=spec` would run against `venv`."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={venv}", f"TORCH_SPEC={spec}", "setup"],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def _installed_venv(tmp_path: Path, spec: str) -> Path:
    """A venv directory as `make setup TORCH_SPEC=spec` leaves it: both stamps newer than pyproject."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".torch-spec").write_text(spec + "\n")
    (venv / ".installed").touch()
    return venv


def test_same_spec_installs_nothing(tmp_path):
    assert "pip install" not in _dry_run(_installed_venv(tmp_path, CPU), CPU)


def test_new_torch_spec_reinstalls_torch(tmp_path):
    commands = _dry_run(_installed_venv(tmp_path, CPU), CUDA)
    assert f"pip install -q {CUDA}" in commands
    assert "pip uninstall -q -y torch" in commands  # a +cpu build would satisfy torch==2.13.0
    assert 'pip install -q -e ".[dev]"' in commands
