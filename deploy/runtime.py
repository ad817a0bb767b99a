"""One inference API for every artifact: ``fastcgan.deploy.load(path) -> Translator``.

``translator(images)`` takes uint8 HxWxC numpy arrays, PIL images, uint8 (B,C,H,W)/(C,H,W)
tensors or float tensors in [-1, 1] (finite; anything else is a ValueError) and returns the same
kind and size (a PIL image as displayed: its EXIF orientation applied, as files are read). In between it converts
to [-1, 1] on the engine's device, reflection-pads H and W up to the generator's size multiple
(so any size works), runs the engine in batches, crops back, and for images larger than
``tile`` runs overlapping tiles blended with ramp weights (:mod:`fastcgan.deploy.tiling`).

Engines: ``torch`` (eager), ``compiled`` (``torch.compile``), ``onnx`` (onnxruntime: CPU, or
the CUDA / TensorRT execution providers of onnxruntime-gpu), ``trt`` (a TensorRT engine) and
``aoti`` (an AOTInductor package).

AOTInductor packages and TensorRT engines hold native code that runs when they are loaded:
:func:`load` runs one only when its manifest (written by ``fastcgan-export``) verifies, or with
``trust_artifact=True``, and ``translator.trust`` says which (:mod:`fastcgan.deploy.manifest`).
ONNX models and ``.safetensors`` generators are data and always load.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastcgan.deploy._common import (
    ArtifactError,
    GeneratorSpec,
    SpecError,
    artifact_kind,
    load_torch_generator,
    resolve_device,
)
from fastcgan.deploy.tiling import (DEFAULT_TILE_OVERLAP, MAX_TILES, check_tile_args, check_tiling, default_overlap,
                                   tiled_apply)
from fastcgan.devices import MEMORY_CHECK_OFF, format_bytes, is_out_of_memory, memory_to_check
from fastcgan.models import build_generator, convolution_input_elements
from torch import Tensor, nn

ENGINES = ("torch", "compiled", "onnx", "trt", "aoti")
DEFAULT_ENGINE = {"run": "torch", "safetensors": "torch", "checkpoint": "torch", "onnx": "onnx", "engine": "trt",
                  "aoti": "aoti"}
# One forward pass takes at most this many (padded) input pixels, one image at least (tiles are
# batched the same way). A generator's activations are ~300x its input (ResNet-9 ngf 64, fp32, on
# a CPU: ~0.9 KB per pixel, 3.6 GB here), so a batch counted in images alone asked ~90 GB for
# --batch-size 8 of 12-Mpx photos. Batch 32 at 256² (2 Mpx) is unaffected.
BATCH_PIXELS = 1 << 22


# A forward pass whose memory floor is surely below this is run without asking how much memory is free.
SMALL_FORWARD = 256 << 20


class InferenceMemoryError(RuntimeError):
    """The engine ran out of memory on a forward pass; the message says how to make it smaller."""


_ALLOWED = {
    "run": ENGINES, "safetensors": ENGINES, "checkpoint": ENGINES,
    "onnx": ("onnx", "trt"), "engine": ("trt",), "aoti": ("aoti",),
}


# --------------------------------------------------------------------------------------------
# Runners: (N, C, H, W) tensor on runner.device in runner.dtype -> (N, C_out, H, W)
# --------------------------------------------------------------------------------------------
class _Runner:
    device: torch.device
    dtype: torch.dtype = torch.float32
    max_batch: int = 1 << 30
    # The dtype a forward's activations take in torch's allocator (the inference memory floor counts
    # in it); None: the engine manages its own memory (TensorRT's context holds its activations,
    # onnxruntime's arena keeps its blocks), so free memory says nothing about the next pass.
    floor_dtype: torch.dtype | None = None
    name: str = "?"

    def __call__(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TorchRunner(_Runner):
    """Eager or ``torch.compile``-d generator."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, compiled: bool = False,
                 compile_mode: str | None = None, channels_last: bool = False):
        self.device, self.dtype, self.floor_dtype = device, dtype, dtype
        self.name = "compiled" if compiled else "torch"
        self.model = model.eval().to(device=device, dtype=dtype)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._cudagraphs = False
        self.fn: Callable = self.model
        if compiled:
            from fastcgan.ops import available_backends

            available_backends()  # probe the kernel backends (loads fastcgan._C) outside the traced forward
            if device.type == "cuda":
                mode = compile_mode or "reduce-overhead"
                self._cudagraphs = mode in ("reduce-overhead", "max-autotune")
                self.fn = torch.compile(self.model, mode=mode)
            elif compile_mode == "freezing" or (compile_mode is None and dtype != torch.float32):
                # CPU half precision: freezing turns weights into constants, so Inductor pre-packs
                # them for oneDNN, whose bf16 convolutions run on AMX (measured 4.2x eager fp32 on
                # 2 Sapphire Rapids cores, vs 2.9x for eager bf16). For fp32 NCHW freezing was
                # measured 4x *slower* than eager (oneDNN blocked-layout reorders around every op),
                # so fp32 compiles without it.
                self.fn = torch.compile(self.model, options={"freezing": True})
            elif compile_mode is None:
                self.fn = torch.compile(self.model)
            else:
                self.fn = torch.compile(self.model, mode=compile_mode)

    def __call__(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
                # The graph's output buffer is overwritten by the next replay: copy it out.
                return self.fn(x).clone()
            return self.fn(x)


def onnx_providers(device: torch.device, tensorrt: bool = False, fp16: bool = False) -> list:
    """onnxruntime execution providers for ``device``; a clear error when they are not installed."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if device.type == "cpu" and not tensorrt:
        return ["CPUExecutionProvider"]
    want = "TensorrtExecutionProvider" if tensorrt else "CUDAExecutionProvider"
    if want not in avail:
        raise RuntimeError(
            f"onnxruntime {ort.__version__} has no {want} (available: {', '.join(avail)}). Install the GPU "
            "build: `pip uninstall onnxruntime && pip install onnxruntime-gpu`"
            + (" (and TensorRT 10 libraries)" if tensorrt else "")
        )
    idx = device.index if device.index is not None else 0
    providers: list = []
    if tensorrt:
        providers.append(("TensorrtExecutionProvider", {"device_id": idx, "trt_fp16_enable": fp16,
                                                        "trt_engine_cache_enable": True}))
    providers.append(("CUDAExecutionProvider", {"device_id": idx}))
    providers.append("CPUExecutionProvider")
    return providers


class OrtRunner(_Runner):
    """onnxruntime session; on CUDA inputs/outputs stay on the GPU through I/O binding."""

    name = "onnx"

    def __init__(self, path: str, device: torch.device, *, tensorrt: bool = False, fp16: bool = False,
                 threads: int | None = None, optimized_model_path: str | None = None):
        import onnxruntime as ort

        self.path = path
        self.device = device
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        if optimized_model_path:
            so.optimized_model_filepath = optimized_model_path
        providers = onnx_providers(device, tensorrt=tensorrt, fp16=fp16)
        try:
            self.sess = ort.InferenceSession(path, so, providers=providers)
        except Exception as e:
            raise ArtifactError(path, f"onnxruntime cannot load this model ({type(e).__name__}: {e})") from e
        ins, outs = self.sess.get_inputs(), self.sess.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise ArtifactError(path, f"expected one input and one output, found {len(ins)} and {len(outs)}")
        self.in_name, self.out_name = ins[0].name, outs[0].name
        batch = ins[0].shape[0] if len(ins[0].shape) == 4 else None
        if isinstance(batch, int):  # a fixed batch (other tools export one): fastcgan's exports leave it free
            if batch != 1:
                raise ArtifactError(path, f"its input batch is fixed at {batch}, and images come in batches of any "
                                    "size (a folder's last is smaller): re-export it with a dynamic batch "
                                    "(fastcgan-export does) or at batch 1")
            self.max_batch = 1  # one image (or tile) per call, whatever --batch-size says
        self.dtype = torch.float16 if "float16" in ins[0].type else torch.float32
        self._np = np.float16 if self.dtype == torch.float16 else np.float32
        self._out_channels = self.output_channels(ins[0].shape, outs[0].shape)
        self._out_dtype = torch.float16 if "float16" in outs[0].type else torch.float32
        self.name = "trt" if tensorrt else "onnx"

    @staticmethod
    def output_channels(in_shape, out_shape) -> int | None:
        """The output's channel count when the graph says the output is (N, C, H, W) of the input's
        N, H and W (a generator: the CUDA path then binds a torch tensor as the output, no copy
        through the host); else None (onnxruntime allocates it)."""
        if len(in_shape) != 4 or len(out_shape) != 4 or not isinstance(out_shape[1], int):
            return None
        same = all(isinstance(a, (int, str)) and a == b for a, b in zip(in_shape[2:], out_shape[2:]))
        return out_shape[1] if same and in_shape[0] == out_shape[0] else None

    def __call__(self, x: Tensor) -> Tensor:
        try:
            return self._run(x)
        except Exception as e:  # onnxruntime's errors derive from Exception alone
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            if is_out_of_memory(e):  # said as memory (the Translator names the size and --tile), not as the model
                raise MemoryError(str(e).strip()[:500]) from None
            # A model its metadata does not describe (edited, or foreign): named, not a raw error.
            raise ArtifactError(self.path, f"onnxruntime failed on a {'x'.join(map(str, x.shape))} input: "
                                f"{str(e).strip()[:500]}") from None

    def _run(self, x: Tensor) -> Tensor:
        # In the session's dtype and on its device (a no-op from the Translator): the CUDA binding
        # below hands onnxruntime a raw pointer that it reads as self._np.
        x = x.detach().to(device=self.device, dtype=self.dtype).contiguous()
        if self.device.type == "cpu":
            return torch.from_numpy(self.sess.run([self.out_name], {self.in_name: x.numpy()})[0])
        idx = self.device.index if self.device.index is not None else 0
        b = self.sess.io_binding()
        b.bind_input(self.in_name, "cuda", idx, self._np, tuple(x.shape), x.data_ptr())
        y = None
        if self._out_channels is not None:  # written in place on the device
            y = torch.empty((x.shape[0], self._out_channels, *x.shape[2:]), dtype=self._out_dtype, device=x.device)
            b.bind_output(self.out_name, "cuda", idx, np.float16 if y.dtype == torch.float16 else np.float32,
                          tuple(y.shape), y.data_ptr())
        else:
            b.bind_output(self.out_name, "cuda", idx)
        # onnxruntime runs on its own stream: the input must be complete before it starts (and its
        # Run synchronises that stream before returning, so y is complete after it).
        torch.cuda.current_stream(self.device).synchronize()
        self.sess.run_with_iobinding(b)
        if y is not None:
            return y
        return torch.from_numpy(b.get_outputs()[0].numpy()).to(self.device)


class CallableRunner(_Runner):
    def __init__(self, fn: Callable[[Tensor], Tensor], device: torch.device, dtype: torch.dtype, name: str,
                 max_batch: int = 1 << 30, floor_dtype: torch.dtype | None = None):
        self.fn, self.device, self.dtype, self.name, self.max_batch = fn, device, dtype, name, max_batch
        self.floor_dtype = floor_dtype

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.fn(x)


# --------------------------------------------------------------------------------------------
# The translator
# --------------------------------------------------------------------------------------------
def _pad_mode(pad_h: int, pad_w: int, h: int, w: int) -> str:
    # Reflection needs the pad to be smaller than the side; tiny images fall back to replicate.
    return "reflect" if pad_h < h and pad_w < w else "replicate"


class Translator:
    """Callable image translator around one runner; see the module docstring for input kinds."""

    def __init__(self, runner: _Runner, spec: GeneratorSpec, *, engine: str, path: str = "",
                 tile: int | None = None, tile_overlap: int | None = None, batch_size: int = 8,
                 max_tiles: int = MAX_TILES, trust: str = "data artifact (no code)"):
        self.runner, self.spec, self.engine, self.path = runner, spec, engine, path
        if tile is not None and spec.static_hw is not None:
            h, w = spec.static_hw
            raise ValueError(f"tile {tile} (--tile): this model takes {h}x{w} inputs only, so larger images "
                             f"run in {h}x{w} tiles; leave --tile out")
        if tile is not None and tile < spec.min_size:
            raise ValueError(f"tile {tile} (--tile) is smaller than the generator's minimum size {spec.min_size}")
        tile_hw = tuple(spec.static_hw) if spec.static_hw is not None else tile
        if tile_overlap is not None and tile_hw is None:
            raise ValueError(f"tile_overlap {tile_overlap} (--tile-overlap) without tile (--tile): this model runs "
                             "every image whole, so there are no tiles to overlap")
        if tile_overlap is None:  # 32 px, or less than half of a smaller tile
            tile_overlap = default_overlap(tile_hw) if tile_hw is not None else DEFAULT_TILE_OVERLAP
        if tile_hw is not None:
            check_tile_args(tile_hw, tile_overlap, names=("tile (--tile)" if tile else "the model's static size",
                                                          "tile_overlap (--tile-overlap)"))
        self.tile = tile
        self.tile_overlap = int(tile_overlap)
        self.max_tiles = int(max_tiles)
        _check_positive_int("batch_size", batch_size)
        self.batch_size = batch_size
        self.trust = trust  # how the artifact was admitted: data, verified manifest, or trusted explicitly
        self._keep: list[Any] = []  # temporary directories holding derived artifacts

    # -- properties --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def input_nc(self) -> int:
        return self.spec.input_nc

    @property
    def output_nc(self) -> int:
        return self.spec.output_nc

    def __repr__(self) -> str:
        return (f"Translator(engine={self.engine}, device={self.device}, dtype={self.runner.dtype}, "
                f"in={self.input_nc}, out={self.output_nc}, multiple={self.spec.size_multiple}, tile={self.tile}, "
                f"path={self.path!r})")

    # -- memory ------------------------------------------------------------------------------
    def _padded_hw(self, h: int, w: int) -> tuple[int, int]:
        """The size an ``h x w`` input runs at: the size multiple above it, or the static size."""
        if self.spec.static_hw is not None:
            th, tw = self.spec.static_hw
            if h > th or w > tw:
                raise ValueError(f"image {h}x{w} larger than the engine's static size {th}x{tw} (tiling failed?)")
            return th, tw
        m = self.spec.size_multiple
        return max(self.spec.min_size, -(-h // m) * m), max(self.spec.min_size, -(-w // m) * m)

    def _floor_per_pixel(self, precise: bool) -> float | None:
        """Bytes per input pixel that a forward pass holds at least, whatever the engine: its largest
        convolution's input and output at once (no fusion or buffer reuse can share them; a padding
        done before the convolution not counted, so it is exactly linear in the pixels), in the
        dtype the engine computes in (``runner.floor_dtype``); from the recorded architecture on the
        ``meta`` device. ``None`` when the artifact does not record one that builds, or the engine
        holds its own memory (``floor_dtype`` None). ``precise=False``: a bound above it from the
        channels alone (no layer of a generator runs above its input's resolution; tested), which
        spares the first meta forward's ~1.5 s of imports when an image fits anyway."""
        if not hasattr(self, "_meta_net"):
            try:
                with torch.device("meta"):
                    self._meta_net = build_generator(**self.spec.config, init_type=None, backend="torch").eval()
            except Exception:  # noqa: BLE001 - an artifact's recorded config (an ONNX file's is data): no estimate
                self._meta_net = None
        floor_dtype = getattr(self.runner, "floor_dtype", None)
        if floor_dtype is None:
            return None
        net, itemsize = self._meta_net, floor_dtype.itemsize
        convolutions = [c for c in (net.modules() if net is not None else ())
                        if isinstance(c, (nn.Conv2d, nn.ConvTranspose2d))]
        if not convolutions:
            return None
        if not precise:
            return itemsize * max(c.in_channels + c.out_channels for c in convolutions)
        if not hasattr(self, "_per_pixel"):
            m = self.spec.size_multiple
            r = m * -(-max(64, self.spec.min_size) // m)
            largest = [0]

            def count(module, args, out):
                largest[0] = max(largest[0], convolution_input_elements(module, args[0], out) + out.numel())

            hooks = [c.register_forward_hook(count) for c in convolutions]
            try:
                with torch.no_grad():
                    net(torch.empty(1, self.spec.input_nc, r, r, device="meta"))
                self._per_pixel = largest[0] * itemsize / (r * r)
            except Exception:  # noqa: BLE001 - a config that builds but does not run: no estimate
                self._per_pixel = None
            finally:
                for hook in hooks:
                    hook.remove()
        return self._per_pixel

    def check_images(self, sizes) -> None:
        """Images known from their file headers, before anything runs: ``sizes`` yields
        ``(what, h, w)``. Each one's tile count (:meth:`check_tile_count`, a ValueError); the memory
        (:meth:`check_memory`) of the pass run whole that needs the most, and of the image run in
        tiles that needs the most (its own buffers and one tile's floor): the others take no more."""
        per_pixel = self._floor_per_pixel(True) or 0  # computed once (a meta forward), then kept
        largest: dict[bool, tuple] = {}  # the most demanding image run whole, and in tiles
        for what, h, w in sizes:
            self.check_tile_count(h, w, what=what)
            tiled = self.needs_tiles(h, w)
            need = per_pixel * math.prod(self._run_hw(h, w)) + (self.tiled_image_bytes(h, w) if tiled else 0)
            if tiled not in largest or need > largest[tiled][0]:
                largest[tiled] = (need, what, h, w)
        for _, what, h, w in largest.values():
            self.check_memory(h, w, what=what)

    def check_memory(self, h: int, w: int, what: str = "the image") -> None:
        """:class:`InferenceMemoryError` naming ``what`` when one ``h x w`` uint8 image cannot be
        translated in the memory the device has (:func:`~fastcgan.devices.memory_to_check`): its
        forward pass, or in tiles one tile's beside the whole image's own buffers
        (:meth:`tiled_image_bytes`). For callers that know sizes from file headers, before anything
        runs. Unknown sizes or memory: nothing is refused."""
        tiled = self.needs_tiles(h, w)
        self._images_that_fit(1, *self._run_hw(h, w), what, tiled, image_hw=(h, w) if tiled else None)

    def tiled_image_bytes(self, h: int, w: int) -> int:
        """Bytes an ``h x w`` uint8 image holds on the device while it runs in tiles, whatever the
        tile: its fp32 input, the fp32 output the tiles are blended into and the summed blend
        weights (:func:`~fastcgan.deploy.tiling.tiled_apply`); on a CPU also the decoded image
        itself. Tiles bound the generator's memory, not these: a 100-Mpx RGB image holds 2.8 GB
        of them (3.1 GB on a CPU). The conversions before and after hold less (in place)."""
        per_pixel = 4 * (self.input_nc + (self.output_nc or self.input_nc) + 1)
        return (per_pixel + (self.input_nc if self.device.type == "cpu" else 0)) * h * w

    def _run_hw(self, h: int, w: int) -> tuple[int, int]:
        """The padded size one forward pass of an ``h x w`` image runs at: the image's, or in tiles a
        tile's (no larger than the image on a side: a 100-px-wide image runs 100-px-wide tiles)."""
        if not self.needs_tiles(h, w):
            return self._padded_hw(h, w)
        if self.spec.static_hw is not None:
            return tuple(self.spec.static_hw)
        return self._padded_hw(min(self.tile_hw[0], h), min(self.tile_hw[1], w))

    def _images_that_fit(self, n: int, th: int, tw: int, what: str | None, tiled: bool,
                         image_hw: tuple[int, int] | None = None) -> int:
        """The most of ``n`` padded ``th x tw`` inputs (at least one) that one forward pass can take
        in the memory there is; :class:`InferenceMemoryError` naming ``what`` when not even one fits.
        ``image_hw``: the tiles are cut from an image of that size whose own buffers
        (:meth:`tiled_image_bytes`) take their room first. A check under ``SMALL_FORWARD`` by the
        channel bound is not made (the memory query costs ~80 µs on a CPU; if it fails, the
        allocator's error says the same). An engine that keeps its own memory (no floor) is judged
        on the image's buffers alone."""
        held = self.tiled_image_bytes(*image_hw) if image_hw else 0
        bound = self._floor_per_pixel(False)
        if (bound or 0) * n * th * tw + held <= SMALL_FORWARD:
            return n
        room = memory_to_check(self.device)
        if room is None:
            return n
        for precise in (False, True):
            per_pixel = self._floor_per_pixel(precise) or 0
            if per_pixel * n * th * tw + held <= room:
                return n
        if per_pixel and per_pixel * th * tw + held <= room:
            return int((room - held) // (per_pixel * th * tw))
        where = f"{self.device} has" if self.device.type == "cuda" else "this process may allocate"
        needs = []
        if held:
            needs.append(f"the whole {image_hw[1]}x{image_hw[0]} (WxH) image's float input, output and blend "
                         f"weights take {format_bytes(held)}")
        if per_pixel:
            on = f"{'a tile of ' if tiled else ''}{tw}x{th} (WxH)"
            needs.append(f"running the generator on {on} needs at least {format_bytes(per_pixel * th * tw)} (its "
                         "largest convolution's input and output)")
        if held > room:  # no tile makes it smaller
            hint = "a smaller image (--load-size), or a machine with more memory"
        elif self.spec.static_hw is not None:  # its tile is the model's
            hint = "a model exported with a smaller --static size"
        elif tiled or self.tile:
            hint = f"a --tile smaller than {self.tile}"
        else:
            hint = "tiles (--tile 512: the image in overlapping 512x512 pieces, blended)"
        raise InferenceMemoryError(f"{what + ': ' if what else ''}{', and '.join(needs)} and {where} "
                                   f"{format_bytes(room)}; use {hint} ({MEMORY_CHECK_OFF})")

    # -- the tensor path ---------------------------------------------------------------------
    def _run_padded(self, x: Tensor) -> Tensor:
        """Run on any H/W: pad up to the size multiple (or the engine's static size), crop back."""
        _, _, h, w = x.shape
        th, tw = self._padded_hw(h, w)
        ph, pw = th - h, tw - w
        if ph or pw:
            mode = _pad_mode(ph, pw, h, w)
            # Pad bottom/right only, so the crop is [:h, :w]; reflection keeps image statistics
            # (InstanceNorm) close to the unpadded image's.
            xp = F.pad(x.float() if mode == "replicate" and x.dtype != torch.float32 else x, (0, pw, 0, ph), mode=mode)
            x = xp.to(x.dtype)
        outs = []
        step = max(1, min(self.batch_size, self.runner.max_batch, BATCH_PIXELS // (th * tw), x.shape[0]))
        # Fewer at a time when the memory there is cannot take them all (the same outputs: every
        # image is its own); not even one: refused before the allocator fails.
        step = self._images_that_fit(step, th, tw, None, tiled=self.tile is not None and (th, tw) == self.tile_hw)
        for i in range(0, x.shape[0], step):
            try:
                outs.append(self.runner(x[i:i + step]))
            except (MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                n = min(step, x.shape[0] - i)
                hint = "--batch-size 1, or " if n > 1 else ""
                hint += (f"a --tile smaller than {self.tile}" if self.tile else
                         "tiles (--tile 512: the image in overlapping 512x512 pieces, blended)")
                why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise InferenceMemoryError(f"out of memory on {self.device} running the generator on a batch of {n} "
                                           f"at {w}x{h} (WxH) ({why}); use {hint}") from None
        y = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        if y.shape[1] != self.output_nc and self.output_nc:
            raise ArtifactError(self.path, f"engine returned {y.shape[1]} channels, expected {self.output_nc}")
        return y[:, :, :h, :w]

    def translate_tensor(self, x: Tensor) -> Tensor:
        """Float (B, C, H, W) in [-1, 1] on any device -> float (B, C_out, H, W) in [-1, 1] on x's device."""
        if x.dim() != 4:
            raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_nc:
            raise ValueError(f"image has {x.shape[1]} channels but the generator expects {self.input_nc} ({self.path})")
        src_device, src_dtype = x.device, x.dtype
        xr = x.to(device=self.device, dtype=self.runner.dtype)
        _, _, h, w = xr.shape
        tile = self.tile
        if self.spec.static_hw is not None:
            tile_hw = self.spec.static_hw
            need_tiles = h > tile_hw[0] or w > tile_hw[1]
        else:
            tile_hw = (tile, tile) if tile else None
            need_tiles = tile is not None and (h > tile or w > tile)
        if need_tiles:
            y = tiled_apply(self._run_padded, xr, tile_hw, self.tile_overlap, batch_size=self.batch_size,
                            max_tiles=self.max_tiles)
        else:
            y = self._run_padded(xr)
        return y.to(device=src_device, dtype=src_dtype if src_dtype.is_floating_point else torch.float32)

    def _uint8_to_model(self, x: Tensor) -> Tensor:
        # Move the compact uint8 to the device first, convert there; in place: one float copy
        # (tiled_image_bytes counts no more).
        return x.to(self.device).float().div_(127.5).sub_(1.0)

    @staticmethod
    def _model_to_uint8(y: Tensor) -> Tensor:
        return y.float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)  # one float copy of y

    # -- one call for every input kind ---------------------------------------------------------
    def __call__(self, images):
        """Translate one image/batch, returning the same kind; a list goes to :meth:`translate_batch`."""
        if isinstance(images, (list, tuple)):
            return self.translate_batch(list(images))
        x, restore = self._to_tensor(images)
        if x.dtype == torch.uint8:
            y = self._model_to_uint8(self.translate_tensor(self._uint8_to_model(x))).cpu()
        else:
            y = self.translate_tensor(x)
        return restore(y)

    def needs_tiles(self, h: int, w: int) -> bool:
        """Whether an ``h x w`` image runs in tiles."""
        if self.spec.static_hw is not None:
            return h > self.spec.static_hw[0] or w > self.spec.static_hw[1]
        return self.tile is not None and (h > self.tile or w > self.tile)

    def check_tile_count(self, h: int, w: int, what: str = "the image",
                         names: tuple[str, str] | None = None) -> None:
        """ValueError naming ``what`` when an ``h x w`` image would run in more than ``max_tiles``
        tiles: for callers that know sizes from file headers, before anything runs."""
        if not self.needs_tiles(h, w):
            return
        static = self.spec.static_hw is not None
        if names is None:
            names = ("--static" if static else "--tile", "--tile-overlap")
        try:
            check_tiling(h, w, self.tile_hw, self.tile_overlap, max_tiles=self.max_tiles, names=names, what=what)
        except ValueError as e:
            if not static:
                raise
            raise ValueError(f"{e} (--static: the model's fixed input size, set by fastcgan-export)") from None

    @property
    def tile_hw(self) -> tuple[int, int] | None:
        """The tile size used for large images (the engine's static size, else ``tile``)."""
        if self.spec.static_hw is not None:
            return tuple(self.spec.static_hw)  # type: ignore[return-value]
        return (self.tile, self.tile) if self.tile else None

    def translate_batch(self, images: Sequence, batch_size: int | None = None) -> list:
        """Translate a list of images (any kinds and sizes); same-size images run together.
        Images that run in tiles go one at a time (their tiles are batched), so memory holds one
        large image, not ``batch_size`` of them.

        Returns a list in input order, each item of its input's kind."""
        if batch_size is not None:
            _check_positive_int("batch_size", batch_size)
        bs = self.batch_size if batch_size is None else batch_size
        items = [self._to_tensor(im) for im in images]
        groups: dict[tuple, list[int]] = {}
        for i, (x, _) in enumerate(items):
            key = (tuple(x.shape), x.dtype, x.device)
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(items)
        old = self.batch_size
        self.batch_size = bs
        try:
            for (shape, dtype, _), idx in groups.items():
                step = 1 if self.needs_tiles(shape[-2], shape[-1]) else bs
                for s in range(0, len(idx), step):
                    part = idx[s:s + step]
                    x = items[part[0]][0] if len(part) == 1 else torch.cat([items[i][0] for i in part], 0)
                    if dtype == torch.uint8:
                        y = self._model_to_uint8(self.translate_tensor(self._uint8_to_model(x))).cpu()
                    else:
                        y = self.translate_tensor(x)
                    for j, i in enumerate(part):
                        out[i] = items[i][1](y[j:j + 1])
        finally:
            self.batch_size = old
        return out

    def _to_tensor(self, im) -> tuple[Tensor, Callable[[Tensor], Any]]:
        """(B, C, H, W) tensor (uint8 or float) and a function turning the result back into im's kind."""
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            Image = None
        c_in, c_out = self.input_nc, self.output_nc
        if Image is not None and isinstance(im, Image.Image):
            if c_in not in (1, 3):
                raise ValueError(f"PIL images need a 1- or 3-channel generator; this one takes {c_in}")
            from fastcgan.data.images import decode_oriented, pil_to_tensor, to_channels

            _check_hw(im.size[1], im.size[0])
            im = decode_oriented(im)  # as files are read: a photo opened with Image.open is translated as displayed
            x = pil_to_tensor(to_channels(im, c_in))[None]  # as fastcgan-translate reads files (alpha on white)

            def restore_pil(y):
                arr = y[0].permute(1, 2, 0).numpy()
                return Image.fromarray(arr[:, :, 0] if c_out == 1 else arr, "L" if c_out == 1 else "RGB")

            return x, restore_pil
        if isinstance(im, np.ndarray):
            if im.dtype != np.uint8:
                raise TypeError(f"numpy images must be uint8 HxWxC (or HxW), got dtype {im.dtype}")
            if im.ndim not in (2, 3, 4):
                raise ValueError(f"numpy images must be HxW, HxWxC or BxHxWxC, got shape {im.shape}")
            a = im[:, :, None] if im.ndim == 2 else im
            a4 = a[None] if a.ndim == 3 else a
            _check_hw(a4.shape[1], a4.shape[2], a4.shape[0])
            if a4.shape[-1] != c_in:
                raise ValueError(f"image has {a4.shape[-1]} channels (shape {im.shape}) but the generator "
                                 f"expects {c_in} ({self.path})")
            x = torch.from_numpy(np.ascontiguousarray(a4)).permute(0, 3, 1, 2)
            ndim = im.ndim

            def restore_np(y):
                arr = np.ascontiguousarray(y.permute(0, 2, 3, 1).numpy())
                if ndim == 4:
                    return arr
                arr = arr[0]
                return arr[:, :, 0] if (ndim == 2 and c_out == 1) else arr

            return x, restore_np
        if isinstance(im, Tensor):
            if im.dim() not in (3, 4):
                raise ValueError(f"image tensors must be (C, H, W) or (B, C, H, W), got shape {tuple(im.shape)}")
            x = im[None] if im.dim() == 3 else im
            _check_hw(x.shape[2], x.shape[3], x.shape[0])
            if x.shape[1] != c_in:
                raise ValueError(f"image has {x.shape[1]} channels (shape {tuple(im.shape)}) but the generator "
                                 f"expects {c_in} ({self.path})")
            if x.dtype != torch.uint8 and not x.is_floating_point():
                raise TypeError(f"image tensors must be uint8 or floating point in [-1, 1], got {x.dtype}")
            if x.is_floating_point():
                # Checked once at this boundary (one reduction, one sync): a NaN made the whole output
                # one flat grey, and [0, 1] or [0, 255] floats ran as if they were [-1, 1].
                lo, hi = (float(v) for v in torch.aminmax(x))
                if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.001 or hi > 1.001:
                    raise ValueError(f"float image tensors must hold finite values in [-1, 1], got {lo:g} to {hi:g} "
                                     "(a [0, 1] image: x * 2 - 1; 8-bit images: pass a uint8 tensor)")
            three = im.dim() == 3
            dev, dt = im.device, im.dtype

            def restore_t(y):
                y = y.to(device=dev, dtype=dt)
                return y[0] if three else y

            return x, restore_t
        raise TypeError(f"cannot translate a {type(im).__name__}: pass a PIL image, a uint8 numpy array, "
                        "or a uint8/float torch tensor")


def _check_positive_int(name: str, v) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def _check_hw(h: int, w: int, b: int = 1) -> None:
    if h < 1 or w < 1 or b < 1:
        raise ValueError(f"cannot translate an empty image (batch {b}, {h}x{w})")


# --------------------------------------------------------------------------------------------
# load()
# --------------------------------------------------------------------------------------------
def load(
    path: str,
    device: str = "auto",
    engine: str | None = None,
    fp16: bool = False,
    tile: int | None = None,
    tile_overlap: int | None = None,
    *,
    direction: str | None = None,
    batch_size: int = 8,
    bf16: bool = False,
    compile_mode: str | None = None,
    channels_last: bool = False,
    threads: int | None = None,
    backend: str = "auto",
    trust_artifact: bool = False,
    max_tiles: int = MAX_TILES,
) -> Translator:
    """A :class:`Translator` for any artifact: run directory, ``.safetensors``, ``.onnx``,
    TensorRT ``.engine`` or AOTInductor ``.pt2``.

    ``.pt2`` and ``.engine`` files hold native code: they are loaded only when their manifest
    (``<file>.manifest.json``, written by ``fastcgan-export``) verifies, or with
    ``trust_artifact=True``; otherwise :class:`~fastcgan.deploy.manifest.UntrustedArtifactError`
    (an :class:`ArtifactError`) is raised before anything from the file runs.
    ``translator.trust`` says how the artifact was admitted.

    ``engine`` (default: the artifact's own) picks how a torch-loadable artifact runs:
    ``torch`` | ``compiled`` | ``onnx`` | ``trt`` | ``aoti`` (the last three export on the fly
    into a temporary directory). ``fp16``/``bf16`` run in half precision where the engine can.
    ``direction`` picks the generator of a run directory (default AtoB); a one-generator artifact's
    ``spec.direction`` is the one it records, or ``direction`` when given (how evaluation scores it).

    Every keyword is checked before anything loads, and one that would do nothing with this
    artifact and engine is a ``ValueError`` (``compile_mode`` needs ``engine='compiled'``;
    ``channels_last`` and ``backend`` the torch engines; ``threads`` the onnx engine; ``fp16``/``bf16``
    an engine that can run them), never silently ignored. ``trust_artifact`` is a permission, not
    an option: data artifacts need none, and it is accepted with them so one call loads any kind."""
    path = os.fspath(path)
    kind = artifact_kind(path)
    engine = engine or DEFAULT_ENGINE[kind]
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine not in _ALLOWED[kind]:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ArtifactError(path, f"{article} {kind} artifact cannot run with engine={engine!r} "
                            f"(possible: {', '.join(_ALLOWED[kind])})")
    if fp16 and bf16:
        raise ValueError("choose one of fp16 and bf16")
    if tile is not None:
        check_tile_args(tile, default_overlap(tile) if tile_overlap is None else tile_overlap)
    elif tile_overlap is not None and not (isinstance(tile_overlap, int) and tile_overlap >= 0):
        raise ValueError(f"tile_overlap must be an int >= 0, got {tile_overlap!r}")
    _check_positive_int("batch_size", batch_size)
    if tile is None and tile_overlap is not None and kind in ("run", "safetensors", "checkpoint"):
        # What Translator says of a model without a static size, before an export on the fly.
        raise ValueError(f"tile_overlap {tile_overlap} (--tile-overlap) without tile (--tile): this model runs "
                         "every image whole, so there are no tiles to overlap")
    _check_load_options(kind, engine, direction=direction, bf16=bf16, compile_mode=compile_mode,
                        channels_last=channels_last, threads=threads, backend=backend, max_tiles=max_tiles)
    trust = "data artifact (no code)"
    if kind in ("aoti", "engine"):
        from fastcgan.deploy.manifest import check_artifact

        # First gate, before any device or library set-up; the loader checks the bytes it loads again.
        trust = check_artifact(path, kind, trust_artifact)
    if engine == "trt":
        from fastcgan.deploy.tensorrt import INSTALL_HINT, TensorRTUnavailable

        if not torch.cuda.is_available():
            raise TensorRTUnavailable(f"{path}: engine='trt' needs a CUDA GPU (none visible). {INSTALL_HINT}")
        if device == "auto":
            device = "cuda"
    dev = resolve_device(device)
    if backend != "auto":  # an explicit backend must run on this device (else it fails at the first image)
        from fastcgan.ops._backends import status

        st = status(backend)
        if not (st.available and dev.type in st.devices):
            raise ValueError(f"backend {backend!r} cannot run on {dev}: {st.reason}")
    dtype = torch.float16 if fp16 else (torch.bfloat16 if bf16 else torch.float32)
    keep: list = []

    try:
        if kind in ("run", "safetensors", "checkpoint"):
            model, spec = load_torch_generator(path, direction=direction, backend=backend)
            if engine in ("torch", "compiled"):
                runner: _Runner = TorchRunner(model, dev, dtype, compiled=engine == "compiled",
                                              compile_mode=compile_mode, channels_last=channels_last)
            else:
                tmp = tempfile.TemporaryDirectory(prefix="fastcgan-deploy-")
                keep.append(tmp)
                if engine == "aoti":
                    from fastcgan.deploy.aoti import compile_isolated, export_aoti

                    pt2 = os.path.join(tmp.name, "g.pt2")
                    if dev.type == "cuda":
                        # torch 2.11 crashed loading a CUDA package in the process that compiled it.
                        compile_isolated(path, pt2, dev, direction=spec.direction if kind != "safetensors" else None,
                                         dtype=dtype)
                    else:
                        export_aoti(model, pt2, spec, device=dev, dtype=dtype)
                    runner, spec = _aoti_runner(pt2, dev)
                else:
                    from fastcgan.deploy.onnx_export import export_onnx

                    onnx_path = os.path.join(tmp.name, "g.onnx")
                    spec = export_onnx(model, onnx_path, spec, fp16=fp16 and engine == "onnx")
                    runner, spec = _onnx_like_runner(onnx_path, engine, dev, spec, fp16, bf16, threads, keep)
        elif kind == "onnx":
            from fastcgan.deploy.onnx_export import read_spec

            spec = read_spec(path)
            runner, spec = _onnx_like_runner(path, engine, dev, spec, fp16, bf16, threads, keep)
        elif kind == "engine":
            from fastcgan.deploy.tensorrt import TrtRunner

            runner = TrtRunner(path, dev, trust_artifact=trust_artifact)  # type: ignore[assignment]
            spec = runner.spec  # type: ignore[attr-defined]
            trust = runner.trust  # type: ignore[attr-defined]
        else:  # aoti
            runner, spec = _aoti_runner(path, dev, trust_artifact=trust_artifact)
            trust = runner.trust  # type: ignore[attr-defined]
    except SpecError as e:  # crafted or damaged metadata: named with the file, never a crash later
        raise ArtifactError(path, str(e)) from None
    if kind in ("onnx", "engine", "aoti"):  # one generator, its direction recorded at export (or unknown)
        from fastcgan.deploy._common import artifact_direction

        spec = spec.replace(direction=artifact_direction(spec.direction, direction))
        if kind != "onnx" and dtype != torch.float32 and spec.dtype != str(dtype).removeprefix("torch."):
            raise ValueError(f"{path}: {'fp16' if fp16 else 'bf16'}=True, but this {kind} artifact was built for "
                             f"{spec.dtype} and runs only so (export it again with --{'fp16' if fp16 else 'bf16'})")
    tr = Translator(runner, spec, engine=engine, path=path, tile=tile, tile_overlap=tile_overlap,
                    batch_size=batch_size, max_tiles=max_tiles, trust=trust)
    tr._keep = keep
    return tr


def _check_load_options(kind: str, engine: str, *, direction, bf16: bool, compile_mode, channels_last: bool,
                        threads, backend: str, max_tiles) -> None:
    """ValueError for a :func:`load` keyword that is malformed or would do nothing here."""
    from fastcgan.deploy._common import DIRECTIONS
    from fastcgan.ops._backends import BACKENDS

    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    torch_engine = engine in ("torch", "compiled")
    if compile_mode is not None and engine != "compiled":
        raise ValueError(f"compile_mode={compile_mode!r} applies to engine='compiled' only (engine is {engine!r})")
    if channels_last and not torch_engine:
        raise ValueError(f"channels_last=True applies to the torch and compiled engines only (engine is {engine!r}; "
                         "exported artifacts keep the memory layout they were built with)")
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
        if not torch_engine:
            raise ValueError(f"backend={backend!r} applies to the torch and compiled engines only (engine is "
                             f"{engine!r}: exports trace the reference ops)")
    if threads is not None:
        cores = os.cpu_count() or 1
        if not (isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= cores):
            raise ValueError(f"threads must be an int from 1 to this machine's {cores} cores, got {threads!r}")
        if engine != "onnx":
            raise ValueError(f"threads={threads} applies to engine='onnx' only (onnxruntime's CPU threads; "
                             f"engine is {engine!r})")
    if bf16 and engine == "onnx":
        raise ValueError("bf16=True: the onnx engine runs fp32 or an fp16-exported model; use fp16 (an ONNX file "
                         "exported with --fp16) or another engine")
    _check_positive_int("max_tiles", max_tiles)


def from_model(
    model: nn.Module,
    device: str = "auto",
    *,
    compiled: bool = False,
    fp16: bool = False,
    bf16: bool = False,
    tile: int | None = None,
    tile_overlap: int | None = None,
    batch_size: int = 8,
    spec: GeneratorSpec | None = None,
    compile_mode: str | None = None,
) -> Translator:
    """A :class:`Translator` around an in-memory generator (engine ``torch`` or ``compiled``)."""
    from fastcgan.deploy._common import _model_config, spec_for_model

    spec = spec or spec_for_model(model, config=_model_config(model))
    dev = resolve_device(device)
    dtype = torch.float16 if fp16 else (torch.bfloat16 if bf16 else torch.float32)
    runner = TorchRunner(model, dev, dtype, compiled=compiled, compile_mode=compile_mode)
    return Translator(runner, spec, engine="compiled" if compiled else "torch", path=f"<{type(model).__name__}>",
                      tile=tile, tile_overlap=tile_overlap, batch_size=batch_size)


def _aoti_runner(path: str, dev: torch.device, *, trust_artifact: bool = False):
    from fastcgan.deploy.aoti import load_aoti

    fn, spec = load_aoti(path, dev, trust_artifact=trust_artifact)
    dtype = getattr(torch, spec.dtype, torch.float32)
    runner = CallableRunner(fn, fn.device, dtype, "aoti", floor_dtype=dtype)  # AOTInductor allocates through torch
    runner.trust = fn.trust
    runner._keep = fn._keep
    return runner, spec


def _onnx_like_runner(path, engine, dev, spec, fp16, bf16, threads, keep):
    if engine == "onnx":
        r = OrtRunner(path, dev, threads=threads)
        if fp16 and r.dtype != torch.float16:
            raise ValueError(f"{path} is an fp32 model: fp16=True would do nothing on the onnx engine "
                             "(export with --fp16 for a half-precision ONNX model)")
        return r, spec
    # engine == "trt" on an ONNX file: native TensorRT when importable, else onnxruntime's
    # TensorRT execution provider, else a clear error.
    from fastcgan.deploy.tensorrt import TensorRTUnavailable, TrtRunner, build_engine, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        if bf16:
            raise ValueError(f"bf16=True: onnxruntime's TensorRT provider (used without the tensorrt package: {e}) "
                             "builds fp32 or fp16 engines only") from None
        try:
            return OrtRunner(path, dev if dev.type == "cuda" else torch.device("cuda"), tensorrt=True, fp16=fp16), spec
        except RuntimeError as e2:
            raise TensorRTUnavailable(f"{e}\nonnxruntime fallback: {e2}") from e
    tmp = tempfile.TemporaryDirectory(prefix="fastcgan-trt-")
    keep.append(tmp)
    eng = build_engine(path, os.path.join(tmp.name, "g.engine"), spec, fp16=fp16, bf16=bf16)
    r = TrtRunner(eng, dev)
    return r, r.spec
