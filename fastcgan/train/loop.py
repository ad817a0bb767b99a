"""The training loop: data -> step -> logs, samples, checkpoints. Any recipe, one loop.

    summary = train(TrainConfig.from_preset("cyclegan", dataroot="datasets/horse2zebra"))

Run directory (``output_dir/name``)::

    .lock                            held by the running trainer (one trainer per run)
    config.json                      the full, resolved config (also inside every checkpoint)
    checkpoints/step_<step>.ckpt     complete verified training state, the newest ``keep_last`` kept
    generator_<AtoB|BtoA>.safetensors  the recipe's deployable generators (fastcgan-translate/-export)
    metrics.jsonl                    one JSON line per log_every steps
    samples/step_<step>.png          the recipe's sample grid
    tb/                              TensorBoard scalars and sample grids
    summary.json                     wall time, images/s, skipped images, final losses

Host synchronisation happens only every ``log_every`` steps (one read of all accumulated losses),
at samples and at checkpoints. A SIGINT (Ctrl-C) or SIGTERM finishes the step, writes a
checkpoint and returns ``exit_code`` 130 / 143; a second Ctrl-C aborts at once without saving.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import signal
import time
import warnings
from typing import Optional

import numpy as np
import torch

from fastcgan.data.aligned import AlignedDataset
from fastcgan.data.datasets import DatasetError, SkippedImageWarning
from fastcgan.devices import is_out_of_memory, resolve_device
from fastcgan.fileio import atomic_write
from fastcgan.recipes import get_recipe
from fastcgan.train.checkpoint import (
    checkpoint_dir,
    checkpoint_path,
    list_checkpoints,
    restore_state,
    resume_plan,
    save_checkpoint,
)
from fastcgan.train.config import ConfigError, TrainConfig, min_discriminator_side, pairs_direction, unused_flags
from fastcgan.train.cuda_graphs import use_cuda_graphs
from fastcgan.train.data import (build_batches, build_dataset, data_fingerprint, dataset_nbytes, prepare_dataroot,
                                 sample_images, synthetic_root)
from fastcgan.train.distributed import from_environment
from fastcgan.train.execution import (build_step, cudnn_autotuning, describe, resolve_fast_path,
                                       unused_execution_flags)
from fastcgan.train.logging import LossAccumulator, RunLogger, sample_grid
from fastcgan.train.memory import check_step_fits, smaller_run_flags
from fastcgan.train.runlock import RunLock, check_run_dir
from fastcgan.train.signals import EXIT_CODES, StopFlag
from fastcgan.train.state import build_state, cpu_has_fast_bf16, initial_weights

__all__ = ["TrainingError", "check_kernels", "train"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the losses became non-finite)."""


def check_kernels(kernels: str, device: torch.device) -> None:
    """An explicit ``--kernels`` that cannot run here fails before anything is written."""
    if kernels == "auto":
        return
    from fastcgan.ops import available_backends

    st = available_backends()[kernels]
    if not st.available or device.type not in st.devices:
        why = st.reason if not st.available else f"it runs on {', '.join(st.devices)}, not {device.type}"
        raise ConfigError(f"kernels (--kernels) {kernels!r} cannot run on {device}: {why}; use --kernels auto")


def check_image_size(cfg: TrainConfig, size: Optional[tuple[int, int]]) -> None:
    """The one image size of a non-cropping ``--preprocess`` against the networks (the cropping
    modes check ``--crop-size`` in the config)."""
    from fastcgan.models import generator_size_multiple

    if size is None:
        return
    w, h = size
    m = generator_size_multiple(cfg.model.netG)
    if w % m or h % m:
        raise ConfigError(f"preprocess (--preprocess) {cfg.data.preprocess}: the images come out {w}x{h}, but netG "
                          f"{cfg.model.netG} needs multiples of {m}; use a cropping --preprocess")
    if min(w, h) < min_discriminator_side(cfg.model):
        raise ConfigError(f"preprocess (--preprocess) {cfg.data.preprocess}: the images come out {w}x{h}, smaller "
                          f"than netD {cfg.model.netD} needs ({min_discriminator_side(cfg.model)}²)")


def _device(spec: str) -> torch.device:
    try:
        return resolve_device(spec)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device (--device) {spec}: {e}") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, *, install_signal_handlers: bool = True, requested: Optional[dict] = None) -> dict:
    """Train according to ``cfg``; returns the run summary (also written to RUN/summary.json).

    With ``cfg.run.resume`` ("auto", a run directory or a checkpoint file) the run continues from
    the newest checkpoint that verifies, whose config decides what is trained (``cfg`` may change
    how it runs, and the LR schedule). ``requested``: flat fields the user set explicitly (the
    CLI's flags); on resume, one that would change what is trained (other than ``epochs`` /
    ``epochs_decay`` / ``lr``) is a :class:`ConfigError`. Every config, data
    and checkpoint error is raised before anything is written."""
    cfg, run_dir, payload, ckpt_path, messages = resume_plan(cfg, requested)
    _refuse_unused(unused_flags(cfg, requested or {}))  # on the config that trains (a resumed run's: its checkpoint's)
    # --init-generator / --init-official: read and checked now (a config error before anything is
    # written); a resumed run has its weights from the checkpoint.
    init = initial_weights(cfg, get_recipe(cfg.model.recipe)) if payload is None else {}
    synthetic = cfg.data.dataset == "synthetic"
    data_root = synthetic_root(cfg, get_recipe(cfg.model.recipe)) if synthetic else cfg.data.dataroot
    check_run_dir(run_dir, data_root, has_checkpoints=bool(list_checkpoints(run_dir)))
    ctx, dist_device = from_environment(cfg.run.device)
    cleanup = contextlib.ExitStack()
    try:
        device = dist_device if dist_device is not None else _device(cfg.run.device)
        if cfg.data.batch_size % ctx.world_size:
            raise ConfigError(
                f"batch_size (--batch-size) {cfg.data.batch_size} is the global batch and must be a "
                f"multiple of the number of processes ({ctx.world_size})"
            )
        check_kernels(cfg.run.kernels, device)
        if cfg.run.faithful:  # its conflicts are config errors: before anything is written
            resolve_fast_path(cfg, device, ctx.world_size)
        if cfg.data.max_image_pixels is not None:  # before any image is opened (workers inherit it)
            from fastcgan.data import get_max_image_pixels, set_max_image_pixels

            previous_limit = get_max_image_pixels()
            set_max_image_pixels(cfg.data.max_image_pixels)
            cleanup.callback(set_max_image_pixels, previous_limit)  # the process limit as it was
        eval_every = eval_cadence(cfg, get_recipe(cfg.model.recipe), ctx.is_main)  # before data is generated
        with RunLock(run_dir) if ctx.is_main else contextlib.nullcontext():
            recipe = get_recipe(cfg.model.recipe)
            if synthetic:  # its images' size is known: a step that cannot fit is refused before they are made
                _fit_step_and_bank(cfg.replace(data_on_gpu=False), "", functools.partial(
                    check_step_fits, recipe=recipe, device=device, size=_synthetic_step_size(cfg),
                    world_size=ctx.world_size), None, False, ctx, device)
            # Process 0 first: it may generate the synthetic dataset, which the others then read.
            root = prepare_dataroot(cfg, recipe) if ctx.is_main else None
            ctx.barrier()
            root = root or prepare_dataroot(cfg, recipe)
            ds = build_dataset(cfg, root, "train", recipe)  # bad layout: DatasetError before training
            _check_same_data_everywhere(ctx, ds)
            image_size = ds.check_one_size()  # headers only (--preprocess none / scale_width)
            check_image_size(cfg, image_size)
            ds.check_usable()  # decodes up to the first usable image per domain
            resumed_bank = None if payload is None else "bank" in (payload["rng"].get("data") or {})
            # An explicit --data-on-gpu reads every header when the images keep their sizes.
            nbytes = dataset_nbytes(cfg, ds, read_headers=bool(cfg.data.data_on_gpu))
            auto_bank = cfg.data.data_on_gpu is None
            cfg, fast_line = resolve_fast_path(cfg, device, ctx.world_size, nbytes, resumed_data_on_gpu=resumed_bank)
            _refuse_unused(unused_execution_flags(cfg, requested or {}, device))
            use_cuda_graphs(cfg, device, ctx.world_size)  # an impossible --cuda-graphs fails here
            w, h = image_size or (cfg.data.crop_size, cfg.data.crop_size)
            fits = functools.partial(check_step_fits, recipe=recipe, device=device, size=(h, w),
                                     world_size=ctx.world_size)
            cfg, fit_lines = _fit_step_and_bank(cfg, fast_line, fits, nbytes, auto_bank, ctx, device)
            cleanup.enter_context(cudnn_autotuning(cfg, device))
            run = None
            try:
                run = _Run(cfg, ctx, device, run_dir, root, ds, eval_every)
                return run.loop(payload, ckpt_path, install_signal_handlers, messages + fit_lines, init)
            except (MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e) or isinstance(e, TrainingError):
                    raise
                raise TrainingError(_out_of_memory_message(cfg, device, e, run and run.last_ckpt)) from None
    finally:
        cleanup.close()
        ctx.shutdown()


def _fit_step_and_bank(cfg: TrainConfig, fast_line: str, fits, nbytes: Optional[int], auto_bank: bool, ctx,
                       device) -> tuple[TrainConfig, list[str]]:
    """The step's memory floor and the data bank against the memory there is (``fits``: a
    :func:`check_step_fits` of this run), decided alike on every process (one gather): a floor that
    does not fit on any process refuses the run everywhere; a bank that auto turned on (a quarter of
    the free memory) stays on only if every process holds it and its step still fits (the bank and
    the loader draw different batches). Returns the config as it ends up and the lines to print
    (on process 0): the execution line, and the warning of each process whose step may not fit."""

    def verdict(c: TrainConfig, bank_bytes: int) -> tuple[Optional[str], Optional[str]]:
        """(why it cannot fit, or the warning that it may not)."""
        try:
            return None, fits(c, bank_bytes=bank_bytes)
        except ConfigError as e:
            return str(e), None

    keep = bool(cfg.data.data_on_gpu)
    with_bank, with_warning = verdict(cfg, nbytes or 0) if keep else (None, None)
    without, without_warning = verdict(cfg.replace(data_on_gpu=False), 0)
    # Every process reaches this; its verdicts and warnings both ways, so that process 0 can say them all.
    seen = ctx.gather_objects((keep, with_bank, without, with_warning, without_warning))
    for *_, words, _, _ in seen:
        if words:
            raise ConfigError(words)
    bank_kept = keep and all(k and not w for k, w, *_ in seen)
    if keep and not bank_kept:
        if not auto_bank:  # asked for: refused as the user asked it
            raise ConfigError(next(w for _, w, *_ in seen if w))
        why = "the step needs the memory" if with_bank else "another process has no room for them"
        cfg, fast_line = resolve_fast_path(cfg.replace(data_on_gpu=False), device, ctx.world_size)
        fast_line += f"; the images stay off the GPU ({why})"
    lines, said = [fast_line], set()
    for rank, (*_, warn_with, warn_without) in enumerate(seen):
        warning = warn_with if bank_kept else warn_without
        if warning and warning not in said:  # the same words from several processes: once
            said.add(warning)
            lines.append(warning if rank == 0 else warning.replace(": warning: ", f": warning: process {rank}: ", 1))
    return cfg, lines


def _synthetic_step_size(cfg: TrainConfig) -> tuple[int, int]:
    """(height, width) a step of the built-in data trains at: its square images are made at
    ``--load-size``, then cropped when ``--preprocess`` crops."""
    side = cfg.data.crop_size if "crop" in cfg.data.preprocess else cfg.data.load_size
    return side, side


def _refuse_unused(unused: list[str]) -> None:
    """Flags given explicitly that this run would not read: a :class:`ConfigError` naming them all."""
    if unused:
        raise ConfigError(f"this run would train exactly as without {'; '.join(unused)}: leave "
                          f"{'it' if len(unused) == 1 else 'them'} out")


def _out_of_memory_message(cfg: TrainConfig, device, e: BaseException, last_ckpt: Optional[str]) -> str:
    """What ran out of memory and what makes a run smaller (instead of the allocator's traceback)."""
    d = cfg.data
    why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return (f"out of memory on {device} training batch {d.batch_size} at --crop-size {d.crop_size} (--load-size "
            f"{d.load_size}) with --model {cfg.model.recipe} ({why}); make it smaller: "
            f"{', '.join(smaller_run_flags(cfg))} (last checkpoint: {last_ckpt or 'none'})")


def _check_same_data_everywhere(ctx, ds) -> None:
    """Every process must list the same training files: each draws its slice of the global batch
    from its own listing, so a file added or removed while the processes started (or per-node
    copies that differ) would silently train on batches that no one process's order holds."""
    if not ctx.enabled:
        return
    seen = ctx.gather_objects(data_fingerprint(ds))
    if len({digest for _, digest in seen}) > 1:
        listed = "; ".join(f"process {rank}: {words}" for rank, (words, _) in enumerate(seen))
        raise DatasetError(f"{ds.root}: the processes list different training files ({listed}, or the same "
                           "counts with other names): every process must see the same folder")


def run_outline(cfg: TrainConfig, nets: dict, ds, steps_per_epoch: int, total: int) -> str:
    """What is trained, on how much data, for how long, in one line (the official prints its
    networks' sizes and the image count when it starts)."""
    sizes = ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.3f} M" for n, m in nets.items())
    if isinstance(ds, AlignedDataset):
        data = f"{len(ds):,} training {'images' if ds.target_from_input else 'pairs'}"
    else:
        data = f"{ds.A_size:,} A + {ds.B_size:,} B training images"
    epochs = cfg.optim.epochs + cfg.optim.epochs_decay
    line = (f"fastcgan: {cfg.model.recipe}: {sizes} parameters; {data}, {steps_per_epoch:,} steps an epoch "
            f"(batch {cfg.data.batch_size}) x {epochs} epochs")
    line += f", stopping at step {total:,} (--max-steps)" if total < epochs * steps_per_epoch else ""
    o = cfg.optim
    if (o.lr_policy == "linear" and o.epochs_decay == 0 and total > (epochs - 1) * steps_per_epoch
            and get_recipe(cfg.model.recipe).lr_update_at_epoch_start):
        line += ("; note: the official linear rule runs the last epoch at learning rate 0 (--epochs-decay 0): "
                 "its weights do not change")
    return line


def eval_cadence(cfg: TrainConfig, recipe, is_main: bool = True) -> tuple[int, str]:
    """``--eval-every`` resolved: (steps between FID/KID evaluations on the test split, 0 for none;
    why none, for the start line). Auto: every checkpoint when the metrics extra is installed and
    the data has unpaired ``testA/ testB/`` folders; an explicit request that cannot run is a
    :class:`ConfigError`. Decided before any data is prepared (the built-in synthetic data of an
    unpaired recipe has the split; a paired recipe's has not), so a refusal writes nothing."""
    from fastcgan.metrics import metrics_status

    n = cfg.run.eval_every
    if n == 0 or not is_main:
        return 0, "--eval-every 0"
    synthetic = cfg.data.dataset == "synthetic"
    root = synthetic_root(cfg, recipe) if synthetic else cfg.data.dataroot
    if not synthetic and not os.path.isdir(root or ""):
        return n or 0, ""  # no data at all: prepare_dataroot says so, naming --dataroot
    if synthetic:
        has_split = recipe.synthetic is None  # the unpaired generator writes testA/ and testB/
    else:
        has_split = all(os.path.isdir(os.path.join(root, "test" + d)) for d in "AB")
    ok, why = metrics_status()
    if n is None:
        if ok and has_split:
            return cfg.run.checkpoint_every, ""
        return 0, f"{root} has no testA/ and testB/" if not has_split else why
    if not ok or not has_split:
        why = why if not ok else f"{root} has no testA/ and testB/ folders"
        if ok and recipe.dataset is not None:  # pix2pix / colorization: their own layout
            why += (f" (--model {cfg.model.recipe} trains on its own layout; score the run's test split after "
                    f"training: fastcgan-eval --checkpoint RUN --dataroot {root})")
        raise ConfigError(f"eval_every (--eval-every) {n}: FID/KID cannot run: {why}; use --eval-every 0")
    return n, ""


class _Run:
    """One run's pieces, built before the loop: data, state, step, logger."""

    def __init__(self, cfg, ctx, device, run_dir, root, ds, eval_every: tuple[int, str]):
        self.cfg, self.ctx, self.device, self.run_dir, self.root = cfg, ctx, device, run_dir, root
        self.recipe = get_recipe(cfg.model.recipe)
        self.ds = ds
        self.batches = build_batches(cfg, ds, device, shard=(ctx.rank, ctx.world_size))
        self.zoom = True  # training images at --load-size (then cropped); see data_for_epoch
        schedule = (cfg.optim.epochs + cfg.optim.epochs_decay) * len(self.batches)
        self.total = schedule if cfg.run.max_steps is None else min(cfg.run.max_steps, schedule)
        self.last_ckpt: Optional[str] = None
        self.logger = None
        self.eval_every, self.eval_off = eval_every
        self.evaluator = None  # built at the first evaluation (real-image features, once per run)
        self.eval_seconds, self.last_eval, self.best_fid = 0.0, {}, None

    def data_for_epoch(self, epoch: int) -> Optional[str]:
        """Before epoch ``epoch`` (0-based) starts: a recipe that stops zooming once its LR decays
        (the official CUT: images resized to --crop-size in the epochs past --epochs) gets its
        data rebuilt at the crop size, once, keeping the random streams where they are. Returns
        the message to log when it switches."""
        cfg = self.cfg
        d = cfg.data
        if not (self.recipe.no_zoom_when_decaying and self.zoom and epoch >= cfg.optim.epochs
                and d.load_size != d.crop_size and d.preprocess in ("resize_and_crop", "scale_width_and_crop")):
            return None
        self.zoom = False
        old = self.batches.generators
        fine = cfg.replace(load_size=d.crop_size)
        self.batches = None  # the load-size image bank goes before the crop-size one is decoded
        self.ds = build_dataset(fine, self.root, "train", self.recipe)
        self.batches = build_batches(fine, self.ds, self.device, shard=(self.ctx.rank, self.ctx.world_size))
        for name, g in self.batches.generators.items():
            g.set_state(old[name].get_state())
        return (f"fastcgan: from epoch {epoch + 1} (past --epochs {cfg.optim.epochs}) the training images are "
                f"resized to --crop-size {d.crop_size}, not cropped from --load-size {d.load_size}, as the official "
                f"{cfg.model.recipe.upper()} once its learning rate decays")

    def _cadence(self) -> str:
        """When the run shows something, in steps (a first sample can be many minutes away)."""
        r = self.cfg.run
        fid = f", FID/KID every {self.eval_every:,}" if self.eval_every else f" (FID/KID off: {self.eval_off})"
        return (f"fastcgan: a log line every {r.log_every:,} steps, a sample grid (RUN/samples/) every "
                f"{r.sample_every:,}, a checkpoint every {r.checkpoint_every:,}{fid}; "
                "--log-every / --sample-every / --checkpoint-every / --eval-every change them")

    def evaluate(self, state, exe, stop) -> None:
        """FID/KID of the current generators (outside the step: eval mode, no grad, no global RNG
        draws, so training is unchanged); the best mean FID's generators are kept as
        ``generator_<dir>_best.safetensors``.

        Never costs the run its checkpoint: a stop signal (``stop``) skips or abandons the
        evaluation (the checkpoint that follows is written at once), and an evaluation that fails
        is reported and turned off for the rest of the run, which goes on training."""
        from fastcgan.metrics import EvaluationInterrupted

        if stop.signum is not None:
            self.logger.message(f"fastcgan: stopping: the evaluation of step {state.step} is skipped")
            return
        try:
            self._evaluate(state, exe, should_stop=lambda: stop.signum is not None)
        except EvaluationInterrupted as e:
            self.logger.message(f"fastcgan: stopping: the evaluation of step {state.step} is abandoned ({e})")
        except Exception as e:  # noqa: BLE001 - metrics must not end a training run
            self.eval_every = 0
            self.logger.message(f"fastcgan: warning: the evaluation of step {state.step} failed "
                                f"({type(e).__name__}: {e}); evaluation is off for the rest of this run, "
                                "training goes on")

    def _evaluate(self, state, exe, should_stop) -> None:
        from fastcgan.metrics import TrainingEvaluator
        from fastcgan.models import save_generator

        cfg = self.cfg
        gens = {d: self.recipe.deployed(state.nets[n]) for d, n in self.recipe.exports_for(cfg).items()}
        if self.evaluator is None:
            # Channels of the testA / testB images: a reversed run's input domain is testB.
            nc = (cfg.model.input_nc, cfg.model.output_nc)
            nc_A, nc_B = nc[::-1] if self.recipe.reversed_domains(cfg) else nc
            self.evaluator = TrainingEvaluator(
                self.root, "test", self.device, image_size=cfg.data.crop_size, max_images=cfg.run.eval_max_images,
                amp_dtype=exe.amp_dtype, input_nc=nc_A, output_nc=nc_B,
            )
            self.eval_seconds += self.evaluator.setup_seconds
        m = self.evaluator(gens.get("AtoB"), gens.get("BtoA"), should_stop=should_stop)
        self.eval_seconds += m.pop("eval_seconds")
        self.last_eval = {"step": state.step, **m}
        self.logger.log_eval(state.step, m, self.evaluator.network)
        fids = [v for k, v in m.items() if k.startswith("fid_")]
        score = sum(fids) / len(fids)
        if self.best_fid is None or score < self.best_fid["fid"]:
            self.best_fid = {"step": state.step, "fid": score}
            for direction, net in gens.items():
                save_generator(net, os.path.join(self.run_dir, f"generator_{direction}_best.safetensors"),
                               direction=direction, pairs_direction=pairs_direction(self.cfg))

    def save(self, state) -> None:
        if not self.ctx.is_main:  # process 0 writes it; the others name it in their errors too
            self.last_ckpt = checkpoint_path(self.run_dir, state.step)
            return
        from fastcgan.models import save_generator

        extra = {"skipped": self.batches.skipped, "best_fid": self.best_fid}
        self.last_ckpt = save_checkpoint(state, self.cfg, self.run_dir, self.batches.generators, extra)
        for direction, net in self.recipe.exports_for(self.cfg).items():
            path = os.path.join(self.run_dir, f"generator_{direction}.safetensors")
            save_generator(self.recipe.deployed(state.nets[net]), path, direction=direction,
                           pairs_direction=pairs_direction(self.cfg))

    def loop(self, payload, ckpt_path, install_signal_handlers: bool, messages: list[str], init=None) -> dict:
        cfg, ctx, main = self.cfg, self.ctx, self.ctx.is_main
        if payload is not None:
            saved = set(payload["rng"].get("data") or {})
            if saved != set(self.batches.generators):
                was, now = ("on", "off") if "bank" in saved else ("off", "on")
                keep = ("--data-on-gpu keeps them; on a CPU it decodes the images once into memory" if was == "on"
                        else "--no-data-on-gpu keeps them")
                messages = messages + [
                    f"fastcgan: note: --data-on-gpu was {was} when the checkpoint was written and is {now} now: "
                    f"the batches from here on are not those of an uninterrupted run ({keep})"]
            state = restore_state(payload, cfg, self.device, self.batches.generators, path=ckpt_path)
            self.best_fid = payload["extra"].get("best_fid")
            if os.path.realpath(os.path.dirname(ckpt_path)) == os.path.realpath(checkpoint_dir(self.run_dir)):
                self.last_ckpt = ckpt_path  # this run's: named by a failure before the next one
        else:
            _seed_everything(cfg.run.seed)
            state = build_state(cfg, self.device, self.recipe, init)
            messages = messages + [f"fastcgan: generator {e.partition('=')[0]} starts from {e.partition('=')[2]}"
                                   for e in cfg.model.init_generators]
            if cfg.model.init_official:
                m = cfg.model
                messages.append(f"fastcgan: continuing the official run {m.init_official} (epoch "
                                f"{m.init_official_epoch}): " + ", ".join(
                                    f"{name} <- {m.init_official_epoch}_net_{official}.pth"
                                    for official, name in self.recipe.official_networks.items()))
        step_fn = build_step(state, cfg, self.recipe, ctx)
        if ctx.enabled and cfg.model.norm == "batch":
            per = cfg.data.batch_size // ctx.world_size
            messages = messages + [
                f"fastcgan: note: BatchNorm normalises each process's {per} image(s), not the global batch of "
                f"{cfg.data.batch_size} (as the official DataParallel does per GPU): unlike InstanceNorm runs, "
                "this run is not the one a single process trains"]
        if main:  # from here on the run directory is written (by process 0 only)
            atomic_write(os.path.join(self.run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2).encode())
        self.logger = log = RunLogger(
            self.run_dir, self.total, state.step, cfg.data.batch_size, tensorboard=cfg.run.tensorboard,
            progress=cfg.run.progress, enabled=main, bar_keys=self.recipe.progress_keys,
        )
        for m in [*messages, run_outline(cfg, state.nets, self.ds, len(self.batches), self.total), self._cadence()]:
            log.message(m)
        if cfg.run.amp and self.device.type == "cpu" and not cpu_has_fast_bf16():
            log.message("fastcgan: warning: --amp on this CPU (no AVX512-BF16/AMX) runs bf16 in emulation, "
                        "several times slower than fp32; drop --amp for CPU training here")
        if payload is not None:
            epochs = cfg.optim.epochs + cfg.optim.epochs_decay
            log.message(f"fastcgan: resumed {ckpt_path} at step {state.step} ({state.epoch} of {epochs} epochs done)")
        samples = sample_images(cfg, self.root, self.recipe) if main else None
        losses = LossAccumulator(self.recipe.loss_names(cfg))
        last: dict[str, float] = {}
        start_step, t0, data_wait, n_skipped = state.step, time.perf_counter(), 0.0, len(self.batches.skipped)
        stop = StopFlag(log.message, install=install_signal_handlers)
        try:
            with stop, warnings.catch_warnings():
                warnings.simplefilter("ignore", SkippedImageWarning)  # counted and logged below
                stopping = False
                while state.step < self.total and not stopping:
                    switched = self.data_for_epoch(state.epoch)
                    if switched:
                        log.message(switched)
                        n_skipped = 0  # a new dataset: what it skips is reported afresh
                    it = self.batches.epoch(state.epoch, state.batch_in_epoch, state.step)
                    while not stopping and state.step < self.total:
                        t_wait = time.perf_counter()
                        batch = next(it, None)
                        data_wait += time.perf_counter() - t_wait
                        if batch is None:
                            break
                        real = self.recipe.augment_batch(
                            {d: batch[d].to(self.device, non_blocking=True) for d in ("A", "B")},
                            generator=state.aug_generator, channels_last=bool(cfg.run.channels_last),
                            shard=(ctx.rank, ctx.world_size), **self.batches.augment_kw,
                        )
                        losses.add(step_fn(real))
                        state.step += 1
                        state.batch_in_epoch += 1
                        if state.batch_in_epoch >= len(self.batches):
                            state.end_epoch()
                        log.advance()
                        s = state.step
                        # A checkpoint step is also a log step: the losses are checked finite
                        # before the weights they produced are saved (a NaN run is never checkpointed).
                        if s % cfg.run.log_every == 0 or s == self.total or s % cfg.run.checkpoint_every == 0:
                            last = self._log(state, losses, data_wait) or last
                            data_wait = 0.0
                            n_skipped = self._report_skipped(n_skipped)
                        if main and (s % cfg.run.sample_every == 0 or s == self.total):
                            log.sample(s, sample_grid(step_fn.exe, self.recipe, samples))
                        if self.eval_every and s % self.eval_every == 0:
                            self.evaluate(state, step_fn.exe, stop)
                        if s % cfg.run.checkpoint_every == 0 or s == self.total:
                            self.save(state)
                        # Every process stops after the same step (any of them may get the signal).
                        stopping = ctx.any_stop(stop.signum is not None)
                        if stopping and stop.signum is None:
                            stop.signum = signal.SIGTERM
                last = self._log(state, losses, data_wait) or last
                if self.last_ckpt is None or not self.last_ckpt.endswith(f"step_{state.step:09d}.ckpt"):
                    self.save(state)
        finally:
            log.close()
        return self._summary(state, start_step, time.perf_counter() - t0, last, stop.signum)

    def _log(self, state, losses: LossAccumulator, data_wait: float) -> dict:
        vals = losses.read(self.ctx.mean)
        if not vals:
            return vals
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"losses became non-finite at step {state.step}: {', '.join(bad)} "
                f"(last checkpoint: {self.last_ckpt or 'none'}); try a lower --lr or another --gan-mode"
            )
        self.logger.log(state.step, state.epoch, vals, state.lr(), data_wait=data_wait)
        return vals

    def _report_skipped(self, seen: int) -> int:
        skipped = self.batches.skipped
        if len(skipped) > seen:
            self.logger.message(f"fastcgan: skipped {len(skipped) - seen} image(s) (unreadable or too small): "
                                + ", ".join(skipped[seen:][:5]))
        return len(skipped)

    def _summary(self, state, start_step: int, wall: float, last: dict, signum) -> dict:
        steps, bs = state.step - start_step, self.cfg.data.batch_size
        summary = {
            "run_dir": self.run_dir,
            "recipe": self.recipe.name,
            "start_step": start_step,
            "step": state.step,
            "epoch": state.epoch,
            "steps": steps,
            "wall_time_s": round(wall, 3),
            "images_per_s": round(steps * bs / wall, 3) if wall > 0 else None,
            "world_size": self.ctx.world_size,
            "rank": self.ctx.rank,
            "skipped_images": len(self.batches.skipped),
            "skipped": self.batches.skipped,
            "final_losses": last,
            "checkpoint": self.last_ckpt,
            "interrupted": signal.Signals(signum).name if signum is not None else None,
            "exit_code": EXIT_CODES.get(signum, 0) if signum is not None else 0,
            "device": str(self.device),
            "execution": describe(self.cfg, self.device),
            "fid": self.last_eval or None,
            "best_fid": self.best_fid,
            "eval_time_s": round(self.eval_seconds, 3),
            "eval_time_share": round(self.eval_seconds / wall, 4) if wall > 0 else None,
            "dataroot": self.root,
        }
        if self.ctx.is_main:
            atomic_write(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
        return summary
