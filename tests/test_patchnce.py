"""CUT / FastCUT pieces: the generator's encoder features at the official ``--nce_layers``, the
projection heads and their parameter counts, device-side patch sampling, and the PatchNCE loss
(analytic value, shared indices, gradient flow, fp32 logits under autocast, no host sync)."""

import math

import pytest
import torch
from test_official_checkpoint import OfficialResnetGenerator
from torch import nn

from fastcgan.losses_nce import patch_nce_layer_loss, patch_nce_loss
from fastcgan.models import build_discriminator, build_generator, official_state_dict
from fastcgan.models.patchnce import (
    CUT_PRESETS,
    NCE_LAYERS,
    OFFICIAL_PARAM_COUNTS,
    PatchNCEHeads,
    build_patchnce_heads,
    gather_patches,
    patchnce_head_param_count,
    project_patches,
    sample_patch_ids,
)

TAU = 0.07


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------
# Encoder features: the official layer indices on our fused generator
# ------------------------------------------------------------------------------------------------
def test_nce_layer_mapping_at_256():
    g = build_generator("resnet_9blocks", init_type=None).to("meta")
    names = g.official_layer_names()
    assert len(names) == 28  # the official resnet_9blocks nn.Sequential
    expected = ["ReflectionPad2d", "Conv2d", "Norm", "ResnetBlock", "ResnetBlock"]
    assert [names[i] for i in NCE_LAYERS] == expected
    assert g.feature_channels(NCE_LAYERS) == [3, 128, 256, 256, 256]
    x = torch.empty(1, 3, 256, 256, device="meta")
    feats = g.encode(x, NCE_LAYERS)
    assert [tuple(f.shape) for f in feats] == [
        (1, 3, 262, 262),
        (1, 128, 128, 128),
        (1, 256, 64, 64),
        (1, 256, 64, 64),
        (1, 256, 64, 64),
    ]
    out, feats2 = g.encode(x, NCE_LAYERS, with_output=True)
    assert out.shape == (1, 3, 256, 256) and len(feats2) == 5
    # channels of every official index agree with the shapes encode returns
    _, every = g.encode(x, range(28), with_output=True)
    assert [f.shape[1] for f in every] == g.feature_channels(range(28))


@pytest.mark.parametrize(
    "arch,norm,h,w", [("resnet_9blocks", "instance", 24, 20), ("resnet_6blocks", "batch", 16, 16)]
)
def test_encode_equals_official_sequential_features(arch, norm, h, w):
    """Every official index (the official forward loop, in-place ReLUs included) against encode."""
    torch.manual_seed(0)
    ours = build_generator(arch, ngf=4, norm=norm, backend="torch")
    n_blocks = 9 if "9" in arch else 6
    off = OfficialResnetGenerator(3, 3, 4, norm, False, n_blocks)
    off.load_state_dict(official_state_dict(ours))
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        ref, feat = [], x
        for layer in off.model:  # what the official ResnetGenerator.forward(x, layers) records
            feat = layer(feat)
            ref.append(feat)
        out, feats = ours.encode(x, range(len(off.model)), with_output=True)
    assert len(feats) == len(ref) == 19 + n_blocks
    for i, (a, b) in enumerate(zip(feats, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"official index {i}: {m}")
    torch.testing.assert_close(out, ref[-1], atol=1e-5, rtol=1e-5)


def test_encode_equals_forward_intermediates_and_skips_decoder():
    torch.manual_seed(0)
    g = build_generator("resnet_9blocks", ngf=4)
    x = torch.randn(2, 3, 16, 24)
    seen = {}

    def keep(name, crop=0):
        def hook(mod, inp, out):
            seen[name] = out[:, :, crop:-crop, crop:-crop] if crop else out

        return hook

    g.stem.conv.register_forward_pre_hook(lambda mod, inp: seen.__setitem__(0, inp[0]))
    g.down[0].conv.register_forward_hook(keep(4))
    g.down[1].norm.register_forward_hook(keep(8, crop=1))
    g.blocks[2].register_forward_hook(keep(12, crop=1))
    g.blocks[6].register_forward_hook(keep(16, crop=1))
    g.up[0].register_forward_hook(keep("decoder"))
    with torch.no_grad():
        y = g(x)
        plain = dict(seen)
        seen.clear()
        out, feats = g.encode(x, NCE_LAYERS, with_output=True)
        assert torch.equal(out, y)
        for layer, f in zip(NCE_LAYERS, feats):
            assert torch.equal(f, plain[layer]), layer
        seen.clear()
        feats_only = g.encode(x, NCE_LAYERS)
    assert "decoder" not in seen  # stopped after layer 16 (blocks[6])
    for a, b in zip(feats_only, feats):
        assert torch.equal(a, b)


def test_encode_rejects_bad_layers():
    g = build_generator("resnet_6blocks", ngf=4)
    x = torch.randn(1, 3, 16, 16)
    for bad in ([4, 0], [0, 0], [-1], [25]):  # resnet_6blocks has 25 official modules (0..24)
        with pytest.raises(ValueError, match="official module indices"):
            g.encode(x, bad)
    with pytest.raises(ValueError, match="multiples of 4"):
        g.encode(torch.randn(1, 3, 18, 16))
    assert g.encode(x, []) == []


# ------------------------------------------------------------------------------------------------
# Heads and parameter counts
# ------------------------------------------------------------------------------------------------
def test_official_cut_parameter_counts():
    g = build_generator("resnet_9blocks", init_type=None)
    heads = build_patchnce_heads(g, NCE_LAYERS, 256, init_type=None)
    by_hand = sum(c * 256 + 256 for c in (3, 128, 256, 256, 256)) + 5 * (256 * 256 + 256)
    assert by_hand == 560_384
    assert n_params(heads) == patchnce_head_param_count([3, 128, 256, 256, 256]) == by_hand
    assert n_params(g) == 11_378_179
    assert n_params(build_discriminator("basic", init_type=None)) == 2_764_737
    assert OFFICIAL_PARAM_COUNTS == {"G": 11_378_179, "D": 2_764_737, "F": 560_384}


def test_heads_shapes_init_and_unit_norm():
    torch.manual_seed(0)
    heads = PatchNCEHeads([3, 8], nc=16)  # the official xavier(0.02) init: zero biases, tiny weights
    assert [tuple(m[0].weight.shape) for m in heads.mlps] == [(16, 3), (16, 8)]
    assert all(m[0].bias.abs().sum() == 0 and m[2].bias.abs().sum() == 0 for m in heads.mlps)
    assert all(m[0].weight.std() < 0.02 for m in heads.mlps)
    # (with outputs of norm ~1e-4 the official eps 1e-7 shows in the norm: check on default init)
    heads = PatchNCEHeads([3, 8], nc=16, init_type=None)
    q = heads([torch.randn(2, 5, 3), torch.randn(2, 7, 8)])
    assert [tuple(t.shape) for t in q] == [(2, 5, 16), (2, 7, 16)]
    for t in q:
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:2]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected 2"):
        heads([torch.randn(2, 5, 3)])


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
def test_sample_patch_ids():
    feats = [torch.randn(2, 3, 20, 20), torch.randn(2, 4, 8, 6)]  # 400 and 48 positions
    ids = sample_patch_ids(feats, 256, generator=torch.Generator().manual_seed(1))
    assert [tuple(i.shape) for i in ids] == [(256,), (48,)]  # all positions when fewer
    for i, f in zip(ids, feats):
        assert i.dtype == torch.int64 and i.device == f.device
        assert i.unique().numel() == i.numel()
        assert 0 <= int(i.min()) and int(i.max()) < f.shape[2] * f.shape[3]
    again = sample_patch_ids(feats, 256, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(ids, again))
    other = sample_patch_ids(feats, 256, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(ids[0], other[0])
    per = sample_patch_ids(feats, 32, per_image=True, generator=torch.Generator().manual_seed(1))
    assert [tuple(i.shape) for i in per] == [(2, 32), (2, 32)]
    for row in per[0]:
        assert row.unique().numel() == 32
    assert not torch.equal(per[0][0], per[0][1])
    with pytest.raises(ValueError):
        sample_patch_ids(feats, 0)


@pytest.mark.parametrize("per_image", [False, True])
def test_patch_indices_shared_between_query_and_key(per_image):
    b, h, w = 2, 6, 10
    pos = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).expand(b, 1, h, w)
    # channel 0 holds the flat position, channel 1 tells query from key; the key is a cropped view
    q_map = torch.cat([pos, torch.zeros(b, 1, h, w)], 1)
    k_padded = torch.nn.functional.pad(torch.cat([pos, torch.ones(b, 1, h, w)], 1), (1, 1, 1, 1))
    k_map = k_padded[:, :, 1:-1, 1:-1]
    identity_heads = nn.Identity()  # returns the gathered samples: (B, P, C)
    q, k, ids = project_patches(
        identity_heads, [q_map], [k_map], 16, generator=torch.Generator().manual_seed(0), per_image=per_image
    )
    expected = ids[0].expand(b, 16).float() if not per_image else ids[0].float()
    assert torch.equal(q[0][..., 0], expected) and torch.equal(k[0][..., 0], expected)
    assert torch.equal(q[0][..., 1], torch.zeros(b, 16)) and torch.equal(k[0][..., 1], torch.ones(b, 16))
    # reusing the returned indices gathers the same locations again
    q2 = gather_patches([q_map], ids)
    assert torch.equal(q2[0], q[0])


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------
def _onehot(b, p, c):
    return torch.eye(c)[:p].expand(b, p, c).clone()


def _analytic(p, tau):
    # query = its positive (dot 1), orthogonal to every negative (dot 0), diagonal masked away
    return -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (p - 1) * math.exp(0)))


@pytest.mark.parametrize("tau", [TAU, 0.5, 1.0])
def test_patch_nce_analytic_value_and_layer_mean(tau):
    # At tau 0.07 the value is ~(P-1) e^{-1/tau} ~ 1.6e-4 for P = 256, next to logits of 14.3:
    # fp32 resolves it to ~1e-6 absolute; at larger tau it is well conditioned (relative 1e-5).
    close = dict(abs_tol=2e-6) if tau < 0.1 else dict(rel_tol=1e-5)
    q1, q2 = _onehot(2, 256, 256), _onehot(3, 5, 5)
    l1 = patch_nce_layer_loss(q1, q1.clone(), tau)
    l2 = patch_nce_layer_loss(q2, q2.clone(), tau)
    assert l1.dtype == torch.float32 and l1.dim() == 0
    assert math.isclose(l1.item(), _analytic(256, tau), **close)
    assert math.isclose(l2.item(), _analytic(5, tau), **close)
    both = patch_nce_loss([q1, q2], [q1.clone(), q2.clone()], tau)
    assert math.isclose(both.item(), (_analytic(256, tau) + _analytic(5, tau)) / 2, **close)  # mean, not sum
    # a query anti-aligned with its positive is much worse; the loss depends on the temperature
    assert patch_nce_layer_loss(-q1, q1, tau) > l1 + 1


def test_patch_nce_matches_cross_entropy_restatement():
    """The official computation restated: per image, logits [q.k_i, q.k_j (j != i masked to -10)] / T,
    cross-entropy to index 0, mean over patches."""
    torch.manual_seed(0)
    b, p, c = 2, 12, 8
    q = torch.nn.functional.normalize(torch.randn(b, p, c), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(b, p, c), dim=-1)
    rows = []
    for i in range(b):
        sim = q[i] @ k[i].T
        pos = sim.diagonal().unsqueeze(1)
        neg = sim.masked_fill(torch.eye(p, dtype=torch.bool), -10.0)
        rows.append(torch.cat([pos, neg], 1) / TAU)
    logits = torch.cat(rows)
    ref = torch.nn.functional.cross_entropy(logits, torch.zeros(b * p, dtype=torch.long))
    torch.testing.assert_close(patch_nce_layer_loss(q, k, TAU), ref, atol=1e-6, rtol=1e-6)
    # internal negatives: each image is scored against its own patches only, so the batch loss is
    # the mean of the images' losses, whatever the other image's keys are
    for k2 in (k, torch.nn.functional.normalize(torch.randn(b, p, c), dim=-1)):
        per_image = [patch_nce_layer_loss(q[i:i + 1], k2[i:i + 1], TAU) for i in range(b)]
        torch.testing.assert_close(patch_nce_layer_loss(q, k2, TAU), sum(per_image) / b)


def _tiny_cut(seed=0):
    torch.manual_seed(seed)
    g = build_generator("resnet_6blocks", ngf=4, init_type="xavier")
    heads = build_patchnce_heads(g, NCE_LAYERS, nc=16)
    return g, heads


def test_gradients_reach_generator_and_heads_not_keys():
    g, heads = _tiny_cut()
    real = torch.randn(2, 3, 16, 16)
    fake, feats_k = g.encode(real, NCE_LAYERS, with_output=True)
    feats_q = g.encode(fake, NCE_LAYERS)
    keys = [f.detach().requires_grad_() for f in feats_k]  # leaves: would receive any key gradient
    ids = sample_patch_ids(feats_k, 8, generator=torch.Generator().manual_seed(0))
    k = heads(gather_patches(keys, ids))  # not detached here: the loss must detach them itself
    q = heads(gather_patches(feats_q, ids))
    loss = patch_nce_loss(q, k, TAU)
    loss.backward()
    assert all(kk.grad is None for kk in keys)
    for name, p in list(g.named_parameters()) + list(heads.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the same gradients as with the keys cut off before the heads (project_patches' shortcut)
    grads = [p.grad.clone() for p in list(g.parameters()) + list(heads.parameters())]
    g.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    fake, feats_k = g.encode(real, NCE_LAYERS, with_output=True)
    q, k, _ = project_patches(heads, g.encode(fake, NCE_LAYERS), feats_k, patch_ids=ids)
    patch_nce_loss(q, k, TAU).backward()
    for a, p in zip(grads, list(g.parameters()) + list(heads.parameters())):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def test_fp32_logits_under_bf16_autocast():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 64, 32), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(2, 64, 32), dim=-1).bfloat16()
    ref = patch_nce_layer_loss(q.float(), k.float(), TAU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.bmm(q.float(), k.float().transpose(1, 2)).dtype == torch.bfloat16  # autocast is on
        got = patch_nce_loss([q, q], [k, k], TAU)
        heads_out = PatchNCEHeads([32], nc=16)([q])[0]
    assert got.dtype == torch.float32 and heads_out.dtype == torch.float32
    # bf16 logits put ~3e-4 into this loss (checked by removing the guard); fp32 ones agree to rounding
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_heads_run_in_fp32_under_half_autocast(dtype):
    """Under --amp the heads' Linear layers take fp32 input and run in fp32: their weight
    gradients reach ~7e4 at the official size, beyond fp16 (65504) before any loss scaling."""
    heads = PatchNCEHeads([4, 8], nc=8)
    seen = []
    for mlp in heads.mlps:
        for layer in (mlp[0], mlp[2]):
            layer.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    feats = [torch.randn(2, 16, 4, dtype=dtype), torch.randn(2, 16, 8, dtype=dtype)]
    with torch.autocast("cpu", dtype=dtype):
        out = heads(feats)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen), seen
    assert all(o.dtype == torch.float32 for o in out)


def test_sampling_and_loss_trace_without_host_sync():
    """One fullgraph trace of encode -> sample -> gather -> heads -> loss: an .item()/.tolist() or
    any data-dependent Python control flow would be a graph break and fail here."""
    torch._dynamo.reset()
    g, heads = _tiny_cut()

    def nce(real):
        fake, feats_k = g.encode(real, NCE_LAYERS, with_output=True)
        q, k, ids = project_patches(heads, g.encode(fake, NCE_LAYERS), feats_k, 256)
        return patch_nce_loss(q, k, TAU), ids

    compiled = torch.compile(nce, backend="eager", fullgraph=True)
    real = torch.randn(1, 3, 16, 16)
    torch.manual_seed(3)
    loss_c, ids_c = compiled(real)
    torch.manual_seed(3)
    loss_e, ids_e = nce(real)
    assert all(torch.equal(a, b) for a, b in zip(ids_c, ids_e))
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    assert all(p.grad is not None for p in heads.parameters())


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------
def test_cut_and_fastcut_presets():
    cut, fast = CUT_PRESETS["cut"], CUT_PRESETS["fastcut"]
    for p in (cut, fast):
        assert p["lambda_gan"] == 1.0 and p["nce_layers"] == (0, 4, 8, 12, 16)
        assert p["num_patches"] == 256 and p["netF_nc"] == 256 and p["nce_T"] == 0.07
        assert p["gan_mode"] == "lsgan" and p["lr"] == 2e-4 and (p["beta1"], p["beta2"]) == (0.5, 0.999)
        assert p["batch_size"] == 1 and p["pool_size"] == 0 and p["init_type"] == "xavier"
        assert p["nce_includes_all_negatives_from_minibatch"] is False
    assert (cut["lambda_nce"], cut["nce_idt"], cut["flip_equivariance"]) == (1.0, True, False)
    assert (cut["epochs"], cut["epochs_decay"]) == (200, 200)
    assert (fast["lambda_nce"], fast["nce_idt"], fast["flip_equivariance"]) == (10.0, False, True)
    assert (fast["epochs"], fast["epochs_decay"]) == (150, 50)
