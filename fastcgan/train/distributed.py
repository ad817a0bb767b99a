"""More than one process: ``torchrun --nproc-per-node N -m fastcgan.train ...``.

PyTorch's own engine (``torch.distributed`` + :class:`~torch.nn.parallel.DistributedDataParallel`)
with NCCL on GPUs and gloo on the CPU. The rules that make N processes train exactly what one
process with the same config trains:

* ``--batch-size`` is the *global* batch: each process takes ``batch_size / N`` consecutive images
  of every global batch (the same order one process would see), so a config means the same run
  whatever the world size and a checkpoint resumes on any number of processes.
* Every process is seeded identically. Random draws that belong to the global batch (crop/flip
  offsets, the B partner on ``--data-on-gpu``, the image pool's swaps, CUT's patch ids, dropout
  masks: :func:`fastcgan.nn.set_batch_shard`) are drawn for the whole global batch on every
  process and each keeps its slice; the fakes are all-gathered before the image pool, so every
  process holds the same pool.
* DDP averages the gradients, i.e. the gradient of the global-batch mean loss.
* Process 0 alone writes checkpoints, logs, samples and the summary; every process reads the
  checkpoint on ``--resume``.
* A SIGINT/SIGTERM on any process stops all of them after the same step (a one-integer all-reduce
  per step on a CPU gloo group, which never synchronises the GPU).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistContext", "from_environment", "world_size_from_env", "wrap_ddp"]


def world_size_from_env() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        from fastcgan.train.config import ConfigError

        raise ConfigError(f"WORLD_SIZE={raw!r} in the environment is not a process count (an integer >= 1)")
    return world


@dataclass
class DistContext:
    """This process's place in the job (``world_size == 1``: no collectives at all)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _stop_group: Optional[object] = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's slice of a global batch of ``n`` items."""
        b = n // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    # -- collectives (no-ops for one process) --------------------------------------------------
    def all_gather_batch(self, x: Tensor) -> Tensor:
        """Concatenate every process's ``x`` along dim 0, in rank order (the global batch)."""
        if not self.enabled:
            return x
        # Plain contiguous buffers on both sides (fakes may be channels_last): collectives move
        # raw storage, so input and outputs must share one layout.
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    def mean(self, x: Tensor) -> Tensor:
        """The mean of ``x`` over processes (a new tensor)."""
        if not self.enabled:
            return x
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y / self.world_size

    def any_stop(self, stopping: bool) -> bool:
        """True on every process if any process asks to stop (a CPU all-reduce: no GPU sync)."""
        if not self.enabled:
            return stopping
        flag = torch.tensor([1 if stopping else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
        return bool(flag.item())  # a CPU tensor: reading it waits for gloo, not for the GPU

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (small, picklable), in rank order, on the CPU group."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._stop_group)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self._stop_group)

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device_flag: str) -> tuple[DistContext, Optional[torch.device]]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    or a single-process context. Returns the context and this process's device when distributed
    (``cuda:LOCAL_RANK`` on GPUs, else the CPU); ``None`` means: resolve ``--device`` as usual."""
    world = world_size_from_env()
    if world <= 1:
        return DistContext(), None
    from fastcgan.train.config import ConfigError

    if "RANK" not in os.environ:  # WORLD_SIZE left in the environment, not a torchrun process
        raise ConfigError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but RANK is not set: start distributed runs with "
            "`torchrun --nproc-per-node N -m fastcgan.train ...`, or unset WORLD_SIZE"
        )
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:  # torchrun always sets them
        raise ConfigError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} and RANK={os.environ.get('RANK')} but "
            f"{' and '.join(missing)} not set: start distributed runs with "
            "`torchrun --nproc-per-node N -m fastcgan.train ...`, or unset WORLD_SIZE"
        )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not torchrun: say what the (30-minute) wait is for
        print(f"fastcgan: process {rank} of {world}: waiting for the others at {os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']} (WORLD_SIZE/RANK are set; torchrun starts the processes)",
              file=sys.stderr, flush=True)
    use_cuda = device_flag != "cpu" and torch.cuda.is_available()
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device (--device) {device_flag}: no CUDA device is available")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    stop_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    return DistContext(rank, world, local_rank, stop_group), device


def wrap_ddp(nets: dict, ctx: DistContext, device: torch.device) -> dict:
    """DDP wrappers of ``nets``, called by the step (``Execution.net``). The plain modules stay
    in the state for checkpoints and samples. DDP broadcasts process 0's parameters at
    construction, so every process starts from the same weights (they are seeded identically
    anyway). Networks a phase only reads are called unwrapped (``Execution.frozen``): a DDP
    forward there would wait for gradients that never come.

    Each parameter's ``.grad`` is a view into DDP's all-reduce bucket (``gradient_as_bucket_view``):
    one copy of the gradients, as one process holds (the memory floor counts one), instead of the
    gradients plus the buckets, and no copy back out of the bucket after each all-reduce. The
    step's ``zero_grad(set_to_none=True)`` drops the views; the next backward's fresh gradient is
    copied into its bucket (the copy DDP always makes) and ``.grad`` becomes the view again."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = dict(device_ids=[device.index], output_device=device.index) if device.type == "cuda" else {}
    return {name: DDP(net, gradient_as_bucket_view=True, **kw) for name, net in nets.items()}
