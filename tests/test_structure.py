"""The package's layering rules, checked on the source (see docs/design.md):
the registry is the bottom layer, no module imports another's underscore names, one loader reads
checkpoints, one function writes files atomically."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "llmtrain"
TESTS = Path(__file__).resolve().parent


def _modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_registry_is_the_bottom_layer():
    tree = ast.parse((PKG / "registry.py").read_text())
    ours = {m for m, _ in _imports(tree) if m.startswith("llmtrain")}
    assert ours <= {"llmtrain.errors"}, ours


def test_no_underscore_names_imported_across_modules():
    bad = []
    for root in (PKG, TESTS):
        for path, tree in _modules(root):
            for module, names in _imports(tree):
                if not module.startswith("llmtrain"):
                    continue
                bad += [
                    f"{path.relative_to(root.parent)}: {module}.{n}"
                    for n in names
                    if n.startswith("_") and not n.startswith("__")
                ]
    assert not bad, bad


def _calls(tree: ast.AST, name: str) -> int:
    return sum(
        1
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)
    )


def test_one_checkpoint_loader():
    """Weights of a checkpoint are read in two places only: the loader, and the trainer's resume."""
    readers = {str(p.relative_to(PKG)) for p, tree in _modules(PKG) if _calls(tree, "load_weights")}
    assert readers == {"checkpoints.py", "train/trainer.py"}, readers
    for path, tree in _modules(PKG / "stages"):
        assert not _calls(tree, "load_model_state") and not _calls(tree, "load_file"), path


def test_one_atomic_write():
    defs = [
        (p, n.name)
        for p, tree in _modules(PKG)
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and "atomic_write" in n.name
    ]
    assert [(str(p.relative_to(PKG)), name) for p, name in defs] == [("files.py", "atomic_write")]
