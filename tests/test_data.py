"""Data layer: image decoding, the unaligned dataset, batched augmentation, the device image bank."""

import io
import math
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastcgan.data import (
    BadImageError,
    DatasetError,
    SingleImageDataset,
    UnalignedDataset,
    augment_batch,
    collate,
    load_image,
    make_dataset,
    preload_to_device,
    to_model_range,
    to_uint8,
)
from fastcgan.data.datasets import SkippedImageWarning
from fastcgan.data.datasets import resized_size
from fastcgan.data.device import DeviceImageBank


def _rand_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_rgb(path, h=16, w=16, seed=0, fmt=None):
    Image.fromarray(_rand_rgb(h, w, seed)).save(path, format=fmt)
    return str(path)


def _make_layout(root, n_a=3, n_b=5, h=16, w=16, names_a=None):
    for domain, n in (("A", n_a), ("B", n_b)):
        d = root / f"train{domain}"
        d.mkdir(parents=True)
        names = names_a if (domain == "A" and names_a) else [f"{domain}{i:03d}.png" for i in range(n)]
        for i, name in enumerate(names):
            _save_rgb(d / name, h, w, seed=hash((domain, i)) % 1000)
    return str(root)


# --------------------------------------------------------------------------------------------
# image conversion
# --------------------------------------------------------------------------------------------


def test_grayscale_l_to_rgb_and_single_channel(tmp_path):
    arr = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    p = tmp_path / "g.png"
    Image.fromarray(arr, mode="L").save(p)
    rgb = load_image(p)
    assert rgb.shape == (3, 12, 10) and rgb.dtype == torch.uint8
    for c in range(3):
        assert torch.equal(rgb[c], torch.from_numpy(arr))
    gray = load_image(p, channels=1)
    assert gray.shape == (1, 12, 10) and torch.equal(gray[0], torch.from_numpy(arr))


def test_la_composited_on_white(tmp_path):
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0] = 40
    la[:2, :, 1] = 255  # top half opaque, bottom half transparent
    p = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(p)
    t = load_image(p)
    assert (t[:, :2] == 40).all() and (t[:, 2:] == 255).all()
    assert load_image(p, channels=1).shape == (1, 4, 4)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 50)
    rgba[0, :, 3] = 255
    rgba[1, 0, 3] = 0
    rgba[1, 1, 3] = 128
    rgba[1, 2, 3] = 0
    rgba[1, 2, :3] = (0, 0, 0)  # black under a transparent pixel must not show
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    t = load_image(p).permute(1, 2, 0).numpy().astype(int)
    assert (t[0] == (200, 10, 50)).all()
    assert (t[1, 0] == 255).all() and (t[1, 2] == 255).all()
    expect = np.array([200, 10, 50]) * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(t[1, 1] - expect).max() <= 1


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (6, 4), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    px = img.load()
    for x in range(6):
        px[x, 0] = 1
    img.info["transparency"] = 0  # palette index 0 (black) is transparent
    p = tmp_path / "p.png"
    img.save(p, transparency=0)
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    t = load_image(p).permute(1, 2, 0).numpy()
    assert (t[0] == (10, 200, 30)).all()
    assert (t[1:] == 255).all()  # transparent black became white, not black


def test_16bit_is_scaled_not_clipped(tmp_path):
    vals = np.array([[0, 129, 257 * 100, 32768, 65280, 65535]], dtype=np.uint16)
    p = tmp_path / "i16.png"
    Image.fromarray(vals).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")
    t = load_image(p)
    assert t.shape == (3, 1, 6)
    assert t[0, 0].tolist() == [0, 1, 100, 128, 254, 255]  # round(v * 255 / 65535)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    p = tmp_path / "cmyk.jpg"
    img.save(p, quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    t = load_image(p).float().mean(dim=(1, 2))
    assert t[0] > 240 and t[1] < 15 and t[2] < 15, t


def test_exif_orientation_6_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # stored landscape: H=20, W=40
    arr[:8, :8] = (255, 0, 0)  # marker in the stored top-left corner
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes(), quality=95)
    t = load_image(p)
    assert t.shape == (3, 40, 20)  # displayed portrait
    top_right = t[:, :8, -8:].float().mean(dim=(1, 2))
    top_left = t[:, :8, :8].float().mean(dim=(1, 2))
    assert top_right[0] > 200 and top_right[1] < 50  # the marker moved to the top-right
    assert top_left[0] < 50


def _bad_files(d):
    good = Image.fromarray(_rand_rgb(64, 64, 3))
    buf = io.BytesIO()
    good.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    files = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.jpg": jpeg[:200] + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
        "notes.jpg": b"this is a text file, not an image\n" * 10,
        "empty.png": b"",
    }
    paths = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        paths[name] = str(d / name)
    return paths


@pytest.mark.parametrize("name", ["truncated.jpg", "corrupt.jpg", "notes.jpg", "empty.png"])
def test_bad_files_raise_bad_image_error(tmp_path, name):
    path = _bad_files(tmp_path)[name]
    with pytest.raises(BadImageError) as ei:
        load_image(path)
    assert ei.value.path == path and path in str(ei.value)


def test_bad_files_skipped_with_warning_and_counted(tmp_path):
    root = tmp_path / "ds"
    _make_layout(root, n_a=2, n_b=2)
    bad = _bad_files(root / "trainA")
    ds = UnalignedDataset(str(root), load_size=16, crop_size=16, seed=1)
    assert ds.A_size == 6  # nothing decoded at construction
    with pytest.warns(SkippedImageWarning) as rec:
        items = [ds[i] for i in range(len(ds))]
    messages = " ".join(str(w.message) for w in rec)
    for p in bad.values():
        assert p in messages, f"warning does not name {p}"
    assert sorted(ds.skipped) == sorted(bad.values())
    good = {p for p in ds.A_paths if p not in bad.values()}
    assert all(it["A_path"] in good for it in items)
    assert all(it["A"].shape == (3, 16, 16) for it in items)
    # Substitution is deterministic: a bad index maps to the next good file, every time.
    idx = ds.A_paths.index(bad["corrupt.jpg"])
    again = ds[idx]["A_path"]
    assert again == ds[idx]["A_path"] and again in good


def test_validate_pass_drops_bad_files(tmp_path):
    root = tmp_path / "ds"
    _make_layout(root, n_a=2, n_b=2)
    bad = _bad_files(root / "trainB")
    with pytest.warns(SkippedImageWarning):
        ds = UnalignedDataset(str(root), load_size=16, crop_size=16, validate=True)
    assert ds.B_size == 2 and sorted(ds.skipped) == sorted(bad.values())


def test_all_bad_domain_raises(tmp_path):
    root = tmp_path / "ds"
    _make_layout(root, n_a=1, n_b=1)
    os.remove(root / "trainB" / "B000.png")
    (root / "trainB" / "x.png").write_bytes(b"")
    ds = UnalignedDataset(str(root), load_size=16, crop_size=16)
    with pytest.warns(SkippedImageWarning), pytest.raises(DatasetError, match="trainB"):
        ds[0]


def test_skipped_reported_through_loader_workers(tmp_path):
    root = tmp_path / "ds"
    _make_layout(root, n_a=3, n_b=3)
    (root / "trainA" / "zz_bad.png").write_bytes(b"not a png")
    ds = UnalignedDataset(str(root), load_size=16, crop_size=16)
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    reported = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in loader:
            assert batch["A"].shape == (2, 3, 16, 16) and batch["A"].dtype == torch.uint8
            reported += ds.record_skipped(batch)
    bad = str(root / "trainA" / "zz_bad.png")
    assert reported == [bad] and ds.skipped == [bad]


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------


def test_names_with_spaces_non_ascii_and_case_insensitive_extensions(tmp_path):
    names = ["my photo 1.png", "été à Paris.PNG", "日本の風景.JPG", "x.JpEg", "readme.txt", ".hidden.png"]
    root = tmp_path / "ds"
    (root / "trainA" / "sub dir").mkdir(parents=True)
    (root / "trainB").mkdir()
    for n in names[:3]:
        _save_rgb(root / "trainA" / n)
    _save_rgb(root / "trainA" / "sub dir" / names[3], fmt="JPEG")
    (root / "trainA" / names[4]).write_text("x")
    _save_rgb(root / "trainA" / names[5])
    _save_rgb(root / "trainB" / "b.bmp")
    ds = UnalignedDataset(str(root), load_size=16, crop_size=16)
    base = sorted(os.path.basename(p) for p in ds.A_paths)
    assert base == sorted(names[:4])  # recursive, case-insensitive, no txt, no hidden file
    assert ds.A_paths == sorted(ds.A_paths)
    for i in range(len(ds)):
        assert ds[i]["A"].shape == (3, 16, 16)
    assert make_dataset(str(root / "trainA"), max_size=2) == ds.A_paths[:2]


def test_missing_and_empty_domain_folders(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        UnalignedDataset(str(tmp_path / "nowhere"))
    root = tmp_path / "ds"
    (root / "trainA").mkdir(parents=True)
    _save_rgb(root / "trainA" / "a.png")
    with pytest.raises(DatasetError, match=r"trainB.*does not exist \(.*ds holds trainA/\)"):
        UnalignedDataset(str(root))
    (root / "trainB").mkdir()
    (root / "trainB" / "notes.txt").write_text("no images")
    with pytest.raises(DatasetError, match=r"trainB.*no image files"):
        UnalignedDataset(str(root))
    with pytest.raises(DatasetError, match="testA"):
        UnalignedDataset(str(root), phase="test")


def test_unreadable_folder_is_named_not_called_empty(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list; the dataset then said "contains no image files"
    (or silently trained without a sub-folder). Permissions cannot be taken from root, so the
    listing is refused the way the kernel refuses it."""
    root = tmp_path / "ds"
    for d in ("trainA", "trainB/locked"):
        (root / d).mkdir(parents=True)
    _save_rgb(root / "trainA" / "a.png")
    _save_rgb(root / "trainB" / "b.png")
    locked, real_scandir = str(root / "trainB" / "locked"), os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError, match=r"trainB.*cannot list.*locked.*Permission denied"):
        UnalignedDataset(str(root))


def test_a_deeply_nested_folder_is_walked(tmp_path):
    """Python 3.11's os.walk recurses once per folder level: 1,100 nested folders were a
    RecursionError traceback in translate, eval and training. Linked folders stay unentered."""
    from fastcgan.data import make_dataset

    deep = leaf = tmp_path / "in"
    deep.mkdir()
    for _ in range(1100):  # one level at a time: mkdir(parents=True) recurses too
        leaf = leaf / "a"
        leaf.mkdir()
    _save_rgb(leaf / "x.png")
    _save_rgb(deep / "top.png")
    (deep / "link").symlink_to(deep / "a")
    try:
        with pytest.warns(UserWarning, match=r"left out 1 entry: .*link \(a linked folder, not followed\)"):
            found = make_dataset(str(deep))
        assert found == sorted([str(leaf / "x.png"), str(deep / "top.png")])
    finally:  # bottom up, one level at a time: pytest's recursive clean-up of tmp_path would not get through
        (leaf / "x.png").unlink()
        while leaf != deep:
            leaf.rmdir()
            leaf = leaf.parent


def test_bad_arguments(tmp_path):
    root = _make_layout(tmp_path / "ds")
    with pytest.raises(DatasetError, match="preprocess"):
        UnalignedDataset(root, preprocess="zoom")
    with pytest.raises(DatasetError, match="crop_size"):
        UnalignedDataset(root, load_size=64, crop_size=128)
    with pytest.raises(DatasetError, match="input_nc"):
        UnalignedDataset(root, input_nc=2)


def test_sampling_rule_and_length(tmp_path):
    root = _make_layout(tmp_path / "ds", n_a=3, n_b=7)
    ds = UnalignedDataset(root, load_size=16, crop_size=16, seed=5)
    assert len(ds) == 7
    assert [ds[i]["A_path"] for i in range(7)] == [ds.A_paths[i % 3] for i in range(7)]
    first = [ds[i]["B_path"] for i in range(7)]
    assert first == [ds[i]["B_path"] for i in range(7)]  # deterministic for (seed, epoch, index)
    draws = []
    for e in range(30):
        ds.set_epoch(e)
        draws += [ds[i]["B_path"] for i in range(7)]
    assert set(draws) == set(ds.B_paths)  # B is random, covering the domain
    assert draws[:7] != draws[7:14] or draws[7:14] != draws[14:21]
    serial = UnalignedDataset(root, load_size=16, crop_size=16, serial_batches=True)
    assert [serial[i]["B_path"] for i in range(7)] == serial.B_paths
    assert ds[0]["A"].dtype == torch.uint8


def test_grayscale_domains(tmp_path):
    root = _make_layout(tmp_path / "ds")
    ds = UnalignedDataset(root, load_size=16, crop_size=16, input_nc=1, output_nc=3)
    it = ds[0]
    assert it["A"].shape == (1, 16, 16) and it["B"].shape == (3, 16, 16)


# --------------------------------------------------------------------------------------------
# preprocess modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, wh, item_shape, batch_crop",
    [
        ("resize_and_crop", (60, 40), (32, 32), 24),
        ("crop", (60, 40), (24, 24), None),
        ("scale_width", (60, 40), (24, 32), None),  # h = max(32 * 40 / 60, crop 24) = 24
        ("scale_width", (60, 90), (48, 32), None),  # h = 32 * 90 / 60 = 48
        ("scale_width_and_crop", (60, 90), (24, 24), None),
        ("none", (62, 41), (40, 64), None),  # nearest multiples of 4
        ("none", (60, 40), (40, 60), None),
    ],
)
def test_preprocess_mode_sizes(tmp_path, mode, wh, item_shape, batch_crop):
    w, h = wh
    root = tmp_path / "ds"
    for d in ("trainA", "trainB"):
        (root / d).mkdir(parents=True)
        _save_rgb(root / d / "x.png", h=h, w=w)
    ds = UnalignedDataset(str(root), preprocess=mode, load_size=32, crop_size=24)
    it = ds[0]
    assert it["A"].shape == (3,) + item_shape
    assert ds.batch_augment == {"crop_size": batch_crop, "flip": True}
    out = augment_batch(it["A"][None], **ds.batch_augment)
    side = batch_crop or item_shape
    assert out.shape[-2:] == ((side, side) if batch_crop else item_shape)


def test_cpu_crop_is_a_window_of_the_image(tmp_path):
    root = tmp_path / "ds"
    for d in ("trainA", "trainB"):
        (root / d).mkdir(parents=True)
        _save_rgb(root / d / "x.png", h=30, w=40, seed=7)
    full = load_image(str(root / "trainA" / "x.png"))
    ds = UnalignedDataset(str(root), preprocess="crop", crop_size=16, load_size=16)
    seen = set()
    for e in range(20):
        ds.set_epoch(e)
        crop = ds[0]["A"]
        hits = [
            (y, x) for y in range(15) for x in range(25) if torch.equal(full[:, y : y + 16, x : x + 16], crop)
        ]
        assert hits, "crop is not a window of the image"
        seen.add(hits[0])
    assert len(seen) > 5


# --------------------------------------------------------------------------------------------
# augment_batch
# --------------------------------------------------------------------------------------------


def test_model_range_roundtrip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    f = to_model_range(x)
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(to_uint8(f), x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


@pytest.mark.parametrize("channels_last", [False, True])
def test_augment_batch_crops_are_windows_and_flips_mirror(channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 13, 11), dtype=torch.uint8, generator=g)
    out, prm = augment_batch(x, 7, True, generator=g, channels_last=channels_last, return_params=True)
    assert out.shape == (16, 3, 7, 7) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    for b in range(16):
        t, l, fl = int(prm["top"][b]), int(prm["left"][b]), bool(prm["flip"][b])
        win = x[b, :, t : t + 7, l : l + 7]
        if fl:
            win = win.flip(-1)
        assert torch.equal(out[b], to_model_range(win))
    assert 0 < int(prm["flip"].sum()) < 16


def test_augment_batch_full_size_flip_and_identity():
    x = torch.randint(0, 256, (64, 3, 5, 6), dtype=torch.uint8)
    out, prm = augment_batch(x, None, True, return_params=True)
    flipped = prm["flip"]
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(out[flipped], to_model_range(x[flipped].flip(-1)))
    assert torch.equal(out[~flipped], to_model_range(x[~flipped]))
    assert torch.equal(augment_batch(x, None, False), to_model_range(x))


def test_augment_batch_offsets_cover_every_window_uniformly():
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(4000, 1, 10, 10, dtype=torch.uint8)
    _, prm = augment_batch(x, 6, True, generator=g, return_params=True)
    counts = torch.bincount(prm["top"], minlength=5)
    assert counts.numel() == 5 and counts.min() > 650 and counts.max() < 950  # 800 expected each
    assert abs(prm["flip"].float().mean().item() - 0.5) < 0.03
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment_batch(x[:8] + 5, 6, True, g1), augment_batch(x[:8] + 5, 6, True, g2))


def test_augment_batch_errors():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="crop_size"):
        augment_batch(x, 9, True)
    with pytest.raises(TypeError, match="uint8"):
        augment_batch(x.float(), 4, True)
    with pytest.raises(ValueError, match="B, C, H, W"):
        augment_batch(x[0], 4, True)


# --------------------------------------------------------------------------------------------
# single-image dataset
# --------------------------------------------------------------------------------------------


def test_single_image_dataset(tmp_path):
    d = tmp_path / "in put"
    d.mkdir()
    _save_rgb(d / "a.png", h=21, w=13)
    _save_rgb(d / "b é.jpg", h=8, w=8, fmt="JPEG")
    (d / "c.png").write_bytes(b"broken")
    ds = SingleImageDataset(str(d))
    assert len(ds) == 3
    it = ds[0]
    assert it["image"].shape == (3, 21, 13) and it["size"] == (21, 13) and it["path"].endswith("a.png")
    with pytest.warns(SkippedImageWarning, match="c.png"):
        batch = collate([ds[1], ds[2]])
    assert batch["image"].shape == (1, 3, 8, 8) and batch["skipped"] == [str(d / "c.png")]
    assert ds.skipped == [str(d / "c.png")]
    one = SingleImageDataset(str(d / "a.png"), channels=1)
    assert len(one) == 1 and one[0]["image"].shape == (1, 21, 13)
    with pytest.raises(DatasetError, match="missing.png"):
        SingleImageDataset(str(d / "missing.png"))
    with pytest.raises(DatasetError, match="different sizes"):
        collate([ds[0], ds[1]])


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------


def test_monet2photo_mini_loads(monet2photo_mini):
    ds = UnalignedDataset(monet2photo_mini, validate=True)
    assert (ds.A_size, ds.B_size, len(ds)) == (100, 210, 210)
    assert ds.skipped == []
    assert any(" " in os.path.basename(p) for p in ds.A_paths + ds.B_paths)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["A"].shape == (4, 3, 286, 286) and batch["B"].dtype == torch.uint8
    real = augment_batch(batch["A"], **ds.batch_augment)
    assert real.shape == (4, 3, 256, 256) and -1 <= real.min() and real.max() <= 1
    assert real.std() > 0.1
    test = UnalignedDataset(monet2photo_mini, phase="test", preprocess="none", flip=False)
    assert (test.A_size, test.B_size) == (21, 40) and test[0]["A"].shape == (3, 256, 256)


# --------------------------------------------------------------------------------------------
# device image bank
# --------------------------------------------------------------------------------------------


def _bank_vs_loader(root, device, draws=150, bs=6):
    ds = UnalignedDataset(root, load_size=20, crop_size=14, seed=0)
    bank = preload_to_device(ds, device)
    # The bank holds exactly the dataset's resized images.
    for i, p in enumerate(ds.A_paths):
        img, _, _ = ds.load_resized("A", i)
        assert torch.equal(bank.A[i].cpu(), torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert bank.batch_augment == ds.batch_augment

    def stats(batches, gen):
        outs, tops, lefts, flips = [], [], [], []
        for a in batches:
            o, prm = augment_batch(a, generator=gen, return_params=True, **ds.batch_augment)
            outs.append(o.cpu())
            tops.append(prm["top"].cpu())
            lefts.append(prm["left"].cpu())
            flips.append(prm["flip"].cpu())
        o = torch.cat(outs)
        return (
            o.mean(dim=(0, 2, 3)),
            o.std(dim=(0, 2, 3)),
            torch.cat(flips).float().mean(),
            torch.bincount(torch.cat(tops), minlength=7).float(),
            torch.bincount(torch.cat(lefts), minlength=7).float(),
        )

    # CPU loader path: DataLoader(shuffle) + augment_batch on the host.
    loader = DataLoader(ds, bs, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    cpu_batches, a_counts = [], torch.zeros(ds.A_size)
    while len(cpu_batches) < draws:
        ds.set_epoch(len(cpu_batches))
        for batch in loader:
            cpu_batches.append(batch["A"])
            if len(cpu_batches) == draws:
                break
    cpu = stats(cpu_batches, torch.Generator().manual_seed(1))

    dev_gen = torch.Generator(device=device).manual_seed(1)
    dev_batches = []
    for step in range(draws):
        b = bank.sample_batch(bs, step)
        assert b["A"].device.type == torch.device(device).type and b["A"].shape == (bs, 3, 20, 20)
        dev_batches.append(b["A"])
        if step < len(ds) // bs:  # first epoch: every A position visited once, in a permutation
            for img in b["A"]:
                hit = (bank.A == img).flatten(1).all(1).nonzero()
                a_counts[hit.cpu()] += 1
    dev = stats(dev_batches, dev_gen)

    for c_stat, d_stat in zip(cpu[:2], dev[:2]):
        assert torch.allclose(c_stat, d_stat, atol=0.05), (c_stat, d_stat)
    assert abs(cpu[2] - 0.5) < 0.05 and abs(dev[2] - 0.5) < 0.05
    for c_hist, d_hist in zip(cpu[3:], dev[3:]):
        expected = draws * bs / 7
        assert c_hist.numel() == d_hist.numel() == 7
        assert (c_hist - expected).abs().max() < 0.25 * expected
        assert (d_hist - expected).abs().max() < 0.25 * expected
    return bank, a_counts


def test_device_bank_matches_loader_statistics(tmp_path):
    root = _make_layout(tmp_path / "ds", n_a=5, n_b=12, h=24, w=30)
    bank, a_counts = _bank_vs_loader(root, "cpu")
    # 12 positions per epoch over 5 A images: each image 2 or 3 times in the first epoch.
    assert a_counts.sum() == 12 and a_counts.min() >= 2 and a_counts.max() <= 3
    # B indices are uniform over the domain.
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([bank.sample_batch(8, s, generator=g)["B"][:, 0, 0, 0] for s in range(200)])
    assert len(set(idx.tolist())) >= 10
    # Same step -> same A batch (resume-safe), across an epoch boundary too.
    assert torch.equal(bank.sample_batch(5, 2)["A"], bank.sample_batch(5, 2)["A"])


@pytest.mark.cuda
def test_device_bank_on_cuda(tmp_path):
    root = _make_layout(tmp_path / "ds", n_a=5, n_b=12, h=24, w=30)
    bank, a_counts = _bank_vs_loader(root, "cuda")
    assert bank.A.is_cuda and a_counts.sum() == 12
    # Sampling and augmenting never wait for the GPU (no host sync), across epoch boundaries too.
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(30):
            batch = bank.sample_batch(5, step, generator=gen)
            out = augment_batch(batch["A"], generator=gen, channels_last=True, **bank.batch_augment)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (5, 3, 14, 14) and out.is_cuda


def test_device_bank_needs_one_size(tmp_path):
    root = tmp_path / "ds"
    for d, sizes in (("trainA", [(20, 30), (20, 40)]), ("trainB", [(20, 30)])):
        (root / d).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            _save_rgb(root / d / f"{i}.png", h=h, w=w)
    ds = UnalignedDataset(str(root), preprocess="scale_width", load_size=16, crop_size=8)
    with pytest.raises(DatasetError, match="one image size"):
        preload_to_device(ds, "cpu")
    ok = UnalignedDataset(str(root), preprocess="resize_and_crop", load_size=16, crop_size=8)
    bank = preload_to_device(ok, "cpu")
    assert bank.A.shape == (2, 3, 16, 16) and bank.batch_augment["crop_size"] == 8
    assert math.isclose(bank.nbytes, 3 * 3 * 16 * 16)


@pytest.mark.parametrize("preprocess", ["resize_and_crop", "crop", "none", "scale_width", "scale_width_and_crop"])
@pytest.mark.parametrize("layout", ["unaligned", "aligned", "colorization"])
def test_the_banks_size_read_from_headers_is_the_decoded_banks(tmp_path, preprocess, layout, monkeypatch):
    """An explicit --data-on-gpu is checked against the memory there is before anything is decoded,
    by ``decoded_nbytes`` from the file headers: it must be what the bank then holds, in every
    preprocess mode and layout (grey inputs, pair halves, colorization's RGB-only bank)."""
    from fastcgan.data import AlignedDataset, ColorizationDataset

    root = tmp_path / "ds"
    if layout == "unaligned":  # one grey A domain (input_nc 1), B in RGB: 42x30 files
        (root / "trainA").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_rand_rgb(30, 42, i)[..., 0], mode="L").save(root / "trainA" / f"{i}.png")
        _make_layout(tmp_path / "b", n_a=1, n_b=2, h=30, w=42)
        (tmp_path / "b" / "trainB").rename(root / "trainB")
        ds = UnalignedDataset(str(root), preprocess=preprocess, load_size=24, crop_size=16, input_nc=1)
    else:  # 84x30 pair images (two 42x30 halves) or plain 42x30 colour images
        (root / "train").mkdir(parents=True)
        for i in range(3):
            _save_rgb(root / "train" / f"{i}.png", h=30, w=84 if layout == "aligned" else 42, seed=i)
        cls = AlignedDataset if layout == "aligned" else ColorizationDataset
        ds = cls(str(root), preprocess=preprocess, load_size=24, crop_size=16)
    monkeypatch.setattr("fastcgan.data.images.Image.Image.load", None)  # headers only: decoding would fail
    estimate = ds.decoded_nbytes()
    monkeypatch.undo()
    bank = preload_to_device(ds, "cpu")
    assert estimate == bank.nbytes > 0


def test_header_checks_of_a_png_never_decode_its_pixels(tmp_path, monkeypatch):
    """oriented_size() asked Pillow's PNG getexif(), which decodes the whole image to look for a
    late eXIf chunk: a 1.8 MB PNG claiming 25000x25000 cost 3 GB in the "header-only" checks."""
    from PIL import PngImagePlugin

    from fastcgan.data.images import image_size, oriented_size

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "rot.png", exif=exif.tobytes())
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.png")

    def no_decode(self):
        raise AssertionError("decoded pixels in a header check")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    assert oriented_size(str(tmp_path / "rot.png")) == (20, 40)  # its EXIF comes before the pixels
    assert oriented_size(str(tmp_path / "plain.png")) == (40, 20) == image_size(str(tmp_path / "plain.png"))


def test_a_file_pillow_would_open_as_another_format_is_refused_unread(tmp_path, monkeypatch):
    """Pillow goes by the content: an ICO named a.png was opened as ICO, whose open() decodes the
    PNG inside before any size check (a 1.1 MB file wrapping 20000x20000 took 2.3 GB in the header
    check). Only the formats of the accepted extensions are opened now; a GIF named .png still is."""
    import io
    import struct

    from PIL import PngImagePlugin

    from fastcgan.data.images import image_size, open_image, oriented_size

    png = io.BytesIO()
    Image.new("RGB", (300, 200)).save(png, format="PNG")
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png.getvalue()), 22)
    (tmp_path / "a.png").write_bytes(ico + png.getvalue())
    Image.new("RGB", (30, 20), (9, 9, 9)).save(tmp_path / "g.png", format="GIF")

    def no_decode(self):
        raise AssertionError("decoded the PNG inside an ICO")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    assert image_size(str(tmp_path / "a.png")) is None and oriented_size(str(tmp_path / "a.png")) is None
    with pytest.raises(BadImageError, match=r"a\.png: not an image in a format read here \(JPEG, PNG, PPM"):
        open_image(str(tmp_path / "a.png"))
    monkeypatch.undo()
    assert image_size(str(tmp_path / "g.png")) == (30, 20)
    assert np.asarray(open_image(str(tmp_path / "g.png")))[0, 0].tolist() == [9, 9, 9]


def test_png_image_data_in_many_chunks_is_not_metadata(tmp_path, monkeypatch):
    """The walk over a PNG's chunks counts the image data (IDAT; an APNG's frames) apart: a file
    whose pixels come in many small chunks decodes as it is, but the walk itself stops at
    MAX_PNG_CHUNKS chunks of any kind."""
    import io
    import struct
    import zlib

    import fastcgan.data.images as images

    pixels = _rand_rgb(40, 30)  # noise: 3.6 kB of image data after compression
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    png = png.getvalue()
    start = png.index(b"IDAT") - 4
    length = int.from_bytes(png[start:start + 4], "big")
    data = png[start + 8:start + 8 + length]

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    split = b"".join(chunk(b"IDAT", data[i:i + 1]) for i in range(len(data)))  # one byte a chunk
    assert len(data) > images.MAX_METADATA_SEGMENTS
    (tmp_path / "split.png").write_bytes(png[:start] + split + png[start + 12 + length:])
    assert np.array_equal(np.asarray(images.open_image(str(tmp_path / "split.png"))), pixels)
    # No IEND and zeros after the data: Pillow stops at the first chunk type that is not 4 word
    # characters (not a run of 12-byte "chunks" of type \0\0\0\0), and so does the walk.
    (tmp_path / "padded.png").write_bytes(png[:-12] + bytes(16 << 10))
    assert images.metadata_problem(str(tmp_path / "padded.png")) is None
    assert np.array_equal(np.asarray(images.open_image(str(tmp_path / "padded.png"))), pixels)
    monkeypatch.setattr(images, "MAX_PNG_CHUNKS", len(data))
    with pytest.raises(BadImageError, match=rf"split.png: more than {len(data):,} PNG chunks \(not decoded\)"):
        images.open_image(str(tmp_path / "split.png"))


def test_files_with_absurd_metadata_are_refused_before_pillow_reads_it(tmp_path):
    """Pillow's open() reads every metadata segment before the pixels: JPEG EXIF segments are
    joined in quadratic time (6.5 MB of 17-byte ones: 90 s for one header check), millions of
    tiny PNG chunks cost ~20x their size in memory, a PPM header is read byte by byte (50 MB of
    comments: 11 s). Past 1,024 segments / 64 KiB of PPM header such files are refused unread;
    real files (EXIF, a multi-segment ICC profile, text chunks, comments) are untouched."""
    import io
    import struct
    import zlib

    from fastcgan.data.images import MAX_METADATA_SEGMENTS, image_size, metadata_problem, open_image

    img = Image.fromarray(_rand_rgb(12, 10))
    exif = Image.Exif()
    exif[0x0112] = 1
    jpg, png = io.BytesIO(), io.BytesIO()
    img.save(jpg, format="JPEG", exif=exif.tobytes(), icc_profile=b"\0" * 200_000)  # ICC in 4 APP2 segments
    img.save(png, format="PNG")
    jpg, png = jpg.getvalue(), png.getvalue()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    n = MAX_METADATA_SEGMENTS
    files = {
        "exif.jpg": (jpg[:2] + b"\xff\xe1\x00\x08Exif\x00\x00" * n + jpg[2:], "JPEG segments"),
        # Pillow skips stray and fill bytes between segments: they hide nothing from the count
        "hidden.jpg": (jpg[:2] + b"j\xff\xff" + b"\xff\xe1\x00\x08Exif\x00\x00x" * n + jpg[2:], "JPEG segments"),
        "stray.jpg": (jpg[:2] + b"junk" * (16 << 10) + b"!" + jpg[2:], "stray bytes"),
        "text.png": (png[:33] + b"".join(chunk(b"tEXt", b"k%d\0" % i) for i in range(n)) + png[33:], "PNG chunks"),
        # after the pixels too: decoding reads them, and Pillow keeps every private one (50x the file's size)
        "late.png": (png[:-12] + chunk(b"prIv", b"") * (n + 1) + png[-12:], "PNG chunks"),
        "long.ppm": (b"P6\n#" + b"c" * (64 << 10) + b"\n10 12\n255\n" + bytes(360), "a PPM header longer"),
    }
    for name, (data, said) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImageError, match=rf"{name}: (more than [\d,]+ )?{said}"):
            open_image(str(tmp_path / name))
        assert image_size(str(tmp_path / name)) is None
    fine = {
        "real.jpg": jpg,
        "some.png": png[:33] + b"".join(chunk(b"tEXt", b"k%d\0v" % i) for i in range(n - 2)) + png[33:],
        "note.ppm": b"P6\n# a comment\n10 12\n255\n" + bytes(360),
    }
    for name, data in fine.items():
        (tmp_path / name).write_bytes(data)
        assert metadata_problem(str(tmp_path / name)) is None, name
        assert open_image(str(tmp_path / name)).size == (10, 12) == image_size(str(tmp_path / name)), name


def test_images_without_an_honest_8_bit_conversion_are_named_errors(tmp_path):
    """32-bit integer samples were clipped at 65535 (a 0..2^31 ramp read as 0,255,255,...), and a
    CIELab TIFF read as one channel was a raw ValueError from the conversion."""
    ramp = np.tile(np.linspace(0, 2**31 - 1, 64).astype(np.int32), (8, 1))
    Image.fromarray(ramp, "I").save(tmp_path / "i32.tif")
    with pytest.raises(BadImageError, match="i32.tif.*outside the 16-bit range"):
        load_image(tmp_path / "i32.tif")
    Image.fromarray(_rand_rgb(8, 8)).convert("LAB").save(tmp_path / "lab.tif")
    with pytest.raises(BadImageError, match="lab.tif.*LAB"):
        load_image(tmp_path / "lab.tif", channels=1)
    small = np.tile(np.arange(0, 65536, 4096, dtype=np.int32), (2, 1))  # 16-bit data in 32-bit storage
    Image.fromarray(small, "I").save(tmp_path / "i16in32.tif")
    assert load_image(tmp_path / "i16in32.tif")[0, 0].tolist() == [(v * 255 + 32767) // 65535 for v in small[0]]


def test_16_bit_transparency_and_infinite_floats(tmp_path):
    """A 16-bit grey PNG's tRNS colour key was ignored (its pixels kept their grey, not white as
    every other transparency); a +inf float sample read black."""
    from fastcgan.data.images import to_channels

    vals = np.array([[5, 5, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(vals).save(tmp_path / "g16.png", transparency=5)
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I") and check.info.get("transparency") == 5
    assert load_image(tmp_path / "g16.png", channels=1)[0, 0].tolist() == [255, 255, 156, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, np.inf, np.nan]], dtype=np.float32), "F")
    assert np.asarray(to_channels(f, 1))[0].tolist() == [0, 128, 255, 0]


def test_entries_left_out_of_a_folder_are_named(tmp_path):
    """A link to nowhere named like an image and a linked sub-folder were left out without a word."""
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (4, 4)).save(d / "a.png")
    (d / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "elsewhere").mkdir()
    (d / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.warns(UserWarning, match="left out 2 entries: .*gone.png \\(a link to nowhere\\).*linked \\(a linked"):
        assert make_dataset(str(d)) == [str(d / "a.png")]


def test_hidden_folders_loops_and_the_left_out_list(tmp_path):
    """Catches (mutation testing): a hidden folder (``.ipynb_checkpoints``) walked into and its
    images trained on; a link loop named like an image dropped without a word; " ..." after exactly
    five left-out entries (it means more than five)."""
    d = tmp_path / "imgs"
    (d / ".ipynb_checkpoints").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(d / "a.png")
    Image.new("RGB", (4, 4)).save(d / ".ipynb_checkpoints" / "x.png")
    (d / "loop.png").symlink_to(d / "loop.png")
    with pytest.warns(UserWarning, match=r"left out 1 entry: .*loop.png \(a link to nowhere\)$"):
        assert make_dataset(str(d)) == [str(d / "a.png")]
    for n, dots in ((4, False), (5, True)):  # with the loop: 5 and 6 entries
        for i in range(n):
            (d / f"gone{i}.png").unlink(missing_ok=True)
            (d / f"gone{i}.png").symlink_to(tmp_path / "nowhere.png")
        with pytest.warns(UserWarning, match=f"left out {n + 1} entries") as w:
            make_dataset(str(d))
        assert str(w[0].message).endswith(" ...") == dots


def test_epoch_sampler_reshuffles_each_epoch_and_resumes_mid_epoch():
    """Each epoch has its own order (seeded by seed and epoch: the same on every run), a data
    position resumes inside it, and DDP ranks split each global batch between them."""
    from fastcgan.data.sampler import EpochSampler

    def order(epoch, start=0, seed=0, **kw):
        return list(EpochSampler(12, seed, epoch, start, True, **kw))

    e0, e1 = order(0), order(1)
    assert sorted(e0) == sorted(e1) == list(range(12)) and e0 != e1
    assert order(0) == e0 and order(0, seed=1) != e0
    assert order(1, start=5) == e1[5:]
    assert list(EpochSampler(12, 0, 3, 2, False)) == list(range(2, 12))  # --serial-batches
    r0, r1 = order(1, rank=0, world=2, global_batch=4), order(1, rank=1, world=2, global_batch=4)
    assert r0 == [i for k in range(0, 12, 4) for i in e1[k:k + 2]]  # each global batch of 4: 2 per rank
    assert r1 == [i for k in range(0, 12, 4) for i in e1[k + 2:k + 4]]


def _numbered(n):
    """uint8 images whose every pixel is their index."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()


def test_scale_width_raises_a_short_image_to_the_crop_size():
    """An image already load_size wide but shorter than crop_size still gets its height raised
    (the official __scale_width keeps only a full match)."""
    assert resized_size((64, 20), "scale_width", 64, 32) == (64, 32)
    assert resized_size((64, 40), "scale_width", 64, 32) == (64, 40)


def test_device_bank_serial_batches_walk_domain_b_in_order():
    bank = DeviceImageBank(_numbered(3), _numbered(5), length=5, batch_augment={"crop_size": None, "flip": False},
                           shuffle=False, serial_batches=True)
    got = bank.sample_batch(5, 0)
    assert got["A"][:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1]
    assert got["B"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_device_bank_draws_a_new_permutation_every_epoch():
    bank = DeviceImageBank(_numbered(8), _numbered(8), length=8, batch_augment={"crop_size": None, "flip": False})
    e0, e1, e2 = (bank.sample_batch(8, s)["A"][:, 0, 0, 0].tolist() for s in range(3))
    assert sorted(e0) == sorted(e1) == sorted(e2) == list(range(8))
    assert len({tuple(e0), tuple(e1), tuple(e2)}) == 3
    assert bank.sample_batch(8, 1)["A"][:, 0, 0, 0].tolist() == e1


def test_device_bank_epoch_is_the_larger_domain(tmp_path):
    root = _make_layout(tmp_path / "ds", n_a=2, n_b=5)
    ds = UnalignedDataset(root, load_size=16, crop_size=16)
    bank = preload_to_device(ds, "cpu")
    assert len(bank) == len(ds) == 5


def test_a_bad_file_is_reported_once_not_at_every_read(tmp_path):
    root = tmp_path / "ds"
    _make_layout(root, n_a=2, n_b=2)
    (root / "trainA" / "A000.png").write_bytes(b"not a png")
    ds = UnalignedDataset(str(root), load_size=16, crop_size=16, serial_batches=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = ds[0]
    assert first["skipped"] == (str(root / "trainA" / "A000.png"),)
    assert sum(issubclass(w.category, SkippedImageWarning) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedImageWarning)  # no second warning, no second decode
        again = ds[0]
    assert again["skipped"] == () and again["A_path"] == first["A_path"]


def test_augment_batch_shards_are_slices_of_the_global_batch():
    """shard=(rank, world): process rank augments its slice of the global batch exactly as one
    process augmenting the whole batch (2 images per process, so rank offsets are b-sized)."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=g)
    whole = augment_batch(imgs, 8, True, generator=torch.Generator().manual_seed(3))
    for rank in range(2):
        part = augment_batch(imgs[2 * rank: 2 * rank + 2], 8, True, generator=torch.Generator().manual_seed(3),
                             shard=(rank, 2))
        assert torch.equal(part, whole[2 * rank: 2 * rank + 2]), rank


def _chunk(kind: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(tmp_path) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (10, 12), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_png_walk_limits_are_exact_and_stop_at_iend(tmp_path, monkeypatch):
    """Catches: `metadata > MAX_METADATA_SEGMENTS` -> `>=`; `range(MAX_PNG_CHUNKS)` -> `range(MAX_PNG_CHUNKS - 1)`;
    the IEND test dropped (bytes appended after IEND, which Pillow never reads, refused a valid file)."""
    import fastcgan.data.images as images

    png = _png(tmp_path)  # IHDR, IDAT, IEND
    n = images.MAX_METADATA_SEGMENTS
    at_limit = png[:33] + _chunk(b"tEXt", b"k\0v") * (n - 1) + png[33:]  # IHDR + n-1 tEXt = n metadata chunks
    (tmp_path / "at_limit.png").write_bytes(at_limit)
    assert images.metadata_problem(str(tmp_path / "at_limit.png")) is None
    (tmp_path / "over.png").write_bytes(png[:33] + _chunk(b"tEXt", b"k\0v") * n + png[33:])
    assert "PNG chunks besides the image data" in images.metadata_problem(str(tmp_path / "over.png"))
    # Exactly MAX_PNG_CHUNKS chunks, IEND included: walked to the end, not refused; one more is.
    (tmp_path / "plain.png").write_bytes(png)  # IHDR, IDAT, IEND
    (tmp_path / "four.png").write_bytes(png[:-12] + _chunk(b"IDAT") + png[-12:])  # IHDR, IDAT, IDAT, IEND
    monkeypatch.setattr(images, "MAX_PNG_CHUNKS", 3)
    assert images.metadata_problem(str(tmp_path / "plain.png")) is None
    assert images.metadata_problem(str(tmp_path / "four.png")) == "more than 3 PNG chunks"
    monkeypatch.undo()
    # Whatever follows IEND is not the image's (Pillow stops there): not walked.
    (tmp_path / "trailer.png").write_bytes(png + _chunk(b"prIv") * (n + 5))
    assert images.metadata_problem(str(tmp_path / "trailer.png")) is None
    assert images.open_image(str(tmp_path / "trailer.png")).size == (10, 12)


def test_png_walk_counts_apng_frames_as_image_data_and_reads_pillows_chunk_names(tmp_path):
    """Catches: `(b"IDAT", b"fcTL", b"fdAT")` -> `(b"IDAT",)` (an APNG of 600 frames refused as
    metadata), and _PNG_CHUNK_TYPE narrowed to letters (Pillow's is_cid is \\w{4}: chunks named
    with digits or '_' are walked by Pillow, so they must be counted: else the guard is bypassed)."""
    import fastcgan.data.images as images

    png = _png(tmp_path)
    n = images.MAX_METADATA_SEGMENTS
    frames = b"".join(_chunk(b"fcTL", bytes(26)) + _chunk(b"fdAT", bytes(4)) for _ in range(600))
    (tmp_path / "apng.png").write_bytes(png[:-12] + frames + png[-12:])
    assert images.metadata_problem(str(tmp_path / "apng.png")) is None
    (tmp_path / "digits.png").write_bytes(png[:33] + _chunk(b"pr1v") * (n + 1) + png[33:])
    assert "PNG chunks besides the image data" in images.metadata_problem(str(tmp_path / "digits.png"))


def test_an_image_of_exactly_the_pixel_limit_is_read():
    """Catches: `w * h > limit` -> `>=` (the limit is the most pixels allowed, as documented)."""
    from fastcgan.data.images import BadImageError, check_image_pixels

    check_image_pixels("x.png", (10, 10), max_pixels=100)
    with pytest.raises(BadImageError, match="10x11 = 110 pixels is over the image pixel limit of 100"):
        check_image_pixels("x.png", (10, 11), max_pixels=100)


@pytest.mark.parametrize("orientation", [5, 7])
def test_oriented_size_swaps_for_transpose_and_transverse(tmp_path, orientation):
    """Catches: the header's orientation test narrowed to (6, 8): EXIF 5 (transpose) and 7
    (transverse) turn the image by 90 degrees too, as open_image applies them."""
    from PIL import Image

    from fastcgan.data.images import open_image, oriented_size

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (40, 20)).save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert oriented_size(str(tmp_path / "o.jpg")) == (20, 40) == open_image(str(tmp_path / "o.jpg")).size


def test_a_process_limit_above_pillows_backstop_lifts_it(tmp_path):
    """Catches: set_max_image_pixels leaving Pillow's threshold as it was (Pillow refuses at twice its
    own limit, so a --max-image-pixels above ~179 Mpx would still be refused by Pillow)."""
    from PIL import Image

    import fastcgan.data.images as images

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 400 Mpx claimed, 100 bytes of file
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                                       + _chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _chunk(b"IEND"))
    saved, saved_pil = images.get_max_image_pixels(), Image.MAX_IMAGE_PIXELS
    try:
        images.set_max_image_pixels(500_000_000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over the limit, under twice it
            with Image.open(tmp_path / "big.png") as im:  # the header only: Pillow's own check is at open()
                assert im.size == (20000, 20000)
    finally:
        images.set_max_image_pixels(saved)
        Image.MAX_IMAGE_PIXELS = saved_pil


def _marked(w=40, h=20):
    """A w x h RGB image with a red marker in its stored top-left corner (asymmetric under every turn)."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:6, :10] = (255, 0, 0)
    return Image.fromarray(arr)


def _exif_orientation(o):
    exif = Image.Exif()
    exif[0x0112] = o
    return exif


@pytest.mark.parametrize("fmt", ["jpg", "png", "tif", "webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_decodes_to_the_size_the_header_checks_read(tmp_path, fmt, orientation):
    """The header checks (oriented_size) and the decoder (open_image) turn a file the same way, in
    every format that carries EXIF: Pillow's TIFF reader reports the turned size when it opens the
    file and turns the pixels itself, and the header check turned its size once more (a 48x32 TIFF
    with orientation 6 was "48x32" to --preprocess none and decoded 32x48: the step crashed). The
    pixels are turned as Pillow's own exif_transpose turns them."""
    from PIL import ImageOps

    from fastcgan.data.images import open_image, oriented_size

    p = tmp_path / f"o.{fmt}"
    kw = {"quality": 100} if fmt in ("jpg", "webp") else {}
    _marked().save(p, exif=_exif_orientation(orientation).tobytes(), **kw)
    img = open_image(str(p))
    assert oriented_size(str(p)) == img.size == ((20, 40) if orientation >= 5 else (40, 20))
    with Image.open(p) as stored:
        want = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(img, dtype=np.int16) - want).max() <= 8  # lossy formats: the marker's edge


def _late_exif_png(path, orientation):
    """A PNG whose eXIf chunk comes after the image data (the specification puts it before)."""
    buf = io.BytesIO()
    _marked().save(buf, format="PNG")
    data = buf.getvalue()
    iend = data.rindex(b"IEND") - 4
    body = _exif_orientation(orientation).tobytes()[len(b"Exif\x00\x00"):]  # PNG's eXIf holds the TIFF block only
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    path.write_bytes(data[:iend] + chunk + data[iend:])


def test_a_late_exif_chunk_is_ignored_by_the_header_check_and_the_decoder_alike(tmp_path):
    """An eXIf chunk after the pixels can only be found by decoding the whole image, which the
    header checks never do; the decoder turned the image by it, so the two disagreed (a crash in
    the step under --preprocess none). Both keep the stored orientation now."""
    from fastcgan.data.images import open_image, oriented_size

    p = tmp_path / "late.png"
    _late_exif_png(p, 6)
    with Image.open(p) as check:
        check.load()
        assert check.getexif().get(0x0112) == 6  # Pillow does find it, after decoding
    assert oriented_size(str(p)) == open_image(str(p)).size == (40, 20)


def test_an_exif_block_pillow_cannot_encode_back_keeps_the_pixels(tmp_path):
    """A camera-style EXIF block with a tag of the wrong type (an ASCII tag stored as RATIONAL)
    reads fine but cannot be encoded again; ImageOps.exif_transpose re-encodes it, and its
    AttributeError escaped as a traceback from training, fastcgan-translate and fastcgan-eval.
    The orientation it carries is applied, as the header check reads it."""
    from fastcgan.data.images import open_image, oriented_size
    from fastcgan.deploy.runtime import from_model

    exif = _exif_orientation(6)
    exif[0x011A] = 72.0  # XResolution, a RATIONAL ...
    blob = exif.tobytes().replace(b"\x01\x1a\x00\x05", b"\x01\x1d\x00\x05")  # ... retagged as PageName (ASCII)
    p = tmp_path / "camera.jpg"
    _marked().save(p, exif=blob, quality=95)
    img = open_image(str(p))
    assert oriented_size(str(p)) == img.size == (20, 40)
    # The deploy runtime takes PIL images as files are read.
    tr = from_model(torch.nn.Conv2d(3, 3, 1), "cpu")
    with Image.open(p) as photo:
        out = tr(photo)
    assert out.size == (20, 40)


def test_an_image_that_decodes_to_another_size_than_its_header_is_skipped(tmp_path, monkeypatch):
    """--preprocess none trains on the one size the headers agree on; a file whose pixels come out
    at another size (a header reader and a decoder that disagree) is skipped by name when it is
    decoded, never batched with the others (the step crashed in torch.cat)."""
    import fastcgan.data.datasets as datasets

    root = tmp_path / "ds"
    _make_layout(root, n_a=2, n_b=2, h=16, w=24)
    odd = root / "trainA" / "A999.png"
    _save_rgb(odd, 24, 16, seed=3)  # portrait
    monkeypatch.setattr(datasets, "oriented_size", lambda p: (24, 16))  # a header reader that says landscape
    ds = UnalignedDataset(str(root), preprocess="none", load_size=16, crop_size=16, serial_batches=True)
    assert ds.check_one_size() == (24, 16)
    with pytest.warns(SkippedImageWarning, match=r"A999\.png.*16x24 after --preprocess none, not the 24x16"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == [str(odd)] and all(it["A"].shape == (3, 16, 24) for it in items)
