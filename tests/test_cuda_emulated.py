"""The CUDA kernels, run on the CPU by the emulator of ``tests/cuda_emu.py``, against the reference.

The native CUDA kernels otherwise run only where a GPU is lent (about one session in five); this
is how a change to ``csrc/instance_norm_act_cuda.cu`` gets tested everywhere else: the same
source, the same launch plans as on an H100 (132 SMs), ``__syncthreads`` and warp shuffles with
their CUDA meaning, undefined barriers reported as errors. It checks indexing, reductions,
merges, padding and every code path the plans choose; not speed, and not the GPU's own fp32
arithmetic (the ``cuda``-marked tests of test_instance_norm_act.py / test_native.py do that).
"""

from __future__ import annotations

import os

import pytest
import torch
from test_instance_norm_act import (
    KERNEL_DTYPE_IDS,
    KERNEL_DTYPES,
    SHAPES,
    _all_options,
    _check_backend,
    FAR_FROM_ZERO,
    _constant_plane_errors,
    _assert_far_from_zero,
    _few_options,
    _random_cases,
    _fp64_backward_check,
    _nan_check,
)

import cuda_emu


@pytest.fixture(scope="module")
def emulated():
    try:
        cuda_emu.load()
    except cuda_emu.Unavailable as e:
        # `make test` (CI) sets FASTCGAN_REQUIRE_NATIVE=1: the compiler that built fastcgan._C
        # builds this too, so a failure there is a failure, not a skip.
        if os.environ.get("FASTCGAN_REQUIRE_NATIVE") == "1":
            raise
        pytest.skip(f"CUDA emulator unavailable: {e}")
    return cuda_emu.instance_norm_act


def _emulated_fwd(*args):
    """The emulated forward op: (y, mean, rstd)."""
    m = cuda_emu.load()
    m.reset()
    return m.fwd(*args)


def _check(fn, shape, dtype, channels_last, options):
    for act, affine, residual, pad in options:
        _check_backend("cuda-emulated", shape, dtype, "cpu", channels_last, act, affine, residual, pad, fn=fn)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=KERNEL_DTYPE_IDS)
def test_emulated_cuda_all_options_3x5(emulated, dtype, channels_last):
    """Every activation x affine x residual x pad 0/1/2 on a 3x5 plane (one-pass kernels; fp64
    takes the split kernels)."""
    _check(emulated, SHAPES["3x5"], dtype, channels_last, _all_options(SHAPES["3x5"]))


# Beyond the named shapes: several channel tiles per block with a ragged last tile (one-pass),
# a 128x128 plane (the one-pass limit: 512 threads x 32 pixels), and planes above it, which are
# split into chunks: NCHW merges 9 chunk partials inline, NHWC 256 of them with the merge kernel.
EXTRA_SHAPES = {"ragged-tiles": (2, 37, 6, 7), "128x128": (1, 2, 128, 128), "split-130x130": (1, 3, 130, 130)}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("shape_id", ["1x1", "7x257", "1x1024", "batch3", *EXTRA_SHAPES])
def test_emulated_cuda_shapes(emulated, shape_id, dtype, channels_last):
    shape = SHAPES.get(shape_id) or EXTRA_SHAPES[shape_id]
    options = _few_options(shape)
    if shape_id.startswith("split") or shape_id == "128x128":
        options = options[:2]  # relu + pad, and none + residual + pad: every kernel, fewer calls
    _check(emulated, shape, dtype, channels_last, options)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_cuda_planes_far_from_zero(emulated, channels_last):
    """x = offset + small spread: y and dx within 2x the fp32 reference's own error, rstd near the
    truth. Per-thread fp32 sums had made y and dx up to 10x worse; chunk M2s taken around means
    rounded at the offset's ulp left split planes' rstd 1e-5..6e-5 off (dx 2-6x)."""
    _assert_far_from_zero(emulated, _emulated_fwd, channels_last, "emulated cuda",
                          FAR_FROM_ZERO + [((1, 2, 200, 200), 1000.0, 0.01)])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_cuda_constant_planes_give_the_bias_exactly(emulated, channels_last):
    """Per-thread fp32 sums left a constant 2x3 plane's mean 3-7 ulp off (y = bias + 1.5e-4)."""
    assert _constant_plane_errors(emulated, channels_last) <= 1e-6


def test_emulated_cuda_random_cases(emulated):
    """Seeded random shapes and options beyond the named ones, on H100 launch plans (trimmed: 2,700
    cases passed once), one in ten on a plane the plans split."""
    large = [(129, 131), (200, 3), (3, 200), (130, 130), (257, 65), (1, 1000)]
    for case in _random_cases(80, seed=2, dtypes=KERNEL_DTYPES, large=large):
        _check_backend("cuda-emulated", *case, fn=emulated)


def test_emulated_cuda_nan_planes_stay_nan(emulated):
    """ReLU's z > 0 ? z : 0 turned a NaN plane into zeros (the reference keeps it NaN)."""
    _nan_check("cuda-emulated", "cpu", fn=emulated)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_cuda_fp64_backward_keeps_fp64_accuracy(emulated, channels_last):
    """fp64 statistics are saved as fp64 (they were fp32, which capped the backward's accuracy)."""
    _fp64_backward_check("cuda-emulated", "cpu", channels_last, fn=emulated)


def test_emulated_cuda_reports_launch_failures(emulated):
    """A failed emulated launch surfaces as the op's error (the emulator's checks are live), and
    the next call starts clean."""
    m = cuda_emu.load()
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        m.fwd(x, None, None, None, "gelu", 0.2, 0, 1e-5)
    y, mean, rstd = m.fwd(x, None, None, None, "relu", 0.2, 1, 1e-5)
    assert torch.isfinite(y).all() and y.shape == (1, 2, 6, 6)


_ONE_PASS_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import cuda_emu
from fastcgan.ops import instance_norm_act_ref

m = cuda_emu.load()
elems = []
for n, c, h, w, pad in [(1, 256, 64, 64, 1), (8, 256, 64, 64, 1), (1, 128, 128, 128, 0), (8, 128, 128, 128, 0)]:
    x = torch.empty(n, c, h, w, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    elems.append(m.fwd_workspace_elems(x, pad))
x = torch.randn(2, 3, 3, 5).contiguous(memory_format=torch.channels_last)
y, _, _ = m.fwd(x, None, None, None, "relu", 0.2, 1, 1e-5)
err = float((y - instance_norm_act_ref(x, pad=1)).abs().max())
print(json.dumps({"elems": elems, "err": err}))
"""


def test_emulated_cuda_one_pass_switch_selects_the_split_kernels(emulated):
    """FASTCGAN_ONE_PASS=0 (read once per process: a child process per setting) sends the
    ResNet-9 channels_last planes that make_plan runs one-pass (64x64 and 128x128, batch 1 and 8)
    to the split kernels (a workspace for chunk partials, none one-pass); results stay right."""
    import json
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    for value, one_pass in ((None, True), ("0", False), ("off", False)):
        env = {k: v for k, v in os.environ.items() if k != "FASTCGAN_ONE_PASS"}
        if value is not None:
            env["FASTCGAN_ONE_PASS"] = value
        done = subprocess.run([sys.executable, "-c", _ONE_PASS_CHILD, tests], env=env, capture_output=True,
                              text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        assert all((e == 0) == one_pass for e in got["elems"]), (value, got)
        assert got["err"] < 1e-5, (value, got)
