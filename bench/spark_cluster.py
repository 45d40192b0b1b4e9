"""A real Spark standalone cluster (one master, two workers) vs the local engine.

Runs docs/scaling.md's cluster blocks as written (only the settings differ: this
machine, 127.0.0.1, free ports, one core and 1 GB per worker, folders under a temporary
directory): the master and two workers with pyspark's own ``spark-class`` launchers, as
separate processes, then the page's ``embed``, ``predict`` and ``plot-report`` commands
with ``--engine spark --master spark://127.0.0.1:PORT``, each also run with
``--engine local``; times every command (a fresh ``taxoclass`` process each, as a user
runs it) and compares the outputs. Then the embed again into a new folder, killing one
worker (its JVM, executor and Python workers) while the job runs, and the same command a
third time (it must skip every image written).

    nice -n 10 .venv/bin/python bench/spark_cluster.py [--limit N]
        [--out bench/results/spark_cluster.md]

The helpers (doc blocks, cluster processes) are shared with tests/test_spark_cluster.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
LEAF = ROOT.parent / "shared" / "data" / "leaf"
QUADRAT = ROOT.parent / "shared" / "data" / "quadrat"
LEAF_MODEL = ROOT / "runs" / "leaf-model"
LEAF_BACKBONE = "--backbone efficientnet-lite0 --image-size 384 --resize letterbox"


# ------------------------------------------------------------------ docs/scaling.md blocks
def doc_block(name: str, doc: Path = DOC) -> str:
    """The fenced block after ``<!-- cluster:NAME -->`` in docs/scaling.md."""
    text = doc.read_text(encoding="utf-8")
    found = re.search(rf"<!-- cluster:{re.escape(name)} -->\s*```[a-z]*\n(.*?)```", text, re.S)
    if not found:
        raise LookupError(f"{doc}: no block marked <!-- cluster:{name} -->")
    return found.group(1)


def settings_names(doc: Path = DOC) -> set[str]:
    """The variables the page's settings block exports."""
    names = set()
    for line in doc_block("settings", doc).splitlines():
        if line.startswith("export "):
            names |= set(re.findall(r"\b([A-Z_]+)=", line.split("#")[0]))
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


def cluster_settings(tmp: Path, *, data: str, model: str, plots: str, out: str,
                     backbone: str, cores: int = 1, memory: str = "1g") -> dict[str, str]:
    """This machine's values for every variable of the page's settings block (plus the
    ports and the local address a one-machine cluster needs)."""
    port = free_port()
    values = {
        "SPARK_HOME": spark_home(), "PYSPARK_PYTHON": sys.executable,
        "SPARK_MASTER_HOST": "127.0.0.1", "SPARK_MASTER_PORT": str(port),
        "MASTER": f"spark://127.0.0.1:{port}",
        "SPARK_CONF_DIR": str(tmp / "spark-conf"), "SPARK_LOCAL_DIRS": str(tmp / "scratch"),
        "SPARK_WORKER_DIR": str(tmp / "work"), "WORKER_CORES": str(cores),
        "WORKER_MEMORY": memory, "DATA": data, "MODEL": model, "PLOTS": plots, "OUT": out,
        "BACKBONE": backbone,
        # one machine: free web UI ports, everything on the loopback address
        "SPARK_MASTER_WEBUI_PORT": str(free_port()), "SPARK_LOCAL_IP": "127.0.0.1",
    }
    missing = settings_names() - set(values)
    if missing:
        raise LookupError(f"docs/scaling.md's settings block exports {sorted(missing)}, which "
                          "this script does not set: update cluster_settings().")
    conf = Path(values["SPARK_CONF_DIR"])
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "spark-defaults.conf").write_text(doc_block("conf"), encoding="utf-8")
    for key in ("SPARK_LOCAL_DIRS", "SPARK_WORKER_DIR"):
        Path(values[key]).mkdir(parents=True, exist_ok=True)
    return values


def job_commands(env: Mapping[str, str]) -> list[list[str]]:
    """The argv of every ``taxoclass`` command of the page's jobs block, expanded by bash
    with ``env`` exactly as a user's shell would (quotes, ``$BACKBONE`` word splitting)."""
    script = ('taxoclass() { printf "%s\\0" taxoclass "$@"; printf "\\036\\0"; }\n'
              + doc_block("jobs"))
    done = subprocess.run(["bash", "-c", script], env={**os.environ, **env}, check=True,
                          capture_output=True).stdout.decode()
    commands, current = [], []
    for word in done.split("\0")[:-1]:
        if word == "\x1e":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


def local_command(argv: Sequence[str], out: str, *extra: str) -> list[str]:
    """The same command with ``--engine local`` and another ``--out``."""
    args, skip = [], 0
    for i, word in enumerate(argv):
        if skip:
            skip -= 1
            continue
        if word in ("--engine", "--master"):
            skip = 1
            continue
        args.append(out if i and argv[i - 1] == "--out" else word)
    return [*args, *extra]


# ------------------------------------------------------------------ cluster processes
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every process below it (a worker's JVM, its executor JVM and
    the executor's Python daemon and workers, which sit in their own process group)."""
    kids, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(kids.get(p, []))
    for p in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    return found


class Cluster:
    """A master and workers started from the page's blocks, each a separate process
    (``bash -c BLOCK``); :meth:`close` kills every one of them and what they started."""

    def __init__(self, env: Mapping[str, str], logs: Path) -> None:
        self.env = {**os.environ, **env}
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def _start(self, block: str, name: str, extra: Mapping[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen(["bash", "-c", doc_block(block)], env={**self.env, **extra},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_master(self, timeout: float = 180) -> None:
        self.master = self._start("master", "master", {})
        self.wait(lambda s: True, timeout, "the master's web UI")

    def start_workers(self, n: int = 1, timeout: float = 180) -> list[subprocess.Popen]:
        """``n`` more workers (started together), once the master lists them alive."""
        alive = self.alive() + n
        procs = []
        for _ in range(n):
            k = len(self.workers)
            procs.append(self._start("worker", f"worker{k}", {
                "SPARK_WORKER_WEBUI_PORT": str(free_port()),
                "SPARK_WORKER_DIR": f"{self.env['SPARK_WORKER_DIR']}/{k}"}))
            self.workers.append(procs[-1])
        self.wait(lambda s: _alive(s) >= alive, timeout, f"{alive} alive workers")
        return procs

    def state(self) -> dict:
        url = f"http://127.0.0.1:{self.env['SPARK_MASTER_WEBUI_PORT']}/json/"
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())

    def alive(self) -> int:
        try:
            return _alive(self.state())
        except OSError:
            return 0

    def wait(self, ok, timeout: float, what: str) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.master is not None and self.master.poll() is not None:
                raise RuntimeError(f"the Spark master exited: {self.logs / 'master.log'}")
            with contextlib.suppress(OSError, ValueError):
                state = self.state()
                if ok(state):
                    return state
            time.sleep(0.25)
        raise TimeoutError(f"waited {timeout:.0f} s for {what} (logs: {self.logs})")

    def kill_worker(self, i: int) -> list[int]:
        return kill_tree(self.workers[i].pid)

    def close(self) -> None:
        for proc in [*self.workers, self.master]:
            if proc is not None:
                kill_tree(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)


def _alive(state: Mapping) -> int:
    return sum(w.get("state") == "ALIVE" for w in state.get("workers", []))


@contextlib.contextmanager
def running_cluster(env: Mapping[str, str], logs: Path, workers: int = 2) -> Iterator[Cluster]:
    """Master + ``workers`` workers, killed on exit (also after an error)."""
    cluster = Cluster(env, logs)
    try:
        cluster.start_master()
        cluster.start_workers(workers)
        yield cluster
    finally:
        cluster.close()



# ------------------------------------------------------------------ comparing outputs
def _out_of(argv: Sequence[str]) -> Path:
    return Path(argv[list(argv).index("--out") + 1])


def _outs(commands: Sequence[Sequence[str]], local: Path) -> dict[str, tuple[Path, Path]]:
    """command name -> (local output folder, Spark output folder)."""
    return {cmd[1]: (local / cmd[1], _out_of(cmd)) for cmd in commands}


def embeddings_diff(local: Path, spark: Path) -> dict:
    """Spark's embeddings.parquet vs the local engine's cache: same ids, max abs diff."""
    import numpy as np
    import pandas as pd

    from taxoclass.features.embeddings import load_embeddings

    cache = load_embeddings(local)
    rows = pd.read_parquet(spark / "embeddings.parquet")
    rows = rows[rows["error"].isna()].drop_duplicates("image_id")
    got = {str(i): np.asarray(e, np.float32) for i, e in zip(rows["image_id"], rows["embedding"])}
    ids = [str(i) for i in cache.image_ids]
    same = sorted(got) == sorted(ids)
    diff = max(float(np.abs(got[i] - x).max()) for i, x in zip(ids, cache.embeddings)) \
        if same else float("nan")
    return {"n": len(ids), "n_spark": len(got), "same_ids": same, "max_abs_diff": diff}


def table_diff(local: Path, spark: Path, key: Sequence[str]) -> dict:
    """Two CSV tables, rows matched on ``key``: text columns equal? max abs diff of the
    numeric ones."""
    import numpy as np
    import pandas as pd

    a = pd.read_csv(local).sort_values(list(key)).reset_index(drop=True)
    b = pd.read_csv(spark).sort_values(list(key)).reset_index(drop=True)
    out = {"n": len(a), "n_spark": len(b), "same_columns": list(a.columns) == list(b.columns)}
    if len(a) != len(b) or not out["same_columns"]:
        return {**out, "same_text": False, "max_abs_diff": float("nan")}
    num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c])
           and pd.api.types.is_numeric_dtype(b[c])]
    text = [c for c in a.columns if c not in num]
    same = bool((a[text].fillna("").astype(str) == b[text].fillna("").astype(str)).all().all())
    diffs = [np.nanmax(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float)), initial=0.0)
             for c in num if a[c].notna().any()]
    nan_same = all((a[c].isna() == b[c].isna()).all() for c in num)
    return {**out, "same_text": same and nan_same, "max_abs_diff": float(max(diffs, default=0))}


def compare_outputs(outs: Mapping[str, tuple[Path, Path]]) -> dict[str, dict]:
    """Every output the page's jobs write, local vs Spark."""
    found: dict[str, dict] = {}
    for name, (local, spark) in outs.items():
        if name == "embed":
            found[name] = embeddings_diff(local, spark)
        elif name == "predict":
            found[name] = table_diff(local / "predictions.csv", spark / "predictions.csv",
                                     ["image"])
        elif name == "plot-report":
            found[name] = table_diff(local / "plot_records.csv", spark / "plot_records.csv",
                                     ["plot_id", "taxon_rank", "taxon"])
            found["plot-report tiles"] = table_diff(local / "tiles.csv", spark / "tiles.csv",
                                                    ["tile_id"])
    return found


def _lost(output: str) -> list[str]:
    """The driver's log lines about the lost executor and its retried tasks."""
    return [line.strip()[:200] for line in output.splitlines()
            if re.search(r"Lost executor|Lost task|ExecutorLostFailure|Executor .* removed",
                         line)]


def markdown(rows, checks, kill, event, kill_s, kill_out, rerun_s, rerun_out, *, env,
             n_images, argv, limit) -> str:
    """bench/results/spark_cluster.md."""
    import torch

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Spark standalone cluster (master + 2 workers) vs local engine",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}, pyspark "
        f"{_pyspark_version()}, Java: {_java()}; load at the end: `{uptime}`",
        f"- command: `{' '.join([Path(argv[0]).name, *argv[1:]])}`",
        f"- {n_images} leaf images{' (--limit)' if limit else ''}, EfficientNet-Lite0 384 px "
        "letterbox, model runs/leaf-model, plot-report on the quadrat photo (grid 4)",
        f"- cluster: docs/scaling.md's blocks as written; 2 workers x {env['WORKER_CORES']} "
        f"core, {env['WORKER_MEMORY']} each, spark-defaults.conf from the page; every "
        "command a fresh `taxoclass` process (driver JVM, executors and their model loads "
        "included); local engine: same command with `--engine local` (predict with a fresh "
        "`--cache`, so both compute every vector)",
        "",
        "| command | local s | spark s | local img/s | spark img/s | spark / local |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, local_s, spark_s in rows:
        per = name in ("embed", "predict")
        rates = [f"{n_images / t:.1f}" if per else "" for t in (local_s, spark_s)]
        lines.append(f"| {name} | {local_s:.1f} | {spark_s:.1f} | {rates[0]} | {rates[1]} | "
                     f"{spark_s / local_s:.2f} |")
    lines += ["", "Outputs, local vs spark:", ""]
    for name, c in checks.items():
        lines.append(f"- {name}: {json.dumps(c)}")
    lost = _lost(kill_out)
    lines += [
        "",
        "Killed worker: the same embed command into a new folder; worker 1 (its JVM, "
        f"executor and Python workers: {event.get('killed', 0)} processes) killed "
        f"{event.get('killed_at', float('nan'))} s into the command (tasks running on both "
        f"workers at {event.get('busy_at', float('nan'))} s, by the driver's REST API).",
        "",
        f"- outcome: the command finished (exit 0) in {kill_s:.1f} s; outputs vs local: "
        f"{json.dumps(kill.get('embed', {}))}",
        f"- driver log ({len(lost)} lines about the loss), first lines:",
        *[f"    - `{line}`" for line in lost[:4]],
        f"- rerun of the same command: {rerun_s:.1f} s, said: "
        f"`{_last_line(rerun_out, 'embeddings of dim')}`",
        "",
    ]
    return "\n".join(lines)


def _last_line(output: str, marker: str) -> str:
    found = [line for line in output.splitlines() if marker in line]
    return found[-1].strip() if found else "(no such line)"


def _pyspark_version() -> str:
    import pyspark

    return pyspark.__version__


def _java() -> str:
    done = subprocess.run(["java", "-version"], capture_output=True, text=True)
    return (done.stderr or done.stdout).splitlines()[0] if done.returncode == 0 else "?"


# ------------------------------------------------------------------ the benchmark
def _run(argv: Sequence[str], env: Mapping[str, str], log: Path) -> tuple[float, str]:
    """A ``taxoclass`` command as its own process; (seconds, its output)."""
    exe = str(Path(sys.executable).with_name("taxoclass"))
    t0 = time.perf_counter()
    done = subprocess.run([exe, *argv[1:]], env={**os.environ, **env}, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr, encoding="utf-8")
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}; see {log}")
    return seconds, done.stdout + done.stderr


def _busy_executors(master: str) -> int:
    """How many executors of the application on ``master`` run a task now (the driver's
    REST API, ports 4040-4055)."""
    for port in range(4040, 4056):
        base = f"http://127.0.0.1:{port}/api/v1/applications"
        try:
            with urllib.request.urlopen(base, timeout=1) as r:
                apps = json.loads(r.read())
            for app in apps:
                with urllib.request.urlopen(f"{base}/{app['id']}/executors", timeout=1) as r:
                    executors = json.loads(r.read())
                with urllib.request.urlopen(f"{base}/{app['id']}/environment", timeout=1) as r:
                    props = dict(json.loads(r.read()).get("sparkProperties", []))
                if props.get("spark.master") == master:
                    return sum(e["id"] != "driver" and e.get("activeTasks", 0) > 0
                               for e in executors)
        except (OSError, ValueError, KeyError):
            continue
    return 0


def _kill_during(cluster: Cluster, argv, env, log: Path, after: float) -> tuple[float, str, dict]:
    """Run ``argv`` while a thread kills worker 1 ``after`` seconds after executors on
    both workers run a task (the driver's REST API says so)."""
    import threading

    event: dict = {}

    def killer() -> None:
        end = time.monotonic() + 600
        while time.monotonic() < end and "done" not in event:
            if _busy_executors(env["MASTER"]) >= 2:
                event["busy_at"] = time.perf_counter()
                time.sleep(after)
                event["killed"] = len(cluster.kill_worker(1))
                event["killed_at"] = time.perf_counter()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    try:
        seconds, output = _run(argv, env, log)
    finally:
        event["done"] = True
    thread.join(timeout=5)
    for key in ("busy_at", "killed_at"):
        if key in event:
            event[key] = round(event[key] - t0, 1)
    return seconds, output, event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N leaf images only")
    parser.add_argument("--kill-after", type=float, default=3.0,
                        help="seconds after both workers run a task that worker 1 is killed")
    parser.add_argument("--kill-only", type=Path, default=None, metavar="LOCAL_EMBED",
                        help="only the killed-worker run and its rerun, compared with this "
                             "local embed output (e.g. kept from an earlier run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/spark_cluster.md")
    args = parser.parse_args(argv)
    # `timeout` sends SIGTERM: exit through the finally blocks, so the cluster is killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="taxoclass-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "leaf"
        _leaf_subset(data, args.limit)
        env = cluster_settings(tmp, data=str(data), model=str(LEAF_MODEL), plots=str(QUADRAT),
                               out=str(tmp / "spark"), backbone=LEAF_BACKBONE)
        commands = job_commands(env)
        rows, checks, logs = [], {}, tmp / "logs"
        logs.mkdir()
        with running_cluster(env, logs) as cluster:
            for cmd in commands if args.kill_only is None else []:
                name = cmd[1]  # cmd[0] is "taxoclass"
                extra = ("--cache", str(tmp / "local-cache")) if name == "predict" else ()
                local_s, _ = _run(local_command(cmd, str(tmp / "local" / name), *extra), env,
                                  logs / f"local-{name}.log")
                spark_s, _ = _run(cmd, env, logs / f"spark-{name}.log")
                rows.append((name, local_s, spark_s))
            checks = (compare_outputs(_outs(commands, tmp / "local"))
                      if args.kill_only is None else {})
            killed_cmd = [w.replace(str(tmp / "spark"), str(tmp / "spark-kill"))
                          for w in commands[0]]
            kill_s, kill_out, event = _kill_during(cluster, killed_cmd, env,
                                                   logs / "spark-kill.log", args.kill_after)
            rerun_s, rerun_out = _run(killed_cmd, env, logs / "spark-kill-rerun.log")
            local = tmp / "local" if args.kill_only is None else args.kill_only.parent
            kill = compare_outputs({"embed": (local / "embed", _out_of(killed_cmd))})
        text = markdown(rows, checks, kill, event, kill_s, kill_out, rerun_s, rerun_out,
                        env=env, n_images=_count(data), argv=sys.argv, limit=args.limit)
    from _results import publish

    publish(text, args.out)
    return 0


def _leaf_subset(folder: Path, limit: int | None) -> None:
    """``folder``: the leaf annotations (all, or the first ``limit`` images) and a link to
    the images, so the page's ``$DATA/annotations.json`` and ``$DATA/images`` exist."""
    folder.mkdir(parents=True)
    ann = json.loads((LEAF / "annotations.json").read_text(encoding="utf-8"))
    if limit:
        keep = {im["image_id"] for im in ann["images"][:limit]}
        ann["images"] = [im for im in ann["images"] if im["image_id"] in keep]
        ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
        (folder / "images").mkdir()
        for im in ann["images"]:
            src = LEAF / im["file_name"]
            dst = folder / im["file_name"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, dst)
    else:
        os.symlink(LEAF / "images", folder / "images")
    (folder / "annotations.json").write_text(json.dumps(ann), encoding="utf-8")


def _count(data: Path) -> int:
    return len(json.loads((data / "annotations.json").read_text(encoding="utf-8"))["images"])


if __name__ == "__main__":
    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        sys.exit("Java is not found (JAVA_HOME / java on PATH)")
    raise SystemExit(main())
