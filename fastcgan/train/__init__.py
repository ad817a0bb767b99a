"""The trainer: config presets, the train step, atomic checkpoints, the loop and its logs.

    from fastcgan.train import TrainConfig, train
    summary = train(TrainConfig.from_preset("cyclegan", dataroot="datasets/horse2zebra", amp=True))

Pieces: :mod:`.config` (frozen dataclasses, presets), :mod:`.state` (networks, optimizers,
pools), :mod:`.step` (``train_step(state, batch, cfg)``, ``--compile`` of its two phases),
:mod:`.cuda_graphs` (``--cuda-graphs``: the whole step captured and replayed),
:mod:`.distributed` (``torchrun``: DDP, sharded global batches), :mod:`.checkpoint`,
:mod:`.loop` (``train``), :mod:`.logging` (progress, TensorBoard, metrics.jsonl, sample grids),
:mod:`.cli`.
"""

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
from fastcgan.train.loop import TrainingError, train
from fastcgan.train.state import TrainState, build_state
from fastcgan.train.step import loss_names, train_step

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "TrainState",
    "TrainingError",
    "build_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "loss_names",
    "restore_state",
    "save_checkpoint",
    "train",
    "train_step",
]
