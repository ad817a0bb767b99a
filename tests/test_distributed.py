"""DDP on the CPU: ``torchrun --nproc-per-node 2 -m fastcgan.train`` on gloo trains what one process
with the same (global) batch trains, and a checkpoint resumes on another number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fastcgan.data import ensure_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How far two runs may drift apart and still be "the same run". Reduction order alone (an
# all-reduce of two half-batch gradient means vs one batch mean) differs by ~1e-7; Adam's first
# steps divide every gradient by its own magnitude, so elements whose gradient is ~0 turn that
# noise into lr-sized steps (and biases before InstanceNorm have an exactly-zero gradient: they
# are left out, they change no output). Measured: weight drift 5e-7 to 3e-4 of the weights' norm
# after 6 steps, per-step losses equal to 2e-4. A different data order (the negative control)
# drifts by ~0.3 in the losses and 3.5e-2 in the weights.
WEIGHT_RTOL = 1e-3
LOSS_RTOL = 1e-3


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("synth") / "s32"), size=32, n_train=12, n_test=2)


def _args(root, out, name, steps, *extra, preset="cyclegan128"):
    pool = [] if preset == "pix2pix" else ["--pool-size", "3"]  # pix2pix has no image pool
    return [
        "--dataroot", root, "--dataset", "synthetic", "--preset", preset,
        "--load-size", "32", "--crop-size", "24", "--ngf", "4", "--ndf", "4",
        "--batch-size", "2", *pool, "--max-steps", str(steps),
        "--output-dir", str(out), "--name", name, "--device", "cpu", "--seed", "3",
        "--log-every", "1", "--sample-every", "1000", "--checkpoint-every", "1000",
        "--no-tensorboard", "--no-progress", *extra,
    ]  # fmt: skip


def _torchrun(nproc, args):
    """``torchrun`` running the trainer on ``args``; its logs go beside the runs in ``--output-dir``
    (by default torchrun leaves a ``/tmp/torchelastic_*`` folder behind per launch)."""
    logs = os.path.join(args[args.index("--output-dir") + 1], "torchrun-logs")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--log-dir", logs, "-m", "fastcgan.train", *args]  # fmt: skip


def _train(args, nproc, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastcgan.train", *args]
    else:
        cmd = _torchrun(nproc, args)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def _weights(run_dir):
    """The run's generators (both directions for CycleGAN, AtoB alone for CUT and pix2pix)."""
    return {d: load_file(os.path.join(run_dir, f"generator_{d}.safetensors")) for d in ("AtoB", "BtoA")
            if os.path.exists(os.path.join(run_dir, f"generator_{d}.safetensors"))}


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weight_drift(a_dir, b_dir) -> float:
    """||w_a - w_b|| / ||w_a|| over both generators' weights (biases left out, see above)."""
    wa, wb = _weights(a_dir), _weights(b_dir)
    assert {d: wa[d].keys() for d in wa} == {d: wb[d].keys() for d in wb}
    keys = [(d, k) for d in wa for k in wa[d] if not k.endswith(".bias")]
    num = sum(((wa[d][k] - wb[d][k]) ** 2).sum() for d, k in keys) ** 0.5
    den = sum((wa[d][k] ** 2).sum() for d, k in keys) ** 0.5
    return float(num / den)


_NOT_LOSSES = {"step", "epoch", "time", "lr", "images_per_s", "data_wait_frac"}


def _loss_drift(a_dir, b_dir) -> float:
    """The largest difference of any logged loss, step by step (relative to losses above 1)."""
    ma, mb = _metrics(a_dir), _metrics(b_dir)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    keys = set(ma[0]) - _NOT_LOSSES
    assert keys and keys == set(mb[0]) - _NOT_LOSSES
    return max(abs(x[k] - y[k]) / max(1.0, abs(x[k])) for x, y in zip(ma, mb) for k in keys)


def _assert_same(a_dir, b_dir):
    assert _weight_drift(a_dir, b_dir) < WEIGHT_RTOL
    assert _loss_drift(a_dir, b_dir) < LOSS_RTOL


@pytest.mark.parametrize(
    "extra",
    [[], ["--data-on-gpu"], ["--compile", "--compile-backend", "aot_eager"]],
    ids=["loader", "device-bank", "compiled"],
)
def test_two_processes_equal_one(synth, tmp_path, extra):
    """Under DDP --compile compiles each network (DDP's forward cannot be traced inside the
    single-process whole-phase graphs); aot_eager keeps the numbers eager-exact."""
    _train(_args(synth, tmp_path, "one", 6, *extra), 1)
    _train(_args(synth, tmp_path, "two", 6, *extra), 2)
    one, two = tmp_path / "one", tmp_path / "two"
    # Logged losses are the global-batch means on both, step by step.
    assert [m["step"] for m in _metrics(two)] == list(range(1, 7))
    _assert_same(one, two)
    # Only process 0 wrote: one summary, one checkpoint, and it knows the world size.
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 6
    assert len(os.listdir(two / "checkpoints")) == 1
    # The comparison can fail: the same init with another data order is far off.
    _train(_args(synth, tmp_path, "other", 6, "--serial-batches", *extra), 1)
    assert _loss_drift(one, tmp_path / "other") > 10 * LOSS_RTOL


@pytest.mark.parametrize("preset, extra", [
    ("cut", []),
    ("cut", ["--nce-includes-all-negatives-from-minibatch"]),
    ("pix2pix", ["--netG", "resnet_6blocks", "--norm", "instance"]),
    ("cyclegan128", ["--use-dropout"]),
], ids=["cut", "cut-batch-negatives", "pix2pix", "cyclegan-dropout"])
def test_two_processes_equal_one_for_the_other_recipes(tmp_path, preset, extra):
    """The same rule for CUT (its PatchNCE draws the patches of the global batch) and pix2pix
    (paired data; instance norm -- a BatchNorm pix2pix normalises per process, as the official
    DataParallel does), and for dropout (pix2pix's default): every process is seeded alike, so each
    drew the same masks for its own images (2.8 % weight drift from one process after 4 steps);
    the masks are drawn for the global batch now, also where a generator runs [A; B] at once.
    CUT's negatives from the minibatch are the global batch's (they were the process's own: the
    first step's NCE was 6.86 on 2 processes, 7.76 on one)."""
    root = str(tmp_path / "data")  # the recipe's built-in data (pix2pix: pairs), generated by the first run
    _train(_args(root, tmp_path, "one", 4, *extra, preset=preset), 1)
    _train(_args(root, tmp_path, "two", 4, *extra, preset=preset), 2)
    assert [m["step"] for m in _metrics(tmp_path / "two")] == [1, 2, 3, 4]
    _assert_same(tmp_path / "one", tmp_path / "two")


def test_compiled_networks_are_split_at_the_ddp_buckets(synth, tmp_path, monkeypatch):
    """Under DDP each trained network is compiled where its DDP wrapper calls it, so Dynamo's
    DDPOptimizer splits its graph at DDP's gradient buckets: one compiled backward per bucket, and a
    bucket's all-reduce can run while the backward of the layers before it does. One unsplit graph
    would be one backward node, every all-reduce after it. At ngf 16 a generator is two buckets."""
    import re

    monkeypatch.setenv("TORCH_LOGS", "torch._dynamo.backends.distributed")
    r = _train(_args(synth, tmp_path, "split", 1, "--ngf", "16", "--compile", "--compile-backend", "aot_eager"), 2)
    buckets = [int(n) for n in re.findall(r"\[rank0\].*DDPOptimizer used bucket cap \d+ and created (\d+) buckets",
                                          r.stderr)]
    assert buckets and max(buckets) >= 2, r.stderr[-3000:]


@pytest.mark.parametrize("groups", [1, 2])
def test_each_process_keeps_its_rows_of_the_global_dropout_mask(groups):
    """keep_mask under a batch shard: process r of 4 (2 images each) gets exactly the rows of its
    images in the mask one process draws for the global batch of 8 -- also when a call's rows
    are [A; B] (groups 2: rows r*2.. of each block)."""
    import torch

    from fastcgan.nn import GlobalBatchDropout, set_batch_shard
    from fastcgan.nn.layers import keep_mask

    world, b, shape = 4, 2, (5, 3, 3)
    torch.manual_seed(0)
    one = keep_mask((groups * b * world, *shape), 0.5, torch.float32, "cpu").view(groups, b * world, *shape)
    for rank in range(world):
        torch.manual_seed(0)
        mine = keep_mask((groups * b, *shape), 0.5, torch.float32, "cpu", (rank, world, b))
        assert torch.equal(mine.view(groups, b, *shape), one[:, rank * b:(rank + 1) * b])
    drop = set_batch_shard(torch.nn.Sequential(GlobalBatchDropout(0.5)), (3, world, b))[0]
    torch.manual_seed(0)
    y = drop(torch.ones(groups * b, *shape))
    assert torch.equal(y.view(groups, b, *shape), 2 * one[:, 3 * b:])  # kept units scaled by 1 / (1 - p)
    assert torch.equal(drop.eval()(torch.ones(2, 1)), torch.ones(2, 1))  # evaluation: the identity


def test_gradients_are_views_into_the_ddp_buckets(tmp_path):
    """DDP all-reduces each bucket of gradients in a flat buffer of its own. With the gradients as
    views into those buffers a step holds one copy of them (what the memory floor counts), not two;
    the views survive the step's ``zero_grad(set_to_none=True)``: the next backward's gradient is
    copied in and ``.grad`` is the view again. Autograd alone gives each parameter a storage of its
    own, so parameters sharing a gradient storage can only be sharing a bucket."""
    import torch
    import torch.distributed as dist

    from fastcgan.models import ResnetGenerator
    from fastcgan.train.distributed import DistContext, wrap_ddp

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        net = ResnetGenerator(3, 3, ngf=4, n_blocks=2)
        ddp = wrap_ddp({"G": net}, DistContext(), torch.device("cpu"))["G"]
        params = list(net.parameters())
        for _ in range(2):
            net.zero_grad(set_to_none=True)
            ddp(torch.randn(2, 3, 16, 16)).square().mean().backward()
            storages = {p.grad.untyped_storage().data_ptr() for p in params}
            assert len(storages) <= 2 < len(params)  # a tiny net: DDP's small first bucket and one more at most
            held = sum(s.nbytes() for s in {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage()
                                            for p in params}.values())
            assert held == sum(p.numel() * p.element_size() for p in params)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_across_world_sizes(synth, tmp_path, first, second):
    """Train 3 steps on ``first`` processes, resume to step 6 on ``second``: the same weights as an
    uninterrupted single-process run of 6 steps."""
    _train(_args(synth, tmp_path, "ref", 6), 1)
    _train(_args(synth, tmp_path, "split", 3), first)
    _train(_args(synth, tmp_path, "split", 6, "--resume"), second)
    _assert_same(tmp_path / "ref", tmp_path / "split")
    steps = [m["step"] for m in _metrics(tmp_path / "split")]
    assert steps == list(range(1, 7))


def test_batch_must_divide_among_processes(synth, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    args = _args(synth, tmp_path, "odd", 2)
    args[args.index("--batch-size") + 1] = "3"
    cmd = _torchrun(2, args)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "--batch-size" in r.stderr and "multiple of the number of processes (2)" in r.stderr
    assert not (tmp_path / "odd" / "checkpoints").exists()


@pytest.mark.parametrize("world, rank, message", [("2", None, "RANK is not set"), ("abc", None, "not a process count"),
                                                  ("0", None, "not a process count"), ("2", "0", "MASTER_ADDR")])
def test_stray_world_size_is_a_clear_error(synth, tmp_path, world, rank, message):
    """WORLD_SIZE left in a shell's environment without torchrun (no RANK, or RANK but no
    MASTER_ADDR), or not a count: exit 2 naming it, before anything is written (was a KeyError /
    ValueError traceback)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "WORLD_SIZE": world}
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    if rank is not None:
        env["RANK"] = rank
    r = subprocess.run([sys.executable, "-m", "fastcgan.train", *_args(synth, tmp_path, "stray", 1)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "WORLD_SIZE" in r.stderr and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "stray").exists()


def test_fid_evaluation_under_ddp_finishes(synth, tmp_path):
    """Only process 0 evaluates: torchmetrics, which all-gathers its states in compute() whenever
    a process group exists, waited there for processes that never came (the run hung at its first
    evaluation, a default on a GPU with the metrics extra installed)."""
    from fastcgan.metrics import metrics_available

    if not metrics_available():
        pytest.skip("metrics extra not installed")
    _train(_args(synth, tmp_path, "fid", 2, "--eval-every", "2", "--eval-max-images", "2"), 2, timeout=300)
    evals = [m for m in _metrics(tmp_path / "fid") if "eval" in m]
    assert [m["step"] for m in evals] == [2] and {"fid_AtoB", "fid_BtoA"} <= set(evals[0]["eval"]), evals


def test_batchnorm_under_ddp_says_it_normalises_per_process(synth, tmp_path):
    """BatchNorm normalises each process's share of the batch (as the official DataParallel does
    per GPU), so such a run is not the one-process run: the start says so (InstanceNorm runs,
    which are, do not)."""
    r = _train(_args(synth, tmp_path, "bn", 1, "--norm", "batch"), 2)
    assert "BatchNorm normalises each process's 1 image(s), not the global batch of 2" in r.stdout + r.stderr
    r = _train(_args(synth, tmp_path, "in", 1), 2)
    assert "BatchNorm" not in r.stdout + r.stderr


def test_processes_that_list_different_files_are_refused(synth, tmp_path):
    """Each process draws its slice of the global batch from its own file listing: one that lists
    a file fewer (a file removed while the processes started, per-node copies that differ) is a
    DatasetError on every process, before training (it trained silently on mixed orders)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import fastcgan.data.datasets as d\n"
        "    _list = d._list_domain\n"
        "    d._list_domain = lambda *a, **k: _list(*a, **k)[:-1]\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    cmd = _torchrun(2, _args(synth, tmp_path, "drift", 2))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    import re

    m = re.search(r"the processes list different training files \(process 0: ([\d,]+) A \+ ([\d,]+) B; "
                  r"process 1: ([\d,]+) A \+ ([\d,]+) B", r.stderr)
    assert m, r.stderr[-3000:]
    a0, b0, a1, b1 = (int(g.replace(",", "")) for g in m.groups())
    assert (a1, b1) == (a0 - 1, b0 - 1)
    assert not (tmp_path / "drift" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_stops_every_process_after_the_same_step_with_a_checkpoint(synth, tmp_path):
    """SIGTERM to torchrun (a scheduler's preemption) reaches both processes; they agree on the
    step to stop after, process 0 writes that step's checkpoint, and --resume continues it."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    args = _args(synth, tmp_path, "pre", 100000)
    cmd = _torchrun(2, args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-4000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    ckpts = sorted(os.listdir(tmp_path / "pre" / "checkpoints"))
    assert len(ckpts) == 1, err[-4000:]
    stopped_at = int(ckpts[0][len("step_") : -len(".ckpt")])
    assert stopped_at >= 3
    assert json.loads((tmp_path / "pre" / "summary.json").read_text())["interrupted"] == "SIGTERM"
    # Resume on one process for two more steps.
    _train(_args(synth, tmp_path, "pre", stopped_at + 2, "--resume"), 1)
    assert [m["step"] for m in _metrics(tmp_path / "pre")][-1] == stopped_at + 2
