"""``fastcgan-export``: a trained generator to ONNX / TensorRT / AOTInductor, each verified at once.

    fastcgan-export runs/h2z --direction AtoB --onnx g.onnx --trt g.engine --aoti g.pt2
    fastcgan-export --from-official latest_net_G_A.pth --arch resnet_9blocks --onnx g.onnx

Every artifact is run right after it is written and compared with the PyTorch generator on
several input sizes; the max abs error is printed and the exit status is non-zero when it is
over tolerance. Steps are independent: a missing TensorRT fails ``--trt`` (exit status 3,
with what to install) but the ONNX and AOTInductor files of the same command are still made.

AOTInductor packages and TensorRT engines hold native code; each gets a manifest beside it
(``g.pt2.manifest.json``: sha256, fastcgan version, arch, shapes, dtype) without which
``fastcgan-translate`` and :func:`fastcgan.deploy.load` refuse to run it. Every file is written
atomically (never half-written under its final name).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from fastcgan.deploy._common import (
    DIRECTIONS,
    ArtifactError,
    load_official,
    load_torch_generator,
    resolve_device,
)
from fastcgan.devices import DeviceUnavailableError

# Max abs error on outputs in [-1, 1], against the fp32 PyTorch generator.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1.5e-1}
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_TRT_MISSING = 0, 1, 2, 3


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HxW, e.g. 256x256, got {text!r}")


def _bhw_list(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        try:
            b, h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected BxHxW[,BxHxW...], got {part!r}") from None
        out.append((b, h, w))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcgan-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run directory or generator .safetensors file")
    p.add_argument("--direction", choices=DIRECTIONS, default="AtoB", help="which generator of a run directory")
    g = p.add_argument_group("official CycleGAN checkpoints")
    g.add_argument("--from-official", metavar="PTH", help="official latest_net_G_A.pth (instead of RUN)")
    g.add_argument("--arch", help="generator arch of the official checkpoint, e.g. resnet_9blocks")
    g.add_argument("--ngf", type=int, default=64)
    g.add_argument("--norm", default="instance", choices=("instance", "batch", "none"))
    d = g.add_mutually_exclusive_group()
    d.add_argument("--no-dropout", dest="dropout", action="store_false", default=False)
    d.add_argument("--dropout", dest="dropout", action="store_true")
    g.add_argument("--colorization", action="store_true",
                   help="the checkpoint is the official --model colorization G (L -> ab, 1 -> 2 channels): "
                        "export it as an RGB -> RGB colorizer (the input's lightness, colours predicted)")
    g.add_argument("--bn-inference", choices=("per_image", "running"), default=None,
                   help="BatchNorm statistics at inference: per_image = the official test.py (batch "
                        "statistics at batch 1; default for --from-official), running = test.py --eval; "
                        "for RUN the stored mode unless given")
    o = p.add_argument_group("outputs")
    o.add_argument("--onnx", metavar="PATH", help="write an ONNX model (dynamic batch/H/W)")
    o.add_argument("--trt", metavar="PATH", help="build a TensorRT engine (needs tensorrt and a GPU)")
    o.add_argument("--aoti", metavar="PATH", help="write an AOTInductor package (.pt2)")
    x = p.add_argument_group("options")
    x.add_argument("--opset", type=int, default=18)
    x.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
    prec = x.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="half precision (ONNX weights/I-O, TensorRT, AOTI)")
    prec.add_argument("--bf16", action="store_true", help="bfloat16 (TensorRT and AOTI; ONNX stays fp32)")
    x.add_argument("--static", type=_hw, metavar="HxW", help="fixed H and W (batch stays dynamic)")
    x.add_argument("--min-shape", metavar="BxCxHxW")
    x.add_argument("--opt-shape", metavar="BxCxHxW")
    x.add_argument("--max-shape", metavar="BxCxHxW")
    x.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT workspace limit")
    x.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache file (read and updated)")
    x.add_argument("--device", default="auto", help="device for AOTInductor and verification (auto|cpu|cuda)")
    x.add_argument("--max-autotune", action="store_true", help="AOTInductor: autotune kernels (slow compile)")
    x.add_argument("--tol", type=float, help="max abs error allowed (default: fp32 1e-4, fp16 5e-2, bf16 1.5e-1)")
    x.add_argument("--verify-sizes", type=_bhw_list, metavar="BxHxW,...", help="input sizes to verify on")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.onnx or args.trt or args.aoti):
        parser.error("nothing to do: give at least one of --onnx, --trt, --aoti")
    if bool(args.run) == bool(args.from_official):
        parser.error("give exactly one of RUN (run directory / .safetensors) and --from-official PTH")
    if args.from_official and not args.arch:
        parser.error("--from-official needs --arch (e.g. --arch resnet_9blocks)")
    if args.colorization and not args.from_official:
        parser.error("--colorization describes an official checkpoint (--from-official); fastcgan "
                     "generator files already say whether they colorize")
    for flag, val, ext in (("--onnx", args.onnx, ".onnx"), ("--aoti", args.aoti, ".pt2")):
        if val and not val.endswith(ext):
            parser.error(f"{flag} {val}: the file name must end in {ext}")
    precision = "fp16" if args.fp16 else ("bf16" if args.bf16 else "fp32")
    tol = args.tol if args.tol is not None else TOLERANCE[precision]
    from fastcgan.deploy.tensorrt import parse_shape

    try:
        shapes = {k: parse_shape(v, "--" + k.replace("_", "-")) if v else None
                  for k, v in (("min_shape", args.min_shape), ("opt_shape", args.opt_shape),
                               ("max_shape", args.max_shape))}
    except ValueError as e:
        parser.error(str(e))
    try:
        device = resolve_device(args.device)
    except (DeviceUnavailableError, ValueError) as e:
        print(f"fastcgan-export: error: --device: {e}", file=sys.stderr)
        return EXIT_USAGE

    try:
        # The reference backend: exports trace it anyway (fastcgan.ops routes to the reference
        # while exporting), and it is the specification the artifacts are verified against.
        if args.from_official:
            model, spec = load_official(args.from_official, args.arch, args.ngf, args.norm, args.dropout,
                                        backend="torch", bn_inference=args.bn_inference or "per_image",
                                        color_space="lab" if args.colorization else "rgb")
            source = args.from_official
        else:
            model, spec = load_torch_generator(args.run, direction=args.direction, backend="torch")
            source = args.run
            if args.bn_inference and spec.config.get("norm") == "batch":
                from fastcgan.models import set_bn_inference

                set_bn_inference(model, args.bn_inference)
                spec = spec.replace(config=dict(spec.config, bn_inference=args.bn_inference))
    except (ArtifactError, ValueError) as e:
        print(f"fastcgan-export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    model = model.eval().float()
    print(f"generator: {source} ({spec.arch or 'unknown arch'}, {spec.input_nc}->{spec.output_nc} channels, "
          f"H/W multiple of {spec.size_multiple}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    if spec.config.get("norm") == "batch":
        mode = spec.config.get("bn_inference", "running")
        print(f"batchnorm at inference: {mode} statistics ("
              + ("each image's own, = the official test.py at batch 1" if mode == "per_image"
                 else "the stored running mean/var, = test.py --eval") + "; recorded in the artifact)")
    if args.static:
        h, w = args.static
        if h % spec.size_multiple or w % spec.size_multiple:
            print(f"fastcgan-export: error: --static {h}x{w}: H and W must be multiples of {spec.size_multiple}",
                  file=sys.stderr)
            return EXIT_USAGE

    status = EXIT_OK
    tmp = tempfile.TemporaryDirectory(prefix="fastcgan-export-")
    onnx_path = args.onnx
    from fastcgan.deploy import onnx_export

    verify_shapes = None

    # ---- ONNX (also the input of TensorRT) ----
    if args.onnx or args.trt:
        onnx_path = args.onnx or os.path.join(tmp.name, "g.onnx")
        onnx_fp16 = args.fp16
        t0 = time.perf_counter()
        try:
            onnx_spec = onnx_export.export_onnx(model, onnx_path, spec, opset=args.opset, fp16=onnx_fp16,
                                                static_hw=args.static, exporter=args.exporter)
        except Exception as e:  # noqa: BLE001
            print(f"ONNX export failed: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_FAIL
        verify_shapes = args.verify_sizes or onnx_export.default_verify_shapes(onnx_spec)
        print(f"onnx: wrote {onnx_path} in {time.perf_counter() - t0:.1f}s (opset {args.opset}, "
              f"{'fp16' if onnx_fp16 else 'fp32'}, {'static ' + 'x'.join(map(str, args.static)) if args.static else 'dynamic batch/H/W'}); "
              f"checker passed; ops: {', '.join(onnx_export.op_types(onnx_path))}")
        if args.bf16:
            print("onnx: --bf16 applies to TensorRT and AOTInductor; the ONNX model stays fp32")
        if not args.no_verify:
            run = onnx_export.onnx_runner(onnx_path)
            onnx_tol = tol if onnx_fp16 else TOLERANCE["fp32"] if args.tol is None else tol
            errs = onnx_export.verify_against_torch(run, model, onnx_spec, verify_shapes)
            if not _report("onnxruntime", errs, onnx_tol):
                status = EXIT_FAIL
            model.float()

    # ---- AOTInductor ----
    if args.aoti:
        from fastcgan.deploy.aoti import export_aoti, load_aoti

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        t0 = time.perf_counter()
        try:
            aspec = export_aoti(model, args.aoti, spec, device=device, dtype=dtype, static_hw=args.static,
                                max_autotune=args.max_autotune)
            print(f"aoti: wrote {args.aoti} in {time.perf_counter() - t0:.1f}s ({device.type}, {precision}); "
                  f"manifest {args.aoti}.manifest.json (the package holds native code)")
            if not args.no_verify:
                if device.type == "cuda":
                    run_aoti = _isolated_runner(args.aoti, device, dtype)
                else:
                    fn, _ = load_aoti(args.aoti, device)

                    def run_aoti(x):
                        return fn(x.to(device=device, dtype=dtype))

                shapes_a = args.verify_sizes or onnx_export.default_verify_shapes(aspec)
                errs = onnx_export.verify_against_torch(run_aoti, model, aspec, shapes_a, device=str(device))
                if not _report("aoti", errs, tol):
                    status = EXIT_FAIL
        except Exception as e:  # noqa: BLE001
            print(f"AOTInductor export failed: {type(e).__name__}: {e}", file=sys.stderr)
            status = EXIT_FAIL

    # ---- TensorRT ----
    if args.trt:
        from fastcgan.deploy.tensorrt import TensorRTUnavailable, TrtRunner, build_engine

        t0 = time.perf_counter()
        try:
            build_engine(onnx_path, args.trt, onnx_spec, fp16=args.fp16, bf16=args.bf16,
                         min_shape=shapes["min_shape"], opt_shape=shapes["opt_shape"],
                         max_shape=shapes["max_shape"], workspace_gb=args.workspace_gb,
                         timing_cache=args.timing_cache)
            print(f"trt: wrote {args.trt} in {time.perf_counter() - t0:.1f}s ({precision}); "
                  f"manifest {args.trt}.manifest.json (engines hold native code)")
            if not args.no_verify:
                runner = TrtRunner(args.trt)
                prof = runner.profile
                ok_shapes = [s for s in verify_shapes
                             if prof is None or all(prof[0][i] <= v <= prof[2][i] for i, v in ((0, s[0]), (2, s[1]), (3, s[2])))]
                if not ok_shapes and prof is not None:
                    ok_shapes = [(prof[1][0], prof[1][2], prof[1][3])]
                errs = onnx_export.verify_against_torch(runner, model, onnx_spec, ok_shapes, device="cuda")
                if not _report("tensorrt", errs, tol):
                    status = EXIT_FAIL
        except TensorRTUnavailable as e:
            print(f"trt: not built: {e}", file=sys.stderr)
            status = status or EXIT_TRT_MISSING
        except (ValueError, ArtifactError) as e:
            print(f"trt: error: {e}", file=sys.stderr)
            status = status or EXIT_FAIL
    tmp.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
