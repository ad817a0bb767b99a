"""``fastcgan-train`` / ``python -m fastcgan.train``: parse flags into a :class:`TrainConfig`, train.

    python -m fastcgan.train --dataroot datasets/horse2zebra --amp
    python -m fastcgan.train --dataset synthetic --preset cyclegan128 --load-size 64 --crop-size 64 \\
        --ngf 16 --ndf 16 --max-steps 600 --name demo
    python -m fastcgan.train --name demo --resume            # continue the latest checkpoint
    python -m fastcgan.train --resume runs/demo              # the same, from its folder

Exit codes: 0 finished; 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint;
2 bad flags, dataset or checkpoint (nothing trained); 1 training failed (e.g. non-finite losses).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import NoReturn, Optional

from fastcgan._cli import Parser
from fastcgan.train.config import (
    DATASETS,
    DIRECTIONS,
    FIELD_SECTION,
    INIT_TYPES,
    KERNELS,
    LR_POLICIES,
    MAX_INIT_GAIN,
    PREPROCESS,
    PRESETS,
    ConfigError,
    TrainConfig,
)

S = argparse.SUPPRESS  # unset flags stay out of the namespace: only explicit ones override


def _int(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def _float(lo: float = 0.0, strict: bool = False, hi: float = math.inf):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if v <= lo if strict else v < lo:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo}, got {s}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}, got {s}")
        return v

    return parse


# Official train.py flags whose name changed (those only hyphenated are found by Parser itself).
OFFICIAL_TRAIN_FLAGS = {
    "--n_epochs": "--epochs",
    "--n_epochs_decay": "--epochs-decay",
    "--gpu_ids": "--device (--gpu_ids 0: --device cuda:0, -1: --device cpu; several: torchrun)",
    "--checkpoints_dir": "--output-dir (the run is OUTPUT_DIR/NAME)",
    "--num_threads": "--num-workers",
    "--print_freq": "--log-every (in steps)",
    "--display_freq": "--sample-every (in steps)",
    "--update_html_freq": "--sample-every (grids in RUN/samples/, TensorBoard in RUN/tb/)",
    "--save_latest_freq": "--checkpoint-every (in steps)",
    "--save_epoch_freq": "--checkpoint-every (in steps; --keep-last to keep more)",
    "--save_by_iter": "--checkpoint-every (checkpoints are named by step)",
    "--continue_train": "--resume (the newest checkpoint that verifies)",
    "--epoch_count": "--resume (a checkpoint holds its epoch and step)",
    "--epoch": "--resume RUN/checkpoints/step_....ckpt",
    "--load_iter": "--resume RUN/checkpoints/step_....ckpt",
    "--dataset_mode": "--model (it chooses the dataset)",
    "--CUT_mode": "--model cut / --model fastcut",
    "--display_id": "nothing (TensorBoard in RUN/tb/; --no-tensorboard)",
    "--no_html": "nothing (no HTML pages are written)",
    "--use_wandb": "nothing (TensorBoard in RUN/tb/)",
    "--verbose": "nothing (the start line gives every network's size)",
}


def build_parser() -> argparse.ArgumentParser:
    from fastcgan.losses import GAN_MODES
    from fastcgan.models import DISCRIMINATOR_ARCHS, GENERATOR_ARCHS, NORMS

    p = Parser(
        official=OFFICIAL_TRAIN_FLAGS,
        prog="fastcgan-train",
        description="Train a CycleGAN (fast).",
        epilog="Exit codes: 0 done; 130/143 stopped by SIGINT/SIGTERM after a checkpoint; "
        "2 bad input; 1 failure.",
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="named configuration; other flags override it (default: the preset named like --model "
        "if there is one, e.g. --model pix2pix -> pix2pix, else cyclegan, the official CycleGAN)",
    )
    from fastcgan.recipes import RECIPES

    p.add_argument(
        "--model",
        "--recipe",
        dest="recipe",
        choices=tuple(RECIPES) + tuple(MODEL_ALIASES),
        default=S,
        help="training recipe (default: cyclegan; as the official --model); a preset that names its "
        "recipe works too (fastcut = --model cut --preset fastcut)",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataroot", type=_abspath, default=S,
                   help="folder with trainA/ trainB/ (and testA/ testB/); --resume without it trains on the run's own")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default=S,
        help="folder (default) or synthetic (built-in data with ground truth, generated once)",
    )
    g.add_argument("--preprocess", choices=PREPROCESS, default=S,
                   help="how a training image becomes a crop, as the official --preprocess: resize to --load-size "
                   "then a random --crop-size crop; crop only; scale the width to --load-size (keeping the "
                   "aspect); both; none (each side rounded to a multiple of 4)")
    g.add_argument("--load-size", type=_int(1), default=S, help="images are resized to this before the crop")
    g.add_argument("--crop-size", type=_int(1), default=S, help="side of the square training crops")
    g.add_argument("--no-flip", dest="flip", action="store_false", default=S,
                   help="no random left-right flips (default: flips, except in the udacity preset)")
    g.add_argument("--batch-size", type=_int(1), default=S, help="images per domain in a step")
    g.add_argument("--num-workers", type=_int(0), default=S,
                   help="loader processes (default: 0 on the CPU, where they would compete with the step; "
                   "else min(4, cores - 1))")
    g.add_argument(
        "--max-image-pixels",
        type=_int(0),
        default=S,
        help="skip training images larger than this (read from the header, never decoded); "
        "default 89,478,485 (Pillow's limit), 0: no limit",
    )
    g.add_argument(
        "--max-dataset-size",
        type=_int(1),
        default=S,
        help="train on the first N images of each domain (sorted by path; pairs for pix2pix), as the "
        "official --max_dataset_size; default: every image",
    )
    g.add_argument("--serial-batches", action="store_true", default=S,
                   help="images in the listing's order instead of shuffled each epoch (official "
                   "--serial_batches; default: shuffled)")
    g.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default=S,
        help="paired data (pix2pix): AtoB = the left half of each image is the input (default), BtoA swaps; "
        "CUT: BtoA translates the B images into A (trainB is the input domain; exported as generator_BtoA)",
    )
    g.add_argument(
        "--data-on-gpu",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="decode every image once and keep them on the device (no loader in the step); "
        "default: on a GPU when the decoded set fits in a quarter of the free memory",
    )
    g = p.add_argument_group("model")
    g.add_argument("--netG", choices=GENERATOR_ARCHS, default=S, help="generator architecture")
    g.add_argument("--netD", choices=DISCRIMINATOR_ARCHS, default=S,
                   help="discriminator: basic = the 70x70 PatchGAN, n_layers = --n-layers-D of them, pixel = 1x1")
    g.add_argument("--ngf", type=_int(1), default=S, help="generator filters in the first layer")
    g.add_argument("--ndf", type=_int(1), default=S, help="discriminator filters in the first layer")
    g.add_argument("--n-layers-D", dest="n_layers_D", type=_int(1), default=S,
                   help="strided layers of --netD n_layers")
    g.add_argument("--norm", choices=NORMS, default=S, help="normalisation layers of G and D")
    g.add_argument("--use-dropout", action="store_true", default=S,
                   help="dropout 0.5 in the generator (default: pix2pix and colorization on, the others off)")
    g.add_argument("--no-dropout", dest="use_dropout", action="store_false", default=S,
                   help="no dropout (the official --no_dropout: e.g. a pix2pix without it)")
    g.add_argument("--input-nc", type=int, choices=(1, 3), default=S, help="channels of domain A's images")
    g.add_argument("--output-nc", type=int, choices=(1, 3), default=S, help="channels of domain B's images")
    g.add_argument("--init-type", choices=INIT_TYPES, default=S, help="weight initialisation")
    g.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=S,
                   help="blur-pool downsampling in the ResNet generator and the PatchGAN (the official CUT "
                   "default; --no-antialias = its --no_antialias; default: on for cut/fastcut, off otherwise)")
    g.add_argument("--antialias-up", action=argparse.BooleanOptionalAction, default=S,
                   help="blur upsampling in the ResNet generator (the official CUT default; --no-antialias-up = "
                   "its --no_antialias_up; default: on for cut/fastcut, off otherwise)")
    g.add_argument("--init-gain", type=_float(0.0, strict=True, hi=MAX_INIT_GAIN), default=S,
                   help="scale of --init-type normal / xavier / orthogonal")
    g.add_argument("--init-generator", dest="init_generators", action="append", type=_init_generator, default=S,
                   metavar="DIRECTION=PATH",
                   help="start the DIRECTION (AtoB / BtoA) generator from a fastcgan generator: a .safetensors "
                   "file, a run directory or pretrained folder (its generator_DIRECTION, or its only generator), a "
                   "training .ckpt or an "
                   "official latest_net_G*.pth (fine-tuning; its architecture must be this run's; the "
                   "discriminators start afresh). "
                   "Repeat for both directions")
    g.add_argument("--init-official", type=_abspath, default=S, metavar="DIR",
                   help="continue an official run: every network starts from the official repository's "
                   "checkpoint folder (checkpoints/NAME: latest_net_G_A.pth, ..._D_B.pth for cyclegan; _G, _D for "
                   "pix2pix / colorization; _G, _D, _F for cut), as its --continue_train (new optimizers, empty "
                   "image pools). Give the official run's options (--netG, --norm, --no-antialias ...)")
    g.add_argument("--init-official-epoch", default=S, metavar="EPOCH",
                   help="which of --init-official's files: latest (default), an epoch number or iter_N "
                   "(the official --epoch)")
    g = p.add_argument_group("optimisation and losses")
    g.add_argument("--lr", type=_float(0.0, strict=True), default=S, help="initial learning rate of every Adam")
    g.add_argument("--beta1", type=_float(0.0), default=S, help="Adam beta1")
    g.add_argument("--beta2", type=_float(0.0), default=S, help="Adam beta2")
    g.add_argument(
        "--lr-policy", choices=LR_POLICIES, default=S,
        help="the official policies, updated when the official train.py updates them: CycleGAN, pix2pix and "
        "colorization at the start of each epoch (epoch k runs at the k-th update), CUT at its end. linear "
        "(default): constant, then linearly to 0 over --epochs-decay (CycleGAN: the decay starts in the last of "
        "--epochs and the last epoch runs at 0); step: x0.1 every --lr-decay-iters updates; cosine: period "
        "--epochs (official T_max: 0 after --epochs updates, back up after); plateau: the official one as it runs "
        "there (its metric is a constant 0), i.e. x0.2 at the 7th update and every 6th after",
    )
    g.add_argument("--epochs", type=_int(0), default=S, help="epochs at the initial lr (official n_epochs)")
    g.add_argument(
        "--epochs-decay", type=_int(0), default=S, help="epochs of decay (official n_epochs_decay)"
    )
    g.add_argument("--lr-decay-iters", type=_int(1), default=S, help="--lr-policy step: epochs between the x0.1 steps")
    g.add_argument("--gan-mode", choices=GAN_MODES, default=S, help="adversarial loss (lsgan: least squares)")
    g.add_argument("--lambda-cycle", type=_float(0.0), default=S, help="weight of both cycle losses (default 10)")
    g.add_argument("--lambda-A", type=_float(0.0), default=S,
                   help="weight of the A -> B -> A cycle (official --lambda_A; default: --lambda-cycle)")
    g.add_argument("--lambda-B", type=_float(0.0), default=S,
                   help="weight of the B -> A -> B cycle (official --lambda_B; default: --lambda-cycle)")
    g.add_argument("--lambda-identity", type=_float(0.0), default=S,
                   help="identity loss weight, relative to --lambda-A / --lambda-B (official --lambda_identity)")
    g.add_argument("--lambda-gp", type=_float(0.0), default=S, help="--gan-mode wgangp: gradient penalty weight")
    g.add_argument(
        "--lambda-L1", dest="lambda_L1", type=_float(0.0), default=S,
        help="pix2pix: weight of the L1 to the target (default 100)",
    )
    g.add_argument("--cycle-kind", choices=("l1", "l2"), default=S, help="distance of the cycle (and identity) loss")
    g.add_argument("--pool-size", type=_int(0), default=S,
                   help="past fakes each discriminator also sees (0: only the current ones)")
    g = p.add_argument_group("CUT / FastCUT (--model cut; presets cut, fastcut)")
    g.add_argument("--lambda-gan", type=_float(0.0), default=S, help="weight of the GAN loss (default 1)")
    g.add_argument("--lambda-nce", type=_float(0.0), default=S, help="weight of PatchNCE")
    g.add_argument(
        "--nce-idt", action=argparse.BooleanOptionalAction, default=S,
        help="the NCE identity loss on G(B) vs B (cut: on, fastcut: off)",
    )
    g.add_argument("--nce-layers", default=S, help="generator layers for PatchNCE (default 0,4,8,12,16)")
    g.add_argument("--num-patches", type=_int(1), default=S, help="patches per NCE layer (default 256)")
    g.add_argument("--netF-nc", dest="netF_nc", type=_int(1), default=S, help="projection head width")
    g.add_argument("--nce-T", dest="nce_T", type=_float(0.0, strict=True), default=S, help="PatchNCE temperature")
    g.add_argument(
        "--flip-equivariance", action=argparse.BooleanOptionalAction, default=S,
        help="flip G's input left-right half the time, NCE against the unflipped input (fastcut: on)",
    )
    g.add_argument("--nce-includes-all-negatives-from-minibatch", action="store_true", default=S,
                   help="PatchNCE negatives from every image of the batch (default: from the same image only)")
    g = p.add_argument_group("run")
    g.add_argument("--name", default=S, help="run name: the run directory is OUTPUT_DIR/NAME (default: run)")
    g.add_argument("--output-dir", default=S, help="where run directories are made")
    g.add_argument("--max-steps", type=_int(0), default=S,
                   help="stop at this step, counted from the run's start (a resumed run's steps included; "
                   "default: at the end of the last epoch)")
    g.add_argument(
        "--amp",
        action="store_true",
        default=S,
        help="bf16 autocast (fp16 + loss scaling on GPUs without bf16)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="torch.compile each phase of the step as one graph (default: on a GPU)",
    )
    g.add_argument("--compile-backend", default=S, help="torch.compile backend (default inductor)")
    g.add_argument(
        "--cuda-graphs",
        dest="cuda_graphs",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="replay the whole step as one CUDA graph (default: on a GPU with --compile when capturable)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="NHWC activations end to end (default: on a GPU)",
    )
    g.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="let cuDNN time its convolution algorithms once per shape and keep the fastest (default: on a "
        "GPU when every batch has one shape, i.e. --preprocess with a crop)",
    )
    g.add_argument(
        "--faithful",
        action="store_true",
        default=S,
        help="the official numerics for comparisons: fp32, eager, reference kernels, unfused Adam",
    )
    g.add_argument("--kernels", choices=KERNELS, default=S, help="InstanceNorm kernel backend (default auto)")
    g.add_argument("--device", default=S, help="auto (a GPU if there is one) | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=_int(0), default=S, help="seeds initialisation, data order and augmentation")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=S,
        metavar="RUN_OR_CKPT",
        help="continue a run: no value (or auto) = the latest checkpoint of OUTPUT_DIR/NAME (a new run "
        "if there is none); or a run directory or checkpoint file. The checkpoint decides what is "
        "trained, and on what data unless --dataroot / --dataset is given; --epochs/--epochs-decay/--lr "
        "may change (train longer, shorter, at another rate)",
    )
    g.add_argument("--log-every", type=_int(1), default=S, help="read losses from the device every K steps")
    g.add_argument("--sample-every", type=_int(1), default=S, help="write a sample grid every K steps")
    g.add_argument("--checkpoint-every", type=_int(1), default=S,
                   help="write a checkpoint every K steps (and at the end)")
    g.add_argument("--keep-last", type=_int(1), default=S, help="checkpoints kept")
    g.add_argument(
        "--eval-every",
        type=_int(0),
        default=S,
        help="FID/KID on the test split at every step that is a multiple of N (0: never; default: "
        "--checkpoint-every when the metrics extra is installed)",
    )
    g.add_argument("--eval-max-images", type=_int(1), default=S, help="test images per domain for --eval-every")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S,
                   help="no TensorBoard events in RUN/tb/ (metrics.jsonl is written either way)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no progress bar on stderr")
    _add_preset_defaults(p)
    return p


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _add_preset_defaults(p: argparse.ArgumentParser) -> None:
    """End each valued flag's help with its default, read from the presets (the only source of
    defaults: the flags themselves default to "not given"), e.g. ``(default 286; cyclegan128,
    discogan: 143; udacity: 128)``. Flags whose help already says its default (auto values,
    values that follow another flag) and on/off flags (their help says it) are left as written."""
    cfgs = {name: TrainConfig.from_preset(name, dataset="synthetic") for name in PRESETS}
    for action in p._actions:
        if action.dest not in FIELD_SECTION or action.nargs == 0 or "default" in (action.help or ""):
            continue
        values = {name: getattr(getattr(cfg, FIELD_SECTION[action.dest]), action.dest) for name, cfg in cfgs.items()}
        base = values["cyclegan"]
        if base is None or base == ():  # "not given": the help says what happens then
            continue
        others: dict[str, list[str]] = {}
        for name, v in values.items():
            if v != base:
                others.setdefault(_show(v), []).append(name)
        text = f"default {_show(base)}" + "".join(f"; {', '.join(names)}: {v}" for v, names in others.items())
        action.help = f"{action.help} ({text})" if action.help else text


# --model NAME for a preset that sets another recipe: --model fastcut = --model cut --preset fastcut.
MODEL_ALIASES = {n: p["recipe"] for n, p in PRESETS.items() if p.get("recipe", n) != n}


def default_preset(recipe: Optional[str]) -> str:
    """The preset used without ``--preset``: the one named like the recipe (``--model pix2pix``
    gets the official pix2pix defaults), else ``cyclegan``."""
    return recipe if recipe in PRESETS else "cyclegan"


def _abspath(s: str) -> str:
    """Recorded in the run's config as an absolute path (the run may resume from elsewhere)."""
    if not s:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return os.path.abspath(s)


def _init_generator(s: str) -> str:
    """``DIRECTION=PATH`` with an absolute PATH (recorded in the run's config; the run may resume
    from elsewhere)."""
    direction, eq, path = s.partition("=")
    if direction not in DIRECTIONS or not eq or not path:
        raise argparse.ArgumentTypeError(f"expected DIRECTION=PATH with DIRECTION one of {DIRECTIONS}, got {s!r}")
    return f"{direction}={os.path.abspath(path)}"


def parse_config(argv: Optional[list[str]] = None) -> tuple[TrainConfig, dict]:
    """Flags -> (config, the explicitly given fields). Invalid values exit via argparse."""
    p = build_parser()
    a = vars(p.parse_args(argv))
    if "init_generators" in a:  # compared with a checkpoint's on resume: in its order (by direction)
        a["init_generators"] = tuple(sorted(a["init_generators"]))
    given = a.pop("preset", None)
    preset = given or default_preset(a.get("recipe"))
    if a.get("recipe") in MODEL_ALIASES:
        if given and given != a["recipe"]:
            p.error(f"--model {a['recipe']} is --model {MODEL_ALIASES[a['recipe']]} --preset {a['recipe']}, "
                    f"not --preset {given}: give one of them")
        a["recipe"] = MODEL_ALIASES[a["recipe"]]
    try:
        cfg = TrainConfig.from_preset(preset, **a)
    except ConfigError as e:
        p.error(str(e))
    if given:
        a["preset"] = given  # a resumed run refuses another preset (resume_plan)
    return cfg, a


def evaluate_run(summary: dict) -> dict:
    """Test-split metrics of a finished run's saved generators (through the deploy runtime, the
    code that ships), recorded in its summary.json. Used after training on data with ground
    truth (``--dataset synthetic``)."""
    import os

    from fastcgan.evaluate import evaluate
    from fastcgan.fileio import atomic_write

    ev = evaluate(summary["run_dir"], summary["dataroot"], phase="test", device=summary["device"])
    summary = {**summary, "eval": ev}
    atomic_write(os.path.join(summary["run_dir"], "summary.json"), json.dumps(summary, indent=2).encode())
    return ev


def main(argv: Optional[list[str]] = None) -> int:
    cfg, requested = parse_config(argv)
    import warnings

    from fastcgan.data import DatasetError
    from fastcgan.data.datasets import SkippedImageWarning
    from fastcgan.fileio import WriteError
    from fastcgan.train.checkpoint import CheckpointError
    from fastcgan.train.loop import TrainingError, train
    from fastcgan.train.runlock import RunDirError, RunInUseError

    try:
        # A skipped file is logged with its name and reason; the warning (for library callers without
        # logging) would print the same line again.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=SkippedImageWarning)
            summary = train(cfg, requested=requested)
            if summary.get("rank", 0) == 0 and cfg.data.dataset == "synthetic" and not summary["interrupted"]:
                summary["eval"] = evaluate_run(summary)
    except (ConfigError, DatasetError, CheckpointError, RunInUseError, RunDirError, FileExistsError) as e:
        print(f"fastcgan-train: error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, WriteError) as e:
        print(f"fastcgan-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside the loop's own handler (start-up, final evaluation)
        print("fastcgan-train: interrupted; every checkpoint already written is kept", file=sys.stderr)
        return 130
    s = summary
    if s.get("rank", 0) != 0:  # under torchrun only process 0 reports
        return s["exit_code"]
    print(
        f"fastcgan: {s['steps']} steps (to step {s['step']}; {s['epoch']} epochs done) "
        f"in {s['wall_time_s']:.1f} s, "
        f"{s['images_per_s']} images/s on {s['device']}; skipped images: {s['skipped_images']}"
        + (f" ({', '.join(s['skipped'][:5])}{' ...' if len(s['skipped']) > 5 else ''}; all in summary.json)"
           if s["skipped"] else ""),
        file=sys.stderr,
    )
    if s["final_losses"]:
        print(
            "fastcgan: losses " + "  ".join(f"{k}={v:.4g}" for k, v in s["final_losses"].items()),
            file=sys.stderr,
        )
    if s.get("eval"):
        from fastcgan.evaluate import format_results

        print("fastcgan: test-set evaluation\n" + format_results(s["eval"]), file=sys.stderr)
    print(f"fastcgan: run directory {s['run_dir']} (checkpoint {s['checkpoint']})", file=sys.stderr)
    if s["interrupted"]:
        print(
            f"fastcgan: stopped by {s['interrupted']}; continue with --resume {s['run_dir']}", file=sys.stderr
        )
    print(json.dumps({k: s[k] for k in ("run_dir", "step", "wall_time_s", "images_per_s", "exit_code")}))
    return s["exit_code"]


def exit_after(code: int) -> NoReturn:
    """Leave the process with ``code``. Under torchrun (``WORLD_SIZE`` > 1) without interpreter
    finalization: with torch 2.14 on gloo, a rank whose run had completed (checkpoint, samples,
    metrics all written) was aborted in static destruction ('terminate called without an active
    exception', SIGABRT, no Python frame left: 5 of ~115 two-process runs on a 2-core CPU, 0 of 45
    with this exit), which torchrun reports as a failed job. By the time ``main`` returns, ``train`` has destroyed the
    process group and closed every file it wrote, so only the crash is skipped."""
    if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def console_main() -> NoReturn:
    """The ``fastcgan-train`` console script: :func:`main`, left through :func:`exit_after` as
    ``python -m fastcgan.train`` is (``torchrun $(which fastcgan-train)`` runs under DDP too)."""
    exit_after(main())


if __name__ == "__main__":
    console_main()
