"""AOTInductor packages: ``torch.export`` with dynamic batch/H/W, compiled ahead of time to a .pt2.

The package holds the compiled kernels and the weights; ``torch._inductor.aoti_load_package``
runs it with nothing but torch installed (no fastcgan, no training code). The generator spec is
stored in the package metadata (``aot_inductor.metadata``), so :func:`fastcgan.deploy.load`
knows the channels and size multiple. A package is compiled for one device type (CPU packages
also for the compiling machine's ISA, e.g. AVX-512/AMX).

A package holds native code that runs when it is loaded: :func:`export_aoti` writes a manifest
beside it (``<pkg>.manifest.json``, :mod:`fastcgan.deploy.manifest`) and :func:`load_aoti` /
:func:`run_package_isolated` load only a package whose manifest verifies, or one the caller
trusts explicitly (``trust_artifact=True``).
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from fastcgan.deploy._common import METADATA_KEY, ArtifactError, GeneratorSpec
from fastcgan.deploy.manifest import install, verified_copy, write_manifest
from fastcgan.deploy.onnx_export import _dynamic_shapes, _example_input, _forward_arg_name, reference_copy
from torch import nn


def export_program(model: nn.Module, spec: GeneratorSpec, device: torch.device, dtype: torch.dtype,
                   static_hw: tuple[int, int] | None = None):
    """``torch.export`` of the generator; H and W are dynamic multiples of ``spec.size_multiple``."""
    model = reference_copy(model).to(device=device, dtype=dtype)
    x = _example_input(spec, dtype, static_hw, device)
    shapes = {_forward_arg_name(model): _dynamic_shapes(spec, static_hw)["x"]}
    with torch.no_grad():
        return torch.export.export(model, (x,), dynamic_shapes=shapes)


def inductor_options(device: torch.device, *, freezing: bool = True, max_autotune: bool = False) -> dict:
    """Inductor settings for an inference package.

    ``freezing`` folds the weights into the graph as constants, which lets the CPU backend
    pre-pack convolution weights for oneDNN once instead of on every call."""
    # Freezing only on CPU: on CUDA the win is small (cuDNN takes the weights as they are) and
    # torch 2.11 segfaulted loading a frozen bf16 CUDA package in the compiling process.
    opts: dict = {"freezing": bool(freezing and device.type == "cpu")}
    if max_autotune:
        opts["max_autotune"] = True
    return opts


def export_aoti(
    model: nn.Module,
    path: str,
    spec: GeneratorSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    static_hw: tuple[int, int] | None = None,
    freezing: bool = True,
    max_autotune: bool = False,
) -> GeneratorSpec:
    """Compile ``model`` into an AOTInductor package at ``path`` (``.pt2``) and write its manifest
    (``path + ".manifest.json"``). The package is built in a private folder beside ``path`` and
    renamed into place, so ``path`` is never a half-written package."""
    device = torch.device(device)
    if not str(path).endswith(".pt2"):
        raise ValueError(f"--aoti {path}: AOTInductor packages must end in .pt2")
    spec = spec.replace(dtype=str(dtype).replace("torch.", ""), static_hw=tuple(static_hw) if static_hw else None)
    ep = export_program(model, spec, device, dtype, static_hw)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    opts = inductor_options(device, freezing=freezing, max_autotune=max_autotune)
    compile_and_package = getattr(torch._inductor, "aoti_compile_and_package", None)
    if compile_and_package is None:  # pragma: no cover - torch < 2.6
        raise RuntimeError(f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package (need >= 2.6)")
    from fastcgan.fileio import atomic_write

    with tempfile.TemporaryDirectory(prefix=".fastcgan-export-", dir=folder) as work:
        tmp_pkg = os.path.join(work, os.path.basename(path))
        try:
            compile_and_package(ep, package_path=tmp_pkg,
                                inductor_configs={**opts, "aot_inductor.metadata": {METADATA_KEY: spec.to_json()}})
        except Exception as e:
            # Older torch builds reject some config keys (metadata, freezing on AOTI); keep a working
            # package and put the spec beside it instead.
            if "metadata" not in str(e) and "freezing" not in str(e):
                raise
            warnings.warn(f"AOTInductor rejected an option ({e}); compiling without it, spec in {path}.json")
            compile_and_package(ep, package_path=tmp_pkg)
            atomic_write(path + ".json", spec.to_json().encode())
        install(tmp_pkg, path)
    write_manifest(path, "aoti", spec, device=device.type)
    return spec


def load_aoti(path: str, device: torch.device | None = None, *, trust_artifact: bool = False):
    """(callable, spec) for an AOTInductor package. The callable takes and returns a tensor; its
    ``trust`` attribute says how the package was admitted.

    The package is loaded (its shared library run) only when its manifest verifies, or with
    ``trust_artifact=True``; otherwise :class:`~fastcgan.deploy.manifest.UntrustedArtifactError`
    is raised and nothing from the file is executed."""
    import zipfile

    copy, note, keep = verified_copy(path, "aoti", trust=trust_artifact)
    try:
        if not zipfile.is_zipfile(copy):
            raise ArtifactError(path, "not an AOTInductor package (.pt2 files are zip archives; this one is not)")
        load_package = getattr(torch._inductor, "aoti_load_package", None)
        if load_package is None:  # pragma: no cover
            raise RuntimeError(f"torch {torch.__version__} has no torch._inductor.aoti_load_package (need >= 2.6)")
        try:
            model = load_package(copy)
        except Exception as e:
            raise ArtifactError(path, f"cannot load AOTInductor package ({type(e).__name__}: {e})") from e
    except BaseException:
        keep.cleanup()
        raise
    meta = {}
    try:
        meta = dict(model.get_metadata())
    except Exception:  # noqa: BLE001 - older packages have no metadata accessor
        pass
    pkg_dev = meta.get("AOTI_DEVICE_KEY")
    if device is not None and pkg_dev and torch.device(pkg_dev).type != device.type:
        raise ArtifactError(path, f"package was compiled for {pkg_dev}, cannot run on {device}")
    if METADATA_KEY in meta:
        spec = GeneratorSpec.from_json(meta[METADATA_KEY])
    elif os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            spec = GeneratorSpec.from_json(f.read())
    else:
        raise ArtifactError(path, "AOTInductor package without fastcgan metadata (not exported by fastcgan-export)")
    pkg_device = torch.device(pkg_dev) if pkg_dev else (device or torch.device("cpu"))
    if pkg_device.type == "cuda" and pkg_device.index is None:
        pkg_device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    run.device = pkg_device
    run.trust = note
    run._keep = keep  # the verified copy lives as long as the loaded package
    return run, spec


def run_package_isolated(path: str, inputs: list, device: torch.device, *, trust_artifact: bool = False) -> list:
    """Outputs of the package at ``path`` for ``inputs``, computed in a fresh Python process
    (from a verified private copy; the manifest rule of :func:`load_aoti` applies).

    Loading a CUDA package in the process that just compiled it segfaulted with torch 2.11
    (inside ``aoti_load_package``), so the CLI verifies CUDA packages this way; it is also
    the honest test that the package runs with torch alone."""
    import subprocess
    import sys
    import tempfile

    copy, _, keep = verified_copy(path, "aoti", trust=trust_artifact)
    with keep, tempfile.TemporaryDirectory(prefix="fastcgan-aoti-") as tmp:
        src, dst = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save([x.cpu() for x in inputs], src)
        code = (
            "import sys, torch\n"
            "pkg, src, dst, dev = sys.argv[1:5]\n"
            "m = torch._inductor.aoti_load_package(pkg)\n"
            "outs = []\n"
            "for x in torch.load(src):\n"
            "    y = m(x.to(dev))\n"
            "    y = y[0] if isinstance(y, (list, tuple)) else y\n"
            "    outs.append(y.float().cpu())\n"
            "torch.save(outs, dst)\n"
        )
        # -X faulthandler: a crash inside the loader leaves a Python stack on stderr, not nothing.
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, copy, src, dst, str(device)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exit status {proc.returncode}")
            raise RuntimeError(f"{path}: running the package in a fresh process failed ({how}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        return torch.load(dst)


def compile_isolated(source: str, path: str, device: torch.device, *, direction: str | None = None,
                     dtype: torch.dtype = torch.float32) -> None:
    """Build an AOTInductor package for a saved generator in a child process (``fastcgan-export``).
    ``direction`` picks a run's generator; None for a one-generator file (the CLI refuses it there)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fastcgan.deploy.cli", source, "--aoti", path, "--device", str(device),
           "--no-verify"] + (["--direction", direction] if direction else [])
    if dtype == torch.float16:
        cmd.append("--fp16")
    elif dtype == torch.bfloat16:
        cmd.append("--bf16")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"AOTInductor compilation of {source} failed:\n{proc.stdout[-1500:]}{proc.stderr[-3000:]}")
