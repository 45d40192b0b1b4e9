"""Structure rules of docs/architecture.md that import-linter's contracts do not cover.

- no import circle anywhere in the package, counting imports written inside functions and
  under TYPE_CHECKING (grimp's graph, the one `lint-imports` checks), and no module
  imports the root package (the public API);
- the benchmark scripts use only public names of taxoclass;
- a module over 500 lines says why in its docstring ("Long because ...");
- `.ci/run` runs exactly the README's two commands.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "taxoclass"
MAX_LINES = 500
LONG_REASON = "Long because"


def import_graph(package: str = "taxoclass") -> nx.DiGraph:
    """Module -> module edges of a package (every import statement grimp finds)."""
    graph = grimp.build_graph(package, cache_dir=None)
    g = nx.DiGraph()
    for module in graph.modules:
        g.add_node(module)
        for imported in graph.find_modules_directly_imported_by(module):
            g.add_edge(module, imported)
    return g


def import_circles(g: nx.DiGraph) -> list[list[str]]:
    """Strongly connected components with more than one module, each sorted."""
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def test_import_circles_are_found_in_a_made_up_graph():
    g = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("e", "d")])
    assert import_circles(g) == [["a", "b", "c"]]


def test_function_level_and_type_checking_imports_are_in_the_graph(tmp_path, monkeypatch):
    pkg = tmp_path / "madeup_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .typed import T\n"
        "def f():\n    from . import high\n    return high\n"
    )
    (pkg / "high.py").write_text("from .low import f\n")
    (pkg / "typed.py").write_text("T = int\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = import_graph("madeup_pkg")
    assert set(g.successors("madeup_pkg.low")) == {"madeup_pkg.high", "madeup_pkg.typed"}
    assert import_circles(g) == [["madeup_pkg.high", "madeup_pkg.low"]]


def test_no_import_circle():
    circles = import_circles(import_graph())
    assert circles == [], "import circles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in circles
    )


def test_no_module_imports_the_root_package():
    # The root package is the public API and imports the layers (lazily); a module that
    # imported it back would depend on every layer.
    assert sorted(import_graph().predecessors("taxoclass")) == []


def private_uses(source: str) -> list[str]:
    """Private taxoclass names a script uses: ``from taxoclass.x import _y``, a private
    module in the path (``taxoclass._x``, ``_version`` excepted) and ``module._y`` where
    ``module`` was imported from taxoclass."""
    tree = ast.parse(source)
    found: list[str] = []
    modules: set[str] = set()  # local names bound to taxoclass modules

    def private(part: str) -> bool:
        return part.startswith("_") and not part.startswith("__") and part != "_version"

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "taxoclass":
            parts = node.module.split(".")
            found += [f"{node.module} (line {node.lineno})" for p in parts if private(p)]
            for alias in node.names:
                if private(alias.name):
                    found.append(f"{node.module}.{alias.name} (line {node.lineno})")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "taxoclass":
                    found += [f"{alias.name} (line {node.lineno})"
                              for p in alias.name.split(".") if private(p)]
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


def test_private_uses_are_found_in_made_up_scripts():
    script = (
        "from taxoclass.features.views import _place, ViewSettings\n"
        "from taxoclass._version import __version__\n"
        "from taxoclass.pipelines import jobs\n"
        "import taxoclass.model._private as p\n"
        "jobs._targets(1)\n"
        "jobs.train(1)\n"
        "other._hidden()\n"
    )
    assert private_uses(script) == [
        "taxoclass.features.views._place (line 1)",
        "taxoclass.model._private (line 4)",
        "jobs._targets (line 5)",
    ]


@pytest.mark.parametrize("script", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_uses_public_names_only(script: Path):
    assert private_uses(script.read_text()) == []


def long_modules_without_reason(root: Path = PACKAGE) -> list[str]:
    """Files over MAX_LINES lines whose module docstring lacks LONG_REASON."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_LINES and LONG_REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            bad.append(f"{path.relative_to(root.parent)} ({lines} lines)")
    return bad


def test_long_module_check_reads_the_docstring(tmp_path: Path):
    body = "x = 1\n" * (MAX_LINES + 1)
    (tmp_path / "short.py").write_text('"""Short."""\nx = 1\n')
    (tmp_path / "long.py").write_text('"""A long one."""\n' + body)
    (tmp_path / "reasoned.py").write_text(f'"""One table.\n\n{LONG_REASON} it is data."""\n' + body)
    assert long_modules_without_reason(tmp_path) == [f"{tmp_path.name}/long.py (502 lines)"]


def test_long_modules_state_a_reason():
    assert long_modules_without_reason() == []


def test_ci_runs_the_readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    readme = block.group(1).strip().splitlines()
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln and not ln.startswith(("#", "set ", "cd "))]
    assert len(readme) == 2
    assert ci == readme
