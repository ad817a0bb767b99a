"""The CUDA kernels of ``csrc/instance_norm_act_cuda.cu`` run on the CPU, for tests.

Most sessions of this project have no GPU, so the CUDA kernels could only be compiled there.
This module compiles the same source as C++ with ``tests/cuda_emulator/cuda_emu.h`` in front (fibers
for threads: ``__syncthreads`` and warp shuffles keep their meaning; the launch plans are an
H100's) and the real boundary code of ``csrc/instance_norm_act.cpp``, and exposes
``fwd`` / ``bwd`` with the native ops' signatures plus :func:`instance_norm_act`, an autograd
function over them. Slow (every thread is a fiber): small shapes only.

Needs a C++ compiler with ``_Float16`` (GCC >= 12 on x86-64) and ninja; :func:`load` raises
:class:`Unavailable` with the reason otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
HERE = os.path.join(ROOT, "tests", "cuda_emulator")

# `kernel<T, ...><<<grid, block, smem, stream>>>(` -> `::emu::launch_kernel(grid, block, smem, stream, &kernel<T, ...>, `
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_CUDA_INCLUDES = re.compile(r"^#include <(cuda_bf16|cuda_fp16|cuda_runtime)\.h>\n", re.M)
# The torch-side helpers of instance_norm_act.cpp end here; what follows is the CPU registration.
_CPP_END_MARKER = "// ---- CPU ISA selection"


class Unavailable(RuntimeError):
    pass


def emulated_cuda_source(text: str) -> str:
    """``instance_norm_act_cuda.cu`` as C++ for the emulator."""
    text, n_inc = _CUDA_INCLUDES.subn("", text)
    text, n_launch = _LAUNCH.subn(r"::emu::launch_kernel(\2, &\1, ", text)
    if n_inc != 3 or n_launch == 0:
        raise Unavailable(f"instance_norm_act_cuda.cu changed shape: {n_inc} CUDA includes, {n_launch} launches")
    return '#include "cuda_emu.h"\n' + text


def boundary_source(text: str) -> str:
    """``instance_norm_act.cpp`` up to the end of ``finish_bwd`` (its op registrations would
    clash with the loaded ``fastcgan._C``)."""
    cut = text.find(_CPP_END_MARKER)
    if cut < 0:
        raise Unavailable(f"instance_norm_act.cpp no longer has the marker {_CPP_END_MARKER!r}")
    return text[:cut] + "}  // namespace fastcgan\n"


@functools.lru_cache(maxsize=None)
def load():
    """The compiled emulator module (``fwd``, ``bwd``, ``reset``), built once per source."""
    from torch.utils import cpp_extension

    with open(os.path.join(CSRC, "instance_norm_act_cuda.cu")) as f:
        cu = emulated_cuda_source(f.read())
    with open(os.path.join(CSRC, "instance_norm_act.cpp")) as f:
        cpp = boundary_source(f.read())
    with open(os.path.join(HERE, "binding.cpp")) as f:
        binding = f.read()
    with open(os.path.join(HERE, "cuda_emu.h")) as f:
        header = f.read()
    digest = hashlib.sha256("\0".join((cu, cpp, binding, header, torch.__version__)).encode()).hexdigest()[:12]
    name = f"fastcgan_cuda_emu_{digest}"
    build = os.path.join(
        os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")),
        name,
    )
    src = os.path.join(build, "src")
    os.makedirs(src, exist_ok=True)
    files = {"kernels_emulated.cpp": cu, "boundary.cpp": cpp, "binding.cpp": binding}
    for fname, text in files.items():
        path = os.path.join(src, fname)
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
    try:
        return cpp_extension.load(
            name=name,
            sources=[os.path.join(src, f) for f in files],
            extra_include_paths=[CSRC, HERE],
            extra_cflags=["-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wno-unused-function"],
            build_directory=build,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - a missing compiler feature is reported, not raised raw
        raise Unavailable(f"building the CUDA emulator failed: {type(e).__name__}: {str(e)[-2000:]}") from e


class _EmulatedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, activation, negative_slope, pad, eps):
        m = load()
        m.reset()
        y, mean, rstd = m.fwd(x, weight, bias, residual, activation, negative_slope, pad, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.args = (activation, negative_slope, pad, residual is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        activation, negative_slope, pad, has_residual = ctx.args
        m = load()
        m.reset()
        dx, dw, db, dres = m.bwd(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual)
        return (
            dx,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            dres if has_residual else None,
            None, None, None, None,
        )


def instance_norm_act(x, weight=None, bias=None, residual=None, *, activation="relu", negative_slope=0.2, pad=0,
                      eps=1e-5):
    """``fastcgan.ops.instance_norm_act`` with the emulated CUDA kernels (CPU tensors)."""
    return _EmulatedOp.apply(x, weight, bias, residual, activation, negative_slope, pad, eps)
