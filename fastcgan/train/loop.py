"""The training loop: data -> :func:`train_step` -> logs, samples, checkpoints.

    summary = train(TrainConfig.from_preset("cyclegan", dataroot="datasets/horse2zebra"))

Run directory (``output_dir/name``)::

    config.json                      the full config (also inside every checkpoint)
    checkpoints/step_<step>.ckpt     complete training state, the newest ``keep_last`` kept
    generator_AtoB.safetensors       self-describing generators for fastcgan-translate / -export
    generator_BtoA.safetensors
    metrics.jsonl                    one JSON line per log_every steps
    samples/step_<step>.png          rows: real A | fake B | rec A, then real B | fake A | rec B
    tb/                              TensorBoard scalars and sample grids
    summary.json                     wall time, images/s, skipped images, final losses

Host synchronisation happens only every ``log_every`` steps (one read of all accumulated losses),
at samples and at checkpoints. A SIGINT (Ctrl-C) or SIGTERM sets a flag: the current step finishes,
a checkpoint is written and :func:`train` returns with ``exit_code`` 130 (SIGINT) or 143 (SIGTERM),
the shell convention 128 + signal number, so a job scheduler sees that the run did not finish; a
second Ctrl-C aborts at once without saving.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from fastcgan.data import DatasetError, UnalignedDataset, augment_batch, collate, preload_to_device
from fastcgan.data.datasets import SkippedImageWarning
from fastcgan.train.checkpoint import (
    CheckpointError,
    atomic_write,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_state,
    run_dir_of,
    save_checkpoint,
)
from fastcgan.train.config import TRAINING_FIELDS, ConfigError, TrainConfig
from fastcgan.train.logging import RunLogger
from fastcgan.devices import resolve_device
from fastcgan.train.state import TrainState, build_state, cpu_has_fast_bf16
from fastcgan.train.cuda_graphs import make_step_fn, use_cuda_graphs
from fastcgan.train.distributed import from_environment, wrap_ddp
from fastcgan.train.step import loss_names

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the losses became non-finite)."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def synthetic_root(cfg: TrainConfig) -> str:
    return cfg.data.dataroot or os.path.join(cfg.run.output_dir, f"synthetic_{cfg.data.load_size}")


def prepare_dataroot(cfg: TrainConfig) -> str:
    """The dataset folder; for ``dataset="synthetic"`` generated (once) at ``load_size``."""
    if cfg.data.dataset == "synthetic":
        from fastcgan.data import ensure_synthetic_dataset

        return ensure_synthetic_dataset(
            synthetic_root(cfg),
            size=cfg.data.load_size,
            n_train=cfg.data.synthetic_train,
            n_test=cfg.data.synthetic_test,
        )
    root = cfg.data.dataroot
    if not os.path.isdir(root):
        raise DatasetError(f"--dataroot {root}: no such directory")
    return root


def build_dataset(cfg: TrainConfig, root: str, phase: str = "train") -> UnalignedDataset:
    """The training set; raises :class:`DatasetError` naming the folder for a bad layout."""
    d, m = cfg.data, cfg.model
    return UnalignedDataset(
        root,
        phase,
        preprocess=d.preprocess,
        load_size=d.load_size,
        crop_size=d.crop_size,
        flip=d.flip,
        input_nc=m.input_nc,
        output_nc=m.output_nc,
        serial_batches=d.serial_batches,
        seed=cfg.run.seed,
    )


class EpochSampler(Sampler):
    """Indices of one epoch from position ``start`` on: a permutation fixed by (seed, epoch), so a
    resumed run continues mid-epoch with exactly the batches the uninterrupted run would see.

    Distributed (``world > 1``): the epoch is cut into global batches of ``global_batch`` and
    process ``rank`` gets its ``global_batch / world`` consecutive items of each (an incomplete
    last global batch is dropped), i.e. one process's order split across processes."""

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: int,
        start: int,
        shuffle: bool,
        rank: int = 0,
        world: int = 1,
        global_batch: int = 1,
    ):
        self.n, self.seed, self.epoch, self.start, self.shuffle = n, seed, epoch, start, shuffle
        self.rank, self.world, self.global_batch = rank, world, global_batch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) & 0x7FFF_FFFF_FFFF)
        return torch.randperm(self.n, generator=g)

    def _indices(self) -> torch.Tensor:
        idx = self._order()[self.start :]
        if self.world == 1:
            return idx
        gb, b = self.global_batch, self.global_batch // self.world
        full = (idx.numel() // gb) * gb
        return idx[:full].view(-1, gb)[:, self.rank * b : (self.rank + 1) * b].reshape(-1)

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return self._indices().numel()


def _worker_init(_):
    # Ctrl-C reaches the whole process group: only the main process handles it (it finishes the
    # step and checkpoints); a worker dying on it would abort the loader mid-batch instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _center(img, size: int) -> torch.Tensor:
    from PIL import Image

    from fastcgan.data.images import pil_to_tensor

    w, h = img.size
    if w < size or h < size:
        img = img.resize((max(w, size), max(h, size)), Image.BICUBIC)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return pil_to_tensor(img.crop((left, top, left + size, top + size)))


def sample_images(cfg: TrainConfig, root: str) -> dict[str, torch.Tensor]:
    """Fixed uint8 images for the sample grids: the first ``n_samples`` of each domain of the test
    split when there is one, else of the training split; center crops of ``crop_size``."""
    phase = "test" if all(os.path.isdir(os.path.join(root, "test" + s)) for s in "AB") else "train"
    try:
        ds = build_dataset(cfg, root, phase)
    except DatasetError:
        ds = build_dataset(cfg, root, "train")
    out = {}
    for dom, size in (("A", ds.A_size), ("B", ds.B_size)):
        imgs = [
            _center(ds.load_resized(dom, i)[0], cfg.data.crop_size)
            for i in range(min(cfg.run.n_samples, size))
        ]
        out[dom] = torch.stack(imgs)
    return out


@torch.no_grad()
def sample_grid(state: TrainState, images: dict[str, torch.Tensor]) -> torch.Tensor:
    """[0, 1] grid with one row per image: real A | fake B | rec A, then real B | fake A | rec B.

    Generators run in eval mode through ``forward`` (eager even when compiled) and are put back
    in train mode: sampling draws no random numbers and changes no buffers, so it never changes
    what is trained."""
    from torchvision.utils import make_grid

    from fastcgan.data import to_model_range

    def run(net, x):
        net.eval()
        try:
            with state.autocast():
                return net.forward(x).float()
        finally:
            net.train()

    rows = []
    for src, g1, g2 in (("A", state.G_AB, state.G_BA), ("B", state.G_BA, state.G_AB)):
        real = to_model_range(images[src].to(state.device))
        fake = run(g1, real)
        rec = run(g2, fake)
        for r, f, c in zip(real, fake, rec):
            rows.extend(t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in (r, f, c))
    grid = make_grid(torch.stack(rows), nrow=3, padding=2, pad_value=1.0)
    return ((grid + 1) / 2).clamp(0, 1).cpu()


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------
class StopFlag:
    """SIGINT/SIGTERM -> finish the step, checkpoint, exit. Installed only in the main thread."""

    def __init__(self, say=None):
        self.signum: Optional[int] = None
        self._old: dict = {}
        self._say = say or (lambda m: print(m, file=sys.stderr))

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now, no checkpoint
        self.signum = signum
        self._say(
            f"\nfastcgan: received {signal.Signals(signum).name}: finishing the current step and "
            "saving a checkpoint (Ctrl-C again aborts without saving)"
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
def config_for_resume(ckpt_cfg: TrainConfig, cfg: TrainConfig, run_dir: str) -> TrainConfig:
    """The checkpoint's training fields with ``cfg``'s run-control fields (device, amp, compile,
    cadences, max_steps, data location and workers) and the checkpoint's run directory."""
    keep = {k: v for k, v in cfg.flat().items() if k not in TRAINING_FIELDS}
    keep.update(
        name=os.path.basename(os.path.abspath(run_dir)), output_dir=os.path.dirname(os.path.abspath(run_dir))
    )
    return ckpt_cfg.replace(**keep)


def training_field_conflicts(ckpt_cfg: TrainConfig, overrides: dict) -> list[str]:
    a = ckpt_cfg.flat()
    return [
        f"{k}={overrides[k]!r} (checkpoint: {a[k]!r})"
        for k in overrides
        if k in TRAINING_FIELDS and overrides[k] != a[k]
    ]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def check_kernels(kernels: str, device: torch.device) -> None:
    """An explicit ``--kernels`` that cannot run here fails before anything is written."""
    if kernels == "auto":
        return
    from fastcgan.ops import available_backends

    st = available_backends()[kernels]
    if not st.available or device.type not in st.devices:
        why = st.reason if not st.available else f"it runs on {', '.join(st.devices)}, not {device.type}"
        raise ConfigError(
            f"kernels (--kernels) {kernels!r} cannot run on {device}: {why}; use --kernels auto"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    cfg: TrainConfig, *, install_signal_handlers: bool = True, requested: Optional[dict] = None
) -> dict:
    """Train according to ``cfg``; returns the run summary (also written to RUN/summary.json).

    With ``cfg.run.resume`` ("auto", a run directory or a checkpoint file) the run continues from
    the checkpoint, whose config decides what is trained (``cfg`` may change only how it runs).
    ``requested``: flat fields the user set explicitly (the CLI's flags); on resume, one that
    would change what is trained is a :class:`ConfigError` before anything runs."""
    run_dir = cfg.run_dir
    payload, ckpt_path = None, None
    if cfg.run.resume:
        ckpt_path = resolve_resume(cfg.run.resume, run_dir)
        if ckpt_path is not None:
            payload = load_checkpoint(ckpt_path)  # verified before anything is touched
            if cfg.run.resume != "auto":
                run_dir = run_dir_of(ckpt_path)
            try:
                ckpt_cfg = TrainConfig.from_dict(payload["config"])
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"checkpoint {ckpt_path}: stored config is invalid: {e}") from e
            conflicts = training_field_conflicts(ckpt_cfg, requested or {})
            if conflicts:
                raise ConfigError(
                    f"--resume {ckpt_path}: these settings differ from the checkpoint's and cannot change "
                    f"when resuming: {'; '.join(conflicts)}"
                )
            cfg = config_for_resume(ckpt_cfg, cfg, run_dir)
    elif latest_checkpoint(run_dir) is not None:
        raise CheckpointError(
            f"run directory {run_dir} already has checkpoints; pass --resume to continue it "
            "or choose another --name / --output-dir"
        )

    ctx, dist_device = from_environment(cfg.run.device)
    try:
        return _train(cfg, ctx, dist_device, run_dir, payload, ckpt_path, install_signal_handlers)
    finally:
        ctx.shutdown()


def _train(cfg, ctx, dist_device, run_dir, payload, ckpt_path, install_signal_handlers) -> dict:
    """The run itself, inside the process group (``ctx``) that :func:`train` joins and leaves."""
    main = ctx.is_main
    device = dist_device if dist_device is not None else resolve_device(cfg.run.device)
    if cfg.data.batch_size % ctx.world_size:
        raise ConfigError(
            f"batch_size (--batch-size) {cfg.data.batch_size} is the global batch and must be a "
            f"multiple of the number of processes ({ctx.world_size})"
        )
    check_kernels(cfg.run.kernels, device)
    use_cuda_graphs(cfg, device, ctx.world_size)  # an impossible --cuda-graphs fails here
    # Process 0 first: it may generate the synthetic dataset, which the others then just read.
    root = prepare_dataroot(cfg) if main else None
    ctx.barrier()
    root = root or prepare_dataroot(cfg)
    ds = build_dataset(cfg, root)  # bad layout / empty domain: DatasetError before any training
    bank = None
    if cfg.data.data_on_gpu:
        bank = preload_to_device(ds, device)
    bs = cfg.data.batch_size  # global batch; this process trains bs / world_size of it
    shard = (ctx.rank, ctx.world_size)
    workers = cfg.data.num_workers
    if workers is None:
        workers = 0 if device.type == "cpu" else min(4, max(0, (os.cpu_count() or 1) - 1))
    n_items = len(bank) if bank is not None else len(ds)
    steps_per_epoch = n_items // bs
    if steps_per_epoch == 0:
        raise DatasetError(f"{root}: {n_items} training items is fewer than --batch-size {bs}")
    schedule_steps = (cfg.optim.epochs + cfg.optim.epochs_decay) * steps_per_epoch
    total = schedule_steps if cfg.run.max_steps is None else min(cfg.run.max_steps, schedule_steps)
    aug_kw = bank.batch_augment if bank is not None else ds.batch_augment
    data_generators = {"bank": bank.generator} if bank is not None else {}

    if payload is not None:
        state = restore_state(payload, cfg, device, data_generators, path=ckpt_path)
    else:
        _seed_everything(cfg.run.seed)
        state = build_state(cfg, device)
    if ctx.enabled:
        wrap_ddp(state, ctx)

    # From here on the run directory is written (by process 0 only).
    if main:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write(os.path.join(run_dir, "config.json"), [json.dumps(cfg.to_dict(), indent=2).encode()])
    logger = RunLogger(
        run_dir,
        total,
        state.step,
        bs,
        tensorboard=cfg.run.tensorboard,
        progress=cfg.run.progress,
        enabled=main,
    )
    step_fn = make_step_fn(state, cfg, ctx.world_size)
    if cfg.run.amp and device.type == "cpu" and not cpu_has_fast_bf16():
        logger.message(
            "fastcgan: warning: --amp on this CPU (no AVX512-BF16/AMX) runs bf16 in emulation, "
            "several times slower than fp32; drop --amp for CPU training here"
        )
    if payload is not None:
        logger.message(f"fastcgan: resumed {ckpt_path} at step {state.step} (epoch {state.epoch})")
    elif cfg.run.resume == "auto":
        logger.message(f"fastcgan: nothing to resume in {run_dir}; starting a new run")
    samples = sample_images(cfg, root) if main else None
    names = loss_names(cfg)
    start_step, t0 = state.step, time.perf_counter()
    acc, n_acc = None, 0
    last_losses: dict[str, float] = {}
    last_ckpt: Optional[str] = None
    skipped_seen = len(ds.skipped)

    def save() -> Optional[str]:
        nonlocal last_ckpt
        if not main:
            return None
        extra = {"skipped": list(ds.skipped)}
        last_ckpt = save_checkpoint(state, cfg, run_dir, data_generators, extra)
        from fastcgan.models import save_generator

        save_generator(state.G_AB, os.path.join(run_dir, "generator_AtoB.safetensors"))
        save_generator(state.G_BA, os.path.join(run_dir, "generator_BtoA.safetensors"))
        return last_ckpt

    def epoch_batches() -> Iterator[dict]:
        if bank is not None:
            for _ in range(state.batch_in_epoch, steps_per_epoch):
                yield bank.sample_batch(bs, state.step, shard=shard)
            return
        ds.set_epoch(state.epoch)
        sampler = EpochSampler(
            len(ds),
            cfg.run.seed,
            state.epoch,
            state.batch_in_epoch * bs,
            shuffle=not cfg.data.serial_batches,
            rank=ctx.rank,
            world=ctx.world_size,
            global_batch=bs,
        )
        loader = DataLoader(
            ds,
            batch_size=bs // ctx.world_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            drop_last=True,
            # Its own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run (one more iterator) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.run.seed),
            worker_init_fn=_worker_init if workers > 0 else None,
            persistent_workers=False,
        )
        for batch in loader:
            ds.record_skipped(batch)
            yield batch

    def flush_log() -> None:
        nonlocal acc, n_acc, last_losses, skipped_seen, data_wait
        if acc is None:
            return
        # The one device->host read per log_every steps (under DDP: the mean over processes, so
        # every process sees the same numbers and a non-finite loss stops all of them).
        vals = ctx.mean(acc / n_acc).tolist()
        acc, n_acc = None, 0
        last_losses = dict(zip(names, vals))
        bad = [k for k, v in last_losses.items() if not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"losses became non-finite at step {state.step}: {', '.join(bad)} "
                f"(last checkpoint: {last_ckpt or 'none'}); try a lower --lr or another --gan-mode"
            )
        logger.log(state.step, state.epoch, last_losses, state.lr(), data_wait=data_wait)
        data_wait = 0.0
        if len(ds.skipped) > skipped_seen:
            logger.message(
                f"fastcgan: skipped {len(ds.skipped) - skipped_seen} unreadable image(s): "
                + ", ".join(ds.skipped[skipped_seen:][:5])
            )
            skipped_seen = len(ds.skipped)

    data_wait = 0.0  # seconds the loop waited for data since the last log line
    stop = StopFlag(logger.message)
    signals = stop if install_signal_handlers else _Null()
    cl = cfg.run.channels_last
    try:
        with signals, warnings.catch_warnings():
            # Skipped files are counted and reported by the logger (and in the summary).
            warnings.simplefilter("ignore", SkippedImageWarning)
            stopping = False
            while state.step < total and not stopping:
                batches = epoch_batches()
                while True:
                    t_wait = time.perf_counter()
                    batch = next(batches, None)
                    data_wait += time.perf_counter() - t_wait
                    if batch is None:
                        break
                    real_A, real_B = (
                        augment_batch(
                            batch[d].to(device, non_blocking=True),
                            generator=state.aug_generator,
                            channels_last=cl,
                            shard=shard,
                            **aug_kw,
                        )
                        for d in "AB"
                    )
                    losses = step_fn({"A": real_A, "B": real_B})
                    vec = torch.stack([losses[k] for k in names])
                    acc = vec if acc is None else acc + vec
                    n_acc += 1
                    state.step += 1
                    state.batch_in_epoch += 1
                    if state.batch_in_epoch >= steps_per_epoch:
                        state.epoch += 1
                        state.batch_in_epoch = 0
                        state.sched_G.step()
                        state.sched_D.step()
                    logger.advance()
                    s = state.step
                    if s % cfg.run.log_every == 0 or s == total:
                        flush_log()
                    if main and (s % cfg.run.sample_every == 0 or s == total):
                        logger.sample(s, sample_grid(state, samples))
                    if s % cfg.run.checkpoint_every == 0 or s == total:
                        save()
                    # Every process stops after the same step (any of them may get the signal).
                    stopping = ctx.any_stop(stop.signum is not None)
                    if stopping and stop.signum is None:
                        stop.signum = signal.SIGTERM
                    if stopping or s >= total:
                        break
            flush_log()
            if main and (last_ckpt is None or not last_ckpt.endswith(f"step_{state.step:09d}.ckpt")):
                save()
    finally:
        logger.close()

    wall = time.perf_counter() - t0
    steps = state.step - start_step
    summary = {
        "run_dir": run_dir,
        "start_step": start_step,
        "step": state.step,
        "epoch": state.epoch,
        "steps": steps,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(steps * bs / wall, 3) if wall > 0 else None,
        "world_size": ctx.world_size,
        "rank": ctx.rank,
        "skipped_images": len(ds.skipped),
        "skipped": list(ds.skipped),
        "final_losses": last_losses,
        "checkpoint": last_ckpt,
        "interrupted": signal.Signals(stop.signum).name if stop.signum is not None else None,
        "exit_code": EXIT_CODES.get(stop.signum, 0) if stop.signum is not None else 0,
        "device": str(device),
    }
    if not main:
        return summary
    if cfg.data.dataset == "synthetic" and stop.signum is None:
        from fastcgan.evaluate import evaluate_generators

        summary["eval"] = evaluate_generators(
            state.G_AB, state.G_BA, root, phase="test", device=device, amp_dtype=state.amp_dtype
        )
    atomic_write(os.path.join(run_dir, "summary.json"), [json.dumps(summary, indent=2).encode()])
    return summary


class _Null:
    signum = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = [
    "EXIT_CODES",
    "EpochSampler",
    "StopFlag",
    "TrainingError",
    "build_dataset",
    "config_for_resume",
    "prepare_dataroot",
    "sample_grid",
    "sample_images",
    "train",
    "training_field_conflicts",
]
