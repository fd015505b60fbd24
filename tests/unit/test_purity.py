"""layerpar/model is pure math: it imports nothing from ray, torch.distributed or grpc (the rule
layerpar/model/__init__.py states: pure model math on one device)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
MODEL_DIR = Path(__file__).resolve().parents[2] / "layerpar" / "model"
FORBIDDEN = ("ray", "torch.distributed", "grpc")


def forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_model_source_has_no_distributed_imports():
    files = sorted(MODEL_DIR.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
                names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
            bad = [n for n in names if forbidden(n)]
            assert not bad, f"{path.name}:{node.lineno} imports {bad[0]}"
        text = path.read_text()
        assert "importlib" not in text, f"{path.name} imports modules dynamically"


def test_importing_the_model_loads_no_distributed_modules():
    """`import torch` itself loads torch.distributed, so compare with a bare `import torch`."""
    code = (
        "import json, sys\n"
        "import torch\n"
        "before = set(sys.modules)\n"
        "import layerpar.model\n"
        "m = layerpar.model.ParaFormer\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    added = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "layerpar.model" in added
    bad = [m for m in added if forbidden(m)]
    assert not bad, f"importing layerpar.model loaded {bad}"
    assert not [m for m in added if m.startswith("layerpar.") and not m.startswith("layerpar.model")
                and m != "layerpar.config"], added
