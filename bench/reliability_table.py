"""The reliability catalogue table (issue 14): each case, its outcome before, and now.

Runs the reliability suite (``tests/reliability``) once with a small pytest plugin that
records each collected test's catalogue rows (its ``@pytest.mark.catalogue`` markers, also
those given through ``pytest.param``) and outcome, and writes one line
per case: area, case, the outcome measured on the main before issue 14 (CE clear error,
OK handled, TB traceback, SW silent wrong or doubtful, HANG; ``-`` for cases added with
the issue), the outcome now and the tests that prove it. "Now" is ``CE`` when the row's
tests assert a clear error (``assert_clear_error``) and ``OK`` otherwise, and ``FAIL``
when any of its tests failed; a row without a test is ``untested``. Counts by outcome
go on top.

    .venv/bin/python bench/reliability_table.py [--out docs/reliability.md]

With ``--out`` an existing file holding the lines ``<!-- table:start -->`` and
``<!-- table:end -->``, only the text between them is replaced.
"""

from __future__ import annotations

import argparse
import ast
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "reliability"
sys.path.insert(0, str(REPO / "tests"))

from reliability.cases import CATALOGUE, EXTRA  # noqa: E402

_PLUGIN = """
import json, os
RESULTS = {}
def pytest_collection_modifyitems(items):
    for item in items:
        rows = [r for m in item.iter_markers("catalogue") for r in m.args]
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        RESULTS[item.nodeid] = {"file": item.path.name, "test": name, "rows": rows,
                                "outcome": "not run", "seconds": 0.0}
def pytest_runtest_logreport(report):
    entry = RESULTS.get(report.nodeid)
    if entry is None:
        return
    entry["seconds"] += report.duration
    if report.failed:
        entry["outcome"] = "failed"
    elif report.when == "call" and report.passed and entry["outcome"] != "failed":
        entry["outcome"] = "passed"
    elif report.skipped and entry["outcome"] == "not run":
        entry["outcome"] = "skipped"
def pytest_sessionfinish(session):
    with open(os.environ["RELTABLE_OUT"], "w") as fh:
        json.dump(RESULTS, fh)
"""


def run_suite() -> dict[str, dict]:
    """Each collected test (node id) -> its file, test function, catalogue rows (from its
    markers, also those given through ``pytest.param``), outcome and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "reltable_plugin.py").write_text(_PLUGIN, encoding="utf-8")
        out = Path(tmp) / "results.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RELTABLE_OUT": str(out),
               "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "reltable_plugin", str(SUITE)], cwd=REPO, env=env, check=False)
        return json.loads(out.read_text())


def clear_error_tests() -> set[str]:
    """Tests whose body calls ``assert_clear_error``."""
    out = set()
    for path in SUITE.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(n, ast.Name) and n.id == "assert_clear_error"
                    for n in ast.walk(node)):
                out.add(f"{path.name}::{node.name}")
    return out


def table(results: dict[str, dict]) -> tuple[list[str], collections.Counter]:
    """One markdown line per case, and the count of cases per "now" outcome."""
    claims: dict[int, list[dict]] = collections.defaultdict(list)
    for entry in results.values():
        for row in entry["rows"]:
            claims[row].append(entry)
    ce = clear_error_tests()
    lines = ["| # | area | case | before | now | tests |", "|---|---|---|---|---|---|"]
    counts: collections.Counter = collections.Counter()
    for row, (area, case, before) in {**CATALOGUE, **EXTRA}.items():
        entries = claims.get(row, [])
        names = sorted({f"{e['file']}::{e['test']}" for e in entries})
        if not entries:
            now = "untested"
        elif any(e["outcome"] != "passed" for e in entries):
            now = "FAIL"
        else:
            now = "CE" if any(n in ce for n in names) else "OK"
        counts[now] += 1
        shown = ", ".join(f"`{n.split('::')[1]}`" for n in names)
        lines.append(f"| {row} | {area} | {case.replace('|', '/')} | {before} | {now} | {shown} |")
    return lines, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown here too")
    args = parser.parse_args()
    results = run_suite()
    lines, counts = table(results)
    outcomes = collections.Counter(e["outcome"] for e in results.values())
    seconds = sum(e["seconds"] for e in results.values())
    before = collections.Counter(o for _, _, o in CATALOGUE.values())
    head = [
        f"Reliability catalogue, measured {datetime.date.today()} on {platform.node()} "
        f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}) by "
        "`.venv/bin/python bench/reliability_table.py`.",
        "",
        f"- cases: {len(CATALOGUE)} from the catalogue + {len(EXTRA)} added = "
        f"{len(CATALOGUE) + len(EXTRA)}",
        "- before (catalogue rows, main before issue 14): "
        + ", ".join(f"{k} {v}" for k, v in sorted(before.items())),
        "- now (all cases): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        f"- reliability suite: {len(results)} tests: {outcomes['passed']} passed, "
        f"{outcomes['failed']} failed, {outcomes['skipped']} skipped; {seconds:.0f} s of "
        "test time (set-up included)",
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.out:
        write_between_markers(Path(args.out), text)


def write_between_markers(path: Path, text: str) -> None:
    """Replace the text between the table markers of ``path`` (or write the whole file)."""
    start, end = "<!-- table:start -->", "<!-- table:end -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        text = f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
