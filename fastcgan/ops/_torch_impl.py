"""The kernel contract (``forward``/``backward`` with saved mean/rstd) written in plain torch.

It is what the Triton, CUDA and C++ kernels compute, spelled out step by step in fp32, and it
lets the custom-op path (autograd, fake tensors, opcheck, torch.compile) be tested on any
machine. Layers never use it: ``backend="torch"`` calls the reference directly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcgan.ops.instance_norm_act import output_memory_format


def _act(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    return z


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


def forward(x, weight, bias, residual, activation, negative_slope, pad, eps):
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), unbiased=False)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean[:, :, None, None]) * rstd[:, :, None, None]
    z = xhat
    if weight is not None:
        z = z * weight.float()[None, :, None, None]
    if bias is not None:
        z = z + bias.float()[None, :, None, None]
    y = _act(z, activation, negative_slope)
    if residual is not None:
        y = y + residual.float()
    if pad > 0:
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    y = y.to(x.dtype).contiguous(memory_format=output_memory_format(x))
    return y, mean.contiguous(), rstd.contiguous()


def backward(dy, x, weight: Optional[Tensor], bias, mean, rstd, activation, negative_slope, pad, has_residual):
    fmt = output_memory_format(x)
    g = fold_reflection_pad(dy.float(), pad)  # d(loss)/d(act(...) + residual)
    xhat = (x.float() - mean[:, :, None, None]) * rstd[:, :, None, None]
    z = xhat
    if weight is not None:
        z = z * weight.float()[None, :, None, None]
    if bias is not None:
        z = z + bias.float()[None, :, None, None]
    if activation == "relu":
        gz = torch.where(z > 0, g, torch.zeros_like(g))
    elif activation == "leaky_relu":
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
    gxhat = gz * weight.float()[None, :, None, None] if weight is not None else gz
    # d/dx of (x - mean) * rstd with biased variance over the plane:
    #   dx = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))
    m1 = gxhat.mean((2, 3), keepdim=True)
    m2 = (gxhat * xhat).mean((2, 3), keepdim=True)
    dx = (rstd[:, :, None, None] * (gxhat - m1 - xhat * m2)).to(x.dtype).contiguous(memory_format=fmt)
    # copy=True: with pad == 0 and fp32, g *is* dy, and an output may not alias an input.
    dres = g.to(dtype=x.dtype, memory_format=fmt, copy=True) if has_residual else x.new_empty((0,))
    return dx, dw, db, dres
