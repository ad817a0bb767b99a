"""bench/conftest.py appends each bench session's rows to bench/results/<device>.json: sessions
that end together (parallel `pytest bench/...` processes) must keep every row."""

import importlib.util
import json
import multiprocessing
import os

BENCH_CONFTEST = os.path.join(os.path.dirname(__file__), "..", "bench", "conftest.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", BENCH_CONFTEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _append_sessions(results_dir: str, writer: int, sessions: int, start) -> None:
    mod = _load()
    mod.RESULTS_DIR = results_dir
    mod.environment_tags = lambda: {"device": "test-device", "writer": writer}  # no git/torch queries
    start.wait()
    for i in range(sessions):
        # A long row makes every read-modify-write slow enough for the writers to overlap.
        mod._rows[:] = [{"name": f"w{writer}-s{i}", "payload": "x" * 20000}]
        mod.pytest_sessionfinish(None, 0)


def test_parallel_sessions_keep_every_row(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_append_sessions, args=(str(tmp_path), w, 25, start)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    sessions = json.loads((tmp_path / "test-device.json").read_text())
    names = sorted(s["results"][0]["name"] for s in sessions)
    assert names == sorted(f"w{w}-s{i}" for w in range(3) for i in range(25))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
