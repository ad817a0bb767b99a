"""PatchNCE (CUT, Park et al. 2020) as pure functions: tensors in, a scalar tensor out.

No ``.backward()``, no ``.item()``, no module state; ``lambda_NCE`` is applied by the caller.
Inputs are projected, L2-normalised patch features (:func:`fastcgan.models.patchnce.project_patches`,
or, in the CUT recipe, ``gather_patches`` at the recipe's own patch ids and then the heads): per
layer a query ``q`` and a key ``k`` of shape ``(B, P, C)``, row ``p`` of both taken at the same location.

Numerics: the logits are computed in fp32 with autocast disabled (a bf16 dot product of unit
vectors divided by 0.07 would carry ~0.05 absolute error into the softmax), and the keys are
detached, as in the official loss.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from fastcgan.devices import autocast_off

# The official code fills the self-similarity entries of the negatives with -10 *before* dividing
# by the temperature: exp(-10 / 0.07) ~ 1e-62, i.e. removed from the softmax.
_MASKED_SIMILARITY = -10.0


def patch_nce_layer_loss(q: Tensor, k: Tensor, temperature: float = 0.07, key_offset: int = 0) -> Tensor:
    """PatchNCE of one layer, mean over the ``B*P`` query patches.

    For query ``q[b, i]`` the positive is ``k[b, i]`` (logit index 0) and the negatives are the
    other patches ``k[b, j != i]`` of the *same* image (the official "internal negatives",
    ``nce_includes_all_negatives_from_minibatch=False``); the ``j == i`` entry of the negatives is
    masked. Cross-entropy of ``[q.k_i, q.k_j...] / temperature`` with target 0.

    ``k`` may hold more patches than ``q`` (``(B, K, C)``, ``K >= P``): the queries' own keys are
    ``k[:, key_offset:key_offset + P]`` and every other key is a negative -- a process's queries
    against the keys of the whole global batch under DDP (negatives from the minibatch)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] \
            or not 0 <= key_offset <= k.shape[1] - q.shape[1]:
        raise ValueError(f"patch_nce_layer_loss: q (B, P, C) and k (B, K, C) with its P keys from key_offset "
                         f"{key_offset}, got {tuple(q.shape)} / {tuple(k.shape)}")
    with autocast_off(q.device.type):
        q = q.float()
        k = k.detach().float()
        p = q.shape[1]
        l_pos = (q * k[:, key_offset:key_offset + p]).sum(dim=-1, keepdim=True)  # (B, P, 1)
        l_neg = torch.bmm(q, k.transpose(1, 2))  # (B, P, K)
        rows = torch.arange(p, device=q.device)[:, None] + key_offset
        own = rows == torch.arange(k.shape[1], device=q.device)[None, :]  # each query's positive, among the negatives
        l_neg = l_neg.masked_fill(own, _MASKED_SIMILARITY)
        logits = torch.cat([l_pos, l_neg], dim=-1) / temperature
        # cross-entropy with target 0: logsumexp(logits) - logits[0]
        return (torch.logsumexp(logits, dim=-1) - logits[..., 0]).mean()


def patch_nce_loss(
    q: Union[Tensor, Sequence[Tensor]],
    k: Union[Tensor, Sequence[Tensor]],
    temperature: float = 0.07,
    key_offset: Union[int, Sequence[int]] = 0,
) -> Tensor:
    """PatchNCE over the NCE layers: the **mean** over layers of :func:`patch_nce_layer_loss` (the
    official ``calculate_NCE_loss`` sums the per-layer means and divides by the number of layers).

    The caller multiplies by ``lambda_NCE``; with the CUT identity term the official generator
    loss uses ``(nce(G(X), X) + nce(G(Y), Y)) / 2``. As every image's negatives are its own, one
    call on the concatenated batch ``[X; Y]`` gives that average exactly when X and Y have the
    same batch size. ``key_offset`` (one, or one per layer): :func:`patch_nce_layer_loss`."""
    if isinstance(q, Tensor):
        return patch_nce_layer_loss(q, k, temperature, key_offset)
    offsets = [key_offset] * len(q) if isinstance(key_offset, int) else list(key_offset)
    if len(q) != len(k) or len(q) == 0 or len(offsets) != len(q):
        raise ValueError(
            f"patch_nce_loss: need the same non-zero number of query and key layers (and offsets), got {len(q)} / "
            f"{len(k)} / {len(offsets)}"
        )
    total = patch_nce_layer_loss(q[0], k[0], temperature, offsets[0])
    for ql, kl, off in zip(q[1:], k[1:], offsets[1:]):
        total = total + patch_nce_layer_loss(ql, kl, temperature, off)
    return total / len(q)


__all__ = ["patch_nce_layer_loss", "patch_nce_loss"]
