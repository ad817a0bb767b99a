"""Training checkpoints: bit-exact restore, atomic writes (also under SIGKILL), clear errors for
bad files, and no half-applied state. CPU, tiny networks (ngf/ndf 4 at 32x32)."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_train_config

from fastcgan.data import augment_batch
from fastcgan.fileio import atomic_write
from fastcgan.train import TrainConfig, build_state, build_step
from fastcgan.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_state,
    run_dir_of,
    save_checkpoint,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEV = torch.device("cpu")


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(load_size=36, pool_size=2, use_dropout=True, epochs=1, epochs_decay=3, keep_last=3)
    return tiny_train_config(**{**base, **kw})


def batch_for(step: int, state, data_gen: torch.Generator, b: int = 1) -> dict:
    """Step-indexed uint8 images, cropped/flipped with the state's augmentation generator; the
    B image is chosen with ``data_gen`` (a stand-in for the GPU image bank's generator)."""
    g = torch.Generator().manual_seed(1000 + step)
    pool = torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8, generator=g)
    j = torch.randint(0, 4, (b,), generator=data_gen)
    out = {}
    for dom, imgs in (("A", pool[:b]), ("B", pool[j])):
        out[dom] = augment_batch(imgs, crop_size=32, flip=True, generator=state.aug_generator)
    return out


def run_steps(state, cfg, data_gen, n: int, steps_per_epoch: int = 2) -> None:
    step = build_step(state, cfg)
    for _ in range(n):
        step(batch_for(state.step, state, data_gen))
        state.step += 1
        state.batch_in_epoch += 1
        if state.batch_in_epoch == steps_per_epoch:  # as the loop: schedules step per epoch
            state.end_epoch()


def fresh(cfg, seed: int = 0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return build_state(cfg, DEV)


def assert_states_equal(a, b):
    assert a.nets.keys() == b.nets.keys() == {"G_AB", "G_BA", "D_A", "D_B"}
    for n in a.nets:
        sa, sb = a.nets[n].state_dict(), b.nets[n].state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{n}.{k} differs"
    for opt in ("G", "D"):
        da, db = a.optimizers[opt].state_dict()["state"], b.optimizers[opt].state_dict()["state"]
        assert da.keys() == db.keys()
        for i in da:
            for k in da[i]:
                assert torch.equal(torch.as_tensor(da[i][k]), torch.as_tensor(db[i][k])), f"{opt}[{i}].{k}"
    for p in ("pool_A", "pool_B"):
        pa, pb = a.pools[p], b.pools[p]
        assert torch.equal(pa.images, pb.images) and torch.equal(pa.num_imgs, pb.num_imgs)
    assert (a.step, a.epoch, a.batch_in_epoch) == (b.step, b.epoch, b.batch_in_epoch)
    assert a.lr() == b.lr()
    assert torch.equal(a.aug_generator.get_state(), b.aug_generator.get_state())


def test_resume_is_bitwise_identical(tmp_path):
    """2N steps straight == N steps, checkpoint, restore into a new state (after disturbing every
    RNG), N steps: same weights, moments, pools, schedules and RNG streams, bit for bit."""
    cfg, n = tiny_cfg(), 3
    straight = fresh(cfg)
    gen_s = torch.Generator().manual_seed(7)
    run_steps(straight, cfg, gen_s, 2 * n)

    first = fresh(cfg)
    gen_r = torch.Generator().manual_seed(7)
    run_steps(first, cfg, gen_r, n)
    path = save_checkpoint(first, cfg, str(tmp_path / "run"), {"bank": gen_r}, {"skipped": ["x.jpg"]})
    assert path == checkpoint_path(str(tmp_path / "run"), n) and os.path.isfile(path)
    del first
    # Disturb everything the restore must bring back.
    random.random(), np.random.rand(), torch.rand(5)
    gen_r2 = torch.Generator().manual_seed(12345)
    payload = load_checkpoint(path)
    assert payload["extra"]["skipped"] == ["x.jpg"]
    assert TrainConfig.from_dict(payload["config"]) == cfg
    resumed = restore_state(payload, cfg, DEV, {"bank": gen_r2}, path=path)
    assert resumed.step == n and resumed.epoch == 1 and resumed.batch_in_epoch == 1
    run_steps(resumed, cfg, gen_r2, n)

    assert_states_equal(straight, resumed)
    assert torch.equal(gen_s.get_state(), gen_r2.get_state())
    # The lr really changed over the run (the schedule state was exercised).
    assert resumed.lr() < cfg.optim.lr


def test_global_rng_streams_restored(tmp_path):
    cfg = tiny_cfg()
    st = fresh(cfg, seed=3)
    path = save_checkpoint(st, cfg, str(tmp_path), {}, {})
    expect = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)
    restore_state(load_checkpoint(path), cfg, DEV, {}, path=path)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expect[0] == got[0] and expect[1] == got[1] and torch.equal(expect[2], got[2])


def test_restore_from_step_zero_with_empty_pools(tmp_path):
    """Pools that were never queried have no image buffer yet; restoring and training works."""
    cfg = tiny_cfg()
    st = fresh(cfg)
    assert st.pools["pool_A"].images is None
    path = save_checkpoint(st, cfg, str(tmp_path), {}, {})
    st2 = restore_state(load_checkpoint(path), cfg, DEV, {}, path=path)
    run_steps(st2, cfg, torch.Generator().manual_seed(0), 1)
    assert st2.pools["pool_A"].images is not None and int(st2.pools["pool_A"].num_imgs) == 1


def test_mismatched_config_rejected_before_anything_applies(tmp_path):
    cfg = tiny_cfg()
    st = fresh(cfg)
    path = save_checkpoint(st, cfg, str(tmp_path), {}, {})
    payload = load_checkpoint(path)
    torch.manual_seed(99)
    random.seed(99)
    rng_t, rng_py = torch.get_rng_state(), random.getstate()
    with pytest.raises(CheckpointError, match="network G_AB does not match") as e:
        restore_state(payload, tiny_cfg(ngf=8), DEV, {}, path=path)
    assert path in str(e.value)
    # Nothing was applied: the global RNGs are as they were.
    assert torch.equal(torch.get_rng_state(), rng_t) and random.getstate() == rng_py
    # Another data path than the checkpoint's is no mismatch (test_train_resume): the new path's
    # generator gets a stream of its own from (seed, step).
    bank = torch.Generator().manual_seed(cfg.run.seed)
    seeded = bank.get_state()
    st = restore_state(payload, cfg, DEV, {"bank": bank}, path=path)
    assert st.step == payload["step"] and not torch.equal(bank.get_state(), seeded)


class _Malicious:
    def __reduce__(self):  # os.system: a module torch blocks by name (a message of its own)
        return (os.system, ("touch /tmp/fastcgan-test-never-created",))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign", "incomplete", "malicious",
                                    "newer-format"])
def test_bad_checkpoint_gives_clear_error_and_touches_nothing(tmp_path, damage):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    path = save_checkpoint(fresh(cfg), cfg, str(run), {}, {})
    f = pathlib.Path(path)
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif damage == "malicious":
        torch.save({"format": "fastcgan.checkpoint", "x": _Malicious()}, path)
    elif damage == "newer-format":  # a later fastcgan's layout: refused by its version, not half-read
        payload = torch.load(path, weights_only=True)
        payload["format_version"] += 1
        torch.save(payload, path)
    else:
        payload = torch.load(path, weights_only=True)
        del payload["optimizers"]
        torch.save(payload, path)
    before = sorted((p, os.path.getsize(os.path.join(dp, p))) for dp, _, fs in os.walk(run) for p in fs)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert path in str(e.value)
    if damage == "newer-format":
        assert "format version" in str(e.value)
    # torch's refusal advises loading the file unsafely: never passed on.
    assert "weights_only" not in str(e.value) and "trusted source" not in str(e.value), str(e.value)
    assert not os.path.exists("/tmp/fastcgan-test-never-created")
    after = sorted((p, os.path.getsize(os.path.join(dp, p))) for dp, _, fs in os.walk(run) for p in fs)
    assert before == after


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(str(tmp_path / "nope.ckpt"))


def resolve_resume(resume, run_dir):
    return find_resume_checkpoint(resume, run_dir)[0]


def test_keep_last_listing_and_resolve(tmp_path):
    cfg = tiny_cfg(keep_last=2)
    st = fresh(cfg)
    run = str(tmp_path / "run")
    assert latest_checkpoint(run) is None and list_checkpoints(run) == []
    assert resolve_resume("auto", run) is None
    for s in (1, 2, 10, 11):
        st.step = s
        save_checkpoint(st, cfg, run, {}, {})
    # Numeric order, not lexicographic; only the newest keep_last remain.
    assert [os.path.basename(p) for p in list_checkpoints(run)] == [
        "step_000000010.ckpt",
        "step_000000011.ckpt",
    ]
    # Past step 999,999,999 the name has ten digits: still numeric order.
    for s in (999_999_999, 1_000_000_000):
        open(os.path.join(run, "checkpoints", f"step_{s:09d}.ckpt"), "wb").close()
    assert [os.path.basename(p) for p in list_checkpoints(run)][-2:] == ["step_999999999.ckpt",
                                                                         "step_1000000000.ckpt"]
    for s in (999_999_999, 1_000_000_000):
        os.remove(os.path.join(run, "checkpoints", f"step_{s:09d}.ckpt"))
    # Temporary files and other names are never listed.
    # (pid 4999999 is above Linux's largest pid_max: that writer is certainly dead)
    open(os.path.join(run, "checkpoints", ".step_000000012.ckpt.4999999.tmp"), "wb").close()
    open(os.path.join(run, "checkpoints", "notes.txt"), "w").close()
    latest = latest_checkpoint(run)
    assert latest.endswith("step_000000011.ckpt")
    assert resolve_resume("auto", run) == latest
    assert resolve_resume(run, "elsewhere") == latest
    assert resolve_resume(os.path.join(run, "checkpoints"), "elsewhere") == latest
    first = list_checkpoints(run)[0]
    assert resolve_resume(first, "elsewhere") == first
    assert os.path.abspath(run_dir_of(first)) == os.path.abspath(run)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_resume(str(tmp_path / "missing"), run)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "empty"), run)
    # The next save clears the stale temporary a killed writer left.
    st.step = 12
    save_checkpoint(st, cfg, run, {}, {})
    assert not any(n.endswith(".tmp") for n in os.listdir(os.path.join(run, "checkpoints")))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "config.json")
    atomic_write(path, [b"old"])

    def chunks():
        yield b"half of the new"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, chunks())
    assert pathlib.Path(path).read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["config.json"]
    atomic_write(path, [b"new", b"er"])
    assert pathlib.Path(path).read_bytes() == b"newer"


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint import tiny_cfg, fresh
    from fastcgan.train.checkpoint import save_checkpoint
    cfg = tiny_cfg()
    st = fresh(cfg)
    st.step = 1
    save_checkpoint(st, cfg, {run!r}, {{}}, {{}})
    real_save = torch.save

    def half_then_hang(obj, f, *a, **k):
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print("HALF", flush=True)
        time.sleep(120)

    torch.save = half_then_hang
    st.step = 2
    save_checkpoint(st, cfg, {run!r}, {{}}, {{}})
    print("NOT REACHED", flush=True)
    """
)


def test_sigkill_during_write_leaves_previous_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    script = _KILL_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), run=run)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HALF", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(os.path.join(run, "checkpoints"))
    assert any(n.endswith(".tmp") for n in names), names  # the half-written file is only a temporary
    latest = latest_checkpoint(run)
    assert latest is not None and latest.endswith("step_000000001.ckpt")
    cfg = tiny_cfg()
    payload = load_checkpoint(latest)
    st = restore_state(payload, cfg, DEV, {}, path=latest)
    assert st.step == 1


def _tiny(**kw):
    base = dict(load_size=36, pool_size=2, use_dropout=True, epochs=1, epochs_decay=3, keep_last=3)
    return tiny_train_config(**{**base, **kw})


def _fresh(cfg, seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return build_state(cfg, DEV)


def test_numpy_gaussian_cache_is_restored(tmp_path):
    """numpy's legacy normal sampler caches every second draw (has_gauss / cached_gaussian in its
    state): a resume must restore that cache too, or the next np.random.randn differs."""
    cfg = _tiny()
    st = _fresh(cfg, seed=5)
    np.random.randn()  # an odd number of normal draws: the second one is now cached
    path = save_checkpoint(st, cfg, str(tmp_path), {}, {})
    expect = np.random.randn(3)
    np.random.randn(4)
    restore_state(load_checkpoint(path), cfg, DEV, {}, path=path)
    assert np.array_equal(np.random.randn(3), expect)


def test_removed_tensor_is_named_as_the_damage(tmp_path):
    """A tensor missing from a checkpoint (its digest still listing it) is reported by name, not as
    damaged metadata."""
    cfg = _tiny()
    path = save_checkpoint(_fresh(cfg), cfg, str(tmp_path), {}, {})
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["nets"]["G_AB"]))
    del payload["nets"]["G_AB"][key]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"tensor nets/G_AB/{key} does not match"):
        load_checkpoint(path)


def test_optimizer_state_for_a_parameter_past_the_last_is_refused(tmp_path):
    """Optimizer state keyed by an index one past the last parameter belongs to no parameter (torch's
    load_state_dict would keep it silently): refused before anything is applied."""
    cfg = _tiny()
    path = save_checkpoint(_fresh(cfg), cfg, str(tmp_path), {}, {})
    payload = load_checkpoint(path)
    n = sum(len(g["params"]) for g in payload["optimizers"]["G"]["param_groups"])
    payload["optimizers"]["G"]["state"][n] = {"step": torch.tensor(1.0)}
    with pytest.raises(CheckpointError, match="state for no parameter"):
        restore_state(payload, cfg, DEV, {}, path=path)


@pytest.mark.parametrize("edit, said", [("no_structure", "its metadata"), ("tensors_none", "carries no content digest")])
def test_a_digest_missing_its_parts_is_refused(tmp_path, edit, said):
    """Catches (mutation testing): a digest without its "structure" entry passing the metadata
    (config, step, RNG states) unverified, and one whose "tensors" is not a dict raising a
    TypeError past the resume fallback instead of a CheckpointError."""
    cfg = _tiny()
    path = save_checkpoint(_fresh(cfg), cfg, str(tmp_path), {}, {})
    payload = torch.load(path, weights_only=True)
    if edit == "no_structure":
        payload["step"] += 1
        del payload["digest"]["structure"]
    else:
        payload["digest"]["tensors"] = None
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=said):
        load_checkpoint(path)


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """Catches (mutation testing): keep-last rotation deleting the checkpoint it has just written and
    verified when a higher-numbered file sits beside it (a damaged newer checkpoint a resume fell
    back from): the run would be left with nothing it can resume from."""
    cfg = _tiny(keep_last=1)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step_000000009.ckpt").write_bytes(b"damaged")
    path = save_checkpoint(_fresh(cfg), cfg, str(tmp_path), {}, {})
    assert os.path.exists(path) and load_checkpoint(path)["step"] == 0


def test_resume_auto_with_only_a_damaged_checkpoint_is_refused(tmp_path):
    """Catches (mutation testing): ``--resume`` (auto) over a run whose one checkpoint is damaged
    starting a new run over it, instead of saying no checkpoint verifies."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_000000004.ckpt").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="no checkpoint of .* verifies: skipped .*step_000000004.ckpt"):
        find_resume_checkpoint("auto", str(tmp_path))
    assert find_resume_checkpoint("auto", str(tmp_path / "new")) == (None, None, [])
