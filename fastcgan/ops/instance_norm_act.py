"""``instance_norm_act``: InstanceNorm + affine + activation + residual add + reflection pad, fused.

    y = reflection_pad(act(instance_norm(x) * weight + bias) + residual, pad)

Statistics are per (n, c) plane, biased variance, computed in fp32 whatever the input dtype.
The padding lets the next 3x3 (or 7x7) convolution run with ``padding=0``: the pad that a
ResNet generator otherwise spends a whole extra read+write on is written by the norm kernel.

The op under one name in every layer of the library:

* here          -- :func:`instance_norm_act_ref` (the specification, fallback and export path),
                   the kernel contract in plain torch, the custom ops and :func:`instance_norm_act`;
* ``kernels/instance_norm_act.py``    -- the Triton kernels (``backend="triton"``: GPU, or CPU
                                         under ``TRITON_INTERPRET=1``);
* ``csrc/instance_norm_act*.{h,cpp,cu}`` -- the C++/CUDA kernels in ``fastcgan._C``
                                         (``backend="cpp"`` / ``"cuda"``: CPU / CUDA dispatch keys);
* ``tests/test_instance_norm_act.py``, ``bench/test_instance_norm_act.py``.

Kernel backends go through one pair of ``torch.library`` custom ops
(``fastcgan::instance_norm_act_fwd`` / ``_bwd``) with fake implementations and autograd, so
``torch.compile(fullgraph=True)`` traces through them and ``torch.library.opcheck`` checks them.
Every kernel backend implements the same two functions (:data:`KERNELS`)::

    forward(x, weight, bias, residual, activation, negative_slope, pad, eps) -> (y, mean, rstd)
    backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual)
        -> (dx, dweight, dbias, dresidual)

``activation`` is the name (:class:`fastcgan.ops.Activation`); ``mean``/``rstd`` are ``(N, C)``
in the accumulation dtype (:func:`stats_dtype`: fp64 for fp64 input, else fp32); ``y``, ``dx``
and ``dresidual`` use :func:`output_memory_format` of ``x``; gradients that are not needed (no
weight, no residual) are returned as empty tensors, since custom ops cannot return ``None``.
:func:`contract_forward` / :func:`contract_backward` spell the contract out in plain torch
(backend ``"torch"`` of the custom ops, for tests on any machine).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch import Tensor

from fastcgan.ops import _backends
from fastcgan.ops._activation import (
    ACTIVATIONS,
    Activation,
    activation_label,
    apply_activation,
    parse_activation,
)

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# dtypes the kernels compute on each backend (statistics are fp32 in all of them).
SUPPORTED_DTYPES = {
    "torch": _ALL_FLOATS,
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": _ALL_FLOATS,
    "cpp": _ALL_FLOATS,
}


# --------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------
def _contiguous_grad(grad: Optional[Tensor]) -> Optional[Tensor]:
    return grad.contiguous() if grad is not None else None


def instance_norm_act_ref(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    activation: Union[str, Activation] = "relu",
    negative_slope: float = 0.2,
    residual: Optional[Tensor] = None,
    pad: int = 0,
    eps: float = 1e-5,
) -> Tensor:
    """Pure-PyTorch reference. Built from standard operators only, so ONNX and torch.export
    of a network that uses it hold InstanceNormalization, Relu/LeakyRelu, Add and Pad(reflect).

    Statistics are computed in :func:`stats_dtype` (half-precision input is upcast to fp32; for
    fp32 input the cast is a no-op and does not appear in an exported graph)."""
    dtype = x.dtype
    xf = x.to(stats_dtype(dtype))
    w = weight.to(xf.dtype) if weight is not None else None
    b = bias.to(xf.dtype) if bias is not None else None
    if w is None and b is not None:
        # CUDA's instance_norm backward returns no bias gradient when the weight is absent
        # (seen on an H200, torch 2.11): a unit weight is the same function with every gradient.
        w = torch.ones_like(b)
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
        if y.requires_grad and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            # It is also wrong (torch 2.14, CPU) for a batch of one when the incoming gradient is
            # channels_last, as it is under a channels_last conv: dx off by ~100 % of its scale.
            # An NCHW copy of that gradient is exact. (Compiled code differentiates the
            # decomposed ops instead and is unaffected; export runs without gradients.)
            y.register_hook(_contiguous_grad)
    y = apply_activation(y, activation, negative_slope)
    if residual is not None:
        y = y + residual.to(y.dtype)
    if pad > 0:
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    y = y.to(dtype)
    # The kernels' layout rule (F.instance_norm and reflect F.pad return NCHW). Only a
    # channels_last x pays the copy: an NCHW graph (export) gets no extra op.
    return y.contiguous(memory_format=torch.channels_last) if output_memory_format(x) == torch.channels_last else y


# --------------------------------------------------------------------------------------------
# Validation and layout rules shared by every backend
# --------------------------------------------------------------------------------------------
def output_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format every kernel backend writes ``y``/``dx`` in: channels_last when ``x`` is
    channels_last-contiguous (and not also NCHW-contiguous, e.g. C == 1), else NCHW; the
    ``torch`` reference returns ``y`` in it too."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_instance_norm_act_args(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation: Union[str, Activation],
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
    if not isinstance(activation, Activation) and activation not in ACTIVATIONS:
        raise ValueError(f"instance_norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and not (isinstance(t, Tensor) and t.is_floating_point()):
            raise TypeError(f"instance_norm_act: {name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"instance_norm_act: pad must be a non-negative int, got {pad!r}")
    if pad > 0 and (pad >= h or pad >= w):
        raise ValueError(
            f"instance_norm_act: reflection pad {pad} must be smaller than H and W (got H={h}, W={w})"
        )
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"instance_norm_act: eps must be a positive number, got {eps!r}")


# --------------------------------------------------------------------------------------------
# The kernel contract in plain torch (backend "torch" of the custom ops)
# --------------------------------------------------------------------------------------------
def fold_reflection_pad(dy: Tensor, pad: int) -> Tensor:
    """Adjoint of reflection padding: add each padded-border gradient to the pixel it mirrors."""
    if pad == 0:
        return dy
    h, w = dy.shape[-2] - 2 * pad, dy.shape[-1] - 2 * pad
    # Rows: interior plus the mirrored top rows (pad..1) and bottom rows (h-2..h-1-pad).
    g = dy[..., pad : pad + h, :].clone()
    g[..., 1 : pad + 1, :] += dy[..., :pad, :].flip(-2)
    g[..., h - 1 - pad : h - 1, :] += dy[..., pad + h :, :].flip(-2)
    out = g[..., :, pad : pad + w].clone()
    out[..., :, 1 : pad + 1] += g[..., :, :pad].flip(-1)
    out[..., :, w - 1 - pad : w - 1] += g[..., :, pad + w :].flip(-1)
    return out


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype, also that of the saved ``mean``/``rstd``: fp32 for
    fp16/bf16/fp32, fp64 for fp64 (fp32 statistics would cap an fp64 backward at fp32 accuracy:
    its per-plane sum(dx) = 0 identity held only to ~1e-8)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def contract_forward(x, weight, bias, residual, activation, negative_slope, pad, eps):
    """What the Triton, CUDA and C++ forward kernels compute, step by step in :func:`stats_dtype`."""
    acc = stats_dtype(x.dtype)
    xf = x.to(acc)
    var, mean = torch.var_mean(xf, dim=(2, 3), unbiased=False)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean[:, :, None, None]) * rstd[:, :, None, None]
    z = xhat
    if weight is not None:
        z = z * weight.to(acc)[None, :, None, None]
    if bias is not None:
        z = z + bias.to(acc)[None, :, None, None]
    y = apply_activation(z, activation, negative_slope)
    if residual is not None:
        y = y + residual.to(acc)
    if pad > 0:
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    y = y.to(x.dtype).contiguous(memory_format=output_memory_format(x))
    return y, mean.contiguous(), rstd.contiguous()


def contract_backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual):
    """What the Triton, CUDA and C++ backward kernels compute, step by step in :func:`stats_dtype`."""
    fmt = output_memory_format(x)
    acc = stats_dtype(x.dtype)
    mean, rstd = mean.to(acc), rstd.to(acc)
    g = fold_reflection_pad(dy.to(acc), pad)  # d(loss)/d(act(...) + residual)
    xhat = (x.to(acc) - mean[:, :, None, None]) * rstd[:, :, None, None]
    z = xhat
    if weight is not None:
        z = z * weight.to(acc)[None, :, None, None]
    if bias is not None:
        z = z + bias.to(acc)[None, :, None, None]
    # The derivative at z == 0 is the negative side's, in every backend; ReLU passes g where z
    # is NaN (torch's threshold_backward).
    act = parse_activation(activation)
    if act == Activation.RELU:
        gz = torch.where(z <= 0, torch.zeros_like(g), g)
    elif act == Activation.LEAKY_RELU:
        gz = torch.where(z > 0, g, g * negative_slope)
    else:
        gz = g
    # Custom-op outputs may not alias each other: a fresh (0,) tensor for each unneeded grad.
    dw = (gz * xhat).sum((0, 2, 3)).to(weight.dtype) if weight is not None else x.new_empty((0,))
    if bias is not None:
        db = gz.sum((0, 2, 3)).to(bias.dtype)
    elif weight is not None:
        db = weight.new_zeros(weight.shape)  # unused; keeps the fake's shape contract
    else:
        db = x.new_empty((0,))
    gxhat = gz * weight.to(acc)[None, :, None, None] if weight is not None else gz
    # d/dx of (x - mean) * rstd with biased variance over the plane:
    #   dx = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))
    m1 = gxhat.mean((2, 3), keepdim=True)
    m2 = (gxhat * xhat).mean((2, 3), keepdim=True)
    dx = (rstd[:, :, None, None] * (gxhat - m1 - xhat * m2)).to(x.dtype).contiguous(memory_format=fmt)
    # copy=True: with pad == 0 and fp32, g *is* dy, and an output may not alias an input.
    dres = g.to(dtype=x.dtype, memory_format=fmt, copy=True) if has_residual else x.new_empty((0,))
    return dx, dw, db, dres


# --------------------------------------------------------------------------------------------
# The kernels of each backend
# --------------------------------------------------------------------------------------------
def native_forward(x, weight, bias, residual, activation, negative_slope, pad, eps):
    """``fastcgan._C`` (csrc/instance_norm_act.cpp): the CPU or CUDA kernel, by x's device."""
    return torch.ops.fastcgan.instance_norm_act_native_fwd(
        x, weight, bias, residual, activation, negative_slope, pad, eps
    )


def native_backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual):
    return torch.ops.fastcgan.instance_norm_act_native_bwd(
        dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual
    )


class Kernels(NamedTuple):
    forward: Callable
    backward: Callable


TRITON_MODULE = "fastcgan.kernels.instance_norm_act"

# backend -> its kernels. Triton's are added on first use: importing the module defines the
# @triton.jit functions (no compilation, no CUDA query), and an import error surfaces as the
# backend being unavailable for this op.
KERNELS: dict[str, Kernels] = {
    "torch": Kernels(contract_forward, contract_backward),
    "cpp": Kernels(native_forward, native_backward),
    "cuda": Kernels(native_forward, native_backward),
}


def kernels(backend: str) -> Kernels:
    """The forward/backward pair implementing the kernel contract on ``backend`` (a dict lookup:
    this is on the per-call path)."""
    k = KERNELS.get(backend)
    if k is None:
        if backend != "triton":
            raise ValueError(f"instance_norm_act has no kernels for backend {backend!r}")
        try:
            mod = importlib.import_module(TRITON_MODULE)
        except Exception as e:  # a Triton too old for the language features the kernels use
            raise RuntimeError(
                f"instance_norm_act backend 'triton' is unavailable: {TRITON_MODULE} cannot be imported "
                f"({type(e).__name__}: {e})"
            ) from e
        k = KERNELS[backend] = Kernels(mod.forward, mod.backward)
    return k


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend :func:`instance_norm_act` runs ``x`` on: ``"auto"`` made concrete (the fastest
    usable one for x's device and dtype), an explicit one checked (``RuntimeError`` with the reason
    when it cannot run ``x``)."""
    return _backends.resolve(backend, x, "instance_norm_act", SUPPORTED_DTYPES)


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
    return kernels(backend).forward(x, weight, bias, residual, activation, negative_slope, pad, eps)


@_fwd_op.register_fake
def _fwd_fake(x, weight, bias, residual, activation, negative_slope, pad, eps, backend):
    n, c, h, w = x.shape
    y = x.new_empty((n, c, h + 2 * pad, w + 2 * pad)).contiguous(memory_format=output_memory_format(x))
    stats = x.new_empty((n, c), dtype=stats_dtype(x.dtype))
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
    return kernels(backend).backward(
        dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual
    )


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
    ctx.eps = eps


def _differentiable_backward(ctx, dy: Tensor) -> tuple:
    """The gradients as a differentiable function of the inputs and ``dy``, for a backward asked
    with ``create_graph=True`` (a gradient penalty, a Hessian-vector product): the kernels'
    backward is a fused formula with no graph of its own, so the reference's forward is re-run
    from the saved inputs and differentiated with a graph. Slower, and only on this path: a
    kernel backward here returned zeros or partial second-order gradients without a word."""
    x, weight, bias, _, _ = ctx.saved_tensors
    residual = torch.zeros_like(x, dtype=ctx.residual_dtype, requires_grad=True) if ctx.has_residual else None
    with torch.enable_grad():
        y = instance_norm_act_ref(x, weight, bias, activation=ctx.activation, negative_slope=ctx.negative_slope,
                                  residual=residual, pad=ctx.pad, eps=ctx.eps)
        inputs = [(i, t) for i, t in enumerate((x, weight, bias, residual))
                  if t is not None and (t is residual or ctx.needs_input_grad[i]) and t.requires_grad]
        grads = (torch.autograd.grad(y, [t for _, t in inputs], dy, create_graph=True, allow_unused=True)
                 if inputs else ())
    out: list = [None] * 9
    for (i, _), g in zip(inputs, grads):
        out[i] = g
    return tuple(out)


def _backward(ctx, dy, _dmean, _drstd):
    if torch.is_grad_enabled():  # create_graph=True: the gradients must have a graph themselves
        return _differentiable_backward(ctx, dy)
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
        y, mean, rstd = kernels(backend).forward(x, weight, bias, residual, activation, negative_slope, pad, eps)
        _setup_context(ctx, (x, weight, bias, residual, activation, negative_slope, pad, eps, backend), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: the gradients must have a graph themselves
            return _differentiable_backward(ctx, dy)
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db, dres = kernels(ctx.backend).backward(
            dy, x, weight, bias, mean, rstd, ctx.activation, ctx.negative_slope, ctx.pad, ctx.has_residual
        )
        return (
            dx,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            dres.to(ctx.residual_dtype) if ctx.has_residual else None,
            None, None, None, None, None,
        )


def _kernels_cannot_serve(*tensors: Optional[Tensor]) -> bool:
    """Calls the kernels' autograd.Function cannot take: torch.jit tracing (it records a Python op
    that cannot be saved), torch.func transforms (vmap, grad, jvp: the Function has no
    setup_context/vmap rule) and forward-mode AD (no jvp). The reference runs them instead, so
    they work on every backend (slower; ~0.5 us of checks per eager call otherwise)."""
    if torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return True
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def instance_norm_act(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    activation: Union[str, Activation] = "relu",
    negative_slope: float = 0.2,
    residual: Optional[Tensor] = None,
    pad: int = 0,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """Fused ``reflection_pad(act(instance_norm(x) * weight + bias) + residual, pad)``.

    ``activation``: ``"relu"``, ``"leaky_relu"`` (with ``negative_slope``) or ``"none"``, or the
    :class:`fastcgan.ops.Activation` member. ``backend``: ``"auto"`` (fastest available for
    ``x``'s device and dtype), ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpp"``; see
    :func:`fastcgan.ops.available_backends`. During ONNX export or ``torch.export`` the reference
    is always used, so exported graphs hold standard operators. ``residual`` (x's shape, any float
    dtype) is added in the statistics dtype, before ``y`` is rounded to x's dtype."""
    check_instance_norm_act_args(x, weight, bias, residual, activation, pad, eps)
    if not (isinstance(negative_slope, (int, float)) and not isinstance(negative_slope, bool)
            and math.isfinite(negative_slope)):
        raise ValueError(f"instance_norm_act: negative_slope must be a finite number, got {negative_slope!r}")
    activation = activation_label(activation)
    if _backends.is_exporting():
        backend = "torch"
    else:
        backend = resolve_backend(backend, x)
        if (backend != "torch" and not torch.compiler.is_compiling()
                and _kernels_cannot_serve(x, weight, bias, residual)):
            backend = "torch"
        elif backend in ("cpp", "cuda") and residual is not None and residual.dtype != x.dtype:
            # The native kernels read the residual in x's dtype (an fp32 residual with bf16 x:
            # one bf16 step off in a third of the outputs); the contract adds it in fp32. Models
            # never mix them: such a call runs the reference.
            backend = "torch"
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
