"""Benchmark infrastructure shared by every bench module.

* ``bench_record(name, **fields)`` collects one result row; at session end all rows are
  appended to ``bench/results/<device>.json`` tagged with device, torch/triton versions and
  the git commit, so results from different machines never mix.
* Tests marked ``cuda`` skip without a GPU, so ``pytest bench/`` on a CPU machine runs the
  CPU comparisons only.
"""

import datetime
import fcntl
import json
import os
import platform
import subprocess

import pytest
import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
_rows: list[dict] = []


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def cpu_model() -> str:
    """The CPU's model name (rows of different CPUs share a results file: tell them apart)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()


def _git(*args: str) -> str | None:
    try:
        return subprocess.check_output(
            ["git", *args], cwd=os.path.dirname(__file__), text=True, stderr=subprocess.DEVNULL,
        ).strip()
    except Exception:
        return None


def _commit() -> str:
    """HEAD, with "+dirty" when tracked files differ from it (rows then measured code no commit holds)."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown"
    return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_features() -> list[str]:
    """The CPU flags that decide the CPU rows' low-precision speed (bf16 / AMX / AVX-512 / AVX2)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def environment_tags() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    import fastcgan

    return {
        "device": device_name(),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "threads": torch.get_num_threads(),  # the session's default; rows that pin theirs record it
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # others' work too
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _commit(),
        # What was measured: the package imported (an editable install may point at another
        # checkout than this bench/ folder's).
        "fastcgan_path": os.path.dirname(os.path.abspath(fastcgan.__file__)),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@pytest.fixture(scope="session")
def bench_record():
    def record(name: str, **fields):
        _rows.append({"name": name, **fields})

    return record


def pytest_sessionfinish(session, exitstatus):
    if not _rows:
        return
    tags = environment_tags()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{_slug(tags['device'])}.json")
    # Read-modify-write under an exclusive lock, through a private temporary: two bench sessions
    # ending together (parallel `pytest bench/...` runs) must not drop each other's rows.
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = []
        if os.path.exists(path):
            with open(path) as f:
                existing = json.load(f)
        existing.append({**tags, "results": _rows})
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(existing, f, indent=1)
        os.replace(tmp, path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
