"""CUT / FastCUT building blocks outside the trainer: projection heads, patch sampling, presets.

Contrastive Unpaired Translation (Park et al., ECCV 2020) ties each patch of the generator's output
to the patch at the same place of its input through the generator's own encoder features. One
PatchNCE evaluation is::

    out, feats_k = G.encode(real, NCE_LAYERS, with_output=True)  # keys: features of the input
    feats_q = G.encode(out, NCE_LAYERS)                           # queries: features of the output
    ids = sample_patch_ids(feats_k, 256)                          # the same locations for both
    k = heads(gather_patches(feats_k, ids))                       # (B, P, 256), L2-normalised
    q = heads(gather_patches(feats_q, ids))
    loss = patch_nce_loss(q, k, temperature=0.07)                 # fastcgan.losses_nce

Differences from the official code, none of which changes the objective:

* the heads are built up front from the known channel counts (:meth:`ResnetGenerator.feature_channels`)
  instead of lazily at the first forward, so ``torch.compile`` and CUDA graphs see a fixed graph
  and the heads' optimizer exists from step 0;
* the key features are taken from the generator's forward of the input instead of a second
  encoder pass over the same input: in training mode without dropout (the CUT default) they are
  the same tensors. (With flip-equivariance the official keys are the features of the *unflipped*
  input while the forward ran on the flipped one; then encode the unflipped input separately.)
* patch indices are drawn on the features' device (no host round trip, no ``np.random``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastcgan.devices import autocast_off
from fastcgan.models._blocks import init_weights

# The official ``--nce_layers`` (module indices of its ResNet generator's nn.Sequential; see
# ResnetGenerator.encode for what they denote in fastcgan's generator).
NCE_LAYERS = (0, 4, 8, 12, 16)

# Official parameter counts at 256x256 (they do not depend on the image size): resnet_9blocks
# ngf 64 (also the official anti-aliased CUT default: its blur filters are buffers), basic 70x70
# PatchGAN ndf 64, and the mlp_sample heads for NCE_LAYERS (input channels 3, 128, 256, 256, 256):
# sum over layers of (C_l*256 + 256) + (256*256 + 256).
OFFICIAL_PARAM_COUNTS = {"G": 11_378_179, "D": 2_764_737, "F": 560_384}

# The official CUT / FastCUT hyper-parameters (taesungp/contrastive-unpaired-translation:
# options/base_options.py, options/train_options.py, models/cut_model.py), flat, with fastcgan's
# config field names where one exists. The new CUT fields, by official option name:
#   lambda_gan <- lambda_GAN, lambda_nce <- lambda_NCE, nce_idt, nce_layers, num_patches,
#   netF_nc, nce_T, flip_equivariance, nce_includes_all_negatives_from_minibatch.
# pool_size 0: CUT has no image pool. init: xavier (gain 0.02) for G, D and the heads, unlike
# CycleGAN's normal. Official G/D resample with anti-aliasing (blur-pool down, blur up) unless
# --no_antialias / --no_antialias_up: antialias / antialias_up here (same parameter counts).
_CUT_COMMON = {
    "netG": "resnet_9blocks",
    "antialias": True,
    "antialias_up": True,
    "netD": "basic",
    "ngf": 64,
    "ndf": 64,
    "n_layers_D": 3,
    "norm": "instance",
    "use_dropout": False,
    "init_type": "xavier",
    "init_gain": 0.02,
    "load_size": 286,
    "crop_size": 256,
    "flip": True,
    "batch_size": 1,
    "lr": 2e-4,
    "beta1": 0.5,
    "beta2": 0.999,
    "lr_policy": "linear",
    "gan_mode": "lsgan",
    "pool_size": 0,
    "lambda_gan": 1.0,
    "nce_layers": NCE_LAYERS,
    "num_patches": 256,
    "netF_nc": 256,
    "nce_T": 0.07,
    "nce_includes_all_negatives_from_minibatch": False,
}
CUT_PRESETS: dict[str, dict] = {
    # CUT: NCE identity loss on G(Y) vs Y, averaged with the X term; 200 + 200 epochs.
    "cut": {
        **_CUT_COMMON,
        "lambda_nce": 1.0,
        "nce_idt": True,
        "flip_equivariance": False,
        "epochs": 200,
        "epochs_decay": 200,
    },
    # FastCUT: no NCE identity (half the generator work), lambda_NCE 10, flip-equivariance;
    # 150 + 50 epochs.
    "fastcut": {
        **_CUT_COMMON,
        "lambda_nce": 10.0,
        "nce_idt": False,
        "flip_equivariance": True,
        "epochs": 150,
        "epochs_decay": 50,
    },
}


def l2_normalize(x: Tensor, eps: float = 1e-7) -> Tensor:
    """``x / (||x||_2 + eps)`` over the last dim, in fp32 whatever ``x``'s dtype (the official
    Normalize(2), with its eps added to the norm)."""
    x = x.float()
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


class PatchNCEHeads(nn.Module):
    """The official ``mlp_sample`` PatchSampleF projection: per NCE layer a 2-layer MLP
    ``Linear(C_l, nc) - ReLU - Linear(nc, nc)`` on each sampled feature vector, then L2
    normalisation (fp32). Built from the known input channels; keys ``mlps.{l}.{0,2}.*``.

    ``forward(samples)`` takes one ``(B, P, C_l)`` tensor per layer (:func:`gather_patches`) and
    returns one ``(B, P, nc)`` fp32 unit-norm tensor per layer."""

    def __init__(
        self,
        in_channels: Sequence[int],
        nc: int = 256,
        *,
        init_type: Optional[str] = "xavier",
        init_gain: float = 0.02,
    ):
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        self.nc = nc
        self.mlps = nn.ModuleList(
            [nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)) for c in self.in_channels]
        )
        init_weights(self, init_type, init_gain)

    def forward(self, samples: Sequence[Tensor]) -> list[Tensor]:
        if len(samples) != len(self.mlps):
            raise ValueError(f"PatchNCEHeads: expected {len(self.mlps)} feature tensors, got {len(samples)}")
        # fp32 with autocast off: at the official size the heads' weight gradients reach ~7e4,
        # above fp16's 65504 before any loss scaling, so under --amp fp16 every early step
        # overflowed and the shared scale collapsed (G and F skipped for ~20 steps). The heads
        # see num_patches vectors per layer: fp32 costs next to nothing.
        with autocast_off(samples[0].device.type):  # in the weights' dtype (fp32; fp64 in tests)
            return [l2_normalize(mlp(s.to(mlp[0].weight.dtype))) for mlp, s in zip(self.mlps, samples)]

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, nc={self.nc}"


def build_patchnce_heads(
    generator: nn.Module,
    layers: Sequence[int] = NCE_LAYERS,
    nc: int = 256,
    *,
    init_type: Optional[str] = "xavier",
    init_gain: float = 0.02,
) -> PatchNCEHeads:
    """Heads for ``generator``'s features at ``layers`` (``generator.feature_channels(layers)``),
    on the generator's device. CUT's default init is xavier(0.02), like its G and D."""
    heads = PatchNCEHeads(generator.feature_channels(layers), nc, init_type=init_type, init_gain=init_gain)
    p = next(generator.parameters(), None)
    return heads.to(p.device) if p is not None else heads


def patchnce_head_param_count(in_channels: Sequence[int], nc: int = 256) -> int:
    """sum over layers of (C_l*nc + nc) + (nc*nc + nc)."""
    return sum(c * nc + nc + nc * nc + nc for c in in_channels)


def sample_patch_ids(
    feats: Sequence[Tensor],
    num_patches: int = 256,
    *,
    generator: Optional[torch.Generator] = None,
    per_image: bool = False,
) -> list[Tensor]:
    """Random patch locations, one int64 tensor per feature map, drawn on the feature's device.

    Each holds ``min(num_patches, H*W)`` distinct flat indices ``h*W + w`` into that map's H x W
    grid, in random order. ``per_image=False`` (the official behaviour) draws one set shared by
    every image of the batch, shape ``(P,)``; ``per_image=True`` draws independently per image,
    shape ``(B, P)``. Pass the result to :func:`gather_patches` for the queries *and* the keys.

    No host synchronisation: the count depends on shapes only. ``generator`` (on the features'
    device) makes the draws reproducible in eager mode; under ``torch.compile(fullgraph=True)``
    leave it ``None`` (Dynamo cannot trace a Generator argument) and seed the global generator,
    or draw the ids outside the compiled region and pass them in."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    ids = []
    for f in feats:
        b, _, h, w = f.shape
        n = h * w
        k = min(num_patches, n)
        if per_image:
            # argsort of iid uniform keys: a uniformly random permutation per row.
            keys = torch.rand(b, n, device=f.device, generator=generator)
            ids.append(keys.argsort(dim=1)[:, :k])
        else:
            ids.append(torch.randperm(n, device=f.device, generator=generator)[:k])
    return ids


def gather_patches(feats: Sequence[Tensor], patch_ids: Sequence[Tensor]) -> list[Tensor]:
    """The feature vectors at ``patch_ids`` (from :func:`sample_patch_ids`): one ``(B, P, C)``
    tensor per map. Indexes the maps in place (they may be cropped views), no full-map copy."""
    if len(feats) != len(patch_ids):
        raise ValueError(f"gather_patches: {len(feats)} feature maps but {len(patch_ids)} index tensors")
    out = []
    for f, idx in zip(feats, patch_ids):
        w = f.shape[-1]
        rows, cols = idx // w, idx % w
        if idx.dim() == 1:
            out.append(f[:, :, rows, cols].transpose(1, 2))  # (B, C, P) -> (B, P, C)
        else:
            bidx = torch.arange(f.shape[0], device=f.device).unsqueeze(1)
            out.append(f[bidx, :, rows, cols])  # separated advanced indices: (B, P, C)
    return out


def project_patches(
    heads: nn.Module,
    feats_q: Sequence[Tensor],
    feats_k: Sequence[Tensor],
    num_patches: int = 256,
    *,
    patch_ids: Optional[Sequence[Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    per_image: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Sample (or reuse ``patch_ids``), gather at the same locations for queries and keys, project.

    Returns ``(q, k, patch_ids)``: per-layer ``(B, P, nc)`` unit vectors. The keys are detached
    before the heads (the loss detaches them anyway, so the heads' and generator's gradients are
    unchanged; this only skips building their graph)."""
    if patch_ids is None:
        patch_ids = sample_patch_ids(feats_k, num_patches, generator=generator, per_image=per_image)
    k = heads(gather_patches([f.detach() for f in feats_k], patch_ids))
    q = heads(gather_patches(feats_q, patch_ids))
    return q, k, list(patch_ids)


__all__ = [
    "NCE_LAYERS",
    "OFFICIAL_PARAM_COUNTS",
    "CUT_PRESETS",
    "l2_normalize",
    "PatchNCEHeads",
    "build_patchnce_heads",
    "patchnce_head_param_count",
    "sample_patch_ids",
    "gather_patches",
    "project_patches",
]
