"""sRGB <-> CIE L*a*b* on tensors, for colorization (``--model colorization``).

The official colorization model converts with ``skimage.color.rgb2lab`` / ``lab2rgb``: sRGB with
the sRGB transfer curve, the sRGB->XYZ matrix of the sRGB specification, the D65 white of the 2
degree observer (0.95047, 1, 1.08883) and the CIE f(t) with the 0.008856 / 7.787 linear segment.
These are the same definitions in torch: channel dimension -3, any batch shape, differentiable,
and built from elementwise ops only (no einsum, no gather), so they run on the device inside the
data path, compile into one fused kernel and export to ONNX / AOTInductor unchanged.

Numerics: computed in float32 (float64 stays float64) whatever the input dtype -- L spans 0..100
and bf16 keeps 8 bits, i.e. steps of 0.5 L. The branches of every piecewise function are clamped
to their own domain before ``pow`` so that neither the forward nor a backward through
``torch.where`` can produce NaN from the branch not taken. As skimage, ``lab_to_rgb`` clips
z = y - b/200 at 0 and the result to [0, 1].

Model scaling (the official ``colorization_dataset``): the generator sees ``L / 50 - 1`` (one
channel in [-1, 1]) and predicts ``ab / 110`` (two channels).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["L_SCALE", "AB_SCALE", "decolorize", "lab_to_rgb", "lightness", "model_to_lab", "rgb_to_lab",
           "rgb_to_model"]

# sRGB (linear) -> XYZ, from the sRGB specification (the matrix skimage uses).
XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
WHITE_D65 = (0.95047, 1.0, 1.08883)  # CIE XYZ of the D65 illuminant, 2 degree observer
L_SCALE = 50.0  # generator input: L / 50 - 1
AB_SCALE = 110.0  # generator output: ab / 110

_EPS = 0.008856  # (6/29)^3 rounded, as in skimage: below it f(t) is linear
_KAPPA = 7.787  # slope of that linear segment
_F_EPS = 0.2068966  # f(_EPS) = 6/29: the inverse's switch point


def _inverse3(m) -> tuple[tuple[float, ...], ...]:
    """Inverse of a 3x3 matrix (adjugate / determinant), in Python floats: a constant of the module,
    so nothing is computed while torch.compile / torch.export trace the conversions."""
    (a, b, c), (d, e, f), (g, h, i) = m
    cof = ((e * i - f * h, c * h - b * i, b * f - c * e),
           (f * g - d * i, a * i - c * g, c * d - a * f),
           (d * h - e * g, b * g - a * h, a * e - b * d))
    det = a * cof[0][0] + b * cof[1][0] + c * cof[2][0]
    return tuple(tuple(v / det for v in row) for row in cof)


RGB_FROM_XYZ = _inverse3(XYZ_FROM_RGB)


def _work(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _mix(m, c: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
    """3x3 matrix times the channel vector, as elementwise products (exports and fuses anywhere)."""
    return tuple(r[0] * c[0] + r[1] * c[1] + r[2] * c[2] for r in m)


def _linear(c: Tensor) -> Tensor:
    """sRGB transfer curve, encoded [0, 1] -> linear light."""
    return torch.where(c > 0.04045, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, c / 12.92)


def _f(t: Tensor) -> Tensor:
    return torch.where(t > _EPS, t.clamp_min(_EPS) ** (1.0 / 3.0), _KAPPA * t + 16.0 / 116.0)


def lightness(rgb: Tensor) -> Tensor:
    """L* (0..100) of sRGB ``rgb`` in [0, 1], channel dim -3 kept (size 1). Only Y is needed."""
    r, g, b = _work(rgb).unbind(-3)
    y = sum(w * _linear(c) for w, c in zip(XYZ_FROM_RGB[1], (r, g, b))) / WHITE_D65[1]
    return (116.0 * _f(y) - 16.0).unsqueeze(-3)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] (channels at dim -3) -> L*a*b* (L 0..100, a/b roughly -110..110)."""
    lin = tuple(_linear(c) for c in _work(rgb).unbind(-3))
    fx, fy, fz = (_f(v / w) for v, w in zip(_mix(XYZ_FROM_RGB, lin), WHITE_D65))
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """L*a*b* (channels at dim -3) -> sRGB in [0, 1] (out-of-gamut colours clipped)."""
    L, a, b = _work(lab).unbind(-3)
    fy = (L + 16.0) / 116.0
    fs = (a / 500.0 + fy, fy, (fy - b / 200.0).clamp_min(0.0))
    xyz = tuple(w * torch.where(f > _F_EPS, f**3, (f - 16.0 / 116.0) / _KAPPA) for f, w in zip(fs, WHITE_D65))
    rgb = (
        torch.where(v > 0.0031308, 1.055 * v.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * v)
        for v in _mix(RGB_FROM_XYZ, xyz)
    )
    return torch.stack(tuple(rgb), dim=-3).clamp(0.0, 1.0)


def rgb_to_model(rgb: Tensor) -> tuple[Tensor, Tensor]:
    """Images in [-1, 1] (the data path's scale) -> (generator input ``L/50 - 1``, 1 channel;
    target ``ab/110``, 2 channels), float32."""
    lab = rgb_to_lab((_work(rgb) + 1.0) * 0.5)
    return lab[..., :1, :, :] / L_SCALE - 1.0, lab[..., 1:, :, :] / AB_SCALE


def model_to_lab(l_in: Tensor, ab_out: Tensor) -> Tensor:
    """Generator input and output scales back to L*a*b*."""
    return torch.cat(((_work(l_in) + 1.0) * L_SCALE, _work(ab_out) * AB_SCALE), dim=-3)


def decolorize(rgb: Tensor) -> Tensor:
    """Images in [-1, 1] without their colour: L* kept, a* = b* = 0 (what a colorizer starts from)."""
    lum = lightness((_work(rgb) + 1.0) * 0.5)
    return lab_to_rgb(torch.cat((lum, torch.zeros_like(lum).expand(*lum.shape[:-3], 2, -1, -1)), dim=-3)) * 2 - 1
