"""The native op library ``fastcgan._C`` (csrc/): build, CPU kernels, CUDA kernels, op boundary.

Backend-agnostic sweeps live in test_instance_norm_act.py; this file covers what is specific to
the C++/CUDA build: that it loads and says what it was built with, that the CUDA sources compile,
both CPU ISA variants, fp64 gradcheck of the ``cpp`` backend for every option combination, the
NHWC/chunked code paths, and clear errors from the native ops themselves.
"""

import itertools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from tolerances import TOL, activation_kinks, assert_matches_reference, tol

import fastcgan.ops as ops
from fastcgan.ops import _backends
from fastcgan.ops.instance_norm_act import (
    contract_backward,
    contract_forward,
    instance_norm_act_ref,
    native_backward,
    native_forward,
    stats_dtype,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ACTS = ops.ACTIVATIONS
AFFINE = ("none", "weight", "weight+bias", "bias")

native_ok, native_reason = _backends.load_native()
needs_native = pytest.mark.skipif(not native_ok, reason=f"fastcgan._C not built: {native_reason}")


def _C():
    from fastcgan import _C as lib

    return lib


def _params(c, affine, dtype=torch.float32, device="cpu", gen=None):
    w = torch.randn(c, dtype=dtype, device=device, generator=gen) if "weight" in affine else None
    b = torch.randn(c, dtype=dtype, device=device, generator=gen) if "bias" in affine else None
    return w, b


def _cpu_isas():
    if not native_ok:
        return ["default"]
    lib = _C()
    prev = lib.cpu_isa()
    try:
        lib.set_cpu_isa("avx2")
        isas = ["default", "avx2"]
    except RuntimeError:
        isas = ["default"]
    lib.set_cpu_isa("auto")
    assert lib.cpu_isa() == prev
    return isas


@pytest.fixture(params=_cpu_isas())
def cpu_isa(request):
    """Run a test once per compiled CPU kernel variant (baseline and AVX2)."""
    lib = _C()
    lib.set_cpu_isa(request.param)
    yield request.param
    lib.set_cpu_isa("auto")


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
@needs_native
def test_extension_loads_and_describes_its_build():
    st = ops.available_backends()["cpp"]
    assert st.available and st.devices == ("cpu",), st
    info = _C().build_info()
    assert f"torch {torch.__version__}" in info, info  # built against the torch it runs with
    assert "CPU kernels: default" in info, info
    assert _C().cuda_built() == ("CUDA kernels: not built" not in info), info
    assert _C().cpu_isa() in ("default", "avx2")
    with pytest.raises(ValueError, match="expected 'auto'"):
        _C().set_cpu_isa("sse9")
    assert hasattr(torch.ops.fastcgan, "instance_norm_act_native_fwd")
    assert hasattr(torch.ops.fastcgan, "instance_norm_act_native_bwd")


_RUN_WITHOUT_NATIVE = r"""
import sys
sys.modules["fastcgan._C"] = None  # the library missing, as after a failed or skipped build
import pytest
test = "tests/test_native.py::test_extension_loads_and_describes_its_build"
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", test]))
"""


@pytest.mark.parametrize("require", ["1", "0"], ids=["required", "optional"])
def test_missing_library_fails_the_run_when_required(require):
    """CI sets FASTCGAN_REQUIRE_NATIVE=1 (`make test`): without fastcgan._C the run then fails at
    once with the loader's reason (tests/conftest.py) instead of skipping every native test."""
    env = {**os.environ, "FASTCGAN_REQUIRE_NATIVE": require}
    r = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_NATIVE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    out = r.stdout + r.stderr
    if require == "1":
        assert r.returncode != 0, out[-3000:]
        assert "FASTCGAN_REQUIRE_NATIVE=1" in out and "fastcgan._C is not available" in out, out[-3000:]
    else:
        assert r.returncode == 0 and "1 skipped" in out, out[-3000:]


@needs_native
def test_activation_list_matches_python():
    """fastcgan::Activation (csrc/instance_norm_act_kernels.h) and fastcgan.ops.Activation: the
    same names with the same codes; the native op accepts each and names them all otherwise."""
    assert _C().activations() == [a.label for a in sorted(ops.Activation)]  # index = code
    x = torch.randn(1, 2, 3, 3)
    for act in ops.Activation:
        y, _, _ = native_forward(x, None, None, None, act.label, 0.2, 0, 1e-5)
        want = instance_norm_act_ref(x, activation=act, negative_slope=0.2)
        torch.testing.assert_close(y, want, **tol(torch.float32))
    message = f"activation must be one of {ops.ACTIVATIONS}, got 'gelu'"  # the Python check's words
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _fwd(x, act="gelu")


def _nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


@needs_native
def test_cuda_sources_compile(tmp_path):
    """With a CUDA toolkit the CUDA kernels are built in (or, if this build skipped them, they at
    least compile with this nvcc); without one the backend says why it is unavailable."""
    if _C().cuda_built():
        assert "CUDA" in _C().build_info() and "not built" not in _C().build_info()
        return
    st = ops.available_backends()["cuda"]
    assert not st.available and "without CUDA" in st.reason
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc: the CUDA kernels cannot be compiled here")
    src = os.path.join(ROOT, "csrc", "instance_norm_act_cuda.cu")
    out = tmp_path / "k.o"
    r = subprocess.run(
        [nvcc, "-c", src, "-o", str(out), "-std=c++17", "-arch=sm_80", "-I", os.path.join(ROOT, "csrc")],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert out.stat().st_size > 0


@pytest.mark.parametrize("isa_flags", [[], ["-DFASTCGAN_CPU_AVX2", "-mavx2", "-mfma", "-mf16c"]],
                         ids=["default", "avx2"])
def test_cpu_kernels_compile_as_cpp17(isa_flags):
    """The GPU machine's torch 2.11 builds extensions as C++17, this one's torch as C++20: a
    zero written as ``T(0)`` on the kernels' Half/BF16 structs compiled here (C++20 parenthesised
    aggregate initialisation) and broke that build. The CPU kernel file includes no ATen header,
    so it is checked as C++17 in a second (instantiating every template it dispatches to)."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = os.path.join(ROOT, "csrc", "instance_norm_act_cpu_kernels.cpp")
    includes = ["-I", os.path.join(os.path.dirname(torch.__file__), "include"), "-I", os.path.join(ROOT, "csrc")]
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-fopenmp-simd", *isa_flags, *includes, src],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")


def _resource_usage(library: str, cuobjdump: str) -> dict:
    """{(arch, kernel): {"REG": n, "STACK": bytes, ...}} of every kernel in ``library``'s cubins."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", library], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    usage, arch, kernel = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            kernel = m.group(1)
        elif kernel and "REG:" in line:
            usage[(arch, kernel)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            kernel = None
    return usage


@needs_native
def test_cuda_kernels_fit_registers_and_barely_spill():
    """ptxas' resource use of every CUDA kernel built into fastcgan._C, per architecture, read
    from the library with cuobjdump (no GPU needed). Every kernel launches kThreads = 512 threads
    (__launch_bounds__), so 128 registers is the cap; what matters is spill (STACK = local memory
    per thread): the one-pass forward keeps its activation a template parameter because as a
    run-time value it spilled 92-200 bytes; today no kernel spills more than 48. A change that
    pushes a kernel past 64 bytes fails here before any GPU time is spent on it."""
    if not _C().cuda_built():
        pytest.skip("fastcgan._C was built without CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (Triton's bundled copy or the CUDA toolkit's)")
    usage = _resource_usage(_C().__file__, tool)
    archs = {arch for arch, _ in usage}
    assert "sm_90" in archs or "sm_80" in archs, sorted(archs)
    one_pass = [k for k in usage if "one_pass" in k[1]]
    assert one_pass and len(usage) > 100, f"{len(usage)} kernels, {len(one_pass)} one-pass"
    over = {f"{a} {k[:120]}": u for (a, k), u in usage.items() if u["REG"] > 128 or u["STACK"] > 64}
    assert not over, over


# ---------------------------------------------------------------------------------------------
# CPU: gradcheck and agreement with the contract
# ---------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", ACTS)
def test_cpp_gradcheck_fp64_all_options(activation, channels_last):
    gen = torch.Generator().manual_seed(0)
    n, c, h, w = 2, 3, 5, 4
    for affine, residual, pad in itertools.product(AFFINE, (False, True), (0, 1, 3)):
        x = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen) * 2 + 0.5
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wt, bs = _params(c, affine, torch.float64, gen=gen)
        res = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen) if residual else None
        inputs = [t.requires_grad_() for t in (x, wt, bs, res) if t is not None]

        def fn(*args, wt=wt, bs=bs, res=res, pad=pad):
            it = iter(args)
            xx = next(it)
            ww = next(it) if wt is not None else None
            bb = next(it) if bs is not None else None
            rr = next(it) if res is not None else None
            return ops.instance_norm_act(xx, ww, bb, activation=activation, negative_slope=0.1, residual=rr,
                                         pad=pad, backend="cpp")

        assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4), (
            affine, residual, pad)


def _contract_check(x, wt, bs, res, activation, pad):
    """Native forward/backward vs the contract spelled out in plain torch (contract_*: fp64 input
    in fp64, statistics included; everything else in fp32)."""
    y, mean, rstd = native_forward(x, wt, bs, res, activation, 0.2, pad, 1e-5)
    y0, mean0, rstd0 = contract_forward(x, wt, bs, res, activation, 0.2, pad, 1e-5)
    t = tol(x.dtype)
    assert y.dtype == y0.dtype and y.shape == y0.shape and y.stride() == y0.stride()
    assert mean.dtype == rstd.dtype == stats_dtype(x.dtype) and mean.shape == (x.shape[0], x.shape[1])
    torch.testing.assert_close(mean, mean0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, rstd0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y0, **t)
    dy = torch.randn_like(y0)
    got = native_backward(dy, x, wt, bs, mean0, rstd0, activation, 0.2, pad, res is not None)
    want = contract_backward(dy, x, wt, bs, mean0, rstd0, activation, 0.2, pad, res is not None)
    for name, a, b in zip(("dx", "dweight", "dbias", "dresidual"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        if name == "dbias" and bs is None:
            continue  # unused placeholder (weight's shape) when there is a weight but no bias
        if name in ("dx", "dresidual"):
            assert a.stride() == b.stride(), (name, a.stride(), b.stride())
        scale = 1.0 if name in ("dx", "dresidual") else max(1.0, x.shape[0] * x.shape[2] * x.shape[3] ** 0.5)
        torch.testing.assert_close(a, b, atol=t["atol"] * scale, rtol=t["rtol"], msg=lambda m, n=name: f"{n}: {m}")


ODD_SHAPES = {
    "2x3x5x7": (2, 3, 5, 7),
    "1x1": (2, 3, 1, 1),
    "1x9": (1, 5, 1, 9),
    "17ch": (1, 17, 9, 6),  # one full + one partial vector of channels
    "chunks-nchw": (1, 2, 70, 70),  # > 4096 pixels: several statistics chunks per plane
    "chunks-nhwc": (1, 3, 80, 75),  # > 16384 / C pixels: several NHWC chunks
}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", list(ODD_SHAPES.values()), ids=list(ODD_SHAPES))
def test_cpp_matches_contract(shape, channels_last, dtype, cpu_isa):
    gen = torch.Generator().manual_seed(1)
    n, c, h, w = shape
    combos = [("relu", "weight+bias", True, 1), ("leaky_relu", "weight", False, 2), ("none", "none", True, 0),
              ("relu", "bias", False, 3)]
    for activation, affine, residual, pad in combos:
        if pad and (pad >= h or pad >= w):
            pad = 0
        x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wt, bs = _params(c, affine, gen=gen)
        res = torch.randn(shape, generator=gen).to(dtype) if residual else None
        _contract_check(x, wt, bs, res, activation, pad)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_autograd_matches_reference(channels_last, dtype):
    """End to end through fastcgan.ops (custom op + autograd) against the reference's autograd,
    judged against fp64 truth as well (low precision within ~ the reference's own error)."""
    gen = torch.Generator().manual_seed(2)
    shape = (2, 6, 11, 13)
    x64 = torch.randn(shape, dtype=torch.float64, generator=gen) * 2 - 1
    w64, b64 = torch.randn(6, dtype=torch.float64, generator=gen), torch.randn(6, dtype=torch.float64, generator=gen)
    r64 = torch.randn(shape, dtype=torch.float64, generator=gen)
    dy64 = torch.randn(2, 6, 15, 17, dtype=torch.float64, generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def run(dt, backend):
        x = x64.to(dt).contiguous(memory_format=fmt).requires_grad_()
        w, b = w64.float().requires_grad_(), b64.float().requires_grad_()
        if dt == torch.float64:
            w, b = w64.clone().requires_grad_(), b64.clone().requires_grad_()
        r = r64.to(dt).contiguous(memory_format=fmt).requires_grad_()
        kw = dict(activation="leaky_relu", negative_slope=0.2, residual=r, pad=2)
        y = (ops.instance_norm_act(x, w, b, backend=backend, **kw) if backend
             else instance_norm_act_ref(x, w, b, **kw))
        y.backward(dy64.to(dt))
        return y, x.grad, w.grad, b.grad, r.grad

    got = run(dtype, "cpp")
    ref = run(dtype, None)
    truth = run(torch.float64, None)
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    for name, a, b, t in zip(("y", "dx", "dweight", "dbias", "dresidual"), got, ref, truth):
        if a.dtype == torch.float32 and dtype == torch.bfloat16:  # weight grads stay fp32
            torch.testing.assert_close(a, b, atol=0.05 * max(1.0, b.abs().max().item()), rtol=0.02)
        else:
            assert_matches_reference(a, b, t, name=name, slack=3.0)


@needs_native
def test_cpp_zero_variance_and_noncontiguous(cpu_isa):
    x = torch.full((2, 3, 6, 5), 3.25)
    x[1] = torch.randn(3, 6, 5)
    wt, bs = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, -0.5, 0.25])
    y, mean, rstd = native_forward(x, wt, bs, None, "relu", 0.2, 1, 1e-5)
    assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
    # a constant plane normalises to 0, so y = act(bias) everywhere, padding included
    torch.testing.assert_close(y[0], torch.relu(bs)[:, None, None].expand(3, 8, 7), atol=0, rtol=0)
    dx, dw, db, _ = native_backward(torch.randn_like(y), x, wt, bs, mean, rstd, "relu", 0.2, 1, False)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
    # non-contiguous (neither NCHW nor NHWC dense) input: computed as NCHW
    base = torch.randn(2, 3, 12, 10)
    xs = base[:, :, ::2, 1::2]
    assert not xs.is_contiguous() and not xs.is_contiguous(memory_format=torch.channels_last)
    _contract_check(xs, None, bs, None, "leaky_relu", 2)


@needs_native
def test_cpp_is_deterministic_and_threaded():
    x = torch.randn(3, 40, 33, 31).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(3, 40, 35, 33).contiguous(memory_format=torch.channels_last)
    w = torch.randn(40)
    outs = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y, m, s = native_forward(x, w, None, None, "relu", 0.2, 1, 1e-5)
            g = native_backward(dy, x, w, None, m, s, "relu", 0.2, 1, False)
        finally:
            torch.set_num_threads(prev)
        outs.append((y, m, s) + tuple(g[:2]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Errors at the op boundary (the native ops themselves, not the Python checks)
# ---------------------------------------------------------------------------------------------
def _fwd(x, w=None, b=None, r=None, act="relu", pad=0, eps=1e-5):
    return torch.ops.fastcgan.instance_norm_act_native_fwd(x, w, b, r, act, 0.2, pad, eps)


@needs_native
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _fwd(torch.randn(2, 3, 4)), r"must be 4-D \(N, C, H, W\), got shape \[2, 3, 4\]"),
        (lambda: _fwd(torch.randn(1, 3, 4, 4), w=torch.randn(4)), r"weight must have shape \(3,\) .* got \[4\]"),
        (lambda: _fwd(torch.randn(1, 3, 4, 4), b=torch.randn(3, 1)), r"bias must have shape \(3,\)"),
        (lambda: _fwd(torch.randn(1, 3, 4, 6), pad=4), r"pad 4 must be smaller than H and W \(got H=4, W=6\)"),
        (lambda: _fwd(torch.randn(1, 3, 6, 4), pad=4), "must be smaller than H and W"),
        (lambda: _fwd(torch.randn(1, 3, 4, 4), pad=-1), "pad must be >= 0, got -1"),
        (lambda: _fwd(torch.ones(1, 3, 4, 4, dtype=torch.int32)), "float32, float64, float16 or bfloat16"),
        (lambda: _fwd(torch.randn(1, 3, 4, 4), r=torch.randn(1, 3, 4, 5)), "residual must have x's shape"),
        (lambda: _fwd(torch.randn(1, 3, 4, 4), act="gelu"), "activation must be"),
        (lambda: _fwd(torch.randn(1, 3, 4, 4), eps=0.0), "eps must be positive, got 0"),
        (lambda: _fwd(torch.randn(0, 3, 4, 4)), "must not be empty"),
        (lambda: torch.ops.fastcgan.instance_norm_act_native_bwd(
            torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), None, None, torch.zeros(1, 3), torch.ones(1, 3),
            "relu", 0.2, 1, False), r"dy must have shape \(1, 3, 6, 6\)"),
        (lambda: torch.ops.fastcgan.instance_norm_act_native_bwd(
            torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), None, None, torch.zeros(3), torch.ones(1, 3),
            "relu", 0.2, 0, False), r"mean must have shape \(1, 3\)"),
    ],
    ids=["rank", "weight-size", "bias-rank", "pad-H", "pad-W", "pad-negative", "int-dtype", "residual-shape",
         "activation", "eps", "empty", "bwd-dy-shape", "bwd-mean-shape"],
)
def test_native_op_rejects_bad_calls(make, match):
    # The numbers in the messages matter: a module that linked its own static libstdc++ formats
    # them with an uninitialised locale (truncated message, or a segfault).
    with pytest.raises(RuntimeError, match=match) as e:
        make()
    assert "fastcgan::instance_norm_act_native" in str(e.value)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (run on a GPU machine)
# ---------------------------------------------------------------------------------------------
CUDA_SHAPES = {
    "1x1": (2, 3, 1, 1),
    "3x5": (2, 4, 3, 5),
    "7x257": (1, 3, 7, 257),
    "1x1024": (1, 2, 1, 1024),
    "batch3": (3, 5, 16, 16),
    "ch40": (2, 40, 9, 10),  # NHWC: one full and one partial 32-channel tile
    "large": (1, 64, 256, 256),  # planes split across several blocks
}


def _cuda_ready():
    return native_ok and torch.cuda.is_available() and ops.available_backends()["cuda"].available


@pytest.mark.cuda
def test_cuda_backend_available():
    assert _C().cuda_built(), _C().build_info()
    assert ops.available_backends()["cuda"].available, ops.available_backends()["cuda"].reason


def _check_cuda_case(shape, dtype, channels_last, activation, affine, residual, pad, gen):
    dev = "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    n, c, h, w = shape
    x64 = (torch.randn(shape, dtype=torch.float64, device=dev, generator=gen) * 2 + 0.3)
    w64, b64 = _params(c, affine, torch.float64, dev, gen)
    r64 = torch.randn(shape, dtype=torch.float64, device=dev, generator=gen) if residual else None
    dy64 = torch.randn(n, c, h + 2 * pad, w + 2 * pad, dtype=torch.float64, device=dev, generator=gen)

    def run(dt, backend):
        x = x64.to(dt).contiguous(memory_format=fmt).requires_grad_()
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        wt = w64.to(pdt).requires_grad_() if w64 is not None else None
        bs = b64.to(pdt).requires_grad_() if b64 is not None else None
        r = r64.to(dt).contiguous(memory_format=fmt).requires_grad_() if r64 is not None else None
        kw = dict(activation=activation, negative_slope=0.2, residual=r, pad=pad)
        if backend:
            y = ops.instance_norm_act(x, wt, bs, backend=backend, **kw)
        else:
            y = instance_norm_act_ref(x, wt, bs, **kw)
        y.backward(dy64.to(dt))
        grads = [x.grad] + [t.grad for t in (wt, bs, r) if t is not None]
        return [y] + grads

    got = run(dtype, "cuda")
    ref = run(dtype, None)
    truth = run(torch.float64, None)
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
    label = f"{shape} {dtype} cl={channels_last} {activation} {affine} res={residual} pad={pad}"
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    kinks = activation_kinks(x64.to(dtype), *(p.to(pdt) if p is not None else None for p in (w64, b64)),
                             activation=activation)
    for i, (a, b, t) in enumerate(zip(got, ref, truth)):
        name = f"{label} out{i}"
        if i == 1 and kinks is not None:  # dx: elements at the activation's kink judged by neither
            a, b = torch.where(kinks, t.to(a.dtype), a), torch.where(kinks, t.to(b.dtype), b)
        assert torch.isfinite(a).all(), name
        if a.dim() == 1:  # weight/bias grads: sums over N*H*W, judged relative to their magnitude
            bound = TOL[dtype][0] * max(1.0, t.abs().max().item()) * 4
            assert (a.double() - t).abs().max().item() <= bound + 2 * (b.double() - t).abs().max().item(), name
        else:
            assert_matches_reference(a, b, t, name=name, slack=3.0)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", list(CUDA_SHAPES.values()), ids=list(CUDA_SHAPES))
def test_cuda_matches_reference_all_options(shape, dtype, channels_last):
    if not _cuda_ready():
        pytest.skip(ops.available_backends()["cuda"].reason)
    gen = torch.Generator(device="cuda").manual_seed(3)
    n, c, h, w = shape
    pads = [p for p in (0, 1, 3) if p == 0 or (p < h and p < w)]
    for activation, affine, residual, pad in itertools.product(ACTS, AFFINE, (False, True), pads):
        _check_cuda_case(shape, dtype, channels_last, activation, affine, residual, pad, gen)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_gradcheck_fp64(channels_last):
    if not _cuda_ready():
        pytest.skip(ops.available_backends()["cuda"].reason)
    gen = torch.Generator(device="cuda").manual_seed(4)
    for activation, pad in itertools.product(ACTS, (0, 2)):
        x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device="cuda", generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wt = torch.randn(3, dtype=torch.float64, device="cuda", generator=gen)
        bs = torch.randn(3, dtype=torch.float64, device="cuda", generator=gen)
        r = torch.randn(2, 3, 5, 4, dtype=torch.float64, device="cuda", generator=gen)
        inputs = tuple(t.requires_grad_() for t in (x, wt, bs, r))

        def fn(x, wt, bs, r, activation=activation, pad=pad):
            return ops.instance_norm_act(x, wt, bs, activation=activation, residual=r, pad=pad, backend="cuda")

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4), (activation, pad)


@pytest.mark.cuda
def test_cuda_zero_variance_matches_cpu_and_is_deterministic():
    if not _cuda_ready():
        pytest.skip(ops.available_backends()["cuda"].reason)
    x = torch.randn(2, 8, 300, 301)
    x[0, 3] = 1.5  # a constant plane: finite output, y = act(bias)
    wt, bs = torch.randn(8), torch.randn(8)
    dy = torch.randn(2, 8, 302, 303)
    cpu = native_forward(x, wt, bs, None, "leaky_relu", 0.2, 1, 1e-5)
    xc, wc, bc, dyc = x.cuda(), wt.cuda(), bs.cuda(), dy.cuda()
    gpu = native_forward(xc, wc, bc, None, "leaky_relu", 0.2, 1, 1e-5)
    gpu2 = native_forward(xc, wc, bc, None, "leaky_relu", 0.2, 1, 1e-5)
    for a, b, b2 in zip(cpu, gpu, gpu2):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b.cpu(), a, **tol(torch.float32))
        assert torch.equal(b, b2)
    g1 = native_backward(dyc, xc, wc, bc, gpu[1], gpu[2], "leaky_relu", 0.2, 1, False)
    g2 = native_backward(dyc, xc, wc, bc, gpu[1], gpu[2], "leaky_relu", 0.2, 1, False)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_native_op_rejects_device_mismatch():
    if not _cuda_ready():
        pytest.skip(ops.available_backends()["cuda"].reason)
    x = torch.randn(1, 3, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        _fwd(x, w=torch.randn(3))
    with pytest.raises(RuntimeError, match="residual is on cpu but x is on cuda"):
        _fwd(x, r=torch.randn(1, 3, 4, 4))


@needs_native
@pytest.mark.parametrize("x_dtype, r_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.float64)])
def test_a_residual_of_another_dtype_is_added_as_the_contract_says(x_dtype, r_dtype):
    """The native kernels cast the residual to x's dtype before adding it; the contract (and the
    reference, and Triton) add it in fp32: an fp32 residual on bf16 x came out one bf16 step off
    in a third of the outputs. Such calls run the reference now; the gradient keeps r's dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 7, generator=g).to(x_dtype).requires_grad_()
    r = (torch.randn(2, 3, 9, 7, generator=g) * 3).to(r_dtype).requires_grad_()
    kw = dict(activation="leaky_relu", negative_slope=0.1, pad=1)
    want = ops.instance_norm_act(x, residual=r, backend="torch", **kw)
    got = ops.instance_norm_act(x, residual=r, backend="cpp", **kw)
    assert got.dtype == x_dtype and torch.equal(got, want)
    dx, dr = torch.autograd.grad(got, (x, r), torch.ones_like(got))
    assert dx.dtype == x_dtype and dr.dtype == r_dtype
