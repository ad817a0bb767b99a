"""The trainer: one fast machine for every recipe (``fastcgan.recipes``).

    from fastcgan.train import TrainConfig, train
    summary = train(TrainConfig.from_preset("cyclegan", dataroot="datasets/horse2zebra", amp=True))

Pieces: :mod:`.config` (frozen dataclasses, presets), :mod:`.state` (``TrainState``: exactly what
a checkpoint holds), :mod:`.execution` (how the step runs: fast defaults, compiled phases, DDP
wrappers, autocast, CUDA graph -- ``build_step``), :mod:`.step` (``train_step``: the recipe's
phases), :mod:`.cuda_graphs`, :mod:`.distributed` (``torchrun``), :mod:`.checkpoint` (verified
atomic checkpoints, the resume policy), :mod:`.runlock`, :mod:`.signals`, :mod:`.data`,
:mod:`.logging` (progress, TensorBoard, metrics.jsonl, sample grids), :mod:`.loop` (``train``),
:mod:`.cli`.
"""

import importlib
from typing import TYPE_CHECKING

# Loaded on first use (PEP 562): ``python -m fastcgan.train`` imports this package before its
# ``__main__``, and the Ctrl-C guard there (fastcgan._cli) can only cover imports made after it.
_HOME = {
    "CheckpointError": "checkpoint", "latest_checkpoint": "checkpoint", "list_checkpoints": "checkpoint",
    "load_checkpoint": "checkpoint", "restore_state": "checkpoint", "save_checkpoint": "checkpoint",
    "PRESETS": "config", "ConfigError": "config", "DataConfig": "config", "LossConfig": "config",
    "ModelConfig": "config", "OptimConfig": "config", "RunConfig": "config", "TrainConfig": "config",
    "Execution": "execution", "TrainStep": "execution", "build_step": "execution", "resolve_fast_path": "execution",
    "TrainingError": "loop", "train": "loop", "TrainState": "state", "build_state": "state", "train_step": "step",
}

if TYPE_CHECKING:
    from fastcgan.train.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        restore_state,
        save_checkpoint,
    )
    from fastcgan.train.config import (
        PRESETS,
        ConfigError,
        DataConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        RunConfig,
        TrainConfig,
    )
    from fastcgan.train.execution import Execution, TrainStep, build_step, resolve_fast_path
    from fastcgan.train.loop import TrainingError, train
    from fastcgan.train.state import TrainState, build_state
    from fastcgan.train.step import train_step


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'fastcgan.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastcgan.train.{_HOME[name]}"), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "Execution",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "TrainState",
    "TrainStep",
    "TrainingError",
    "build_state",
    "build_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_fast_path",
    "restore_state",
    "save_checkpoint",
    "train",
    "train_step",
]
