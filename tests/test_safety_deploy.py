"""Nothing lost, nothing run (issue 12, the translate / deploy / data / model-file part).

Each test reproduces a case that lost data, grew without bound or ran foreign code before:
translate writing over its inputs, an overlap that made millions of tiles, a 12000 x 12000 PNG
decoded in full, a tampered ``.pt2`` whose shared library ran on load, a flipped byte in a
generator file, raw tracebacks and advice to load pickles with ``weights_only=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch
from fastcgan.deploy import ArtifactError, load, tiling
from fastcgan.deploy.manifest import UntrustedArtifactError, manifest_path, write_manifest
from PIL import Image

from fastcgan.data import BadImageError, open_image
from fastcgan.data import images as image_mod
from fastcgan.data.datasets import SkippedImageWarning, UnalignedDataset
from fastcgan.models import build_generator, load_generator, save_generator
from fastcgan.models.io import GeneratorIntegrityError, remove_stale_generator_temporaries
from fastcgan.translate import main as translate

NO_GPU = not torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture
def gen_file(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "run"
    d.mkdir()
    save_generator(build_generator("resnet_6blocks", ngf=4), d / "generator_AtoB.safetensors")
    return d / "generator_AtoB.safetensors"


def _pngs(folder, n=2, size=(40, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _png_bomb(path, w, h):
    """A valid grayscale PNG of w x h zero pixels in a few hundred KB (no pixel buffer built)."""

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    c = zlib.compressobj(1)
    row = b"\x00" * (w + 1)
    data = b"".join(c.compress(row) for _ in range(h)) + c.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return _png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png", 12000, 12000)


def _run(args, tmp_path, *extra):
    return translate(["--checkpoint", str(args), *extra, "--device", "cpu", "--no-progress"])


# --------------------------------------------------------------------------------------------
# 1. inputs are never overwritten
# --------------------------------------------------------------------------------------------
def test_translate_in_place_is_refused_and_inputs_unchanged(gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos")
    before = _digests(src)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(src), "--device", "cpu",
                    "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "is the input directory" in err and str(src) in err
    assert _digests(src) == before
    # The same folder through a symlink, and with --overwrite: still refused.
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(link), "--overwrite",
                    "--device", "cpu", "--no-progress"])
    assert rc == 2 and "input directory" in capsys.readouterr().err
    assert _digests(src) == before


def test_translate_output_file_is_the_input_file(gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos", n=1)
    f = src / "im0.png"
    before = _digests(src)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(f), "--output", str(f), "--device", "cpu",
                    "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "is the input file" in err and "Traceback" not in err
    assert _digests(src) == before


def test_translate_output_named_like_an_image_is_refused(gen_file, tmp_path, capsys):
    """--output out/zebra.png made a folder called zebra.png holding im0.png: now exit 2 saying
    --output is a folder; an existing folder of that name is still a folder."""
    src = _pngs(tmp_path / "photos", n=1)
    argv = ["--checkpoint", str(gen_file), "--input", str(src / "im0.png"), "--device", "cpu", "--no-progress"]
    rc = translate([*argv, "--output", str(tmp_path / "out" / "zebra.PNG")])
    err = capsys.readouterr().err
    assert rc == 2 and "names an image file" in err and f"--output {tmp_path / 'out'}" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "odd.png").mkdir()
    assert translate([*argv, "--output", str(tmp_path / "odd.png")]) == 0
    assert (tmp_path / "odd.png" / "im0.png").is_file()


def test_translate_never_writes_through_a_symlink_to_an_input(gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos", n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "im0.png").symlink_to(src / "im0.png")  # the output name points at the input
    before = _digests(src)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--overwrite",
                    "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "would overwrite the input file" in err and "im0.png" in err
    assert _digests(src) == before


def test_translate_never_writes_through_a_hard_link_to_another_input(gen_file, tmp_path, capsys):
    """out/im0.png is a hard link to the *other* input (im1.png): no path resolves to an input, only
    the inode says that writing im0's translation there would replace im1's pixels."""
    src = _pngs(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    os.link(src / "im1.png", out / "im0.png")
    before = _digests(src)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--overwrite",
                    "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "would overwrite the input file" in err and "im1.png" in err
    assert _digests(src) == before and not (out / "im1.png").exists()


def test_output_names_count_past_every_taken_name():
    """A name taken twice over: a.jpg / a.png clash (both keep their full names), a.png's full name
    is another input's, and so is its first counted name: four inputs, four outputs."""
    from fastcgan.translate import _output_names

    names = _output_names(["a.jpg", "a.png", "a.png.1.png", "a.png.png"], None)
    assert names == ["a.jpg.png", "a.png.png", "a.png.1.png", "a.png.2.png"]


def test_translate_existing_outputs_need_overwrite(gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    (out / "im1.png").write_bytes(b"previous result")
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--device", "cpu",
                    "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "im1.png" in err
    assert (out / "im1.png").read_bytes() == b"previous result" and not (out / "im0.png").exists()
    assert translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--overwrite",
                      "--device", "cpu", "--no-progress"]) == 0
    assert Image.open(out / "im1.png").size == (40, 32)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # atomic writes leave no temporaries


def test_translate_output_inside_input_skips_earlier_outputs(gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos")
    out = src / "translated"
    args = ["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--device", "cpu",
            "--no-progress"]
    assert translate(args) == 0
    assert translate(args + ["--overwrite"]) == 0
    assert "translated 2 image(s)" in capsys.readouterr().out  # not 4: earlier outputs are not inputs
    assert sorted(os.listdir(out)) == ["im0.png", "im1.png"]


def test_telling_outputs_apart_decodes_nothing(gen_file, tmp_path, monkeypatch):
    """Each image in an output folder inside --input was decoded whole (PIL's .text loads the
    pixels) just to read the mark that says it is a translation."""
    from PIL import ImageFile

    from fastcgan import translate as tr

    src = _pngs(tmp_path / "photos", n=1)
    out = tmp_path / "out"
    assert translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--device", "cpu",
                      "--no-progress"]) == 0  # fmt: skip

    def no_decode(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert tr._is_output_of_ours(str(out / "im0.png")) and not tr._is_output_of_ours(str(src / "im0.png"))


def test_telling_outputs_apart_refuses_a_png_of_millions_of_chunks_unread(tmp_path, monkeypatch):
    """The mark is read with open(), which walks every chunk before the pixels: a PNG of millions
    of tiny chunks is refused unread here too (by its chunk count, as every image reader here
    refuses it), and is not one of ours."""
    from PIL import Image as PILImage

    from fastcgan import translate as tr
    from fastcgan.data.images import MAX_METADATA_SEGMENTS

    buf = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(buf, format="PNG")
    png = buf.getvalue()
    body = b"Software\0fastcgan-translate"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    many = tmp_path / "many.png"
    many.write_bytes(png[:33] + chunk * (MAX_METADATA_SEGMENTS + 1) + png[33:])  # after IHDR

    opened = []
    real_open = PILImage.open
    monkeypatch.setattr(PILImage, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    assert not tr._is_output_of_ours(str(many)) and not opened  # (its mark would make it one of ours)


def test_translate_never_overwrites_user_images_inside_a_nested_output(gen_file, tmp_path, capsys):
    """An --output folder inside --input: earlier translations there are skipped as inputs, but a
    user's own image there is an input. It used to be skipped as 'output' too, so --overwrite
    replaced it with the translation of its namesake one level up."""
    src = _pngs(tmp_path / "nest")
    (src / "sub").mkdir()
    shutil.copy(src / "im0.png", src / "sub" / "im0.png")  # the user's image, not a translation
    before = _digests(src)
    args = ["--checkpoint", str(gen_file), "--input", str(src), "--output", str(src / "sub"), "--device", "cpu",
            "--no-progress", "--overwrite"]  # fmt: skip
    assert translate(args) == 2
    assert "would overwrite the input file" in capsys.readouterr().err
    assert _digests(src) == before


def test_translate_gives_every_input_its_own_output(gen_file, tmp_path, capsys):
    """a.jpg and a.png clash on a.png, so both keep their full names -- and a.png.png then took
    a.png's (one translation silently written over the other, 'translated 3 image(s)')."""
    src = tmp_path / "coll"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "a.png", "a.png.png"):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(src / name)
    out = tmp_path / "out"
    assert translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--device", "cpu",
                      "--no-progress"]) == 0  # fmt: skip
    # The documented names: the clash keeps full names, a name still taken gets a counter.
    assert sorted(os.listdir(out)) == ["a.jpg.png", "a.png.1.png", "a.png.png"]


@pytest.mark.parametrize("case", ["dangling-link", "under-a-file"])
def test_translate_output_that_cannot_be_a_folder_exits_2_first(gen_file, tmp_path, case, capsys):
    src = _pngs(tmp_path / "photos", n=1)
    if case == "dangling-link":
        out = tmp_path / "dl"
        out.symlink_to(tmp_path / "nowhere" / "x")
    else:
        out = src / "im0.png" / "sub"
    before = _digests(tmp_path)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--device", "cpu",
                    "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--output" in err and "Traceback" not in err, err
    assert _digests(tmp_path) == before


@pytest.mark.parametrize("where", ["proc", "read-only", "long-name", "link-dotdot"])
@pytest.mark.parametrize("tool", ["translate", "eval", "export"])
def test_outputs_where_nothing_can_be_written_exit_2_first(gen_file, tmp_path, tool, where, monkeypatch, capsys):
    """os.access says yes for root, for /proc and /sys: a folder is tried before any work, and the
    names to be made are measured against the file system's limit."""
    from fastcgan.deploy.cli import main as export
    from fastcgan.evaluate import main as evaluate

    if where in ("proc", "link-dotdot") and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    if where == "proc":
        base = "/proc/fastcgan-test/sub"
    elif where == "link-dotdot":  # as text tmp_path/sub; the kernel resolves it to /proc/sub
        (tmp_path / "plink").symlink_to("/proc/self")
        base = str(tmp_path / "plink" / ".." / "sub")
    elif where == "long-name":
        base = str(tmp_path / ("n" * 300) / "sub")
    else:
        import errno

        base = str(tmp_path / "ro" / "sub")
        (tmp_path / "ro").mkdir()

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr("fastcgan.fileio.tempfile.mkstemp", read_only)
    src = _pngs(tmp_path / "data" / "testA", n=1)
    shutil.copytree(src, tmp_path / "data" / "testB")
    before = _digests(tmp_path)
    if tool == "translate":
        flag, rc = "--output", _run(gen_file, tmp_path, "--input", str(src), "--output", base)
    elif tool == "eval":
        with pytest.raises(SystemExit) as exit_:  # argparse's error()
            evaluate(["--checkpoint", str(gen_file), "--dataroot", str(tmp_path / "data"), "--no-fid",
                      "--device", "cpu", "--json", base + "/r.json"])  # fmt: skip
        flag, rc = "--json", exit_.value.code
    else:
        flag, rc = "--onnx", export([str(gen_file), "--onnx", base + "/g.onnx"])
    out, err = capsys.readouterr()
    said = "bytes; this file system takes" if where == "long-name" else "cannot write in"
    assert rc == 2 and f"{flag} " in err and said in err and "Traceback" not in err, err
    assert "n=" not in out  # refused before translating or scoring anything
    assert _digests(tmp_path) == before and not os.path.exists(base) and not os.path.exists(tmp_path / "sub")


def test_export_that_cannot_stage_after_the_checks_fails_cleanly(gen_file, tmp_path, monkeypatch, capsys):
    """A folder that turns unwritable (or a disk that fills) after the up-front checks: the staging
    folder's OSError was a traceback; now an error naming it, exit 1, nothing installed."""
    import errno

    import fastcgan.deploy.cli as export_cli

    def unwritable(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(export_cli.tempfile, "TemporaryDirectory", unwritable)
    rc = export_cli.main([str(gen_file), "--onnx", str(tmp_path / "out" / "g.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and "Permission denied" in err and str(tmp_path / "out") in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")  # the folder made for it is removed again


def test_outputs_that_are_not_regular_files_are_never_replaced(gen_file, tmp_path, capsys):
    """--overwrite replaced a FIFO or device node with a regular file (as root, --safetensors
    /dev/null --overwrite would have replaced the system's /dev/null); eval --json on a FIFO hung
    reading it; translate --output '' (an unset variable) wrote into the current folder."""
    from fastcgan.deploy.cli import main as export
    from fastcgan.evaluate import main as evaluate

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    src = _pngs(tmp_path / "data" / "testA", n=1)
    shutil.copytree(src, tmp_path / "data" / "testB")
    with pytest.raises(SystemExit) as exit_:
        evaluate(["--checkpoint", str(gen_file), "--dataroot", str(tmp_path / "data"), "--no-fid", "--device", "cpu",
                  "--json", str(fifo), "--overwrite"])  # fmt: skip
    assert exit_.value.code == 2 and "not a regular file" in capsys.readouterr().err
    onnx_fifo = tmp_path / "g.onnx"
    os.mkfifo(onnx_fifo)
    assert export([str(gen_file), "--onnx", str(onnx_fifo), "--overwrite"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "im0.png")
    assert _run(gen_file, tmp_path, "--input", str(src), "--output", str(tmp_path / "out"), "--overwrite") == 2
    assert "not a regular file" in capsys.readouterr().err
    assert _run(gen_file, tmp_path, "--input", str(src), "--output", "") == 2
    assert "--output is empty" in capsys.readouterr().err
    assert all(stat.S_ISFIFO(os.stat(f).st_mode) for f in (fifo, onnx_fifo, tmp_path / "out" / "im0.png"))


def test_output_names_keep_room_for_temporaries_and_manifests(tmp_path):
    """A 240-byte file name fits the usual 255-byte limit, but its temporary ``.NAME.<pid>.tmp``
    and an artifact's ``NAME.manifest.json`` do not: refused up front, not at the write."""
    from fastcgan.fileio import output_folder_problem

    limit = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    assert output_folder_problem(str(tmp_path / "new" / "deeper"), "X", ["g" * (limit - 32)]) is None
    assert f"X: the name {'g' * 24}... is {limit - 31} bytes; this file system takes {limit - 32}" in \
        output_folder_problem(str(tmp_path), "X", ["g" * (limit - 31)])
    assert f"takes {limit}" in output_folder_problem(str(tmp_path / ("d" * (limit + 1)) / "x"), "X")
    (tmp_path / "f").touch()
    assert output_folder_problem(str(tmp_path / "f" / "x"), "X") == f"X: {tmp_path / 'f'} is not a folder"
    assert os.listdir(tmp_path) == ["f"]  # the probes leave nothing


def test_the_write_probe_writes_a_file_and_measures_the_whole_path(tmp_path, monkeypatch):
    """A full disk (or a file-size limit) lets a folder be made but no data written: the probe
    writes and syncs 4 KiB. A path of short names can still pass PATH_MAX."""
    import errno

    from fastcgan.fileio import output_folder_problem

    deep = os.path.join(str(tmp_path), *["p" * 250] * 20)
    assert "this system takes" in output_folder_problem(deep, "X")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fastcgan.fileio.os.write", full)
    said = output_folder_problem(str(tmp_path / "o"), "X")
    assert said == f"X: cannot write in {tmp_path} (no space left on the device)"
    assert os.listdir(tmp_path) == []


def test_translate_that_translates_nothing_leaves_no_folder(gen_file, tmp_path, capsys):
    """A folder of unreadable files: exit 1, no output folder (one unreadable --input file is a
    usage error, exit 2: test_translate.py)."""
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "notes.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="notes.png"):
        rc = translate(["--checkpoint", str(gen_file), "--input", str(bad.parent), "--output", str(out), "--html",
                        "--device", "cpu", "--no-progress"])  # fmt: skip
    assert rc == 1 and not out.exists()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    from fastcgan.deploy.onnx_export import export_onnx
    from fastcgan.deploy._common import GeneratorSpec

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "g.onnx"
    export_onnx(build_generator("resnet_6blocks", ngf=4), str(path), GeneratorSpec(arch="resnet_6blocks"))
    return path


@pytest.mark.parametrize(
    "field,value",
    [("size_multiple", 0), ("size_multiple", "4"), ("min_size", 60000), ("static_hw", [60000, 60000]),
     ("static_hw", [8]), ("input_nc", "3"), (None, "{not json")],
)
def test_crafted_onnx_metadata_is_refused_naming_the_file(onnx_file, tmp_path, field, value, capsys):
    """An ONNX model is data and always loads, so its fastcgan metadata may be anything: a
    size_multiple of 0 was a ZeroDivisionError, static_hw 60000² asked for 43 GB, a string where a
    number belongs a TypeError -- tracebacks, and an output folder left behind."""
    import onnx

    from fastcgan.deploy._common import METADATA_KEY

    proto = onnx.load(str(onnx_file))
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            meta = json.loads(p.value)
            if field is None:
                p.value = value
            else:
                meta[field] = value
                p.value = json.dumps(meta)
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    src, out = _pngs(tmp_path / "photos", n=1, size=(256, 256)), tmp_path / "out"
    rc = translate(["--checkpoint", str(bad), "--input", str(src), "--output", str(out), "--device", "cpu",
                    "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "metadata" in err and "Traceback" not in err, err
    assert not out.exists()


def test_generator_file_cannot_ask_for_a_huge_network(tmp_path, capsys):
    """The network is built from a .safetensors file's config before its tensors are compared
    with it: a 216-byte file claiming ngf 600 made the loader allocate 4.4 GB first."""
    from safetensors.torch import save_file

    cfg = {"arch": "resnet_9blocks", "input_nc": 3, "output_nc": 3, "ngf": 100000, "norm": "instance",
           "use_dropout": False}  # fmt: skip
    path = tmp_path / "huge.safetensors"
    save_file({}, str(path), metadata={"format": "fastcgan.generator", "format_version": "1",
                                        "config": json.dumps(cfg)})  # fmt: skip
    src, out = _pngs(tmp_path / "photos", n=1), tmp_path / "out"
    rc = translate(["--checkpoint", str(path), "--input", str(src), "--output", str(out), "--device", "cpu",
                    "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "ngf" in err and "Traceback" not in err, err


def test_runtime_reads_pil_images_as_translate_reads_files(gen_file, tmp_path):
    """Translator(PIL RGBA) dropped the alpha (transparent pixels read as black) while the CLI
    composites transparency on white: the same picture gave two translations. Also: an upper-case
    .SAFETENSORS loads, empty images and a bad batch_size / tile_overlap are clear errors."""
    rgba = np.zeros((32, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :20, 3] = 255  # left half opaque red, right half fully transparent
    im = Image.fromarray(rgba, "RGBA")
    im.save(tmp_path / "a.png")
    upper = tmp_path / "G.SAFETENSORS"
    shutil.copy(gen_file, upper)
    tr = load(str(upper), device="cpu")
    got = np.asarray(tr(im))
    want = np.asarray(tr(open_image(str(tmp_path / "a.png"))))
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="empty image"):
        tr(np.zeros((0, 5, 3), np.uint8))
    for bad in (dict(batch_size=-5), dict(tile_overlap=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            load(str(gen_file), device="cpu", **bad)


# --------------------------------------------------------------------------------------------
# 2. resource limits with names
# --------------------------------------------------------------------------------------------
def test_tile_below_the_generator_minimum_names_the_flag(gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos", n=1)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(tmp_path / "out"),
                    "--tile", "4", "--tile-overlap", "1", "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--tile" in err and "minimum size 8" in err, err
    assert not (tmp_path / "out").exists()


def test_tile_overlap_over_half_the_tile_is_refused(gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos", n=1, size=(600, 40))
    out = tmp_path / "out"
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--tile", "512",
                    "--tile-overlap", "600", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--tile-overlap 600" in err and "--tile 512" in err and "--checkpoint" not in err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ValueError, match="tile_overlap 600 must be less than half of tile 512"):
        tiling.tiled_apply(lambda x: x, torch.zeros(1, 3, 600, 600), 512, 600)


def test_tile_overlap_without_tiles_is_refused(gen_file, tmp_path, capsys):
    """--tile-overlap on a dynamic model without --tile did nothing (every image ran whole)."""
    src = _pngs(tmp_path / "in", n=1)
    out = tmp_path / "out"
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--tile-overlap", "8",
                    "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--tile-overlap) without tile (--tile)" in err and not out.exists(), err


def test_tile_errors_are_not_blamed_on_the_checkpoint(gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos", n=1)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(tmp_path / "o"),
                    "--tile", "4", "--tile-overlap", "1", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "tile" in err and "--checkpoint" not in err


def test_tile_count_is_bounded_before_decoding(gen_file, tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    _png_bomb(src / "wide.png", 2000, 2000)  # header says 2000x2000
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(tmp_path / "o"),
                    "--tile", "8", "--tile-overlap", "3", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "wide.png" in err and "tiles" in err and "--tile" in err
    assert not (tmp_path / "o").exists()


def test_tiled_memory_is_bounded_by_the_tile(monkeypatch):
    """Many tiles: blend weights are made once per edge configuration (<= 16), not per tile,
    and the model sees at most batch_size tiles at once."""
    calls, widest = [], []
    real = tiling.blend_weights

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def fn(x):
        widest.append(x.shape[0])
        return x * 2

    monkeypatch.setattr(tiling, "blend_weights", counting)
    x = torch.rand(1, 3, 300, 310) * 2 - 1
    out = tiling.tiled_apply(fn, x, 16, 7, batch_size=4)
    n = tiling.count_tiles(300, 310, 16, 7)
    assert n > 1000 and len(widest) >= n // 4
    assert len(calls) <= 16 and max(widest) <= 4
    torch.testing.assert_close(out, x * 2, atol=1e-5, rtol=1e-5)  # a per-pixel model is still exact
    with pytest.raises(ValueError, match="tiles, more than the limit"):
        tiling.tiled_apply(fn, x, 16, 7, max_tiles=100)


def test_pixel_bomb_not_decoded(bomb, monkeypatch):
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(BadImageError, match=r"12000x12000 = 144,000,000 pixels is over the image pixel limit "
                                            r"of 89,478,485.*--max-image-pixels"):
        open_image(str(bomb))
    assert image_mod.image_size(str(bomb)) == (12000, 12000)
    # Past Pillow's own backstop (2 x 89.5 Mpx) the message still names our limit and the flag.
    huge = bomb.parent / "huge.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
        for t, d in ((b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", b""))))
    with pytest.raises(BadImageError, match="20000x20000 = 400,000,000 pixels is over the image pixel limit"):
        open_image(str(huge))
    # Per call and per process, 0 = no limit; small images are unaffected.
    with pytest.raises(BadImageError, match="limit of 1,000"):
        open_image(str(bomb), max_pixels=1000)
    saved = image_mod.get_max_image_pixels()
    try:
        image_mod.set_max_image_pixels(500)
        assert image_mod.get_max_image_pixels() == 500
        with pytest.raises(ValueError):
            image_mod.set_max_image_pixels(-1)
    finally:
        image_mod.set_max_image_pixels(saved)
    assert image_mod.get_max_image_pixels() == image_mod.DEFAULT_MAX_IMAGE_PIXELS


def test_pixel_bomb_skipped_in_training_data(bomb, tmp_path):
    root = tmp_path / "ds"
    _pngs(root / "trainA", n=1, size=(32, 32))
    shutil.copy(bomb, root / "trainA" / "aaa_bomb.png")  # sorts first: index 0
    _pngs(root / "trainB", n=1, size=(32, 32))
    ds = UnalignedDataset(str(root), load_size=32, crop_size=32, serial_batches=True)
    with pytest.warns(SkippedImageWarning, match="aaa_bomb.png.*pixel limit"):
        item = ds[0]
    assert item["A_path"].endswith("im0.png") and item["A"].shape == (3, 32, 32)
    assert any(p.endswith("aaa_bomb.png") for p in ds.skipped)


def test_pixel_bomb_refused_by_translate(bomb, gen_file, tmp_path, capsys):
    src = _pngs(tmp_path / "photos", n=1)
    shutil.copy(bomb, src / "bomb.png")
    out = tmp_path / "out"
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--device", "cpu",
                    "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bomb.png" in err and "--max-image-pixels" in err and "89,478,485" in err
    assert not out.exists()
    assert image_mod.get_max_image_pixels() == image_mod.DEFAULT_MAX_IMAGE_PIXELS  # flag did not leak


# --------------------------------------------------------------------------------------------
# 3. artifacts that hold code are trusted explicitly
# --------------------------------------------------------------------------------------------
_CONSTRUCTOR = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void fastcgan_test_marker(void) {
    const char *p = getenv("FASTCGAN_TEST_MARKER");
    if (!p) return;
    FILE *f = fopen(p, "w");
    if (f) { fputs("native code ran\n", f); fclose(f); }
}
"""


def _compile(tmp_path, source, name):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the marker library")
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    so = tmp_path / f"{name}.so"
    proc = subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(c)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a shared library here: {proc.stderr[-300:]}")
    return so


def _fake_pt2(path, so):
    """An archive laid out like an AOTInductor package, its model library being ``so``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("g/.data/version", "1\n")
        z.writestr("g/data/aotinductor/model/model_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cpu"}))
        z.write(so, "g/data/aotinductor/model/model.so")
        z.writestr("g/data/aotinductor/model/model.cpp", "")
    return path


def test_tampered_pt2_is_refused_without_running_its_code(tmp_path, monkeypatch, capsys):
    evil = _compile(tmp_path, _CONSTRUCTOR, "evil")
    benign = _compile(tmp_path, "int fastcgan_nothing(void) { return 0; }\n", "benign")
    marker = tmp_path / "marker"
    monkeypatch.setenv("FASTCGAN_TEST_MARKER", str(marker))
    # torch's package loader extracts into $TMPDIR and leaves the folder when a load fails (these
    # fake packages do): here, not in /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    pt2 = tmp_path / "g.pt2"

    # Manifest-less: refused by load(), by translate (exit 2) and by the package loaders.
    _fake_pt2(pt2, evil)
    with pytest.raises(UntrustedArtifactError, match=r"g\.pt2.*no manifest.*--trust-artifact"):
        load(str(pt2), device="cpu")
    src = _pngs(tmp_path / "photos", n=1)
    rc = translate(["--checkpoint", str(pt2), "--input", str(src), "--output", str(tmp_path / "o"),
                    "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "g.pt2" in err and "--trust-artifact" in err
    from fastcgan.deploy.aoti import load_aoti, run_package_isolated

    with pytest.raises(UntrustedArtifactError):
        load_aoti(str(pt2), torch.device("cpu"))
    with pytest.raises(UntrustedArtifactError):
        run_package_isolated(str(pt2), [torch.zeros(1, 3, 8, 8)], torch.device("cpu"))
    assert not marker.exists()

    # Tampered: the manifest was written for the benign package, the library was swapped after.
    _fake_pt2(pt2, benign)
    write_manifest(str(pt2), "aoti")
    _fake_pt2(pt2, evil)
    with pytest.raises(UntrustedArtifactError, match="differs from the manifest.*modified"):
        load(str(pt2), device="cpu")
    assert not marker.exists()

    # Positive control: the same file with explicit trust does reach the native loader, and its
    # constructor runs -- so the refusals above are what kept it from running.
    with pytest.warns(UserWarning, match="without a verified manifest"), pytest.raises(ArtifactError):
        load(str(pt2), device="cpu", trust_artifact=True)
    if not marker.exists():  # pragma: no cover - a torch whose loader rejects the fake layout before dlopen
        code = f"import ctypes; ctypes.CDLL({str(evil)!r})"
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    assert marker.exists()


def test_engine_without_manifest_is_refused_before_tensorrt(tmp_path):
    engine = tmp_path / "g.engine"
    engine.write_bytes(b"serialized engine bytes")
    from fastcgan.deploy.tensorrt import TrtRunner

    with pytest.raises(UntrustedArtifactError, match="g.engine.*TensorRT engine"):
        TrtRunner(str(engine))
    with pytest.raises(UntrustedArtifactError):
        load(str(engine))
    write_manifest(str(engine), "engine")
    m = json.loads(open(manifest_path(str(engine)), encoding="utf-8").read())
    assert m["sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest() and m["holds_code"]
    engine.write_bytes(b"serialized engine bytes!")
    with pytest.raises(UntrustedArtifactError, match="differs from the manifest"):
        TrtRunner(str(engine))
    # The same size, another byte: only the digest can tell (every change above also moved the size).
    engine.write_bytes(b"serialized engine bytez")
    with pytest.raises(UntrustedArtifactError, match="sha256 .* differs from the manifest"):
        TrtRunner(str(engine))
    with pytest.raises(UntrustedArtifactError, match="sha256 .* differs from the manifest"):
        load(str(engine))


# --------------------------------------------------------------------------------------------
# 4. model files carry and verify digests; stale temporaries go
# --------------------------------------------------------------------------------------------
def _flip_byte_of(path, tensor_name):
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start, end = header[tensor_name]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_flipped_byte_in_generator_is_detected(gen_file, tmp_path, capsys):
    g = load_generator(gen_file)
    name = next(k for k, v in g.state_dict().items() if v.numel() > 100)
    _flip_byte_of(gen_file, name)
    with pytest.raises(GeneratorIntegrityError, match=rf"generator_AtoB\.safetensors: tensor '{name}' does not "
                                                      "match its stored sha256"):
        load_generator(gen_file)
    src = _pngs(tmp_path / "photos", n=1)
    rc = translate(["--checkpoint", str(gen_file.parent), "--input", str(src), "--output", str(tmp_path / "o"),
                    "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and name in err and not (tmp_path / "o").exists()


def test_generator_without_digests_still_loads(tmp_path):
    """Files written before the weights' digests were stored load, with their weights."""
    from safetensors.torch import save_file

    g = build_generator("resnet_6blocks", ngf=4)
    meta = {"format": "fastcgan.generator", "format_version": "1", "config": json.dumps(g.config, sort_keys=True)}
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(old), metadata=meta)
    loaded = load_generator(old).state_dict()
    assert loaded.keys() == g.state_dict().keys()
    for k, v in g.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_stale_generator_temporaries_are_removed(tmp_path):
    """Only the temporaries of the file being written, of writers that no longer run: save_generator
    is a library call into anyone's folder, and it removed every hidden ``.X.<pid>.tmp`` there
    (folders too, with rmtree) and every ``*.safetensors.tmp.<pid>``."""
    dead = 2**22 + 12345  # above the default pid_max: never a running process
    old_style = tmp_path / f"generator_AtoB.safetensors.tmp.{dead}"
    new_style = tmp_path / f".generator_AtoB.safetensors.{dead}.tmp"
    live = tmp_path / f"generator_BtoA.safetensors.tmp.{os.getppid()}"  # a running writer: kept
    others = [tmp_path / f".report.{dead}.tmp", tmp_path / f"weights.safetensors.tmp.{dead}",
              tmp_path / f".generator_BtoA.safetensors.{dead}.tmp"]  # not the file being written: kept
    for p in (old_style, new_style, live, *others):
        p.write_bytes(b"partial")
    thesis = tmp_path / f".thesis.{dead}.tmp"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("months of work")
    save_generator(build_generator("resnet_6blocks", ngf=4), tmp_path / "generator_AtoB.safetensors")
    assert not old_style.exists() and not new_style.exists() and live.exists()
    assert remove_stale_generator_temporaries(tmp_path / "generator_AtoB.safetensors") == []
    names = os.listdir(tmp_path)
    assert sorted(names) == sorted(["generator_AtoB.safetensors", live.name, thesis.name, *(p.name for p in others)])
    assert (thesis / "chapter1.tex").read_text() == "months of work"


# --------------------------------------------------------------------------------------------
# 5. clear errors, exit 2
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_device_cuda_without_gpu_exits_2(gen_file, tmp_path, capsys):
    from fastcgan.deploy import cli

    from fastcgan.devices import DeviceUnavailableError, resolve_device

    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU"):
        resolve_device("cuda")
    src = _pngs(tmp_path / "photos", n=1)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(tmp_path / "o"),
                    "--device", "cuda", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda" in err and "no CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    rc = cli.main([str(gen_file), "--aoti", str(tmp_path / "g.pt2"), "--device", "cuda"])  # the --device user
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "no CUDA GPU" in err and not (tmp_path / "g.pt2").exists()


@pytest.mark.parametrize("spec", ["cpu:5", "meta", "mps"])
def test_devices_other_than_cpu_and_cuda_are_refused(gen_file, tmp_path, capsys, spec):
    """--device cpu:5 ran on the CPU as if it named something; meta ran "translations" of no data."""
    from fastcgan.devices import resolve_device

    with pytest.raises(ValueError, match=spec):
        resolve_device(spec)
    src = _pngs(tmp_path / "photos", n=1)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(tmp_path / "o"),
                    "--device", spec, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--device {spec}" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_garbage_checkpoints_never_advise_weights_only_false(tmp_path, capsys):
    import pickle

    from fastcgan.deploy import cli

    from fastcgan.models import load_official_generator

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 64)
    pickled = tmp_path / "pickled.pth"

    class Payload:
        def __reduce__(self):
            return (print, ("never run",))

    torch.save({"x": Payload()}, pickled)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    for f in (garbage, pickled, plain):
        with pytest.raises(ValueError) as e:
            load_official_generator(str(f), arch="resnet_6blocks")
        msg = str(e.value)
        assert f.name in msg and "weights_only" not in msg and "add_safe_globals" not in msg, msg
        rc = cli.main(["--from-official", str(f), "--arch", "resnet_6blocks", "--ngf", "4", "--onnx",
                       str(tmp_path / "g.onnx")])
        err = capsys.readouterr().err
        assert rc == cli.EXIT_USAGE and f.name in err and "weights_only" not in err


# --------------------------------------------------------------------------------------------
# 6. flags tried the way a careless user would (an audit of 2026-11-29)
# --------------------------------------------------------------------------------------------
def _translate(checkpoint, *extra):
    return _run(checkpoint, None, *map(str, extra))


def _export(*args):
    from fastcgan.deploy.cli import main as export

    return export([*map(str, args)])


def test_a_small_static_model_runs_with_the_default_tile_overlap(gen_file, tmp_path, capsys):
    """A model exported --static 32x32 (or 64x64) tiles at its size, but the default overlap of 32
    px is not less than half of it: fastcgan-eval (which has no --tile-overlap) could not score it,
    fastcgan-translate needed a flag. And --tile on such a model was silently ignored."""
    static = tmp_path / "s32.onnx"
    assert _export(gen_file, "--onnx", static, "--static", "32x32") == 0
    tr = load(str(static), device="cpu")
    assert tr.tile_overlap == 15 and tr.tile_hw == (32, 32)
    src = _pngs(tmp_path / "photos", n=1, size=(70, 50))  # tiled: larger than 32x32
    assert _translate(static, "--input", src, "--output", tmp_path / "out") == 0
    assert Image.open(tmp_path / "out" / "im0.png").size == (70, 50)
    assert _translate(static, "--input", src, "--output", tmp_path / "o2", "--tile", "64") == 2
    err = capsys.readouterr().err
    assert "--tile" in err and "32x32 inputs only" in err and not (tmp_path / "o2").exists()
    data = tmp_path / "data"
    for d in ("testA", "testB", "testA_truth_B"):  # a target to score: one generator has no cycle
        _pngs(data / d, n=2, size=(40, 40))
    from fastcgan.evaluate import main as evaluate

    assert evaluate(["--checkpoint", str(static), "--dataroot", str(data), "--device", "cpu", "--no-fid"]) == 0
    assert "truth_l1=" in capsys.readouterr().out


def test_export_flags_that_would_do_nothing_are_refused(gen_file, tmp_path, capsys):
    """Flags for official checkpoints, TensorRT or AOTInductor were accepted and ignored when the
    export had no use for them (--arch unet_256 still exported the ResNet); --direction on a single
    generator file recorded the wrong direction; --static 4096x4096 verified at 33 Mpx (8.4 GB)."""
    out = tmp_path / "g.onnx"
    cases = [
        (["--arch", "unet_256"], "--arch are only for an official checkpoint"),
        (["--norm", "batch"], "--norm are only for an official checkpoint"),
        (["--dropout"], "--dropout / --no-dropout are only"),
        (["--min-shape", "1x3x32x32"], "--min-shape applies to --trt only"),
        (["--workspace-gb", "8"], "--workspace-gb applies to --trt only"),
        (["--timing-cache", str(tmp_path / "c")], "--timing-cache applies to --trt only"),
        (["--max-autotune"], "--max-autotune applies to --aoti only"),
        (["--direction", "BtoA"], "is one generator"),
        (["--bn-inference", "running"], "has no BatchNorm"),
        (["--aoti", ""], "--aoti '': name a file"),
        (["--static", "4096x4096"], "--static 4096x4096: at most 4,194,304 pixels"),
        (["--trt", str(tmp_path / "g.engine"), "--max-shape", "99999x3x64x64"], "batch at most 1024"),
        (["--trt", str(tmp_path / "g.engine"), "--workspace-gb", "1e10"], "--workspace-gb 1"),
        (["--trt", str(tmp_path / "g.engine"), "--timing-cache", "/dev/null"], "is not a regular file"),
    ]
    with pytest.raises(SystemExit):  # the only output named empty (an unset variable): said, not "nothing to do"
        _export(gen_file, "--onnx", "")
    assert "--onnx '': name a file" in capsys.readouterr().err
    assert _export("/dev/zero", "--onnx", out) == 2  # read "generator file not found"
    assert "not a regular file or a run directory" in capsys.readouterr().err
    onnx = tmp_path / "made.onnx"
    assert _export(gen_file, "--onnx", onnx) == 0
    with pytest.raises(SystemExit) as e:  # an artifact as RUN: said so (it read "expected ... an .onnx model")
        _export(onnx, "--aoti", tmp_path / "g.pt2")
    assert e.value.code == 2 and "is an exported artifact" in capsys.readouterr().err
    for extra, said in cases:
        try:
            rc = _export(gen_file, "--onnx", out, *extra)
        except SystemExit as e:  # argparse's own exit
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and said in err, (extra, err)
        assert not out.exists()
    assert not any(tmp_path.glob(".fastcgan-export-*"))


def test_flags_need_the_artifact_or_check_they_set(gen_file, tmp_path, capsys):
    """--static / --opset / --exporter with only --safetensors / --official outputs were accepted
    and did nothing; --tol / --verify-sizes with --no-verify set checks that never ran; --static
    ' 64x64' or '6_4x64' (and such BxHxW / BxCxHxW sizes) were read as 64x64: int() takes spaces,
    '+' and '_'. And the .safetensors / .pth verification ignored --tol."""
    out = tmp_path / "out"
    out.mkdir()
    st, onnx, engine = out / "g.safetensors", out / "g.onnx", out / "g.engine"
    cases = [
        (["--safetensors", st, "--static", "64x64"], "--static applies to --onnx / --trt / --aoti only"),
        (["--official", out / "g.pth", "--opset", "17"], "--opset applies to --onnx / --trt only"),
        (["--aoti", out / "g.pt2", "--exporter", "torchscript"], "--exporter applies to --onnx / --trt only"),
        (["--onnx", onnx, "--no-verify", "--tol", "1e-3"], "--tol sets the checks that --no-verify skips"),
        (["--onnx", onnx, "--no-verify", "--verify-sizes", "1x32x32"], "--verify-sizes sets the checks"),
        (["--onnx", onnx, "--static", "6_4x64"], "expected HxW"),
        (["--onnx", onnx, "--static", " 64x64"], "expected HxW"),
        (["--onnx", onnx, "--verify-sizes", "+1x64x64"], "expected BxHxW"),
        (["--trt", engine, "--min-shape", "1x3x6_4x64"], "expected BxCxHxW"),
    ]
    for extra, said in cases:
        try:
            rc = _export(gen_file, *extra)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and said in err, (extra, err)
        assert not any(out.iterdir()), extra
    assert _export(gen_file, "--safetensors", st, "--tol", "3e-3") == 0
    assert "(tol 0.003) ok" in capsys.readouterr().out and st.exists()


def test_a_killed_exports_staging_folder_is_removed_by_the_next(gen_file, tmp_path):
    """kill -9 during an export left its hidden staging folder beside the destination forever."""
    stale = tmp_path / ".fastcgan-export-999999999-abc"  # a pid no process has
    stale.mkdir()
    (stale / "g.onnx").write_bytes(b"half")
    live = tmp_path / f".fastcgan-export-{os.getppid()}-xyz"  # a running process's: left alone
    live.mkdir()
    assert _export(gen_file, "--onnx", tmp_path / "g.onnx") == 0
    assert not stale.exists() and live.exists()


@pytest.mark.timeout(60)
def test_artifacts_that_are_fifos_are_never_opened(tmp_path):
    """deploy.load on a FIFO named g.onnx hung forever reading it (.safetensors were refused)."""
    from fastcgan.deploy import ArtifactError

    for name in ("g.onnx", "g.safetensors", "g.ckpt", "g.pt2", "g.engine"):
        os.mkfifo(tmp_path / name)
        with pytest.raises(ArtifactError, match="not a regular file"):
            load(str(tmp_path / name), device="cpu")


def test_fifos_named_like_images_are_never_opened(gen_file, tmp_path, capsys):
    """Opening a FIFO waits for a writer forever: translate hung on one given as --input or lying
    in an input folder (training and eval list folders the same way)."""
    from fastcgan.data import make_dataset

    src = _pngs(tmp_path / "photos", n=1)
    os.mkfifo(src / "pipe.png")
    with pytest.warns(UserWarning, match="left out 1 entry: .*pipe.png \\(not a regular file\\)"):
        assert make_dataset(str(src)) == [str(src / "im0.png")]
    assert image_mod.image_size(str(src / "pipe.png")) is None
    with pytest.raises(BadImageError, match="not a regular file"):
        open_image(str(src / "pipe.png"))
    assert _translate(gen_file, "--input", src / "pipe.png", "--output", tmp_path / "o") == 2
    assert "not a regular file or a directory" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="pipe.png"):
        assert _translate(gen_file, "--input", src, "--output", tmp_path / "o2") == 0
    assert sorted(os.listdir(tmp_path / "o2")) == ["im0.png"]


def test_batch_size_and_json_values_that_cannot_work_are_refused(gen_file, tmp_path, capsys):
    """--batch-size 2**63 was a traceback from deep inside the tiler; eval --json '' wrote nothing."""
    from fastcgan.evaluate import main as evaluate

    src = _pngs(tmp_path / "photos", n=1)
    assert _translate(gen_file, "--input", src, "--output", tmp_path / "o", "--batch-size", str(2**63)) == 2
    assert "--batch-size must be in [1, 1024]" in capsys.readouterr().err
    for extra, said in ((["--batch-size", "5000"], "batch_size (--batch-size) must be an int in [1, 1024], got 5000"), (["--json", ""], "--json ''")):
        with pytest.raises(SystemExit) as e:
            evaluate(["--checkpoint", str(gen_file.parent), "--dataroot", str(tmp_path), *extra])
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(gen_file, tmp_path, monkeypatch, capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback from whichever line it hit."""
    import fastcgan.deploy

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastcgan.deploy, "load", interrupted)
    src = _pngs(tmp_path / "photos", n=1)
    assert _translate(gen_file, "--input", src, "--output", tmp_path / "o") == 130
    err = capsys.readouterr().err
    assert "fastcgan-translate: interrupted" in err and "Traceback" not in err


# Sends the process a real SIGINT the moment anything first imports torch (the slow part of a
# command's start-up), then runs the command as its console script / ``-m`` would. Python's own
# Ctrl-C handler first, as in a terminal: a process started in the background of a script
# inherits SIGINT ignored, and Python then installs none.
_SIGINT_AT_TORCH_IMPORT = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
class SigintAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, SigintAtTorch())
target = sys.argv[1]
sys.argv = [target, *sys.argv[2:]]
if target.startswith("-m="):
    runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


@pytest.mark.parametrize("command", ["fastcgan-translate", "fastcgan-eval", "fastcgan-export", "fastcgan-download",
                                     "fastcgan-train", "-m fastcgan.train"])
def test_ctrl_c_while_a_command_starts_is_one_line_and_exit_130(command):
    """The console scripts imported their command (torch with it: 1-3 s) before the Ctrl-C guard,
    so Ctrl-C then was a 26-48 line KeyboardInterrupt traceback; ``python -m fastcgan.train``
    imported the whole trainer with its package. The SIGINT arrives as torch starts importing
    (a timer was host-speed dependent); a torch import outside the guard fails this."""
    if command.startswith("-m"):
        target = "-m=" + command.split()[1]
    else:
        target = shutil.which(command) or os.path.join(os.path.dirname(sys.executable), command)
    p = subprocess.run([sys.executable, "-c", _SIGINT_AT_TORCH_IMPORT, target, "--help"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    name = "fastcgan-train" if command.startswith("-m") else command
    assert p.returncode == 130, p.stderr
    assert p.stderr == f"{name}: interrupted before it started\n"


def test_running_out_of_memory_outside_the_checks_is_one_line(gen_file, tmp_path, monkeypatch, capsys):
    """A MemoryError (Python's allocator: Pillow decoding) or torch's allocator failing where no
    check foresaw it (FASTCGAN_MEMORY_CHECK=0, several large images at once) was a traceback."""
    import fastcgan.translate

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(fastcgan.translate, "_read", no_memory)
    src = _pngs(tmp_path / "photos", n=1)
    assert _translate(gen_file, "--input", src, "--output", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert err.endswith("fastcgan-translate: error: out of memory (MemoryError); every file already written is "
                        "complete: try smaller inputs or fewer at a time\n") and "Traceback" not in err

    def torch_no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(fastcgan.translate, "_read", torch_no_memory)
    assert _translate(gen_file, "--input", src, "--output", tmp_path / "o") == 1
    assert "error: out of memory ([enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator" in (
        capsys.readouterr().err)

    def bug(*a, **k):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(fastcgan.translate, "_read", bug)  # not memory: the traceback a bug report needs
    with pytest.raises(RuntimeError, match="some other failure"):
        _translate(gen_file, "--input", src, "--output", tmp_path / "o")


def test_json_nested_too_deeply_is_an_error_naming_the_file(gen_file, tmp_path, capsys):
    """'[' * 200000 in a manifest, a generator's config metadata or a run's config.json raised
    RecursionError, which the ValueError handlers did not take: the one-line error named no file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fastcgan.fileio import parse_json

    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(ValueError, match="^JSON nested too deeply to read$"):
        parse_json(deep)
    src = _pngs(tmp_path / "photos", n=1)
    pt2 = tmp_path / "g.pt2"
    pt2.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: never run, its manifest is refused first
    (tmp_path / "g.pt2.manifest.json").write_text(deep)
    assert _translate(pt2, "--input", src, "--output", tmp_path / "o") == 2
    assert "g.pt2: refused to load: unreadable manifest g.pt2.manifest.json (JSON nested too deeply to read)" in (
        capsys.readouterr().err)
    # Nor is a FIFO opened (it would wait for a writer), or a manifest read whole whatever its size.
    from fastcgan.fileio import read_json

    os.mkfifo(tmp_path / "fifo.json")
    _refused_without_waiting(lambda: read_json(str(tmp_path / "fifo.json")), tmp_path / "fifo.json",
                             "fifo.json is not a regular file")
    with open(tmp_path / "g.pt2.manifest.json", "w") as f:
        f.write('{"pad": "' + " " * (2 << 20) + '"}')
    assert _translate(pt2, "--input", src, "--output", tmp_path / "o") == 2
    assert "manifest.json is larger than 1,048,576 bytes: not one of the small JSON files read here" in (
        capsys.readouterr().err)
    bad = tmp_path / "deep.safetensors"
    with safe_open(str(gen_file), "pt") as f:
        meta = f.metadata()
    assert "config" in meta
    save_file(load_file(str(gen_file)), str(bad), metadata=meta | {"config": deep})
    assert _translate(bad, "--input", src, "--output", tmp_path / "o") == 2
    assert f"{bad}: generator config metadata is not valid JSON: JSON nested too deeply" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _refused_without_waiting(read, fifo, message):
    """``read()`` raises a ValueError with ``message`` at once; a reader that opened the FIFO would
    wait for a writer forever (the test then fails after 10 s instead of hanging)."""
    import threading

    said = []

    def run():
        try:
            read()
        except ValueError as e:
            said.append(str(e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # blocked in open(): a writer releases it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail(f"{fifo} was opened and waited on")
    assert said and message in said[0], said


def test_read_json_takes_a_file_of_exactly_its_limit(tmp_path):
    """Catches: ``len(data) > limit`` -> ``>=`` (a manifest of exactly 1 MiB refused)."""
    from fastcgan.fileio import read_json

    (tmp_path / "a.json").write_text("[]")
    assert read_json(str(tmp_path / "a.json"), limit=2) == []
    with pytest.raises(ValueError, match="larger than 1 bytes"):
        read_json(str(tmp_path / "a.json"), limit=1)


def test_a_failed_torch_save_write_keeps_the_errno_its_file_saw(tmp_path):
    """torch.save's C++ writer says a failed write as RuntimeError("unexpected pos ...") without an
    errno; the writer remembers the OSError (a full disk is ENOSPC, not a generic EIO)."""
    import errno

    from fastcgan.fileio import WriteError, atomic_writer

    class Full:
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as e:
        with atomic_writer(str(tmp_path / "x.bin")) as f:
            real, f._f = f._f, Full()
            with pytest.raises(OSError):
                f.write(b"abc")
            f._f = real
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: unexpected pos 64")
    assert e.value.errno == errno.ENOSPC and "no space left on the device" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_one_line_warnings_restores_the_warning_display(capsys):
    """Catches: ``warnings.showwarning`` left patched after a command (in-process callers -- a
    notebook, the tests -- then printed every later warning as that command's); and a package
    beside fastcgan's folder (``fastcgan_contrib``) said as fastcgan's own."""
    import warnings

    import fastcgan
    from fastcgan._cli import one_line_warnings

    before = warnings.showwarning
    with one_line_warnings("prog"):
        warnings.warn_explicit("x", UserWarning, os.path.dirname(fastcgan.__file__) + "_contrib/m.py", 1)
    assert warnings.showwarning is before
    assert "prog: warning: UserWarning from " in capsys.readouterr().err


def test_argparse_errors_hint_official_spellings_only_when_there_are_some(capsys):
    """Catches: ``--model CycleGAN`` (an official name in other case) given no hint, and every
    error claiming docs/from-official.md maps the flags at fault."""
    from fastcgan.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "Cycle_GAN"])
    assert e.value.code == 2 and "--model Cycle_GAN (official) is --model cyclegan here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--lr", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--lr" in err and "from-official" not in err


def test_another_librarys_warning_keeps_its_category_and_origin(capsys):
    """One line each; fastcgan's own are said as the command's, another library's keep where they
    come from (a torch deprecation said as the command's own would mislead)."""
    import warnings

    import fastcgan.deploy.runtime
    from fastcgan._cli import one_line_warnings

    with one_line_warnings("prog"):
        warnings.warn_explicit("ours", UserWarning, fastcgan.deploy.runtime.__file__, 10)
        warnings.warn_explicit("theirs", FutureWarning, "/lib/site-packages/other/mod.py", 3)
    assert capsys.readouterr().err == ("prog: warning: ours\n"
                                       "prog: warning: FutureWarning from /lib/site-packages/other/mod.py:3: theirs\n")


def test_warnings_are_one_line_and_an_unreadable_input_says_why(gen_file, tmp_path, capsys, caplog, monkeypatch):
    """Python's warning format added the fastcgan source line that raised it (two lines a warning,
    and eval printed each skipped file twice more); one unreadable --input said only "not a readable
    image file" where the same file in a folder said why."""
    from fastcgan.evaluate import main as evaluate

    src = _pngs(tmp_path / "testA", n=1)
    _pngs(tmp_path / "testB", n=1)
    (src / "bad.png").write_text("not an image")
    from fastcgan._cli import translate_command

    monkeypatch.setattr(sys, "argv", ["fastcgan-translate", "--checkpoint", str(gen_file), "--input", str(src),
                                      "--output", str(tmp_path / "o"), "--device", "cpu", "--no-progress"])
    assert translate_command() == 0  # the console script
    err = capsys.readouterr().err
    reason = "not an image in a format read here (JPEG, PNG, PPM, BMP, TIFF, WEBP, GIF)"
    assert err == f"fastcgan-translate: warning: skipping unreadable image {src / 'bad.png'}: {reason}\n"
    assert _translate(gen_file, "--input", src / "bad.png", "--output", tmp_path / "o2") == 2
    assert capsys.readouterr().err == f"fastcgan-translate: error: --input {src / 'bad.png'}: {reason}\n"
    truth = _pngs(tmp_path / "testA_truth_B", n=1)  # a target to score (one generator: no cycle)
    shutil.copy(truth / "im0.png", truth / "bad.png")
    assert evaluate(["--checkpoint", str(gen_file), "--dataroot", str(tmp_path), "--no-fid", "--device", "cpu",
                     "--direction", "AtoB"]) == 0
    assert "bad.png" not in capsys.readouterr().err  # the warning would say it again
    assert [r.getMessage() for r in caplog.records if "bad.png" in r.getMessage()] == [  # on stderr, from the CLI
        f"skipping image {str(src / 'bad.png')!r}: {reason}"]


def test_max_images_never_lets_overwrite_replace_an_input_left_out(gen_file, tmp_path, capsys):
    """--max-images 1 cut the user's own out/a.png from the inputs, then --overwrite replaced it
    with a translation of a.jpg (exit 0): the clash check saw only the first N inputs."""
    src = tmp_path / "in"
    (src / "out").mkdir(parents=True)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(src / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(src / "out" / "a.png")
    before = _digests(src)
    assert translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(src / "out"),
                      "--max-images", "1", "--overwrite", "--device", "cpu", "--no-progress"]) == 2
    assert "would overwrite the input file" in capsys.readouterr().err
    assert _digests(src) == before


@pytest.mark.parametrize("case", ["output-and-folder", "page-and-folder", "file-in-the-way"])
def test_translate_output_names_that_are_a_file_and_a_folder_exit_2_first(gen_file, tmp_path, case, capsys):
    """Inputs a.jpg and a.png/b.jpg (outputs a.png and a.png/b.png), an input folder index.html/
    with --html, or a file where an output folder goes: exit 1 after writing some outputs."""
    src = tmp_path / "in"
    out = tmp_path / "out"
    sub = {"output-and-folder": "a.png", "page-and-folder": "index.html", "file-in-the-way": "x"}[case]
    _pngs(src / sub, n=1)
    if case == "output-and-folder":
        shutil.copy(src / sub / "im0.png", src / "a.jpg")
    if case == "file-in-the-way":
        out.mkdir()
        (out / "x").write_text("the user's notes")
    before = _digests(tmp_path)
    rc = translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--device", "cpu",
                    "--no-progress"] + (["--html"] if case == "page-and-folder" else []))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert ("would be a file and a folder" if case != "file-in-the-way" else "exists and is not a folder") in err
    assert _digests(tmp_path) == before


def test_an_output_written_by_another_process_meanwhile_is_not_replaced(gen_file, tmp_path, monkeypatch, capsys):
    """Two translate (or eval --json, export) runs at once: both passed the existence check, and
    the later one's rename silently replaced the other's file. Without --overwrite the final
    rename now refuses a name that exists."""
    from fastcgan import translate as tr_mod
    from fastcgan.fileio import OutputExistsError, atomic_write, move_into_place

    src = _pngs(tmp_path / "in", n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "im0.png").write_bytes(b"the other run's output")
    monkeypatch.setattr(tr_mod, "_check_outputs", lambda *a: None)  # as if it appeared after the check
    assert translate(["--checkpoint", str(gen_file), "--input", str(src), "--output", str(out), "--device", "cpu",
                      "--no-progress"]) == 1
    assert "another process wrote it" in capsys.readouterr().err
    assert (out / "im0.png").read_bytes() == b"the other run's output"
    assert [p.name for p in out.iterdir()] == ["im0.png"]  # no temporary left

    with pytest.raises(OutputExistsError):
        atomic_write(str(out / "im0.png"), b"x", replace=False)
    atomic_write(str(out / "new.bin"), b"x", replace=False)
    (tmp_path / "staged").write_bytes(b"y")
    move_into_place(str(tmp_path / "staged"), str(out / "new.bin"), replace=True)
    assert (out / "new.bin").read_bytes() == b"y" and not (tmp_path / "staged").exists()


def test_tile_count_is_judged_on_the_rotated_size(tmp_path, capsys):
    """A 50000x260 JPEG with EXIF orientation 6 (decoded as 260x50000) passed the header check
    unrotated, then failed mid-run with a traceback against a static 8x256 model's tile limit."""
    from fastcgan.deploy import cli as export_cli

    torch.manual_seed(0)
    st = tmp_path / "g.safetensors"
    save_generator(build_generator("resnet_6blocks", ngf=4), st)
    onnx = tmp_path / "s.onnx"
    assert export_cli.main([str(st), "--onnx", str(onnx), "--static", "8x256", "--verify-sizes", "1x8x256"]) == 0
    capsys.readouterr()
    src = tmp_path / "in"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on decode
    Image.new("RGB", (50000, 260), (90, 120, 150)).save(src / "tall.jpg", exif=exif, quality=50)
    rc = translate(["--checkpoint", str(onnx), "--input", str(src), "--output", str(tmp_path / "o"), "--device",
                    "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "tall.jpg" in err and "tiles" in err, err
    assert not (tmp_path / "o").exists()


def test_a_manifest_whose_digest_is_not_a_string_is_refused_by_name(tmp_path):
    """A manifest with ``"sha256": null`` (hand-edited, or written by something else) is not a
    fastcgan manifest: loading refuses it with that reason (not an AttributeError traceback), and
    --trust-artifact still loads the file, with the reason in its note."""
    from fastcgan.deploy.manifest import check_artifact

    art = tmp_path / "g.pt2"
    art.write_bytes(b"compiled code")
    write_manifest(str(art), "aoti")
    m = json.loads(open(manifest_path(str(art))).read())
    m["sha256"] = None
    with open(manifest_path(str(art)), "w") as f:
        json.dump(m, f)
    with pytest.raises(UntrustedArtifactError, match="not a fastcgan artifact manifest"):
        check_artifact(str(art), "aoti")
    note = check_artifact(str(art), "aoti", trust=True)
    assert note.startswith("trusted explicitly") and "not a fastcgan artifact manifest" in note


def test_the_whole_digest_is_compared_and_the_loaded_bytes_are_checked(tmp_path):
    """Catches (mutation testing): a digest compared on its first 16 hex digits only, an upper-case
    digest refused, --trust-artifact on a file without a manifest refused at the first gate, and
    the check of the bytes actually loaded (verified_copy) never refusing -- a file swapped for
    another of the same size after export would load."""
    from fastcgan.deploy.manifest import check_artifact, verified_copy

    art = tmp_path / "g.pt2"
    art.write_bytes(b"compiled code")
    write_manifest(str(art), "aoti")
    real = json.loads(open(manifest_path(str(art))).read())["sha256"]

    def digest(value):
        m = json.loads(open(manifest_path(str(art))).read())
        m["sha256"] = value
        with open(manifest_path(str(art)), "w") as f:
            json.dump(m, f)

    digest(real[:16] + ("1" if real[16] == "0" else "0") * 48)
    with pytest.raises(UntrustedArtifactError, match="differs from the manifest"):
        check_artifact(str(art), "aoti")
    digest(real.upper())
    assert check_artifact(str(art), "aoti").startswith("verified")
    art.write_bytes(b"compiled kode")  # same size, other bytes
    with pytest.raises(UntrustedArtifactError, match="differs from the manifest"):
        verified_copy(str(art), "aoti")
    bare = tmp_path / "bare.pt2"
    bare.write_bytes(b"compiled code")
    note = check_artifact(str(bare), "aoti", trust=True)
    assert note.startswith("trusted explicitly") and "no manifest" in note


def test_max_images_never_lets_a_translation_replace_an_input_it_left_out(gen_file, tmp_path, capsys):
    """Catches (mutation testing): the inputs guarded against overwriting taken after --max-images
    (only the first N): a.jpg's translation out/a.png would replace the user's out/a.png, an input
    the flag left out, even with --overwrite."""
    d = tmp_path / "photos"
    _pngs(d / "out", n=1)
    os.rename(d / "out" / "im0.png", d / "out" / "a.png")
    Image.new("RGB", (40, 32), (200, 10, 10)).save(d / "a.jpg")
    before = (d / "out" / "a.png").read_bytes()
    assert _translate(gen_file, "--input", d, "--output", d / "out", "--max-images", "1", "--overwrite") == 2
    assert "would overwrite the input file" in capsys.readouterr().err
    assert (d / "out" / "a.png").read_bytes() == before


@pytest.mark.parametrize("field, value, reason", [
    ("format", "x", "not a fastcgan artifact manifest"),
    ("format_version", 2, r"format version 2, not one this fastcgan reads \(1 to 1\) \(written by a newer"),
    ("format_version", "1", "format version '1', not one"),
    ("format_version", None, "format version None, not one"),
    ("kind", "engine", "describes a TensorRT engine, not an AOTInductor package"),
    ("kind", ["aoti"], r"describes kind \['aoti'\], not an AOTInductor package"),
], ids=["format", "newer-version", "version-string", "no-version", "other-kind", "kind-list"])
def test_a_manifest_of_another_format_version_or_kind_does_not_verify(tmp_path, field, value, reason):
    """A manifest vouches for its file as the artifact fastcgan-export wrote, in a format this
    fastcgan reads: another format, a format version it does not know (a newer fastcgan's), or a
    manifest that describes a TensorRT engine beside a .pt2 is refused by name -- the digest
    matching is not enough. --trust-artifact still loads the file, with the reason in its note."""
    from fastcgan.deploy.manifest import check_artifact

    art = tmp_path / "g.pt2"
    art.write_bytes(b"compiled code")
    write_manifest(str(art), "aoti")
    assert check_artifact(str(art), "aoti").startswith("verified")
    m = json.loads(open(manifest_path(str(art))).read())
    m[field] = value
    with open(manifest_path(str(art)), "w") as f:
        json.dump(m, f)
    with pytest.raises(UntrustedArtifactError, match=reason):
        check_artifact(str(art), "aoti")
    note = check_artifact(str(art), "aoti", trust=True)
    assert note.startswith("trusted explicitly") and reason.split(",")[0].replace("\\", "") in note


@pytest.mark.parametrize("cross_device", [False, True], ids=["rename", "copy"])
def test_install_without_replace_never_replaces_an_existing_file(tmp_path, monkeypatch, cross_device):
    """``install(src, dst, replace=False)`` -- the export's no-overwrite rule -- refuses an existing
    ``dst`` and leaves it as it was, by rename and by the copy it falls back to across file systems."""
    import errno

    from fastcgan.deploy import manifest
    from fastcgan.fileio import OutputExistsError

    from fastcgan import fileio

    src, dst = tmp_path / "new.pt2", tmp_path / "g.pt2"
    if cross_device:  # the built file cannot be renamed into place: install copies it (a temporary beside dst)
        rename = fileio.move_into_place

        def across_file_systems(a, b, replace=True):
            if a == str(src):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return rename(a, b, replace)

        monkeypatch.setattr(fileio, "move_into_place", across_file_systems)
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        manifest.install(str(src), str(dst), replace=False)
    assert dst.read_bytes() == b"old"
    manifest.install(str(src), str(dst), replace=True)
    assert dst.read_bytes() == b"new"


@pytest.mark.parametrize("trust", ["false", "0", 1, None])
def test_trust_artifact_takes_a_bool_only(tmp_path, trust):
    """load(path, trust_artifact="false") -- an environment variable passed straight in -- was
    truthy: a .pt2 without a manifest was loaded, its shared library run."""
    from fastcgan.deploy.manifest import check_artifact, verified_bytes, verified_copy

    art = tmp_path / "g.pt2"
    art.write_bytes(b"compiled code")
    for check in (check_artifact, verified_copy, verified_bytes):
        with pytest.raises(TypeError, match="trust_artifact must be True or False"):
            check(str(art), "aoti", trust)
    with pytest.raises(TypeError, match="trust_artifact must be True or False"):
        load(str(art), device="cpu", trust_artifact=trust)


def test_a_manifest_that_is_not_a_regular_file_is_named_so(tmp_path):
    """A FIFO (or a folder) at g.pt2.manifest.json was reported as a missing manifest."""
    from fastcgan.deploy.manifest import check_artifact

    art = tmp_path / "g.pt2"
    art.write_bytes(b"compiled code")
    os.mkfifo(manifest_path(str(art)))
    with pytest.raises(UntrustedArtifactError, match=r"g\.pt2\.manifest\.json is not a regular file"):
        check_artifact(str(art), "aoti")


def test_a_run_generator_that_is_not_a_regular_file_is_named_so(tmp_path):
    """A FIFO at RUN/generator_AtoB.safetensors read "run directory fr has no generator_AtoB.safetensors
    (found generator_AtoB.safetensors)"."""
    from fastcgan.models.io import resolve_generator_path

    run = tmp_path / "fr"
    run.mkdir()
    os.mkfifo(run / "generator_AtoB.safetensors")
    with pytest.raises(FileNotFoundError, match="its generator_AtoB.safetensors is not a regular file"):
        resolve_generator_path(run, "AtoB")
