from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastcgan.ops import Activation, activation_label, instance_norm_act


class InstanceNormAct(nn.Module):
    """InstanceNorm2d (+ optional affine) + activation (+ residual) (+ reflection pad for the next conv).

    With ``affine=False`` it has no parameters and no buffers, like the official CycleGAN's
    ``InstanceNorm2d(affine=False, track_running_stats=False)``, so state dicts line up."""

    def __init__(
        self,
        num_features: int,
        activation: Union[str, Activation] = "relu",
        *,
        negative_slope: float = 0.2,
        affine: bool = False,
        pad: int = 0,
        eps: float = 1e-5,
        backend: str = "auto",
    ):
        super().__init__()
        from fastcgan.ops._backends import BACKENDS

        # Validated here, not at the first forward (the op checks the same against x's shape).
        if not (isinstance(num_features, int) and not isinstance(num_features, bool) and num_features >= 1):
            raise ValueError(f"InstanceNormAct: num_features must be an int >= 1, got {num_features!r}")
        if not (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0):
            raise ValueError(f"InstanceNormAct: pad must be a non-negative int, got {pad!r}")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
            raise ValueError(f"InstanceNormAct: eps must be a positive number, got {eps!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"InstanceNormAct: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
        self.num_features = num_features
        self.activation = activation_label(activation)
        self.negative_slope = negative_slope
        self.pad = pad
        self.eps = eps
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return instance_norm_act(
            x, self.weight, self.bias, activation=self.activation, negative_slope=self.negative_slope,
            residual=residual, pad=self.pad, eps=self.eps, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, activation={self.activation}, affine={self.weight is not None}, "
            f"pad={self.pad}, backend={self.backend}"
        )


class ReflectionResidualBlock(nn.Module):
    """The official ResnetBlock (ReflPad-Conv3-IN-ReLU-(Dropout)-ReflPad-Conv3-IN, plus skip) with
    every pad fused into a norm kernel.

    Input: the block's input **already reflection-padded by 1** (``xp``); the skip connection
    reads its interior view, so no unpadded copy is kept. Output: ``x + block(x)`` reflection-
    padded by ``out_pad`` (1 when another block follows, 0 for the last), so a chain of blocks
    never runs a separate ReflectionPad2d."""

    def __init__(self, dim: int, *, dropout: float = 0.0, out_pad: int = 1, backend: str = "auto"):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=0, bias=True)
        self.norm1 = InstanceNormAct(dim, "relu", pad=1, backend=backend)
        self.dropout = GlobalBatchDropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=0, bias=True)
        self.norm2 = InstanceNormAct(dim, "none", pad=out_pad, backend=backend)

    def forward(self, xp: Tensor) -> Tensor:
        x = xp[:, :, 1:-1, 1:-1]
        h = self.norm1(self.conv1(xp))
        if self.dropout is not None and self.training and self.dropout.p > 0:
            h = reflected_dropout(h, self.dropout.p, pad=1, shard=self.dropout.batch_shard)
        return self.norm2(self.conv2(h), residual=x)


BatchShard = tuple[int, int, int]  # (rank, world size, images per process in a step)


def keep_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype, device,
              shard: Optional[BatchShard] = None) -> Tensor:
    """A Bernoulli(1 - p) keep-mask of ``shape`` (rows first), drawn like ``F.dropout``'s on the CPU.

    Under DDP (``shard``: this process's rank, the world size and its images per step) the mask is
    drawn for the *global* batch and this process keeps its rows: every process is seeded alike,
    so without this each would draw the same masks for its own images (image i and image i + b
    dropping the same units) and N processes would train something else than one process with
    the global batch. A call's rows are ``groups`` blocks of the process's ``b`` images ([A; B]:
    2), laid out as one process lays out the global batch; other row counts draw locally."""
    rows = shape[0]
    if shard is None or shard[1] == 1 or rows % shard[2]:
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p)
    rank, world, b = shard
    groups = rows // b
    full = torch.empty((groups, b * world, *shape[1:]), dtype=dtype, device=device).bernoulli_(1.0 - p)
    return full[:, rank * b:(rank + 1) * b].reshape(shape)


class GlobalBatchDropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from :func:`keep_mask`: under DDP it is drawn for the global
    batch (:func:`set_batch_shard`), so N processes drop what one process drops. No parameters."""

    batch_shard: Optional[BatchShard] = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        return x * keep_mask(tuple(x.shape), self.p, x.dtype, x.device, self.batch_shard) * (1.0 / (1.0 - self.p))


def reflected_dropout(hp: Tensor, p: float, pad: int, shard: Optional[BatchShard] = None) -> Tensor:
    """Dropout on a tensor already reflection-padded by ``pad``, equal in distribution to the
    official order (Dropout, *then* ReflectionPad2d): one keep-mask is drawn for the interior and
    reflection-padded, so a mirrored border pixel is dropped exactly when its source pixel is
    (dropping the padded tensor independently would decorrelate the border from the interior).
    On CPU the mask is drawn like ``F.dropout``'s, so a seeded run matches the official block;
    ``shard``: :func:`keep_mask`."""
    if p >= 1.0:
        return torch.zeros_like(hp)
    n, c, h, w = hp.shape
    keep = keep_mask((n, c, h - 2 * pad, w - 2 * pad), p, hp.dtype, hp.device, shard)
    keep = nn.functional.pad(keep, (pad, pad, pad, pad), mode="reflect")
    return hp * keep * (1.0 / (1.0 - p))


def set_batch_shard(module: nn.Module, shard: Optional[BatchShard]) -> nn.Module:
    """Tell every :class:`GlobalBatchDropout` in ``module`` this process's share of the global
    batch (``(rank, world_size, images per process)``; None: one process)."""
    for m in module.modules():
        if isinstance(m, GlobalBatchDropout):
            m.batch_shard = shard
    return module


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Point every fastcgan layer in ``module`` at ``backend`` (``auto``/``torch``/``triton``/``cuda``/``cpp``).
    An unknown name is a ValueError here, not at the first forward."""
    from fastcgan.ops._backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    for m in module.modules():
        # uses_op_backend: layers defined elsewhere that call the ops too (models' BatchNormAct).
        if isinstance(m, InstanceNormAct) or getattr(type(m), "uses_op_backend", False):
            m.backend = backend
    return module
