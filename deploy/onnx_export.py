"""ONNX export of generators, with dynamic batch/height/width, checked and verified in onnxruntime.

Exporter choice (measured with torch 2.14 and onnxscript 0.7): the dynamo exporter
(``torch.onnx.export(..., dynamo=True)``, built on ``torch.export``) gives the clean graph --
Conv, InstanceNormalization, Relu, Pad(reflect), Add, Slice, ConvTranspose, Tanh -- with the
symbolic H and W expressed as multiples of the size multiple. The TorchScript exporter works
too (``fastcgan.ops`` routes to the reference under ``torch.onnx.is_in_onnx_export()``) but
wraps every reflection pad in Shape/Concat/Reshape/Transpose glue, so it is the fallback,
used when the dynamo exporter is missing or fails. Opset 18 is the default: the dynamo
exporter's lowest native opset; converting its Pad nodes down to 17 fails in onnx 1.23, and it
silently writes opset 18 when asked for less, so lower opsets (7-17) go to the TorchScript exporter.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from collections.abc import Sequence

import torch
from fastcgan._cli import interrupt_seen
from fastcgan.deploy._common import METADATA_KEY, ArtifactError, GeneratorSpec, round_up
from torch import nn

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"
MAX_SIZE = 8192  # largest H/W the dynamic dims allow


def opset_range(exporter: str) -> tuple[int, int]:
    """(lowest, highest) opset ``exporter`` writes as asked: the dynamo exporter starts at 18 (it
    raises lower requests to 18 without a word), the TorchScript one stops at 20; both are
    bounded by what this torch declares (``torch.onnx._constants``)."""
    try:  # a private module: torch 2.11 and 2.14 declare 7, 23 and 20; older ones may not
        from torch.onnx import _constants as c
    except ImportError:  # pragma: no cover
        c = None
    dynamo = (DEFAULT_OPSET, getattr(c, "ONNX_MAX_OPSET", 23))
    script = (getattr(c, "ONNX_MIN_OPSET", 7), getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    return {"dynamo": dynamo, "torchscript": script, "auto": (script[0], dynamo[1])}[exporter]


def _exporters(exporter: str, opset: int) -> tuple[str, ...]:
    """The exporters to try, in order, for ``opset``; ValueError when none can write it."""
    lo, hi = opset_range(exporter)
    if not lo <= opset <= hi:
        raise ValueError(f"--opset {opset}: the {exporter} exporter of torch {torch.__version__} writes "
                         f"opsets {lo} to {hi}")
    if exporter != "auto":
        return (exporter,)
    return tuple(e for e in ("dynamo", "torchscript") if opset_range(e)[0] <= opset <= opset_range(e)[1])


def _dynamic_shapes(spec: GeneratorSpec, static_hw: tuple[int, int] | None):
    Dim = torch.export.Dim
    dims = {0: Dim("batch", min=1, max=4096)}
    if static_hw is None:
        m = spec.size_multiple
        lo = max(1, spec.min_size // m)
        # H = m * h: torch.export proves every intermediate shape divides evenly.
        dims[2] = m * Dim("h", min=lo, max=MAX_SIZE // m)
        dims[3] = m * Dim("w", min=lo, max=MAX_SIZE // m)
    return {"x": dims}


def _example_input(spec: GeneratorSpec, dtype: torch.dtype, static_hw, device) -> torch.Tensor:
    # Batch 2, H = 2m and W = 3m (m the size multiple), all distinct: torch.export specialises
    # dims of size 0/1 and unifies equal ones, which would freeze the dynamic dims.
    if static_hw is not None:
        h, w = static_hw
    else:
        m = spec.size_multiple
        h = max(round_up(spec.min_size, m), round_up(64, m), 2 * m)
        w = h + m
    return torch.randn(2, spec.input_nc, h, w, dtype=dtype, device=device)


def _forward_arg_name(model: nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name if params else "x"


def export_onnx(
    model: nn.Module,
    path: str,
    spec: GeneratorSpec,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    static_hw: tuple[int, int] | None = None,
    exporter: str = "auto",
    verbose: bool = False,
) -> GeneratorSpec:
    """Write ``model`` to ``path`` as ONNX (one self-contained file) and return the spec stored in it.

    ``exporter``: ``"dynamo"``, ``"torchscript"`` or ``"auto"`` (dynamo, falling back to TorchScript;
    TorchScript alone below opset 18). The file is written at ``opset`` or not at all."""
    order = _exporters(exporter, opset)
    if static_hw is not None:
        h, w = static_hw
        m = spec.size_multiple
        if h % m or w % m or h < spec.min_size or w < spec.min_size:
            raise ValueError(
                f"--static {h}x{w}: height and width must be multiples of {m} and at least {spec.min_size} "
                f"for arch {spec.arch or '?'}"
            )
    dtype = torch.float16 if fp16 else torch.float32
    model = reference_copy(model).to(device="cpu", dtype=dtype)
    spec = spec.replace(dtype="float16" if fp16 else "float32", static_hw=tuple(static_hw) if static_hw else None)
    x = _example_input(spec, dtype, static_hw, "cpu")
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    errors = []
    # The exporters write into a private folder; the finished model replaces ``path`` atomically.
    with tempfile.TemporaryDirectory(prefix=".fastcgan-export-", dir=folder) as work:
        raw = os.path.join(work, "g.onnx")
        for which in order:
            try:
                _run_exporter(which, model, x, raw, spec, opset, static_hw, verbose)
                break
            except Exception as e:  # noqa: BLE001 - report and try the next exporter
                if interrupt_seen():  # Ctrl-C inside the exporter, turned into another error by torch
                    raise KeyboardInterrupt from e
                errors.append(f"{which}: {type(e).__name__}: {e}")
                if len(order) > 1 and which != order[-1]:
                    warnings.warn(f"ONNX {which} exporter failed ({e}); falling back to the TorchScript exporter")
        else:
            raise RuntimeError("ONNX export failed:\n  " + "\n  ".join(errors))
        _finalise(raw, spec, dest=path, opset=opset)
    return spec


def reference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose fastcgan layers use the reference backend.

    A copy, so the caller's model keeps its device, dtype and backend (it is what artifacts are
    verified against). The backend is set explicitly rather than trusting
    ``fastcgan.ops._backends.is_exporting()`` alone: on torch 2.11 a non-strict
    ``torch.export.export`` (the AOTInductor path) does not report itself as exporting, and
    the graph would hold the ``fastcgan::instance_norm_act_fwd`` custom op with the backend
    resolved at trace time (a Triton or CUDA kernel called back through Python)."""
    from fastcgan.nn import set_backend

    return set_backend(copy.deepcopy(model).eval(), "torch")


def _run_exporter(which, model, x, path, spec, opset, static_hw, verbose):
    kw = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    quiet = contextlib.nullcontext() if verbose else _quiet()
    with torch.no_grad(), quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if which == "dynamo":
            shapes = _dynamic_shapes(spec, static_hw)
            shapes = {_forward_arg_name(model): shapes["x"]}
            prog = torch.onnx.export(model, (x,), None, dynamo=True, dynamic_shapes=shapes,
                                     verbose=False, optimize=True, **kw)
            prog.save(path, external_data=False)
        else:
            axes = {0: "batch"} if static_hw is not None else {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(model, (x,), path, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, **kw)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress lines and onnxscript logs; keep the CLI's output readable."""
    import logging

    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "torch.export", "torch._export")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def _finalise(path: str, spec: GeneratorSpec, dest: str | None = None, opset: int | None = None) -> None:
    """Fold any external-data file back in, store the spec, run the ONNX checker, and write the
    model to ``dest`` (default: ``path``) atomically."""
    import onnx

    from fastcgan.fileio import atomic_write

    proto = onnx.load(path, load_external_data=True)
    got = opset_of(proto)
    if opset is not None and got != opset:  # an exporter that quietly chose another opset
        raise RuntimeError(f"asked for opset {opset}, the exporter wrote opset {got}")
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, spec.to_json()
    proto.producer_name = "fastcgan"
    onnx.checker.check_model(proto, full_check=True)
    dest = path if dest is None else dest
    atomic_write(dest, proto.SerializeToString())
    for extra in (path + ".data", path + "_data"):
        if os.path.exists(extra):
            os.remove(extra)


def read_spec(path: str) -> GeneratorSpec:
    """The spec stored in an ONNX file by :func:`export_onnx`; inferred (with a warning) for a foreign file."""
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ArtifactError(path, f"not a readable ONNX model ({type(e).__name__}: {e})") from e
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    outputs = list(proto.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ArtifactError(path, f"expected one image input and one output, found {len(inputs)} and {len(outputs)}")

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    di, do = dims(inputs[0]), dims(outputs[0])
    elem = inputs[0].type.tensor_type.elem_type
    dtype = "float16" if elem == onnx.TensorProto.FLOAT16 else "float32"
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            return _graph_agrees(path, GeneratorSpec.from_json(p.value), di, do, dtype)
    if len(di) != 4 or di[1] is None:
        raise ArtifactError(path, f"input {inputs[0].name!r} is not (N, C, H, W) with a fixed C: {di}")
    warnings.warn(f"{path}: no fastcgan metadata; assuming H/W multiples of 4")
    static = (di[2], di[3]) if di[2] and di[3] else None
    return GeneratorSpec(input_nc=di[1], output_nc=do[1] if len(do) == 4 and do[1] else di[1],
                         static_hw=static, dtype=dtype)


def _graph_agrees(path: str, spec: GeneratorSpec, di: list, do: list, dtype: str) -> GeneratorSpec:
    """``spec`` (the file's metadata) when the graph's fixed dimensions and input type agree with
    it; else an :class:`ArtifactError` now, not an onnxruntime error at the first image (a crafted
    or hand-edited file)."""
    def disagree(what: str, graph, meta) -> ArtifactError:
        return ArtifactError(path, f"the fastcgan metadata says {what} {meta}, the graph {graph}: a damaged or "
                             "edited model (export it again)")

    if len(di) != 4 or len(do) != 4:
        raise ArtifactError(path, f"the graph's input and output must be (N, C, H, W), got {di} and {do}")
    for what, graph, meta in (("input channels", di[1], spec.input_nc), ("output channels", do[1], spec.output_nc)):
        if graph is not None and graph != meta:
            raise disagree(what, graph, meta)
    # A fixed H or W (either one) must be the metadata's static size: the runtime pads and tiles by it.
    meta_hw = spec.static_hw or (None, None)
    if any(g is not None and g != m for g, m in zip(di[2:], meta_hw)):
        graph_hw = "x".join("any" if v is None else str(v) for v in di[2:])
        raise disagree("input size", f"{graph_hw} only",
                       "any size" if spec.static_hw is None else "{}x{}".format(*spec.static_hw))
    if dtype != spec.dtype:
        raise disagree("input type", dtype, spec.dtype)
    return spec


def opset_of(model) -> int | None:
    """The default-domain opset of an ONNX model (a path or a loaded ModelProto)."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(model, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def op_types(path: str) -> list[str]:
    import onnx

    return sorted({n.op_type for n in onnx.load(path, load_external_data=False).graph.node})


# --------------------------------------------------------------------------------------------
# Verification against PyTorch
# --------------------------------------------------------------------------------------------
def default_verify_shapes(spec: GeneratorSpec, max_pixels: int | None = None) -> list[tuple[int, int, int]]:
    """(batch, H, W) triples: a square, a batched non-square, and a wide one (a static model: its
    size at batch 1, and at batch 2 while ``2 * H * W`` stays within ``max_pixels``)."""
    if spec.static_hw is not None:
        h, w = spec.static_hw
        return [(1, h, w)] + ([(2, h, w)] if max_pixels is None or 2 * h * w <= max_pixels else [])
    m = spec.size_multiple

    def r(n):
        return max(spec.min_size, round_up(n, m))

    a = r(256)
    return [(1, a, a), (2, r(a // 2), r(3 * a // 4)), (1, r(a // 2), r(3 * a // 2))]


def verify_against_torch(
    run, model: nn.Module, spec: GeneratorSpec, shapes: Sequence[tuple[int, int, int]],
    *, device: str = "cpu", seed: int = 0,
) -> list[tuple[tuple[int, ...], float]]:
    """Max abs error of ``run(x) -> Tensor`` against ``model(x)`` in fp32 for each (B, H, W)."""
    ref_model = model.eval().to(device=device, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    out = []
    with _no_tf32():
        for b, h, w in shapes:
            out.append(_compare_one(run, ref_model, spec, b, h, w, g, device))
    return out


@contextlib.contextmanager
def _no_tf32():
    """True fp32 for the PyTorch reference on a GPU (cuDNN convolutions default to TF32)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _compare_one(run, ref_model, spec, b, h, w, g, device):
    x = torch.rand(b, spec.input_nc, h, w, generator=g) * 2 - 1
    with torch.no_grad():
        ref = ref_model(x.to(device)).float().cpu()
        y = run(x)
    y = torch.as_tensor(y).float().cpu()
    if y.shape != ref.shape:
        raise AssertionError(f"output shape {tuple(y.shape)} != PyTorch's {tuple(ref.shape)} for input {(b, h, w)}")
    return (b, spec.input_nc, h, w), float((y - ref).abs().max())
