"""Training configuration: frozen dataclasses with named presets (the CLI only parses into them).

    cfg = TrainConfig.from_preset("cyclegan", dataroot="datasets/horse2zebra", amp=True)
    cfg.to_dict() / TrainConfig.from_dict(d)    # checkpoint and RUN/config.json

``from_preset(name, **overrides)`` takes flat field names (``ngf=32``, ``batch_size=4``); a name
that is not a field of exactly one section is an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from fastcgan.losses import GAN_MODES
from fastcgan.models import DISCRIMINATOR_ARCHS, GENERATOR_ARCHS, NORMS
from fastcgan.models.io import MAX_WIDTH  # --ngf / --ndf

LR_POLICIES = ("linear", "step", "cosine", "plateau")
KERNELS = ("auto", "torch", "triton", "cuda", "cpp")
DATASETS = ("folder", "synthetic")
DIRECTIONS = ("AtoB", "BtoA")  # paired data: AtoB = left half is the input
PREPROCESS = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (and its CLI flag)."""


def _flag(name: str) -> str:
    return "--init-generator" if name == "init_generators" else "--" + name.replace("_", "-")


def _is_utf8(text: str) -> bool:
    """False for a path with bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name} ({_flag(name)}): {msg}")


# Largest image side accepted for --load-size / --crop-size: far above any real training size,
# small enough that the buffers it implies stay allocatable (and ints stay ints).
MAX_IMAGE_SIDE = 16384
# Bounds on flags whose value sets how much memory or how many processes a run takes: far above
# any published setting (ngf/ndf 64, netF_nc 256, 3 discriminator layers), below what would try
# to allocate terabytes or fork without limit.
MAX_NETF_NC = 4096
MAX_N_LAYERS_D = 10
MAX_NUM_WORKERS = 128
# The image pools are allocated whole at their first query (two of them, fakes at the crop size:
# 1000 256x256 images = 0.8 GB each in fp32); the official default is 50.
MAX_POOL_SIZE = 1000
MAX_SAMPLES = 64  # images per domain in a sample grid
# The initial weights' std (normal) or gain (xavier, orthogonal): 500x the official 0.02, above any
# sensible setting; 1e12 made the first forward pass overflow to NaN.
MAX_INIT_GAIN = 10.0
# Adam's step is ~lr per weight: above 1 a GAN diverges at once, and 1e300 overflowed fp32 in the
# optimizer after the run directory was written (the official default is 2e-4).
MAX_LR = 1.0
# PatchNCE scores every sampled patch against every other of its image: memory and time grow with
# num_patches² per layer (the official 256: 0.26 MB of logits an image a layer; 4096: 67 MB; an
# unbounded value takes every position of the image-sized first layer, ~19 GB at 256x256).
MAX_NUM_PATCHES = 4096


def min_discriminator_side(m: "ModelConfig") -> int:
    """Smallest image side the discriminator gives a score for: 4x4 convolutions, n stride-2
    ones halve the side, the PatchGAN's two stride-1 ones take 1 each (udacity's one), and at
    least one score must remain."""
    if m.netD not in ("basic", "n_layers", "udacity"):
        return 1
    n = {"basic": 3, "n_layers": m.n_layers_D, "udacity": 4}[m.netD]
    return (2 if m.netD == "udacity" else 3) * 2**n


@dataclass(frozen=True)
class ModelConfig:
    recipe: str = "cyclegan"  # --model: the training recipe (fastcgan.recipes)
    netG: str = "resnet_9blocks"
    netD: str = "basic"
    ngf: int = 64
    ndf: int = 64
    n_layers_D: int = 3
    norm: str = "instance"
    use_dropout: bool = False
    input_nc: int = 3
    output_nc: int = 3
    init_type: str = "normal"
    init_gain: float = 0.02
    # Anti-aliased resampling (the official CUT default; its --no_antialias / --no_antialias_up):
    # blur-pool downsampling in the ResNet generator and the PatchGAN, blur upsampling in the generator.
    antialias: bool = False
    antialias_up: bool = False
    # CUT: the generator layers PatchNCE ties (official --nce_layers syntax) and the projection
    # heads' width (official --netF_nc).
    nce_layers: str = "0,4,8,12,16"
    netF_nc: int = 256
    # "DIRECTION=PATH" (--init-generator): the exported generator of that direction starts from the
    # weights of a generator (file, run directory, pretrained folder, training or official checkpoint)
    # instead of init_type; everything else is initialised as usual.
    init_generators: tuple[str, ...] = ()
    # An official run's checkpoint folder (--init-official): every network starts from the official
    # file of that name and epoch (EPOCH_net_G_A.pth ...; the recipe's official_networks), as the
    # official --continue_train --epoch EPOCH (fresh optimizers, empty image pools).
    init_official: Optional[str] = None
    init_official_epoch: str = "latest"

    def __post_init__(self) -> None:  # one order and type (JSON gives a list), so configs compare equal
        object.__setattr__(self, "init_generators", tuple(sorted(self.init_generators, key=str)))

    def validate(self) -> None:
        from fastcgan.recipes import RECIPES

        _check(self.recipe in RECIPES, "recipe", f"must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        _check(self.netG in GENERATOR_ARCHS, "netG", f"must be one of {GENERATOR_ARCHS}, got {self.netG!r}")
        _check(
            self.netD in DISCRIMINATOR_ARCHS,
            "netD",
            f"must be one of {DISCRIMINATOR_ARCHS}, got {self.netD!r}",
        )
        _check(self.norm in NORMS, "norm", f"must be one of {NORMS}, got {self.norm!r}")
        _check(
            self.init_type in INIT_TYPES, "init_type", f"must be one of {INIT_TYPES}, got {self.init_type!r}"
        )
        # The std (normal) or scale (xavier, orthogonal) of the initial weights: torch refuses a
        # negative one at the first layer, after the run folder and data were written.
        _check(0 < self.init_gain <= MAX_INIT_GAIN, "init_gain",
               f"must be in (0, {MAX_INIT_GAIN:g}] (official default 0.02), got {self.init_gain}")
        for n, hi in (("ngf", MAX_WIDTH), ("ndf", MAX_WIDTH), ("n_layers_D", MAX_N_LAYERS_D)):
            _check(isinstance(getattr(self, n), int) and 1 <= getattr(self, n) <= hi, n,
                   f"must be an int in [1, {hi}], got {getattr(self, n)!r}")
        for n in ("input_nc", "output_nc"):
            _check(getattr(self, n) in (1, 3), n, "must be 1 or 3")
        _check(
            not (self.netG == "udacity" and self.use_dropout), "use_dropout", "netG udacity has no dropout"
        )
        _check(isinstance(self.netF_nc, int) and 1 <= self.netF_nc <= MAX_NETF_NC, "netF_nc",
               f"must be an int in [1, {MAX_NETF_NC}], got {self.netF_nc!r}")
        try:
            from fastcgan.recipes.cut import parse_nce_layers

            layers = parse_nce_layers(self.nce_layers)
        except ValueError as e:
            raise ConfigError(f"nce_layers (--nce-layers): {e}") from None
        _check(
            list(layers) == sorted(set(layers)) and layers[0] >= 0,
            "nce_layers",
            f"must be strictly increasing layer indices >= 0, got {self.nce_layers!r}",
        )
        directions = [str(e).partition("=")[0] for e in self.init_generators]
        for entry, d in zip(self.init_generators, directions):
            _check(isinstance(entry, str) and d in DIRECTIONS and bool(entry.partition("=")[2]), "init_generators",
                   f"each must be DIRECTION=PATH with DIRECTION one of {DIRECTIONS}, got {entry!r}")
        _check(len(set(directions)) == len(directions), "init_generators",
               f"one PATH per direction, got {list(self.init_generators)}")
        _check(self.init_official is None or (isinstance(self.init_official, str) and bool(self.init_official)),
               "init_official", f"must be a folder, got {self.init_official!r}")
        _check(not (self.init_official and self.init_generators), "init_official",
               "starts every network, the generators too: give it or --init-generator, not both")
        # The official --epoch values: its saved file names' prefixes (never a path).
        _check(isinstance(self.init_official_epoch, str)
               and re.fullmatch(r"latest|\d{1,9}|iter_\d{1,12}", self.init_official_epoch) is not None,
               "init_official_epoch", f"must be latest, an epoch number or iter_N, got {self.init_official_epoch!r}")
        _check(self.init_official is not None or self.init_official_epoch == "latest", "init_official_epoch",
               "chooses the files of --init-official, which is not given")


@dataclass(frozen=True)
class DataConfig:
    dataroot: Optional[str] = None
    dataset: str = "folder"
    preprocess: str = "resize_and_crop"
    load_size: int = 286
    crop_size: int = 256
    flip: bool = True
    batch_size: int = 1
    num_workers: Optional[int] = (
        None  # None: 0 on CPU (workers would compete with the step), else min(4, cores - 1)
    )
    serial_batches: bool = False
    data_on_gpu: Optional[bool] = None  # None: auto (on a GPU when the dataset fits, see execution.py)
    # Images above this many pixels are skipped (checked on the header, before decoding);
    # None: fastcgan.data's default (Pillow's 89.5 Mpx), 0: no limit.
    max_image_pixels: Optional[int] = None
    # The official --max_dataset_size: train on the first N images of each domain (sorted by
    # path; pairs for pix2pix). None: every image. Test splits are never truncated by it.
    max_dataset_size: Optional[int] = None
    synthetic_train: int = 200  # images per domain generated for --dataset synthetic
    synthetic_test: int = 50
    # Paired data (pix2pix): which half of each A|B image is the input; BtoA swaps them. CUT:
    # BtoA reads {phase}B as the input domain (its generator is the run's BtoA one).
    direction: str = "AtoB"

    def validate(self) -> None:
        _check(self.dataset in DATASETS, "dataset", f"must be one of {DATASETS}, got {self.dataset!r}")
        _check(
            self.direction in DIRECTIONS, "direction", f"must be one of {DIRECTIONS}, got {self.direction!r}"
        )
        _check(
            self.preprocess in PREPROCESS,
            "preprocess",
            f"must be one of {PREPROCESS}, got {self.preprocess!r}",
        )
        for n in ("load_size", "crop_size", "batch_size", "synthetic_train", "synthetic_test"):
            _check(isinstance(getattr(self, n), int) and getattr(self, n) >= 1, n, "must be an int >= 1")
        for n in ("load_size", "crop_size"):
            _check(getattr(self, n) <= MAX_IMAGE_SIDE, n, f"{getattr(self, n)} is larger than {MAX_IMAGE_SIDE}")
        if self.dataset == "synthetic":  # generated at load_size (fastcgan.data.synthetic's bounds)
            from fastcgan.data.synthetic import MAX_IMAGES, MAX_SIZE

            _check(self.load_size <= MAX_SIZE, "load_size", f"the synthetic set is generated at most at {MAX_SIZE}²")
            for n in ("synthetic_train", "synthetic_test"):
                _check(getattr(self, n) <= MAX_IMAGES, n, f"at most {MAX_IMAGES:,} generated images")
        _check(
            self.max_image_pixels is None or (isinstance(self.max_image_pixels, int) and self.max_image_pixels >= 0),
            "max_image_pixels",
            "must be an int >= 0 (0: no limit)",
        )
        _check(
            self.max_dataset_size is None or (isinstance(self.max_dataset_size, int) and self.max_dataset_size >= 1),
            "max_dataset_size",
            "must be an int >= 1 (omit it for every image)",
        )
        _check(
            self.num_workers is None or (isinstance(self.num_workers, int) and 0 <= self.num_workers <= MAX_NUM_WORKERS),
            "num_workers",
            f"must be an int in [0, {MAX_NUM_WORKERS}] (loader processes), got {self.num_workers!r}",
        )
        if self.preprocess == "resize_and_crop":
            _check(
                self.crop_size <= self.load_size,
                "crop_size",
                f"{self.crop_size} is larger than load_size {self.load_size}",
            )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_policy: str = "linear"
    epochs: int = 100  # epochs at the initial lr (official n_epochs)
    epochs_decay: int = 100  # epochs of linear decay to 0 (official n_epochs_decay)
    lr_decay_iters: int = 50  # "step" policy: multiply by 0.1 every this many epochs

    def validate(self) -> None:
        _check(0 < self.lr <= MAX_LR, "lr", f"must be in (0, {MAX_LR:g}], got {self.lr}")
        _check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        _check(
            self.lr_policy in LR_POLICIES,
            "lr_policy",
            f"must be one of {LR_POLICIES}, got {self.lr_policy!r}",
        )
        _check(isinstance(self.epochs, int) and self.epochs >= 0, "epochs", "must be an int >= 0")
        _check(
            isinstance(self.epochs_decay, int) and self.epochs_decay >= 0,
            "epochs_decay",
            "must be an int >= 0",
        )
        _check(self.epochs + self.epochs_decay >= 1, "epochs", "epochs + epochs_decay must be >= 1")
        _check(self.lr_policy != "cosine" or self.epochs >= 1, "epochs",
               "must be >= 1 with lr_policy cosine (its period, as the official T_max)")
        _check(
            isinstance(self.lr_decay_iters, int) and self.lr_decay_iters >= 1,
            "lr_decay_iters",
            "must be >= 1",
        )


@dataclass(frozen=True)
class LossConfig:
    gan_mode: str = "lsgan"
    lambda_cycle: float = 10.0  # official lambda_A = lambda_B
    lambda_A: Optional[float] = None  # official --lambda_A (cycle A->B->A); None: lambda_cycle
    lambda_B: Optional[float] = None  # official --lambda_B (cycle B->A->B); None: lambda_cycle
    lambda_identity: float = 0.5  # times lambda_A / lambda_B, as in the official code
    cycle_kind: str = "l1"
    pool_size: int = 50
    lambda_gp: float = 10.0  # wgangp only
    lambda_L1: float = 100.0  # pix2pix: weight of the L1 to the target
    # CUT / FastCUT (official option names; fastcgan.recipes.cut).
    lambda_gan: float = 1.0  # weight of the GAN loss
    lambda_nce: float = 1.0  # weight of PatchNCE
    nce_idt: bool = True  # the NCE identity term PatchNCE(G(B), B) (CUT; FastCUT: off)
    nce_T: float = 0.07  # PatchNCE temperature
    num_patches: int = 256  # patches sampled per NCE layer
    flip_equivariance: bool = False  # FastCUT: G's input flipped left-right half the time
    nce_includes_all_negatives_from_minibatch: bool = False  # else negatives from the same image only

    def validate(self) -> None:
        _check(self.gan_mode in GAN_MODES, "gan_mode", f"must be one of {GAN_MODES}, got {self.gan_mode!r}")
        _check(self.cycle_kind in ("l1", "l2"), "cycle_kind", f"must be l1 or l2, got {self.cycle_kind!r}")
        _check(self.lambda_cycle >= 0, "lambda_cycle", f"must be >= 0, got {self.lambda_cycle}")
        for name in ("lambda_A", "lambda_B"):
            v = getattr(self, name)
            _check(v is None or v >= 0, name, f"must be >= 0, got {v}")
        _check(self.lambda_identity >= 0, "lambda_identity", f"must be >= 0, got {self.lambda_identity}")
        _check(self.lambda_gp >= 0, "lambda_gp", f"must be >= 0, got {self.lambda_gp}")
        _check(self.lambda_L1 >= 0, "lambda_L1", f"must be >= 0, got {self.lambda_L1}")
        _check(self.lambda_gan >= 0, "lambda_gan", f"must be >= 0, got {self.lambda_gan}")
        _check(self.lambda_nce >= 0, "lambda_nce", f"must be >= 0, got {self.lambda_nce}")
        _check(self.nce_T > 0, "nce_T", f"must be > 0, got {self.nce_T}")
        _check(isinstance(self.num_patches, int) and 1 <= self.num_patches <= MAX_NUM_PATCHES, "num_patches",
               f"must be an int in [1, {MAX_NUM_PATCHES}] (patches per NCE layer), got {self.num_patches!r}")
        _check(isinstance(self.pool_size, int) and 0 <= self.pool_size <= MAX_POOL_SIZE, "pool_size",
               f"must be an int in [0, {MAX_POOL_SIZE}] (past fakes kept per discriminator), got {self.pool_size!r}")


@dataclass(frozen=True)
class RunConfig:
    """How a run executes (may change on --resume without changing what is trained)."""

    name: str = "run"
    output_dir: str = "runs"
    max_steps: Optional[int] = None  # stop after this many steps in total (default: all epochs)
    amp: bool = False
    # None = auto: the fastest measured for the device (fastcgan.train.execution.resolve_fast_path).
    compile: Optional[bool] = None
    compile_backend: str = "inductor"
    cuda_graphs: Optional[bool] = None
    channels_last: Optional[bool] = None
    cudnn_benchmark: Optional[bool] = None  # cuDNN autotuning of convolutions (CUDA; auto: fixed-size batches)
    faithful: bool = False  # the official numerics: fp32, eager, reference kernels, unfused Adam
    kernels: str = "auto"
    device: str = "auto"
    seed: int = 0
    resume: Optional[str] = None  # "auto" (latest in the run dir, else start fresh) or a path
    log_every: int = 50  # losses are read from the device only every this many steps
    sample_every: int = 500
    checkpoint_every: int = 2000
    keep_last: int = 3
    tensorboard: bool = True
    progress: bool = True
    n_samples: int = 4  # images per domain in the sample grids (at most MAX_SAMPLES)
    # FID/KID on the test split every this many steps (0: never; None: auto -- every
    # checkpoint_every steps when the metrics extra is installed and the data has testA/ testB/).
    eval_every: Optional[int] = None
    eval_max_images: int = 200  # test images per domain used for FID/KID during training

    def validate(self) -> None:
        _check(self.kernels in KERNELS, "kernels", f"must be one of {KERNELS}, got {self.kernels!r}")
        _check(bool(self.output_dir), "output_dir", "must name a folder, got ''")
        _check(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a plain folder name, got {self.name!r}",
        )
        for n in ("name", "output_dir"):  # safetensors (the run's generators) takes UTF-8 paths only
            _check(_is_utf8(getattr(self, n)), n, f"must be valid UTF-8 text, got {getattr(self, n)!r}")
        _check(
            self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 0),
            "max_steps",
            "must be an int >= 0",
        )
        _check(
            self.eval_every is None or (isinstance(self.eval_every, int) and self.eval_every >= 0),
            "eval_every",
            "must be an int >= 0",
        )
        for n in ("log_every", "sample_every", "checkpoint_every", "keep_last", "n_samples", "eval_max_images"):
            _check(isinstance(getattr(self, n), int) and getattr(self, n) >= 1, n, "must be an int >= 1")
        # The sample grid holds n_samples images per domain at --crop-size, decoded and run at
        # every sample step: a grid of 64 x 64 images is already more than one can look at.
        _check(self.n_samples <= MAX_SAMPLES, "n_samples", f"must be at most {MAX_SAMPLES}, got {self.n_samples}")
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed!r}")
        if self.compile_backend != "inductor":
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            _check(self.compile_backend in known, "compile_backend",
                   f"{self.compile_backend!r} is not a torch.compile backend; known: {', '.join(known)}")
        _check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "run": RunConfig,
}


def _type_ok(v: Any, t: Any) -> bool:
    """Whether ``v`` has the field type ``t`` (strict for bool: ``"false"`` is truthy; an int is a
    valid float, a bool is neither; a JSON list is a valid tuple)."""
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str) and "\x00" not in v  # a NUL byte is no file name
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        return any(v is None if a is type(None) else _type_ok(v, a) for a in args)
    if origin is tuple:
        return isinstance(v, (tuple, list)) and all(_type_ok(x, args[0]) for x in v)
    return True


def _check_types(sec: Any) -> None:
    """Every field of a config section has its declared type: a string where a number is due gave
    raw TypeErrors, ``flip="false"`` trained with flipping on."""
    hints = typing.get_type_hints(type(sec))
    for f in fields(sec):
        v = getattr(sec, f.name)
        if isinstance(v, str) and "\x00" in v:
            raise ConfigError(f"{f.name} ({_flag(f.name)}): contains a NUL byte: {v!r}")
        t = hints[f.name]
        if not _type_ok(v, t):
            want = t.__name__ if isinstance(t, type) else str(t).replace("typing.", "").replace("NoneType", "None")
            raise ConfigError(f"{f.name} ({_flag(f.name)}): must be {want}, got {v!r}")


def _field_index() -> dict[str, str]:
    idx: dict[str, str] = {}
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in idx, f"duplicate config field {f.name}"
            idx[f.name] = sec
    return idx


FIELD_SECTION = _field_index()


def _cut_preset(name: str) -> dict[str, Any]:
    from fastcgan.models.patchnce import CUT_PRESETS

    p = dict(CUT_PRESETS[name], recipe="cut")
    p["nce_layers"] = ",".join(str(i) for i in p["nce_layers"])
    return p


_PIX2PIX = {
    "recipe": "pix2pix",
    "netG": "unet_256",
    "netD": "basic",
    "norm": "batch",
    "use_dropout": True,
    "gan_mode": "vanilla",
    "lambda_L1": 100.0,
    "pool_size": 0,
    "lambda_identity": 0.0,
    "load_size": 286,
    "crop_size": 256,
    "flip": True,
}

# Presets: overrides of the defaults above (which are the official CycleGAN recipe).
PRESETS: dict[str, dict[str, Any]] = {
    # The official CycleGAN: ResNet-9 + 70x70 PatchGAN, 286 -> 256 crops, LSGAN, lambda 10 / 0.5,
    # pool 50, Adam 2e-4 (0.5, 0.999), 100 + 100 epochs with linear decay, batch 1.
    "cyclegan": {},
    # The official recipe for 128x128 data (resnet_6blocks).
    "cyclegan128": {"netG": "resnet_6blocks", "load_size": 143, "crop_size": 128},
    # DiscoGAN-style: U-Net generator, basic PatchGAN, vanilla (BCE) GAN loss, L2 cycle, no identity.
    "discogan": {
        "netG": "unet_128",
        "load_size": 143,
        "crop_size": 128,
        "gan_mode": "vanilla",
        "cycle_kind": "l2",
        "lambda_identity": 0.0,
    },
    # The Udacity tutorial: 128x128, BatchNorm encoder/6 residual blocks/decoder generator, 5-conv
    # discriminator, LSGAN, Adam(2e-4, (0.5, 0.999)), lambda 10, no identity loss, no pool.
    "udacity": {
        "netG": "udacity",
        "netD": "udacity",
        "norm": "batch",
        "ngf": 64,
        "ndf": 64,
        "load_size": 128,
        "crop_size": 128,
        "preprocess": "resize_and_crop",
        "flip": False,
        "gan_mode": "lsgan",
        "lambda_identity": 0.0,
        "pool_size": 0,
        "batch_size": 16,
    },
    # The official pix2pix (paired): U-Net 256 with BatchNorm and dropout 0.5, the conditional
    # 70x70 PatchGAN (sees input and output, 6 channels), vanilla GAN + 100 x L1, no pool,
    # 286 -> 256 crops with flips, Adam 2e-4 (0.5, 0.999), 100 + 100 epochs linear, batch 1.
    "pix2pix": _PIX2PIX,
    # The official colorization model: pix2pix (as above) from L* to a*b* of colour images
    # (fastcgan.recipes.colorization); --input-nc / --output-nc stay 3 (RGB images in and out).
    "colorization": {**_PIX2PIX, "recipe": "colorization"},
    # CUT / FastCUT (Park et al. 2020), the official hyper-parameters (fastcgan.models.patchnce):
    # ResNet-9 + 70x70 PatchGAN + 2-layer MLP heads (256), xavier(0.02) init, LSGAN, no pool,
    # PatchNCE on layers 0,4,8,12,16 with 256 patches and tau 0.07, batch 1, 286 -> 256.
    # cut: lambda_NCE 1 + NCE identity, 200 + 200 epochs; fastcut: lambda_NCE 10, no identity,
    # flip-equivariance, 150 + 50 epochs.
    **{name: _cut_preset(name) for name in ("cut", "fastcut")},
}


# Fields only some recipes read: given as flags to another recipe, the run would train exactly as
# without them (the official options are per model too). unused_flags() names them.
RECIPE_FIELDS = {
    **dict.fromkeys(("lambda_cycle", "lambda_A", "lambda_B", "lambda_identity", "cycle_kind"), ("cyclegan",)),
    "pool_size": ("cyclegan", "cut"),
    "lambda_L1": ("pix2pix", "colorization"),
    "direction": ("pix2pix", "colorization", "cut"),  # CUT: BtoA reads the B folders as its input
    **dict.fromkeys(("lambda_gan", "lambda_nce", "nce_idt", "nce_T", "num_patches", "flip_equivariance",
                     "nce_includes_all_negatives_from_minibatch", "nce_layers", "netF_nc"), ("cut",)),
}


def pairs_direction(cfg: "TrainConfig") -> Optional[str]:
    """What a run's generator files record as their ``pairs_direction``: a pix2pix run's
    ``--direction`` (which half of an A|B pair is the input); None for recipes without halves."""
    return cfg.data.direction if cfg.model.recipe == "pix2pix" else None


def unused_flags(cfg: "TrainConfig", requested: dict) -> list[str]:
    """The explicitly given fields (``requested``: the CLI's flags) that nothing in this run reads,
    each as ``--flag (why)``: another recipe's loss weights, ``--lambda-gp`` without wgangp,
    ``--lr-decay-iters`` without the step policy, ``--eval-max-images`` with ``--eval-every 0``."""
    r = cfg.model.recipe
    out = [f"{_flag(k)} (read by --model {' / '.join(RECIPE_FIELDS[k])} only)"
           for k in requested if k in RECIPE_FIELDS and r not in RECIPE_FIELDS[k]]
    if "lambda_gp" in requested and cfg.loss.gan_mode != "wgangp":
        out.append(f"--lambda-gp (the wgangp gradient penalty; --gan-mode is {cfg.loss.gan_mode})")
    if "lr_decay_iters" in requested and cfg.optim.lr_policy != "step":
        out.append(f"--lr-decay-iters (the step policy's; --lr-policy is {cfg.optim.lr_policy})")
    if "eval_max_images" in requested and cfg.run.eval_every == 0:
        out.append("--eval-max-images (with --eval-every 0 nothing is evaluated)")
    return out


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: Optional[str] = None

    def __post_init__(self):
        for sec in SECTIONS:
            _check_types(getattr(self, sec))  # before validate() compares them
        for sec in SECTIONS:
            getattr(self, sec).validate()
        for k, v in self.flat().items():  # inf passes every ">= 0" check above, then ruins the run
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{k} ({_flag(k)}): must be a finite number, got {v}")
        m, d = self.model, self.data
        # A resumed run takes its data from the checkpoint when none is named (resume_plan).
        _check(d.dataset == "synthetic" or bool(d.dataroot) or bool(self.run.resume), "dataroot",
               "is required unless --dataset synthetic (or --resume, which reads the run's data again)")
        crops = d.preprocess in ("resize_and_crop", "crop", "scale_width_and_crop")
        if crops and d.crop_size < min_discriminator_side(m):
            raise ConfigError(f"crop_size (--crop-size) {d.crop_size}: netD {m.netD} needs images of at least "
                              f"{min_discriminator_side(m)}² (fewer --n-layers-D, or larger crops)")
        if m.recipe == "cyclegan" and self.loss.lambda_identity > 0 and m.input_nc != m.output_nc:
            raise ConfigError(f"lambda_identity (--lambda-identity) {self.loss.lambda_identity}: the identity loss "
                              f"feeds B images to G_AB, so it needs input_nc == output_nc (got {m.input_nc} and "
                              f"{m.output_nc}); use --lambda-identity 0")
        if crops and m.netG.startswith("unet_"):
            mult = 2 ** (7 if m.netG == "unet_128" else 8)
            if d.crop_size % mult:
                raise ConfigError(
                    f"crop_size (--crop-size) {d.crop_size}: netG {m.netG} needs a multiple of {mult} "
                    f"(its {mult.bit_length() - 1} stride-2 levels end at 1x1)"
                )
        elif crops and d.crop_size % 4:
            raise ConfigError(f"crop_size (--crop-size) {d.crop_size}: netG {m.netG} needs a multiple of 4")
        if m.recipe == "cut":
            if not m.netG.startswith("resnet_"):
                raise ConfigError(f"netG (--netG) {m.netG}: CUT's PatchNCE needs a ResNet generator's "
                                  "encoder features (resnet_9blocks or resnet_6blocks)")
            # The official generator's nn.Sequential: 19 + n_blocks modules, + a Downsample after each of
            # the two downsampling stages (antialias), + an Upsample before each upsampling conv.
            n_official = 19 + int(m.netG[len("resnet_"):-len("blocks")]) + 2 * m.antialias + 2 * m.antialias_up
            if max(int(i) for i in m.nce_layers.split(",") if i.strip()) >= n_official:
                raise ConfigError(f"nce_layers (--nce-layers) {m.nce_layers}: {m.netG} has layers 0..{n_official - 1}")
            if self.loss.gan_mode == "wgangp":
                raise ConfigError("gan_mode (--gan-mode) wgangp: CUT has no gradient penalty here (the official "
                                  "takes the name but never applies its penalty: an unconstrained critic); use "
                                  "lsgan (its default), vanilla / nonsaturating or hinge")
            if self.loss.lambda_nce > 0 and m.input_nc != m.output_nc:
                raise ConfigError(f"output_nc (--output-nc) {m.output_nc}: PatchNCE encodes G's output with G's "
                                  f"own encoder, so it needs input_nc == output_nc (got {m.input_nc})")
        if m.recipe == "colorization":
            for n in ("input_nc", "output_nc"):
                if getattr(m, n) != 3:
                    raise ConfigError(f"{n} (--{n.replace('_', '-')}) {getattr(m, n)}: colorization reads and "
                                      "writes RGB images (its networks map L to ab internally); leave it at 3")
            if d.direction != "AtoB":
                raise ConfigError(f"direction (--direction) {d.direction}: colorization has one direction, "
                                  "grey to colour (AtoB)")
        if self.loss.gan_mode == "wgangp" and self.model.recipe in ("pix2pix", "colorization"):
            raise ConfigError(
                "gan_mode (--gan-mode) wgangp: pix2pix has no gradient penalty here (the official takes the "
                "name but never applies its penalty: an unconstrained critic); use vanilla (its default), lsgan "
                "or hinge"
            )
        if self.loss.gan_mode == "wgangp" and self.model.netD == "udacity" and self.model.norm == "batch":
            raise ConfigError(
                "gan_mode (--gan-mode) wgangp: the gradient penalty is ill-defined with BatchNorm "
                "discriminators; use --norm instance or another gan mode"
            )

    @property
    def run_dir(self) -> str:
        import os

        return os.path.join(self.run.output_dir, self.run.name)

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with flat field overrides (``ngf=32``, ``lr=1e-4``)."""
        by_sec: dict[str, dict[str, Any]] = {}
        for k, v in overrides.items():
            if k == "preset":
                continue
            if k not in FIELD_SECTION:
                raise ConfigError(f"unknown config field {k!r}; known: {', '.join(sorted(FIELD_SECTION))}")
            by_sec.setdefault(FIELD_SECTION[k], {})[k] = v
        kwargs = {sec: replace(getattr(self, sec), **vals) for sec, vals in by_sec.items()}
        return replace(self, **kwargs, preset=overrides.get("preset", self.preset))

    @classmethod
    def from_preset(cls, name: str = "cyclegan", /, **overrides: Any) -> "TrainConfig":
        # ``name`` is positional-only: the run's own ``name=`` (RunConfig.name) is an override.
        if name not in PRESETS:
            raise ConfigError(f"preset (--preset): unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        merged = {**PRESETS[name], **overrides}
        by_sec: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
        for k, v in merged.items():
            if k not in FIELD_SECTION:
                raise ConfigError(f"unknown config field {k!r}; known: {', '.join(sorted(FIELD_SECTION))}")
            by_sec[FIELD_SECTION[k]][k] = v
        return cls(**{sec: SECTIONS[sec](**vals) for sec, vals in by_sec.items()}, preset=name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a config from a newer version)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a dict, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        for sec, cls_ in SECTIONS.items():
            vals = dict(d.get(sec, {}))
            known = {f.name for f in fields(cls_)}
            unknown = set(vals) - known
            if unknown:
                raise ConfigError(f"config section {sec!r} has unknown fields {sorted(unknown)}")
            kwargs[sec] = cls_(**vals)
        extra = set(d) - set(SECTIONS) - {"preset"}
        if extra:
            raise ConfigError(f"config has unknown sections {sorted(extra)}")
        return cls(**kwargs, preset=d.get("preset"))

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (for diffs and logs)."""
        out: dict[str, Any] = {}
        for sec in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, sec)))
        return out


# Fields that define *what* is trained; on --resume they come from the checkpoint and a
# conflicting flag is an error. Everything else (RunConfig, dataroot, workers, data_on_gpu) may change.
# The seed is one of them: it orders every epoch's data, so a resume under another seed (or the
# default 0 when --seed was not repeated) drew other batches than the run it continues.
TRAINING_FIELDS = tuple(
    f.name
    for sec in ("model", "optim", "loss", "data")
    for f in fields(SECTIONS[sec])
    if f.name not in ("dataroot", "num_workers", "data_on_gpu", "dataset", "max_image_pixels")
) + ("seed",)
# Training fields a resume may change: the learning-rate schedule's length and initial rate
# (train longer or shorter, or on at another rate, as the official --continue_train with new
# --n_epochs/--n_epochs_decay/--lr). The LR follows the new schedule from the resumed epoch.
# The cosine policy's period (epochs, the official T_max) is fixed at the start.
SCHEDULE_FIELDS = ("epochs", "epochs_decay", "lr")

