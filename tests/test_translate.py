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


def test_translate_html_results_page(run_dir, images, tmp_path, capsys):
    """--html: OUTPUT/index.html shows every translated input beside its output (links relative
    to the page, URL-quoted); a file name is text, never markup; the page is an output like the
    images (refused over an existing one without --overwrite, never written over an input)."""
    import re
    from urllib.parse import unquote, unquote_to_bytes

    hostile = images / 'x"><b onmouseover=alert(1)>#?.png'
    shutil.copy(images / "gray.png", hostile)
    latin1 = os.path.join(os.fsencode(images), b"caf\xe9.png")  # not UTF-8: a surrogate-escaped str
    shutil.copy(os.fsencode(images / "gray.png"), latin1)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(run_dir), "--input", str(images), "--output", str(out), "--device", "cpu",
            "--no-progress", "--html"]
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert main(argv) == 0
    page = (out / "index.html").read_text()
    assert "<b " not in page and "&lt;b onmouseover" in page
    links = re.findall(r'<img src="([^"]+)"', page)
    assert len(links) == 2 * 6  # 6 readable inputs, each with its translation
    for link in links:
        assert os.path.isfile(os.path.join(os.fsencode(out), unquote_to_bytes(link))), link
    assert {os.path.basename(unquote(u)) for u in links[1::2]} == {
        "with space.png", "b.png", "odd size.png", "gray.png", 'x"><b onmouseover=alert(1)>#?.png', "caf\ufffd.png"}
    assert "caf%E9.png" in page and "caf\ufffd.png" in page  # the file's own bytes; shown readable
    assert "broken.jpg" in page  # listed as skipped
    capsys.readouterr()
    # An existing page is an existing output.
    before = (out / "index.html").read_bytes()
    for png in out.rglob("*.png"):
        png.unlink()
    assert main(argv) == 2
    assert "index.html" in capsys.readouterr().err and (out / "index.html").read_bytes() == before
    # An input that is called index.html (a single file, decoded whatever its name) in the output
    # folder is never replaced by the page.
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(images / "gray.png", lone / "index.html")
    with pytest.warns(UserWarning, match="extension"):
        rc = main(["--checkpoint", str(run_dir), "--input", str(lone / "index.html"), "--output", str(lone),
                   "--device", "cpu", "--no-progress", "--html"])
    assert rc == 2 and "input file" in capsys.readouterr().err
    assert (lone / "index.html").read_bytes() == (images / "gray.png").read_bytes()


def _save_pair(monet2photo_mini, path, w, h):
    """Two test photos at w x h side by side in one A|B file at ``path``: (A half, B half, the pair)."""
    src = os.path.join(monet2photo_mini, "testA")
    a, b = (Image.open(os.path.join(src, n)).convert("RGB").resize((w, h)) for n in sorted(os.listdir(src))[:2])
    pair = Image.new("RGB", (2 * w, h))
    pair.paste(a, (0, 0))
    pair.paste(b, (w, 0))
    pair.save(path)
    return a, b, pair


def test_translate_pairs_takes_the_input_half(run_dir, tmp_path, monet2photo_mini, capsys):
    """--pairs (pix2pix test splits, A|B side by side): the input half is translated -- by default
    the run's own --direction (config.json), with the run's one generator (pix2pix: AtoB) -- and
    the page shows each whole pair beside the translation. Odd-width pairs are skipped."""
    import json

    from fastcgan.deploy import load

    pairs = tmp_path / "test"
    pairs.mkdir()
    a, b, pair = _save_pair(monet2photo_mini, pairs / "1.png", 64, 48)
    pair.crop((0, 0, 127, 48)).save(pairs / "odd.png")
    p2p = tmp_path / "p2p"  # a pix2pix run trained BtoA: one generator, AtoB
    p2p.mkdir()
    shutil.copy(run_dir / "generator_AtoB.safetensors", p2p)
    (p2p / "config.json").write_text(json.dumps({"data": {"direction": "BtoA"}}))

    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="odd.png.*width 127 is odd"):
        rc = main(["--checkpoint", str(p2p), "--input", str(pairs), "--output", str(out), "--pairs", "--html",
                   "--device", "cpu", "--no-progress"])
    assert rc == 0 and "skipped 1" in capsys.readouterr().out
    g = load(str(run_dir), direction="AtoB", device="cpu")
    got = np.array(Image.open(out / "1.png"))
    _assert_same_pixels(got, g(np.array(b)))  # the B half (the run's direction), 64 wide
    assert got.shape == (48, 64, 3)
    page = (out / "index.html").read_text()
    assert "pair: target | input" in page and "BtoA, pairs" in page and "../test/1.png" in page

    # --direction overrides the run's; a CycleGAN run uses its generator of that direction.
    for ckpt, direction, half, gen in ((p2p, "AtoB", a, "AtoB"), (run_dir, "BtoA", b, "BtoA")):
        o = tmp_path / f"o-{ckpt.name}-{direction}"
        assert main(["--checkpoint", str(ckpt), "--input", str(pairs / "1.png"), "--output", str(o), "--pairs",
                     "--direction", direction, "--device", "cpu", "--no-progress"]) == 0
        _assert_same_pixels(np.array(Image.open(o / "1.png")), load(str(run_dir), direction=gen, device="cpu")(
            np.array(half)))


def _assert_same_pixels(got, want):
    """Equal but for rounding ties: the CLI and the array API scale uint8 by different (equal in
    exact arithmetic) float expressions, so a value at .5 may round either way."""
    d = np.abs(got.astype(int) - want.astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 1e-3, (d.max(), (d > 0).sum())


def test_translate_max_images(run_dir, images, tmp_path, capsys):
    """--max-images N (the official test.py --num_test): the first N images by path, counted after
    earlier outputs inside the input folder are set aside; N < 1 is refused before anything runs."""
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="broken.jpg"):  # broken.jpg (skipped), gray.png, odd size.png
        assert main(["--checkpoint", str(run_dir), "--input", str(images), "--output", str(out), "--max-images",
                     "3", "--device", "cpu", "--no-progress"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["gray.png", "odd size.png"]
    assert main(["--checkpoint", str(run_dir), "--input", str(images), "--output", str(tmp_path / "x"),
                 "--max-images", "0"]) == 2
    assert "--max-images must be >= 1" in capsys.readouterr().err and not (tmp_path / "x").exists()



def test_one_generator_file_is_labelled_with_its_direction(run_dir, images, tmp_path):
    """The results page said AtoB for a run's generator_BtoA.safetensors."""
    ba = run_dir / "generator_BtoA.safetensors"
    one = images / "sub" / "b.jpg"
    out = tmp_path / "o"
    assert main(["--checkpoint", str(ba), "--input", str(one), "--output", str(out), "--html",
                 "--device", "cpu", "--no-progress"]) == 0
    assert "(BtoA, torch)" in (out / "index.html").read_text()


def test_flags_that_would_do_nothing_exit_2(run_dir, images, tmp_path, capsys):
    """--direction with one generator file (no --pairs) only relabelled the page; --max-images
    with one input file; one unreadable input file was exit 1 after creating the output folder."""
    one = images / "sub" / "b.jpg"
    ba = run_dir / "generator_BtoA.safetensors"
    for ckpt, inp, flags, said in (
        (ba, one, ["--direction", "AtoB"], "--direction picks a generator of a run directory"),
        (run_dir, one, ["--max-images", "1"], "--max-images 1: --input"),
        (run_dir, images / "broken.jpg", [], "broken.jpg: not an image in a format read here (JPEG, PNG"),
    ):
        assert main(["--checkpoint", str(ckpt), "--input", str(inp), "--output", str(tmp_path / "o"),
                     "--device", "cpu", "--no-progress", *flags]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_pairs_with_an_exported_pix2pix_generator_read_its_half(tmp_path, monet2photo_mini):
    """--pairs with a pix2pix generator file alone (no run directory) translated the A half of a
    generator trained BtoA; the file records the half it reads."""
    from fastcgan.deploy import load

    a, b, _ = _save_pair(monet2photo_mini, tmp_path / "1.png", 64, 48)
    torch.manual_seed(0)
    st = tmp_path / "p2p.safetensors"
    save_generator(build_generator("resnet_6blocks", ngf=4), st, direction="AtoB", pairs_direction="BtoA")
    assert main(["--checkpoint", str(st), "--input", str(tmp_path / "1.png"), "--output", str(tmp_path / "o"),
                 "--pairs", "--device", "cpu", "--no-progress"]) == 0
    _assert_same_pixels(np.array(Image.open(tmp_path / "o" / "1.png")), load(str(st), device="cpu")(np.array(b)))


def test_one_undecodable_input_file_is_exit_2(run_dir, images, tmp_path, capsys):
    """A truncated single --input file was exit 1 (a garbage one exit 2): both are bad input."""
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes((images / "with space.jpg").read_bytes()[:2000])
    with pytest.warns(UserWarning, match="trunc.jpg"):
        assert main(["--checkpoint", str(run_dir), "--input", str(trunc), "--output", str(tmp_path / "o"),
                     "--device", "cpu", "--no-progress"]) == 2
    assert not (tmp_path / "o").exists()


def test_load_size_resizes_as_the_official_test(run_dir, images, tmp_path, monet2photo_mini, capsys):
    """--load-size N: every input (a pair's half with --pairs) resized to N x N with PIL's bicubic
    filter first, as the official test.py (load_size = crop_size), so outputs are N x N."""
    from fastcgan.deploy import load

    g = load(str(run_dir), direction="AtoB", device="cpu")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert main(["--checkpoint", str(run_dir), "--input", str(images), "--output", str(out), "--load-size",
                     "40", "--direction", "AtoB", "--device", "cpu", "--no-progress"]) == 0
    for name, src in (("odd size.png", "odd size.png"), ("gray.png", "gray.png")):
        want = g(np.array(Image.open(images / src).convert("RGB").resize((40, 40), Image.BICUBIC)))
        _assert_same_pixels(np.array(Image.open(out / name)), want)
    # A pair: each half resized (the official AlignedDataset at test time).
    a, _, _ = _save_pair(monet2photo_mini, tmp_path / "pair.png", 60, 36)
    o = tmp_path / "pairs"
    assert main(["--checkpoint", str(run_dir), "--input", str(tmp_path / "pair.png"), "--output", str(o), "--pairs",
                 "--load-size", "32", "--direction", "AtoB", "--device", "cpu", "--no-progress"]) == 0
    _assert_same_pixels(np.array(Image.open(o / "pair.png")), g(np.array(a.resize((32, 32), Image.BICUBIC))))
    capsys.readouterr()
    for bad in ("0", "4097", "-3"):
        assert main(["--checkpoint", str(run_dir), "--input", str(images), "--output", str(tmp_path / "x"),
                     "--load-size", bad, "--no-progress"]) == 2
        assert f"--load-size must be in [1, 4096], got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag,value,msg", [("--max-image-pixels", "-1", "--max-image-pixels must be >= 0"),
                                            ("--batch-size", "0", "--batch-size must be in"),
                                            ("--max-images", "0", "--max-images must be >= 1")])
def test_bad_numbers_are_exit_2_before_anything_is_written(run_dir, images, tmp_path, capsys, flag, value, msg):
    out = tmp_path / "out"
    assert main(["--checkpoint", str(run_dir), "--input", str(images), "--output", str(out), flag, value,
                 "--no-progress"]) == 2
    assert msg in capsys.readouterr().err and not out.exists()


def test_a_folder_without_generators_says_what_to_give(tmp_path, capsys):
    """--checkpoint RUN/checkpoints or a folder of runs said 'has no generator_AtoB.safetensors
    (found [])': now it says which folder to give."""
    run = tmp_path / "runs" / "mini"
    (run / "checkpoints").mkdir(parents=True)
    save_generator(build_generator("resnet_6blocks", ngf=4), run / "generator_AtoB.safetensors")
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a.png")
    for given, hint in ((run / "checkpoints", f"give the run ({run})"), (tmp_path / "runs", f"give one of {run}")):
        assert main(["--checkpoint", str(given), "--input", str(src), "--output", str(tmp_path / "o"),
                     "--device", "cpu", "--no-progress"]) == 2
        assert hint in capsys.readouterr().err


def test_the_results_page_is_written_row_by_row(tmp_path):
    """The page was built whole in memory (a folder of 200 k images: a 470 MB page at ~3x that);
    it is a stream of pieces now, one per row, written as it is made."""
    from fastcgan.translate import _results_page

    rows = [(str(tmp_path / f"in{i}.jpg"), str(tmp_path / "out" / f"in{i}.png")) for i in range(3)]
    pieces = list(_results_page("t <b>", rows, ["<odd>.jpg"], str(tmp_path / "out")))
    page = b"".join(pieces).decode()
    assert len(pieces) >= 5 and all(p.count(b"<tr>") <= 1 for p in pieces)
    assert [page.index(f"in{i}.png") for i in range(3)] == sorted(page.index(f"in{i}.png") for i in range(3))
    assert "t &lt;b&gt;" in page and "&lt;odd&gt;.jpg" in page and page.endswith("</body></html>\n")
