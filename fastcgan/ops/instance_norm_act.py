"""``instance_norm_act``: InstanceNorm + affine + activation + residual add + reflection pad, fused.

    y = reflection_pad(act(instance_norm(x) * weight + bias) + residual, pad)

Statistics are per (n, c) plane, biased variance, computed in fp32 whatever the input dtype.
The padding lets the next 3x3 (or 7x7) convolution run with ``padding=0``: the pad that a
ResNet generator otherwise spends a whole extra read+write on is written by the norm kernel.

Layers (``fastcgan.nn``) call :func:`instance_norm_act`; it validates the call, picks a
backend and routes to

* ``torch``  -- :func:`instance_norm_act_ref`, the specification, fallback and export path;
* ``triton`` -- ``fastcgan.kernels.instance_norm`` (GPU, or CPU under ``TRITON_INTERPRET=1``);
* ``cpp`` / ``cuda`` -- the ``fastcgan._C`` op library (``csrc/``), CPU and CUDA dispatch keys.

Kernel backends go through one pair of ``torch.library`` custom ops
(``fastcgan::instance_norm_act_fwd`` / ``_bwd``) with fake implementations and autograd, so
``torch.compile(fullgraph=True)`` traces through them and ``torch.library.opcheck`` checks them.
Every kernel backend implements the same two functions::

    forward(x, weight, bias, residual, activation, negative_slope, pad, eps) -> (y, mean, rstd)
    backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual)
        -> (dx, dweight, dbias, dresidual)

``mean``/``rstd`` are fp32 ``(N, C)``; ``y``, ``dx`` and ``dresidual`` use
:func:`output_memory_format` of ``x``; gradients that are not needed (no weight, no residual)
are returned as empty tensors, since custom ops cannot return ``None``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcgan.ops import _backends

ACTIVATIONS = ("relu", "leaky_relu", "none")


# --------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------
def instance_norm_act_ref(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    negative_slope: float = 0.2,
    residual: Optional[Tensor] = None,
    pad: int = 0,
    eps: float = 1e-5,
) -> Tensor:
    """Pure-PyTorch reference. Built from standard operators only, so ONNX and torch.export
    of a network that uses it hold InstanceNormalization, Relu/LeakyRelu, Add and Pad(reflect).

    Statistics are computed in fp32 (the input is upcast; for fp32 input the cast is a no-op
    and does not appear in an exported graph)."""
    dtype = x.dtype
    xf = x if dtype in (torch.float32, torch.float64) else x.float()
    w = weight.to(xf.dtype) if weight is not None else None
    b = bias.to(xf.dtype) if bias is not None else None
    if xf.shape[-2] * xf.shape[-1] == 1:
        # F.instance_norm refuses 1x1 planes in training mode; their normalised value is 0
        # (zero variance), which is what every kernel backend computes.
        y = xf - xf  # keeps x in the graph: its gradient is exactly 0, as in the kernels
        y = y * w[None, :, None, None] if w is not None else y
        y = y + b[None, :, None, None] if b is not None else y
    else:
        # .contiguous(): torch 2.14's CPU instance_norm backward is wrong for channels_last
        # input with H == 1; NCHW input (and so export) is unaffected.
        y = F.instance_norm(xf.contiguous(), weight=w, bias=b, eps=eps)
    if activation == "relu":
        y = F.relu(y)
    elif activation == "leaky_relu":
        y = F.leaky_relu(y, negative_slope)
    elif activation != "none":
        raise ValueError(f"instance_norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        y = y + residual.to(y.dtype)
    if pad > 0:
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    return y.to(dtype)


# --------------------------------------------------------------------------------------------
# Validation and layout rules shared by every backend
# --------------------------------------------------------------------------------------------
def output_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format every backend writes ``y``/``dx`` in: channels_last when ``x`` is
    channels_last-contiguous (and not also NCHW-contiguous, e.g. C == 1), else NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_instance_norm_act_args(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation: str,
    pad: int,
    eps: float,
) -> None:
    """Raise a clear error for a call no backend can compute (before any kernel launches)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"instance_norm_act: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"instance_norm_act: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"instance_norm_act: x must be a floating-point tensor, got {x.dtype}")
    n, c, h, w = x.shape
    if n == 0 or c == 0 or h == 0 or w == 0:
        raise ValueError(f"instance_norm_act: x must not be empty, got shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            if p.dim() != 1 or p.shape[0] != c:
                raise ValueError(
                    f"instance_norm_act: {name} must have shape ({c},) to match x's {c} channels, "
                    f"got {tuple(p.shape)}"
                )
            if p.device != x.device:
                raise ValueError(f"instance_norm_act: {name} is on {p.device} but x is on {x.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"instance_norm_act: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.device != x.device:
            raise ValueError(f"instance_norm_act: residual is on {residual.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"instance_norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"instance_norm_act: pad must be a non-negative int, got {pad!r}")
    if pad > 0 and (pad >= h or pad >= w):
        raise ValueError(
            f"instance_norm_act: reflection pad {pad} must be smaller than H and W (got H={h}, W={w})"
        )
    if not eps > 0:
        raise ValueError(f"instance_norm_act: eps must be positive, got {eps}")


# --------------------------------------------------------------------------------------------
# The custom ops (one op for torch.compile, whatever the backend)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcgan::instance_norm_act_fwd", mutates_args=())
def _fwd_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation: str,
    negative_slope: float,
    pad: int,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backends.kernel_impl(backend)
    return impl.forward(x, weight, bias, residual, activation, negative_slope, pad, eps)


@_fwd_op.register_fake
def _fwd_fake(x, weight, bias, residual, activation, negative_slope, pad, eps, backend):
    n, c, h, w = x.shape
    y = x.new_empty((n, c, h + 2 * pad, w + 2 * pad)).contiguous(memory_format=output_memory_format(x))
    stats = x.new_empty((n, c), dtype=torch.float32)
    return y, stats, stats.clone()


@torch.library.custom_op("fastcgan::instance_norm_act_bwd", mutates_args=())
def _bwd_op(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    activation: str,
    negative_slope: float,
    pad: int,
    has_residual: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _backends.kernel_impl(backend)
    return impl.backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual)


@_bwd_op.register_fake
def _bwd_fake(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual, backend):
    fmt = output_memory_format(x)
    dx = torch.empty_like(x, memory_format=fmt)
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    db = (
        bias.new_empty(bias.shape)
        if bias is not None
        else (weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,)))
    )
    dres = torch.empty_like(x, memory_format=fmt) if has_residual else x.new_empty((0,))
    return dx, dw, db, dres


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, negative_slope, pad, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.activation, ctx.negative_slope, ctx.pad, ctx.backend = activation, negative_slope, pad, backend


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db, dres = _bwd_op(
        dy, x, weight, bias, mean, rstd, ctx.activation, ctx.negative_slope, ctx.pad, ctx.has_residual,
        ctx.backend,
    )
    return (
        dx,
        dw if weight is not None else None,
        db if bias is not None else None,
        dres.to(ctx.residual_dtype) if ctx.has_residual else None,
        None, None, None, None, None,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerInstanceNormAct(torch.autograd.Function):
    """Eager-mode twin of the custom ops: same kernels, same saved tensors, no dispatcher hop."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, activation, negative_slope, pad, eps, backend):
        y, mean, rstd = _backends.kernel_impl(backend).forward(
            x, weight, bias, residual, activation, negative_slope, pad, eps
        )
        _setup_context(ctx, (x, weight, bias, residual, activation, negative_slope, pad, eps, backend), (y, mean, rstd))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db, dres = _backends.kernel_impl(ctx.backend).backward(
            dy, x, weight, bias, mean, rstd, ctx.activation, ctx.negative_slope, ctx.pad, ctx.has_residual
        )
        return (
            dx,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            dres.to(ctx.residual_dtype) if ctx.has_residual else None,
            None, None, None, None, None,
        )


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def instance_norm_act(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    negative_slope: float = 0.2,
    residual: Optional[Tensor] = None,
    pad: int = 0,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """Fused ``reflection_pad(act(instance_norm(x) * weight + bias) + residual, pad)``.

    ``backend``: ``"auto"`` (fastest available for ``x``'s device and dtype), ``"torch"``,
    ``"triton"``, ``"cuda"`` or ``"cpp"``; see :func:`fastcgan.ops.available_backends`.
    During ONNX export or ``torch.export`` the reference is always used, so exported graphs
    hold standard operators."""
    check_instance_norm_act_args(x, weight, bias, residual, activation, pad, eps)
    if _backends.is_exporting():
        backend = "torch"
    else:
        backend = _backends.resolve(backend, x)
    if backend == "torch":
        return instance_norm_act_ref(
            x, weight, bias, activation=activation, negative_slope=negative_slope,
            residual=residual, pad=pad, eps=eps,
        )
    args = (x, weight, bias, residual, activation, float(negative_slope), int(pad), float(eps), backend)
    if torch.compiler.is_compiling():
        # The custom op is what torch.compile traces (fake impl + registered autograd).
        return _fwd_op(*args)[0]
    # Eager: the same kernels through a plain autograd.Function. Calling a Python custom op
    # costs tens of microseconds of dispatcher overhead per call, which is more than the
    # kernel itself for most ResNet shapes on a GPU.
    return _EagerInstanceNormAct.apply(*args)
