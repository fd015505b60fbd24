"""One dependency direction (README, "The map"): a package imports only from its own layer or those
below it, and no module imports itself back through others. Every import counts -- top-level and
inside functions -- except those under `if TYPE_CHECKING:`; `from pkg import sub` is an import of the
submodule `pkg.sub` (as Python resolves it), not of the package's __init__."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2] / "layerpar"
LAYERS = [  # lowest first
    {"config", "config_rules", "cluster_utils", "cluster_check", "model", "data"},
    {"parallel"},
    {"train"},
    {"runtime"},
    {"serve", "bench", "lifecycle"},
    {"cli"},
]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("layerpar", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", "")) == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip, found = _type_checking_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known.keys()
            found |= subs if subs else {base}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    return -1 if top == "" else len(LAYERS)  # the root package sits below everything; unknown: top


def test_every_package_has_a_layer():
    tops = {m.split(".")[1] for m in modules() if m.count(".")}
    assert tops <= set().union(*LAYERS), f"packages without a layer: {tops - set().union(*LAYERS)}"


def test_no_package_imports_from_a_higher_layer():
    wrong = sorted(f"{a} imports {b}" for a, bs in graph().items() for b in bs
                   if layer_of(b) > layer_of(a))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    g, cycles = graph(), []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The walker itself: a planted upward import and a planted cycle are found."""
    known = {"layerpar.model.a": tmp_path / "a.py", "layerpar.serve.b": tmp_path / "b.py"}
    known["layerpar.model.a"].write_text("from layerpar.serve import b\n")
    known["layerpar.serve.b"].write_text("def f():\n    import layerpar.model.a\n")
    got = {n: imports_of(n, p, known) for n, p in known.items()}
    assert got == {"layerpar.model.a": {"layerpar.serve.b"}, "layerpar.serve.b": {"layerpar.model.a"}}
    assert layer_of("layerpar.serve.b") > layer_of("layerpar.model.a")
