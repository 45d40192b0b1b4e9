"""Structure figures of a taxoclass checkout (issue 13), for a before/after table.

Measured on the files of one git revision (``git archive REV`` into a temporary folder, so
the working tree and the other helpers' uncommitted edits are not read):

- import circles: strongly connected components of more than one module in grimp's
  module graph of ``taxoclass`` (the graph ``lint-imports`` checks; imports inside
  functions and under TYPE_CHECKING count);
- largest file and files over 500 lines (``taxoclass/**/*.py``, physical lines);
- functions over 80 lines (every ``def`` in ``taxoclass/``, from its ``def`` line to its
  last line; a nested function counts on its own and inside its parent);
- places that define a default, by this procedure: for each config key in ``KEYS`` (the
  user-facing settings of the config file), every literal (not ``None``) default bound to
  that name in ``taxoclass/``: a function parameter default; a class-body field (dataclass;
  through ``field(default=...)`` or a wrapper call: its ``default=`` or first argument, or
  its ``default_factory`` lambda's body); a dict-literal entry ``"key": value``; a
  ``.get("key", value)`` or ``getattr(obj, "key", value)`` fallback; a click ``--key``
  option's ``default=``. An enum member of the package (``Detector.KNN[.value]``) counts as
  its literal value. Reported: the number of such places, the keys defined in more than one
  module and the keys whose values disagree (``epochs``, ``lr``, ``weight_decay`` and
  ``patience`` name two settings each, train and finetune, so their values differ by
  design: listed, not counted). Matching is by name, so a parameter renamed from its key
  (``fit_detector(method=...)`` for ``openset.detector``) is missed;
- tests that skip without ``../shared`` (``--tests``): the whole suite runs in the
  extracted copy, whose parent folder has no ``shared/`` (every ``../shared`` path in
  tests and configs misses), with ``TAXOCLASS_SHARED_DATA`` pointing at an absent folder
  (for trees whose conftest reads it); a small pytest plugin records every ``open`` /
  directory listing of the real shared folder by the test process, so a test that still
  reads it (an absolute path) is reported. Skips are counted from ``-rs``. The real
  folder is not renamed or touched.

    .venv/bin/python bench/structure.py [--rev HEAD] [--tests] [--out FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
TWO_SECTIONS = {"epochs", "lr", "weight_decay", "patience"}  # train and finetune both
KEYS = (
    # openset
    "detector", "scope", "combiner", "confidence", "gate_quantile", "target_precision",
    "min_support", "max_train", "calibration", "folds",
    # train / finetune
    "epochs", "lr", "weight_decay", "patience", "layer_decay", "warmup_epochs",
    "min_lr_ratio", "unfreeze_blocks", "grad_clip", "accum_steps", "tile_views", "probe_head",
    # model / loss / data / backbone
    "hidden", "dropout", "normalize", "dependency_weight", "class_balanced",
    "class_balanced_beta", "label_smoothing", "val_fraction", "split_seed", "pad_fill",
    # augment (views)
    "views_per_image", "views", "scale", "rotate", "max_cut", "background", "object_threshold",
    "mask",
)

PLUGIN = '''
import json, os, sys
REAL = os.path.realpath(os.environ["STRUCTURE_REAL_SHARED"])
HITS = {}
CURRENT = ["(collection)"]

def _hook(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    if isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            p = os.path.realpath(os.fsdecode(args[0]))
        except Exception:
            return
        if p == REAL or p.startswith(REAL + os.sep):
            HITS.setdefault(CURRENT[0], p)

def pytest_configure(config):
    sys.addaudithook(_hook)

def pytest_runtest_logstart(nodeid, location):
    CURRENT[0] = nodeid

def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["STRUCTURE_HITS"], "w") as f:
        json.dump(HITS, f, indent=1)
'''


def extract(rev: str, dest: Path) -> Path:
    """The files of ``rev`` (``git archive``) in ``dest/taxoclass-<rev>``."""
    tree = dest / f"taxoclass-{rev[:12]}"
    tree.mkdir(parents=True)
    tar = dest / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), rev], check=True)
    with tarfile.open(tar) as t:
        t.extractall(tree, filter="data")
    tar.unlink()
    return tree


def python_files(tree: Path) -> list[Path]:
    return sorted((tree / "taxoclass").rglob("*.py"))


def import_circles(tree: Path) -> list[list[str]]:
    """SCCs (> 1 module) of grimp's graph of the package in ``tree``."""
    import importlib.util

    import grimp
    import networkx as nx

    sys.path.insert(0, str(tree))
    try:
        origin = importlib.util.find_spec("taxoclass").origin
        if not str(origin).startswith(str(tree)):
            raise RuntimeError(f"taxoclass resolves to {origin}, not to {tree}")
        graph = grimp.build_graph("taxoclass", cache_dir=None)
    finally:
        sys.path.remove(str(tree))
    g = nx.DiGraph()
    for m in graph.modules:
        g.add_edges_from((m, t) for t in graph.find_modules_directly_imported_by(m))
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def file_sizes(tree: Path) -> list[tuple[str, int]]:
    """(path, lines) of every module, largest first."""
    sizes = [(str(p.relative_to(tree)), len(p.read_text().splitlines()))
             for p in python_files(tree)]
    return sorted(sizes, key=lambda s: -s[1])


def long_functions(tree: Path) -> list[tuple[str, int]]:
    """('path:function', lines) of every function over MAX_FUNCTION_LINES, longest first."""
    out = []
    for p in python_files(tree):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append((f"{p.relative_to(tree)}:{node.name}", n))
    return sorted(out, key=lambda f: -f[1])


def _literal(node: ast.AST | None, enums: dict[str, object]):
    """The value of a literal expression, or of an enum member (``Detector.KNN``,
    ``Detector.KNN.value``) defined in the package; a sentinel for None and anything else."""
    if node is None:
        return _NO
    if isinstance(node, ast.Attribute) and node.attr == "value":
        node = node.value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return enums.get(f"{node.value.id}.{node.attr}", _NO)
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NO
    return _NO if value is None else value


def _field_default(value: ast.AST | None) -> ast.AST | None:
    """A class field's default given through a call (``dataclasses.field`` or a wrapper):
    its ``default=`` or first argument, or the body of a ``default_factory``/``factory``
    lambda."""
    if not isinstance(value, ast.Call):
        return value
    kw = {k.arg: k.value for k in value.keywords}
    if "default" in kw:
        return kw["default"]
    for name in ("default_factory", "factory"):
        if isinstance(kw.get(name), ast.Lambda):
            return kw[name].body
    return value.args[0] if value.args else None


def enum_members(tree: Path) -> dict[str, object]:
    """``Class.NAME`` -> literal value of every ``NAME = literal`` in a class body (enums)."""
    members = {}
    for p in python_files(tree):
        for c in ast.walk(ast.parse(p.read_text())):
            if isinstance(c, ast.ClassDef):
                for n in c.body:
                    if (isinstance(n, ast.Assign) and len(n.targets) == 1
                            and isinstance(n.targets[0], ast.Name)
                            and n.targets[0].id.isupper()):
                        try:
                            members[f"{c.name}.{n.targets[0].id}"] = ast.literal_eval(n.value)
                        except ValueError:
                            pass
    return members


_NO = object()


def _defaults_in(node: ast.AST, in_class: bool, enums: dict[str, object]):
    """(key, value, line) of the default definitions directly expressed by ``node``."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args
        pos = args.posonlyargs + args.args
        pairs = list(zip(pos[len(pos) - len(args.defaults):], args.defaults))
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        for arg, default in pairs:
            yield arg.arg, _literal(default, enums), node.lineno
    elif in_class and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        yield node.target.id, _literal(_field_default(node.value), enums), node.lineno
    elif in_class and isinstance(node, ast.Assign):
        for t in node.targets:
            if isinstance(t, ast.Name):
                yield t.id, _literal(_field_default(node.value), enums), node.lineno
    elif isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                yield k.value, _literal(v, enums), k.lineno
    elif isinstance(node, ast.Call):
        yield from _call_defaults(node, enums)


def _call_defaults(node: ast.Call, enums: dict[str, object]):
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    consts = [a.value for a in node.args if isinstance(a, ast.Constant)]
    if name == "get" and len(node.args) == 2 and isinstance(node.args[0], ast.Constant):
        yield str(node.args[0].value), _literal(node.args[1], enums), node.lineno
    elif name == "getattr" and len(node.args) == 3 and isinstance(node.args[1], ast.Constant):
        yield str(node.args[1].value), _literal(node.args[2], enums), node.lineno
    elif name == "option":
        flags = [c for c in consts if isinstance(c, str) and c.startswith("--")]
        default = next((k.value for k in node.keywords if k.arg == "default"), None)
        for flag in flags[:1]:
            key = flag[2:].split("/")[0].replace("-", "_")
            yield key, _literal(default, enums), node.lineno


def default_places(tree: Path) -> list[dict]:
    """Every literal default of a key in KEYS: file, line, key, value."""
    keys = set(KEYS)
    enums = enum_members(tree)
    places = []
    for p in python_files(tree):
        module = ast.parse(p.read_text())
        class_body = {id(n) for c in ast.walk(module) if isinstance(c, ast.ClassDef)
                      for n in c.body}
        for node in ast.walk(module):
            for key, value, line in _defaults_in(node, id(node) in class_body, enums):
                if key in keys and value is not _NO:
                    places.append({"file": str(p.relative_to(tree)), "line": line,
                                   "key": key, "value": value})
    return places


def defaults_summary(places: list[dict]) -> dict:
    """Keys defined in more than one module, and keys whose values disagree."""
    by_key: dict[str, list[dict]] = collections.defaultdict(list)
    for place in places:
        by_key[place["key"]].append(place)
    multi = {k: sorted({p["file"] for p in v}) for k, v in by_key.items()
             if len({p["file"] for p in v}) > 1}
    disagree = {k: sorted({json.dumps(p["value"]) for p in v}) for k, v in by_key.items()
                if len({json.dumps(p["value"]) for p in v}) > 1 and k not in TWO_SECTIONS}
    return {"places": len(places), "keys_with_a_default": len(by_key),
            "keys_in_several_modules": multi, "keys_with_disagreeing_values": disagree}


def skipped_tests(tree: Path, timeout: float) -> dict:
    """Run the suite in ``tree`` with ``../shared`` absent; count skips and reasons."""
    plugin_dir = tree.parent / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "structure_hide_shared.py").write_text(PLUGIN)
    hits = tree.parent / "shared_hits.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tree), str(plugin_dir)]),
           "TAXOCLASS_SHARED_DATA": str(tree.parent / "absent-shared" / "data"),
           "STRUCTURE_REAL_SHARED": str(ROOT.parent / "shared"),
           "STRUCTURE_HITS": str(hits)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           "-p", "structure_hide_shared", "tests"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                         timeout=timeout)
    seconds = time.perf_counter() - t0
    out = res.stdout
    counts = {k: int(n) for n, k in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", out.splitlines()[-1])}
    reasons: collections.Counter[str] = collections.Counter()
    for n, reason in re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", out, re.M):
        reasons[re.sub(r"/\S+", "<path>", reason)] += int(n)
    return {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1),
            "summary": out.splitlines()[-1], "counts": counts,
            "skip_reasons": dict(reasons.most_common()),
            "tests_reading_real_shared": json.loads(hits.read_text()) if hits.exists() else None}


def measure(rev: str, run_tests: bool, timeout: float) -> dict:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="structure-") as tmp:
        tree = extract(commit, Path(tmp))
        sizes = file_sizes(tree)
        places = default_places(tree)
        result = {
            "rev": rev, "commit": commit,
            "import_circles": import_circles(tree),
            "modules": len(sizes),
            "largest_file": sizes[0],
            "files_over_500": [s for s in sizes if s[1] > MAX_FILE_LINES],
            "functions_over_80": long_functions(tree),
            "defaults": defaults_summary(places),
            "default_places": places,
        }
        if run_tests:
            result["tests"] = skipped_tests(tree, timeout)
    return result


def markdown(r: dict) -> str:
    d = r["defaults"]
    lines = [
        f"Structure of `{r['rev']}` ({r['commit'][:10]}), `bench/structure.py`:", "",
        "| figure | value |", "| --- | ---: |",
        f"| import circles (SCCs > 1 module, function-level imports counted) | "
        f"{len(r['import_circles'])} |",
        f"| modules in taxoclass/ | {r['modules']} |",
        f"| largest file | {r['largest_file'][0]} ({r['largest_file'][1]} lines) |",
        f"| files over {MAX_FILE_LINES} lines | {len(r['files_over_500'])} |",
        f"| functions over {MAX_FUNCTION_LINES} lines | {len(r['functions_over_80'])} |",
        f"| literal defaults of config keys (places) | {d['places']} |",
        f"| config keys with a literal default in more than one module | "
        f"{len(d['keys_in_several_modules'])} of {d['keys_with_a_default']} |",
        f"| config keys whose literal defaults disagree ({', '.join(sorted(TWO_SECTIONS))} "
        f"not counted) | "
        f"{len(d['keys_with_disagreeing_values'])} |",
    ]
    if "tests" in r:
        t = r["tests"]
        shared = sum(n for why, n in t["skip_reasons"].items() if "shared" in why.lower()
                     or "absent" in why.lower())
        lines += [f"| tests skipped without ../shared (all reasons) | "
                  f"{t['counts'].get('skipped', 0)} of {sum(t['counts'].values())} |",
                  f"| of which the reason names the absent data | {shared} |",
                  f"| tests that still read the real shared folder | "
                  f"{len(t['tests_reading_real_shared'] or {})} |"]
    lines += ["", "Import circles: " + ("; ".join(" <-> ".join(c) for c in r["import_circles"])
                                        or "none"),
              "", "Files over 500 lines: " + ", ".join(f"{p} ({n})" for p, n in
                                                       r["files_over_500"]),
              "", "Functions over 80 lines: " + ", ".join(f"{p} ({n})" for p, n in
                                                          r["functions_over_80"]),
              "", "Keys whose literal defaults disagree: " + "; ".join(
                  f"{k}: {', '.join(v)}" for k, v in sorted(d["keys_with_disagreeing_values"]
                                                           .items()))]
    if "tests" in r:
        t = r["tests"]
        lines += ["", f"Tests: `{t['command']}` ({t['seconds']} s): {t['summary']}",
                  "", "Skip reasons: " + "; ".join(f"{n}× {why}" for why, n in
                                                  t["skip_reasons"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision to measure")
    ap.add_argument("--tests", action="store_true",
                    help="also run the test suite without ../shared and count skips")
    ap.add_argument("--test-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)
    result = measure(args.rev, args.tests, args.test_timeout)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
