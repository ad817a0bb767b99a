"""Training never loses work (issue: checkpoint integrity, run locks, config errors, disk full).

Each case was reproduced on the code before this change: a flipped byte in a checkpoint's tensor
data resumed silently, two trainers on one run both exited 0, config errors surfaced as
tracebacks after the run directory was created, a full disk gave ``unexpected pos``."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_train_config

from fastcgan.data import ensure_synthetic_dataset
from fastcgan.fileio import WriteError, atomic_write
from fastcgan.train import CheckpointError, list_checkpoints, load_checkpoint, train
from fastcgan.train.checkpoint import find_resume_checkpoint
from fastcgan.train.cli import main as cli_main
from fastcgan.train.runlock import RunInUseError, RunLock
from fastcgan import fileio
from fastcgan.fileio import OutputExistsError, move_into_place, path_inside, remove_stale_temporaries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("synth") / "s32"), size=32, n_train=8, n_test=2)


def _flip_a_tensor_byte(path: str) -> None:
    """Flip one byte inside a tensor's storage record of the torch zip (not the pickle, not the
    zip directory): what bit rot or a bad copy does, and what torch.load never notices."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 256]
        info = max(infos, key=lambda i: i.file_size)  # a large weight or moment
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_byte_is_detected_and_resume_falls_back(tmp_path, synth, capsys):
    run = tmp_path / "run"
    train(tiny_train_config(synth, tmp_path, max_steps=4, checkpoint_every=2, keep_last=5))
    ckpts = list_checkpoints(str(run))
    assert [os.path.basename(c) for c in ckpts] == ["step_000000002.ckpt", "step_000000004.ckpt"]
    newest = ckpts[-1]
    _flip_a_tensor_byte(newest)
    # torch itself loads the damaged file without complaint ...
    torch.load(newest, weights_only=True)
    # ... fastcgan names the file and the tensor
    with pytest.raises(CheckpointError, match=r"step_000000004\.ckpt is damaged: tensor \S+ does not match"):
        load_checkpoint(newest)
    path, payload, skipped = find_resume_checkpoint("auto", str(run))
    assert path == ckpts[0] and payload["step"] == 2
    assert len(skipped) == 1 and newest in skipped[0] and "damaged" in skipped[0]
    # --resume continues from the previous valid checkpoint and says so
    s = train(tiny_train_config(synth, tmp_path, max_steps=5, checkpoint_every=2, keep_last=5, resume="auto"))
    assert (s["start_step"], s["step"]) == (2, 5)
    err = capsys.readouterr().err
    assert f"skipped {newest}" in err and "resumed" in err
    for c in list_checkpoints(str(run)):  # the damaged step 4 was rewritten by the resumed run
        load_checkpoint(c)


def test_damaged_metadata_is_detected(tmp_path, synth):
    train(tiny_train_config(synth, tmp_path, max_steps=1))
    path = list_checkpoints(str(tmp_path / "run"))[-1]
    payload = torch.load(path, weights_only=True)
    payload["step"] = 7  # as a corrupted pickle that still parses would do
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(path)


def test_rotation_keeps_the_newest_verified_checkpoint(tmp_path, synth, monkeypatch):
    """keep_last 1: a new checkpoint that does not verify after writing must not rotate the last
    good one away (here: the write is silently corrupted, as by a failing disk)."""
    import fastcgan.train.checkpoint as ck

    train(tiny_train_config(synth, tmp_path, max_steps=1, keep_last=1))
    good = list_checkpoints(str(tmp_path / "run"))
    real_save = torch.save

    def corrupting_save(obj, f, *a, **k):
        obj = dict(obj)
        obj["step"] = -1  # no longer matches its digest
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", corrupting_save)
    with pytest.raises(CheckpointError, match="damaged"):
        train(tiny_train_config(synth, tmp_path, max_steps=2, keep_last=1, resume="auto"))
    assert all(os.path.exists(p) for p in good)


def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, synth, monkeypatch, capsys):
    """ENOSPC in the middle of a checkpoint write (simulated at the file-write level)."""
    import builtins

    train(tiny_train_config(synth, tmp_path, max_steps=1))
    run = tmp_path / "run"
    before = list_checkpoints(str(run))
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *e):
            return self.f.__exit__(*e)

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if "w" in mode and str(file).endswith(".tmp") and "step_000000002.ckpt" in str(file):
            return FullDisk(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    args = ["--dataset", "synthetic", "--dataroot", synth, "--output-dir", str(tmp_path), "--name", "run",
            "--load-size", "32", "--crop-size", "32", "--ngf", "4", "--ndf", "4", "--preset", "cyclegan128",
            "--max-steps", "2", "--resume", "--no-progress", "--no-tensorboard", "--eval-every", "0"]  # fmt: skip
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "step_000000002.ckpt" in err and "no space left" in err.lower()
    assert "unexpected pos" not in err
    assert list_checkpoints(str(run)) == before  # the previous checkpoint is still there
    load_checkpoint(before[-1])
    assert not [n for n in os.listdir(run / "checkpoints") if n.endswith(".tmp")]


def test_atomic_write_reports_enospc_with_the_file(tmp_path):
    def chunks():
        yield b"x"
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"out\.bin: no space left on the device") as e:
        atomic_write(str(tmp_path / "out.bin"), chunks())
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


_TRAINER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_train_config
from fastcgan.train import train
print("START", flush=True)
train(tiny_train_config({root!r}, {out!r}, max_steps=100000, log_every=1))
"""


def test_second_trainer_on_the_same_run_exits_2_and_leaves_the_first_intact(tmp_path, synth):
    run = tmp_path / "run"
    script = _TRAINER.format(tests=os.path.dirname(__file__), root=synth, out=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.2)
        time.sleep(0.5)
        lines_before = len((run / "metrics.jsonl").read_text().splitlines())
        config_before = (run / "config.json").read_bytes()
        second = subprocess.run(
            [sys.executable, "-m", "fastcgan.train", "--dataset", "synthetic", "--dataroot", synth,
             "--output-dir", str(tmp_path), "--name", "run", "--max-steps", "3", "--no-progress",
             "--load-size", "32", "--crop-size", "32", "--ngf", "4", "--ndf", "4", "--preset", "cyclegan128"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert str(run) in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first trainer goes on
        assert (run / "config.json").read_bytes() == config_before
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and len(steps) >= lines_before  # one writer: no step twice
    finally:
        first.kill()
        first.wait()
    # The holder is dead: the lock died with it, a new trainer resumes the run.
    with RunLock(str(run)):
        pass


def test_lock_is_exclusive_in_process(tmp_path):
    with RunLock(str(tmp_path / "r")):
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path / "r")).acquire()
    with RunLock(str(tmp_path / "r")):  # released on exit
        pass


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--device", "cuda"], "--device"),
        (["--netG", "unet_128", "--crop-size", "32", "--load-size", "32"], "--crop-size"),
        (["--load-size", "100000000000000000000"], "--load-size"),
        (["--crop-size", "30", "--load-size", "32"], "--crop-size"),
        (["--faithful", "--amp"], "--faithful"),
        (["--dataset", "folder", "--model", "colorization"], "colour images in train/"),
        # Found by the 2026-11-28 audit: each was a traceback (exit 1) or ran with a broken value.
        (["--seed", str(2**32)], "--seed"),
        (["--ngf", "100000"], "--ngf"),  # tried to allocate 720 GB
        (["--model", "cut", "--netF-nc", "1000000000"], "--netF-nc"),
        (["--num-workers", "1000000"], "--num-workers"),  # would fork a million loaders
        (["--netD", "n_layers", "--n-layers-D", "7"], "--crop-size"),  # 256² is too small for 7 halvings
        (["--input-nc", "1"], "--lambda-identity"),  # the identity loss feeds 3-channel B to G_AB
        (["--lr", "inf"], "--lr"),
        (["--compile", "--compile-backend", "nonsense"], "--compile-backend"),
        (["--load-size", "4096", "--crop-size", "256"], "--load-size"),  # synthetic: generated at 4096²
        (["--pool-size", "1000000000"], "--pool-size"),  # a traceback asking for 196 TB
        (["--model", "cut", "--num-patches", "1000000000"], "--num-patches"),  # every position: 9 GB at 128²
        (["--lr", "1e300"], "--lr"),  # overflowed fp32 in the optimizer, after config.json was written
        (["--init-gain", "1e12"], "--init-gain"),  # NaN from the first forward pass on
    ],
    ids=["no-gpu", "unet-multiple", "absurd-size", "resnet-multiple", "faithful-amp", "data-layout", "seed-2^32",
         "huge-ngf", "huge-netF", "huge-workers", "d-too-deep", "identity-nc", "inf-lr", "bad-backend",
         "huge-synthetic", "huge-pool", "huge-num-patches", "huge-lr", "huge-init-gain"],
)
def test_config_errors_exit_2_before_anything_is_written(tmp_path, synth, extra, flag, capsys):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = ["--dataset", "synthetic", "--dataroot", synth, "--output-dir", str(tmp_path / "out" / "sub"), "--name", "r",
            "--ngf", "4", "--ndf", "4", "--max-steps", "1", "--no-progress"]  # fmt: skip
    try:
        code = cli_main(args + extra)
    except SystemExit as e:  # argparse-level errors (parse_config)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_before_the_loop_exits_130_without_a_traceback(monkeypatch, capsys):
    """SIGINT during start-up (imports, data set-up, compile) came before the loop's handler and
    ended in a KeyboardInterrupt traceback."""
    import fastcgan.train.loop as loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    assert cli_main(["--dataset", "synthetic", "--max-steps", "1", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_output_dir_that_cannot_be_a_folder_exits_2(tmp_path, synth, capsys):
    """--output-dir naming a file (or a read-only folder) was an OSError traceback with exit 1."""
    (tmp_path / "afile").write_text("keep me")
    args = ["--dataset", "synthetic", "--dataroot", synth, "--output-dir", str(tmp_path / "afile" / "deeper"),
            "--name", "r", "--ngf", "4", "--ndf", "4", "--max-steps", "1", "--no-progress"]  # fmt: skip
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and str(tmp_path / "afile") in err and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize("preprocess", ["scale_width", "scale_width_and_crop"])
def test_scale_width_cannot_blow_a_thin_image_up(tmp_path, synth, preprocess):
    """A 1x80000 PNG (under 1 kB, 80 k pixels: far under the pixel limit) scaled to width 286
    would be 286 x 22.9 M pixels (26 GB): the scaled size is held to the pixel limit too, so the
    file is skipped and named, never resized."""
    import shutil

    from PIL import Image

    from fastcgan.data import UnalignedDataset

    root = tmp_path / "data"
    for sub in ("trainA", "trainB"):
        shutil.copytree(os.path.join(synth, sub), root / sub)
    Image.new("RGB", (1, 80000)).save(root / "trainA" / "0_thin.png")
    ds = UnalignedDataset(str(root), preprocess=preprocess, load_size=286, crop_size=32)
    with pytest.warns(UserWarning, match="0_thin.png.*over the image pixel limit"):
        img, path, skipped = ds.load_resized("A", 0)
    assert skipped == (str(root / "trainA" / "0_thin.png"),) and img.size[0] == 286 and path != skipped[0]


def _folder_set(root, sizes_a, sizes_b, bad=False):
    from PIL import Image

    for d, sizes in (("trainA", sizes_a), ("trainB", sizes_b)):
        (root / d).mkdir(parents=True)
        for i, wh in enumerate(sizes):
            if bad:
                (root / d / f"{i}.jpg").write_bytes(b"not a jpeg at all" * 8)
            else:
                Image.new("RGB", wh, (40 * i, 90, 200)).save(root / d / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "case,extra,said",
    [
        # --preprocess none keeps each size, but the step batches both domains and pools fakes:
        # these crashed in the step (or the sample grid) after the run folder was written.
        ("mixed-in-A", ["--preprocess", "none"], "0.png"),
        ("A-vs-B", ["--preprocess", "none"], "comes out"),
        ("unet-multiple", ["--preprocess", "none", "--netG", "unet_256"], "--preprocess"),
        ("all-unreadable", [], "no usable images"),
    ],
)
def test_unusable_data_exits_2_before_anything_is_written(tmp_path, case, extra, said, capsys):
    sizes = {"mixed-in-A": ([(32, 32), (48, 32)], [(32, 32)] * 2), "A-vs-B": ([(32, 32)] * 2, [(48, 48)] * 2)}
    a, b = sizes.get(case, ([(32, 32)] * 2, [(32, 32)] * 2))
    root = _folder_set(tmp_path / "data", a, b, bad=case == "all-unreadable")
    args = ["--dataroot", str(root), "--output-dir", str(tmp_path / "out"), "--name", "r", "--ngf", "4", "--ndf",
            "4", "--load-size", "32", "--crop-size", "32", "--max-steps", "2", "--no-progress", "--num-workers", "0"]
    assert cli_main(args + extra) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_preprocess_none_trains_at_the_images_own_size(tmp_path, capsys):
    """One image size, no crop: trains, and the sample grid takes the images' size, not
    --crop-size (30 is no multiple of 4: the grid crashed the run at its first sample)."""
    root = _folder_set(tmp_path / "data", [(40, 32)] * 2, [(40, 32)] * 2)
    args = ["--dataroot", str(root), "--output-dir", str(tmp_path / "out"), "--name", "r", "--ngf", "4", "--ndf",
            "4", "--preprocess", "none", "--crop-size", "30", "--max-steps", "2", "--sample-every", "1",
            "--no-progress", "--num-workers", "0", "--eval-every", "0"]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert os.listdir(tmp_path / "out" / "r" / "samples")


def test_oversized_training_image_is_skipped_by_its_header(tmp_path, synth, capsys):
    """--max-image-pixels: an image above the limit is skipped (and counted) without decoding,
    the way a decompression bomb (a 140 KB 12000x12000 PNG) would be at the default limit."""
    import shutil

    from PIL import Image

    from fastcgan.data import get_max_image_pixels, set_max_image_pixels

    root = tmp_path / "data"
    for sub in ("trainA", "trainB"):
        shutil.copytree(os.path.join(synth, sub), root / sub)
    Image.new("RGB", (48, 48)).save(root / "trainA" / "a_big.png")  # 2304 px > 1500
    before = get_max_image_pixels()
    try:
        cfg = tiny_train_config(str(root), tmp_path, dataset="folder", max_steps=9, serial_batches=True,
                                max_image_pixels=1500)  # fmt: skip
        s = train(cfg)
        assert get_max_image_pixels() == before  # the process-wide limit is restored after the run
    finally:
        set_max_image_pixels(before)
    assert s["skipped_images"] == 1 and s["skipped"][0].endswith("a_big.png")
    assert "a_big.png" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Where a run writes (an audit of 2026-11-29)
# --------------------------------------------------------------------------------------------
def _tiny_cli(*extra):
    return cli_main(["--ngf", "4", "--ndf", "4", "--load-size", "32", "--crop-size", "32", "--max-steps", "1",
                     "--no-progress", "--no-tensorboard", "--num-workers", "0", "--device", "cpu", *map(str, extra)])


def test_synthetic_data_never_replaces_a_users_images(tmp_path, capsys):
    """--dataset synthetic --dataroot DIR, with DIR the user's own dataset, deleted its trainA/ ...
    and put the synthetic images in their place (exit 0): folders without the generator's manifest
    are somebody's."""
    mine = tmp_path / "mydata"
    for d in ("trainA", "trainB", "testA", "testB"):
        (mine / d).mkdir(parents=True)
        (mine / d / "0.png").write_bytes(b"my image")
    assert _tiny_cli("--dataset", "synthetic", "--dataroot", mine, "--output-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert "did not generate" in err and str(mine) in err, err
    assert sorted(os.listdir(mine)) == ["testA", "testB", "trainA", "trainB"]
    assert all((mine / d / "0.png").read_bytes() == b"my image" for d in os.listdir(mine))
    assert not (tmp_path / "runs").exists()
    # The generator's own folders are still replaced when its parameters change, and after a
    # generation that was killed while replacing them (the mark is there, the manifest not).
    ours = str(tmp_path / "ours")
    ensure_synthetic_dataset(ours, size=16, n_train=2, n_test=1)
    ensure_synthetic_dataset(ours, size=16, n_train=3, n_test=1)
    assert len(os.listdir(os.path.join(ours, "trainA"))) == 3
    os.remove(os.path.join(ours, "fastcgan_synthetic.json"))
    open(os.path.join(ours, ".fastcgan_synthetic.writing"), "w").close()
    ensure_synthetic_dataset(ours, size=16, n_train=2, n_test=1)
    assert len(os.listdir(os.path.join(ours, "trainA"))) == 2
    assert not os.path.exists(os.path.join(ours, ".fastcgan_synthetic.writing"))


def test_a_new_run_never_writes_into_a_folder_of_other_files(tmp_path, synth, capsys):
    """A new run into an existing folder that was not a run (e.g. fastcgan-download --pretrained's)
    replaced its generator_AtoB.safetensors and config.json, exit 0; only checkpoints were looked for."""
    pre = tmp_path / "ck" / "h2z_pretrained"
    pre.mkdir(parents=True)
    (pre / "generator_AtoB.safetensors").write_bytes(b"OFFICIAL")
    assert _tiny_cli("--dataroot", synth, "--output-dir", tmp_path / "ck", "--name", "h2z_pretrained") == 2
    err = capsys.readouterr().err
    assert "not a fastcgan run's (generator_AtoB.safetensors)" in err and "--name" in err, err
    assert os.listdir(pre) == ["generator_AtoB.safetensors"]
    assert (pre / "generator_AtoB.safetensors").read_bytes() == b"OFFICIAL"
    # An empty folder, or a run that stopped before its first checkpoint (its .lock), is taken.
    run = tmp_path / "ck" / "empty"
    run.mkdir()
    assert _tiny_cli("--dataroot", synth, "--output-dir", tmp_path / "ck", "--name", "empty") == 0
    os.remove(run / "checkpoints" / "step_000000001.ckpt")
    # A trained run whose checkpoints were deleted to save space is not such a run: a new run (or
    # --resume, with nothing to resume) replaced its generators, metrics and summary, exit 0.
    before = {p: (run / p).read_bytes() for p in ("generator_AtoB.safetensors", "metrics.jsonl", "summary.json")}
    for extra in ([], ["--resume"]):
        assert _tiny_cli("--dataroot", synth, "--output-dir", tmp_path / "ck", "--name", "empty", *extra) == 2
        err = capsys.readouterr().err
        assert "holds a trained run (generator_AtoB.safetensors, generator_BtoA.safetensors) without a " \
               "checkpoint" in err, err
        assert {p: (run / p).read_bytes() for p in before} == before
    for p in run.glob("generator_*.safetensors"):  # what a run stopped before its first checkpoint leaves
        p.unlink()
    assert _tiny_cli("--dataroot", synth, "--output-dir", tmp_path / "ck", "--name", "empty") == 0


def test_a_run_never_writes_inside_its_training_data(tmp_path, synth, capsys):
    """--output-dir DATA --name trainA put checkpoints and sample grids into trainA/: the next run
    trained on its own sample grid."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    before = sorted(os.listdir(data / "trainA"))
    assert _tiny_cli("--dataroot", data, "--output-dir", data, "--name", "trainA") == 2
    err = capsys.readouterr().err
    assert "inside the training data" in err and str(data) in err, err
    assert sorted(os.listdir(data / "trainA")) == before
    # Beside the image folders (--dataroot . with the default --output-dir runs) is fine -- also
    # under a name that only begins like one (it was refused as "inside the training data").
    assert _tiny_cli("--dataroot", data, "--output-dir", data / "runs") == 0
    assert _tiny_cli("--dataroot", data, "--output-dir", data, "--name", "testrun") == 0
    for folder in ("testA_truth_B", "train", "valB"):  # every image folder a dataset may have
        assert _tiny_cli("--dataroot", data, "--output-dir", data, "--name", folder) == 2, folder


@pytest.mark.parametrize("extra, said", [
    (["--lambda-L1", "5"], "--lambda-L1 (read by --model pix2pix / colorization only)"),
    (["--num-patches", "7", "--nce-T", "0.5"], "--num-patches (read by --model cut only); --nce-T"),
    (["--direction", "BtoA"], "--direction (read by --model pix2pix / colorization / cut only)"),
    (["--lambda-gp", "5"], "--lambda-gp (the wgangp gradient penalty; --gan-mode is lsgan)"),
    (["--lr-decay-iters", "7"], "--lr-decay-iters (the step policy's; --lr-policy is linear)"),
    (["--eval-every", "0", "--eval-max-images", "2"], "--eval-max-images (with --eval-every 0"),
    (["--model", "pix2pix", "--netG", "resnet_6blocks", "--pool-size", "7", "--lambda-cycle", "3"],
     "--pool-size (read by --model cyclegan / cut"),
    (["--model", "cut", "--lambda-identity", "0.9"], "--lambda-identity (read by --model cyclegan only)"),
    # execution flags, judged on the device the run takes
    (["--cudnn-benchmark"], "--cudnn-benchmark (cuDNN tunes CUDA convolutions; this run is on cpu)"),
    (["--no-compile", "--compile-backend", "aot_eager"], "--compile-backend (nothing is compiled: --no-compile)"),
    (["--compile-backend", "aot_eager"], "--compile-backend (nothing is compiled: --compile is off by default on cpu"),
    (["--faithful", "--compile-backend", "aot_eager"],
     "--compile-backend (nothing is compiled: --faithful runs eager)"),
])
def test_flags_nothing_reads_exit_2_before_anything_is_written(tmp_path, synth, extra, said, capsys):
    """Another recipe's loss weights (and settings another setting switches off) trained bit-for-bit
    as without them, exit 0 and no word."""
    out = tmp_path / "out"
    assert _tiny_cli("--dataroot", synth, "--output-dir", out, *extra) == 2
    err = capsys.readouterr().err
    assert said in err and "would train exactly as without" in err, err
    assert not out.exists()


def test_presets_that_would_be_ignored_are_refused(tmp_path, synth, capsys):
    """--model fastcut --preset cut trained plain CUT; --resume RUN --preset cyclegan128 kept the
    checkpoint's resnet_9blocks, exit 0."""
    with pytest.raises(SystemExit) as e:
        _tiny_cli("--dataroot", synth, "--output-dir", tmp_path, "--model", "fastcut", "--preset", "cut")
    assert e.value.code == 2 and "--model fastcut is --model cut --preset fastcut" in capsys.readouterr().err
    assert _tiny_cli("--dataroot", synth, "--output-dir", tmp_path, "--preset", "cyclegan") == 0
    run = tmp_path / "run"
    before = sorted(os.listdir(run / "checkpoints"))
    assert _tiny_cli("--resume", run, "--preset", "cyclegan128", "--max-steps", "2") == 2
    err = capsys.readouterr().err
    assert "preset='cyclegan128' (checkpoint: 'cyclegan')" in err, err
    assert sorted(os.listdir(run / "checkpoints")) == before
    assert _tiny_cli("--resume", run, "--preset", "cyclegan", "--max-steps", "2") == 0  # the same: fine


def test_paths_that_are_not_what_they_should_be_are_named_so(tmp_path, synth, capsys):
    """A file as --dataroot read "no such directory", a FIFO as --resume "no such file or
    directory", as --init-generator "generator file not found"; --output-dir '' wrote ./run."""
    afile, fifo = tmp_path / "afile", tmp_path / "fifo"
    afile.write_bytes(b"x")
    os.mkfifo(fifo)
    out = tmp_path / "out"
    cases = [
        (["--dataroot", afile], f"--dataroot {afile}: not a directory"),
        (["--dataroot", synth, "--resume", fifo], f"--resume {fifo}: not a regular file or a run directory"),
        (["--dataroot", synth, "--init-generator", f"AtoB={fifo}"], f"{fifo}: not a regular file"),
    ]
    for extra, said in cases:
        assert _tiny_cli("--output-dir", out, *extra) == 2, extra
        err = capsys.readouterr().err
        assert said in err, (extra, err)
        assert not out.exists()
    with pytest.raises(SystemExit) as e:
        _tiny_cli("--dataroot", synth, "--output-dir", "")
    assert e.value.code == 2 and "output_dir (--output-dir): must name a folder" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, said", [
    ("flip", "false", "flip (--flip): must be bool, got 'false'"),  # trained with flipping on
    ("amp", 1, "amp (--amp): must be bool"),
    ("lr", "1e-4", "lr (--lr): must be float"),  # a raw TypeError from '<'
    ("device", None, "device (--device): must be str"),
    ("max_steps", 2.5, "max_steps (--max-steps): must be Optional[int]"),
    ("name", "a\x00b", "name (--name): contains a NUL byte"),
    ("init_gain", -1.0, "init_gain (--init-gain): must be in (0, 10]"),  # failed after the data was written
    ("init_gain", 1e12, "init_gain (--init-gain): must be in (0, 10]"),
])
def test_config_fields_have_their_types(field, value, said):
    """From the Python API (and a tampered config.json / checkpoint config) any value was taken."""
    import re

    from fastcgan.train import TrainConfig
    from fastcgan.train.config import FIELD_SECTION, ConfigError

    with pytest.raises(ConfigError, match=re.escape(said)):
        TrainConfig.from_preset("cyclegan128", dataset="synthetic", **{field: value})
    d = TrainConfig.from_preset("cyclegan128", dataset="synthetic").to_dict()
    d[FIELD_SECTION[field]][field] = value
    with pytest.raises(ConfigError, match=re.escape(said)):
        TrainConfig.from_dict(d)


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Durability: the data reaches the disk under the temporary name before the rename makes it
    the file, and the folder is synced after, so a power cut leaves the old file or the new one."""
    from fastcgan.fileio import atomic_write

    dest = tmp_path / "out.bin"
    seen = []
    real = os.fsync

    def fsync(fd):
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), dest.exists()))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(str(dest), b"data")
    assert dest.read_bytes() == b"data"
    (first, dest_then), (last, dest_after) = seen[0], seen[-1]
    root = os.path.realpath(tmp_path)
    assert first.startswith(root + "/.out.bin.") and first.endswith(".tmp") and not dest_then
    assert last == root and dest_after


def test_path_inside_is_by_whole_folder_names(tmp_path):
    data, data2 = tmp_path / "data", tmp_path / "data2"
    data.mkdir()
    data2.mkdir()
    assert path_inside(str(data / "a.png"), str(data)) and path_inside(str(data), str(data))
    assert not path_inside(str(data2 / "a.png"), str(data))  # a sibling sharing the prefix
    assert not path_inside(str(data2), str(data))


def test_no_replace_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    """On a file system without hard links (FAT, some FUSE mounts) replace=False falls back to a
    check before the rename: an existing destination is still never replaced."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fileio.os, "link", no_links)
    src, dst = tmp_path / "new.tmp", tmp_path / "out.png"
    src.write_bytes(b"new")
    dst.write_bytes(b"theirs")
    with pytest.raises(OutputExistsError):
        move_into_place(str(src), str(dst), replace=False)
    assert dst.read_bytes() == b"theirs"
    os.remove(dst)
    move_into_place(str(src), str(dst), replace=False)
    assert dst.read_bytes() == b"new" and not src.exists()


def test_temporaries_of_another_users_live_process_are_kept(tmp_path, monkeypatch):
    """os.kill(pid, 0) raising PermissionError means the process exists (another user's): its
    temporary is being written and must not be deleted."""
    def kill(pid, sig):
        raise PermissionError(errno.EPERM, "not permitted")

    monkeypatch.setattr(fileio.os, "kill", kill)
    tmp = tmp_path / ".step_000000001.ckpt.4242.tmp"
    tmp.write_bytes(b"partial")
    assert remove_stale_temporaries(str(tmp_path)) == []
    assert tmp.exists()


def test_running_out_of_memory_in_training_says_what_to_make_smaller(tmp_path, synth, monkeypatch, capsys):
    """`--load-size 16384` passed the config's bounds and died in a MemoryError traceback (the
    sample images alone asked 6.4 GB); a CUDA OOM in the step was a traceback too. Both are one line
    naming the sizes and the flags that make a run smaller, exit 1, with the last checkpoint."""
    import fastcgan.train.loop as loop

    def no_memory(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(loop, "sample_images", no_memory)
    with pytest.raises(loop.TrainingError, match=r"^out of memory on cpu training batch 1 at --crop-size 32 "
                       r"\(--load-size 32\) with --model cyclegan \(MemoryError\); make it smaller: "
                       r"--crop-size / --load-size, --amp \(last checkpoint: none\)$"):
        train(tiny_train_config(synth, tmp_path, max_steps=2))
    monkeypatch.undo()

    real_build_step = loop.build_step

    def step_runs_out(*a, **k):
        step = real_build_step(*a, **k)
        calls = []

        class OutOfMemoryAtStep3:
            exe = step.exe

            def __call__(self, batch):
                calls.append(1)
                if len(calls) == 3:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return step(batch)

        return OutOfMemoryAtStep3()

    monkeypatch.setattr(loop, "build_step", step_runs_out)
    args = ["--dataroot", synth, "--output-dir", str(tmp_path), "--name", "oom", "--load-size", "32", "--crop-size",
            "32", "--ngf", "4", "--ndf", "4", "--batch-size", "2", "--device", "cpu", "--max-steps", "4",
            "--checkpoint-every", "2", "--no-progress", "--no-tensorboard", "--eval-every", "0"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert ("fastcgan-train: error: out of memory on cpu training batch 2 at --crop-size 32 (--load-size 32) with "
            "--model cyclegan (CUDA out of memory. Tried to allocate 2.00 GiB); make it smaller: --batch-size, "
            "--crop-size / --load-size, --amp (last checkpoint: ") in err
    assert "step_000000002.ckpt)" in err and "Traceback" not in err


def test_a_no_replace_move_reraises_link_errors_other_than_no_hard_links(tmp_path, monkeypatch):
    """Catches: `if e.errno not in _NO_HARD_LINKS: raise` dropped (any link failure, e.g. EACCES,
    silently fell back to the non-atomic check-then-rename)."""
    import errno
    import os

    from fastcgan import fileio

    (tmp_path / "a").write_bytes(b"a")
    fileio.move_into_place(str(tmp_path / "a"), str(tmp_path / "b"), replace=False)  # kills: os.remove(src) dropped
    assert os.listdir(tmp_path) == ["b"]
    (tmp_path / "b").unlink()
    src = tmp_path / "src"
    src.write_bytes(b"x")

    def no_access(a, b):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fileio.os, "link", no_access)
    with pytest.raises(PermissionError):
        fileio.move_into_place(str(src), str(tmp_path / "dst"), replace=False)
    assert not (tmp_path / "dst").exists() and src.exists()
    assert os.listdir(tmp_path) == ["src"]


def test_a_quota_error_is_named(tmp_path):
    """Catches: the EDQUOT wording dropped from the write errors."""
    import errno

    from fastcgan.fileio import WriteError, atomic_write

    def chunks():
        yield b"part"
        raise OSError(errno.EDQUOT, "q")

    with pytest.raises(WriteError, match=r"could not write .*f\.bin: disk quota exceeded \(previous file unchanged\)"):
        atomic_write(str(tmp_path / "f.bin"), chunks())


def test_stale_temporaries_are_matched_by_the_whole_name(tmp_path):
    """Catches: re.fullmatch -> re.match in remove_stale_temporaries (a user's `.notes.<n>.tmpl` or
    `.x.<n>.tmp.bak` would be deleted as a dead writer's temporary)."""
    from fastcgan.fileio import remove_stale_temporaries

    dead = 4194305  # above Linux's largest pid_max: no such process
    for name in (f".a.{dead}.tmp", f".notes.{dead}.tmpl", f".x.{dead}.tmp.bak"):
        (tmp_path / name).write_bytes(b"")
    assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / f".a.{dead}.tmp")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".notes.{dead}.tmpl", f".x.{dead}.tmp.bak"]


def test_the_output_probe_syncs_so_a_full_disk_shows(tmp_path, monkeypatch):
    """Catches: the probe's os.fsync dropped (delayed allocation: a full disk or quota shows at the
    sync, not at the write)."""
    import errno
    import os

    from fastcgan.fileio import output_folder_problem

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    why = output_folder_problem(str(tmp_path / "out"), "--output")
    assert why == f"--output: cannot write in {tmp_path} (no space left on the device)"
    assert os.listdir(tmp_path) == []  # the probe is removed


def test_a_write_error_reads_as_its_message():
    """WriteError(errno, message) printed "[Errno None] could not write ..." (a write that failed
    without an errno) or "[Errno 28] ..." before the message the commands print after "error:"."""
    import errno

    from fastcgan.fileio import WriteError

    for code in (None, errno.ENOSPC):
        e = WriteError(code, "could not write x: no space left on the device")
        assert str(e) == "could not write x: no space left on the device" and e.errno == code
    assert str(WriteError("could not write y")) == "could not write y"
