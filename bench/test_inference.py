"""Generator inference throughput per deploy engine: ResNet-9 (ngf 64) at 256x256.

GPU (``cuda`` mark): batch 1, 8, 32 for eager fp32 (the baseline, on ``FASTCGAN_BENCH_BACKEND``'s
InstanceNorm kernels: fastcgan's fastest by default, so plain PyTorch is a row of its own) and bf16, ``torch.compile``
with CUDA graphs (fp32 and bf16), AOTInductor (fp32 and bf16), onnxruntime (CUDA provider, when
onnxruntime-gpu is installed) and TensorRT (when installed). CPU: batch 1 for eager fp32, eager
bf16, ``torch.compile`` (fp32; bf16 with freezing), AOTInductor (fp32; bf16 with freezing) and
onnxruntime, plus 1 vs 2 threads for the fastest. Every engine runs in this process against
the same baseline; rows carry images/s, latency, ratio to the baseline, achieved TFLOP/s
(49.6 G MACs = 99.2 GFLOP per image) and the max abs error against the fp32 eager output.

    pytest bench/test_inference.py -s          # CPU rows; GPU rows on a CUDA machine
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

import pytest
import torch
from _timing import median_time

GFLOP_PER_IMAGE = 99.2  # 2 x 49.6 G real MACs for ResNet-9 at 256x256
SIZE = 256


# The InstanceNorm backend of the eager/compiled rows (``auto`` = the fastest fastcgan kernel).
BACKEND = os.environ.get("FASTCGAN_BENCH_BACKEND", "auto")


def _generator():
    from fastcgan.models import build_generator

    torch.manual_seed(0)
    return build_generator("resnet_9blocks", ngf=64, backend=BACKEND).eval()


def _spec(model):
    from fastcgan.deploy._common import _model_config, spec_for_model

    return spec_for_model(model, config=_model_config(model))


def _cpu_time(fn, iters=5):
    fn()
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _row(record, name, device, batch, seconds, baseline, err, extra=None):
    ips = batch / seconds
    tflops = GFLOP_PER_IMAGE * batch / seconds / 1e3
    ratio = baseline / seconds if baseline else 1.0
    print(f"{name:<34} batch {batch:>2}: {seconds * 1e3:9.2f} ms  {ips:8.1f} img/s  {tflops:6.2f} TFLOP/s  "
          f"x{ratio:5.2f} vs eager fp32  max|err| {err:.2e}" + (f"  {extra}" if extra else ""))
    record(f"inference/{name}", device=device, batch=batch, size=SIZE, backend=BACKEND, latency_ms=seconds * 1e3,
           images_per_s=ips, tflops=tflops, speedup_vs_eager_fp32=ratio, max_abs_err=err, **(extra or {}))


# --------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------
def _cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def test_cpu_engines(bench_record):
    """Every engine built first, then timed in rounds taking turns (a shared machine's load hits
    every engine alike; one after another, two runs of a row differed by up to several x)."""
    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    model = _generator()
    spec = _spec(model)
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.inference_mode():
        ref = model(x)
    engines: dict = {}  # name -> (callable, max abs error against eager fp32)

    def add(name, fn):
        with torch.inference_mode():
            engines[name] = (fn, float((torch.as_tensor(fn()).float() - ref).abs().max()))

    add("eager-fp32", lambda: model(x))
    bf16 = _cpu_has_amx_bf16()
    if bf16:
        mb = _generator().to(torch.bfloat16)
        xb = x.bfloat16()
        add("eager-bf16", lambda: mb(xb))

    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        mc = torch.compile(_generator())
        add("compiled-fp32", lambda: mc(x))
        if bf16:
            # Freezing makes the weights constants: Inductor pre-packs them for oneDNN, whose
            # bf16 convolutions run on AMX tiles.
            mcb = torch.compile(_generator().to(torch.bfloat16), options={"freezing": True})
            add("compiled-bf16-freezing", lambda: mcb(xb))

        from fastcgan.deploy.aoti import export_aoti, load_aoti

        for dtype, tag in [(torch.float32, "fp32")] + ([(torch.bfloat16, "bf16")] if bf16 else []):
            pt2 = os.path.join(tmp, f"g_{tag}.pt2")
            t0 = time.perf_counter()
            export_aoti(model, pt2, spec, device="cpu", dtype=dtype, freezing=True)
            print(f"aoti-{tag}: compiled in {time.perf_counter() - t0:.0f}s")
            fn, _ = load_aoti(pt2, torch.device("cpu"))
            xi = x.to(dtype)
            add(f"aoti-{tag}-freezing", lambda fn=fn, xi=xi: fn(xi))

        from fastcgan.deploy.onnx_export import export_onnx
        from fastcgan.deploy.runtime import OrtRunner

        onnx_path = os.path.join(tmp, "g.onnx")
        export_onnx(model, onnx_path, spec)
        ort_runner = OrtRunner(onnx_path, torch.device("cpu"), threads=threads)
        add("onnxruntime-fp32", lambda: ort_runner(x))

        rounds = {name: [] for name in engines}
        for _ in range(3):
            for name, (fn, _) in engines.items():
                with torch.inference_mode():
                    rounds[name].append(_cpu_time(fn, iters=3))
        results = {name: (statistics.median(ts), engines[name][0]) for name, ts in rounds.items()}
        for name, (t, _) in results.items():
            _row(bench_record, name, "cpu", 1, t, results["eager-fp32"][0], engines[name][1],
                 {"threads": threads, "rounds": 3, "seconds_min": min(rounds[name]), "seconds_max": max(rounds[name])})

        best = min(results, key=lambda k: results[k][0])
        t2 = results[best][0]
        torch.set_num_threads(1)
        if best.startswith("onnxruntime"):
            one = OrtRunner(onnx_path, torch.device("cpu"), threads=1)
            t1 = _cpu_time(lambda: one(x))
        else:
            with torch.inference_mode():
                t1 = _cpu_time(results[best][1])
        torch.set_num_threads(threads)
    eager = results["eager-fp32"][0]
    print(f"fastest CPU engine: {best}: x{eager / t2:.2f} vs eager fp32 with {threads} threads; "
          f"1 thread {t1 * 1e3:.0f} ms vs {threads} threads {t2 * 1e3:.0f} ms (x{t1 / t2:.2f})")
    bench_record("inference/cpu-threads", device="cpu", engine=best, latency_ms_1_thread=t1 * 1e3,
                 latency_ms_n_threads=t2 * 1e3, threads=threads, thread_scaling=t1 / t2,
                 fastest_speedup_vs_eager_fp32=eager / t2)
    assert all(t > 0 for t, _ in results.values())


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
BATCHES = (1, 8, 32)


@pytest.fixture(scope="module")
def gpu_setup():
    model = _generator().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = {b: torch.rand(b, 3, SIZE, SIZE, device="cuda", generator=g) * 2 - 1 for b in BATCHES}
    baseline, refs = {}, {}
    with torch.inference_mode():
        for b in BATCHES:
            refs[b] = model(xs[b]).float()
            baseline[b] = median_time(lambda: model(xs[b]), "cuda", warmup=10, iters=20)
    return model, xs, baseline, refs


def _gpu_rows(record, name, make_fn, gpu_setup, dtype=torch.float32):
    _, xs, baseline, refs = gpu_setup
    for b in BATCHES:
        fn = make_fn(b)
        x = xs[b].to(dtype)
        with torch.inference_mode():
            err = float((fn(x).float() - refs[b]).abs().max())  # the first call: compile, capture
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # this row's steady calls only
            t = median_time(lambda: fn(x), "cuda", warmup=3, iters=10)
        _row(record, name, torch.cuda.get_device_name(0), b, t, baseline[b], err,
             {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})


@pytest.mark.cuda
def test_gpu_eager(bench_record, gpu_setup):
    model = gpu_setup[0]
    _gpu_rows(bench_record, "eager-fp32", lambda b: model, gpu_setup)
    if BACKEND != "torch":  # the baseline runs fastcgan's kernels: plain PyTorch beside it
        from fastcgan.models import build_generator

        torch.manual_seed(0)
        ref = build_generator("resnet_9blocks", ngf=64, backend="torch").eval().cuda()
        _gpu_rows(bench_record, "eager-fp32-torch-kernels", lambda b: ref, gpu_setup)
    mb = _generator().cuda().to(torch.bfloat16)
    _gpu_rows(bench_record, "eager-bf16", lambda b: mb, gpu_setup, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_compiled_cudagraphs(bench_record, gpu_setup, dtype):
    m = _generator().cuda().to(dtype)
    m = m.to(memory_format=torch.channels_last)
    compiled = torch.compile(m, mode="reduce-overhead")

    def make(b):
        def fn(x):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(x.contiguous(memory_format=torch.channels_last))
        return fn

    _gpu_rows(bench_record, f"compiled-cudagraphs-{str(dtype)[6:]}", make, gpu_setup, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_aoti(bench_record, gpu_setup, dtype):
    from fastcgan.deploy.aoti import compile_isolated, load_aoti

    from fastcgan.models import save_generator

    model = gpu_setup[0]
    with tempfile.TemporaryDirectory() as tmp:
        pt2, st = os.path.join(tmp, "g.pt2"), os.path.join(tmp, "g.safetensors")
        save_generator(model, st)
        t0 = time.perf_counter()
        # Compiled in a child process: torch 2.11 crashed loading a CUDA package in the
        # process that compiled it.
        compile_isolated(st, pt2, torch.device("cuda"), dtype=dtype)
        print(f"aoti ({dtype}): compiled in {time.perf_counter() - t0:.0f}s")
        fn, _ = load_aoti(pt2, torch.device("cuda"))
        _gpu_rows(bench_record, f"aoti-{str(dtype)[6:]}", lambda b: fn, gpu_setup, dtype)


@pytest.mark.cuda
def test_gpu_onnxruntime(bench_record, gpu_setup):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    from fastcgan.deploy.onnx_export import export_onnx
    from fastcgan.deploy.runtime import OrtRunner

    model = gpu_setup[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g.onnx")
        export_onnx(model, path, _spec(model))
        runner = OrtRunner(path, torch.device("cuda"))
        _gpu_rows(bench_record, "onnxruntime-cuda-fp32", lambda b: runner, gpu_setup)


@pytest.mark.cuda
@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "fp32"])
def test_gpu_tensorrt(bench_record, gpu_setup, fp16):
    pytest.importorskip("tensorrt")
    from fastcgan.deploy.onnx_export import export_onnx
    from fastcgan.deploy.tensorrt import TrtRunner, build_engine

    model = gpu_setup[0]
    spec = _spec(model)
    with tempfile.TemporaryDirectory() as tmp:
        path, eng = os.path.join(tmp, "g.onnx"), os.path.join(tmp, "g.engine")
        spec = export_onnx(model, path, spec)
        build_engine(path, eng, spec, fp16=fp16, min_shape=(1, 3, SIZE, SIZE), opt_shape=(8, 3, SIZE, SIZE),
                     max_shape=(32, 3, SIZE, SIZE))
        runner = TrtRunner(eng)
        _gpu_rows(bench_record, f"tensorrt-{'fp16' if fp16 else 'fp32'}", lambda b: runner, gpu_setup)
