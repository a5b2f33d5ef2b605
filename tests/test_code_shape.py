"""House-style limits on the library (STYLE.md): no file of megarlhf/ (kernels/ and csrc/ included,
as they install under it) over 800 lines, no function over 80."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("megarlhf", "kernels") for p in (ROOT / d).rglob("*.py"))
MAX_FILE, MAX_FUNCTION = 800, 80


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_file_and_function_lengths(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE, f"{path}: {text.count(chr(10))} lines"
    long = [
        f"{f.name} ({f.end_lineno - f.lineno + 1} lines, line {f.lineno})"
        for f in _functions(ast.parse(text))
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION
    ]
    assert not long, f"{path}: functions over {MAX_FUNCTION} lines: {long}"


def test_the_limits_are_measured():
    """The walk sees the files and the functions (a broken glob would pass everything)."""
    assert len(FILES) > 80
    sizes = [
        f.end_lineno - f.lineno + 1 for p in FILES for f in _functions(ast.parse(p.read_text()))
    ]
    assert len(sizes) > 500 and max(sizes) > 40
