"""Export and runtimes for trained generators (installed as fastcgan.deploy).

    from fastcgan.deploy import load
    translator = load("g.onnx")            # or a run dir, .safetensors, .engine, .pt2
    out = translator(image)                # PIL / uint8 HxWxC numpy / uint8 or [-1,1] float tensors

Exporters: :func:`export_onnx`, :func:`export_aoti`, :func:`build_engine` (TensorRT); the
``fastcgan-export`` CLI (:mod:`fastcgan.deploy.cli`) runs them and verifies each artifact.
"""

from fastcgan.deploy._common import ArtifactError, GeneratorSpec
from fastcgan.deploy.runtime import ENGINES, Translator, load

__all__ = [
    "ENGINES",
    "ArtifactError",
    "GeneratorSpec",
    "Translator",
    "build_engine",
    "export_aoti",
    "export_onnx",
    "load",
    "tiled_apply",
]


def __getattr__(name):
    # Exporters import onnx / inductor / tensorrt lazily: `import fastcgan.deploy` stays cheap.
    if name == "export_onnx":
        from fastcgan.deploy.onnx_export import export_onnx

        return export_onnx
    if name == "export_aoti":
        from fastcgan.deploy.aoti import export_aoti

        return export_aoti
    if name == "build_engine":
        from fastcgan.deploy.tensorrt import build_engine

        return build_engine
    if name == "tiled_apply":
        from fastcgan.deploy.tiling import tiled_apply

        return tiled_apply
    raise AttributeError(f"module 'fastcgan.deploy' has no attribute {name!r}")
