"""The stages of ``bench/gpu_check.sh`` that measure (3 kernels, 4 training, 5 inference), the
environment record (1), the AOTInductor package check (2), the background compiles that warm
Inductor's caches for stages 4 and 5 (``train-warm``, ``infer-warm``) and the report.

Each stage is one process (``python bench/gpu_check.py STAGE --out OUTDIR [--dry-run]``) so the
shell script can put each under its own ``timeout``. Every measured row is appended to
``OUTDIR/rows.jsonl`` the moment it exists, so a stage killed half-way keeps what it finished;
``report`` turns the rows into ``OUTDIR/<device>.json`` in the format of ``bench/results/*.json``
(one entry tagged with device, torch, triton, commit; see ``bench/conftest.py``) and prints the
targets met or missed; ``merge OUTDIR`` appends that entry to ``bench/results/<device>.json``.

``--dry-run`` runs the same code on the CPU at tiny sizes (Triton under its interpreter,
``torch.compile`` with the ``eager`` backend, no CUDA graphs) so ``tests/test_gpu_check.py`` can
keep the whole path working between GPU sessions. Numbers from a dry run mean nothing.

The measuring code is the benchmark suite's own (``bench/_timing.py``, the variant table and
step factory of ``bench/test_train_step.py``, the helpers of ``bench/test_instance_norm_act.py``);
only the trimmed sizes and the one-compile-per-variant ordering live here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import gc
import json
import math
import os
import random
import sys
import time
import types
import warnings

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

try:  # the bench modules import pytest for their decorators; the GPU machine may lack it
    import pytest  # noqa: F401
except ImportError:  # pragma: no cover - only where pytest is not installed

    def _identity_decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda f: f

    _stub = types.ModuleType("pytest")
    _stub.mark = types.SimpleNamespace(
        **{k: _identity_decorator for k in ("cuda", "slow", "parametrize", "skipif")}
    )
    _stub.fixture = _identity_decorator
    sys.modules["pytest"] = _stub

import torch

from fastcgan.fileio import atomic_write


# --------------------------------------------------------------------------------------------
# Sizes: the GPU run and its CPU dry run differ only here
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sizes:
    device: str
    compile_backend: str  # "inductor" on the GPU; "eager" in the dry run (Dynamo tracing only)
    # stage 3: instance_norm_act relu + pad 1, forward+backward (bench/test_instance_norm_act.py)
    kernel_planes: tuple  # (C, H, W) of the ResNet-9 256² norms
    kernel_batches: tuple
    kernel_cases: tuple  # (dtype name, layout): fp32 as the official/faithful run, bf16 as the fast one
    # the planes whose channels_last bf16 rows are timed again with FASTCGAN_ONE_PASS=0 (those
    # that either backend runs one-pass), triton and cuda only, at kernel_batches
    kernel_one_pass_planes: tuple
    kernel_iters: int
    kernel_warmup: int
    copy_bytes: int
    aoti: bool  # build, check and time the AOTInductor package (a ~30 s C++ build on a small CPU)
    # stage 4: training step (bench/test_train_step.py)
    train_size: int
    train_ngf: int
    train_blocks: int
    train_batches: tuple
    train_variant: str  # fastcgan's fastest configuration, a key of VARIANTS
    train_overrides: tuple  # (key, value) RunConfig overrides of that variant
    train_extra: tuple  # cheap eager variants measured after the fastest (no compile)
    train_late: tuple  # variants with a cold compile: stage train-late, after stage 5, in what is left
    train_iters: int
    train_warmup: int
    # stage 5: inference (bench/test_inference.py)
    infer_size: int
    infer_ngf: int
    infer_batches: tuple
    infer_iters: int
    infer_warmup: int


GPU = Sizes(
    device="cuda",
    compile_backend="inductor",
    kernel_planes=((64, 256, 256), (128, 128, 128), (256, 64, 64)),
    kernel_batches=(1, 8),
    kernel_cases=(("bfloat16", "nhwc"), ("float32", "nchw")),  # bf16 first: the targets are bf16
    kernel_one_pass_planes=((128, 128, 128), (256, 64, 64)),
    kernel_iters=20,
    kernel_warmup=5,
    copy_bytes=1 << 30,
    aoti=True,
    train_size=256,
    train_ngf=64,
    train_blocks=9,
    train_batches=(1, 8),
    train_variant="auto-amp-cl-compile-graphs-gpudata",
    train_overrides=(),
    train_extra=("auto-amp-cl",),
    # Its compile is cold (nothing warms it: a third background compile would slow stage 2) and
    # took 120 s at batch 1 alone on the first H200 run: timed last, after stage 5.
    train_late=("cuda-amp-cl-compile-graphs-gpudata",),
    train_iters=20,
    train_warmup=3,
    infer_size=256,
    infer_ngf=64,
    infer_batches=(1, 32),
    infer_iters=20,
    infer_warmup=5,
)

DRY = Sizes(
    device="cpu",
    compile_backend="eager",
    kernel_planes=((4, 8, 8),),
    kernel_batches=(1, 2),
    kernel_cases=(("bfloat16", "nhwc"), ("float32", "nchw")),  # bf16 first: the targets are bf16
    kernel_one_pass_planes=((4, 8, 8),),
    kernel_iters=2,
    kernel_warmup=1,
    copy_bytes=1 << 20,
    aoti=os.environ.get("GPU_CHECK_DRY_AOTI", "0") == "1",  # tests/test_deploy_aoti.py covers it on CPU
    train_size=32,
    train_ngf=4,
    train_blocks=6,
    train_batches=(2,),  # one compile: batch 1 runs the same code
    train_variant="auto-amp-cl-compile-graphs-gpudata",
    # No CUDA graphs without CUDA; fp32 because bf16 is emulated (slow) on most CPUs.
    train_overrides=(("cuda_graphs", False), ("amp", False), ("compile_backend", "eager")),
    train_extra=(),  # the same function as the fastest variant's rows
    train_late=("auto-fp32",),  # the train-late stage's path (ratio from stage 4's official rows)
    train_iters=2,
    train_warmup=1,
    infer_size=32,
    infer_ngf=4,
    infer_batches=(1, 2),
    infer_iters=2,
    infer_warmup=1,
)

# Targets stated by the project (README "Not yet verified", issue #10); reported, never asserted.
KERNEL_X_EAGER, KERNEL_X_COMPILED, KERNEL_PCT_COPY = 3.0, 1.3, 80.0
TRAIN_X_OFFICIAL_B1, TRAIN_IPS_B8 = 6.0, 200.0


# --------------------------------------------------------------------------------------------
# Output: rows appended as they are measured
# --------------------------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v).replace("torch.", "")
    return v


_DRY_RUN = False  # set by main(): dry-run rows are marked, and merge refuses them
_WRITER: str | None = None  # the stage command writing rows ("kernels", "train-warm-b8"), set by main()


@contextlib.contextmanager
def _rows_locked(out: str):
    """``rows.jsonl`` rewritten by one process at a time: train-warm-b1 and -b8 run in parallel,
    and a read-append-replace racing another lost that one's row."""
    with open(os.path.join(out, "rows.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield os.path.join(out, "rows.jsonl")


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if line.strip()]


def append_row(out: str, stage: str, name: str, **fields) -> dict:
    """Add one result row to ``out/rows.jsonl`` now (atomically: a kill keeps every earlier row)."""
    row = {"name": name, "stage": stage, **{k: _jsonable(v) for k, v in fields.items()}}
    if _DRY_RUN:
        row["dry_run"] = True
    if _WRITER is not None:
        row["by"] = _WRITER
    with _rows_locked(out) as path:
        atomic_write(path, ("".join(_read_lines(path)) + json.dumps(row) + "\n").encode())
    return row


def start_writing_rows(out: str, writer: str) -> int:
    """Rows from now on are ``writer``'s; its rows from an earlier run into ``out`` (a stage rerun
    with --stages) are dropped, so the report and merge never mix two runs of one measurement.
    Returns how many were dropped."""
    global _WRITER
    _WRITER = writer
    with _rows_locked(out) as path:
        lines = _read_lines(path)
        keep = [line for line in lines if json.loads(line).get("by") != writer]
        if len(keep) != len(lines):
            atomic_write(path, "".join(keep).encode())
    return len(lines) - len(keep)


def read_rows(out: str) -> list[dict]:
    path = os.path.join(out, "rows.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _raise_recompile_limit():
    """Every composition in stage 3 is an ``nn.Sequential`` (one code object): let Dynamo keep a
    graph per shape/dtype instead of silently falling back to eager after 8."""
    cfg = torch._dynamo.config
    for k in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, k):
            setattr(cfg, k, max(getattr(cfg, k), 128))


# --------------------------------------------------------------------------------------------
# Stage 1: environment
# --------------------------------------------------------------------------------------------
def _tags() -> dict:
    """bench/conftest.py's tags (device, cpu_model, torch, triton, commit, python, date)."""
    from conftest import environment_tags

    tags = environment_tags()
    if os.environ.get("GPU_CHECK_COMMIT"):
        # Given, it wins: the device copy's git metadata (if any) named an older commit on the
        # second H200 run of 2026-11-27.
        tags["commit"] = os.environ["GPU_CHECK_COMMIT"][:12]
    return tags


def stage_env(S: Sizes, out: str) -> int:
    from fastcgan import ops

    tags = _tags()
    tags["cuda_runtime"] = torch.version.cuda
    tags["dry_run"] = S.device == "cpu"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        tags.update(
            capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            sm_count=p.multi_processor_count,
        )
    for k in ("driver", "nvcc", "cuda_archs"):
        v = os.environ.get(f"GPU_CHECK_{k.upper()}")
        if v:
            tags[k] = v
    backends = {
        k: {"available": v.available, "reason": v.reason, "devices": list(v.devices)}
        for k, v in ops.available_backends().items()
    }
    atomic_write(os.path.join(out, "env.json"), json.dumps({**tags, "backends": backends}, indent=1).encode())
    append_row(
        out, "1", "gpu_check/backends", device=S.device, **{k: v["available"] for k, v in backends.items()}
    )
    for k, v in tags.items():
        print(f"{k:>15}: {v}")
    for k, v in backends.items():
        print(f"{k:>15}: {'yes' if v['available'] else 'no '} {v['reason']}")
    if S.device == "cuda":
        missing = [b for b in ("triton", "cuda") if not backends[b]["available"]]
        if missing:
            print(f"GPU backends unavailable: {missing}")
            return 1
    return 0


# --------------------------------------------------------------------------------------------
# Stage 2 (part): the AOTInductor package of the ResNet-9 generator, built in the background
# --------------------------------------------------------------------------------------------
def _generator(S: Sizes, backend: str = "auto"):
    from fastcgan.models import build_generator

    torch.manual_seed(0)
    return build_generator("resnet_9blocks", ngf=S.infer_ngf, backend=backend).eval()


_NO_DRY_AOTI = "AOTInductor skipped in this dry run (GPU_CHECK_DRY_AOTI=1 includes its ~30 s CPU build)"


def _aoti_paths(work: str):
    return os.path.join(work, "g.safetensors"), os.path.join(work, "g_bf16.pt2")


def stage_aoti_build(S: Sizes, out: str, work: str) -> int:
    """Compile the bf16 package once (in a child process, as ``fastcgan-export`` does: torch
    2.11 crashed loading a CUDA package in the process that compiled it). Stage 2 checks it,
    stage 5 times it."""
    if not S.aoti:
        print(_NO_DRY_AOTI)
        return 0
    from fastcgan.deploy.aoti import compile_isolated

    from fastcgan.models import save_generator

    os.makedirs(work, exist_ok=True)
    st, pt2 = _aoti_paths(work)
    if os.path.exists(pt2):  # never check or time a package left by an earlier run
        os.remove(pt2)
    save_generator(_generator(S), st)
    t0 = time.perf_counter()
    compile_isolated(st, pt2, torch.device(S.device), dtype=torch.bfloat16)
    secs = time.perf_counter() - t0
    append_row(
        out,
        "2",
        "gpu_check/aoti-build",
        device=S.device,
        dtype="bfloat16",
        compile_s=secs,
        package_mb=os.path.getsize(pt2) / 2**20,
    )
    print(f"AOTInductor bf16 package for {S.device}: compiled in {secs:.0f} s")
    return 0


def stage_aoti_check(S: Sizes, out: str, work: str) -> int:
    """The package loads and runs in a fresh process (torch alone) and matches eager fp32."""
    if not S.aoti:
        print(_NO_DRY_AOTI)
        return 0
    from fastcgan.deploy.aoti import run_package_isolated

    _, pt2 = _aoti_paths(work)
    if not os.path.exists(pt2):
        append_row(
            out,
            "2",
            "correctness/aoti-load",
            device=S.device,
            passed=False,
            error="no package (aoti-build failed or timed out; see aoti-build.log)",
        )
        print(f"no AOTInductor package at {pt2}")
        return 1
    g = torch.Generator().manual_seed(3)
    xs = [
        torch.rand(1, 3, S.infer_size, S.infer_size, generator=g) * 2 - 1,
        torch.rand(2, 3, S.infer_size // 2, S.infer_size, generator=g) * 2 - 1,
    ]  # other batch and H
    model = _generator(S)
    with torch.no_grad():
        refs = [model(x) for x in xs]
    outs = run_package_isolated(pt2, [x.to(torch.bfloat16) for x in xs], torch.device(S.device))
    err = max(float((o.float() - r).abs().max()) for o, r in zip(outs, refs))
    shapes_ok = all(o.shape == r.shape for o, r in zip(outs, refs))
    passed = shapes_ok and err <= 0.25  # bf16 end to end vs fp32 eager: ~0.07 measured on an H100
    append_row(
        out,
        "2",
        "correctness/aoti-load",
        device=S.device,
        passed=passed,
        max_abs_err=err,
        shapes=[list(o.shape) for o in outs],
    )
    print(
        f"AOTInductor package runs in a fresh process: {'PASS' if passed else 'FAIL'} "
        f"(max |err| vs eager fp32 {err:.3g}, shapes ok: {shapes_ok})"
    )
    return 0 if passed else 1


# --------------------------------------------------------------------------------------------
# Stage 3: instance_norm_act kernel table
# --------------------------------------------------------------------------------------------
def _kernel_breakdown(step, iters: int = 3) -> dict:
    """Device microseconds per call of each CUDA kernel that ``step`` launches, by kernel name
    (torch.profiler's CUPTI activity records: no hardware counters or ncu permissions needed).
    Says which kernel of a backend's forward+backward holds the time; {} if profiling fails."""
    from torch.profiler import ProfilerActivity, profile

    try:
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                step()
            torch.cuda.synchronize()
        out = {}
        for ev in prof.key_averages():
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = getattr(ev, "self_cuda_time_total", 0)
            if us > 0:
                out[ev.key[:120]] = round(us / iters, 2)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
    except Exception as e:  # noqa: BLE001 - a profile is extra information, never a failure
        print(f"[gpu_check] kernel profile failed: {type(e).__name__}: {str(e)[:200]}")
        return {}


# Kernel-name fragments -> where a training step's device time goes (first match wins).
_STEP_CATEGORIES = (
    ("instance_norm_act", ("fwd_stats", "fwd_apply", "bwd_sums", "bwd_dx", "merge_stats", "merge_sums",
                           "_one_pass_kernel", "_reduce_kernel", "_dx_kernel", "_merge_")),
    ("conv / gemm", ("conv", "gemm", "xmma", "cutlass", "cudnn", "nvjet", "wgrad", "dgrad", "implicit")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("inductor fused", ("triton_",)),
)


def _step_categories(kernels_us: dict) -> dict:
    """Device microseconds per step by category (``_STEP_CATEGORIES``, the rest "other")."""
    totals: dict = {}
    for name, us in kernels_us.items():
        low = name.lower()
        cat = next((c for c, frags in _STEP_CATEGORIES if any(f.lower() in low for f in frags)), "other")
        totals[cat] = round(totals.get(cat, 0.0) + us, 1)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _time_kernel_case(kb, S: Sizes, shape, dtype, layout, backends, baselines=True) -> tuple[dict, list, dict]:
    """Median seconds of forward+backward per variant at one (shape, dtype, layout): the eager
    composition and its ``torch.compile`` (unless ``baselines`` is false), each fastcgan backend,
    and (GPU) CUDA-graph replays of all but the compiled one. Returns (times, failed variant
    names, per-kernel profile of each fastcgan backend on a GPU)."""
    from _timing import median_time

    device, mode = S.device, "fwd+bwd"
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    n, c, h, w = shape
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn((n, c, h + 2 * kb.PAD, w + 2 * kb.PAD), device=device, dtype=dtype)
    dy = dy.contiguous(memory_format=fmt)
    variants = {f"fastcgan-{b}": kb._fused(b) for b in backends}
    if baselines:
        eager = kb._composition(c).to(device)
        compiled = torch.compile(eager, fullgraph=True, dynamic=False, backend=S.compile_backend)
        variants = {"eager": eager, "compiled": compiled, **variants}
    times, failed, profiles = {}, [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in variants.items():
            try:
                step = kb._steps(fn, x, dy)[mode]
                times[name] = median_time(step, device, warmup=S.kernel_warmup, iters=S.kernel_iters, flush_l2=True)
                if device == "cuda" and name.startswith("fastcgan-"):
                    profiles[name] = _kernel_breakdown(step)
                if device == "cuda" and name != "compiled":
                    replay = kb._graphed(fn, x, dy, mode)
                    if replay is not None:
                        times[name + "-graph"] = median_time(
                            replay, device, warmup=S.kernel_warmup, iters=S.kernel_iters, flush_l2=True
                        )
            except Exception as e:  # noqa: BLE001 - one broken variant must not cost the rest
                print(
                    f"[gpu_check] {name} {shape} {dtype} {layout} failed: {type(e).__name__}: {str(e)[:400]}"
                )
                failed.append(name)
    return times, failed, profiles


def stage_kernels(S: Sizes, out: str) -> int:
    import test_instance_norm_act as kb
    from _timing import copy_bandwidth

    from fastcgan.ops import _backends

    _raise_recompile_limit()
    device, mode = S.device, "fwd+bwd"
    backends = [
        b
        for b in ("triton", "cuda", "cpp")
        if _backends.status(b).available and device in _backends.status(b).devices
    ]
    copy_bw = copy_bandwidth(device, S.copy_bytes)
    append_row(out, "3", "copy_bandwidth", device=device, nbytes=S.copy_bytes, gbps=copy_bw / 1e9)
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write); backends: {backends}")
    failed = []
    for dtype_name, layout in S.kernel_cases:
        dtype = _dtype(dtype_name)
        for batch in S.kernel_batches:
            for plane in S.kernel_planes:
                shape = (batch, *plane)
                times, bad, profiles = _time_kernel_case(kb, S, shape, dtype, layout, backends)
                failed += [f"{name} {shape} {dtype_name} {layout}" for name in bad]
                nbytes = kb._min_bytes(shape, dtype, mode)
                for name, t in times.items():
                    base = "eager-graph" if name.endswith("-graph") else "eager"
                    row = append_row(
                        out, "3", f"instance_norm_act/{mode}/{name}",
                        shape="x".join(map(str, shape)), dtype=dtype_name, layout=layout, device=device,
                        variant=name, mode=mode, time_us=t * 1e6, gbps=nbytes / t / 1e9,
                        pct_copy_bw=100 * nbytes / t / copy_bw,
                        x_vs_eager=kb._ratio(times.get(base), t),
                        x_vs_compiled=None if name.endswith("-graph") else kb._ratio(times.get("compiled"), t),
                        l2_flushed=device == "cuda",
                        **({"kernels_us": profiles[name]} if profiles.get(name) else {}),
                    )  # fmt: skip
                    kb._rows.append(row)
                cells = "  ".join(f"{k} {v * 1e6:.0f}us" for k, v in times.items())
                print(f"{'x'.join(map(str, shape)):>14} {dtype_name:>8} {layout}: {cells}", flush=True)
                for name, prof in profiles.items():
                    top = ", ".join(f"{k[:48]} {v:.1f}" for k, v in list(prof.items())[:6])
                    print(f"{'':>14} {name} kernels (us/call): {top}", flush=True)
    kb._table()  # the bench's own table and bf16 targets
    if failed:
        print(f"variants failed: {failed}")
        return 1
    return 0


ONE_PASS_OFF = "instance_norm_act-one-pass-off"  # row-name prefix of stage kernels-one-pass-off


def stage_kernels_one_pass_off(S: Sizes, out: str) -> int:
    """Stage 3's channels_last bf16 rows of the planes either backend runs one-pass, again with
    ``FASTCGAN_ONE_PASS=0`` (both backends read it once per process, so this is a process of its
    own): on channels_last at batch 1 the one-pass plans hold 1-2 channels per block, so a warp's
    loads are C elements apart, and the split kernels may be faster there. The report sets each
    row beside its default (one-pass) row; the kernel profile names the kernels that ran."""
    os.environ["FASTCGAN_ONE_PASS"] = "0"  # gpu_check.sh sets it too; before the first launch
    import test_instance_norm_act as kb

    from fastcgan.ops import _backends

    device, mode, dtype_name, layout = S.device, "fwd+bwd", "bfloat16", "nhwc"
    backends = [
        b for b in ("triton", "cuda") if _backends.status(b).available and device in _backends.status(b).devices
    ]
    if "triton" in backends:
        from fastcgan.kernels import instance_norm_act as kin

        kin._one_pass_enabled.cache_clear()
        assert not kin._one_pass_enabled(), "FASTCGAN_ONE_PASS=0 not honoured by the Triton planner"
    failed = []
    for batch in S.kernel_batches:
        for plane in S.kernel_one_pass_planes:
            shape = (batch, *plane)
            times, bad, profiles = _time_kernel_case(kb, S, shape, _dtype(dtype_name), layout, backends, False)
            failed += [f"{name} {shape}" for name in bad]
            nbytes = kb._min_bytes(shape, _dtype(dtype_name), mode)
            for name, t in times.items():
                append_row(
                    out, "3", f"{ONE_PASS_OFF}/{mode}/{name}",
                    shape="x".join(map(str, shape)), dtype=dtype_name, layout=layout, device=device,
                    variant=name, mode=mode, one_pass=False, time_us=t * 1e6, gbps=nbytes / t / 1e9,
                    l2_flushed=device == "cuda",
                    **({"kernels_us": profiles[name]} if profiles.get(name) else {}),
                )  # fmt: skip
            cells = "  ".join(f"{k} {v * 1e6:.0f}us" for k, v in times.items())
            print(f"{'x'.join(map(str, shape)):>14} {dtype_name} {layout} one-pass off: {cells}", flush=True)
    if failed:
        print(f"variants failed: {failed}")
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# Stage 4: training step
# --------------------------------------------------------------------------------------------
def stage_train(S: Sizes, out: str, part: str = "main") -> int:
    """Stage 4 (``part`` "main"): the official step and fastcgan's fastest configuration at each
    batch size, the eager extras, CUT / FastCUT, pix2pix. "late" (stage train-late, after stage
    5): the variants of ``S.train_late``, whose compile is cold. "no-cudnn-benchmark" (stage
    train-no-cudnn-benchmark): the eager variant without cuDNN autotuning, in a process of its
    own (cuDNN's plan cache is keyed without the benchmark flag: after an autotuned run of the
    same convolutions the row would reuse the tuned plans, and the reverse order would leave
    later rows untuned). The last two take their ratios from stage 4's official rows.

    Memory: ``peak_memory_mb`` is one steady step's peak, after the warm-up
    (``warmup_peak_memory_mb``: the warm-up's, with cuDNN's autotuning scratch)."""
    import test_train_step as tb
    from _timing import median_time
    from baselines.official_step import OfficialCycleGAN

    device = torch.device(S.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = part != "no-cudnn-benchmark"
    size, ngf, blocks = S.train_size, S.train_ngf, S.train_blocks
    base_ips: dict[int, float] = {}
    if part != "main":  # stage 4's official step, as its rows recorded it
        for r in read_rows(out):
            if r["name"] == f"train_step/{device.type}-{size}-b{r.get('batch')}/official-eager-fp32":
                base_ips[r["batch"]] = r["images_per_s"]

    def record(name, batch, seconds, peak_mb, **extra):
        ips = batch / seconds
        mfu = (
            ips * tb.TFLOP_PER_IMAGE * (size / 256) ** 2 / tb.PEAK_BF16_TFLOPS
            if device.type == "cuda" and ngf == 64 and blocks == 9
            else None
        )
        ratio = ips / base_ips[batch] if batch in base_ips else None
        append_row(
            out,
            "4",
            f"train_step/{device.type}-{size}-b{batch}/{name}",
            device=str(device),
            size=size,
            batch=batch,
            ngf=ngf,
            n_blocks=blocks,
            seconds=seconds,
            images_per_s=ips,
            ratio_to_official=ratio,
            peak_memory_mb=peak_mb,
            mfu=mfu,
            **extra,
        )
        print(
            f"b{batch} {name:<36} {ips:9.2f} img/s"
            + (f"  x{ratio:5.2f} vs official" if ratio else "")
            + (f"  peak {peak_mb:7.0f} MB" if peak_mb is not None else "")
            + (f"  MFU {100 * mfu:5.1f} %" if mfu is not None else "")
            + "".join(f"  {k} {v:.1f}" for k, v in extra.items() if isinstance(v, float)),
            flush=True,
        )

    def fastcgan(variant, batch, overrides=(), name=None):
        one_step, extra_warmup, flags, first_s = _build_and_first_step(S, variant, batch, overrides)
        t = median_time(
            one_step, device, warmup=max(0, extra_warmup - 1) + S.train_warmup, iters=S.train_iters
        )
        warm_mb, peak_mb = tb.steady_peak_mb(one_step, device)
        profile = {}
        if device.type == "cuda":  # where the step's device time goes (the MFU gap)
            kernels = _kernel_breakdown(one_step)
            if kernels:
                cats = _step_categories(kernels)
                profile = {"device_us_by_category": cats, "top_kernels_us": dict(list(kernels.items())[:15])}
                print(f"b{batch} {variant} device us/step: {cats}", flush=True)
        record(name or variant, batch, t, peak_mb, warmup_peak_memory_mb=warm_mb, build_and_first_step_s=first_s,
               flags=flags, **profile)

    if part == "late":
        for variant in S.train_late:
            for batch in S.train_batches:
                fastcgan(variant, batch)
        return 0
    if part == "no-cudnn-benchmark":
        # What cuDNN autotuning is worth: the trainer turns it on by default for the cropping
        # presets (--cudnn-benchmark auto); stage 4's row of this variant has it.
        variant = "auto-amp-cl" if device.type == "cuda" else "auto-fp32"
        fastcgan(variant, S.train_batches[0], name=f"{variant}-no-cudnn-benchmark")
        return 0
    # Priority order: the baseline and the fastest configuration at each batch (one compile per
    # batch size, warm from train-warm: the step is compiled with static shapes), then the cheap
    # eager variants.
    for batch in S.train_batches:
        random.seed(0)
        torch.manual_seed(0)
        data, _, _ = tb.make_inputs(device, batch, size)
        tb._reset_mem(device)
        official = OfficialCycleGAN(device, ngf=ngf, ndf=ngf, n_blocks=blocks)
        official.set_input(data["A"], data["B"])
        t = median_time(official.optimize_parameters, device, warmup=S.train_warmup, iters=S.train_iters)
        base_ips[batch] = batch / t
        warm_mb, peak_mb = tb.steady_peak_mb(official.optimize_parameters, device)
        record("official-eager-fp32", batch, t, peak_mb, warmup_peak_memory_mb=warm_mb)
        del official, data
        gc.collect()
        fastcgan(S.train_variant, batch, S.train_overrides)
    for variant in S.train_extra:
        for batch in S.train_batches:
            fastcgan(variant, batch)
    # Last (cheapest to lose): CUT / FastCUT vs the CycleGAN recipe, batch 1, bf16 eager (no
    # compile: seconds), speed and step peak memory (bench/test_cut_step.py).
    import test_cut_step as tc

    tc._run(
        lambda name, **f: append_row(out, "4", name, **f), device, size, 1, ngf,
        f"{device.type}-{size}-{'amp' if device.type == 'cuda' else 'fp32'}",
        S.train_warmup, S.train_iters, amp=device.type == "cuda", channels_last=True, compile=False,
        cuda_graphs=False,
    )  # fmt: skip
    # pix2pix (bench/test_pix2pix_step.py): the official eager step vs the recipe's eager bf16 step,
    # batch 1, no compile. The smallest official U-Net is unet_128: the dry run uses it at ngf 4.
    import test_pix2pix_step as tp

    p2p_size = size if size in (128, 256) else 128
    tp._run(
        lambda name, **f: append_row(out, "4", name, **f), device, p2p_size, 1, ngf,
        ["auto-amp-cl" if device.type == "cuda" else "auto-fp32"], S.train_warmup, S.train_iters,
        f"{device.type}-{p2p_size}-b1",
    )  # fmt: skip
    return 0


def _build_and_first_step(S: Sizes, variant: str, batch: int, overrides=()):
    """(one_step, extra warm-up calls, flags, seconds to build and run the first step) of fastcgan's
    ``variant`` at ``batch``: seeded inputs and state, memory stats reset, the first call (which
    compiles when the variant compiles) synchronised."""
    import test_train_step as tb

    device = torch.device(S.device)
    random.seed(0)
    torch.manual_seed(0)
    _, host_u8, bank = tb.make_inputs(device, batch, S.train_size)
    tb._reset_mem(device)
    flags = {**tb.VARIANTS[variant], **dict(overrides)}
    t0 = time.perf_counter()
    one_step, extra_warmup = tb.make_fastcgan_step(
        flags, device, batch, S.train_size, S.train_ngf, S.train_blocks, host_u8, bank
    )
    one_step()
    _sync(device)
    return one_step, extra_warmup, flags, time.perf_counter() - t0


def stage_train_warm(S: Sizes, out: str, batch: int) -> int:
    """Compile stage 4's fastest configuration at ``batch`` once, in the background while stage 2
    runs, so that stage 4 finds Inductor's on-disk caches (FX graph, AOT autograd, Triton) warm:
    on the first H200 run this compile took 120 s of stage 4's 143 s at batch 1 and left no time
    for batch 8. The cold compile time is a row of its own; nothing here is timed as a step."""
    device, size = torch.device(S.device), S.train_size
    *_, secs = _build_and_first_step(S, S.train_variant, batch, S.train_overrides)
    append_row(out, "4", f"train_compile/{device.type}-{size}-b{batch}/{S.train_variant}",
               device=str(device), batch=batch, size=size, seconds=secs)
    print(f"b{batch} {S.train_variant}: built and compiled cold in {secs:.0f} s", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Stage 5: inference
# --------------------------------------------------------------------------------------------
def _compile_infer(S: Sizes, out: str, xs: dict, what: str):
    """(row name, callable) of the bf16 channels_last generator under torch.compile + CUDA graphs
    (mode="reduce-overhead"), compiled now for every batch of ``xs`` (one compile per batch size:
    static shapes, as bench/test_inference.py times it); the compile time is a row
    (``inference/<name>/<what>``)."""
    device = S.device
    mb = _generator(S).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    if device == "cuda":
        compiled = torch.compile(mb, mode="reduce-overhead", dynamic=False)
    else:
        compiled = torch.compile(mb, backend=S.compile_backend, dynamic=False)
    name = "compiled-cudagraphs-bf16" if device == "cuda" else "compiled-bf16"

    def run_compiled(x):
        if device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(x.contiguous(memory_format=torch.channels_last))

    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in S.infer_batches:
            run_compiled(xs[b].to(torch.bfloat16))
    _sync(device)
    secs = time.perf_counter() - t0
    append_row(out, "5", f"inference/{name}/{what}", device=device, batches=list(S.infer_batches), seconds=secs)
    print(f"{name}: {what}: {len(S.infer_batches)} batch sizes in {secs:.0f} s", flush=True)
    return name, run_compiled


def stage_infer_warm(S: Sizes, out: str) -> int:
    """Stage 5's compile, once, in the background while stage 2 runs (like ``train-warm``), so
    that stage 5 finds Inductor's on-disk caches warm; its cold time is the row
    ``inference/<name>/compile-cold``."""
    g = torch.Generator().manual_seed(0)
    xs = {b: (torch.rand(b, 3, S.infer_size, S.infer_size, generator=g) * 2 - 1).to(S.device) for b in S.infer_batches}
    _compile_infer(S, out, xs, "compile-cold")
    return 0


def stage_infer(S: Sizes, out: str, work: str) -> int:
    from _timing import median_time
    from test_inference import GFLOP_PER_IMAGE

    device = S.device
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    size = S.infer_size
    model = _generator(S).to(device)
    g = torch.Generator().manual_seed(0)
    xs = {b: (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(device) for b in S.infer_batches}
    refs, base = {}, {}

    def row(engine, b, fn, x, **extra):
        with torch.inference_mode():
            err = float((fn(x).float() - refs[b]).abs().max()) if b in refs else 0.0
            t = median_time(lambda: fn(x), device, warmup=S.infer_warmup, iters=S.infer_iters)
        if engine == "eager-fp32":
            base[b] = t
        ips = b / t
        tflops = GFLOP_PER_IMAGE * (size / 256) ** 2 * ips / 1e3 if S.infer_ngf == 64 else None
        append_row(
            out,
            "5",
            f"inference/{engine}",
            device=device,
            batch=b,
            size=size,
            ngf=S.infer_ngf,
            latency_ms=t * 1e3,
            images_per_s=ips,
            tflops=tflops,
            speedup_vs_eager_fp32=base[b] / t if b in base else None,
            max_abs_err=err,
            **extra,
        )
        print(
            f"{engine:<26} batch {b:>2}: {t * 1e3:8.2f} ms {ips:9.1f} img/s {_fmt(tflops, '7.2f')} TFLOP/s"
            + (f"  x{base[b] / t:5.2f} vs eager fp32" if b in base else "")
            + f"  max|err| {err:.2e}",
            flush=True,
        )

    with torch.inference_mode():
        for b, x in xs.items():
            refs[b] = model(x).float()
            row("eager-fp32", b, model, x, kernels="auto")
        # The same network in plain PyTorch (InstanceNorm2d + ReLU + ReflectionPad2d ops), as the
        # official test.py runs it: the baseline above already has fastcgan's kernels.
        plain = _generator(S, backend="torch").to(device)
        for b, x in xs.items():
            row("eager-fp32-torch-kernels", b, plain, x, kernels="torch")
        del plain

    name, run_compiled = _compile_infer(S, out, xs, "compile")
    for b, x in xs.items():
        row(name, b, run_compiled, x.to(torch.bfloat16), kernels="auto")

    if not S.aoti:
        print(_NO_DRY_AOTI)
        return 0
    from fastcgan.deploy.aoti import load_aoti

    _, pt2 = _aoti_paths(work)
    if not os.path.exists(pt2):
        print(f"no AOTInductor package at {pt2} (aoti-build failed or timed out): no AOTI rows")
        return 1
    fn, _ = load_aoti(pt2, torch.device(device))
    for b, x in xs.items():
        row("aoti-bf16", b, fn, x.to(torch.bfloat16), dynamic_shapes=True)  # batch, H, W (fastcgan-export)
    return 0


# --------------------------------------------------------------------------------------------
# Report and merge
# --------------------------------------------------------------------------------------------
def _entry(out: str) -> dict:
    env_path = os.path.join(out, "env.json")
    if os.path.exists(env_path):
        with open(env_path) as f:
            tags = json.load(f)
    else:  # stage 1 did not run (--stages without 1): tag with this process's view
        tags = _tags()
    tags.pop("backends", None)
    latest: dict[str, dict] = {}  # a stage rerun into OUTDIR (--stages) replaces its earlier record
    path = os.path.join(out, "stages.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for s in (json.loads(line) for line in f if line.strip()):
                latest.pop(s["stage"], None)
                latest[s["stage"]] = s
    stages = list(latest.values())
    return {**tags, "source": "bench/gpu_check.sh", "stages": stages, "results": read_rows(out)}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


# Best-effort stages: run in what is left of the budget, so a timeout or a skip there is expected.
OPTIONAL_STAGES = ("train-late", "train-no-cudnn-benchmark")


def _stage_failed(s: dict) -> bool:
    cut = s.get("timed_out") or s.get("skipped")
    return s["rc"] != 0 and not (s["stage"] in OPTIONAL_STAGES and cut)


def stage_report(out: str) -> int:
    entry = _entry(out)
    rows = entry["results"]
    path = os.path.join(out, f"{_slug(entry['device'])}.json")
    atomic_write(path, json.dumps([entry], indent=1).encode())
    print(
        f"device {entry['device']}  torch {entry['torch']}  triton {entry['triton']}  "
        f"commit {entry['commit']}"
    )
    for s in entry["stages"]:
        state = "ok" if s["rc"] == 0 else ("TIMEOUT" if s.get("timed_out") else f"FAILED rc={s['rc']}")
        if s["rc"] != 0 and not _stage_failed(s):
            state = "cut (optional)"
        print(f"  stage {s['stage']:<20} {state:<14} {s['seconds']:7.1f} s")
    for r in rows:
        if r["name"].startswith("correctness/"):
            print(f"  {r['name']}: {'PASS' if r.get('passed') else 'FAIL'}")

    k = [r for r in rows if r["name"].startswith("instance_norm_act/")]
    if k:
        print(
            "\nkernels, forward+backward (best fastcgan backend per shape; -graph rows: CUDA-graph replay):"
        )
        for key in sorted({(r["dtype"], r["layout"], r["shape"]) for r in k}):
            rs = [r for r in k if (r["dtype"], r["layout"], r["shape"]) == key]
            fused = [
                r for r in rs if r["variant"].startswith("fastcgan") and not r["variant"].endswith("-graph")
            ]
            if not fused:
                continue
            best = max(fused, key=lambda r: r["x_vs_eager"] or 0)
            bw = max(rs, key=lambda r: r["pct_copy_bw"] if r["variant"].startswith("fastcgan") else 0)
            ve, vc = best["x_vs_eager"] or 0, best["x_vs_compiled"] or 0
            met_e = "met" if ve >= KERNEL_X_EAGER else "missed"
            met_c = "met" if vc >= KERNEL_X_COMPILED else "missed"
            graph = [r for r in rs if r["variant"].startswith("fastcgan") and r["variant"].endswith("-graph")]
            g = max(graph, key=lambda r: r["x_vs_eager"] or 0) if graph else None
            met_bw = "met" if bw["pct_copy_bw"] >= KERNEL_PCT_COPY else "missed"
            print(
                f"  {key[0]:>8} {key[1]} {key[2]:>14}: {best['variant']:<15} {best['time_us']:8.1f} us  "
                f"x{ve:.2f} eager ({met_e} >={KERNEL_X_EAGER})  "
                f"x{vc:.2f} compiled ({met_c} >={KERNEL_X_COMPILED})  "
                f"{bw['pct_copy_bw']:.0f} % copy bw ({bw['variant']}"
                + (f"; {met_bw} >={KERNEL_PCT_COPY:.0f} % at batch 8)" if key[2].startswith("8x") else ")")
                + (f"  replayed: {g['variant']} x{g['x_vs_eager'] or 0:.2f} eager-graph" if g else "")
            )
        # AUTO_ORDER_CUDA: the backend with the least total time over the cases every backend ran.
        per_case: dict[tuple, dict[str, float]] = {}
        for r in k:
            v = r["variant"]
            if v.startswith("fastcgan") and not v.endswith("-graph"):
                case = per_case.setdefault((r["dtype"], r["layout"], r["shape"]), {})
                case[v[len("fastcgan-") :]] = r["time_us"]
        names = set.union(*(set(c) for c in per_case.values())) if per_case else set()
        common = [c for c in per_case.values() if set(c) == names]
        if names and common:
            total = {b: sum(c[b] for c in common) for b in names}
            order = sorted(total, key=total.get)
            print(
                f"  per call (host launch included) over the {len(common)} cases every backend ran: "
                + ", ".join(f"{b} {total[b] / 1e3:.2f} ms" for b in order)
                + f"  -> AUTO_ORDER_CUDA candidate {tuple(b for b in order if b != 'cpp')}"
            )
        # Under CUDA-graph replay (the trainer's default on a GPU) only device time counts, and
        # the order can differ: Triton's Python launch costs ~0.4 ms per fwd+bwd, replay none.
        for dtype in sorted({r["dtype"] for r in k}):
            cases: dict[tuple, dict[str, float]] = {}
            for r in k:
                v = r["variant"]
                if r["dtype"] == dtype and v.startswith("fastcgan") and v.endswith("-graph"):
                    cases.setdefault((r["layout"], r["shape"]), {})[v[len("fastcgan-") : -len("-graph")]] = r["time_us"]
            names = set.union(*(set(c) for c in cases.values())) if cases else set()
            both = [c for c in cases.values() if set(c) == names]
            if len(names) > 1 and both:
                replay = {b: sum(c[b] for c in both) for b in names}
                order = sorted(replay, key=replay.get)
                print(f"  {dtype} under graph replay ({len(both)} cases): "
                      + ", ".join(f"{b} {replay[b] / 1e3:.2f} ms" for b in order) + f"  -> fastest {order[0]}")

    off = [r for r in rows if r["name"].startswith(ONE_PASS_OFF + "/")]
    if off:
        print("\none-pass kernels off (FASTCGAN_ONE_PASS=0) vs the default, us per fwd+bwd "
              "(x > 1: the split kernels are faster there):")
        on = {(r["shape"], r["dtype"], r["layout"], r["variant"]): r["time_us"] for r in k}
        for r in off:
            base = on.get((r["shape"], r["dtype"], r["layout"], r["variant"]))
            print(f"  {r['dtype']:>8} {r['layout']} {r['shape']:>14} {r['variant']:<22} "
                  f"{_fmt(base, '8.1f')} -> {r['time_us']:8.1f}  x{_fmt(base and base / r['time_us'])}")

    t = [r for r in rows if r["name"].startswith("train_step/")]
    if t:
        print("\ntraining step:")
        for r in t:
            print(
                f"  b{r['batch']} {r['name'].rsplit('/', 1)[1]:<36} {r['images_per_s']:9.2f} img/s  "
                f"x{_fmt(r['ratio_to_official'])} official  peak {_fmt(r['peak_memory_mb'], '.0f')} MB "
                f"(warm-up {_fmt(r.get('warmup_peak_memory_mb'), '.0f')})  "
                f"MFU {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')} %"
                + (
                    f"  build+compile {r['build_and_first_step_s']:.0f} s"
                    if "build_and_first_step_s" in r
                    else ""
                )
            )
        for r in rows:
            if r["name"].startswith("train_compile/"):
                print(f"  b{r['batch']} build + first step with a cold compile cache: {r['seconds']:.0f} s")
        for r in t:
            if r.get("device_us_by_category"):
                cats = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in r["device_us_by_category"].items())
                print(f"  b{r['batch']} {r['name'].rsplit('/', 1)[1]} device time per step: {cats}")
        for r in t:  # what the trainer's --cudnn-benchmark default is worth
            if r["name"].endswith("-no-cudnn-benchmark"):
                on = r["name"][: -len("-no-cudnn-benchmark")]
                with_it = [x for x in t if x["name"] == on and x["batch"] == r["batch"]]
                if with_it:
                    print(f"  b{r['batch']} cuDNN autotuning on {on.rsplit('/', 1)[1]}: "
                          f"x{with_it[0]['images_per_s'] / r['images_per_s']:.2f} images/s")
        for r in t:
            if r["name"].endswith("/official-eager-fp32") or "compile" not in r["name"]:
                continue
            if r["batch"] == 1:
                x = r["ratio_to_official"] or 0
                print(
                    f"  target batch 1 >= {TRAIN_X_OFFICIAL_B1}x official: x{x:.2f} "
                    f"{'met' if x >= TRAIN_X_OFFICIAL_B1 else 'missed'}"
                )
            if r["batch"] == 8:
                print(
                    f"  target batch 8 >= {TRAIN_IPS_B8} img/s: {r['images_per_s']:.0f} "
                    f"{'met' if r['images_per_s'] >= TRAIN_IPS_B8 else 'missed'}"
                )

    c = [r for r in rows if r["name"].startswith("cut_step/")]
    if c:
        print(
            "\nCUT / FastCUT vs the CycleGAN recipe (the CUT authors: FastCUT ~2x faster, ~half the memory):"
        )
        for r in c:
            print(
                f"  {r['name'][len('cut_step/') :]:<26} {r['images_per_s']:9.2f} img/s  "
                f"x{_fmt(r['speed_vs_cyclegan'])} speed  step peak {_fmt(r['step_peak_mb'], '.0f')} MB "
                f"(x{_fmt(r['step_peak_vs_cyclegan'])})"
            )

    p = [r for r in rows if r["name"].startswith("pix2pix_step/")]
    if p:
        print("\npix2pix step vs the official eager fp32 step:")
        for r in p:
            print(f"  {r['name'][len('pix2pix_step/') :]:<36} {r['images_per_s']:9.2f} img/s  "
                  f"x{_fmt(r['ratio_to_official'])}")

    i = [r for r in rows if r["name"].startswith("inference/") and "batch" in r]
    if i:
        print("\ninference (ResNet-9):")
        for r in i:
            print(
                f"  {r['name'][len('inference/') :]:<26} batch {r['batch']:>2}: {r['latency_ms']:8.2f} ms "
                f"{r['images_per_s']:9.1f} img/s  x{_fmt(r['speedup_vs_eager_fp32'])} eager fp32  "
                f"max|err| {r['max_abs_err']:.2e}"
            )
        for r in rows:  # compile times: cold (infer-warm, in the background) and as stage 5 met it
            if r["name"].startswith("inference/") and "batches" in r:
                print(f"  {r['name'][len('inference/') :]:<36} {r['seconds']:6.1f} s for batches {r['batches']}")
    print(f"\n{len(rows)} rows -> {path}")
    return int(any(_stage_failed(s) for s in entry["stages"]))  # gpu_check.sh's exit status


def merge(out: str, results_dir: str) -> int:
    """Append the run in ``out`` as one entry to ``results_dir/<device>.json`` (run on the machine
    holding the repository; the commit comes from ``GPU_CHECK_COMMIT`` when the device had no git)."""
    entry = _entry(out)
    if entry.get("dry_run") or any(r.get("dry_run") for r in entry["results"]):
        print("refusing to merge a --dry-run (its numbers mean nothing)", file=sys.stderr)
        return 2
    if not entry["results"]:
        print(f"no rows in {out}/rows.jsonl", file=sys.stderr)
        return 1
    path = os.path.join(results_dir, f"{_slug(entry['device'])}.json")
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    existing.append(entry)
    atomic_write(path, json.dumps(existing, indent=1).encode())
    print(f"appended {len(entry['results'])} rows to {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "stage",
        choices=["env", "aoti-build", "aoti-check", "kernels", "kernels-one-pass-off", "train-warm", "train",
                 "train-late", "train-no-cudnn-benchmark", "infer-warm", "infer", "report", "merge"],
    )
    p.add_argument("--batch", type=int, default=None, help="train-warm: the batch size to compile")
    p.add_argument("--out", required=True, help="OUTDIR of bench/gpu_check.sh")
    p.add_argument(
        "--work",
        default=None,
        help="scratch folder for the AOTI package (default /tmp/fastcgan-gpu-check-work)",
    )
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--results-dir", default=os.path.join(BENCH, "results"), help="for merge")
    a = p.parse_args(argv)
    S = DRY if a.dry_run else GPU
    global _DRY_RUN
    _DRY_RUN = a.dry_run
    # Checked before anything is written: the batch sizes of stages 4 and train-warm (e.g. "8").
    batches = os.environ.get("GPU_CHECK_TRAIN_BATCHES")
    if batches:
        try:
            sizes = tuple(int(b) for b in batches.split(","))
        except ValueError:
            sizes = ()
        if not sizes or not all(1 <= b <= 256 for b in sizes):
            print(f"GPU_CHECK_TRAIN_BATCHES={batches!r}: expected batch sizes 1..256 like 1,8", file=sys.stderr)
            return 2
        S = dataclasses.replace(S, train_batches=sizes)
    if a.stage == "train-warm" and a.batch not in S.train_batches:
        print(f"train-warm --batch {a.batch}: not one of the train batches {S.train_batches}", file=sys.stderr)
        return 2
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    work = os.path.abspath(
        a.work or os.path.join(os.environ.get("TMPDIR", "/tmp"), "fastcgan-gpu-check-work")
    )
    gpu_stages = ("kernels", "kernels-one-pass-off", "train-warm", "train", "train-late", "train-no-cudnn-benchmark",
                  "infer-warm", "infer", "aoti-build", "aoti-check")
    needs_gpu = a.stage in gpu_stages and S.device == "cuda"
    if needs_gpu and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    if a.stage not in ("report", "merge"):
        dropped = start_writing_rows(out, a.stage + (f"-b{a.batch}" if a.stage == "train-warm" else ""))
        if dropped:
            print(f"[gpu_check] {a.stage}: replacing {dropped} rows of its earlier run", flush=True)
    t0 = time.perf_counter()
    print(
        f"[gpu_check] {a.stage} ({'dry run, CPU' if a.dry_run else 'GPU'}) "
        f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}",
        flush=True,
    )
    rc = {
        "env": lambda: stage_env(S, out),
        "aoti-build": lambda: stage_aoti_build(S, out, work),
        "aoti-check": lambda: stage_aoti_check(S, out, work),
        "kernels": lambda: stage_kernels(S, out),
        "kernels-one-pass-off": lambda: stage_kernels_one_pass_off(S, out),
        "train-warm": lambda: stage_train_warm(S, out, a.batch),
        "train": lambda: stage_train(S, out),
        "train-late": lambda: stage_train(S, out, part="late"),
        "train-no-cudnn-benchmark": lambda: stage_train(S, out, part="no-cudnn-benchmark"),
        "infer-warm": lambda: stage_infer_warm(S, out),
        "infer": lambda: stage_infer(S, out, work),
        "report": lambda: stage_report(out),
        "merge": lambda: merge(out, a.results_dir),
    }[a.stage]()
    print(f"[gpu_check] {a.stage} done in {time.perf_counter() - t0:.1f} s (rc {rc})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
