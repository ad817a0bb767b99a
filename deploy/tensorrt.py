"""TensorRT 10 engines built from the exported ONNX file, and a runner for them.

Written against the TensorRT 10 Python API (named I/O tensors, ``execute_async_v3``,
``set_memory_pool_limit``, explicit batch by default). TensorRT is not a dependency: without
it (or without a CUDA GPU) :class:`TensorRTUnavailable` says what to install.

The engine runs on torch's current CUDA stream with torch-allocated buffers, so no extra
CUDA binding (pycuda, cuda-python) is needed and no host synchronisation happens inside
:meth:`TrtRunner.__call__`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import torch
from fastcgan.deploy._common import MAX_STATIC_SIDE, ArtifactError, GeneratorSpec
from fastcgan.deploy.manifest import verified_bytes, write_manifest
from fastcgan.fileio import read_json

MAX_PROFILE_BATCH = 1024  # --min/--opt/--max-shape batch; sides at most MAX_STATIC_SIDE

INSTALL_HINT = (
    "TensorRT export needs the TensorRT Python package and a CUDA GPU: `pip install tensorrt` "
    "(TensorRT 10, matching your CUDA major version, e.g. `pip install tensorrt-cu12`), or use "
    "onnxruntime-gpu's TensorRT execution provider (`pip install onnxruntime-gpu`)."
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says what to install."""


def import_tensorrt():
    """The ``tensorrt`` module, or TensorRTUnavailable with install instructions."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install failing to load libnvinfer
        raise TensorRTUnavailable(f"cannot import tensorrt ({type(e).__name__}: {e}). {INSTALL_HINT}") from e
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"no CUDA GPU is visible to torch. {INSTALL_HINT}")
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; fastcgan needs TensorRT >= 10. {INSTALL_HINT}")
    return trt


def parse_shape(text: str, flag: str) -> tuple[int, int, int, int]:
    """``'1x3x256x256'`` -> (1, 3, 256, 256); a clear error naming the flag otherwise."""
    m = re.fullmatch(r"([0-9]{1,6})[xX]([0-9]{1,6})[xX]([0-9]{1,6})[xX]([0-9]{1,6})", text)  # not int()'s " +6_4"
    dims = tuple(int(v) for v in m.groups()) if m else ()
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"{flag} {text!r}: expected BxCxHxW with positive integers, e.g. 1x3x256x256")
    if dims[0] > MAX_PROFILE_BATCH or max(dims[2:]) > MAX_STATIC_SIDE:
        raise ValueError(f"{flag} {text!r}: batch at most {MAX_PROFILE_BATCH}, H and W at most {MAX_STATIC_SIDE} "
                         "(the engine reserves memory for its largest shape)")
    return dims  # type: ignore[return-value]


def default_profile(spec: GeneratorSpec) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) input shapes: 1..8 images from the smallest size to 1024² (opt 256²)."""
    c = spec.input_nc
    if spec.static_hw is not None:
        h, w = spec.static_hw
        return (1, c, h, w), (1, c, h, w), (8, c, h, w)
    m = spec.size_multiple
    opt = max(spec.min_size, (256 + m - 1) // m * m)
    mx = max(opt, (1024 + m - 1) // m * m)
    return (1, c, spec.min_size, spec.min_size), (1, c, opt, opt), (8, c, mx, mx)


def check_profile(spec: GeneratorSpec, shapes: Sequence[tuple]) -> None:
    names = ("--min-shape", "--opt-shape", "--max-shape")
    for name, s in zip(names, shapes):
        if s[1] != spec.input_nc:
            raise ValueError(f"{name} {s}: channel dim must be the generator's input_nc={spec.input_nc}")
        for v in s[2:]:
            if v % spec.size_multiple or v < spec.min_size:
                raise ValueError(f"{name} {s}: H and W must be multiples of {spec.size_multiple} and >= {spec.min_size}")
        if spec.static_hw is not None and tuple(s[2:]) != tuple(spec.static_hw):
            raise ValueError(f"{name} {s}: the ONNX model is static at {spec.static_hw[0]}x{spec.static_hw[1]}")
    for i in range(4):
        if not shapes[0][i] <= shapes[1][i] <= shapes[2][i]:
            raise ValueError(f"optimisation profile needs min <= opt <= max in every dim, got {shapes}")


def build_engine(
    onnx_path: str,
    engine_path: str,
    spec: GeneratorSpec,
    *,
    fp16: bool = False,
    bf16: bool = False,
    min_shape: tuple | None = None,
    opt_shape: tuple | None = None,
    max_shape: tuple | None = None,
    workspace_gb: float = 4.0,
    timing_cache: str | None = None,
    verbose: bool = False,
) -> str:
    """Build a serialized TensorRT engine from ``onnx_path`` and write it to ``engine_path``.

    A JSON file beside the engine (``<engine>.json``) carries the spec and the profile, since
    engines have no metadata field; ``<engine>.manifest.json`` carries its sha256, without which
    :class:`TrtRunner` refuses to deserialize it (engines are native code). Every file is written
    atomically."""
    trt = import_tensorrt()
    d_min, d_opt, d_max = default_profile(spec)
    shapes = (tuple(min_shape or d_min), tuple(opt_shape or d_opt), tuple(max_shape or d_max))
    check_profile(spec, shapes)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: networks are always explicit-batch; flag 0 = weakly typed, so the FP16/BF16
    # builder flags let TensorRT pick per-layer precision (InstanceNormalization keeps fp32
    # statistics inside its kernel).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(onnx_path, f"TensorRT cannot parse this ONNX model: {errs}")
    if network.num_inputs != 1:
        raise ArtifactError(onnx_path, f"expected one input, the network has {network.num_inputs}")
    input_name = network.get_input(0).name

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not (fp16 or bf16) and hasattr(trt.BuilderFlag, "TF32"):
        # TensorRT runs fp32 convolutions in TF32 by default (10-bit mantissa, ~1e-3 error);
        # an fp32 engine is asked to match PyTorch to 1e-4, so keep true fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if bf16:
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no BF16 builder flag; use --fp16")
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes[0], shapes[1], shapes[2])
    config.add_optimization_profile(profile)

    # The timing cache records kernel timings per layer configuration; reusing it makes
    # rebuilds (other precision, other profile) take seconds instead of minutes.
    cache_bytes = b""
    if timing_cache and os.path.exists(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    from fastcgan.fileio import atomic_write

    precision = "bf16" if bf16 else ("fp16" if fp16 else "fp32")
    atomic_write(engine_path, memoryview(serialized))
    if timing_cache:
        atomic_write(timing_cache, memoryview(config.get_timing_cache().serialize()))
    atomic_write(engine_path + ".json", json.dumps(
        {"spec": json.loads(spec.to_json()), "profile": [list(s) for s in shapes], "precision": precision,
         "tensorrt": trt.__version__}, indent=1).encode())
    write_manifest(engine_path, "engine", spec, profile=[list(s) for s in shapes], precision=precision,
                   tensorrt_version=trt.__version__)
    return engine_path


def read_engine_spec(path: str) -> tuple[GeneratorSpec, list | None]:
    side = path + ".json"
    if not os.path.exists(side):
        return GeneratorSpec(), None
    d = read_json(side)
    return GeneratorSpec.from_json(json.dumps(d["spec"])), d.get("profile")


class TrtRunner:
    """Runs a serialized engine on CUDA tensors (any batch/H/W inside its profile).

    The engine is deserialized only when its manifest verifies (or ``trust_artifact=True``); the
    bytes hashed are the bytes deserialized. ``trust`` says which."""

    def __init__(self, engine_path: str, device: torch.device | None = None, *, trust_artifact: bool = False):
        blob, self.trust = verified_bytes(engine_path, "engine", trust=trust_artifact)
        trt = import_tensorrt()
        self.path = engine_path
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.spec, self.profile = read_engine_spec(engine_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise ArtifactError(engine_path, "TensorRT could not deserialize this engine (truncated, or built "
                                "with another TensorRT version or GPU)")
        with torch.cuda.device(self.device):  # the context allocates its activation memory there
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise ArtifactError(engine_path, f"expected one input and one output tensor, got {ins} / {outs}")
        self.input_name, self.output_name = ins[0], outs[0]
        dt = {trt.float32: torch.float32, trt.float16: torch.float16}
        if hasattr(trt, "bfloat16"):
            dt[trt.bfloat16] = torch.bfloat16
        self.in_dtype = dt[self.engine.get_tensor_dtype(self.input_name)]
        self.out_dtype = dt[self.engine.get_tensor_dtype(self.output_name)]
        in_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if in_shape[1] > 0 and in_shape[1] != self.spec.input_nc and os.path.exists(engine_path + ".json"):
            raise ArtifactError(engine_path, f"engine input has {in_shape[1]} channels, its .json says {self.spec.input_nc}")
        if in_shape[1] > 0:
            self.spec = self.spec.replace(input_nc=int(in_shape[1]))
        if in_shape[2] > 0 and in_shape[3] > 0:
            self.spec = self.spec.replace(static_hw=(int(in_shape[2]), int(in_shape[3])))
        # Runner interface used by fastcgan.deploy.runtime.Translator.
        self.name = "trt"
        self.dtype = self.in_dtype
        self.max_batch = int(self.profile[2][0]) if self.profile else 1 << 30

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # TensorRT enqueues on the current CUDA device: the engine's device must be current (a
        # runner on cuda:1 called while cuda:0 is current would run on the wrong GPU).
        with torch.cuda.device(self.device):
            return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.in_dtype).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ValueError(f"{self.path}: input shape {tuple(x.shape)} is outside the engine's profile {self.profile}")
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        y = torch.empty(out_shape, dtype=self.out_dtype, device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        # No sync: x and y were allocated on this stream, so the caching allocator cannot hand
        # x's memory to other work before the engine has read it.
        return y
