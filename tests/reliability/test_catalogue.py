"""Every catalogue row has a test: the suite's coverage of the fault catalogue.

Rows are claimed with ``@pytest.mark.catalogue(ROW, ...)`` (also inside ``pytest.param(...,
marks=...)``); the claims are read from the test files' syntax trees, so a row whose only
test was deleted or renamed out of the suite fails here.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import pytest

from .cases import CATALOGUE, EXTRA

HERE = Path(__file__).resolve().parent


def claimed_rows(source: str) -> dict[int, list[str]]:
    """Row -> names of the tests (functions/classes) that claim it in ``source``."""
    tree = ast.parse(source)
    out: dict[int, list[str]] = {}

    def visit(node: ast.AST, owner: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = owner
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = child.name if not owner else f"{owner}.{child.name}"
            if _is_catalogue_call(child):
                for arg in child.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
                        out.setdefault(arg.value, []).append(owner or "<module>")
            visit(child, name)

    visit(tree, "")
    return out


def _is_catalogue_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "catalogue" and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "mark")


def suite_claims() -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for path in sorted(HERE.glob("test_*.py")):
        for row, owners in claimed_rows(path.read_text(encoding="utf-8")).items():
            out.setdefault(row, []).extend(f"{path.name}::{o}" for o in owners)
    return out


def test_claims_are_read_from_decorators_params_and_module_marks():
    src = (
        "import pytest\n"
        "pytestmark = pytest.mark.catalogue(3)\n"
        "@pytest.mark.catalogue(1, 2)\n"
        "def test_a(): pass\n"
        "@pytest.mark.parametrize('x', [pytest.param(1, marks=pytest.mark.catalogue(9))])\n"
        "def test_b(x): pass\n"
        "def test_c():\n"
        "    pytest.mark.other(4)\n")
    claims = claimed_rows(src)
    assert sorted(claims) == [1, 2, 3, 9]
    assert claims[1] == ["test_a"] and claims[3] == ["<module>"] and claims[9] == ["test_b"]


def test_every_catalogue_row_and_extra_case_has_a_test():
    claims = suite_claims()
    missing = [r for r in sorted(set(CATALOGUE) | set(EXTRA)) if r not in claims]
    assert not missing, f"catalogue rows without a test: {missing}"
    unknown = sorted(set(claims) - set(CATALOGUE) - set(EXTRA))
    assert not unknown, f"tests claim rows that are not in cases.py: {unknown}"
    assert len(CATALOGUE) + len(EXTRA) >= 120


def test_case_list_matches_the_shared_catalogue(shared_data):
    path = shared_data.parent / "reliability-catalogue.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with path.open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[1:]
    assert len(rows) == len(CATALOGUE) == 116
    for i, row in enumerate(rows, 1):
        area, _case, outcome = CATALOGUE[i]
        assert (row[0], row[3]) == (area, outcome), f"row {i}: {row[:4]}"
