"""A real Spark standalone cluster: a master and two workers as separate processes.

docs/scaling.md's blocks are run as written (bench/spark_cluster.py reads them; only the
settings differ: 127.0.0.1, free ports, one core and 1 GB per worker, folders under
pytest's tmp path, the tiny fixture model and images, RELATIVE paths from a working
folder of the test's own, so a driver path that reaches an executor unchanged fails).
The page's `embed`, `predict` and `plot-report` commands run in this process (one driver,
one application on the cluster) and every output is compared with `--engine local`.
One worker (its JVM, executor and Python workers) is killed while the embed job's tasks
run on both workers: the job still finishes (the stage records the failed task that
Spark ran again on the other worker) and the same command again computes nothing.

Skipped without PySpark or Java, except under CI=true, where that is a failure.
The master, workers and everything they started are killed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_bench(name: str):
    """bench/NAME.py as a module (the page's blocks and the cluster helpers), without
    putting bench/ on sys.path."""
    spec = importlib.util.spec_from_file_location(f"taxoclass_bench_{name}",
                                                  REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


doc = _load_bench("spark_cluster")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(
                  "ignore:PySpark does not yet fully support pandas:FutureWarning")]


def _require_spark() -> None:
    from taxoclass.engines.spark import spark_available

    reason = spark_available()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the Spark cluster test: {reason}")
        pytest.skip(reason)


def _fresh_driver() -> None:
    """Stop any SparkContext and its JVM gateway, so the next one starts with this
    module's environment and spark-defaults.conf (and later modules with theirs)."""
    from pyspark import SparkContext

    if SparkContext._active_spark_context is not None:
        SparkContext._active_spark_context.stop()
    gateway = SparkContext._gateway
    if gateway is not None:
        with contextlib.suppress(Exception):
            gateway.shutdown()
        proc = getattr(gateway, "proc", None)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
                proc.wait(timeout=20)
        SparkContext._gateway = None
        SparkContext._jvm = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, fixture_set, fixture_model):
    _require_spark()
    from conftest import FIXTURES

    tmp = tmp_path_factory.mktemp("cluster")
    work = tmp / "cwd"
    work.mkdir()
    (work / "data").symlink_to(FIXTURES)
    (work / "model").symlink_to(fixture_model["model"])
    kwargs = json.dumps(fixture_set["kwargs"], separators=(",", ":"))
    env = doc.cluster_settings(
        tmp, data="data", model="model", plots="data/plots", out="out",
        backbone=f"--backbone {fixture_set['arch']} --checkpoint data/tiny_dinov2.pth "
                 f"--model-kwargs {kwargs}")
    running = doc.Cluster(env, tmp / "logs")
    with pytest.MonkeyPatch.context() as mp:
        try:
            _fresh_driver()
            for key in ("PYSPARK_PYTHON", "SPARK_CONF_DIR", "SPARK_LOCAL_DIRS", "SPARK_LOCAL_IP",
                        "SPARK_HOME"):
                mp.setenv(key, env[key])
            mp.chdir(work)
            running.start_master()
            running.start_workers(2)
            commands = {argv[1]: argv for argv in doc.job_commands(env)}
            yield SimpleNamespace(run=running, env=env, commands=commands, work=work,
                                  fixture_set=fixture_set, fixture_model=fixture_model)
        finally:
            with contextlib.suppress(Exception):
                _fresh_driver()
            running.close()


def _spark(cli, argv) -> str:
    assert argv[0] == "taxoclass" and "--engine" in argv
    return cli(*argv[1:])


def test_the_page_starts_a_master_and_two_workers(cluster):
    workers = cluster.run.state()["workers"]
    assert [(w["state"], w["cores"], w["memory"]) for w in workers] == [("ALIVE", 1, 1024)] * 2
    assert set(cluster.commands) == {"embed", "predict", "plot-report"}
    for argv in cluster.commands.values():
        assert argv[argv.index("--master") + 1] == cluster.env["MASTER"]


def _kill_worker_while_busy(run, found: dict) -> None:
    """Kill worker 1 as soon as a stage has a task running on each of the two workers."""
    from pyspark import SparkContext

    end = time.monotonic() + 240
    while time.monotonic() < end and not found.get("stop"):
        sc = SparkContext._active_spark_context
        if sc is not None:
            with contextlib.suppress(Exception):
                tracker = sc.statusTracker()
                for sid in tracker.getActiveStageIds():
                    info = tracker.getStageInfo(sid)
                    if info is not None and info.numActiveTasks >= 2:
                        found["stage"] = sid
                        found["killed"] = run.kill_worker(1)
                        return
        time.sleep(0.02)


def test_embed_finishes_when_a_worker_dies_and_a_rerun_skips_it(cluster, cli):
    from pyspark import SparkContext

    argv = cluster.commands["embed"]
    found: dict = {}
    killer = threading.Thread(target=_kill_worker_while_busy, args=(cluster.run, found),
                              daemon=True)
    killer.start()
    try:
        out = _spark(cli, argv)
    finally:
        found["stop"] = True
        killer.join(timeout=10)
    assert "60 embeddings of dim 64" in out and "(60 computed, 0 reused" in out
    assert found.get("killed"), "no stage ever ran a task on both workers"
    stage = SparkContext._active_spark_context.statusTracker().getStageInfo(found["stage"])
    assert stage.numFailedTasks >= 1  # the lost worker's task, run again on the other one
    assert stage.numCompletedTasks == stage.numTasks
    assert cluster.run.alive() == 1
    # every output there, equal to the local engine's (the fixture model's own cache)
    emb = doc.embeddings_diff(cluster.fixture_model["emb"], cluster.work / "out/embeddings")
    assert emb["same_ids"] and emb["n"] == 60 and emb["max_abs_diff"] <= 1e-5, emb
    # the same command again: everything written is skipped
    again = _spark(cli, argv)
    assert "60 embeddings of dim 64" in again and "(0 computed, 60 reused" in again
    # every setting of the page's spark-defaults.conf reached the application
    conf = dict(SparkContext._active_spark_context.getConf().getAll())
    page = dict(line.split(None, 1) for line in doc.doc_block("conf").splitlines()
                if line.strip() and not line.startswith("#"))
    assert "spark.executor.memory" in page
    assert {k: conf.get(k) for k in page} == {k: v.strip() for k, v in page.items()}
    cluster.run.start_workers(1)  # back to two workers for the next jobs


def test_predict_on_the_cluster_matches_local(cluster, cli):
    argv = cluster.commands["predict"]
    _spark(cli, argv)
    cli(*doc.local_command(argv, "local/predict", "--cache", "local/cache")[1:])
    got = doc.table_diff(cluster.work / "local/predict/predictions.csv",
                         cluster.work / "out/predictions/predictions.csv", ["image"])
    n_images = sum(1 for p in (cluster.work / "data/images").rglob("*") if p.is_file())
    assert got["n"] == got["n_spark"] == n_images > 60, got
    assert got["same_columns"] and got["same_text"], got
    assert got["max_abs_diff"] <= 1e-5, got


def test_plot_report_on_the_cluster_matches_local(cluster, cli):
    argv = cluster.commands["plot-report"]
    _spark(cli, argv)
    cli(*doc.local_command(argv, "local/plots")[1:])
    records = doc.table_diff(cluster.work / "local/plots/plot_records.csv",
                             cluster.work / "out/plots/plot_records.csv",
                             ["plot_id", "taxon_rank", "taxon"])
    assert records["n"] == records["n_spark"] >= 3, records
    assert records["same_columns"] and records["same_text"], records
    assert records["max_abs_diff"] <= 1e-5, records
    tiles = doc.table_diff(cluster.work / "local/plots/tiles.csv",
                           cluster.work / "out/plots/tiles.csv", ["tile_id"])
    assert tiles["n"] == tiles["n_spark"] == 3 * 16 and tiles["same_text"], tiles
    assert (cluster.work / "out/plots/plot_tiles.parquet").is_dir()
