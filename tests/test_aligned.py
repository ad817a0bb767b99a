"""Paired (pix2pix) data: the A|B split, joint augmentation, bad files, the device bank, the
combine tool and the paired synthetic dataset.

Real pairs are built here from ../shared/data/monet2photo_mini (never copied into the repo): B is
the photometric negative of A (255 - A), so after any joint crop/flip B' == -A' exactly in the
model range, and any crop or flip applied to one half only breaks that."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastcgan.data import (
    AlignedDataset,
    DatasetError,
    augment_batch,
    augment_pair,
    collate,
    preload_aligned_to_device,
    preload_to_device,
    split_pair,
)
from fastcgan.data.combine import CombineError, combine_folders, main as combine_main
from fastcgan.data.datasets import SkippedImageWarning
from fastcgan.data.images import BadImageError

SIZE = (40, 24)  # (W, H) of each half: non-square, small


def _real_images(monet_root, n, size=SIZE):
    files = sorted(os.listdir(os.path.join(monet_root, "trainA")))[:n]
    out = {}
    for f in files:
        with Image.open(os.path.join(monet_root, "trainA", f)) as im:
            out[os.path.splitext(f)[0] + ".png"] = np.asarray(im.convert("RGB").resize(size, Image.BICUBIC))
    return out


def _write(folder, images):
    os.makedirs(folder, exist_ok=True)
    for name, arr in images.items():
        Image.fromarray(arr).save(os.path.join(folder, name))


@pytest.fixture
def pairs(monet2photo_mini, tmp_path):
    """A/, B/ (negatives) in train/ and test/ splits, combined into AB/ with the combine tool."""
    imgs = _real_images(monet2photo_mini, 6)
    names = sorted(imgs)
    for split, chosen in (("train", names[:4]), ("test", names[4:])):
        _write(tmp_path / "A" / split, {n: imgs[n] for n in chosen})
        _write(tmp_path / "B" / split, {n: 255 - imgs[n] for n in chosen})
    report = combine_folders(tmp_path / "A", tmp_path / "B", tmp_path / "AB")
    assert report.splits == {"test": 2, "train": 4} and not report.problems
    return tmp_path, imgs


# ------------------------------------------------------------------------------------------------
# the split and the dataset
# ------------------------------------------------------------------------------------------------
def test_combine_writes_side_by_side_and_dataset_splits_back(pairs):
    root, imgs = pairs
    ab = root / "AB"
    assert sorted(os.listdir(ab)) == ["test", "train"]
    name = sorted(os.listdir(ab / "train"))[0]
    arr = np.asarray(Image.open(ab / "train" / name))
    assert arr.shape == (SIZE[1], 2 * SIZE[0], 3)
    np.testing.assert_array_equal(arr[:, : SIZE[0]], imgs[name])
    np.testing.assert_array_equal(arr[:, SIZE[0] :], 255 - imgs[name])

    ds = AlignedDataset(ab, phase="train", preprocess="none", flip=False)
    assert len(ds) == 4 and ds.AB_paths == sorted(ds.AB_paths)
    item = ds[0]
    assert item["A_path"] == item["B_path"] == str(ab / "train" / name)
    np.testing.assert_array_equal(item["A"].permute(1, 2, 0).numpy(), imgs[name])
    np.testing.assert_array_equal(item["B"].numpy(), 255 - item["A"].numpy())

    back = AlignedDataset(ab, phase="train", direction="BtoA", preprocess="none")[0]
    assert torch.equal(back["A"], item["B"]) and torch.equal(back["B"], item["A"])
    gray = AlignedDataset(ab, phase="test", preprocess="none", input_nc=1)[0]
    assert gray["A"].shape == (1, SIZE[1], SIZE[0]) and gray["B"].shape == (3, SIZE[1], SIZE[0])


def test_joint_augmentation_on_device_batches(pairs):
    root, _ = pairs
    ds = AlignedDataset(root / "AB", load_size=32, crop_size=20)  # resize_and_crop: crop on the batch
    assert ds.batch_augment == {"crop_size": 20, "flip": True}
    batch = collate([ds[i] for i in range(len(ds))])
    A, B = batch["A"], batch["B"]
    assert A.shape == B.shape == (4, 3, 32, 32)
    # Bicubic resize of the negative is the negative of the resize up to rounding (+-1 level).
    assert (A.int() + B.int() - 255).abs().max() <= 1

    exact_B = 255 - A  # exact negatives, so the check below is exact
    seen_flip = set()
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        a, b, prm = augment_pair(A, exact_B, **ds.batch_augment, generator=g, return_params=True)
        assert a.shape == b.shape == (4, 3, 20, 20) and a.dtype == torch.float32
        torch.testing.assert_close(b, -a, atol=1e-6, rtol=0)
        # The same random stream as one augment_batch call on the input alone.
        ref = augment_batch(A, 20, True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a, ref)
        seen_flip.update(prm["flip"].tolist())
    assert seen_flip == {True, False}

    a, b = augment_pair(A, exact_B, 20, True, generator=torch.Generator().manual_seed(0), channels_last=True)
    for t in (a, b):
        assert t.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b, -a, atol=1e-6, rtol=0)

    # Mixed channel counts (grayscale input, RGB target) and DDP shards.
    a1, b1 = augment_pair(A[:, :1], exact_B, 20, True, generator=torch.Generator().manual_seed(3))
    assert a1.shape == (4, 1, 20, 20)
    torch.testing.assert_close(b1[:, :1], -a1, atol=1e-6, rtol=0)
    full_a, _ = augment_pair(A, exact_B, 20, True, generator=torch.Generator().manual_seed(5))
    g5 = torch.Generator().manual_seed(5)
    half_a, _ = augment_pair(A[2:], exact_B[2:], 20, True, generator=g5, shard=(1, 2))
    assert torch.equal(half_a, full_a[2:])
    with pytest.raises(ValueError, match="same batch size, height, width"):
        augment_pair(A, exact_B[:, :, :30], 20, True)


def test_cpu_crop_modes_use_one_window_for_both_halves(pairs):
    root, _ = pairs
    ds = AlignedDataset(root / "AB", preprocess="crop", crop_size=16, seed=1)
    assert ds.batch_augment == {"crop_size": None, "flip": True}
    for i in range(len(ds)):
        it = ds[i]
        assert it["A"].shape == (3, 16, 16)
        assert torch.equal(it["B"], 255 - it["A"])  # no resize: exact negatives
    before = [ds[i]["A"] for i in range(len(ds))]
    ds.set_epoch(1)
    assert any(not torch.equal(x, ds[i]["A"]) for i, x in enumerate(before))


def test_bad_files_are_skipped_counted_and_named(pairs):
    root, imgs = pairs
    train = root / "AB" / "train"
    odd = np.zeros((8, 11, 3), np.uint8)
    Image.fromarray(odd).save(train / "0000a_odd_width.png")
    (train / "0000b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(SkippedImageWarning) as rec:
        ds = AlignedDataset(root / "AB", preprocess="none", flip=False)
        assert len(ds) == 6  # not decoded at construction
        first = ds[0]  # 0_odd_width -> 1_corrupt -> the first good pair stands in
    messages = " ".join(str(w.message) for w in rec)
    assert "0000a_odd_width.png" in messages and "width 11 is odd" in messages
    assert "0000b_corrupt.png" in messages
    assert first["A_path"].endswith(sorted(imgs)[0]) and len(first["skipped"]) == 2
    assert ds.skipped == [str(train / "0000a_odd_width.png"), str(train / "0000b_corrupt.png")]
    # A worker-side report is merged once.
    assert ds.record_skipped({"skipped": [str(train / "0000b_corrupt.png")]}) == []

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        ds2 = AlignedDataset(root / "AB", preprocess="none", validate=True)
    assert len(ds2) == 4 and len(ds2.skipped) == 2

    with pytest.raises(BadImageError, match="odd"):
        split_pair(Image.fromarray(odd), "x.png")

    # Only bad files: an error naming the folder.
    only_bad = root / "bad"
    (only_bad / "train").mkdir(parents=True)
    Image.fromarray(odd).save(only_bad / "train" / "x.png")
    with pytest.warns(SkippedImageWarning), pytest.raises(DatasetError, match=f"{only_bad}.*no usable pair"):
        AlignedDataset(only_bad, preprocess="none")[0]


def test_layout_errors(pairs, monet2photo_mini):
    root, _ = pairs
    with pytest.raises(DatasetError, match="unpaired layout.*unpaired data trains with --model cyclegan or cut"):
        AlignedDataset(monet2photo_mini)
    with pytest.raises(DatasetError, match="does not exist"):
        AlignedDataset(root / "AB", phase="val")
    with pytest.raises(DatasetError, match="direction"):
        AlignedDataset(root / "AB", direction="AtoC")


def test_device_bank_keeps_pairs_together(pairs):
    root, _ = pairs
    ds = AlignedDataset(root / "AB", preprocess="crop", crop_size=16, seed=3)
    bank = preload_to_device(ds, "cpu")  # the unaligned entry point dispatches on the dataset
    assert bank.A.shape == bank.B.shape == (4, 3, 24, 40) and len(bank) == 4
    assert bank.batch_augment == {"crop_size": 16, "flip": True}
    assert torch.equal(bank.B, 255 - bank.A)
    seen = set()
    for step in range(6):
        raw = bank.sample_batch(3, step)
        assert torch.equal(raw["B"], 255 - raw["A"])  # pair i drawn with its own B
        seen.update(int(x) for x in raw["A"].flatten(1).sum(1))
        g = torch.Generator().manual_seed(step)
        a, b = augment_pair(raw["A"], raw["B"], **bank.batch_augment, generator=g)
        torch.testing.assert_close(b, -a, atol=1e-6, rtol=0)
    assert len(seen) == 4  # every pair comes up
    again = preload_aligned_to_device(ds, "cpu")
    assert torch.equal(again.sample_batch(3, 5)["A"], bank.sample_batch(3, 5)["A"])  # resume-safe


def test_dataloader_workers(pairs):
    root, _ = pairs
    ds = AlignedDataset(root / "AB", load_size=32, crop_size=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["A"].shape == (2, 3, 32, 32)
    assert batches[0]["A_path"] == batches[0]["B_path"]


# ------------------------------------------------------------------------------------------------
# combine
# ------------------------------------------------------------------------------------------------
def test_combine_names_every_problem_and_writes_nothing(monet2photo_mini, tmp_path, capsys):
    imgs = _real_images(monet2photo_mini, 4)
    names = sorted(imgs)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    _write(a, {n: imgs[n] for n in names[:3]})
    _write(b, {n: 255 - imgs[n] for n in names[1:]})  # names[0] only in A, names[3] only in B
    # names[1]: B half a different size; names[2]: fine; plus an unreadable A file with a partner.
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(b / names[1])
    (a / "zz_broken.png").write_bytes(b"garbage")
    Image.fromarray(imgs[names[2]]).save(b / "zz_broken.png")

    with pytest.raises(CombineError) as e:
        combine_folders(a, b, out)
    msg = str(e.value)
    assert f"{a / names[0]}: no matching" in msg and f"{b / names[3]}: no matching" in msg
    assert "10x10" in msg and names[1] in msg and "same size" in msg
    assert "zz_broken.png: unreadable" in msg
    assert len(e.value.problems) == 4
    assert not out.exists()  # nothing written

    assert combine_main([str(a), str(b), str(out)]) == 2
    err = capsys.readouterr().err
    assert names[0] in err and names[3] in err and not out.exists()

    # --skip-bad writes the good pair and names the rest.
    assert combine_main([str(a), str(b), str(out), "--skip-bad", "--png"]) == 0
    cap = capsys.readouterr()
    assert os.listdir(out) == [os.path.splitext(names[2])[0] + ".png"]
    assert cap.err.count("skipped") == 4 and f"{out}: 1 pairs" in cap.out


def test_combine_refuses_to_touch_inputs(monet2photo_mini, tmp_path):
    imgs = _real_images(monet2photo_mini, 2)
    a, b = tmp_path / "A", tmp_path / "B"
    _write(a, imgs)
    _write(b, imgs)
    before = {n: (a / n).read_bytes() for n in imgs}
    with pytest.raises(CombineError, match="inside A_DIR"):
        combine_folders(a, b, a)
    with pytest.raises(CombineError, match="inside B_DIR"):
        combine_folders(a, b, b / "sub")
    assert {n: (a / n).read_bytes() for n in imgs} == before
    with pytest.raises(FileNotFoundError, match="B_DIR"):
        combine_folders(a, tmp_path / "missing", tmp_path / "o")
    # Split layout: a split missing on the B side is named.
    _write(tmp_path / "SA" / "train", imgs)
    _write(tmp_path / "SA" / "val", imgs)
    _write(tmp_path / "SB" / "train", imgs)
    with pytest.raises(CombineError, match=r"SB/val: split folder missing"):
        combine_folders(tmp_path / "SA", tmp_path / "SB", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_combine_replaces_existing_files_only_with_overwrite(monet2photo_mini, tmp_path, capsys):
    """OUT's files were replaced silently (a user's file named like a pair included)."""
    from fastcgan.data.combine import main as combine_main

    imgs = _real_images(monet2photo_mini, 2)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    _write(a, imgs)
    _write(b, imgs)
    out.mkdir()
    mine = out / sorted(imgs)[0]
    mine.write_bytes(b"the user's file")
    assert combine_main([str(a), str(b), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's file" and os.listdir(out) == [mine.name]
    assert combine_main([str(a), str(b), str(out), "--overwrite"]) == 0
    assert mine.read_bytes() != b"the user's file" and len(os.listdir(out)) == 2


def test_combine_finds_unwritable_outputs_before_writing(monet2photo_mini, tmp_path, capsys):
    """A folder at an output name (and a read-only OUT) failed at that write, exit 1, after the
    pairs before it were written; the advice was --overwrite, which cannot replace a folder. And
    the pixel limit's message named --max-image-pixels, which combine did not have."""
    imgs = _real_images(monet2photo_mini, 3)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    _write(a, imgs)
    _write(b, imgs)
    (out / sorted(imgs)[-1]).mkdir(parents=True)
    for extra in ([], ["--overwrite"]):
        assert combine_main([str(a), str(b), str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "exists and is not a regular file" in err and "nothing was written" in err, err
        assert os.listdir(out) == [sorted(imgs)[-1]]
    # A folder nothing can be written in (read-only to root too): found by writing a probe first.
    assert combine_main([str(a), str(b), "/proc/fastcgan-out"]) == 2
    assert "cannot write in /proc" in capsys.readouterr().err


def test_combine_max_image_pixels(monet2photo_mini, tmp_path, capsys):
    imgs = _real_images(monet2photo_mini, 1)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    _write(a, imgs)
    _write(b, imgs)
    assert combine_main([str(a), str(b), str(out), "--max-image-pixels", "100"]) == 2
    err = capsys.readouterr().err
    assert "--max-image-pixels" in err and not out.exists(), err
    with pytest.raises(SystemExit) as e:
        combine_main([str(a), str(b), str(out), "--max-image-pixels", "-1"])
    assert e.value.code == 2 and "--max-image-pixels must be >= 0" in capsys.readouterr().err
    assert combine_main([str(a), str(b), str(out), "--max-image-pixels", "0"]) == 0


def test_combine_use_AB(monet2photo_mini, tmp_path):
    imgs = _real_images(monet2photo_mini, 2)
    d = tmp_path / "both"
    for n, arr in imgs.items():
        stem = os.path.splitext(n)[0]
        _write(d, {f"{stem}_A.png": arr, f"{stem}_B.png": 255 - arr})
    report = combine_folders(d, d, tmp_path / "out", use_AB=True)
    assert sorted(os.path.basename(p) for p in report.written) == sorted(imgs)
    arr = np.asarray(Image.open(report.written[0]))
    np.testing.assert_array_equal(arr[:, SIZE[0] :], 255 - arr[:, : SIZE[0]])


# ------------------------------------------------------------------------------------------------
# the paired synthetic dataset
# ------------------------------------------------------------------------------------------------
def test_synthetic_aligned_pairs_are_true_pairs(tmp_path):
    from fastcgan.data import ensure_synthetic_aligned_dataset, make_synthetic_dataset
    from fastcgan.data.synthetic import main as synth_main

    root = ensure_synthetic_aligned_dataset(tmp_path / "paired", size=16, n_train=3, n_test=2, seed=4)
    assert sorted(os.listdir(root)) == ["fastcgan_synthetic.json", "test", "train"]
    unpaired = make_synthetic_dataset(tmp_path / "unpaired", size=16, n_train=3, n_test=2, seed=4)
    for i in range(2):
        pair = np.asarray(Image.open(os.path.join(root, "test", f"pair_{i:05d}.png")))
        a = np.asarray(Image.open(os.path.join(unpaired, "testA", f"a_{i:05d}.png")))
        truth = np.asarray(Image.open(os.path.join(unpaired, "testA_truth_B", f"a_{i:05d}.png")))
        np.testing.assert_array_equal(pair, np.concatenate([a, truth], 1))
    ds = AlignedDataset(root, phase="test", preprocess="none")
    it = ds[1]
    assert it["A"].shape == it["B"].shape == (3, 16, 16)
    # Idempotent (no rewrite), refuses foreign folders, CLI form.
    mtime = os.path.getmtime(os.path.join(root, "train", "pair_00000.png"))
    ensure_synthetic_aligned_dataset(root, size=16, n_train=3, n_test=2, seed=4)
    assert os.path.getmtime(os.path.join(root, "train", "pair_00000.png")) == mtime
    with pytest.raises(FileExistsError, match="refusing"):
        ensure_synthetic_aligned_dataset(unpaired, size=16, n_train=3, n_test=2, seed=4)
    args = [str(tmp_path / "cli"), "--aligned", "--size", "16", "--n-train", "2", "--n-test", "1"]
    assert synth_main(args) == 0
    assert sorted(os.listdir(tmp_path / "cli" / "train")) == ["pair_00000.png", "pair_00001.png"]


def test_combine_max_images_caps_the_pairs_of_each_split(monet2photo_mini, tmp_path):
    """--max-images N (the official --num_imgs): the first N pairs by name of every split, no more."""
    imgs = _real_images(monet2photo_mini, 4)
    for split in ("train", "test"):
        _write(tmp_path / "A" / split, imgs)
        _write(tmp_path / "B" / split, imgs)
    report = combine_folders(tmp_path / "A", tmp_path / "B", tmp_path / "out", max_images=2)
    assert report.splits == {"test": 2, "train": 2}
    for split in ("train", "test"):
        assert sorted(os.listdir(tmp_path / "out" / split)) == sorted(imgs)[:2]
    assert combine_main([str(tmp_path / "A"), str(tmp_path / "B"), str(tmp_path / "one"), "--max-images", "1"]) == 0
    assert [len(os.listdir(tmp_path / "one" / s)) for s in ("train", "test")] == [1, 1]


def test_combine_never_writes_through_an_output_folder_that_leads_to_an_input(monet2photo_mini, tmp_path):
    """OUT/train a symlink to A/train: the pair files would land on the A images themselves; even
    --overwrite must refuse (naming the file) and leave every input as it was."""
    imgs = _real_images(monet2photo_mini, 2)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    _write(a / "train", imgs)
    _write(b / "train", imgs)
    out.mkdir()
    os.symlink(a / "train", out / "train")
    before = {n: (a / "train" / n).read_bytes() for n in imgs}
    with pytest.raises(CombineError, match="would overwrite an input file"):
        combine_folders(a, b, out, overwrite=True)
    assert {n: (a / "train" / n).read_bytes() for n in imgs} == before


def test_a_pair_that_decodes_to_another_size_than_its_header_is_skipped(tmp_path, monkeypatch):
    """As for unpaired folders: under --preprocess none a pair whose halves decode to another size
    than the headers' one size is skipped by name, never batched with the others."""
    import fastcgan.data.aligned as aligned

    folder = tmp_path / "AB" / "train"
    rng = np.random.default_rng(0)
    _write(folder, {f"{i}.png": rng.integers(0, 256, (24, 80, 3), dtype=np.uint8) for i in range(2)})
    _write(folder, {"odd.png": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)})  # halves 24x40
    monkeypatch.setattr(aligned, "oriented_size", lambda p: (80, 24))  # a header reader that disagrees
    ds = AlignedDataset(tmp_path / "AB", phase="train", preprocess="none", flip=False, serial_batches=True)
    assert ds.check_one_size() == (40, 24)
    with pytest.warns(SkippedImageWarning, match=r"odd\.png.*halves of 24x40 after --preprocess none, not the 40x24"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == [str(folder / "odd.png")] and all(it["A"].shape == (3, 24, 40) for it in items)


def test_combine_refuses_a_pair_its_output_format_cannot_hold_before_writing(tmp_path):
    """Two 8200-wide WebP halves make a 16400-wide pair, over WebP's 16383: the pairs before it were
    written, then a ValueError traceback from the encoder. Now refused with the others (nothing
    written), and --png writes it."""
    rng = np.random.default_rng(0)
    for side in ("A", "B"):
        _write(tmp_path / side, {"0.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)})
        Image.fromarray(rng.integers(0, 256, (8, 8200, 3), dtype=np.uint8)).save(tmp_path / side / "1.webp",
                                                                                  lossless=True)
    with pytest.raises(CombineError, match=r"1\.webp: the pair would be 16400x8, over WEBP's 16,383 pixels a side"):
        combine_folders(tmp_path / "A", tmp_path / "B", tmp_path / "AB")
    assert not (tmp_path / "AB").exists() or not os.listdir(tmp_path / "AB")
    report = combine_folders(tmp_path / "A", tmp_path / "B", tmp_path / "AB", png=True)
    assert sorted(os.path.basename(p) for p in report.written) == ["0.png", "1.png"]
