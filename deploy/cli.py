"""``fastcgan-export``: a trained generator to ONNX / TensorRT / AOTInductor, each verified at once.

    fastcgan-export runs/h2z --direction AtoB --onnx g.onnx --trt g.engine --aoti g.pt2
    fastcgan-export --from-official latest_net_G_A.pth --arch resnet_9blocks --onnx g.onnx
    fastcgan-export --from-official latest_net_G_A.pth --arch resnet_9blocks --safetensors g.safetensors
    fastcgan-export runs/h2z --official official/h2z/latest_net_G.pth   # for the official test.py

Every artifact is run right after it is written and compared with the PyTorch generator on
several input sizes; the max abs error is printed and the exit status is non-zero when it is
over tolerance. Steps are independent: a missing TensorRT fails ``--trt`` (exit status 3,
with what to install) but the ONNX and AOTInductor files of the same command are still made.

AOTInductor packages and TensorRT engines hold native code; each gets a manifest beside it
(``g.pt2.manifest.json``: sha256, fastcgan version, arch, shapes, dtype) without which
``fastcgan-translate`` and :func:`fastcgan.deploy.load` refuse to run it. Every file is written
atomically (never half-written under its final name), and an artifact is built and verified
under a temporary name beside its destination: it and its manifest are installed only when
verification passes, so a failed export leaves the destination as it was. Existing outputs are
replaced only with ``--overwrite``; an output that is an input, or two outputs that are one
file, are refused (exit status 2) before anything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import math
import os
import re
import sys
import tempfile
import time

import torch
from fastcgan._cli import Parser, interruptible
from fastcgan.deploy._common import (
    DIRECTIONS,
    MAX_STATIC_SIDE,
    ArtifactError,
    load_official,
    load_torch_generator,
    resolve_device,
)
from fastcgan.deploy.manifest import manifest_path
from fastcgan.deploy.onnx_export import DEFAULT_OPSET
from fastcgan.devices import DeviceUnavailableError
from fastcgan.fileio import file_identity, output_folder_problem, remove_stale_temporaries
from fastcgan.models.io import MAX_WIDTH

# Max abs error on outputs in [-1, 1], against the fp32 PyTorch generator.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1.5e-1}
# 3: an optional dependency is missing (TensorRT, or the onnx packages of the deploy extra).
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_TRT_MISSING = 0, 1, 2, 3
# Verification runs the PyTorch generator and the artifact on each --verify-sizes input, holding
# ngf float32 feature maps per input pixel (256 bytes at ngf 64): 4 Mpixels (e.g. 1x2048x2048,
# 4x1024x1024) is about 1 GiB per map, already far more than parity needs.
MAX_VERIFY_BATCH, MAX_VERIFY_PIXELS, MAX_VERIFY_SIZES = 64, 1 << 22, 16
MAX_WORKSPACE_GB = 1024  # TensorRT's workspace is a byte count: a bound keeps the flag's value meaningful
MAX_TIMING_CACHE_BYTES = 256 << 20  # timing caches are kB to a few MB
STAGING_PATTERN = r"\.fastcgan-export-(\d+)-.+"  # _staged's folders: the exporting process's pid


def _hw(text: str) -> tuple[int, int]:
    # Readers refuse a static size over MAX_STATIC_SIDE; tracing one that large would take 240 GB.
    # Digits only: int() alone takes " 64", "+64" and "6_4".
    m = re.fullmatch(r"([0-9]{1,6})[xX]([0-9]{1,6})", text)
    if m:
        h, w = int(m[1]), int(m[2])
        if 0 < h <= MAX_STATIC_SIDE and 0 < w <= MAX_STATIC_SIDE:
            return h, w
    raise argparse.ArgumentTypeError(f"expected HxW with sides in [1, {MAX_STATIC_SIDE}], e.g. 256x256, got {text!r}")


def _bhw_list(text: str) -> list[tuple[int, int, int]]:
    parts = text.split(",")
    if len(parts) > MAX_VERIFY_SIZES:
        raise argparse.ArgumentTypeError(f"at most {MAX_VERIFY_SIZES} sizes, got {len(parts)}")
    out = []
    for part in parts:
        m = re.fullmatch(r"([0-9]{1,6})[xX]([0-9]{1,6})[xX]([0-9]{1,6})", part)
        if not m:
            raise argparse.ArgumentTypeError(f"expected BxHxW[,BxHxW...], got {part!r}")
        b, h, w = int(m[1]), int(m[2]), int(m[3])
        if not (1 <= b <= MAX_VERIFY_BATCH and h >= 1 and w >= 1 and b * h * w <= MAX_VERIFY_PIXELS):
            raise argparse.ArgumentTypeError(
                f"{part!r}: batch must be 1 to {MAX_VERIFY_BATCH}, H and W positive, and batch x H x W at most "
                f"{MAX_VERIFY_PIXELS:,} pixels (verification holds the generator's activations for each)")
        out.append((b, h, w))
    return out


def _tol(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return v


def _ngf(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= MAX_WIDTH:  # the widest generator fastcgan builds or loads
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {MAX_WIDTH}], got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fastcgan-export", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?",
                   help="run directory, generator .safetensors file or training checkpoint (RUN/checkpoints/*.ckpt: "
                   "the generator at that step)")
    p.add_argument("--direction", choices=DIRECTIONS, default=None,
                   help="which generator of a run directory or training checkpoint (default AtoB)")
    p.add_argument("--checkpoint", dest="checkpoint", metavar="RUN",
                   help="RUN given as fastcgan-translate and fastcgan-eval take it")
    g = p.add_argument_group("official CycleGAN checkpoints")
    g.add_argument("--from-official", metavar="PTH", help="official latest_net_G_A.pth (instead of RUN)")
    g.add_argument("--arch", help="generator arch of the official checkpoint, e.g. resnet_9blocks")
    g.add_argument("--ngf", type=_ngf, default=None,
                   help=f"generator width (1 to {MAX_WIDTH}; default: the checkpoint's, 64 in the released models)")
    g.add_argument("--norm", default=None, choices=("instance", "batch", "none"), help="default instance")
    d = g.add_mutually_exclusive_group()
    d.add_argument("--no-dropout", dest="dropout", action="store_false", default=None, help="the default")
    d.add_argument("--dropout", dest="dropout", action="store_true",
                   help="the official checkpoint's generator has dropout layers (a pix2pix trained "
                   "without --no_dropout)")
    g.add_argument("--colorization", action="store_true",
                   help="the checkpoint is the official --model colorization G (L -> ab, 1 -> 2 channels): "
                        "export it as an RGB -> RGB colorizer (the input's lightness, colours predicted)")
    g.add_argument("--bn-inference", choices=("per_image", "running"), default=None,
                   help="BatchNorm statistics at inference: per_image = the official test.py (batch "
                        "statistics at batch 1; default for --from-official), running = test.py --eval; "
                        "for RUN the stored mode unless given")
    o = p.add_argument_group("outputs")
    o.add_argument("--safetensors", metavar="PATH",
                   help="write a fastcgan generator file (fp32; what fastcgan-translate / -eval / -export take): "
                        "an official checkpoint converted, or a training checkpoint's generator")
    o.add_argument("--official", metavar="PATH",
                   help="write the generator as the official repositories' checkpoint (.pth; e.g. "
                        "checkpoints/NAME/latest_net_G.pth for their test.py --model test): ResNet and U-Net "
                        "generators")
    o.add_argument("--onnx", metavar="PATH", help="write an ONNX model (dynamic batch/H/W)")
    o.add_argument("--trt", metavar="PATH", help="build a TensorRT engine (needs tensorrt and a GPU)")
    o.add_argument("--aoti", metavar="PATH", help="write an AOTInductor package (.pt2)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never an input: the run's generator/checkpoint "
                        "files or --from-official)")
    x = p.add_argument_group("options")
    x.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET}; dynamo exporter 18+, TorchScript exporter 7-20; "
                   "auto picks)")
    x.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default=None,
                   help="ONNX exporter (default auto: dynamo, else TorchScript)")
    prec = x.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="half precision (ONNX weights/I-O, TensorRT, AOTI)")
    prec.add_argument("--bf16", action="store_true", help="bfloat16 (TensorRT and AOTI; ONNX stays fp32)")
    x.add_argument("--static", type=_hw, metavar="HxW",
                   help=f"fixed H and W (batch stays dynamic; H x W at most {MAX_VERIFY_PIXELS:,})")
    x.add_argument("--min-shape", metavar="BxCxHxW",
                   help="TensorRT profile's smallest input (default: 1 image of the smallest size the generator takes)")
    x.add_argument("--opt-shape", metavar="BxCxHxW",
                   help="the input TensorRT tunes for (default: 1 image of 256x256; --static: its HxW)")
    x.add_argument("--max-shape", metavar="BxCxHxW",
                   help="TensorRT profile's largest input (default: 8 images of 1024x1024; --static: 8 of its HxW)")
    x.add_argument("--workspace-gb", type=float, default=None,
                   help=f"TensorRT workspace limit (default 4, at most {MAX_WORKSPACE_GB})")
    x.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache file (read and updated)")
    x.add_argument("--device", default="auto", help="device for AOTInductor and verification (auto|cpu|cuda)")
    x.add_argument("--max-autotune", action="store_true", help="AOTInductor: autotune kernels (slow compile)")
    x.add_argument("--tol", type=_tol, help="max abs error allowed (default: fp32 1e-4, fp16 5e-2, bf16 1.5e-1)")
    x.add_argument("--verify-sizes", type=_bhw_list, metavar="BxHxW,...",
                   help=f"input sizes to verify on (batch <= {MAX_VERIFY_BATCH}, batch x H x W <= "
                        f"{MAX_VERIFY_PIXELS:,}, H and W multiples of the generator's size multiple)")
    x.add_argument("--no-verify", action="store_true", help="skip the parity checks")
    return p


def _report(name: str, errs, tol: float) -> bool:
    ok = True
    for shape, err in errs:
        flag = "ok" if err <= tol else "OVER TOLERANCE"
        ok &= err <= tol
        print(f"  {name} vs PyTorch  input {'x'.join(map(str, shape))}: max abs error {err:.3g} "
              f"(tol {tol:g}) {flag}")
    return ok


def _isolated_runner(pkg: str, device, dtype):
    """A ``run(x)`` that evaluates the package in a fresh process (see aoti.run_package_isolated)."""
    from fastcgan.deploy.aoti import run_package_isolated

    def run(x):
        return run_package_isolated(pkg, [x.to(dtype)], device)[0]

    return run


def _usage(msg: str) -> int:
    print(f"fastcgan-export: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _input_files(args) -> list[tuple[str, str]]:
    """(flag, file) for every file the export reads: the official checkpoint, or the generator
    file, or a run directory's generators, config and checkpoints."""
    if args.from_official:
        return [("--from-official", args.from_official)]
    if not os.path.isdir(args.run):
        return [("RUN", args.run)]
    files = glob.glob(os.path.join(glob.escape(args.run), "*.safetensors"))
    files.append(os.path.join(args.run, "config.json"))
    for root, _, names in os.walk(os.path.join(args.run, "checkpoints")):
        files += [os.path.join(root, n) for n in names]
    return [("RUN", f) for f in files if os.path.isfile(f)]


def _output_files(args) -> list[tuple[str, str]]:
    """(flag, file) for every file the export writes (an artifact, its manifest and side files)."""
    out = []
    if args.safetensors:
        out.append(("--safetensors", args.safetensors))
    if args.official:
        out.append(("--official", args.official))
    if args.onnx:
        out.append(("--onnx", args.onnx))
    if args.aoti:
        out += [("--aoti", args.aoti), ("--aoti", manifest_path(args.aoti))]
    if args.trt:
        out += [("--trt", args.trt), ("--trt", args.trt + ".json"), ("--trt", manifest_path(args.trt))]
    return out


def _check_paths(args) -> str | None:
    """Why the requested outputs would lose data, or None: an output that is an input (symlinks
    resolved, hard links compared by inode), two outputs that are one file, or an existing output
    without --overwrite. The timing cache is read and updated, so it may exist but is no input
    and no other output."""
    outputs = _output_files(args)
    written = outputs + ([("--timing-cache", args.timing_cache)] if args.trt and args.timing_cache else [])
    inputs = [(f"{f} ({flag})", os.path.realpath(f), file_identity(f)) for flag, f in _input_files(args)]
    earlier: list[tuple[str, str, tuple | None]] = []
    for flag, f in written:
        real, ident = os.path.realpath(f), file_identity(f)
        for what, other_real, other_ident in inputs + earlier:
            if real == other_real or (ident is not None and ident == other_ident):
                if (what, other_real, other_ident) in earlier:
                    return f"{flag} {f} is the same file as {what}: give every output its own name"
                return (f"{flag} {f} is the input file {what}: inputs are never overwritten, not even "
                        "with --overwrite; choose another output name")
        earlier.append((f"{flag} {f}", real, ident))
    for flag, f in outputs:
        if os.path.isdir(f):
            return f"{flag} {f} is a directory"
        why = output_folder_problem(os.path.dirname(f) or os.curdir, f"{flag} {f}", [os.path.basename(f)])
        if why:
            return why
        if os.path.lexists(f) and not os.path.isfile(f):  # a device, FIFO, socket or dangling link
            return f"{flag} {f} exists and is not a regular file: never replaced"
        if os.path.lexists(f) and not args.overwrite:
            return f"{flag}: {f} already exists; pass --overwrite to replace it"
    cache = args.timing_cache if args.trt else None
    if cache:  # read whole, then replaced: a regular file of a cache's size, or a new name
        if os.path.lexists(cache) and not os.path.isfile(cache):
            return f"--timing-cache {cache} exists and is not a regular file"
        if os.path.isfile(cache) and os.path.getsize(cache) > MAX_TIMING_CACHE_BYTES:
            return (f"--timing-cache {cache}: {os.path.getsize(cache):,} bytes is no TensorRT timing cache "
                    f"(at most {MAX_TIMING_CACHE_BYTES:,} read)")
        why = output_folder_problem(os.path.dirname(cache) or os.curdir, f"--timing-cache {cache}",
                                    [os.path.basename(cache)])
        if why:
            return why
    return None


@contextlib.contextmanager
def _staged(path: str):
    """A temporary name for ``path`` (same file name, in a private folder beside it, so renaming
    into place is atomic and a manifest's ``artifact`` field is already right); the folder and
    whatever is left in it are removed on exit, and so are the folders made for ``path`` when it
    was not installed. Staging folders of exports killed before their cleanup (their pid in the
    name, no longer running) are removed first."""
    folder = os.path.realpath(os.path.dirname(path) or os.curdir)  # where the rename lands (link/.. resolved)
    made = []
    d = folder
    while not os.path.lexists(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder, STAGING_PATTERN)
    try:
        with tempfile.TemporaryDirectory(prefix=f".fastcgan-export-{os.getpid()}-", dir=folder) as work:
            yield os.path.join(work, os.path.basename(path))
    finally:
        if not os.path.lexists(path):
            for d in made:  # deepest first; one that holds anything else stays
                try:
                    os.rmdir(d)
                except OSError:
                    break


def _install(staged: str, path: str, side=(".json", ".manifest.json"), *, replace: bool) -> None:
    """Rename a verified artifact into place, then its side files: between the two renames a
    loader sees the new artifact with the old manifest, which does not verify (refused, not run).
    Without ``replace`` (--overwrite) an artifact another process wrote meanwhile stays."""
    from fastcgan.deploy.manifest import install

    install(staged, path, replace)
    for suffix in side:
        if os.path.exists(staged + suffix):
            install(staged + suffix, path + suffix)


def _check_sizes(args, spec) -> str | None:
    """Why --static or --verify-sizes cannot be given to this generator, or None."""
    m, lo = spec.size_multiple, spec.min_size
    if args.static:
        h, w = args.static
        if h % m or w % m or h < lo or w < lo:
            return (f"--static {h}x{w}: H and W must be multiples of {m} and at least {lo} for "
                    f"{spec.arch or 'this generator'}")
        if h * w > MAX_VERIFY_PIXELS:  # exporting and verifying run the generator at this size
            return (f"--static {h}x{w}: at most {MAX_VERIFY_PIXELS:,} pixels (e.g. 2048x2048; export and "
                    "verification hold the generator's activations at this size); larger images run through "
                    "tiles of a smaller static size")
    for b, h, w in args.verify_sizes or ():
        if h % m or w % m or h < lo or w < lo:
            return (f"--verify-sizes {b}x{h}x{w}: H and W must be multiples of {m} and at least {lo} for "
                    f"{spec.arch or 'this generator'}")
        if args.static and (h, w) != tuple(args.static):
            return f"--verify-sizes {b}x{h}x{w}: the model is --static {args.static[0]}x{args.static[1]}"
    return None


def _check_profile(args, spec, shapes) -> str | None:
    """Why the TensorRT optimisation profile cannot be built for this generator, or None."""
    from fastcgan.deploy.tensorrt import check_profile, default_profile

    s = spec.replace(static_hw=tuple(args.static) if args.static else None)
    profile = [shapes[k] or d for k, d in zip(("min_shape", "opt_shape", "max_shape"), default_profile(s))]
    try:
        check_profile(s, profile)
    except ValueError as e:
        return str(e)
    lo, hi = profile[0], profile[2]
    for b, h, w in args.verify_sizes or ():  # the engine runs only inside its profile: never dropped silently
        if not (lo[0] <= b <= hi[0] and lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3]):
            return (f"--verify-sizes {b}x{h}x{w}: outside the TensorRT profile (batch {lo[0]}-{hi[0]}, "
                    f"{lo[2]}x{lo[3]} to {hi[2]}x{hi[3]}), where the engine cannot be checked; widen --min-shape / "
                    "--max-shape or leave that size out")
    return None


@interruptible("fastcgan-export")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint is not None:
        if args.run is not None:
            parser.error(f"give RUN once: {args.run} and --checkpoint {args.checkpoint}")
        args.run = args.checkpoint
    for flag, val in (("--onnx", args.onnx), ("--trt", args.trt), ("--aoti", args.aoti),
                      ("--safetensors", args.safetensors), ("--official", args.official),
                      ("--timing-cache", args.timing_cache)):
        if val is not None and not val:  # an unset shell variable: said before "nothing to do"
            parser.error(f"{flag} '': name a file")
    if not (args.onnx or args.trt or args.aoti or args.safetensors or args.official):
        parser.error("nothing to do: give at least one of --safetensors, --official, --onnx, --trt, --aoti")
    if bool(args.run) == bool(args.from_official):
        parser.error("give exactly one of RUN (run directory / .safetensors) and --from-official PTH")
    if args.run and args.run.lower().endswith((".onnx", ".pt2", ".engine", ".trt", ".plan")):
        parser.error(f"RUN {args.run} is an exported artifact; export from the run directory, generator "
                     ".safetensors or training .ckpt it was made from")
    if args.from_official and not args.arch:
        parser.error("--from-official needs --arch (e.g. --arch resnet_9blocks)")
    if args.colorization and not args.from_official:
        parser.error("--colorization describes an official checkpoint (--from-official); fastcgan "
                     "generator files already say whether they colorize")
    for flag, val, ext in (("--onnx", args.onnx, ".onnx"), ("--aoti", args.aoti, ".pt2"),
                           ("--safetensors", args.safetensors, ".safetensors"), ("--official", args.official, ".pth")):
        if val and not val.endswith(ext):
            parser.error(f"{flag} {val}: the file name must end in {ext}")
    official_only = [f for f, v in (("--arch", args.arch), ("--ngf", args.ngf), ("--norm", args.norm),
                                    ("--dropout / --no-dropout", args.dropout)) if v is not None]
    if official_only and not args.from_official:  # a fastcgan generator file says its own
        parser.error(f"{', '.join(official_only)} are only for an official checkpoint (--from-official); "
                     "RUN's generator says its own architecture")
    for flag, given, needs, out in (
        ("--min-shape", args.min_shape, "--trt", args.trt), ("--opt-shape", args.opt_shape, "--trt", args.trt),
        ("--max-shape", args.max_shape, "--trt", args.trt), ("--workspace-gb", args.workspace_gb, "--trt", args.trt),
        ("--timing-cache", args.timing_cache, "--trt", args.trt),
        ("--max-autotune", args.max_autotune or None, "--aoti", args.aoti),
        ("--opset", args.opset, "--onnx / --trt", args.onnx or args.trt),
        ("--exporter", args.exporter, "--onnx / --trt", args.onnx or args.trt),
        ("--static", args.static, "--onnx / --trt / --aoti", args.onnx or args.trt or args.aoti),
        # .safetensors / official .pth weights are fp32 whatever the flags; ONNX has no bf16.
        ("--fp16", args.fp16 or None, "--onnx / --trt / --aoti", args.onnx or args.trt or args.aoti),
        ("--bf16", args.bf16 or None, "--trt / --aoti", args.trt or args.aoti),
        # ONNX and weights files are built and verified on the CPU (onnxruntime's CPU provider).
        ("--device", None if args.device == "auto" else args.device, "--aoti / --trt", args.aoti or args.trt),
    ):
        if given is not None and not out:
            parser.error(f"{flag} applies to {needs} only, which is not given")
    if args.no_verify and (args.tol is not None or args.verify_sizes):
        parser.error(f"{'--tol' if args.tol is not None else '--verify-sizes'} sets the checks that "
                     "--no-verify skips: give one or the other")
    args.opset = DEFAULT_OPSET if args.opset is None else args.opset
    args.exporter = args.exporter or "auto"
    if args.from_official and args.bn_inference and (args.norm or "instance") != "batch":
        parser.error(f"--bn-inference: a --norm {args.norm or 'instance'} generator has no BatchNorm; leave the "
                     "flag out (or give --norm batch if the checkpoint has BatchNorm)")
    if args.direction and args.from_official:
        parser.error("--direction picks a generator of RUN; an official checkpoint is one generator")
    if args.direction and args.run and os.path.isfile(args.run) and args.run.lower().endswith(".safetensors"):
        parser.error(f"--direction: {args.run} is one generator (a run directory or training checkpoint has two)")
    if args.workspace_gb is not None and not (math.isfinite(args.workspace_gb)
                                              and 0 < args.workspace_gb <= MAX_WORKSPACE_GB):
        parser.error(f"--workspace-gb {args.workspace_gb}: must be a number of GB in (0, {MAX_WORKSPACE_GB}]")
    precision = "fp16" if args.fp16 else ("bf16" if args.bf16 else "fp32")
    tol = args.tol if args.tol is not None else TOLERANCE[precision]
    from fastcgan.deploy import onnx_export
    from fastcgan.deploy.tensorrt import parse_shape

    try:
        shapes = {k: parse_shape(v, "--" + k.replace("_", "-")) if v else None
                  for k, v in (("min_shape", args.min_shape), ("opt_shape", args.opt_shape),
                               ("max_shape", args.max_shape))}
        if args.onnx or args.trt:
            onnx_export._exporters(args.exporter, args.opset)
    except ValueError as e:
        parser.error(str(e))
    why = _check_paths(args)
    if why:
        return _usage(why)
    try:
        device = resolve_device(args.device)
    except (DeviceUnavailableError, ValueError) as e:
        print(f"fastcgan-export: error: --device: {e}", file=sys.stderr)
        return EXIT_USAGE
    # The ONNX packages are an extra (`fastcgan[deploy]`): named before anything is built.
    if args.onnx or args.trt:
        missing = [m for m in ("onnx", *(() if args.no_verify else ("onnxruntime",)))
                   if importlib.util.find_spec(m) is None]
        if missing:
            flags = " / ".join(f for f, v in (("--onnx", args.onnx), ("--trt", args.trt)) if v)
            print(f"fastcgan-export: error: {flags} needs {' and '.join(missing)} (onnxruntime verifies the "
                  "export): pip install 'fastcgan[deploy]' ('fastcgan[deploy-gpu]' for onnxruntime-gpu)",
                  file=sys.stderr)
            return EXIT_TRT_MISSING
    # TensorRT (and a GPU) is checked before anything is built: without it an engine cannot be
    # made, and the ONNX export it would be built from is not worth making for nothing.
    trt_missing = None
    if args.trt:
        from fastcgan.deploy.tensorrt import TensorRTUnavailable, import_tensorrt

        try:
            import_tensorrt()
        except TensorRTUnavailable as e:
            trt_missing = e
            print(f"trt: not built: {e}", file=sys.stderr)
            if not (args.onnx or args.aoti):
                return EXIT_TRT_MISSING

    try:
        # The reference backend: exports trace it anyway (fastcgan.ops routes to the reference
        # while exporting), and it is the specification the artifacts are verified against.
        if args.from_official:
            model, spec = load_official(args.from_official, args.arch, args.ngf, args.norm or "instance",
                                        bool(args.dropout),
                                        backend="torch", bn_inference=args.bn_inference or "per_image",
                                        color_space="lab" if args.colorization else "rgb")
            source = args.from_official
        else:
            model, spec = load_torch_generator(args.run, direction=args.direction, backend="torch")
            source = args.run
            if args.bn_inference and spec.config.get("norm") != "batch":
                raise ValueError(f"--bn-inference: {args.run}'s generator has no BatchNorm (norm "
                                 f"{spec.config.get('norm', 'unknown')}); leave the flag out")
            if args.bn_inference:
                from fastcgan.models import set_bn_inference

                set_bn_inference(model, args.bn_inference)
                spec = spec.replace(config=dict(spec.config, bn_inference=args.bn_inference))
    except (ArtifactError, ValueError) as e:
        print(f"fastcgan-export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    why = _check_sizes(args, spec) or (_check_profile(args, spec, shapes) if args.trt and not trt_missing else None)
    if why:
        return _usage(why)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # every artifact of it would be NaN; verification would only say "failed"
        return _usage(f"{source}: non-finite weights in {bad[:4]}: not a usable generator")
    if args.official and not str(spec.arch).startswith(("resnet_", "unet_")):
        return _usage(f"--official: the official repositories have no {spec.arch} generator (ResNet and U-Net only)")
    model = model.eval().float()
    print(f"generator: {source} ({spec.arch or 'unknown arch'}, {spec.input_nc}->{spec.output_nc} channels, "
          f"H/W multiple of {spec.size_multiple}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    if spec.config.get("norm") == "batch":
        mode = spec.config.get("bn_inference", "running")
        print(f"batchnorm at inference: {mode} statistics ("
              + ("each image's own, = the official test.py at batch 1" if mode == "per_image"
                 else "the stored running mean/var, = test.py --eval") + "; recorded in the artifact)")

    try:
        with contextlib.ExitStack() as stack:  # the staged files, removed whatever happens
            return _export_all(args, model, spec, device, precision, tol, shapes, trt_missing, stack)
    except OSError as e:  # e.g. a folder made unwritable, or a disk filled, after the checks above
        print(f"fastcgan-export: error: {e} (an output not reported as written above was not installed)",
              file=sys.stderr)
        return EXIT_FAIL


def _export_file(args, label: str, path: str, model, spec, write, read_back) -> int:
    """``write(model, tmp)`` a PyTorch-side file, ``read_back(tmp)`` it as its readers will, compare
    outputs with ``model`` and install it only if they match."""
    from fastcgan.deploy import onnx_export

    with _staged(path) as tmp:
        try:
            write(model, tmp)
            back = read_back(tmp).eval()
        except Exception as e:  # noqa: BLE001
            print(f"{label}: export failed: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_FAIL
        if not args.no_verify:
            shapes = args.verify_sizes or onnx_export.default_verify_shapes(spec.replace(static_hw=None))
            with torch.no_grad():
                errs = onnx_export.verify_against_torch(back, model, spec, shapes)
            if not _report(label, errs, TOLERANCE["fp32"] if args.tol is None else args.tol):
                print(f"{label}: {path} not written (verification failed)", file=sys.stderr)
                return EXIT_FAIL
        _install(tmp, path, side=(), replace=args.overwrite)
    return EXIT_OK


def _export_safetensors(args, model, spec) -> int:
    """Write the generator as a fastcgan ``.safetensors`` file (fp32 weights, the config that
    rebuilds it), verified by loading it back as translate does and comparing outputs."""
    from fastcgan.models import load_generator, save_generator

    def write(m, tmp):
        save_generator(m, tmp, config=None if getattr(m, "config", None) else spec.config, direction=spec.direction,
                       pairs_direction=spec.pairs_direction)

    status = _export_file(args, "safetensors", args.safetensors, model, spec, write,
                          lambda tmp: load_generator(tmp, backend="torch"))
    if status == EXIT_OK:
        print(f"safetensors: wrote {args.safetensors}" + (" (fp32 weights: --fp16 / --bf16 apply to the other "
                                                           "artifacts)" if args.fp16 or args.bf16 else ""))
    return status


def _export_official(args, model, spec) -> int:
    """Write the generator in the official repositories' layout (``torch.save`` of their
    ``nn.Sequential`` keys), verified by reading it back as an official checkpoint with this
    generator's settings and comparing outputs."""
    from fastcgan.models import load_official_generator, save_official_generator

    cfg = spec.config
    aa, up = cfg.get("antialias", False), cfg.get("antialias_up", False)
    status = _export_file(args, "official", args.official, model, spec, save_official_generator, lambda tmp: (
        load_official_generator(tmp, arch=spec.arch, norm=cfg.get("norm", "instance"),
                                use_dropout=cfg.get("use_dropout", False), backend="torch",
                                bn_inference=cfg.get("bn_inference", "running"),
                                color_space=cfg.get("color_space", "rgb"), antialias=aa, antialias_up=up)))
    if status != EXIT_OK:
        return status
    notes = [f"netG {spec.arch}, norm {cfg.get('norm', 'instance')}" + ("" if cfg.get("use_dropout") else
                                                                        ", no_dropout")]
    if cfg.get("color_space") == "lab":
        notes.append("the L -> ab network of the official colorization model")
    if aa or up:
        notes.append("the official CUT's layout" + ("" if aa and up else " with no_antialias" + ("_up" if aa else "")))
    if cfg.get("norm") == "batch":
        notes.append("its test.py uses each image's own BatchNorm statistics, its --eval the stored ones")
    print(f"official: wrote {args.official} (fp32; {'; '.join(notes)})")
    return EXIT_OK


def _export_all(args, model, spec, device, precision, tol, shapes, trt_missing, stack) -> int:
    """Build, verify and install each requested artifact; the exit status."""
    from fastcgan.deploy import onnx_export

    status = EXIT_OK
    build_trt = args.trt and trt_missing is None
    onnx_spec = verify_shapes = onnx_path = None

    # ---- fastcgan generator file ----
    if args.safetensors:
        status = _export_safetensors(args, model, spec)
    if args.official:
        status = max(status, _export_official(args, model, spec))

    # ---- ONNX (also the input of TensorRT) ----
    if args.onnx or build_trt:
        tmp_onnx = stack.enter_context(_staged(args.onnx)) if args.onnx else os.path.join(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fastcgan-export-")), "g.onnx")
        onnx_path = tmp_onnx
        onnx_fp16 = args.fp16
        t0 = time.perf_counter()
        try:
            onnx_spec = onnx_export.export_onnx(model, tmp_onnx, spec, opset=args.opset, fp16=onnx_fp16,
                                                static_hw=args.static, exporter=args.exporter)
        except Exception as e:  # noqa: BLE001
            print(f"ONNX export failed: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_FAIL
        verify_shapes = args.verify_sizes or onnx_export.default_verify_shapes(onnx_spec, MAX_VERIFY_PIXELS)
        shown = args.onnx or "ONNX model for TensorRT"
        print(f"onnx: built {shown} in {time.perf_counter() - t0:.1f}s (opset {onnx_export.opset_of(tmp_onnx)}, "
              f"{'fp16' if onnx_fp16 else 'fp32'}, {'static ' + 'x'.join(map(str, args.static)) if args.static else 'dynamic batch/H/W'}); "
              f"checker passed; ops: {', '.join(onnx_export.op_types(tmp_onnx))}")
        if args.bf16:
            print("onnx: --bf16 applies to TensorRT and AOTInductor; the ONNX model stays fp32")
        ok = True
        if not args.no_verify:
            from fastcgan.deploy.runtime import OrtRunner

            run = OrtRunner(tmp_onnx, torch.device("cpu"))  # the runtime fastcgan-translate uses
            onnx_tol = tol if onnx_fp16 else TOLERANCE["fp32"] if args.tol is None else tol
            errs = onnx_export.verify_against_torch(run, model, onnx_spec, verify_shapes)
            ok = _report("onnxruntime", errs, onnx_tol)
            model.float()
        if not ok:
            status = EXIT_FAIL
            if args.onnx:
                print(f"onnx: {args.onnx} not written (verification failed)", file=sys.stderr)
        elif args.onnx:
            _install(tmp_onnx, args.onnx, side=(), replace=args.overwrite)
            onnx_path = args.onnx
            print(f"onnx: wrote {args.onnx}")

    # ---- AOTInductor ----
    if args.aoti:
        from fastcgan.deploy.aoti import export_aoti, load_aoti

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        t0 = time.perf_counter()
        try:
            with _staged(args.aoti) as tmp_pkg:
                aspec = export_aoti(model, tmp_pkg, spec, device=device, dtype=dtype, static_hw=args.static,
                                    max_autotune=args.max_autotune)
                print(f"aoti: built {args.aoti} in {time.perf_counter() - t0:.1f}s ({device.type}, {precision})")
                ok = True
                if not args.no_verify:
                    if device.type == "cuda":
                        run_aoti = _isolated_runner(tmp_pkg, device, dtype)
                    else:
                        fn, _ = load_aoti(tmp_pkg, device)

                        def run_aoti(x):
                            return fn(x.to(device=device, dtype=dtype))

                    shapes_a = args.verify_sizes or onnx_export.default_verify_shapes(aspec, MAX_VERIFY_PIXELS)
                    errs = onnx_export.verify_against_torch(run_aoti, model, aspec, shapes_a, device=str(device))
                    ok = _report("aoti", errs, tol)
                if ok:
                    _install(tmp_pkg, args.aoti, replace=args.overwrite)
                    print(f"aoti: wrote {args.aoti}; manifest {manifest_path(args.aoti)} "
                          "(the package holds native code)")
                else:
                    status = EXIT_FAIL
                    print(f"aoti: {args.aoti} not written (verification failed)", file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            print(f"AOTInductor export failed: {type(e).__name__}: {e}", file=sys.stderr)
            status = EXIT_FAIL

    # ---- TensorRT ----
    if trt_missing is not None:
        status = status or EXIT_TRT_MISSING
    elif args.trt:
        from fastcgan.deploy.tensorrt import TensorRTUnavailable, TrtRunner, build_engine

        t0 = time.perf_counter()
        try:
            with _staged(args.trt) as tmp_engine:
                build_engine(onnx_path, tmp_engine, onnx_spec, fp16=args.fp16, bf16=args.bf16,
                             min_shape=shapes["min_shape"], opt_shape=shapes["opt_shape"],
                             max_shape=shapes["max_shape"], workspace_gb=args.workspace_gb or 4.0,
                             timing_cache=args.timing_cache)
                print(f"trt: built {args.trt} in {time.perf_counter() - t0:.1f}s ({precision})")
                ok = True
                if not args.no_verify:
                    runner = TrtRunner(tmp_engine)
                    prof = runner.profile
                    ok_shapes = [s for s in verify_shapes
                                 if prof is None or all(prof[0][i] <= v <= prof[2][i] for i, v in ((0, s[0]), (2, s[1]), (3, s[2])))]
                    if not ok_shapes and prof is not None:
                        ok_shapes = [(prof[1][0], prof[1][2], prof[1][3])]
                    errs = onnx_export.verify_against_torch(runner, model, onnx_spec, ok_shapes, device="cuda")
                    del runner  # the engine is deserialized from bytes; the file can move
                    ok = _report("tensorrt", errs, tol)
                if ok:
                    _install(tmp_engine, args.trt, replace=args.overwrite)
                    print(f"trt: wrote {args.trt}; manifest {manifest_path(args.trt)} (engines hold native code)")
                else:
                    status = EXIT_FAIL
                    print(f"trt: {args.trt} not written (verification failed)", file=sys.stderr)
        except TensorRTUnavailable as e:
            print(f"trt: not built: {e}", file=sys.stderr)
            status = status or EXIT_TRT_MISSING
        except (ValueError, ArtifactError) as e:
            print(f"trt: error: {e}", file=sys.stderr)
            status = status or EXIT_FAIL
    return status


if __name__ == "__main__":
    sys.exit(main())
