"""fastcgan-eval: metrics on a test split, ground truth on the synthetic set, and FID/KID that
never download (a clear message instead)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fastcgan import evaluate as ev
from fastcgan.data import ensure_synthetic_dataset
from fastcgan.models import build_generator, save_generator


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("s") / "s32"), size=32, n_train=2, n_test=3)


class Identity(nn.Module):
    config = {"arch": "resnet_6blocks", "input_nc": 3, "output_nc": 3}

    def forward(self, x):
        return x


def test_identity_generators(synth):
    r = ev.evaluate_generators(Identity(), Identity(), synth)
    for d in ("AtoB", "BtoA"):
        assert r[d]["n"] == 3
        assert r[d]["cycle_l1"] == pytest.approx(0.0, abs=1e-7)
        assert r[d]["cycle_psnr"] > 100
        # the "translation" is the input itself, so it scores exactly the identity baseline
        assert r[d]["truth_l1"] == pytest.approx(r[d]["identity_truth_l1"])
        assert 0.3 < r[d]["truth_l1"] < 0.9  # light vs dark renderings differ a lot
    assert "fid_status" not in r  # FID not requested


def test_l1_psnr_values():
    a = [torch.full((3, 4, 4), -1.0)]
    b = [torch.full((3, 4, 4), 0.0)]  # 0 vs 0.5 on [0, 1]
    l1, psnr = ev._l1_psnr(a, b)
    assert l1 == pytest.approx(0.5) and psnr == pytest.approx(10 * math.log10(1 / 0.25))


def test_run_dir_and_single_file(tmp_path, synth):
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_generator(build_generator("resnet_6blocks", ngf=4), run / "generator_AtoB.safetensors")
    save_generator(build_generator("resnet_6blocks", ngf=4), run / "generator_BtoA.safetensors")
    r = ev.evaluate(str(run), synth, device="cpu")
    assert {"AtoB", "BtoA"} <= set(r) and "cycle_l1" in r["AtoB"] and "truth_l1" in r["BtoA"]
    one = ev.evaluate(str(run / "generator_BtoA.safetensors"), synth, device="cpu", direction="BtoA")
    assert set(one) == {"BtoA"} and "cycle_l1" not in one["BtoA"] and "truth_l1" in one["BtoA"]
    assert one["BtoA"]["truth_l1"] == pytest.approx(r["BtoA"]["truth_l1"], abs=1e-6)


def test_odd_sizes_are_padded(tmp_path):
    from PIL import Image

    for d in ("testA", "testB"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (37, 29), (200, 10, 10)).save(tmp_path / d / "x.png")
    r = ev.evaluate_generators(Identity(), Identity(), str(tmp_path))
    assert r["AtoB"]["n"] == 1 and r["AtoB"]["cycle_l1"] == pytest.approx(0.0, abs=1e-7)


def test_fid_skipped_with_clear_message(synth, monkeypatch, tmp_path):
    monkeypatch.delenv(ev.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    # without torch-fidelity
    monkeypatch.setattr(ev, "_fidelity_installed", lambda: False)
    path, msg = ev.inception_weights()
    assert path is None and "torch-fidelity is not installed" in msg and "never downloads" in msg
    assert ev.INCEPTION_WEIGHTS_FILE in msg and "--inception-weights" in msg
    # with torch-fidelity but no weights file anywhere
    monkeypatch.setattr(ev, "_fidelity_installed", lambda: True)
    path, msg = ev.inception_weights()
    assert path is None and str(tmp_path / "hub" / "checkpoints" / ev.INCEPTION_WEIGHTS_FILE) in msg
    path, msg = ev.inception_weights(str(tmp_path / "missing.pth"))
    assert path is None and "missing.pth: no such file" in msg
    # an existing file is accepted (not loaded here)
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    assert ev.inception_weights(str(w)) == (str(w), "")
    monkeypatch.setenv(ev.INCEPTION_ENV, str(w))
    assert ev.inception_weights() == (str(w), "")
    # evaluation carries on without FID and says why
    monkeypatch.setattr(ev, "_fidelity_installed", lambda: False)
    r = ev.evaluate_generators(Identity(), None, synth, fid=True)
    assert "AtoB" in r and "fid" not in r["AtoB"] and "FID/KID skipped" in r["fid_status"]


def test_cli(tmp_path, synth, capsys):
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    for d in ("AtoB", "BtoA"):
        save_generator(build_generator("resnet_6blocks", ngf=4), run / f"generator_{d}.safetensors")
    out = tmp_path / "r.json"
    assert (
        ev.main(["--checkpoint", str(run), "--dataroot", synth, "--device", "cpu", "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "AtoB:" in text and "truth_l1=" in text
    if not ev._fidelity_installed():
        assert "FID/KID skipped" in text
    assert json.loads(out.read_text())["AtoB"]["n"] == 3
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", str(run), "--dataroot", str(tmp_path / "nope")])
    assert "--dataroot" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(run), "--dataroot", str(tmp_path)]) == 2  # no testA/
    assert "testA" in capsys.readouterr().err
