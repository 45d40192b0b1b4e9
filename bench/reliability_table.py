"""The reliability catalogue table (issue 14): each case, its outcome before, and now.

Runs the reliability suite (``tests/reliability``) once with a JUnit XML report, reads
which test claims which catalogue row (``@pytest.mark.catalogue``), and writes one line
per case: area, case, the outcome measured on the main before issue 14 (CE clear error,
OK handled, TB traceback, SW silent wrong or doubtful, HANG; ``-`` for cases added with
the issue), the outcome now and the tests that prove it. "Now" is ``CE`` when the row's
tests assert a clear error (``assert_clear_error``) and ``OK`` otherwise, and ``FAIL``
when any of its tests failed; a row without a test is ``untested``. Counts by outcome
go on top.

    .venv/bin/python bench/reliability_table.py [--out docs/reliability.md]
"""

from __future__ import annotations

import argparse
import ast
import collections
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "reliability"
sys.path.insert(0, str(REPO / "tests"))

from reliability.cases import CATALOGUE, EXTRA  # noqa: E402
from reliability.test_catalogue import claimed_rows  # noqa: E402


def run_suite() -> tuple[dict[str, str], float]:
    """Test name ("file.py::name") -> "passed" | "failed" | "skipped"; and wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={xml}", str(SUITE)], cwd=REPO, env=env, check=False)
        root = ET.parse(xml).getroot()
    status: dict[str, str] = {}
    seconds = 0.0
    for case in root.iter("testcase"):
        file = case.get("classname", "").split(".")[-1] + ".py"
        name = case.get("name", "").split("[")[0]
        state = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            state = "failed"
        elif case.find("skipped") is not None:
            state = "skipped"
        key = f"{file}::{name}"  # parametrised cases: failed beats passed beats skipped
        rank = {"failed": 2, "passed": 1, "skipped": 0}
        if rank[state] >= rank.get(status.get(key, "skipped"), 0):
            status[key] = state
        seconds += float(case.get("time", 0))
    return status, seconds


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


def table(status: dict[str, str]) -> tuple[list[str], collections.Counter]:
    claims: dict[int, list[str]] = collections.defaultdict(list)
    for path in sorted(SUITE.glob("test_*.py")):
        for row, owners in claimed_rows(path.read_text(encoding="utf-8")).items():
            claims[row] += [f"{path.name}::{o.split('.')[-1]}" for o in owners]
    ce = clear_error_tests()
    lines = ["| # | area | case | before | now | tests |", "|---|---|---|---|---|---|"]
    counts: collections.Counter = collections.Counter()
    for row, (area, case, before) in {**CATALOGUE, **EXTRA}.items():
        tests = sorted(set(claims.get(row, [])))
        states = [status.get(t, "not run") for t in tests]
        if not tests:
            now = "untested"
        elif any(s != "passed" for s in states):
            now = "FAIL"
        else:
            now = "CE" if any(t in ce for t in tests) else "OK"
        counts[now] += 1
        names = ", ".join(f"`{t.split('::')[1]}`" for t in tests)
        lines.append(f"| {row} | {area} | {case.replace('|', '/')} | {before} | {now} | {names} |")
    return lines, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown here too")
    args = parser.parse_args()
    status, seconds = run_suite()
    lines, counts = table(status)
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
        f"- reliability suite: {sum(1 for s in status.values() if s == 'passed')} tests "
        f"passed, {sum(1 for s in status.values() if s == 'failed')} failed, "
        f"{sum(1 for s in status.values() if s == 'skipped')} skipped; {seconds:.0f} s of "
        "test time",
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
