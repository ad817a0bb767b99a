"""Complete, atomic, verified training checkpoints, and the resume policy.

``RUN/checkpoints/step_<step:09d>.ckpt`` (``torch.save`` of plain containers and tensors, read
back with ``weights_only=True``) holds everything a run needs to continue bit-exactly: the
recipe's networks, optimizers and LR schedules, the grad scaler, the image pools, every RNG
stream the step and the data path draw from (python ``random``, numpy, torch CPU, CUDA, the
augmentation generator, the data path's generators such as the GPU image bank's), the
step / epoch / data position, and the config.

Integrity: every checkpoint carries a SHA-256 digest of each tensor and one of the rest of the
payload; :func:`load_checkpoint` recomputes them, so a flipped byte anywhere in the tensor data
or the metadata is an error naming the file and the tensor (torch's zip reader checks no CRC).
Writes are atomic (:mod:`fastcgan.fileio`); a new checkpoint is read back and verified before
any older one is rotated away, so the newest verified checkpoint is never deleted.
``--resume`` (auto or a run directory) falls back to the newest checkpoint that verifies and
says which newer ones it skipped and why. :func:`restore_state` validates the whole payload
against a freshly built state before it applies anything, so a bad file never half-applies.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from typing import Any, Optional

import numpy as np
import torch

from fastcgan.fileio import atomic_writer, remove_stale_temporaries
from fastcgan.models.torch_files import describe_load_error, foreign_tensors, load_torch_file, unbacked_tensor_bytes
from fastcgan.train.config import SCHEDULE_FIELDS, TRAINING_FIELDS, ConfigError, TrainConfig
from fastcgan.train.state import TrainState, build_state, lr_factor, lr_lambda

FORMAT = "fastcgan.checkpoint"
FORMAT_VERSION = 2  # 2: recipe-generic (nets/optimizers/schedulers/pools dicts) + digests
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
    """Checkpoint files of a run, oldest first (temporary files are ignored)."""
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return []
    found = sorted((int(m.group(1)), n) for n in os.listdir(d) if (m := _NAME.match(n)))
    return [os.path.join(d, n) for _, n in found]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def run_dir_of(ckpt_file: str) -> Optional[str]:
    """The run directory of a checkpoint file (``RUN/checkpoints/step_N.ckpt`` -> ``RUN``);
    ``None`` for a file outside that layout (a copied or downloaded checkpoint)."""
    d = os.path.dirname(os.path.abspath(ckpt_file))
    if os.path.basename(d) != CKPT_DIR or not _NAME.match(os.path.basename(ckpt_file)):
        return None
    return os.path.dirname(d)


# ---------------------------------------------------------------------------------------------
# digests
# ---------------------------------------------------------------------------------------------
def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}|{t.numel()}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _digests(obj: Any, path: str, out: dict[str, str]) -> Any:
    """A tensor-free canonical form of ``obj`` (tensors replaced by their digests, collected in
    ``out`` by their path in the payload, e.g. ``nets/G_AB/model.1.weight``)."""
    if isinstance(obj, torch.Tensor):
        out[path] = d = _tensor_digest(obj)
        return ["tensor", str(obj.dtype), list(obj.shape), d]
    if isinstance(obj, dict):
        return ["dict", [[repr(k), _digests(obj[k], f"{path}/{k}", out)] for k in sorted(obj, key=repr)]]
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, [_digests(v, f"{path}/{i}", out) for i, v in enumerate(obj)]]
    return repr(obj)


def payload_digest(payload: dict) -> dict:
    """``{"tensors": {path: sha256}, "structure": sha256}`` of everything but ``digest``."""
    tensors: dict[str, str] = {}
    canon = _digests({k: v for k, v in payload.items() if k != "digest"}, "", tensors)
    structure = hashlib.sha256(repr(canon).encode()).hexdigest()
    return {"algorithm": "sha256", "tensors": {k.lstrip("/"): v for k, v in tensors.items()}, "structure": structure}


def verify_digest(payload: dict, path: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the first damaged tensor (or the
    metadata) when the payload does not match the digest it carries."""
    saved = payload.get("digest")
    if not isinstance(saved, dict) or not isinstance(saved.get("tensors"), dict):
        raise CheckpointError(f"checkpoint {path} carries no content digest (written by an older fastcgan?)")
    now = payload_digest(payload)
    bad = [k for k, v in now["tensors"].items() if saved["tensors"].get(k) != v]
    missing = [k for k in saved["tensors"] if k not in now["tensors"]]
    if bad or missing:
        which = ", ".join((bad + missing)[:3])
        raise CheckpointError(
            f"checkpoint {path} is damaged: tensor {which} does not match its stored SHA-256 digest "
            f"({len(bad) + len(missing)} tensor(s) differ); the file was modified or corrupted on disk"
        )
    if saved.get("structure") != now["structure"]:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its metadata (config, counters, RNG states) does not match "
            "the stored SHA-256 digest"
        )


# ---------------------------------------------------------------------------------------------
# capture / save
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


def _optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with the CUDA-graph settings undone (plain float lr, not capturable),
    so the checkpoint resumes with or without --cuda-graphs (which re-applies them)."""
    sd = opt.state_dict()
    for g in sd["param_groups"]:  # state_dict() copies the groups: the optimizer is untouched
        g["lr"] = float(g["lr"])
        if "capturable" in g:
            g["capturable"] = False
    return sd


def capture(state: TrainState, config: dict, data_generators: dict | None = None, extra: dict | None = None) -> dict:
    """The checkpoint payload of ``state`` (tensors copied to CPU), with its digest."""
    py = random.getstate()
    rng = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "aug": state.aug_generator.get_state(),
        "data": {k: g.get_state() for k, g in (data_generators or {}).items()},
    }
    payload = _cpu(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config,
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "nets": {n: _module(net).state_dict() for n, net in state.nets.items()},
            "optimizers": {n: _optimizer_state(o) for n, o in state.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in state.schedulers.items()},
            "scaler": state.scaler.state_dict(),
            "pools": {n: p.state_dict() for n, p in state.pools.items()},
            "rng": rng,
            "extra": dict(extra or {}),
        }
    )
    payload["digest"] = payload_digest(payload)
    return payload


def save_checkpoint(
    state: TrainState,
    cfg: TrainConfig,
    run_dir: str,
    data_generators: dict | None = None,
    extra: dict | None = None,
) -> str:
    """Write ``RUN/checkpoints/step_<step>.ckpt`` atomically, read it back and verify it, then
    delete all but the newest ``cfg.run.keep_last`` (never the one just verified). Returns the
    path written. A failed write (disk full) raises ``fastcgan.fileio.WriteError`` naming the
    file and cause, and leaves every earlier checkpoint in place."""
    path = checkpoint_path(run_dir, state.step)
    remove_stale_temporaries(checkpoint_dir(run_dir))
    with atomic_writer(path) as f:
        torch.save(capture(state, cfg.to_dict(), data_generators, extra), f)
    load_checkpoint(path)  # verified before anything older is rotated away
    for old in list_checkpoints(run_dir)[: -cfg.run.keep_last]:
        if old != path:
            try:
                os.remove(old)
            except OSError:
                pass
    return path


# ---------------------------------------------------------------------------------------------
# load / restore
# ---------------------------------------------------------------------------------------------
_REQUIRED = (
    "config",
    "step",
    "epoch",
    "batch_in_epoch",
    "nets",
    "optimizers",
    "schedulers",
    "scaler",
    "pools",
    "rng",
    "extra",
    "digest",
)


def load_checkpoint(path: str) -> dict:
    """Read, structurally check and verify a checkpoint; any problem -> :class:`CheckpointError`
    naming the file. Nothing is applied here."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.lower().endswith((".safetensors", ".onnx", ".pt2", ".engine")):
        raise CheckpointError(
            f"{path} is an exported generator, not a training checkpoint (RUN/checkpoints/step_*.ckpt): resume "
            "with --resume RUN, or start a run from it with --init-generator AtoB=FILE")
    try:
        payload = load_torch_file(path)
    except Exception as e:  # truncated zip, not a torch file, refused unpickling ...
        raise CheckpointError(
            # torch.load's refusal explains how to load the file *unsafely*: never passed on.
            f"checkpoint {path} is corrupt, truncated or foreign and cannot be loaded safely: {describe_load_error(e)}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fastcgan training checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {payload.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    _check_tree(payload, path)  # before anything walks it
    # torch.save keeps views: a stride-0 tensor costs one element in the file but claims its whole
    # shape, which hashing it (a contiguous copy), building a network for it or a pool like it would
    # allocate. Checked first, over every tensor (dense CPU tensors of plain dtypes: nothing else is saved).
    foreign = foreign_tensors(_tensors(payload))
    if foreign:
        raise CheckpointError(f"checkpoint {path}: holds {foreign[0]} tensors: not a saved training state")
    extra = unbacked_tensor_bytes(_tensors(payload))
    if extra:
        raise CheckpointError(f"checkpoint {path}: its tensors claim {extra:,} bytes more than they hold "
                              "(stride-0 or shared views): not a saved training state")
    verify_digest(payload, path)
    rng = payload["rng"]
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        raise CheckpointError(f"checkpoint {path}: RNG state is missing")
    return payload


def checkpoint_config(path: str) -> TrainConfig:
    """The config of the training checkpoint ``path``, for deciding what to load from it: read
    memory-mapped (no tensor is read) and not verified -- loading it verifies everything."""
    try:
        payload = load_torch_file(path, mmap=True)
        return TrainConfig.from_dict(payload["config"])
    except Exception as e:  # noqa: BLE001 - corrupt, foreign, truncated: named with the file
        raise CheckpointError(f"checkpoint {path} cannot be read: {describe_load_error(e)}") from None


def checkpoint_directions(path: str) -> tuple[str, ...]:
    """The generator directions (``AtoB``, ``BtoA``) the training checkpoint ``path`` holds."""
    from fastcgan.recipes import get_recipe

    cfg = checkpoint_config(path)
    return tuple(get_recipe(cfg.model.recipe).exports_for(cfg))


def checkpoint_generator(path: str, direction: str = "AtoB") -> torch.nn.Module:
    """The deployable generator ``direction`` of the training checkpoint ``path`` (verified, on
    the CPU, in eval mode): the run's ``generator_<direction>.safetensors`` as it was at that step
    (the official ``test.py --epoch N``). Draws nothing from the global RNG."""
    from fastcgan.recipes import get_recipe

    payload = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(payload["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its config does not load: {e}") from None
    recipe = get_recipe(cfg.model.recipe)
    exports = recipe.exports_for(cfg)
    if direction not in exports:
        raise CheckpointError(
            f"checkpoint {path}: a {cfg.model.recipe} run has no {direction} generator "
            f"(it has {', '.join(exports)})"
        )
    name = exports[direction]
    _check_nets_unbuilt(path, recipe, cfg, payload["nets"])  # every network's keys and shapes
    with torch.random.fork_rng(devices=[]):  # the networks' initialisation, overwritten below
        net = recipe.networks(cfg)[name]
    net.load_state_dict(payload["nets"][name])
    return recipe.deployed(net).eval()


MAX_TREE_NODES, MAX_TREE_DEPTH = 1_000_000, 64  # a real checkpoint: ~10k containers, depth ~8


def _check_tree(payload, path: str) -> None:
    """Bounds what the walks below (tensors, digests) will visit: they recurse, and visit a
    container once per path to it, so one reached twice at each level (``L = [L, L]`` nested 23
    deep: 1.7 KB on disk) costs exponential time and memory, and a cyclic one recurses forever.
    This walk (iterative) counts the same visits, up to MAX_TREE_NODES and MAX_TREE_DEPTH; a
    legitimately shared container (pickle keeps shared objects shared) costs only its visits."""
    stack, visits = [(payload, 0)], 0
    while stack:
        obj, depth = stack.pop()
        if not isinstance(obj, (dict, list, tuple)) or not obj:
            continue
        visits += 1
        if depth > MAX_TREE_DEPTH or visits > MAX_TREE_NODES:
            raise CheckpointError(f"checkpoint {path}: nested deeper than {MAX_TREE_DEPTH} (a cyclic structure?) "
                                  f"or over {MAX_TREE_NODES:,} containers counting every path to a shared one: "
                                  "not a saved training state")
        stack.extend((v, depth + 1) for v in (obj.values() if isinstance(obj, dict) else obj))


def _tensors(obj):
    """Every tensor in nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _check_nets_unbuilt(path: str, recipe, cfg: TrainConfig, saved: dict) -> None:
    """Every network the config describes against the checkpoint's tensors (names, keys, shapes),
    built on the meta device (no memory): a config that claims networks far larger than the
    tensors the file holds (a few MB claiming ngf 512) is refused before they are allocated."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        nets = recipe.networks(cfg)
    _check_names(path, "networks", saved, nets)
    for n, net in nets.items():
        check_network(path, n, net, saved[n])


def _check_names(path: str, what: str, saved: dict, own: dict) -> None:
    if not isinstance(saved, dict) or set(saved) != set(own):
        got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"checkpoint {path}: {what} {got} do not match this recipe's {sorted(own)}")


def check_network(path: str, name: str, net: torch.nn.Module, sd: dict) -> None:
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise CheckpointError(f"checkpoint {path}: network {name} is not a state dict of tensors")
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
    params = [p for g in opt.param_groups for p in g["params"]]
    state = sd.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: optimizer {name} has no state")
    for i, entry in state.items():  # moments shaped like their parameter, the step a scalar
        if not (isinstance(i, int) and 0 <= i < len(params) and isinstance(entry, dict)):
            raise CheckpointError(f"checkpoint {path}: optimizer {name} has state for no parameter ({i!r})")
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.numel() != 1 and v.shape != params[i].shape:
                raise CheckpointError(f"checkpoint {path}: optimizer {name}'s {k} of parameter {i} has shape "
                                      f"{tuple(v.shape)}, its parameter {tuple(params[i].shape)}")


def _check_pool(path: str, name: str, size: int, channels: int, cfg: TrainConfig, sd: dict) -> None:
    """The saved pool holds ``size`` images of ``channels`` channels (at the crop size when the data
    is cropped; other sizes are checked against the data when training starts)."""
    images, n = sd.get("images"), sd.get("num_imgs")
    if not (isinstance(n, torch.Tensor) and n.numel() == 1 and 0 <= int(n) <= size):
        raise CheckpointError(f"checkpoint {path}: image pool {name} holds an impossible count ({n!r})")
    if images is None:
        return
    want = (size, channels) + ((cfg.data.crop_size,) * 2 if cfg.data.preprocess.endswith("crop") else ())
    if not (isinstance(images, torch.Tensor) and images.dim() == 4 and tuple(images.shape[:len(want)]) == want):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CheckpointError(f"checkpoint {path}: image pool {name} holds images {got}, not {want} + ...")


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
    from fastcgan.recipes import get_recipe

    data_generators = data_generators or {}
    recipe = get_recipe(cfg.model.recipe)
    _check_nets_unbuilt(path, recipe, cfg, payload["nets"])  # names, keys and shapes of every network
    py_before = random.getstate()
    torch_before = torch.get_rng_state()
    state = build_state(cfg, device)  # draws from the global RNG for init: restored below
    random.setstate(py_before)
    torch.set_rng_state(torch_before)
    _check_names(path, "optimizers", payload["optimizers"], state.optimizers)
    _check_names(path, "schedulers", payload["schedulers"], state.schedulers)
    _check_names(path, "image pools", payload["pools"], state.pools)
    for n, opt in state.optimizers.items():
        _check_opt(path, n, opt, payload["optimizers"][n])
    for n, (size, channels) in recipe.pools(cfg).items():
        _check_pool(path, n, size, channels, cfg, payload["pools"][n])
    rng = payload["rng"]
    saved_data = rng.get("data") or {}

    for n, net in state.nets.items():
        _module(net).load_state_dict(payload["nets"][n])
    # Optimizer.load_state_dict casts the moments to each parameter's device and dtype.
    for n, opt in state.optimizers.items():
        opt.load_state_dict(payload["optimizers"][n])
    for n, sched in state.schedulers.items():
        sched.load_state_dict(payload["schedulers"][n])
    use_schedule(state, cfg)  # a resume may have changed --lr / --epochs / --epochs-decay
    if payload["scaler"]:
        state.scaler.load_state_dict(payload["scaler"])
    for n, pool in state.pools.items():
        pool.load_state_dict(payload["pools"][n])
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
    if rng.get("aug") is not None:
        state.aug_generator.set_state(rng["aug"])
    for k, g in data_generators.items():
        if k in saved_data:
            g.set_state(saved_data[k])
        else:  # another data path than the checkpoint's (--data-on-gpu changed; the loop says so):
            # a stream of its own from (seed, step), not the one the run started with
            g.manual_seed((cfg.run.seed * 1_000_003 + state.step + 1) & 0x7FFF_FFFF_FFFF)
    return state


# ---------------------------------------------------------------------------------------------
# the resume policy
# ---------------------------------------------------------------------------------------------
def newest_valid_checkpoint(run_dir: str) -> tuple[Optional[str], Optional[dict], list[str]]:
    """``(path, payload, skipped)``: the newest checkpoint of ``run_dir`` that loads and verifies
    (``None`` if there is none), and one message per newer checkpoint skipped, saying why."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append(f"skipped {path}: {e}")
    return None, None, skipped


def find_resume_checkpoint(resume: str, run_dir: str) -> tuple[Optional[str], Optional[dict], list[str]]:
    """``--resume`` -> ``(checkpoint file, verified payload, skipped messages)``. ``"auto"``: the
    newest valid checkpoint of ``run_dir`` or ``(None, None, ...)`` (a new run); a run directory
    (or its ``checkpoints/``): its newest valid one; a file: that file, verified (no fallback --
    the user named it)."""
    if resume == "auto":
        path, payload, skipped = newest_valid_checkpoint(run_dir)
        if path is None and skipped:
            raise CheckpointError(f"--resume: no checkpoint of {run_dir} verifies: " + "; ".join(skipped))
        return path, payload, skipped
    if os.path.isfile(resume):
        return resume, load_checkpoint(resume), []
    if os.path.isdir(resume):
        base = resume
        if os.path.basename(os.path.normpath(resume)) == CKPT_DIR:
            base = os.path.dirname(os.path.normpath(resume))
        path, payload, skipped = newest_valid_checkpoint(base)
        if path is None:
            why = ("; ".join(skipped)) if skipped else f"no checkpoint ({CKPT_DIR}/step_*.ckpt) in this directory"
            raise CheckpointError(f"--resume {resume}: {why}")
        return path, payload, skipped
    if os.path.exists(resume):  # a FIFO or device: never opened (a FIFO would block the reader)
        raise CheckpointError(f"--resume {resume}: not a regular file or a run directory")
    raise CheckpointError(f"--resume {resume}: no such file or directory")


def config_for_resume(ckpt_cfg: TrainConfig, cfg: TrainConfig, run_dir: str,
                      requested: Optional[dict] = None) -> TrainConfig:
    """The checkpoint's training fields with ``cfg``'s run-control fields (device, amp, compile,
    cadences, max_steps, data location and workers), the schedule when ``requested``
    (:data:`~fastcgan.train.config.SCHEDULE_FIELDS`) and the checkpoint's run directory."""
    keep = {k: v for k, v in cfg.flat().items() if k not in TRAINING_FIELDS}
    if not has_data_location(cfg):  # `--resume RUN` alone: the data the run was trained on
        keep.update(dataroot=ckpt_cfg.data.dataroot, dataset=ckpt_cfg.data.dataset)
    keep.update({k: requested[k] for k in SCHEDULE_FIELDS if k in (requested or {})})
    keep.update(
        name=os.path.basename(os.path.abspath(run_dir)), output_dir=os.path.dirname(os.path.abspath(run_dir))
    )
    return ckpt_cfg.replace(**keep)


def has_data_location(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` names its data (``--dataroot`` or ``--dataset synthetic``); a resume without
    one continues on the checkpoint's."""
    return bool(cfg.data.dataroot) or cfg.data.dataset == "synthetic"


def training_field_conflicts(ckpt_cfg: TrainConfig, overrides: dict) -> list[str]:
    a = ckpt_cfg.flat()
    free = ("epochs_decay", "lr") if a["lr_policy"] == "cosine" else SCHEDULE_FIELDS
    return [
        f"{k}={overrides[k]!r} (checkpoint: {'unset, its default' if a[k] is None else repr(a[k])})"
        + (" -- the cosine schedule's period (--epochs) is fixed at the start" if k in SCHEDULE_FIELDS else "")
        for k in overrides
        if k in TRAINING_FIELDS and k not in free and overrides[k] != a[k]
    ]


def _schedule_change(ckpt_cfg: TrainConfig, cfg: TrainConfig, payload: dict) -> Optional[str]:
    """What a new schedule does to the run, in one line (None: the same schedule)."""
    old, new = ckpt_cfg.optim, cfg.optim
    if (old.epochs, old.epochs_decay, old.lr) == (new.epochs, new.epochs_decay, new.lr):
        return None
    steps = max(int(s.get("last_epoch", 0)) for s in payload["schedulers"].values())  # the schedule's position
    was, now = old.lr * lr_factor(old, steps), new.lr * lr_factor(new, steps)
    line = (f"fastcgan: training schedule changed from lr {old.lr:g}, {old.epochs}+{old.epochs_decay} epochs to "
            f"lr {new.lr:g}, {new.epochs}+{new.epochs_decay} epochs after epoch {int(payload['epoch'])}")
    if abs(was - now) > 1e-12 * max(abs(was), abs(now)):
        line += f"; the learning rate moves from {was:.4g} to {now:.4g}"
    return line


def use_schedule(state: TrainState, cfg: TrainConfig) -> None:
    """Give restored LR schedules ``cfg``'s lr / epochs / epochs_decay (their state holds the ones
    they were built with) and set each optimizer's LR to the new schedule's at the restored epoch;
    with the same schedule it changes nothing."""
    o = cfg.optim
    for sched in state.schedulers.values():
        lambdas = getattr(sched, "lr_lambdas", ())
        new = lr_lambda(o)
        if all(b == o.lr for b in sched.base_lrs) and all(vars(f) == vars(new) for f in lambdas):
            continue
        if lambdas:
            sched.lr_lambdas = [lr_lambda(o) for _ in lambdas]
        sched.base_lrs = [o.lr] * len(sched.base_lrs)
        if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):  # its own period: runs from before
            factor = (1 + math.cos(math.pi * sched.last_epoch / sched.T_max)) / 2  # 2026-11-28 had epochs + decay
        else:
            factor = lr_factor(o, sched.last_epoch)
        lr = o.lr * factor
        for group in sched.optimizer.param_groups:
            group["initial_lr"] = o.lr
            if isinstance(group["lr"], torch.Tensor):  # capturable (CUDA-graph) optimizers keep a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        sched._last_lr = [lr] * len(sched.optimizer.param_groups)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resume_destination(cfg: TrainConfig, ckpt_path: str, requested: Optional[dict] = None) -> str:
    """The run directory a resumed run writes to, checked so that it overwrites nothing.

    A checkpoint of a run (``RUN/checkpoints/step_N.ckpt``, or the newest of ``--resume RUN``)
    continues in ``RUN``, unless ``--name`` was given: then it branches into ``OUTPUT_DIR/NAME``;
    so does a checkpoint file outside a run's layout (its folder is not a run: writing there would
    replace whatever files it holds). A branch needs a run directory without checkpoints, and
    continuing in ``RUN`` from a named file that has newer checkpoints after it would overwrite
    them: both are :class:`CheckpointError` before anything is written."""
    own = run_dir_of(ckpt_path)
    branch = bool(requested) and "name" in requested
    dest = cfg.run_dir if (cfg.run.resume == "auto" or branch or own is None) else own
    existing = list_checkpoints(dest)
    if own is None or not _same_dir(own, dest):
        if existing:
            raise CheckpointError(
                f"--resume {ckpt_path}: the run directory it would continue in, {dest}, already has checkpoints "
                f"of its own ({os.path.basename(existing[-1])}, ...); continue that run with --resume {dest}, or "
                "branch into a new run with another --name / --output-dir"
            )
        return dest
    if os.path.isfile(cfg.run.resume):  # a named file (auto / a run directory take the newest valid one)
        names = [os.path.realpath(p) for p in existing]
        here = os.path.realpath(ckpt_path)
        newer = names[names.index(here) + 1 :] if here in names else []
        if newer:
            raise CheckpointError(
                f"--resume {ckpt_path}: {dest} has newer checkpoints ({', '.join(map(os.path.basename, newer))}) "
                f"that continuing from this one there would overwrite; continue from the newest with --resume "
                f"{dest}, or branch from this one into a new run with --name NEW"
            )
    return dest


def resume_plan(cfg: TrainConfig, requested: Optional[dict] = None):
    """Decide what a run starts from, before anything is written.

    Returns ``(cfg, run_dir, payload, ckpt_path, messages)``: with ``cfg.run.resume`` the
    checkpoint's config (which decides what is trained; ``cfg`` may change only how it runs) and
    its verified payload; else ``cfg`` itself and ``None``. ``requested``: the flat fields the
    user set explicitly; one that would change what is trained is a :class:`ConfigError`. A run
    directory that already has checkpoints is never started afresh (that would mix two runs)."""
    run_dir = cfg.run_dir
    if not cfg.run.resume:
        if list_checkpoints(run_dir):
            raise CheckpointError(
                f"run directory {run_dir} already has checkpoints; pass --resume to continue it "
                "or choose another --name / --output-dir"
            )
        return cfg, run_dir, None, None, []
    ckpt_path, payload, messages = find_resume_checkpoint(cfg.run.resume, run_dir)
    if ckpt_path is None:
        if not has_data_location(cfg):
            raise ConfigError(f"--dataroot is required: nothing to resume in {run_dir}, so this is a new run "
                              "(or --dataset synthetic)")
        return cfg, run_dir, None, None, messages + [f"fastcgan: nothing to resume in {run_dir}; starting a new run"]
    run_dir = resume_destination(cfg, ckpt_path, requested)
    try:
        ckpt_cfg = TrainConfig.from_dict(payload["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_path}: stored config is invalid: {e}") from e
    conflicts = training_field_conflicts(ckpt_cfg, requested or {})
    preset = (requested or {}).get("preset")
    if preset is not None and preset != ckpt_cfg.preset:  # it would set what the checkpoint decides
        conflicts.append(f"preset={preset!r} (checkpoint: {ckpt_cfg.preset!r})")
    if conflicts:
        raise ConfigError(
            f"--resume {ckpt_path}: these settings differ from the checkpoint's and cannot change "
            f"when resuming: {'; '.join(conflicts)}"
        )
    new_cfg = config_for_resume(ckpt_cfg, cfg, run_dir, requested)
    root = new_cfg.data.dataroot
    if not has_data_location(cfg) and new_cfg.data.dataset == "folder" and not os.path.isdir(root or ""):
        raise ConfigError(f"--resume {ckpt_path}: the data it was trained on, {root}, is not a directory here; "
                          "give --dataroot (or --dataset synthetic)")
    # A resume that would train nothing only rewrote the checkpoint and replaced the run's
    # summary with an empty one (and a shrunk schedule announced a negative LR).
    step, epoch, o = int(payload["step"]), int(payload["epoch"]), new_cfg.optim
    if new_cfg.run.max_steps is not None and step >= new_cfg.run.max_steps:
        raise ConfigError(f"--resume {ckpt_path}: nothing left to train: the run is at step {step:,} and "
                          f"--max-steps is {new_cfg.run.max_steps:,}; raise --max-steps to continue it")
    if epoch >= o.epochs + o.epochs_decay:
        raise ConfigError(f"--resume {ckpt_path}: nothing left to train: the run has done {epoch} epochs and its "
                          f"schedule (--epochs {o.epochs} + --epochs-decay {o.epochs_decay}) ends there; raise "
                          "--epochs / --epochs-decay to continue it")
    change = _schedule_change(ckpt_cfg, new_cfg, payload)
    lag = _schedule_lag(ckpt_cfg, payload)
    return new_cfg, run_dir, payload, ckpt_path, messages + [m for m in (change, lag) if m]


def _schedule_lag(ckpt_cfg: TrainConfig, payload: dict) -> Optional[str]:
    """A note for a run begun before its schedules took the official start-of-epoch step
    (``Recipe.lr_update_at_epoch_start``, 2026-11-29): it continues exactly as it began, an epoch
    behind the official LR."""
    from fastcgan.recipes import get_recipe

    steps = {int(s.get("last_epoch", -1)) for s in payload["schedulers"].values()}
    if get_recipe(ckpt_cfg.model.recipe).lr_update_at_epoch_start and steps == {int(payload["epoch"])}:
        return ("fastcgan: this run began before fastcgan took the official start-of-epoch LR update; it "
                "continues exactly as it began, its learning rate one epoch behind the official schedule")
    return None


__all__ = [
    "CheckpointError",
    "capture",
    "checkpoint_path",
    "config_for_resume",
    "find_resume_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "newest_valid_checkpoint",
    "payload_digest",
    "restore_state",
    "resume_destination",
    "resume_plan",
    "run_dir_of",
    "save_checkpoint",
    "training_field_conflicts",
    "verify_digest",
]
