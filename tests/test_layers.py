"""The layering of the packages: imports run one way, launch → eval → data_pipeline → dit.

`dit/` (the model and the maths) imports nothing of ours outside dit/; `data_pipeline/` (shards, files, ranks,
devices, VAE I/O) imports only dit/; `eval/` (checkpoint reading, sampling, metrics, the config schema) imports
data_pipeline/ and dit/; `launch/` (trainers and tools) may import all. Every import of our packages sits at the
top of its module (none inside a function, where it could hide a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["dit", "data_pipeline", "eval", "launch"]  # lowest first


def _library_modules() -> list[Path]:
    return sorted(p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py"))


def _our_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of our packages."""
    found = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module in LAYERS else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in LAYERS:
                found.append((name, node.lineno, id(node) in top_level or _under_module_if(tree, node)))
    return found


def _under_module_if(tree: ast.Module, target: ast.AST) -> bool:
    """True for imports in a module-level `if`/`try` (e.g. after the script bootstrap), not in a function."""
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)) and any(child is target for child in ast.walk(node)):
            return True
    return False


@pytest.mark.parametrize("path", _library_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way_and_sit_at_the_top(path):
    own = path.relative_to(ROOT).parts[0]
    tree = ast.parse(path.read_text())
    for name, line, top in _our_imports(tree):
        layer = name.split(".")[0]
        assert LAYERS.index(layer) <= LAYERS.index(own), \
            f"{path.relative_to(ROOT)}:{line} imports {name}: {own}/ may not import {layer}/ ({' → '.join(reversed(LAYERS))})"
        assert top, f"{path.relative_to(ROOT)}:{line} imports {name} inside a function (move it to the top)"


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", _library_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_function_exceeds_60_lines(path):
    """A function a reader takes in at once: at most 60 lines (docstring included)."""
    long = [(f.name, f.lineno, f.end_lineno - f.lineno + 1) for f in _functions(ast.parse(path.read_text()))
            if f.end_lineno - f.lineno + 1 > 60]
    assert not long, f"{path.relative_to(ROOT)}: " + ", ".join(f"{n} (line {ln}: {k} lines)" for n, ln, k in long)


def test_every_config_a_docstring_or_document_names_exists():
    """Docstrings, comments and documents name configs that exist (a renamed config left stale references)."""
    import re

    named = set()
    for path in [*_library_modules(), *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "slurm").glob("*.sh")]:
        named |= set(re.findall(r"configs/[A-Za-z0-9_/]+\.(?:yaml|json)", path.read_text()))
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing
