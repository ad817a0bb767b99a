"""``--cuda-graphs``: the whole training step replayed as one CUDA graph.

At 256² and batch 1 a CycleGAN step is ~1,500 kernel launches of a few microseconds of GPU work
each, so the host's launch rate, not the GPU, bounds it. Capturing the complete step once --
both forward phases (compiled or not), both backwards and both fused-Adam updates -- and
replaying it removes the launches: one ``cudaGraphLaunch`` per step.

How (the "whole network capture" recipe of PyTorch's CUDA-graph notes):

* static input buffers ``A``/``B``: each step copies its batch into them, then replays;
* the first ``warmup`` steps run eagerly on a side stream (they are real training steps): lazy
  initialisation (cuBLAS/cuDNN handles, Adam's state, the image pools, torch.compile's
  compilation) must not happen during capture. One side stream per step object, reused by every
  warm-up step and by the capture: the caching allocator keeps freed blocks per stream, so a new
  stream per step would strand each step's activations in a pool no later step can reuse;
* the capture is ``thread_local`` (``cudaStreamCaptureModeThreadLocal``): the DataLoader's
  pin-memory thread (``pin_memory=True`` on CUDA) may call ``cudaHostAlloc`` or
  ``cudaEventQuery`` while this thread captures, which under the default "global" mode
  invalidates the capture; only this thread's unsafe calls matter here;
* the optimizers become ``capturable`` with the learning rate as a device tensor, so the LR
  schedule's per-epoch updates (``fill_`` in place) reach the replayed kernels;
* autocast's weight-cast cache is off (cached casts must not outlive one replay);
* the captured region has no host synchronisation (``train_step`` has none; fp16 loss scaling
  has one, so CUDA graphs need bf16 or fp32) and no CPU-side randomness (the image pool and the
  augmentation draw on the device; the default CUDA generator is graph-safe);
* everything the graph reads or writes -- parameters, gradients, Adam state, pools -- keeps its
  storage: checkpoints read it, sample grids run the plain networks on it, nothing re-assigns it.

The returned losses live in the graph's static outputs: read (or copy) them before the next step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcgan.ops._backends import cuda_graph_replayed
from fastcgan.train.config import ConfigError, TrainConfig
from fastcgan.train.execution import Execution, TrainStep
from fastcgan.train.state import TrainState, amp_dtype_for
from fastcgan.train.step import train_step

__all__ = ["CUDAGraphStep", "cuda_graphs_blocker", "use_cuda_graphs"]


def cuda_graphs_blocker(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> Optional[str]:
    """Why the step cannot be captured here, or ``None`` if it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device (training runs on {device})"
    if world_size > 1:
        return "DDP's gradient all-reduce is not captured (run without torchrun, or drop --cuda-graphs)"
    if cfg.loss.gan_mode == "wgangp":
        return "the WGAN-GP penalty's double backward is not captured"
    if amp_dtype_for(device, cfg.run.amp) == torch.float16:
        return "fp16 loss scaling reads its inf check on the host (this GPU has no bf16)"
    return None


def use_cuda_graphs(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> bool:
    """``--cuda-graphs`` / ``--no-cuda-graphs`` (``None``, auto, is resolved by
    ``fastcgan.train.execution.resolve_fast_path``; unresolved it means off). An explicit
    request that cannot be met is a :class:`ConfigError` naming the flag."""
    why = cuda_graphs_blocker(cfg, device, world_size)
    if cfg.run.cuda_graphs and why is not None:
        raise ConfigError(f"cuda_graphs (--cuda-graphs): cannot capture the step: {why}")
    return bool(cfg.run.cuda_graphs)


def _make_capturable(state: TrainState) -> None:
    for opt in state.optimizers.values():
        for g in opt.param_groups:
            if not isinstance(g["lr"], Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=state.device)
            g["capturable"] = True


def _capture_context(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream):
    """The capture context: on ``stream`` (the warm-up steps' side stream, on the training
    device), erroring only on this thread's unsafe calls (see the module docstring)."""
    return torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")


class CUDAGraphStep(TrainStep):
    """``step(batch) -> losses`` that captures :func:`train_step` after ``warmup`` eager steps."""

    def __init__(self, exe: Execution, recipe, cfg: TrainConfig, warmup: int = 3):
        if exe.device.type != "cuda":
            raise ValueError("CUDAGraphStep needs a CUDA device")
        super().__init__(exe, recipe, cfg)
        self.warmup = warmup
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_in: dict[str, Tensor] = {}
        self.static_out: dict[str, Tensor] = {}
        # Created once: freed blocks of the cached allocator belong to the stream that used them.
        self.side = torch.cuda.Stream(device=exe.device)
        _make_capturable(exe.state)
        exe.autocast_cache = False  # set before the warm-up, so compiled phases see it too

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            side = self.side
            side.wait_stream(torch.cuda.current_stream(self.exe.device))
            # The warm-up traces (compiled phases) and runs what the graph will hold: "auto"
            # kernels are chosen for replay (device time), as during the capture.
            with torch.cuda.stream(side), cuda_graph_replayed():
                out = train_step(self.exe, batch, self.recipe, self.cfg)
            torch.cuda.current_stream(self.exe.device).wait_stream(side)
            return out
        if self.graph is None:
            self._capture(batch)
        for k, buf in self.static_in.items():
            buf.copy_(batch[k], non_blocking=True)
        self.graph.replay()
        return self.static_out

    def _capture(self, batch: dict[str, Tensor]) -> None:
        self.static_in = {k: v.clone() for k, v in batch.items()}  # same shape and memory format
        torch.cuda.synchronize(self.exe.device)
        # Gradients from the warm-up steps are dropped now, so the captured backward allocates
        # them from the graph's private pool (where every replay rewrites them).
        for opt in self.exe.state.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # Capture records the kernels without running them; the replay in __call__ runs this step.
        with _capture_context(self.graph, self.side), cuda_graph_replayed():
            self.static_out = train_step(self.exe, self.static_in, self.recipe, self.cfg)
