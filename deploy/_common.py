"""What every exporter and runtime shares: the generator's description, artifact errors, loading.

A :class:`GeneratorSpec` travels with every artifact (ONNX ``metadata_props``, AOTInductor
package metadata, a JSON file beside a TensorRT engine), so an artifact runs without the
training code or its config: channels, the size multiple inputs are padded to, the arch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from torch import nn

from fastcgan.devices import resolve_device  # noqa: F401  (re-exported for the deploy modules)
from fastcgan.fileio import parse_json, read_json

METADATA_KEY = "fastcgan"
DIRECTIONS = ("AtoB", "BtoA")


class ArtifactError(ValueError):
    """An artifact that cannot be used: wrong type, truncated, not a fastcgan generator, mismatched."""

    def __init__(self, path: Any, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class SpecError(ValueError):
    """An artifact's fastcgan metadata is malformed (the loader names the file)."""


# Bounds on what an artifact's metadata may ask for: U-Net 256 needs multiples of 256; a static
# (TensorRT / fixed-shape) tile beyond 4096² is no tile.
MAX_SIZE_MULTIPLE = 1024
MAX_STATIC_SIDE = 4096


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """What a runtime needs to know about an exported generator."""

    input_nc: int = 3
    output_nc: int = 3
    size_multiple: int = 4  # H and W must be multiples of this (2 ** number of downsamplings)
    min_size: int = 8  # smallest H/W the graph accepts (reflection pads need more than the pad)
    arch: str | None = None
    direction: str | None = None  # which generator of its run (AtoB: G_AB), None if unknown
    # A paired recipe's (pix2pix) --direction: which half of an A|B pair is the input (BtoA: the
    # right one), so evaluating or translating pairs with the artifact alone reads the right half.
    pairs_direction: str | None = None
    dtype: str = "float32"
    static_hw: tuple[int, int] | None = None
    config: dict = dataclasses.field(default_factory=dict)  # build_generator kwargs, when known

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["static_hw"] = list(self.static_hw) if self.static_hw else None
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GeneratorSpec:
        """Parse and check the spec an artifact carries. The file may be crafted: every field is
        checked for type and range (a ``size_multiple`` of 0 divided by zero, a ``static_hw`` of
        60000² allocated 43 GB), so a bad one is a :class:`SpecError`, never a crash later."""
        try:
            d = parse_json(text)
        except ValueError as e:
            raise SpecError(f"fastcgan metadata is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise SpecError(f"fastcgan metadata must be a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}

        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name, lo, hi in (("input_nc", 1, 4), ("output_nc", 1, 4), ("size_multiple", 1, MAX_SIZE_MULTIPLE),
                             ("min_size", 1, MAX_STATIC_SIDE)):
            v = d.get(name, getattr(cls, name))
            if not (whole(v) and lo <= v <= hi):
                raise SpecError(f"fastcgan metadata: {name} must be an integer in [{lo}, {hi}], got {v!r}")
        hw = d.get("static_hw")
        if hw:
            if not (isinstance(hw, list) and len(hw) == 2 and all(whole(v) and 1 <= v <= MAX_STATIC_SIDE for v in hw)):
                raise SpecError(f"fastcgan metadata: static_hw must be [height, width] in [1, {MAX_STATIC_SIDE}], "
                                f"got {hw!r}")
            d["static_hw"] = tuple(hw)
        else:
            d["static_hw"] = None
        if d.get("dtype", "float32") not in ("float32", "float16", "bfloat16"):
            raise SpecError(f"fastcgan metadata: unknown dtype {d.get('dtype')!r}")
        if d.get("arch") is not None and not isinstance(d["arch"], str):
            raise SpecError(f"fastcgan metadata: arch must be a string, got {d['arch']!r}")
        for name in ("direction", "pairs_direction"):
            if d.get(name) is not None and d[name] not in DIRECTIONS:
                raise SpecError(f"fastcgan metadata: {name} must be one of {DIRECTIONS} or null, got {d[name]!r}")
        if not isinstance(d.get("config", {}), dict):
            raise SpecError(f"fastcgan metadata: config must be an object, got {d.get('config')!r}")
        return cls(**d)

    def replace(self, **kw) -> GeneratorSpec:
        return dataclasses.replace(self, **kw)


def round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def min_size_for(size_multiple: int) -> int:
    """Smallest H/W a generator accepts: a multiple of ``size_multiple`` and at least 8, so
    that the 4x-downsampled ResNet feature map (>= 2 px) can take its 1-px reflection pad."""
    return size_multiple * max(1, math.ceil(8 / size_multiple))


def size_multiple_of(arch: str | None, model: nn.Module | None = None) -> int:
    """H/W multiple for ``arch`` (``fastcgan.models.generator_size_multiple``), else from the
    model's stride-2 convolutions."""
    if arch:
        try:
            from fastcgan.models import generator_size_multiple

            return int(generator_size_multiple(arch))
        except (ImportError, AttributeError):
            pass
        except (KeyError, ValueError) as e:
            raise ValueError(f"unknown generator arch {arch!r}: {e}") from e
    if model is not None:
        downs = sum(
            1 for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2)
        )
        return 2 ** downs if downs else 1
    return 4


def channels_of(model: nn.Module) -> tuple[int, int]:
    """(input_nc, output_nc): the generator's own attributes / config, else its first and last
    convolution in module order (right for sequential nets, not for U-Nets without attributes)."""
    cfg = _model_config(model)
    i, o = getattr(model, "input_nc", cfg.get("input_nc")), getattr(model, "output_nc", cfg.get("output_nc"))
    if isinstance(i, int) and isinstance(o, int):
        return i, o
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution: not an image generator")
    return convs[0].in_channels, convs[-1].out_channels


def spec_for_model(
    model: nn.Module,
    *,
    arch: str | None = None,
    direction: str | None = None,
    pairs_direction: str | None = None,
    config: dict | None = None,
    size_multiple: int | None = None,
) -> GeneratorSpec:
    config = dict(config or {})
    arch = arch or config.get("arch")
    in_nc, out_nc = channels_of(model)
    mult = int(size_multiple) if size_multiple else size_multiple_of(arch, model)
    return GeneratorSpec(
        input_nc=in_nc, output_nc=out_nc, size_multiple=mult, min_size=min_size_for(mult), arch=arch,
        direction=direction, pairs_direction=pairs_direction, config={k: v for k, v in config.items() if _jsonable(v)},
    )


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# --------------------------------------------------------------------------------------------
# Loading torch generators (run dirs, .safetensors, official .pth)
# --------------------------------------------------------------------------------------------
def _safetensors_config(path: str) -> dict:
    """The build_generator kwargs stored in a fastcgan .safetensors header (empty when absent)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    for key in ("config", "generator", "fastcgan", "build_generator"):
        if key in meta:
            try:
                d = parse_json(meta[key])
                if isinstance(d, dict):
                    return d
            except ValueError:
                pass
    out = {}
    for k, v in meta.items():
        try:
            out[k] = parse_json(v)
        except ValueError:
            out[k] = v
    return out


def _model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, dict):
        return dict(cfg)
    return {}


def load_torch_generator(
    path: str, direction: str | None = None, backend: str = "auto"
) -> tuple[nn.Module, GeneratorSpec]:
    """A fastcgan generator from a run dir, a self-describing ``.safetensors`` file or a training
    checkpoint (``.ckpt``: the generator at that step), in eval mode. ``direction`` picks a run's
    or checkpoint's generator (default AtoB); a ``.safetensors`` file is one generator, whose spec
    says the direction it records (metadata or file name) unless ``direction`` relabels it."""
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not os.path.exists(path):
        raise ArtifactError(path, "no such file or directory")
    if not (os.path.isfile(path) or os.path.isdir(path)):  # a device or FIFO: reading may never end
        raise ArtifactError(path, "not a regular file or a run directory")
    if os.path.isfile(path) and not path.lower().endswith((".safetensors", ".ckpt")):
        raise ArtifactError(
            path, "not a fastcgan generator: expected a run directory, a .safetensors generator, a training "
            ".ckpt, an .onnx model, a TensorRT .engine or an AOTInductor .pt2 package (official CycleGAN "
            ".pth files need --from-official with --arch)"
        )
    try:
        from fastcgan.models import load_generator
    except ImportError as e:  # pragma: no cover - the models package is part of fastcgan
        raise ArtifactError(path, f"fastcgan.models is unavailable ({e})") from e
    if os.path.isfile(path) and path.lower().endswith(".safetensors"):
        direction = _file_direction(path, direction)
    else:
        direction = direction or _default_generator(path)
    try:
        if path.lower().endswith(".ckpt"):
            from fastcgan.nn import set_backend
            from fastcgan.train.checkpoint import checkpoint_generator

            model = set_backend(checkpoint_generator(path, direction), backend)
        else:
            model = load_generator(path, direction=direction or "AtoB", backend=backend)
    except FileNotFoundError as e:
        raise ArtifactError(path, f"no generator for direction {direction}: {e}") from e
    except Exception as e:
        raise ArtifactError(path, f"not a loadable fastcgan generator ({type(e).__name__}: {e})") from e
    model.eval()
    config = _model_config(model)
    if not config:
        st = path
        if os.path.isdir(path):
            st = os.path.join(path, f"generator_{direction}.safetensors")
            cj = os.path.join(path, "config.json")
            if not os.path.exists(st) and os.path.exists(cj):
                config = read_json(cj)
        if not config and os.path.isfile(st):
            config = _safetensors_config(st)
    config = {k: v for k, v in config.items() if k != "backend"}
    return model, spec_for_model(model, arch=config.get("arch"), direction=direction,
                                 pairs_direction=_pairs_direction(path, direction), config=config)


def _pairs_direction(path: str, direction: str | None) -> str | None:
    """What a pix2pix generator records of its --direction: its file's metadata, else (a run or
    checkpoint written before files held it) the run's config."""
    from fastcgan.models import read_pairs_direction

    file = path if os.path.isfile(path) and path.lower().endswith(".safetensors") else None
    if os.path.isdir(path):
        file = os.path.join(path, f"generator_{direction}.safetensors")
    if file is not None and os.path.isfile(file):
        try:
            own = read_pairs_direction(file)
        except (OSError, ValueError) as e:
            raise ArtifactError(file, str(e)) from None
        if own is not None:
            return own
    from fastcgan.evaluate import is_run

    if is_run(path):
        from fastcgan.evaluate_paired import run_pairs_direction

        return run_pairs_direction(path)
    return None


def _default_generator(path: str) -> str:
    """The generator a run directory or checkpoint gives without a direction: AtoB, or the run's
    only one (a CUT run trained --direction BtoA has just BtoA)."""
    from fastcgan.evaluate import run_generators

    try:
        has = run_generators(path)
    except ValueError:  # an unreadable checkpoint: loading it says what is wrong
        return "AtoB"
    return "BtoA" if has == ("BtoA",) else "AtoB"


def _file_direction(path: str, asked: str | None) -> str | None:
    """The direction a one-generator ``.safetensors`` file runs as (:func:`artifact_direction`)."""
    from fastcgan.models import read_generator_direction

    try:
        own = read_generator_direction(path)
    except (OSError, ValueError) as e:
        raise ArtifactError(path, f"not a loadable fastcgan generator ({e})") from None
    return artifact_direction(own, asked)


def artifact_direction(own: str | None, asked: str | None) -> str | None:
    """The direction a one-generator artifact is used as: ``asked`` when given (a released
    zebra2horse model sits in its folder's AtoB slot, yet scores against horse2zebra's B images),
    else ``own``, the one it records (its run's generator; None if unknown)."""
    if asked is not None and asked not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {asked!r}")
    return asked or own


def load_official(
    path: str, arch: str, ngf: int | None = None, norm: str = "instance", use_dropout: bool | None = None,
    backend: str = "auto", bn_inference: str = "per_image", color_space: str = "rgb",
) -> tuple[nn.Module, GeneratorSpec]:
    """An official CycleGAN/pix2pix (or CUT) ``latest_net_G*.pth`` as a fastcgan generator.

    ``bn_inference`` (BatchNorm generators): ``per_image`` reproduces the official ``test.py``
    (batch statistics at batch 1), ``running`` its ``--eval``; recorded in the spec's config.
    ``ngf=None``: the width the checkpoint's weights have.
    ``color_space="lab"``: the official colorization model's G (L -> ab), exported RGB -> RGB."""
    if not os.path.isfile(path):
        raise ArtifactError(path, "no such file (--from-official)")
    from fastcgan.models import load_official_generator

    try:
        model = load_official_generator(path, arch=arch, ngf=ngf, norm=norm, use_dropout=use_dropout,
                                        backend=backend, bn_inference=bn_inference, color_space=color_space)
    except Exception as e:
        raise ArtifactError(
            path, f"cannot load as an official {arch} generator (ngf={'from the file' if ngf is None else ngf}, "
            f"norm={norm}): {type(e).__name__}: {e}"
        ) from e
    model.eval()
    net = getattr(model, "net", model)
    config = dict(arch=arch, ngf=net.ngf, norm=norm, use_dropout=bool(getattr(net, "use_dropout", use_dropout)))
    # The official CUT resampling, read from the file's layout (recorded, as in generator files, when on).
    config.update({k: True for k in ("antialias", "antialias_up") if getattr(net, k, False)})
    if norm == "batch":
        config["bn_inference"] = bn_inference
    if color_space == "lab":  # the network's channels (L -> ab); the colorizer's are RGB -> RGB
        config.update(input_nc=1, output_nc=2, color_space="lab")
    else:
        in_nc, out_nc = channels_of(model)
        config.update(input_nc=in_nc, output_nc=out_nc)
    return model, spec_for_model(model, arch=arch, config=config)


def artifact_kind(path: str) -> str:
    """``run`` / ``safetensors`` / ``onnx`` / ``engine`` / ``aoti`` from a path; ArtifactError otherwise."""
    if os.path.isdir(path):
        return "run"
    if not os.path.exists(path):
        raise ArtifactError(path, "no such file or directory")
    if not os.path.isfile(path):  # a FIFO would block its reader forever, a device never ends
        raise ArtifactError(path, "not a regular file or a run directory")
    ext = os.path.splitext(path)[1].lower()
    kinds = {".safetensors": "safetensors", ".ckpt": "checkpoint", ".onnx": "onnx", ".engine": "engine",
             ".trt": "engine", ".plan": "engine", ".pt2": "aoti"}
    if ext not in kinds:
        official = ""
        if ext in (".pth", ".pt"):
            official = (" (an official CycleGAN/pix2pix .pth: `fastcgan-export --from-official PTH --arch ARCH` "
                        "converts it; the released ones: `fastcgan-download NAME --pretrained`)")
        raise ArtifactError(
            path, f"unknown artifact type {ext or '(no extension)'!r}: expected a run directory, .safetensors, "
            f"a training .ckpt, .onnx, .engine/.trt/.plan (TensorRT) or .pt2 (AOTInductor){official}"
        )
    return kinds[ext]


