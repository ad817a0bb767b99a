"""Triton kernels of ``instance_norm_act`` (the ``"triton"`` backend).

Implements the kernel contract of :mod:`fastcgan.ops.instance_norm_act`::

    forward(x, weight, bias, residual, activation, negative_slope, pad, eps) -> (y, mean, rstd)
    backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual)
        -> (dx, dweight, dbias, dresidual)

Layout. Every tensor is addressed as ``(N, C, HW)`` with three strides, so NCHW
(``stride_hw == 1``) and channels_last (``stride_c == 1``, ``stride_hw == C``) run the same
kernels; Triton specialises a stride equal to 1, which lets the compiler vectorise loads along
whichever axis is contiguous. A program owns a tile of ``BLOCK_C`` channels of one sample and
walks a chunk of the plane in ``BLOCK_C x BLOCK_HW`` tiles: for NCHW the tile is long along HW
(and several small planes share a program), for channels_last it is wide along C (coalesced
loads along C). Tensors whose H and W strides cannot be merged into one HW stride (exotic
views such as ``x[..., ::2]`` or a transposed H/W) are copied with ``.contiguous()`` first.

Small planes: one pass. When a whole plane of ``BLOCK_C`` channels fits in one program's
registers (``next_pow2(H*W) <= _ONE_PASS_MAX`` elements, 8192 with padding), forward and backward
are one kernel each: the program loads x (and dy) once, reduces, and writes y (dx) from the
values it holds -- one read and one write per pass, two launches per forward+backward instead
of four to six. That is every ResNet-9 plane at 256x256 input but the two 256x256 ones (its
padded norms are at 64x64). Fewer, longer programs are fine there: at these sizes the time is
launch latency, not bandwidth.

``FASTCGAN_ONE_PASS=0`` (also ``false`` / ``off`` / ``no``) turns the one-pass kernels off in
this backend and in the native CUDA one (``csrc/instance_norm_act_cuda.cu``): every plane then
takes the split kernels below. Read once, at the first launch of the process. Why a switch: on
channels_last at batch 1 the planner packs few channels per program (``BLOCK_C`` 1 at
1x128x128x128 and 1x256x64x64, 2 at batch 8), so a warp's loads are C elements apart -- one
useful bf16 value per 32-byte sector -- where the split kernels tile 64 channels wide. Which is
faster there is measured by ``bench/gpu_check.sh`` (stage 3 times those rows both ways).

Work split. Larger planes are split into ``K`` chunks so that one 256x256 plane per channel
(batch 1) fills the GPU as well as batch 8 does; the chunk partials are merged by the next
kernel, never on the host (inline when the partial tile is small, otherwise by one tiny
``_merge_*`` kernel launched in between, so that hundreds of programs do not each re-read
thousands of partials):

    forward:  stats kernel  (N*Cblocks, K)   per-chunk mean and M2 (Chan/Welford merge of tiles)
              apply kernel  (N*Cblocks, K')  merges the K partials exactly, writes mean/rstd,
                                             y = pad(act((x-mean)*rstd*w+b) + residual)
    backward: reduce kernel (N*Cblocks, K)   per-chunk sum(gz), sum(gz*xhat)
              dx kernel     (N*Cblocks, K)   sums the partials, writes dx (and dresidual)

where gz = fold_pad(dy) * act'(z). Traffic: forward reads x twice (+ residual once) and writes
y once; backward reads dy and x twice and writes dx (+ dresidual). dweight/dbias are the sums
of the per-(sample, chunk) partials over N and K (one small torch reduction, deterministic: no
atomics).

Devices: Triton launches on the *current* CUDA device and stream, so every launch runs under a
device guard for its tensors' device (``_device_guard``): a tensor on cuda:1 while the current
device is 0 (``--device cuda:1 --no-compile``, the translator) launches there.

Numerics: all arithmetic in fp32, cast on store. Statistics never use E[x^2]-E[x]^2: each
tile's mean and centred M2 are computed exactly and merged with Chan's formula; chunk
partials are merged with the exact two-level formula M2 = sum(M2_k + n_k (mean_k - mean)^2).
Every statistic is of x - x0, x0 the plane's first value; only the mean written out adds x0
back. A plane far from zero relative to its spread (x = 1000 + 0.01 * noise) otherwise took M2
around means rounded at 1000's ulp (0.6% of the spread): rstd 1.3e-5 off and dx 2.3-2.9x the
fp32 reference's error; x - x0 is exact there (Sterbenz).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcgan.ops._activation import Activation, parse_activation
from fastcgan.ops.instance_norm_act import SUPPORTED_DTYPES, output_memory_format

# The activation codes (fastcgan.ops.Activation) as compile-time constants: ACT is a
# tl.constexpr, so each activation compiles to its own binary with the branch folded away.
_RELU: tl.constexpr = tl.constexpr(int(Activation.RELU))
_LEAKY_RELU: tl.constexpr = tl.constexpr(int(Activation.LEAKY_RELU))


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _act_fwd(z, slope, ACT: tl.constexpr):
    if ACT == _RELU:
        z = tl.where(z <= 0, 0.0, z)  # a NaN passes through, as torch.relu's (tl.maximum dropped it)
    elif ACT == _LEAKY_RELU:
        z = tl.where(z > 0, z, z * slope)
    return z


@triton.jit
def _act_bwd(g, z, slope, ACT: tl.constexpr):
    # Same convention as the reference: the derivative at z == 0 is the negative side's.
    if ACT == _RELU:
        g = tl.where(z <= 0, 0.0, g)  # torch's threshold_backward: g where z is NaN
    elif ACT == _LEAKY_RELU:
        g = tl.where(z > 0, g, g * slope)
    return g


@triton.jit
def _affine(Wt, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """(weight, bias) of channels ``c`` in fp32: ones / zeros where the layer has none."""
    if HAS_W:
        w = tl.load(Wt + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
    return w, b


@triton.jit
def _first_value(X, n, c, cmask, s_xn, s_xc):
    """x[n, c, 0, 0] per channel of the block: the shift the statistics are taken from."""
    return tl.load(X + n.to(tl.int64) * s_xn + c.to(tl.int64) * s_xc, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _mirrors(hw, H, W, PAD: tl.constexpr):
    """Padded rows r0..r2 and columns c0..c2 that hold a copy of interior pixel ``hw`` (flat
    index into H x W): r0 = i+PAD always, r1 = PAD-i if 1<=i<=PAD (valid: vr1), r2 =
    PAD+2(H-1)-i if H-1-PAD<=i<=H-2 (vr2); likewise for columns."""
    i = hw // W
    j = hw - i * W
    r0 = i + PAD
    r1 = PAD - i
    r2 = PAD + 2 * (H - 1) - i
    vr1 = (i >= 1) & (i <= PAD)
    vr2 = (i >= H - 1 - PAD) & (i <= H - 2)
    c0 = j + PAD
    c1 = PAD - j
    c2 = PAD + 2 * (W - 1) - j
    vc1 = (j >= 1) & (j <= PAD)
    vc2 = (j >= W - 1 - PAD) & (j <= W - 2)
    return r0, r1, r2, vr1, vr2, c0, c1, c2, vc1, vc2


@triton.jit
def _fold_pad(dy_base, hw, mask, H, W, Wp, s_dyhw, PAD: tl.constexpr):
    """Adjoint of reflection padding at interior pixels ``hw`` (flat index into H x W).

    Pixel (i, j) of the input appears in the padded output at rows
    {i+PAD} U {PAD-i if 1<=i<=PAD} U {PAD+2(H-1)-i if H-1-PAD<=i<=H-2}, and likewise for
    columns; its gradient is the sum of dy over the product of the two sets (up to 3x3 terms,
    the mirrored ones masked off away from the border)."""
    if PAD == 0:
        g = tl.load(dy_base + hw[None, :] * s_dyhw, mask=mask, other=0.0).to(tl.float32)
    else:
        r0, r1, r2, vr1, vr2, c0, c1, c2, vc1, vc2 = _mirrors(hw, H, W, PAD)
        g = tl.load(dy_base + (r0 * Wp + c0)[None, :] * s_dyhw, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(dy_base + (r0 * Wp + c1)[None, :] * s_dyhw, mask=mask & vc1[None, :], other=0.0).to(tl.float32)
        g += tl.load(dy_base + (r0 * Wp + c2)[None, :] * s_dyhw, mask=mask & vc2[None, :], other=0.0).to(tl.float32)
        g += tl.load(dy_base + (r1 * Wp + c0)[None, :] * s_dyhw, mask=mask & vr1[None, :], other=0.0).to(tl.float32)
        g += tl.load(
            dy_base + (r1 * Wp + c1)[None, :] * s_dyhw, mask=mask & (vr1 & vc1)[None, :], other=0.0
        ).to(tl.float32)
        g += tl.load(
            dy_base + (r1 * Wp + c2)[None, :] * s_dyhw, mask=mask & (vr1 & vc2)[None, :], other=0.0
        ).to(tl.float32)
        g += tl.load(dy_base + (r2 * Wp + c0)[None, :] * s_dyhw, mask=mask & vr2[None, :], other=0.0).to(tl.float32)
        g += tl.load(
            dy_base + (r2 * Wp + c1)[None, :] * s_dyhw, mask=mask & (vr2 & vc1)[None, :], other=0.0
        ).to(tl.float32)
        g += tl.load(
            dy_base + (r2 * Wp + c2)[None, :] * s_dyhw, mask=mask & (vr2 & vc2)[None, :], other=0.0
        ).to(tl.float32)
    return g


@triton.jit
def _store_padded(y_base, hw, mask, v, H, W, Wp, s_yhw, PAD: tl.constexpr):
    """Reflection padding by scatter: store the value of interior pixel ``hw`` at every padded
    position that mirrors it (the transpose of ``_fold_pad``'s gather; same index sets)."""
    if PAD == 0:
        tl.store(y_base + hw[None, :] * s_yhw, v, mask=mask)
    else:
        r0, r1, r2, vr1, vr2, c0, c1, c2, vc1, vc2 = _mirrors(hw, H, W, PAD)
        tl.store(y_base + (r0 * Wp + c0)[None, :] * s_yhw, v, mask=mask)
        tl.store(y_base + (r0 * Wp + c1)[None, :] * s_yhw, v, mask=mask & vc1[None, :])
        tl.store(y_base + (r0 * Wp + c2)[None, :] * s_yhw, v, mask=mask & vc2[None, :])
        tl.store(y_base + (r1 * Wp + c0)[None, :] * s_yhw, v, mask=mask & vr1[None, :])
        tl.store(y_base + (r1 * Wp + c1)[None, :] * s_yhw, v, mask=mask & (vr1 & vc1)[None, :])
        tl.store(y_base + (r1 * Wp + c2)[None, :] * s_yhw, v, mask=mask & (vr1 & vc2)[None, :])
        tl.store(y_base + (r2 * Wp + c0)[None, :] * s_yhw, v, mask=mask & vr2[None, :])
        tl.store(y_base + (r2 * Wp + c1)[None, :] * s_yhw, v, mask=mask & (vr2 & vc1)[None, :])
        tl.store(y_base + (r2 * Wp + c2)[None, :] * s_yhw, v, mask=mask & (vr2 & vc2)[None, :])


# --------------------------------------------------------------------------------------------
# One-pass kernels (a whole plane per program)
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_one_pass_kernel(
    X, R, Wt, B, Y, MEAN, RSTD,
    C, H, W, HW, Wp,
    s_xn, s_xc, s_xhw, s_rn, s_rc, s_rhw, s_yn, s_yc, s_yhw,
    n_cblocks, eps, slope,
    PAD: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """x read once: exact two-pass statistics on the values in registers (mean, then the sum of
    squared deviations), then the padded output scattered from the same values."""
    pid = tl.program_id(0)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    hw = tl.arange(0, BLOCK_HW)
    m = cmask[:, None] & (hw < HW)[None, :]
    x_base = X + n.to(tl.int64) * s_xn + c.to(tl.int64)[:, None] * s_xc
    xv = tl.load(x_base + hw[None, :] * s_xhw, mask=m, other=0.0).to(tl.float32)
    x0 = _first_value(X, n, c, cmask, s_xn, s_xc)
    xs = tl.where(m, xv - x0[:, None], 0.0)  # deviations from the plane's first value
    hw_f = HW * 1.0  # not HW.to(): an int argument equal to 1 arrives as a constexpr
    off = tl.sum(xs, axis=1) / hw_f
    d = tl.where(m, xs - off[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / hw_f + eps)
    tl.store(MEAN + n * C + c, x0 + off, mask=cmask)
    tl.store(RSTD + n * C + c, rstd, mask=cmask)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(Wt + c, mask=cmask, other=0.0).to(tl.float32)
    z = d * scale[:, None]
    if HAS_B:
        z += tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    yv = _act_fwd(z, slope, ACT)
    if HAS_R:
        r_base = R + n.to(tl.int64) * s_rn + c.to(tl.int64)[:, None] * s_rc
        yv += tl.load(r_base + hw[None, :] * s_rhw, mask=m, other=0.0).to(tl.float32)
    y_base = Y + n.to(tl.int64) * s_yn + c.to(tl.int64)[:, None] * s_yc
    _store_padded(y_base, hw, m, yv.to(Y.dtype.element_ty), H, W, Wp, s_yhw, PAD)


@triton.jit
def _bwd_one_pass_kernel(
    DY, X, Wt, B, MEAN, RSTD, PSG, PSGX, DX, DRES,
    C, H, W, HW, Wp,
    s_dyn, s_dyc, s_dyhw, s_xn, s_xc, s_xhw, s_dxn, s_dxc, s_dxhw,
    n_cblocks, slope,
    PAD: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dy (folded) and x read once: the plane sums of gz and gz * xhat, then dx (and dresidual)
    from the values in registers. The sums are stored per (sample, channel) for dweight/dbias."""
    pid = tl.program_id(0)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    hw = tl.arange(0, BLOCK_HW)
    m = cmask[:, None] & (hw < HW)[None, :]
    mean = tl.load(MEAN + n * C + c, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + n * C + c, mask=cmask, other=0.0)
    w, b = _affine(Wt, B, c, cmask, HAS_W, HAS_B, BLOCK_C)
    x_base = X + n.to(tl.int64) * s_xn + c.to(tl.int64)[:, None] * s_xc
    dy_base = DY + n.to(tl.int64) * s_dyn + c.to(tl.int64)[:, None] * s_dyc
    g = _fold_pad(dy_base, hw, m, H, W, Wp, s_dyhw, PAD)
    # Masked lanes read the plane's mean, so their xhat is 0, not (0 - mean) * rstd, which
    # overflows to inf for |mean| ~ 1e36 (0 * inf = NaN sums). (A select on xhat instead spilled
    # this kernel's registers on sm90 at 128x128 fp32.)
    xv = tl.load(x_base + hw[None, :] * s_xhw, mask=m, other=mean[:, None]).to(tl.float32)
    xhat = (xv - mean[:, None]) * rstd[:, None]
    gz = _act_bwd(g, xhat * w[:, None] + b[:, None], slope, ACT)
    gz = tl.where(m, gz, 0.0)
    sum_g = tl.sum(gz, axis=1)
    sum_gx = tl.sum(gz * xhat, axis=1)
    tl.store(PSG + n * C + c, sum_g, mask=cmask)
    tl.store(PSGX + n * C + c, sum_gx, mask=cmask)
    hw_f = HW * 1.0
    dx = (rstd * w)[:, None] * (gz - (sum_g / hw_f)[:, None] - xhat * (sum_gx / hw_f)[:, None])
    off = n.to(tl.int64) * s_dxn + c.to(tl.int64)[:, None] * s_dxc + hw[None, :] * s_dxhw
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
    if HAS_R:
        tl.store(DRES + off, g.to(DRES.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Split-plane forward kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_stats_kernel(
    X, PMEAN, PM2,
    C, HW, s_xn, s_xc, s_xhw,
    n_cblocks, CHUNK, TILES, K,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per (sample, channel block, chunk): mean (an offset from the plane's first value) and M2
    of the chunk, tiles merged with Chan's formula (each tile's own mean and centred M2 are
    exact in fp32)."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = X + n.to(tl.int64) * s_xn + c.to(tl.int64)[:, None] * s_xc
    x0 = _first_value(X, n, c, cmask, s_xn, s_xc)
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, TILES):
        s = start + t * BLOCK_HW
        hw = s + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw < end)[None, :]
        xv = tl.load(base + hw[None, :] * s_xhw, mask=m, other=0.0).to(tl.float32)
        xs = tl.where(m, xv - x0[:, None], 0.0)
        nt = tl.minimum(tl.maximum(end - s, 0), BLOCK_HW).to(tl.float32)
        tmean = tl.sum(xs, axis=1) / tl.maximum(nt, 1.0)
        d = tl.where(m, xs - tmean[:, None], 0.0)
        tm2 = tl.sum(d * d, axis=1)
        ncnt = cnt + nt
        delta = tmean - mean
        frac = nt / ncnt
        mean = mean + delta * frac
        m2 = m2 + tm2 + delta * delta * cnt * frac
        cnt = ncnt
    off = (n * C + c) * K + k
    tl.store(PMEAN + off, mean, mask=cmask)
    tl.store(PM2 + off, m2, mask=cmask)


@triton.jit
def _fwd_apply_kernel(
    X, R, Wt, B, Y, PMEAN, PM2, MEAN, RSTD,
    C, H, W, HW, Wp, HWp,
    s_xn, s_xc, s_xhw, s_rn, s_rc, s_rhw, s_yn, s_yc, s_yhw,
    n_cblocks, CHUNK, K, OCHUNK, OTILES, eps, slope,
    PAD: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Merge the K chunk statistics of each plane, then write a chunk of the (padded) output.

    Programs walk the *output* plane; a padded position reads its mirrored source pixel, so the
    border pixels of x are read twice (a few percent of the plane)."""
    pid = tl.program_id(0)
    ko = tl.program_id(1)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # Exact merge of the chunk partials (offsets from x0): mean = sum n_k mean_k / HW,
    # M2 = sum M2_k + n_k (mean_k - mean)^2.
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    pm_mask = cmask[:, None] & kmask[None, :]
    poff = (n * C + c)[:, None] * K + kk[None, :]
    pmean = tl.load(PMEAN + poff, mask=pm_mask, other=0.0)
    pm2 = tl.load(PM2 + poff, mask=pm_mask, other=0.0)
    nk = tl.where(kmask, tl.minimum(HW - kk * CHUNK, CHUNK), 0).to(tl.float32)
    hw_f = HW * 1.0  # not HW.to(): an int argument equal to 1 arrives as a constexpr
    mean = tl.sum(pmean * nk[None, :], axis=1) / hw_f
    d = tl.where(pm_mask, pmean - mean[:, None], 0.0)
    var = tl.sum(pm2 + nk[None, :] * d * d, axis=1) / hw_f
    var = tl.maximum(var, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    mean += _first_value(X, n, c, cmask, s_xn, s_xc)
    tl.store(MEAN + n * C + c, mean, mask=cmask & (ko == 0))
    tl.store(RSTD + n * C + c, rstd, mask=cmask & (ko == 0))

    scale = rstd
    if HAS_W:
        scale = scale * tl.load(Wt + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        shift = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)

    x_base = X + n.to(tl.int64) * s_xn + c.to(tl.int64)[:, None] * s_xc
    r_base = R + n.to(tl.int64) * s_rn + c.to(tl.int64)[:, None] * s_rc
    y_base = Y + n.to(tl.int64) * s_yn + c.to(tl.int64)[:, None] * s_yc
    ostart = ko * OCHUNK
    oend = tl.minimum(ostart + OCHUNK, HWp)
    for t in range(0, OTILES):
        op = ostart + t * BLOCK_HW + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (op < oend)[None, :]
        if PAD > 0:
            ho = op // Wp
            wo = op - ho * Wp
            hi = ho - PAD
            hi = tl.where(hi < 0, -hi, hi)
            hi = tl.where(hi >= H, 2 * (H - 1) - hi, hi)
            wi = wo - PAD
            wi = tl.where(wi < 0, -wi, wi)
            wi = tl.where(wi >= W, 2 * (W - 1) - wi, wi)
            src = hi * W + wi
        else:
            src = op
        xv = tl.load(x_base + src[None, :] * s_xhw, mask=m, other=0.0).to(tl.float32)
        z = (xv - mean[:, None]) * scale[:, None] + shift[:, None]
        yv = _act_fwd(z, slope, ACT)
        if HAS_R:
            yv += tl.load(r_base + src[None, :] * s_rhw, mask=m, other=0.0).to(tl.float32)
        tl.store(y_base + op[None, :] * s_yhw, yv.to(Y.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Split-plane backward kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_reduce_kernel(
    DY, X, Wt, B, MEAN, RSTD, PSG, PSGX,
    C, H, W, HW, Wp,
    s_dyn, s_dyc, s_dyhw, s_xn, s_xc, s_xhw,
    n_cblocks, CHUNK, TILES, K, slope,
    PAD: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per (sample, channel block, chunk): sum(gz) and sum(gz * xhat), gz = fold(dy) * act'(z)."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(MEAN + n * C + c, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + n * C + c, mask=cmask, other=0.0)
    w, b = _affine(Wt, B, c, cmask, HAS_W, HAS_B, BLOCK_C)
    x_base = X + n.to(tl.int64) * s_xn + c.to(tl.int64)[:, None] * s_xc
    dy_base = DY + n.to(tl.int64) * s_dyn + c.to(tl.int64)[:, None] * s_dyc
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, TILES):
        hw = start + t * BLOCK_HW + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw < end)[None, :]
        g = _fold_pad(dy_base, hw, m, H, W, Wp, s_dyhw, PAD)
        xv = tl.load(x_base + hw[None, :] * s_xhw, mask=m, other=mean[:, None]).to(tl.float32)  # see above
        xhat = (xv - mean[:, None]) * rstd[:, None]
        z = xhat * w[:, None] + b[:, None]
        gz = _act_bwd(g, z, slope, ACT)
        gz = tl.where(m, gz, 0.0)
        acc_g += tl.sum(gz, axis=1)
        acc_gx += tl.sum(gz * xhat, axis=1)
    off = (n * C + c) * K + k
    tl.store(PSG + off, acc_g, mask=cmask)
    tl.store(PSGX + off, acc_gx, mask=cmask)


@triton.jit
def _bwd_dx_kernel(
    DY, X, Wt, B, MEAN, RSTD, PSG, PSGX, DX, DRES,
    C, H, W, HW, Wp,
    s_dyn, s_dyc, s_dyhw, s_xn, s_xc, s_xhw, s_dxn, s_dxc, s_dxhw,
    n_cblocks, CHUNK, TILES, K, slope,
    PAD: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = rstd * w * (gz - mean(gz) - xhat * mean(gz * xhat)); dresidual = fold(dy).

    ``DX`` and ``DRES`` share one layout (strides ``s_dx*``)."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    kk = tl.arange(0, BLOCK_K)
    pmask = cmask[:, None] & (kk < K)[None, :]
    poff = (n * C + c)[:, None] * K + kk[None, :]
    hw_f = HW * 1.0  # not HW.to(): an int argument equal to 1 arrives as a constexpr
    m_g = tl.sum(tl.load(PSG + poff, mask=pmask, other=0.0), axis=1) / hw_f
    m_gx = tl.sum(tl.load(PSGX + poff, mask=pmask, other=0.0), axis=1) / hw_f
    mean = tl.load(MEAN + n * C + c, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + n * C + c, mask=cmask, other=0.0)
    w, b = _affine(Wt, B, c, cmask, HAS_W, HAS_B, BLOCK_C)
    coef = rstd * w
    x_base = X + n.to(tl.int64) * s_xn + c.to(tl.int64)[:, None] * s_xc
    dy_base = DY + n.to(tl.int64) * s_dyn + c.to(tl.int64)[:, None] * s_dyc
    dx_off = n.to(tl.int64) * s_dxn + c.to(tl.int64)[:, None] * s_dxc
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for t in range(0, TILES):
        hw = start + t * BLOCK_HW + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw < end)[None, :]
        g = _fold_pad(dy_base, hw, m, H, W, Wp, s_dyhw, PAD)
        xv = tl.load(x_base + hw[None, :] * s_xhw, mask=m, other=0.0).to(tl.float32)
        xhat = (xv - mean[:, None]) * rstd[:, None]
        z = xhat * w[:, None] + b[:, None]
        gz = _act_bwd(g, z, slope, ACT)
        dx = coef[:, None] * (gz - m_g[:, None] - xhat * m_gx[:, None])
        off = dx_off + hw[None, :] * s_dxhw
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
        if HAS_R:
            tl.store(DRES + off, g.to(DRES.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Partial merges (only when a plane is split into many chunks)
# --------------------------------------------------------------------------------------------
@triton.jit
def _merge_stats_kernel(
    PMEAN, PM2, OMEAN, OM2, NC, HW, CHUNK, K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(N*C, K) chunk means/M2 -> (N*C, 1), with the same exact two-level formula as the apply
    kernel's inline merge: mean = sum n_k mean_k / HW, M2 = sum M2_k + n_k (mean_k - mean)^2."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < NC
    hw_f = HW * 1.0  # not HW.to(): an int argument equal to 1 arrives as a constexpr
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        m = rmask[:, None] & kmask[None, :]
        nk = tl.where(kmask, tl.minimum(HW - kk * CHUNK, CHUNK), 0).to(tl.float32)
        pm = tl.load(PMEAN + r[:, None] * K + kk[None, :], mask=m, other=0.0)
        acc += tl.sum(pm * nk[None, :], axis=1)
    mean = acc / hw_f
    m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        m = rmask[:, None] & kmask[None, :]
        nk = tl.where(kmask, tl.minimum(HW - kk * CHUNK, CHUNK), 0).to(tl.float32)
        pm = tl.load(PMEAN + r[:, None] * K + kk[None, :], mask=m, other=0.0)
        pv = tl.load(PM2 + r[:, None] * K + kk[None, :], mask=m, other=0.0)
        d = tl.where(m, pm - mean[:, None], 0.0)
        m2 += tl.sum(pv + nk[None, :] * d * d, axis=1)
    tl.store(OMEAN + r, mean, mask=rmask)
    tl.store(OM2 + r, m2, mask=rmask)


@triton.jit
def _merge_sums_kernel(PA, PB, OA, OB, NC, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(N*C, K) chunk sums -> (N*C, 1) for two buffers (the backward's sum(gz), sum(gz*xhat))."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < NC
    acc_a = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (kk < K)[None, :]
        off = r[:, None] * K + kk[None, :]
        acc_a += tl.sum(tl.load(PA + off, mask=m, other=0.0), axis=1)
        acc_b += tl.sum(tl.load(PB + off, mask=m, other=0.0), axis=1)
    tl.store(OA + r, acc_a, mask=rmask)
    tl.store(OB + r, acc_b, mask=rmask)


# --------------------------------------------------------------------------------------------
# Host side: layout normalisation and launch heuristics
# --------------------------------------------------------------------------------------------
def _hw_stride(t: Tensor) -> Optional[int]:
    """The single stride of the flattened H*W axis, or None if H and W cannot be merged."""
    _, _, h, w = t.shape
    sh, sw = t.stride(2), t.stride(3)
    if h == 1:
        return sw
    if w == 1:
        return sh
    return sw if sh == w * sw else None


def _as_nchw_view(t: Tensor) -> tuple[Tensor, int, int, int]:
    """``t`` (copied when its H/W strides are exotic) and its (n, c, hw) strides."""
    s = _hw_stride(t)
    if s is None:
        # e.g. a strided slice along W or a transposed H/W: one copy in t's preferred format.
        t = t.contiguous(memory_format=output_memory_format(t))
        s = _hw_stride(t)
    # Sample and channel offsets are int64 in the kernels; the in-plane offset hw * stride is
    # int32 (cheaper address math). A plane whose span exceeds that is far beyond any image.
    if t.shape[2] * t.shape[3] * abs(s) >= 2**31:
        raise ValueError(
            f"fastcgan.kernels.instance_norm_act: an H*W plane spanning {t.shape[2] * t.shape[3] * abs(s)} "
            f"elements (shape {tuple(t.shape)}, strides {t.stride()}) exceeds int32 offsets"
        )
    return t, t.stride(0), t.stride(1), s


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        # ~4 resident programs per SM of 4-8 warps keeps HBM busy while tiles reduce.
        return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    # Interpreter: programs run one after another in Python; fewer, bigger ones are faster.
    return 1


# Elements per tile (fp32 registers: 2048 / (4 warps * 32 lanes) = 16 per thread).
_TILE_GPU = 2048
_TILE_INTERPRET = 4096
# Minimum elements a chunk should cover before splitting a plane further.
_MIN_CHUNK = 2048
# The apply / dx kernels merge a plane's K chunk partials inline by loading a
# [BLOCK_C, next_pow2(K)] tile in *every* program. Beyond this many elements (channels_last at
# batch 1: 64 channels x 256 chunks = 16 K fp32 per program, re-read by hundreds of programs,
# and spilled registers) a separate merge kernel reduces the partials once per plane first.
_MERGE_INLINE = 1024
_MERGE_BLOCK_R = 32


def _merge_block_k(k: int) -> int:
    return min(triton.next_power_of_2(k), 64)


def _merged_stats(pmean: Tensor, pm2: Tensor, hw: int, chunk: int) -> tuple[Tensor, Tensor]:
    """(N, C, K) partial means/M2 -> (N, C, 1), one launch."""
    n, c, k = pmean.shape
    omean = torch.empty((n, c, 1), dtype=torch.float32, device=pmean.device)
    om2 = torch.empty_like(omean)
    _merge_stats_kernel[(triton.cdiv(n * c, _MERGE_BLOCK_R),)](
        pmean, pm2, omean, om2, n * c, hw, chunk, k, BLOCK_R=_MERGE_BLOCK_R, BLOCK_K=_merge_block_k(k),
    )
    return omean, om2


def _merged_sums(pa: Tensor, pb: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, K) partial sums -> (N, C, 1) for two buffers, one launch."""
    n, c, k = pa.shape
    oa = torch.empty((n, c, 1), dtype=torch.float32, device=pa.device)
    ob = torch.empty_like(oa)
    _merge_sums_kernel[(triton.cdiv(n * c, _MERGE_BLOCK_R),)](
        pa, pb, oa, ob, n * c, k, BLOCK_R=_MERGE_BLOCK_R, BLOCK_K=_merge_block_k(k),
    )
    return oa, ob


_MAX_CHUNKS = 256
# One-pass kernels hold BLOCK_C x next_pow2(H*W) fp32 values per loaded tensor: 8 per thread
# (num_warps = elements / 256) up to 8192 elements, 16 per thread at 32 warps for 16384 (128x128
# planes, one channel per program). With reflection padding the 9-tap gather / scatter costs
# registers: compiled for sm_90 (cuobjdump, Triton 3.8) a 4096-element program with 16 per
# thread took 230 registers in the backward, with 8 per thread 100, and 16384 elements at 32
# warps (64-register cap) spilled 1.2 kB per thread -- so padded planes stop at 8192.
_ONE_PASS_MAX = 16384
_ONE_PASS_MAX_PADDED = 8192


@functools.lru_cache(maxsize=4096)
def _one_pass_plan(n: int, c: int, hw: int, target: int, max_elems: int):
    """(BLOCK_C, BLOCK_HW, n_cblocks, num_warps) when a whole plane fits one program, else None.

    BLOCK_C starts at every channel that fits and halves while the grid is smaller than
    ``target`` programs (batch 1 has few planes; a one-channel program is still a whole plane)."""
    block_hw = triton.next_power_of_2(hw)
    if block_hw > max_elems:
        return None
    block_c = min(triton.next_power_of_2(c), max_elems // block_hw)
    while block_c > 1 and n * triton.cdiv(c, block_c) < target:
        block_c //= 2
    num_warps = max(4, min(32, block_c * block_hw // 256))
    return block_c, block_hw, triton.cdiv(c, block_c), num_warps


@functools.lru_cache(maxsize=4096)
def _plan(n: int, c: int, hw: int, c_minor: bool, tile: int, target: int, min_chunk: int):
    """(BLOCK_C, BLOCK_HW, n_cblocks, K, CHUNK, TILES, num_warps) for one pass over N x C x HW."""
    if c_minor:
        # channels_last: channels are contiguous, so the tile is wide along C (coalesced).
        block_c = min(triton.next_power_of_2(c), 64)
        block_hw = min(triton.next_power_of_2(hw), max(1, tile // block_c))
    else:
        # NCHW: long along HW; small planes pack several channels into one program.
        block_hw = min(triton.next_power_of_2(hw), tile)
        block_c = min(triton.next_power_of_2(c), max(1, tile // block_hw))
    n_cblocks = triton.cdiv(c, block_c)
    groups = n * n_cblocks
    max_k = max(1, hw // max(min_chunk // block_c, block_hw, 1))
    # Every program of the next kernel reads all K partials of its channels, so the merge costs
    # O(K^2 * BLOCK_C) loads in total: cap K (256 chunks already give 256 programs per group).
    k = max(1, min(triton.cdiv(target, groups), max_k, _MAX_CHUNKS))
    chunk = triton.cdiv(triton.cdiv(hw, k), block_hw) * block_hw
    k = triton.cdiv(hw, chunk)
    tiles = chunk // block_hw
    num_warps = 8 if block_c * block_hw >= 4096 else 4
    return block_c, block_hw, n_cblocks, k, chunk, tiles, num_warps


ONE_PASS_ENV = "FASTCGAN_ONE_PASS"


@functools.lru_cache(maxsize=None)
def _one_pass_enabled() -> bool:
    """False when ``FASTCGAN_ONE_PASS`` is 0 / false / off / no (read once; see the module docstring)."""
    return os.environ.get(ONE_PASS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _one_pass_launch_plan(x_shape, hw, pad, device):
    if not _one_pass_enabled():
        return None
    # The padded limit never exceeds the plain one (tests set _ONE_PASS_MAX = 0 to force the split path).
    limit = min(_ONE_PASS_MAX_PADDED, _ONE_PASS_MAX) if pad else _ONE_PASS_MAX
    return _one_pass_plan(x_shape[0], x_shape[1], hw, _target_programs(device), limit)


def _launch_plan(x_shape, hw, c_minor, device):
    n, c = x_shape[0], x_shape[1]
    tile = _TILE_GPU if device.type == "cuda" else _TILE_INTERPRET
    return _plan(n, c, hw, c_minor, tile, _target_programs(device), _MIN_CHUNK)


def _device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (Triton launches on the current device and
    its current stream), a no-op for anything else (the interpreter on CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check(x: Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES["triton"]:
        supported = SUPPORTED_DTYPES["triton"]
        raise TypeError(f"fastcgan.kernels.instance_norm_act: unsupported dtype {x.dtype} (supports {supported})")
    if x.dim() != 4:
        raise ValueError(f"fastcgan.kernels.instance_norm_act: x must be 4-D, got shape {tuple(x.shape)}")


def forward(x, weight, bias, residual, activation, negative_slope, pad, eps):
    """Kernel-contract forward: ``(y, mean, rstd)``; see the module docstring."""
    _check(x)
    with _device_guard(x.device):
        return _forward(x, weight, bias, residual, activation, negative_slope, pad, eps)


def _forward(x, weight, bias, residual, activation, negative_slope, pad, eps):
    n, c, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    fmt = output_memory_format(x)
    xv, s_xn, s_xc, s_xhw = _as_nchw_view(x)
    if residual is not None:
        rv, s_rn, s_rc, s_rhw = _as_nchw_view(residual)
    else:
        rv, s_rn, s_rc, s_rhw = xv, 0, 0, 0
    y = torch.empty((n, c, hp, wp), dtype=x.dtype, device=x.device, memory_format=fmt)
    _, s_yn, s_yc, s_yhw = _as_nchw_view(y)
    mean = torch.empty((n, c), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n, c), dtype=torch.float32, device=x.device)
    hw, hwp = h * w, hp * wp
    flags = dict(
        PAD=int(pad), ACT=int(parse_activation(activation)), HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_R=residual is not None,
    )
    # The kernels read weight[c] / bias[c] at unit stride: a strided view is copied (C values).
    wt = weight.contiguous() if weight is not None else xv
    bt = bias.contiguous() if bias is not None else xv

    one_pass = _one_pass_launch_plan(x.shape, hw, pad, x.device)
    if one_pass is not None:
        bc, bhw, ncb, nw = one_pass
        _fwd_one_pass_kernel[(n * ncb,)](
            xv, rv, wt, bt, y, mean, rstd, c, h, w, hw, wp,
            s_xn, s_xc, s_xhw, s_rn, s_rc, s_rhw, s_yn, s_yc, s_yhw,
            ncb, float(eps), float(negative_slope), BLOCK_C=bc, BLOCK_HW=bhw, num_warps=nw, **flags,
        )
        return y, mean, rstd

    c_minor = s_xc == 1 and c > 1 and s_xhw != 1
    bc, bhw, ncb, k, chunk, tiles, nw = _launch_plan(x.shape, hw, c_minor, x.device)
    pmean = torch.empty((n, c, k), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pmean)
    _fwd_stats_kernel[(n * ncb, k)](
        xv, pmean, pm2, c, hw, s_xn, s_xc, s_xhw, ncb, chunk, tiles, k,
        BLOCK_C=bc, BLOCK_HW=bhw, num_warps=nw,
    )
    # The apply pass walks the padded output plane with its own tiling: it reads the (n, c, k)
    # partials by channel index, so it need not match the stats pass's channel blocks.
    bc2, bhw2, ncb2, ko, ochunk, otiles, nw2 = _launch_plan(y.shape, hwp, c_minor, x.device)
    if k > 1 and bc2 * triton.next_power_of_2(k) > _MERGE_INLINE:
        pmean, pm2 = _merged_stats(pmean, pm2, hw, chunk)
        k, chunk = 1, hw
    _fwd_apply_kernel[(n * ncb2, ko)](
        xv, rv, wt, bt, y, pmean, pm2, mean, rstd,
        c, h, w, hw, wp, hwp,
        s_xn, s_xc, s_xhw, s_rn, s_rc, s_rhw, s_yn, s_yc, s_yhw,
        ncb2, chunk, k, ochunk, otiles, float(eps), float(negative_slope),
        BLOCK_C=bc2, BLOCK_HW=bhw2, BLOCK_K=triton.next_power_of_2(k), num_warps=nw2, **flags,
    )
    return y, mean, rstd


def backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual):
    """Kernel-contract backward: ``(dx, dweight, dbias, dresidual)``; unneeded ones are empty."""
    _check(x)
    with _device_guard(x.device):
        return _backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual)


def _backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual):
    n, c, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    if tuple(dy.shape) != (n, c, hp, wp):
        raise ValueError(
            f"fastcgan.kernels.instance_norm_act.backward: dy has shape {tuple(dy.shape)}, expected {(n, c, hp, wp)}"
        )
    fmt = output_memory_format(x)
    xv, s_xn, s_xc, s_xhw = _as_nchw_view(x)
    dyv, s_dyn, s_dyc, s_dyhw = _as_nchw_view(dy)
    mean = mean.contiguous().float()
    rstd = rstd.contiguous().float()
    dx = torch.empty_like(x, memory_format=fmt)
    dres = torch.empty_like(x, memory_format=fmt) if has_residual else x.new_empty((0,))
    _, s_dxn, s_dxc, s_dxhw = _as_nchw_view(dx)
    hw = h * w
    # The kernels read weight[c] / bias[c] at unit stride: a strided view is copied (C values).
    wt = weight.contiguous() if weight is not None else xv
    bt = bias.contiguous() if bias is not None else xv
    flags = dict(
        PAD=int(pad), ACT=int(parse_activation(activation)), HAS_W=weight is not None, HAS_B=bias is not None,
    )
    one_pass = _one_pass_launch_plan(x.shape, hw, pad, x.device)
    if one_pass is not None:
        bc, bhw, ncb, nw = one_pass
        psg = torch.empty((n, c, 1), dtype=torch.float32, device=x.device)
        psgx = torch.empty_like(psg)
        _bwd_one_pass_kernel[(n * ncb,)](
            dyv, xv, wt, bt, mean, rstd, psg, psgx, dx, dres if has_residual else dx,
            c, h, w, hw, wp, s_dyn, s_dyc, s_dyhw, s_xn, s_xc, s_xhw, s_dxn, s_dxc, s_dxhw,
            ncb, float(negative_slope), HAS_R=bool(has_residual), BLOCK_C=bc, BLOCK_HW=bhw, num_warps=nw, **flags,
        )
        return (dx, *_affine_grads(x, weight, bias, psg, psgx), dres)

    c_minor = s_xc == 1 and c > 1 and s_xhw != 1
    bc, bhw, ncb, k, chunk, tiles, nw = _launch_plan(x.shape, hw, c_minor, x.device)
    psg = torch.empty((n, c, k), dtype=torch.float32, device=x.device)
    psgx = torch.empty_like(psg)
    common = dict(BLOCK_C=bc, BLOCK_HW=bhw, num_warps=nw, **flags)
    _bwd_reduce_kernel[(n * ncb, k)](
        dyv, xv, wt, bt, mean, rstd, psg, psgx,
        c, h, w, hw, wp, s_dyn, s_dyc, s_dyhw, s_xn, s_xc, s_xhw,
        ncb, chunk, tiles, k, float(negative_slope), **common,
    )
    kp = k  # partials per plane as the dx kernel sees them (the grid keeps k chunks)
    if k > 1 and bc * triton.next_power_of_2(k) > _MERGE_INLINE:
        psg, psgx = _merged_sums(psg, psgx)
        kp = 1
    _bwd_dx_kernel[(n * ncb, k)](
        dyv, xv, wt, bt, mean, rstd, psg, psgx, dx, dres if has_residual else dx,
        c, h, w, hw, wp, s_dyn, s_dyc, s_dyhw, s_xn, s_xc, s_xhw, s_dxn, s_dxc, s_dxhw,
        ncb, chunk, tiles, kp, float(negative_slope),
        HAS_R=bool(has_residual), BLOCK_K=triton.next_power_of_2(kp), **common,
    )
    return (dx, *_affine_grads(x, weight, bias, psg, psgx), dres)


def _affine_grads(x, weight, bias, psg: Tensor, psgx: Tensor) -> tuple[Tensor, Tensor]:
    """(dweight, dbias) from the (N, C, K) partial sums of gz * xhat and gz.

    Custom-op outputs must not alias each other: a fresh (0,) tensor for each unneeded grad.
    Deterministic: per-(sample, chunk) partials summed by one reduction, no atomics."""
    dw = psgx.sum((0, 2)).to(weight.dtype) if weight is not None else x.new_empty((0,))
    if bias is not None:
        db = psg.sum((0, 2)).to(bias.dtype)
    elif weight is not None:
        db = weight.new_zeros(weight.shape)  # unused; zeros (not empty) keep the output deterministic
    else:
        db = x.new_empty((0,))
    return dw, db
