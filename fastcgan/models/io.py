"""Self-describing generator files: a ``.safetensors`` state dict whose metadata holds the
``build_generator`` arguments, so ``load_generator(path)`` needs nothing else."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fastcgan.models.generators import GENERATOR_ARCHS, build_generator

FORMAT = "fastcgan.generator"
FORMAT_VERSION = "1"
CONFIG_KEYS = ("arch", "input_nc", "output_nc", "ngf", "norm", "use_dropout")
# Keys a config may hold besides CONFIG_KEYS (absent in older files: build_generator's default).
# bn_inference: eval-mode BatchNorm statistics, "running" or "per_image" (BN_INFERENCE_MODES).
OPTIONAL_CONFIG_KEYS = ("bn_inference",)
DIRECTIONS = ("AtoB", "BtoA")


def generator_filename(direction: str) -> str:
    """The file name a run directory uses for the generator of ``direction`` (AtoB / BtoA)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return f"generator_{direction}.safetensors"


def _check_config(config: Any, where: str) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"{where}: generator config must be a dict, got {type(config).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    extra = [k for k in config if k not in CONFIG_KEYS and k not in OPTIONAL_CONFIG_KEYS]
    if missing or extra:
        raise ValueError(
            f"{where}: generator config needs exactly {CONFIG_KEYS} (optional: {OPTIONAL_CONFIG_KEYS}); "
            f"missing {missing}, unknown {extra}"
        )
    if config["arch"] not in GENERATOR_ARCHS:
        raise ValueError(f"{where}: unknown generator arch {config['arch']!r}; choose from {GENERATOR_ARCHS}")
    return dict(config)


def save_generator(model: nn.Module, path: Union[str, os.PathLike], config: Optional[dict] = None) -> None:
    """Write ``model``'s state dict to ``path`` (``.safetensors``) with ``config`` (the
    ``build_generator`` arguments: arch, input_nc, output_nc, ngf, norm, use_dropout) in its
    metadata. ``config=None`` uses ``model.config``, set by :func:`build_generator`. The file is
    written to a temporary name and renamed, so a crash never leaves a half-written generator."""
    path = os.fspath(path)
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves its module's keys
    if config is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"save_generator({path}): pass config= (model was not built by build_generator)")
    config = _check_config(config, f"save_generator({path})")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config, sort_keys=True)}
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_generator_config(path: Union[str, os.PathLike]) -> dict:
    """The ``build_generator`` arguments stored in a fastcgan generator file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"generator file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .safetensors file: {e}") from e
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(
            f"{path} is a .safetensors file but not a fastcgan generator (no '{FORMAT}' metadata); "
            "official .pth checkpoints load with fastcgan.models.load_official_generator"
        )
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: generator config metadata is not valid JSON: {e}") from e
    return _check_config(config, path)


def resolve_generator_path(path: Union[str, os.PathLike], direction: str = "AtoB") -> str:
    """``path`` itself if it is a file, else ``path/generator_<direction>.safetensors``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        f = os.path.join(path, generator_filename(direction))
        if not os.path.isfile(f):
            present = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            raise FileNotFoundError(
                f"run directory {path} has no {generator_filename(direction)} (found {present})"
            )
        return f
    if not os.path.exists(path):
        raise FileNotFoundError(f"generator file or run directory not found: {path}")
    return path


def load_generator(
    path: Union[str, os.PathLike],
    direction: str = "AtoB",
    backend: str = "auto",
    map_location: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Build and load a generator from a fastcgan ``.safetensors`` file or a run directory
    (``generator_AtoB.safetensors`` / ``generator_BtoA.safetensors``), on ``map_location``, in
    eval mode."""
    file = resolve_generator_path(path, direction)
    config = read_generator_config(file)
    try:
        model = build_generator(**config, init_type=None, backend=backend)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: cannot build the stored generator config {config}: {e}") from e
    device = torch.device(map_location)
    state = {}
    with safe_open(file, framework="pt", device="cpu") as f:
        for k in f.keys():
            state[k] = f.get_tensor(k)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{file}: weights do not match the stored config {config}; missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, shape mismatches {wrong[:6]}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
