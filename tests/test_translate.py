"""fastcgan-translate end to end: a saved generator over a folder of real and awkward images."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastcgan.models import build_generator, save_generator
from fastcgan.translate import main


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "run"
    d.mkdir()
    save_generator(build_generator("resnet_6blocks", ngf=4), d / "generator_AtoB.safetensors")
    save_generator(build_generator("resnet_6blocks", ngf=4), d / "generator_BtoA.safetensors")
    return d


@pytest.fixture
def images(tmp_path, monet2photo_mini):
    src = os.path.join(monet2photo_mini, "testA")
    names = sorted(os.listdir(src))[:2]
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    shutil.copy(os.path.join(src, names[0]), d / "with space.jpg")
    shutil.copy(os.path.join(src, names[1]), d / "sub" / "b.jpg")
    img = Image.open(os.path.join(src, names[0])).convert("RGB")
    img.crop((0, 0, 101, 77)).save(d / "odd size.png")  # not a multiple of 4
    img.convert("L").resize((50, 30)).save(d / "gray.png")  # 1-channel file, converted to RGB
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return d


def test_translate_folder(run_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="broken.jpg"):
        rc = main(["--checkpoint", str(run_dir), "--input", str(images), "--output", str(out),
                   "--batch-size", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    msg = capsys.readouterr().out
    assert "translated 4 image(s)" in msg and "skipped 1" in msg
    expect = {"with space.png": (256, 256), "sub/b.png": (256, 256), "odd size.png": (77, 101), "gray.png": (30, 50)}
    for name, (h, w) in expect.items():
        im = Image.open(out / name)
        assert im.size == (w, h) and im.mode == "RGB", name
    assert not (out / "broken.png").exists()
    # The file translated alone gives the same pixels as in the folder batch.
    single = tmp_path / "single"
    assert main(["--checkpoint", str(run_dir), "--input", str(images / "odd size.png"), "--output", str(single),
                 "--device", "cpu", "--no-progress", "--direction", "AtoB"]) == 0
    np.testing.assert_array_equal(np.array(Image.open(single / "odd size.png")), np.array(Image.open(out / "odd size.png")))
    # BtoA uses the other generator.
    other = tmp_path / "other"
    assert main(["--checkpoint", str(run_dir), "--input", str(images / "odd size.png"), "--output", str(other),
                 "--device", "cpu", "--no-progress", "--direction", "BtoA"]) == 0
    assert not np.array_equal(np.array(Image.open(other / "odd size.png")), np.array(Image.open(out / "odd size.png")))


def test_translate_tiled_onnx(run_dir, images, tmp_path):
    from fastcgan.deploy import cli

    onnx_path = tmp_path / "g.onnx"
    assert cli.main([str(run_dir), "--onnx", str(onnx_path), "--verify-sizes", "1x32x32"]) == 0
    out = tmp_path / "out"
    assert main(["--checkpoint", str(onnx_path), "--input", str(images / "with space.jpg"), "--output", str(out),
                 "--tile", "128", "--tile-overlap", "32", "--no-progress"]) == 0
    assert Image.open(out / "with space.png").size == (256, 256)


def test_translate_errors(run_dir, tmp_path, capsys):
    assert main(["--checkpoint", str(run_dir), "--input", str(tmp_path / "missing"), "--output",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--checkpoint", str(run_dir), "--input", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "no image files" in capsys.readouterr().err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    (empty / "x.png").write_bytes(b"")
    assert main(["--checkpoint", str(bad), "--input", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "bad.onnx" in capsys.readouterr().err
    # Every file unreadable: nothing translated -> exit 1.
    with pytest.warns(UserWarning, match="x.png"):
        assert main(["--checkpoint", str(run_dir), "--input", str(empty), "--output", str(tmp_path / "o"),
                     "--no-progress"]) == 1
