"""``bench/gpu_check.sh --dry-run``: the budgeted GPU check runs end to end on the CPU, so the
script a GPU session depends on cannot rot between the (rare) sessions that have a GPU.

One dry run (all five stages at tiny sizes, Triton under its interpreter, ~40 s on an idle
2-core machine) is shared by the tests of this module."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
DRIVER = os.path.join(ROOT, "bench", "gpu_check.py")
TRITON_STAGES = ["correct-triton-nchw", "correct-triton-nchw-bf16", "correct-triton-nhwc", "correct-triton-other"]
STAGES = ["env", "aoti-build", *TRITON_STAGES, "correct-cuda", "correct-aoti"]
STAGES += ["train-warm-b2", "infer-warm", "kernels", "kernels-one-pass-off", "train", "infer",
           "train-no-cudnn-benchmark", "train-late"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    work = tmp_path_factory.mktemp("gpu_check_work")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(work)}
    env.pop("GPU_CHECK_DRY_AOTI", None)
    bundle = out.parent / "bundle" / "gc.tgz"
    proc = subprocess.run(
        ["bash", SCRIPT, str(out), "--dry-run", "--bundle", str(bundle)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return out, proc


@pytest.fixture(scope="module")
def driver():
    """bench/gpu_check.py imported in this process, for ``report`` and ``merge`` (which need no
    GPU and none of the bench modules); the bench folder it puts on sys.path is taken off again."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("fastcgan_bench_gpu_check", DRIVER)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    sys.path[:] = saved
    return mod


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_dry_run_every_stage_passes(dry_run):
    out, proc = dry_run
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(out.glob("*.log")))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}{logs}"
    stages = {s["stage"]: s for s in _lines(out / "stages.jsonl")}
    assert sorted(stages) == sorted(STAGES)
    assert all(s["rc"] == 0 and not s["timed_out"] for s in stages.values()), stages


def test_dry_run_pytest_selections_collect_tests(dry_run):
    """The trimmed ``pytest -m cuda`` selections of stage 2 still name tests (all skip on a CPU):
    a renamed test or parameter id must not silently empty the GPU correctness stage."""
    out, _ = dry_run
    for name in (*TRITON_STAGES, "correct-cuda"):
        log = (out / f"{name}.log").read_text()
        assert "skipped" in log and "error" not in log.lower(), log[-2000:]


def test_dry_run_bundle_holds_the_whole_outdir(dry_run):
    """--bundle: one archive for the device tool (which brings back at most 8 files)."""
    import tarfile

    out, _ = dry_run
    with tarfile.open(out.parent / "bundle" / "gc.tgz") as tar:
        names = {os.path.relpath(n, out.name) for n in tar.getnames()}
    assert {"stages.jsonl", "rows.jsonl", "report.txt", "kernels.log"} <= names, names
    assert not list((out.parent / "bundle").glob("*.tmp"))


def test_stage2_exclusions_name_real_tests():
    """Each ``not <id part>`` in stage 2's ``-k`` filters names a collected GPU test: the first H200
    run swept what the script meant to skip because ids had been written in another order."""
    import re

    with open(SCRIPT) as f:
        text = f.read()
    parts = {m for k in re.findall(r'-k "([^"]+)"', text) for m in re.findall(r"not ([\w\[\]-]+-[\w\[\]-]*)", k)}
    assert len(parts) >= 7, parts
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider",
         "tests/test_instance_norm_act.py", "tests/test_native.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids, proc.stdout[-2000:] + proc.stderr[-2000:]
    for part in parts:
        assert any(part in i for i in ids), f"gpu_check.sh -k excludes {part!r}, which names no test"


def _collect(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return {line for line in proc.stdout.splitlines() if "::" in line}


def test_stage2_triton_processes_split_the_triton_tests():
    """Stage 2's Triton processes (one per -k filter on tests/test_instance_norm_act.py) select
    every Triton GPU test but the two deliberate full sweeps exactly once: splitting the JIT work
    over more processes must not drop or repeat a test."""
    import re

    with open(SCRIPT) as f:
        text = f.read()
    filters = re.findall(r'-k "(triton and [^"]+)"', text)
    assert len(filters) == len(TRITON_STAGES), filters
    path = "tests/test_instance_norm_act.py"
    selected = [_collect(path, "-k", k) for k in filters]
    every = _collect(path, "-k", "triton")
    sweeps = {i for i in every if "[nchw-3x5-triton-fp32]" in i or "[nhwc-3x5-triton-bf16]" in i}
    assert len(sweeps) == 2 and all(selected), (sweeps, [len(s) for s in selected])
    assert sum(len(s) for s in selected) == len(set().union(*selected)), "a test runs in two processes"
    assert set().union(*selected) == every - sweeps, sorted((every - sweeps) ^ set().union(*selected))


def test_dry_run_rows_and_report(dry_run):
    out, _ = dry_run
    rows = _lines(out / "rows.jsonl")
    names = {r["name"] for r in rows}
    assert "gpu_check/backends" in names
    assert "copy_bandwidth" in names
    kernel = [r for r in rows if r["name"].startswith("instance_norm_act/fwd+bwd/")]
    assert {r["variant"] for r in kernel} >= {"eager", "compiled", "fastcgan-triton"}
    assert {(r["dtype"], r["layout"]) for r in kernel} == {("float32", "nchw"), ("bfloat16", "nhwc")}
    assert all(r["time_us"] > 0 and r["gbps"] > 0 for r in kernel)
    # FASTCGAN_ONE_PASS=0 rows (their own process): the fused backends only, beside their defaults.
    off = [r for r in rows if r["name"].startswith("instance_norm_act-one-pass-off/fwd+bwd/")]
    assert {r["variant"] for r in off} == {"fastcgan-triton"} and all(r["one_pass"] is False for r in off)
    cases = {(r["dtype"], r["layout"], r["shape"]) for r in off}
    assert cases == {("bfloat16", "nhwc", s) for s in ("1x4x8x8", "2x4x8x8")}
    train = [r for r in rows if r["name"].startswith("train_step/")]
    assert {r["name"].rsplit("/", 1)[1] for r in train} == {
        "official-eager-fp32",
        "auto-amp-cl-compile-graphs-gpudata",
        "auto-fp32-no-cudnn-benchmark",
        "auto-fp32",  # train-late (after stage 5), its ratio from stage 4's official row
    }
    assert all(r["images_per_s"] > 0 and r["ratio_to_official"] > 0 for r in train)
    assert all("warmup_peak_memory_mb" in r and "peak_memory_mb" in r for r in train)
    assert "inference/compiled-bf16/compile-cold" in names and "inference/compiled-bf16/compile" in names
    infer = [r for r in rows if r["name"].startswith("inference/") and "batch" in r]
    assert {(r["name"], r["batch"]) for r in infer} == {
        (f"inference/{e}", b) for e in ("eager-fp32", "eager-fp32-torch-kernels", "compiled-bf16") for b in (1, 2)
    }
    # The report: one entry in the bench/results format, tagged like bench/conftest.py's rows.
    (entry,) = json.loads(next(out.glob("cpu-*.json")).read_text())
    for key in ("device", "torch", "triton", "commit", "python", "date", "cpu_model"):
        assert key in entry
    assert entry["dry_run"] is True and len(entry["results"]) == len(rows)
    assert all(r["dry_run"] for r in rows)  # so merge refuses them even without env.json
    report = (out / "report.txt").read_text()
    assert "training step:" in report and "one-pass kernels off (FASTCGAN_ONE_PASS=0)" in report


def test_merge_appends_a_gpu_entry_and_refuses_a_dry_run(dry_run, driver, tmp_path, capsys):
    out, _ = dry_run
    results = tmp_path / "results"
    args = ["merge", "--out", str(out), "--results-dir", str(results)]
    assert driver.main(args) == 2 and "dry-run" in capsys.readouterr().err
    # The same rows as if a GPU had produced them: merged, and merged again beside the first.
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    env = json.loads((out / "env.json").read_text())
    env.update(device="NVIDIA H100 80GB HBM3", dry_run=False)
    (gpu / "env.json").write_text(json.dumps(env))
    rows = [{k: v for k, v in r.items() if k != "dry_run"} for r in _lines(out / "rows.jsonl")]
    (gpu / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args[2] = str(gpu)
    for n in (1, 2):
        assert driver.main(args) == 0, capsys.readouterr().err
        entries = json.loads((results / "nvidia-h100-80gb-hbm3.json").read_text())
        assert len(entries) == n and entries[-1]["device"] == "NVIDIA H100 80GB HBM3"
        assert "backends" not in entries[-1] and entries[-1]["results"]


def test_gpu_sizes_name_what_the_bench_modules_define(tmp_path):
    """The GPU run is never executed here: check that what it names still exists (the train
    variants, the ResNet-9 norm shapes of the kernel bench) and that without a GPU the script
    refuses to run (it would rebuild the package) instead of measuring the CPU."""
    code = (
        "import sys; sys.path.insert(0, 'bench')\n"
        "import gpu_check as g, test_train_step as t, test_instance_norm_act as k\n"
        "S = g.GPU\n"
        "assert S.train_variant in t.VARIANTS and all(v in t.VARIANTS for v in S.train_extra + S.train_late)\n"
        "assert not any(t.VARIANTS[v].get('compile') for v in S.train_extra)  # stage 4's extras stay eager\n"
        "assert set(S.kernel_one_pass_planes) < set(k.BASE_SHAPES)\n"
        "assert 'cuda_graphs' in t.VARIANTS[S.train_variant] and t.VARIANTS[S.train_variant]['compile']\n"
        "assert set(S.kernel_planes) == set(k.BASE_SHAPES) and S.kernel_batches == (1, 8)\n"
        "assert S.train_batches == (1, 8) and S.infer_batches == (1, 32) and S.aoti\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if not _cuda_visible():
        env = {**os.environ, "PYTHON": sys.executable}
        cmd = ["bash", SCRIPT, str(tmp_path / "out")]
        refused = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert refused.returncode == 2 and "--dry-run" in refused.stderr


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def test_report_of_gpu_rows_states_every_target(driver, tmp_path, capsys):
    """The report's GPU-only branches (CUDA-graph rows, batch-8 bandwidth, MFU, the training and
    kernel targets, the AUTO_ORDER_CUDA candidate) on rows shaped as a GPU run writes them."""

    def kernel(variant, t_us, shape, base_us, compiled_us):
        bw = 85.0 if variant.startswith("fastcgan-cuda") else 40.0
        return {
            "name": f"instance_norm_act/fwd+bwd/{variant}", "stage": "3", "shape": shape, "dtype": "bfloat16",
            "layout": "nhwc", "device": "cuda", "variant": variant, "mode": "fwd+bwd", "time_us": t_us,
            "gbps": 1.0, "pct_copy_bw": bw, "x_vs_eager": base_us / t_us, "x_vs_compiled": compiled_us / t_us,
        }  # fmt: skip

    rows = []
    for shape in ("1x64x256x256", "8x64x256x256"):
        rows += [kernel("eager", 300, shape, 300, 200), kernel("compiled", 200, shape, 300, 200)]
        rows += [
            kernel("fastcgan-cuda", 90, shape, 300, 200),
            kernel("fastcgan-triton", 120, shape, 300, 200),
        ]
        rows += [
            kernel("eager-graph", 250, shape, 250, 200),
            kernel("fastcgan-cuda-graph", 50, shape, 250, 200),
        ]
    for b, ips, ratio in ((1, 60.0, 7.0), (8, 150.0, 3.0)):
        rows.append({
            "name": f"train_step/cuda-256-b{b}/auto-amp-cl-compile-graphs-gpudata", "stage": "4", "batch": b,
            "images_per_s": ips, "ratio_to_official": ratio, "peak_memory_mb": 5000.0, "mfu": 0.12,
            "build_and_first_step_s": 61.0,
        })  # fmt: skip
    for name, ips in (("auto-amp-cl", 40.0), ("auto-amp-cl-no-cudnn-benchmark", 32.0)):
        rows.append({
            "name": f"train_step/cuda-256-b1/{name}", "stage": "4", "batch": 1, "images_per_s": ips,
            "ratio_to_official": 4.0, "peak_memory_mb": 4000.0, "mfu": 0.1,
        })  # fmt: skip
    rows.append({  # stage kernels-one-pass-off: the same case with FASTCGAN_ONE_PASS=0
        **kernel("fastcgan-cuda", 60, "1x64x256x256", 300, 200), "one_pass": False,
        "name": "instance_norm_act-one-pass-off/fwd+bwd/fastcgan-cuda",
    })
    rows.append({
        "name": "inference/aoti-bf16", "stage": "5", "batch": 32, "latency_ms": 10.0, "images_per_s": 3200.0,
        "speedup_vs_eager_fp32": 3.5, "max_abs_err": 0.07,
    })  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "commit": "c"}
    (tmp_path / "env.json").write_text(json.dumps(env))
    assert driver.main(["report", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "x3.33 eager (met >=3.0)" in text and "x2.22 compiled (met >=1.3)" in text
    assert "85 % copy bw (fastcgan-cuda; met >=80 % at batch 8)" in text
    assert "replayed: fastcgan-cuda-graph x5.00 eager-graph" in text
    assert "AUTO_ORDER_CUDA candidate ('cuda', 'triton')" in text
    assert "target batch 1 >= 6.0x official: x7.00 met" in text
    assert "target batch 8 >= 200.0 img/s: 150 missed" in text
    assert "MFU 12.0 %" in text and "build+compile 61 s" in text
    assert "b1 cuDNN autotuning on auto-amp-cl: x1.25 images/s" in text
    assert re.search(r"1x64x256x256 fastcgan-cuda +90\.0 -> +60\.0  x1\.50", text), text
    assert json.loads((tmp_path / "nvidia-h100.json").read_text())[0]["results"] == rows


def test_usage_mistakes_exit_2_before_anything_is_written(tmp_path):
    """--help was taken as OUTDIR; an OUTDIR that is a file left OUT empty and the logs went to /
    and the repository root (exit 0); --stages 9 ran nothing, exit 0; a --bundle inside OUTDIR
    packed every earlier bundle into the next."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "o"
    cases = [
        (["--dry-run"], "OUTDIR comes first"),
        ([str(afile), "--dry-run"], "is not a folder"),
        ([str(out), "--dry-run", "--stages", "9"], "stages are 1 to 5"),
        ([str(out), "--dry-run", "--bundle", str(out / "b.tgz")], "inside OUTDIR"),
        ([str(out), "--dry-run", "--bundle", str(afile / "b.tgz")], "is not a folder"),
    ]
    for args, said in cases:
        p = subprocess.run(["bash", SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and said in p.stderr, (args, p.stderr)
        assert sorted(os.listdir(tmp_path)) == ["afile"], args
    p = subprocess.run(["bash", SCRIPT, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "OUTDIR" in p.stdout and sorted(os.listdir(tmp_path)) == ["afile"]


def test_a_rerun_stage_replaces_its_earlier_record(driver, tmp_path, capsys):
    """A stage rerun into OUTDIR (--stages) appended to stages.jsonl: an earlier failure kept the
    script's exit status 1 and the report listed the stage twice."""
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6",
                                                    "commit": "c"}))
    with open(tmp_path / "stages.jsonl", "w") as f:
        f.write('{"stage": "env", "rc": 1, "timed_out": false, "seconds": 1.0, "timeout_s": 60}\n')
    assert driver.main(["report", "--out", str(tmp_path)]) == 1
    with open(tmp_path / "stages.jsonl", "a") as f:
        f.write('{"stage": "env", "rc": 0, "timed_out": false, "seconds": 2.0, "timeout_s": 60}\n')
    capsys.readouterr()
    assert driver.main(["report", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("stage env") == 1


def test_only_a_cut_train_late_is_not_a_failure(driver, tmp_path, capsys):
    """train-late runs in what is left of the budget: its timeout or skip is expected and leaves
    the exit status 0; any other stage's timeout, or a train-late failure, is a failure."""
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6",
                                                    "commit": "c"}))

    def report(*stages):
        (tmp_path / "stages.jsonl").write_text("".join(
            json.dumps({"stage": n, "rc": rc, "timed_out": rc == 124, "seconds": 1.0, "timeout_s": 60,
                        **({"skipped": True} if rc == 125 else {})}) + "\n" for n, rc in stages))
        return driver.main(["report", "--out", str(tmp_path)])

    assert report(("infer", 0), ("train-late", 124)) == 0 and "cut (optional)" in capsys.readouterr().out
    assert report(("infer", 0), ("train-late", 125)) == 0
    assert report(("infer", 0), ("train-late", 1)) == 1
    assert report(("train", 124), ("train-late", 0)) == 1


def test_a_rerun_stage_replaces_its_earlier_rows(driver, tmp_path, monkeypatch):
    """A stage rerun with --stages appended its rows to the earlier run's: the report and the
    merged results held both measurements of each row. Rows are now owned by the stage command
    that wrote them; a rerun drops only its own (train-warm per batch)."""
    monkeypatch.setattr(driver, "_WRITER", None)
    out = str(tmp_path)
    for writer, names in (("kernels", ["k1", "k2"]), ("train-warm-b1", ["w1"]), ("train-warm-b8", ["w8"])):
        driver.start_writing_rows(out, writer)
        for n in names:
            driver.append_row(out, "3", n, time_us=1.0)
    assert driver.start_writing_rows(out, "kernels") == 2
    driver.append_row(out, "3", "k1", time_us=2.0)
    rows = driver.read_rows(out)
    assert [(r["name"], r["by"]) for r in rows] == [("w1", "train-warm-b1"), ("w8", "train-warm-b8"),
                                                   ("k1", "kernels")]
    assert rows[-1]["time_us"] == 2.0
    assert driver.start_writing_rows(out, "train-warm-b1") == 1
    assert [r["name"] for r in driver.read_rows(out)] == ["w8", "k1"]


def test_parallel_writers_keep_every_row(driver, tmp_path):
    """train-warm-b1 and -b8 append at the same time; a read-append-replace without a lock lost rows."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(driver, str(tmp_path), w)) for w in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(r["name"] for r in driver.read_rows(str(tmp_path))) == sorted(
        f"{w}{i}" for w in ("a", "b") for i in range(40))


def _append_many(driver, out, writer):
    driver.start_writing_rows(out, writer)
    for i in range(40):
        driver.append_row(out, "4", f"{writer}{i}")
