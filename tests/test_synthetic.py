"""The built-in synthetic unpaired dataset (fastcgan.data.synthetic)."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from fastcgan.data import UnalignedDataset
from fastcgan.data.synthetic import (
    MANIFEST,
    OUTLINE_B,
    PALETTE_A,
    PALETTE_B,
    ensure_synthetic_dataset,
    main,
    make_synthetic_dataset,
    random_scene,
    render_scene,
)

FOLDERS = ("trainA", "trainB", "testA", "testB", "testA_truth_B", "testB_truth_A")


def _read(path):
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _labels_from(img, palette):
    """Invert a rendering: label per pixel, -1 where the colour is not in the palette (outline)."""
    out = np.full(img.shape[:2], -1)
    for k, colour in enumerate(palette):
        out[(img == colour).all(-1)] = k
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_synthetic_dataset(
        str(tmp_path_factory.mktemp("syn") / "s"), size=32, n_train=12, n_test=6, seed=3
    )


def test_layout_and_counts(small):
    assert sorted(os.listdir(small)) == sorted(FOLDERS + (MANIFEST,))
    counts = {f: len(os.listdir(os.path.join(small, f))) for f in FOLDERS}
    assert counts == {
        "trainA": 12,
        "trainB": 12,
        "testA": 6,
        "testB": 6,
        "testA_truth_B": 6,
        "testB_truth_A": 6,
    }
    assert sorted(os.listdir(os.path.join(small, "testA"))) == sorted(
        os.listdir(os.path.join(small, "testA_truth_B"))
    )
    assert sorted(os.listdir(os.path.join(small, "testB"))) == sorted(
        os.listdir(os.path.join(small, "testB_truth_A"))
    )
    img = _read(os.path.join(small, "trainA", "a_00000.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    with open(os.path.join(small, MANIFEST)) as fh:
        m = json.load(fh)
    assert (m["size"], m["n_train"], m["n_test"], m["seed"]) == (32, 12, 6, 3)
    ds = UnalignedDataset(small, load_size=32, crop_size=32, validate=True)
    assert (ds.A_size, ds.B_size, ds.skipped) == (12, 12, [])


def test_deterministic_for_a_seed(small, tmp_path):
    again = make_synthetic_dataset(str(tmp_path / "again"), size=32, n_train=12, n_test=6, seed=3)
    other = make_synthetic_dataset(str(tmp_path / "other"), size=32, n_train=12, n_test=6, seed=4)
    same = diff = 0
    for f in FOLDERS:
        for name in sorted(os.listdir(os.path.join(small, f))):
            a = _read(os.path.join(small, f, name))
            assert np.array_equal(a, _read(os.path.join(again, f, name)))
            same += 1
            diff += not np.array_equal(a, _read(os.path.join(other, f, name)))
    assert same == 48 and diff == same


def test_domains_differ(small):
    def mean_colour(folder):
        d = os.path.join(small, folder)
        return np.mean([_read(os.path.join(d, n)).reshape(-1, 3).mean(0) for n in os.listdir(d)], axis=0)

    assert np.abs(mean_colour("trainA") - mean_colour("trainB")).max() > 60


def test_ground_truth_mapping_is_consistent(small):
    """Each test image and its truth are the same scene: A colour k <-> B colour k, outlines only
    on shape pixels at label boundaries."""
    for folder, truth, pal_src, pal_dst in (
        ("testA", "testA_truth_B", PALETTE_A, PALETTE_B),
        ("testB", "testB_truth_A", PALETTE_B, PALETTE_A),
    ):
        for name in os.listdir(os.path.join(small, folder)):
            src = _read(os.path.join(small, folder, name))
            dst = _read(os.path.join(small, truth, name))
            lab_src = _labels_from(src, pal_src)
            lab_dst = _labels_from(dst, pal_dst)
            b_img, a_lab = (dst, lab_src) if folder == "testA" else (src, lab_dst)
            outline = (b_img == OUTLINE_B).all(-1)
            a_full = a_lab  # the A rendering has every pixel in the palette
            assert (a_full >= 0).all()
            b_lab = lab_dst if folder == "testA" else lab_src
            assert (b_lab[~outline] == a_full[~outline]).all()  # same class per pixel
            assert (b_lab[outline] == -1).all() and (a_full[outline] > 0).all()  # outlines on shapes
            assert outline.any()


def test_identical_scenes_render_identically_and_outline_sits_on_edges():
    rng = np.random.default_rng(0)
    labels = random_scene(rng, 48)
    assert np.array_equal(render_scene(labels, "B"), render_scene(labels.copy(), "B"))
    b = render_scene(labels, "B")
    outline = (b == OUTLINE_B).all(-1)
    # Every outline pixel has a 4-neighbour with a different label; interior pixels never do.
    pad = np.pad(labels, 1, mode="edge")
    nb_diff = np.zeros_like(outline)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb_diff |= pad[dy : dy + 48, dx : dx + 48] != labels
    assert np.array_equal(outline, nb_diff & (labels > 0))
    assert np.array_equal(render_scene(labels, "A"), PALETTE_A[labels])


def test_train_domains_are_unpaired(small):
    paired = 0
    for i in range(12):
        a = _labels_from(_read(os.path.join(small, "trainA", f"a_{i:05d}.png")), PALETTE_A)
        b = _read(os.path.join(small, "trainB", f"b_{i:05d}.png"))
        lb = _labels_from(b, PALETTE_B)
        keep = lb >= 0
        paired += np.array_equal(a[keep], lb[keep])
    assert paired == 0


def test_default_size_is_fast(tmp_path):
    t0 = time.perf_counter()
    root = make_synthetic_dataset(str(tmp_path / "d"))  # 64x64, 200 train + 50 test per domain
    elapsed = time.perf_counter() - t0
    assert len(os.listdir(os.path.join(root, "trainB"))) == 200
    assert elapsed < 15, f"generation took {elapsed:.1f}s"


def test_ensure_is_idempotent(tmp_path):
    root = str(tmp_path / "run" / "data")
    ensure_synthetic_dataset(root, size=16, n_train=4, n_test=2)
    probe = os.path.join(root, "trainA", "a_00000.png")
    stamp = os.stat(probe).st_mtime_ns
    os.utime(probe, ns=(stamp - 10**9, stamp - 10**9))
    stamp = os.stat(probe).st_mtime_ns
    ensure_synthetic_dataset(root, size=16, n_train=4, n_test=2)
    assert os.stat(probe).st_mtime_ns == stamp  # untouched
    ensure_synthetic_dataset(root, size=16, n_train=5, n_test=2)  # other parameters: regenerated
    assert len(os.listdir(os.path.join(root, "trainA"))) == 5
    os.remove(os.path.join(root, "testB", "b_00001.png"))  # incomplete: regenerated
    ensure_synthetic_dataset(root, size=16, n_train=5, n_test=2)
    assert len(os.listdir(os.path.join(root, "testB"))) == 2
    assert not [f for f in os.listdir(os.path.dirname(root)) if f.startswith(".synthetic-")]


def test_folder_of_a_killed_generator_is_removed(tmp_path):
    """SIGTERM during generation (before the trainer's handlers) runs no finally: the next
    generation removes the temporary folder of a writer that no longer runs, never a live one's."""
    dead = tmp_path / ".synthetic-4999999-abcd"  # above Linux's largest pid_max: certainly dead
    live = tmp_path / f".synthetic-{os.getppid()}-efgh"  # the parent process: alive
    for d in (dead, live):
        (d / "trainA").mkdir(parents=True)
        (d / "trainA" / "0.png").write_bytes(b"partial")
    ensure_synthetic_dataset(str(tmp_path / "s"), size=16, n_train=2, n_test=1)
    assert not dead.exists() and live.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["s", live.name])


def test_refuses_foreign_folder_and_bad_args(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="precious.txt"):
        ensure_synthetic_dataset(str(tmp_path / "mine"), size=16, n_train=2, n_test=1)
    assert os.listdir(tmp_path / "mine") == ["precious.txt"]
    with pytest.raises(ValueError, match="size"):
        make_synthetic_dataset(str(tmp_path / "x"), size=4)
    with pytest.raises(ValueError, match="n_train"):
        make_synthetic_dataset(str(tmp_path / "x"), n_train=0)
    # Bounded: --size 100000 asked numpy for 149 GB, --n-train 10**9 ran until the disk filled.
    with pytest.raises(ValueError, match="size"):
        make_synthetic_dataset(str(tmp_path / "x"), size=100_000)
    with pytest.raises(ValueError, match="n_train"):
        make_synthetic_dataset(str(tmp_path / "x"), n_train=10**9)
    assert not (tmp_path / "x").exists()


def test_regenerating_never_takes_files_it_did_not_write(tmp_path, capsys):
    """Regenerating at another size replaced trainA/ ... whole: a user's notes, a photo dropped in
    and a results/ folder inside testA/ went with them, exit 0."""
    out = str(tmp_path / "syn")
    assert main([out, "--size", "16", "--n-train", "2", "--n-test", "2"]) == 0
    with open(os.path.join(out, "trainA", "my_notes.txt"), "w") as f:
        f.write("mine")
    os.makedirs(os.path.join(out, "testA", "results"))
    assert main([out, "--size", "24", "--n-train", "2", "--n-test", "2"]) == 2
    err = capsys.readouterr().err
    assert "trainA/my_notes.txt" in err or "testA/results" in err, err
    assert os.path.isdir(os.path.join(out, "testA", "results"))
    assert open(os.path.join(out, "trainA", "my_notes.txt")).read() == "mine"
    os.remove(os.path.join(out, "trainA", "my_notes.txt"))
    os.rmdir(os.path.join(out, "testA", "results"))
    assert main([out, "--size", "24", "--n-train", "2", "--n-test", "2"]) == 0  # only its own files: replaced


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main([out, "--size", "16", "--n-train", "3", "--n-test", "2", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert len(os.listdir(os.path.join(out, "testA_truth_B"))) == 2
    assert main([str(tmp_path / "bad"), "--size", "2"]) == 2


def test_processes_generating_the_same_dataset_at_once_all_get_it(tmp_path):
    """Runs started together into a fresh --output-dir generate the same synthetic_N/: each replaced
    the others' folders under them (a FileNotFoundError traceback in 2 of 12 processes). One
    generates while the others wait, then find it complete."""
    import subprocess
    import sys

    root = tmp_path / "out" / "synthetic_16"
    code = ("import sys; from fastcgan.data.synthetic import ensure_synthetic_dataset as e; "
            "e(sys.argv[1], size=16, n_train=300, n_test=5); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(rc == 0 and out.strip() == "ok" for out, _, rc in results), results
    assert len(os.listdir(root / "trainA")) == 300 and len(os.listdir(root / "testB")) == 5
    assert not [n for n in os.listdir(root.parent) if n.startswith(".synthetic-")]  # no temporaries left


def test_a_full_disk_while_generating_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from fastcgan.data import synthetic
    from fastcgan.fileio import WriteError

    def full(img, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "_save", full)
    root = tmp_path / "synthetic_16"
    with pytest.raises(WriteError, match=f"could not write the synthetic dataset into {root}: no space left"):
        synthetic.ensure_synthetic_dataset(str(root), size=16, n_train=2, n_test=1)
    assert os.listdir(tmp_path) == []
