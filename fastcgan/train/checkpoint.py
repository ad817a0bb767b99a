"""Complete, atomic training checkpoints.

``RUN/checkpoints/step_<step:09d>.ckpt`` (``torch.save`` of plain containers and tensors, read
back with ``weights_only=True``) holds everything a run needs to continue bit-exactly: the four
networks, both optimizers and LR schedules, the grad scaler, both image pools, every RNG stream
the step and the data path draw from (python ``random``, numpy, torch CPU, CUDA, the
augmentation generator, the data path's generators such as the GPU image bank's), the
step / epoch / data position, and the config.

Writes are atomic: a temporary file in the same folder, flush + fsync, ``os.replace``, fsync of
the folder. A crash (even SIGKILL) mid-write leaves the previous checkpoint intact plus at most a
hidden ``*.tmp`` file, which listing ignores. :func:`restore_state` validates the whole payload
against a freshly built state before it applies anything, so a bad file never half-applies.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from fastcgan.train.config import TrainConfig
from fastcgan.train.state import NETS, TrainState, build_state

FORMAT = "fastcgan.checkpoint"
FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the run; the message names the file."""


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(run_dir), f"step_{step:09d}.ckpt")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first (temporary files are ignored)."""
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return []
    found = sorted((int(m.group(1)), n) for n in os.listdir(d) if (m := _NAME.match(n)))
    return [os.path.join(d, n) for _, n in found]


def latest_checkpoint(run_dir: str) -> str | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def run_dir_of(ckpt_file: str) -> str:
    """The run directory of a checkpoint file (``RUN/checkpoints/step_N.ckpt`` -> ``RUN``)."""
    d = os.path.dirname(os.path.abspath(ckpt_file))
    return os.path.dirname(d) if os.path.basename(d) == CKPT_DIR else d


def resolve_resume(resume: str, run_dir: str) -> str | None:
    """``--resume`` -> checkpoint file. ``"auto"``: the latest checkpoint of ``run_dir`` or
    ``None`` (a new run); a file: itself; a run directory (or its ``checkpoints/``): its latest."""
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if os.path.isfile(resume):
        return resume
    if os.path.isdir(resume):
        base = resume
        if os.path.basename(os.path.normpath(resume)) == CKPT_DIR:
            base = os.path.dirname(os.path.normpath(resume))
        latest = latest_checkpoint(base)
        if latest is None:
            raise CheckpointError(
                f"--resume {resume}: no checkpoint ({CKPT_DIR}/step_*.ckpt) in this directory"
            )
        return latest
    raise CheckpointError(f"--resume {resume}: no such file or directory")


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` so that it is either the old file or the complete new one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(d)


def _atomic_torch_save(obj: Any, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(d)


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------
def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _module(net: torch.nn.Module) -> torch.nn.Module:
    return getattr(net, "_orig_mod", net)


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def capture(
    state: TrainState, config: dict, data_generators: dict | None = None, extra: dict | None = None
) -> dict:
    """The checkpoint payload of ``state`` (tensors copied to CPU)."""
    py = random.getstate()
    rng = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "aug": state.aug_generator.get_state() if state.aug_generator is not None else None,
        "data": {k: g.get_state() for k, g in (data_generators or {}).items()},
    }
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "nets": {n: _module(getattr(state, n)).state_dict() for n in NETS},
        "opt_G": _optimizer_state(state.opt_G),
        "opt_D": _optimizer_state(state.opt_D),
        "sched_G": state.sched_G.state_dict(),
        "sched_D": state.sched_D.state_dict(),
        "scaler": state.scaler.state_dict(),
        "pool_A": state.pool_A.state_dict(),
        "pool_B": state.pool_B.state_dict(),
        "rng": rng,
        "extra": dict(extra or {}),
    }
    return _cpu(payload)


def _optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with the CUDA-graph settings undone (plain float lr, not capturable),
    so the checkpoint resumes with or without --cuda-graphs (which re-applies them)."""
    sd = opt.state_dict()
    for g in sd["param_groups"]:  # state_dict() copies the groups: the optimizer is untouched
        g["lr"] = float(g["lr"])
        if "capturable" in g:
            g["capturable"] = False
    return sd


def save_checkpoint(
    state: TrainState,
    cfg: TrainConfig,
    run_dir: str,
    data_generators: dict | None = None,
    extra: dict | None = None,
) -> str:
    """Write ``RUN/checkpoints/step_<step>.ckpt`` atomically, then delete all but the newest
    ``cfg.run.keep_last``. Returns the path written."""
    path = checkpoint_path(run_dir, state.step)
    remove_stale_temporaries(run_dir)
    _atomic_torch_save(capture(state, cfg.to_dict(), data_generators, extra), path)
    for old in list_checkpoints(run_dir)[: -cfg.run.keep_last]:
        try:
            os.remove(old)
        except OSError:
            pass
    return path


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete temporary checkpoint files that a killed writer (another process id) left behind."""
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return []
    mine = f".{os.getpid()}.tmp"
    stale = [
        os.path.join(d, n)
        for n in os.listdir(d)
        if n.startswith(".step_") and n.endswith(".tmp") and not n.endswith(mine)
    ]
    for p in stale:
        try:
            os.remove(p)
        except OSError:
            pass
    return stale


# ---------------------------------------------------------------------------------------------
# load / restore
# ---------------------------------------------------------------------------------------------
_REQUIRED = (
    "config",
    "step",
    "epoch",
    "batch_in_epoch",
    "nets",
    "opt_G",
    "opt_D",
    "sched_G",
    "sched_D",
    "scaler",
    "pool_A",
    "pool_B",
    "rng",
    "extra",
)


def load_checkpoint(path: str) -> dict:
    """Read and structurally check a checkpoint; any problem -> :class:`CheckpointError`
    naming the file. Nothing is applied here."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, refused unpickling ...
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be loaded: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fastcgan training checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {payload.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    if not isinstance(payload["nets"], dict) or set(payload["nets"]) != set(NETS):
        raise CheckpointError(f"checkpoint {path} is incomplete: networks {sorted(payload['nets'])}")
    rng = payload["rng"]
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        raise CheckpointError(f"checkpoint {path}: RNG state is missing")
    return payload


def _check_net(path: str, name: str, net: torch.nn.Module, sd: dict) -> None:
    own = _module(net).state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {path}: network {name} does not match the configured model "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatch {wrong[:4]})"
        )


def _check_opt(path: str, name: str, opt: torch.optim.Optimizer, sd: dict) -> None:
    try:
        groups = sd["param_groups"]
        ok = len(groups) == len(opt.param_groups) and all(
            len(g["params"]) == len(o["params"]) for g, o in zip(groups, opt.param_groups)
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {path}: optimizer {name} does not match the configured model")


def restore_state(
    payload: dict,
    cfg: TrainConfig,
    device: torch.device,
    data_generators: dict | None = None,
    path: str = "<checkpoint>",
) -> TrainState:
    """A new :class:`TrainState` for ``cfg`` with ``payload`` applied (also the global RNGs and
    ``data_generators``). Every part is checked against the fresh state before any is applied;
    a mismatch raises :class:`CheckpointError` and leaves the global RNGs untouched."""
    data_generators = data_generators or {}
    py_before = random.getstate()
    torch_before = torch.get_rng_state()
    state = build_state(cfg, device)  # draws from the global RNG for init: restored below
    random.setstate(py_before)
    torch.set_rng_state(torch_before)
    for n in NETS:
        _check_net(path, n, getattr(state, n), payload["nets"][n])
    _check_opt(path, "opt_G", state.opt_G, payload["opt_G"])
    _check_opt(path, "opt_D", state.opt_D, payload["opt_D"])
    rng = payload["rng"]
    saved_data = rng.get("data") or {}
    if set(saved_data) != set(data_generators):
        raise CheckpointError(
            f"checkpoint {path}: data-path generators {sorted(saved_data)} differ from this "
            f"run's {sorted(data_generators)} (was --data-on-gpu changed?)"
        )

    for n in NETS:
        _module(getattr(state, n)).load_state_dict(payload["nets"][n])
    # Optimizer.load_state_dict casts the moments to each parameter's device and dtype.
    state.opt_G.load_state_dict(payload["opt_G"])
    state.opt_D.load_state_dict(payload["opt_D"])
    state.sched_G.load_state_dict(payload["sched_G"])
    state.sched_D.load_state_dict(payload["sched_D"])
    if payload["scaler"]:
        state.scaler.load_state_dict(payload["scaler"])
    for name in ("pool_A", "pool_B"):
        pool = getattr(state, name)
        pool.load_state_dict(payload[name])
        pool.to(device)
    state.step = int(payload["step"])
    state.epoch = int(payload["epoch"])
    state.batch_in_epoch = int(payload["batch_in_epoch"])
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = rng["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached"])
    )
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("aug") is not None and state.aug_generator is not None:
        state.aug_generator.set_state(rng["aug"])
    for k, g in data_generators.items():
        g.set_state(saved_data[k])
    return state


__all__ = [
    "CheckpointError",
    "atomic_write",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_stale_temporaries",
    "resolve_resume",
    "restore_state",
    "run_dir_of",
    "save_checkpoint",
]
