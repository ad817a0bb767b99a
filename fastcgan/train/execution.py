"""How the step runs -- built in this one place from the config and the process group.

    cfg, line = resolve_fast_path(cfg, device)        # "auto" flags -> what is measured fastest here
    step = build_step(state, cfg, recipe, ctx)        # the callable the loop calls: step(batch)

:class:`Execution` is the view of a :class:`~fastcgan.train.state.TrainState` that the recipe's
phase functions get (``fastcgan.recipes.base.StepRun``): which module to call for each network
(its DDP wrapper when distributed), the autocast policy, the memory format, the image pools
(over the global batch under DDP), and the compiled phases. None of it is checkpointed; a run
resumes with any execution settings.

Fast by default: ``--compile``, ``--channels-last``, ``--cuda-graphs``, ``--data-on-gpu`` and
``--cudnn-benchmark`` are "auto" unless given. On a CUDA device auto means on (the data bank when
it fits in ``DATA_ON_GPU_SHARE`` of the free memory; CUDA graphs when the step can be captured;
cuDNN autotuning when every batch has one shape). On the CPU
auto means off. Compile: ``--channels-last --compile`` ran at 0.91x the eager fp32 step at 128²
ngf 64 on an AVX2 EPYC and costs minutes of compilation. channels_last alone measured faster on
an AVX512-BF16 EPYC (1.17x fp32 / 1.18x bf16 at 64² ngf 16, 1.04x / 1.05x at 128² ngf 64) but is
not the default there: in NCHW the CPU's fp32 step is the same arithmetic at any batch split, in
channels_last the convolutions round differently per batch size, and where a ReLU input sits
within that rounding of 0 the gradient jumps (measured: a 1e-6 relative input change in fp64
moves a generator's weight gradients by ~1e-2, exactly the channels_last-vs-NCHW gap), which Adam
then carries: 2-process DDP drifts 2.3e-3 from 1 process after 6 steps, 3.8e-4 in NCHW. (The
batch-size bug first blamed on channels_last was torch's instance_norm backward, worked around in
the reference kernels.)
``--amp`` stays the user's choice (bf16 is emulated, ~9x slower, on CPUs without
AVX512-BF16/AMX: the trainer warns). ``--faithful`` gives the official numerics: fp32, eager,
reference kernels, no fused optimizer.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastcgan.recipes import Recipe, get_recipe
from fastcgan.train.config import ConfigError, TrainConfig
from fastcgan.train.distributed import DistContext
from fastcgan.train.state import TrainState, amp_dtype_for

__all__ = [
    "DATA_ON_GPU_SHARE",
    "Execution",
    "TrainStep",
    "build_step",
    "compile_phases",
    "cudnn_autotuning",
    "resolve_fast_path",
]

# --data-on-gpu auto: the decoded uint8 dataset may take at most this share of the free memory.
DATA_ON_GPU_SHARE = 0.25
# An explicit --data-on-gpu on a CPU: at most this share of what the process may allocate.
CPU_BANK_SHARE = 0.8


@dataclass
class Execution:
    """Implements ``fastcgan.recipes.base.StepRun`` for one run."""

    state: TrainState
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    dist: DistContext = field(default_factory=DistContext)
    ddp: dict[str, nn.Module] = field(default_factory=dict)
    compiled: dict[str, Callable] = field(default_factory=dict)
    # Under CUDA-graph capture autocast must not cache weight casts across the region (PyTorch's
    # CUDA-graph notes): CUDAGraphStep turns the cache off before its warm-up.
    autocast_cache: bool = True
    pools_allocated: bool = False

    @property
    def device(self) -> torch.device:
        return self.state.device

    def net(self, name: str) -> nn.Module:
        return self.ddp.get(name) or self.state.nets[name]

    def frozen(self, name: str) -> nn.Module:
        return self.state.nets[name]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.autocast_cache)

    def fmt(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def allocate_pools(self, recipe: Recipe, cfg: TrainConfig, batch: dict[str, Tensor]) -> None:
        """Allocate the recipe's empty image pools for fakes of ``batch``'s size, before the first
        compiled phase runs (a compiled region must not allocate them). The batch, not
        ``--crop-size``: ``--preprocess none`` / ``scale_width`` train at the images' own size."""
        for name, (size, nc) in recipe.pools(cfg).items():
            pool = self.state.pools[name]
            if size and pool.images is None:  # a resumed pool holds its checkpoint's images already
                pool.allocate(torch.empty(1, nc, *batch["A"].shape[-2:], device=self.device))
        self.pools_allocated = True

    def pool_query(self, name: str, fakes: Tensor) -> Tensor:
        """Pooled fakes for this process's batch. Under DDP the pool sees the global batch (the
        fakes of every process, in rank order) with the same random draws on every process, so
        all processes hold the pool that one process training the global batch would hold."""
        pool = self.state.pools[name]
        fakes = fakes.detach()
        if fakes.dtype in (torch.float16, torch.bfloat16):
            fakes = fakes.float()  # the pools keep fp32 images whatever the autocast dtype (fp64 runs: fp64)
        if not self.dist.enabled:
            return self.fmt(pool.query(fakes))
        pooled = pool.query(self.dist.all_gather_batch(fakes))
        return self.fmt(pooled[self.dist.shard(pooled.shape[0])])


class TrainStep:
    """``step(batch) -> losses``: :func:`~fastcgan.train.step.train_step` on this execution."""

    def __init__(self, exe: Execution, recipe: Recipe, cfg: TrainConfig):
        self.exe, self.recipe, self.cfg = exe, recipe, cfg

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        from fastcgan.train.step import train_step

        return train_step(self.exe, batch, self.recipe, self.cfg)


def compile_phases(exe: Execution, cfg: TrainConfig, recipe: Recipe) -> None:
    """``torch.compile`` each compilable phase forward as one graph (``fullgraph=True``: networks,
    fused-norm custom ops, losses and image pool, no graph break); AOT autograd compiles their
    backward. The optimizer step is not in these graphs: torch.optim breaks the graph around
    ``step()`` on purpose, and fused Adam on CUDA is already one multi-tensor kernel (CUDA graphs
    capture it). The networks stay plain modules (checkpoints and samples use them as they are).

    Under DDP the phases call DDP wrappers, whose forward Dynamo cannot trace in one graph: each
    network is compiled instead (DDP then wraps the compiled modules). Compiled where DDP calls
    it, a network's graph is split at DDP's gradient buckets (Dynamo's DDPOptimizer), one compiled
    backward per bucket, so a bucket's all-reduce can run while the backward of the layers before
    it does. The first step allocates the image pools before it calls a compiled phase
    (:meth:`Execution.allocate_pools`)."""
    from fastcgan.ops import available_backends

    available_backends()  # probe the kernel backends (loads fastcgan._C) outside traced code
    opts = dict(backend=cfg.run.compile_backend, fullgraph=True, dynamic=False)
    phases = [ph for ph in recipe.phases if ph.compilable(cfg)]
    if exe.dist.enabled:
        names = {n for ph in phases if ph.optimizer is not None for n in recipe.optimizers[ph.optimizer]}
        for name in sorted(names):
            exe.state.nets[name].compile(**opts)
        return
    for ph in phases:
        exe.compiled[ph.name] = torch.compile(ph.forward, **opts)


def build_step(
    state: TrainState, cfg: TrainConfig, recipe: Optional[Recipe] = None, ctx: Optional[DistContext] = None
) -> TrainStep:
    """The step the loop calls, built from ``cfg`` (resolved: see :func:`resolve_fast_path`) and
    the process group: DDP wrappers, compiled phases, then -- when ``--cuda-graphs`` -- the whole
    step captured after a few eager warm-up steps (:class:`~fastcgan.train.cuda_graphs.CUDAGraphStep`)."""
    from fastcgan.train.cuda_graphs import CUDAGraphStep, use_cuda_graphs

    recipe = recipe or get_recipe(cfg.model.recipe)
    ctx = ctx or DistContext()
    exe = Execution(state, amp_dtype_for(state.device, cfg.run.amp), bool(cfg.run.channels_last), ctx)
    if ctx.enabled:
        from fastcgan.nn import set_batch_shard
        from fastcgan.train.distributed import wrap_ddp

        exe.ddp = wrap_ddp(state.nets, ctx, state.device)
        for net in state.nets.values():  # dropout masks drawn for the global batch, as one process draws them
            set_batch_shard(net, (ctx.rank, ctx.world_size, cfg.data.batch_size // ctx.world_size))
    if cfg.run.compile:
        compile_phases(exe, cfg, recipe)
    if use_cuda_graphs(cfg, state.device, ctx.world_size):
        return CUDAGraphStep(exe, recipe, cfg)
    return TrainStep(exe, recipe, cfg)


# ---------------------------------------------------------------------------------------------
# fast by default
# ---------------------------------------------------------------------------------------------
OFF_FLAGS = {
    "compile": "--no-compile",
    "channels_last": "--no-channels-last",
    "cuda_graphs": "--no-cuda-graphs",
    "data_on_gpu": "--no-data-on-gpu",
    "cudnn_benchmark": "--no-cudnn-benchmark",
}


def _cudnn_benchmark(cfg: TrainConfig, device: torch.device) -> bool:
    """``--cudnn-benchmark`` resolved: cuDNN times every convolution algorithm the first time it
    sees a shape and keeps the fastest. The official ``BaseModel`` turns it on unless
    ``--preprocess scale_width``; auto here turns it on when every batch has one shape (a
    preprocess with a crop), since ``none`` / ``scale_width`` give a shape per image size and would
    be timed again at each new one. Nothing to tune off CUDA (an explicit request is refused there:
    :func:`unused_execution_flags`)."""
    if device.type != "cuda":
        return False
    if cfg.run.cudnn_benchmark is not None:
        return cfg.run.cudnn_benchmark
    return "crop" in cfg.data.preprocess


@contextlib.contextmanager
def cudnn_autotuning(cfg: TrainConfig, device: torch.device):
    """Set ``torch.backends.cudnn.benchmark`` for a run on a CUDA device (a process-wide switch),
    and put back what it was when the run ends: ``train()`` is a library call too."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(cfg.run.cudnn_benchmark)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _bank_room(device: torch.device, free_memory: Optional[int], host_memory: Optional[int]) -> Optional[int]:
    """The memory the bank would go into: free device memory on a GPU (the images are decoded one
    at a time straight into it), available host memory on a CPU; queried where not given."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if free_memory is None else free_memory
    from fastcgan.devices import host_available_bytes

    return host_available_bytes() if host_memory is None else host_memory


def check_bank_fits(nbytes: int, device: torch.device, room: Optional[int]) -> None:
    """An explicit ``--data-on-gpu`` that cannot be held is a :class:`ConfigError` before any
    image is decoded (else the decode runs until a CUDA OOM, or on a CPU the OOM killer, ends it).
    ``room``: see :func:`_bank_room` (``None``: unknown, taken as enough). On a CPU each process
    of a node under torchrun holds its own bank. Auto asks more (a quarter of the free device
    memory) and turns the bank off instead."""

    from fastcgan.devices import format_bytes as size

    copies, share = 1, 1.0
    if device.type == "cpu":  # the bank shares the memory with the networks and the step: 4/5 of it at most
        share = CPU_BANK_SHARE
        try:
            copies = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            pass
    if room is None or nbytes * copies <= share * room:
        return
    if device.type == "cuda":
        what, where = "--data-on-gpu", f"{device} has {size(room)} free"
    else:
        what = "--data-on-gpu (on a CPU: decoded once into memory)"
        where = f"this process may allocate {size(room)} (at most 4/5 of it for the images)" + (
            f" for {copies} processes that each hold it" if copies > 1 else "")
    raise ConfigError(f"data_on_gpu ({what}): the decoded training set is {size(nbytes)} (uint8, after --preprocess) "
                      f"and {where}; use --no-data-on-gpu (the loader reads the files as it goes), or a smaller "
                      "--load-size or --max-dataset-size")


def resolve_fast_path(
    cfg: TrainConfig,
    device: torch.device,
    world_size: int = 1,
    dataset_nbytes: Optional[int] = None,
    free_memory: Optional[int] = None,
    resumed_data_on_gpu: Optional[bool] = None,
    host_memory: Optional[int] = None,
) -> tuple[TrainConfig, str]:
    """Replace the "auto" (``None``) execution flags by what is fastest on ``device``; returns the
    resolved config and one line saying what is on and how to turn each off.

    ``dataset_nbytes``: the decoded uint8 training set (``None``: unknown, the bank stays off);
    ``free_memory``: free device memory in bytes (default: queried on CUDA devices);
    ``host_memory``: memory a CPU process may still allocate (default: queried, see
    :func:`~fastcgan.devices.host_available_bytes`), for an explicit bank on a CPU;
    ``resumed_data_on_gpu``: the data path of the checkpoint a run resumes (auto keeps a loader run
    on the loader, so that the resumed batches are the uninterrupted run's)."""
    from fastcgan.train.cuda_graphs import cuda_graphs_blocker

    r = cfg.run
    if r.faithful:
        explicit = [f for f in ("amp", "compile", "channels_last", "cuda_graphs") if getattr(r, f)]
        if cfg.data.data_on_gpu:
            explicit.append("data_on_gpu")
        if r.kernels not in ("auto", "torch"):
            explicit.append("kernels")
        if explicit:
            flags = ", ".join("--" + f.replace("_", "-") for f in explicit)
            raise ConfigError(f"faithful (--faithful) runs the official numerics and cannot be combined with {flags}")
        cfg = cfg.replace(compile=False, channels_last=False, cuda_graphs=False, data_on_gpu=False, kernels="torch",
                          cudnn_benchmark=_cudnn_benchmark(cfg, device))
        line = "fastcgan: --faithful: fp32, eager, reference kernels, unfused Adam (the official numerics)"
        return cfg, line + (", cuDNN autotuning (as the official BaseModel)" if cfg.run.cudnn_benchmark else "")

    gpu = device.type == "cuda"
    resolved: dict = {}
    if r.compile is None:
        resolved["compile"] = gpu
    if r.channels_last is None:
        resolved["channels_last"] = gpu  # CPU: see the module docstring
    if cfg.data.data_on_gpu is None:
        fits = False
        if gpu and dataset_nbytes is not None:
            fits = dataset_nbytes <= DATA_ON_GPU_SHARE * _bank_room(device, free_memory, host_memory)
        resolved["data_on_gpu"] = fits and resumed_data_on_gpu is not False
    elif cfg.data.data_on_gpu and dataset_nbytes is not None:
        check_bank_fits(dataset_nbytes, device, _bank_room(device, free_memory, host_memory))
    resolved["cudnn_benchmark"] = _cudnn_benchmark(cfg, device)
    cfg = cfg.replace(**resolved)
    if cfg.run.cuda_graphs is None:
        capturable = cuda_graphs_blocker(cfg, device, world_size) is None
        cfg = cfg.replace(cuda_graphs=bool(gpu and capturable and cfg.run.compile))

    on = []
    if cfg.run.amp:
        dt = amp_dtype_for(device, True)
        on.append(f"{'bf16' if dt == torch.bfloat16 else 'fp16'} autocast")
    else:
        on.append("fp32")
    for f, label in (
        ("compile", "torch.compile"),
        ("channels_last", "channels_last"),
        ("cuda_graphs", "CUDA graphs"),
        ("data_on_gpu", "data on the GPU" if gpu else "data decoded once in memory"),
        ("cudnn_benchmark", "cuDNN autotuning"),
    ):
        v = cfg.data.data_on_gpu if f == "data_on_gpu" else getattr(cfg.run, f)
        if v and f == "compile":
            eager = [ph.name for ph in get_recipe(cfg.model.recipe).phases if not ph.compilable(cfg)]
            label += f" ({', '.join(eager)} phase eager)" if eager else ""
        if v:
            on.append(label)
    offs = [
        OFF_FLAGS[f]
        for f in OFF_FLAGS
        if (cfg.data.data_on_gpu if f == "data_on_gpu" else getattr(cfg.run, f))
    ]
    line = f"fastcgan: on {device}: {', '.join(on)}, {cfg.run.kernels} kernels"
    if offs:
        line += f" (turn off with {', '.join(offs)}; --faithful for the official numerics)"
    elif not gpu:
        line += " (the fastest measured on a CPU; --channels-last to try more)"
    return cfg, line


def unused_execution_flags(cfg: TrainConfig, requested: dict, device: torch.device) -> list[str]:
    """Explicit execution flags (``requested``) that the resolved ``cfg`` cannot use on
    ``device``, as :func:`~fastcgan.train.config.unused_flags` words them (that one judges the
    config before the device is known)."""
    out = []
    if requested.get("cudnn_benchmark") and device.type != "cuda":
        out.append(f"--cudnn-benchmark (cuDNN tunes CUDA convolutions; this run is on {device})")
    if "compile_backend" in requested and not cfg.run.compile:
        why = ("--no-compile" if requested.get("compile") is False else "--faithful runs eager" if cfg.run.faithful
               else f"--compile is off by default on {device.type}")
        out.append(f"--compile-backend (nothing is compiled: {why})")
    return out


def describe(cfg: TrainConfig, device: torch.device) -> dict:
    """The execution settings of a resolved config, for summaries and bench rows."""
    return {
        "device": str(device),
        "amp": cfg.run.amp,
        "compile": bool(cfg.run.compile),
        "channels_last": bool(cfg.run.channels_last),
        "cuda_graphs": bool(cfg.run.cuda_graphs),
        "data_on_gpu": bool(cfg.data.data_on_gpu),
        "cudnn_benchmark": bool(cfg.run.cudnn_benchmark),
        "kernels": cfg.run.kernels,
        "faithful": cfg.run.faithful,
    }

