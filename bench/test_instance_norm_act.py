"""instance_norm_act throughput: every fastcgan backend beside eager PyTorch and torch.compile.

The baseline is what the official ResNet generator runs between two convolutions:
``nn.InstanceNorm2d -> nn.ReLU -> nn.ReflectionPad2d(1)``; fastcgan computes the same thing as
``instance_norm_act(x, activation="relu", pad=1)``. Each row times forward, backward, and
forward+backward (training mode: the forward saves what the backward needs) and reports

* time (median of device-synchronised calls),
* GB/s over the *minimal* bytes: forward reads x and writes y; backward reads dy and x and
  writes dx; forward+backward is the sum (what one fused read/write per pass would move),
* % of the device's measured copy bandwidth (GPU),
* the ratio to eager PyTorch and to ``torch.compile`` of the composition, same process.

Fair timing: an eager call of a Python custom op / autograd.Function costs tens of µs of host
time, which dominates batch-1 64x64 planes on a GPU. The ``*-graph`` rows replay the same calls
from a CUDA graph (``torch.cuda.graph``), which removes the host side and shows kernel time;
the eager composition gets a graph row too, so the graph ratios compare kernels to kernels.

GPU (``cuda`` mark): 1x64x256x256, 1x128x128x128, 1x256x64x64 and batch 8 of each, fp32 and
bf16, NCHW and channels_last, for each available fastcgan GPU backend (triton, cuda).
``FASTCGAN_BENCH_QUICK=1`` keeps bf16 only (half the compiles). CPU: fp32 NCHW, the three
batch-1 shapes, eager vs compiled vs ``cpp`` (the Triton interpreter is not timed).
Targets (H100, bf16 forward+backward): >= 3x eager and >= 1.3x compiled on every shape, and
>= 80 % of copy bandwidth at batch 8; printed as met/missed at the end, never asserted.

    pytest bench/test_instance_norm_act.py -s
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from _timing import copy_bandwidth, median_time, sync
from torch import nn

from fastcgan.ops import _backends
from fastcgan.ops.instance_norm_act import instance_norm_act

BASE_SHAPES = [(64, 256, 256), (128, 128, 128), (256, 64, 64)]
GPU_SHAPES = [(1, *s) for s in BASE_SHAPES] + [(8, *s) for s in BASE_SHAPES]
CPU_SHAPES = [(1, *s) for s in BASE_SHAPES]
PAD = 1
QUICK = os.environ.get("FASTCGAN_BENCH_QUICK", "0") == "1"

_rows: list[dict] = []


def _composition(c: int) -> nn.Module:
    return nn.Sequential(nn.InstanceNorm2d(c), nn.ReLU(), nn.ReflectionPad2d(PAD))


def _fused(backend: str):
    def fn(x):
        return instance_norm_act(x, activation="relu", pad=PAD, backend=backend)

    return fn


def _min_bytes(shape, dtype, mode) -> int:
    n, c, h, w = shape
    es = torch.finfo(dtype).bits // 8
    x_b = n * c * h * w * es
    y_b = n * c * (h + 2 * PAD) * (w + 2 * PAD) * es
    fwd = x_b + y_b  # read x, write y
    bwd = y_b + 2 * x_b  # read dy (padded) and x, write dx
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _steps(fn, x, dy):
    """Callables for the three modes. ``x`` requires grad; the forward runs in training mode."""
    y_saved = fn(x)

    def fwd():
        return fn(x)

    def bwd():
        return torch.autograd.grad(y_saved, x, dy, retain_graph=True)

    def both():
        return torch.autograd.grad(fn(x), x, dy)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def _graphed(fn, x, dy, mode):
    """The ``mode`` step of ``fn`` captured in a CUDA graph; returns its replay, or None (with
    the reason printed) when capture fails, so one backend's capture problem costs one row.

    Everything, including the saved forward that the ``bwd`` step differentiates, runs on the
    capture stream: autograd replays each backward node on its forward's stream, and a node
    recorded on the default stream would launch outside the capture and invalidate it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(s):
            step = _steps(fn, x, dy)[mode]
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            step()
    except Exception as e:  # report, don't abort the whole table
        torch.cuda.synchronize()
        print(f"\n[bench] CUDA graph capture of {mode} failed: {type(e).__name__}: {str(e)[:300]}")
        return None
    return g.replay


def _variants(shape, dtype, device, backends):
    """name -> callable of x (the composition, its compiled twin, each fastcgan backend)."""
    eager = _composition(shape[1]).to(device)
    out = {"eager": eager, "compiled": torch.compile(eager, fullgraph=True, dynamic=False)}
    for b in backends:
        out[f"fastcgan-{b}"] = _fused(b)
    return out


def _measure(shape, dtype, channels_last, device, backends, bench_record, benchmark, graphs):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    n, c, h, w = shape
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn((n, c, h + 2 * PAD, w + 2 * PAD), device=device, dtype=dtype).contiguous(memory_format=fmt)
    iters, warmup = (20, 5) if device == "cuda" else (5, 2)
    times: dict[tuple[str, str], float] = {}
    failed: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = _variants(shape, dtype, device, backends)
        for name, fn in variants.items():
            try:
                steps = _steps(fn, x, dy)
                for mode, step in steps.items():
                    times[(name, mode)] = median_time(step, device, warmup=warmup, iters=iters, flush_l2=True)
            except Exception as e:  # one broken variant must not cost the other rows
                print(f"\n[bench] {name} {tuple(shape)} {dtype} failed: {type(e).__name__}: {str(e)[:500]}")
                failed.append(name)
                continue
            for mode, step in steps.items():
                if graphs and name != "compiled":
                    replay = _graphed(fn, x, dy, mode)
                    if replay is None:  # reported at the end: a missing row is a failure, not a gap
                        failed.append(f"{name}-graph ({mode})")
                    else:
                        times[(name + "-graph", mode)] = median_time(replay, device, warmup=warmup, iters=iters,
                                                                        flush_l2=True)
    copy_bw = copy_bandwidth(device) if device == "cuda" else None
    tag = dict(shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
               layout="nhwc" if channels_last else "nchw", device=device)
    for (name, mode), t in times.items():
        nbytes = _min_bytes(shape, dtype, mode)
        base = "eager-graph" if name.endswith("-graph") else "eager"
        row = dict(
            tag, variant=name, mode=mode, time_us=t * 1e6, gbps=nbytes / t / 1e9,
            pct_copy_bw=100 * nbytes / t / copy_bw if copy_bw else None,
            x_vs_eager=_ratio(times.get((base, mode)), t),
            # no compiled replay row: a replay against compile's launches would flatter the replay
            x_vs_compiled=None if name.endswith("-graph") else _ratio(times.get(("compiled", mode)), t),
            l2_flushed=device == "cuda",
        )
        _rows.append(row)
        bench_record(f"instance_norm_act/{mode}/{name}", **row)
    # pytest-benchmark's own statistics for the headline row: the fastest fastcgan backend's
    # forward+backward (eager call path), synchronised per call.
    fused = [k for k in times if k[0].startswith("fastcgan") and not k[0].endswith("-graph") and k[1] == "fwd+bwd"]
    if fused:
        best = min(fused, key=times.get)[0]
        step = _steps(variants[best], x, dy)["fwd+bwd"]

        def synced():
            step()
            sync(device)

        benchmark.pedantic(synced, rounds=iters, iterations=1, warmup_rounds=warmup)
    if failed:
        pytest.fail(f"variants failed (their rows are missing, the others were recorded): {failed}")


def _ratio(base, t):
    return base / t if base is not None else None


def _table():
    if not _rows:
        return
    cols = ("shape", "dtype", "layout", "mode", "variant", "time_us", "gbps", "pct_copy_bw", "x_vs_eager",
            "x_vs_compiled")
    print("\ninstance_norm_act (relu, pad=1): time, GB/s of minimal bytes, % of copy bandwidth, speed-ups")
    print(" ".join(f"{h:>14}" for h in cols))
    for r in _rows:
        cells = []
        for k in cols:
            v = r[k]
            cells.append(f"{'-':>14}" if v is None else f"{v:>14.2f}" if isinstance(v, float) else f"{v:>14}")
        print(" ".join(cells))
    _targets()


def _targets():
    """H100 bf16 forward+backward targets; met/missed, never asserted."""
    rows = [r for r in _rows if r["device"] == "cuda" and r["dtype"] == "bfloat16" and r["mode"] == "fwd+bwd"]
    if not rows:
        return
    print("\ntargets (bf16 forward+backward, best fastcgan backend, eager call path):")
    keys = sorted({(r["shape"], r["layout"]) for r in rows})
    for shape, layout in keys:
        cand = [r for r in rows if (r["shape"], r["layout"]) == (shape, layout)
                and r["variant"].startswith("fastcgan") and not r["variant"].endswith("-graph")]
        graph = [r for r in rows if (r["shape"], r["layout"]) == (shape, layout)
                 and r["variant"].startswith("fastcgan") and r["variant"].endswith("-graph")]
        if not cand:
            continue
        best = max(cand, key=lambda r: r["x_vs_eager"] or 0.0)
        ve, vc = best["x_vs_eager"] or 0.0, best["x_vs_compiled"] or 0.0
        line = (f"  {shape:>14} {layout}: {best['variant']}: x{ve:.2f} vs eager (>=3: "
                f"{'met' if ve >= 3.0 else 'missed'}), x{vc:.2f} vs compiled (>=1.3: "
                f"{'met' if vc >= 1.3 else 'missed'})")
        if shape.startswith("8x"):
            bw = max(graph + cand, key=lambda r: r["pct_copy_bw"] or 0)
            line += (f", {bw['pct_copy_bw']:.0f} % of copy bandwidth ({bw['variant']}; >=80 %: "
                     f"{'met' if bw['pct_copy_bw'] >= 80 else 'missed'})")
        print(line)


@pytest.fixture(scope="module", autouse=True)
def _print_table_at_end():
    yield
    _table()
    _rows.clear()


def _usable(backend: str, device: str) -> bool:
    st = _backends.status(backend)
    return st.available and device in st.devices


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.bfloat16] if QUICK else [torch.bfloat16, torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=[str(d).replace("torch.", "") for d in GPU_DTYPES])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["x".join(map(str, s)) for s in GPU_SHAPES])
def test_gpu_instance_norm_act(shape, dtype, channels_last, bench_record, benchmark):
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    backends = [b for b in ("triton", "cuda") if _usable(b, "cuda")]
    _measure(shape, dtype, channels_last, "cuda", backends, bench_record, benchmark, graphs=True)


# --------------------------------------------------------------------------------------------
# CPU (trimmed)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=["x".join(map(str, s)) for s in CPU_SHAPES])
def test_cpu_instance_norm_act(shape, bench_record, benchmark):
    if torch.cuda.is_available():
        pytest.skip("CPU rows are for CPU-only machines (the GPU rows cover this machine)")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    backends = ["cpp"] if _usable("cpp", "cpu") else []
    _measure(shape, torch.float32, False, "cpu", backends, bench_record, benchmark, graphs=False)
