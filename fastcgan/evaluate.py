"""``fastcgan-eval``: how good is a trained pair of generators on a test split.

    fastcgan-eval --checkpoint runs/h2z --dataroot datasets/horse2zebra [--phase test] [--json out.json]

Metrics, per direction (``AtoB`` = ``G_AB`` on ``testA``, ``BtoA`` = ``G_BA`` on ``testB``):

* ``cycle_l1`` / ``cycle_psnr``: ``G_BA(G_AB(a))`` against ``a`` (needs both generators);
* on data with ground truth (the built-in synthetic set, detected by its ``testA_truth_B/``
  folder): ``truth_l1`` / ``truth_psnr`` of ``G_AB(a)`` against ``testA_truth_B/<same name>``, and
  ``identity_truth_l1``, the L1 of the untranslated input against that truth (the score of doing
  nothing, for reference);
* ``fid`` and ``kid_mean``/``kid_std`` of the translated images against the real images of the
  target domain, through torchmetrics, only when ``torch-fidelity`` and its Inception weights file
  are present locally. Nothing is ever downloaded; without them the metric is skipped with a
  message saying how to provide them.

L1 is the mean absolute error on [0, 1] intensities; PSNR is ``10 log10(1 / MSE)`` on [0, 1],
averaged over images. Images are evaluated at their own size (optionally resized with
``--load-size``), padded to the generator's size multiple and cropped back.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastcgan.data import make_dataset
from fastcgan.data.images import BadImageError, load_image

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "FASTCGAN_INCEPTION_WEIGHTS"


# --------------------------------------------------------------------------------------------
# FID / KID availability (never downloads)
# --------------------------------------------------------------------------------------------
def _fidelity_installed() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def inception_weights(path: Optional[str] = None) -> tuple[Optional[str], str]:
    """``(weights path, "")`` when FID/KID can run offline, else ``(None, how to enable it)``.

    Looked up in order: ``path``, ``$FASTCGAN_INCEPTION_WEIGHTS``, ``<torch hub dir>/checkpoints/
    pt_inception-2015-12-05-6726825d.pth`` (where torch-fidelity itself caches it)."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)
    how = (
        f"FID/KID skipped: they need the torch-fidelity package (pip install torch-fidelity) and its "
        f"Inception weights file {INCEPTION_WEIGHTS_FILE} on disk; fastcgan never downloads at run time. "
        f"Download it once on a machine with network access (torch-fidelity's GitHub release "
        f"'v0.2.0' assets) and pass --inception-weights PATH, set ${INCEPTION_ENV}=PATH, or copy it to {hub}"
    )
    if not _fidelity_installed():
        return None, how + " (torch-fidelity is not installed)"
    for cand, where in ((path, "--inception-weights"), (os.environ.get(INCEPTION_ENV), f"${INCEPTION_ENV}")):
        if cand:
            if os.path.isfile(cand):
                return cand, ""
            return None, how + f" ({where} {cand}: no such file)"
    if os.path.isfile(hub):
        return hub, ""
    return None, how + f" (not found at {hub})"


# --------------------------------------------------------------------------------------------
# Translation of a folder
# --------------------------------------------------------------------------------------------
def _size_multiple(net: nn.Module) -> int:
    from fastcgan.models import generator_size_multiple

    cfg = getattr(getattr(net, "_orig_mod", net), "config", None)
    return generator_size_multiple(cfg["arch"]) if cfg else 4


def _pad_to(x: torch.Tensor, m: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


@torch.no_grad()
def translate(
    net: nn.Module,
    images: list[torch.Tensor],
    device,
    batch_size: int = 8,
    amp_dtype: Optional[torch.dtype] = None,
) -> list[torch.Tensor]:
    """uint8 (C, H, W) images -> float [-1, 1] outputs of the same size (on the CPU). Eager
    ``forward`` in eval mode; a training network's mode is restored afterwards."""
    was_training = net.training
    net.eval()
    m = _size_multiple(net)
    out: list[Optional[torch.Tensor]] = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    try:
        for idx in by_size.values():
            for k in range(0, len(idx), batch_size):
                chunk = idx[k : k + batch_size]
                x = torch.stack([images[i] for i in chunk]).to(device).float().div_(127.5).sub_(1.0)
                x, h, w = _pad_to(x, m)
                ctx = torch.autocast(torch.device(device).type, dtype=amp_dtype) if amp_dtype else _null()
                with ctx:
                    y = net.forward(x).float()[..., :h, :w].cpu()
                for j, i in enumerate(chunk):
                    out[i] = y[j]
    finally:
        net.train(was_training)
    return out  # type: ignore[return-value]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def _l1_psnr(pred: list[torch.Tensor], target: list[torch.Tensor]) -> tuple[float, float]:
    l1s, psnrs = [], []
    for p, t in zip(pred, target):
        p01, t01 = _to01(p), _to01(t)
        l1s.append((p01 - t01).abs().mean().item())
        mse = (p01 - t01).pow(2).mean().item()
        psnrs.append(10 * math.log10(1.0 / max(mse, 1e-12)))
    return sum(l1s) / len(l1s), sum(psnrs) / len(psnrs)


def _load_folder(folder: str, channels: int, size: Optional[int], max_images: Optional[int]):
    paths = make_dataset(folder)
    if max_images is not None:
        paths = paths[:max_images]
    imgs, names, skipped = [], [], []
    for p in paths:
        try:
            t = load_image(p, channels)
        except BadImageError:
            skipped.append(p)
            continue
        if size is not None and tuple(t.shape[-2:]) != (size, size):
            t = F.interpolate(t[None].float(), size=(size, size), mode="bicubic", align_corners=False)
            t = t.round().clamp(0, 255).to(torch.uint8)[0]
        imgs.append(t)
        names.append(os.path.relpath(p, folder))
    return imgs, names, skipped


def _fid_kid(fake: list[torch.Tensor], real: list[torch.Tensor], weights: str, device) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    def u8(x):  # [-1, 1] float or uint8 -> uint8 RGB
        if x.dtype != torch.uint8:
            x = (_to01(x) * 255).round().to(torch.uint8)
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x

    n = min(len(fake), len(real))
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights).to(device)
    kid = KernelInceptionDistance(subset_size=max(2, min(50, n)), feature_extractor_weights_path=weights).to(
        device
    )
    for metric in (fid, kid):
        for x in real:
            metric.update(u8(x)[None].to(device), real=True)
        for x in fake:
            metric.update(u8(x)[None].to(device), real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def evaluate_generators(
    G_AB: Optional[nn.Module],
    G_BA: Optional[nn.Module],
    dataroot: str,
    phase: str = "test",
    device="cpu",
    batch_size: int = 8,
    max_images: Optional[int] = None,
    load_size: Optional[int] = None,
    fid: bool = False,
    inception_weights_path: Optional[str] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> dict:
    """Metrics of the given generators (either may be None) on ``dataroot/{phase}A|B``."""
    device = torch.device(device)
    results: dict = {}
    weights, fid_msg = (None, "")
    if fid:
        weights, fid_msg = inception_weights(inception_weights_path)
        if weights is None:
            results["fid_status"] = fid_msg
    loaded: dict[str, tuple] = {}

    def domain(d: str, nc: int):
        if d not in loaded:
            folder = os.path.join(dataroot, phase + d)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"--dataroot {dataroot}: no {phase}{d}/ folder")
            loaded[d] = _load_folder(folder, nc, load_size, max_images)
            if not loaded[d][0]:
                raise FileNotFoundError(f"{folder}: no readable images")
        return loaded[d]

    for name, src, dst, g, back in (("AtoB", "A", "B", G_AB, G_BA), ("BtoA", "B", "A", G_BA, G_AB)):
        if g is None:
            continue
        cfg = getattr(g, "config", {}) or {}
        imgs, names, skipped = domain(src, cfg.get("input_nc", 3))
        real = [x.float().div(127.5).sub(1.0) for x in imgs]
        fake = translate(g, imgs, device, batch_size, amp_dtype)
        r: dict = {"n": len(imgs), "skipped": len(skipped)}
        if back is not None:
            fake_u8 = [((f + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for f in fake]
            rec = translate(back, fake_u8, device, batch_size, amp_dtype)
            r["cycle_l1"], r["cycle_psnr"] = _l1_psnr(rec, real)
        truth_dir = os.path.join(dataroot, f"{phase}{src}_truth_{dst}")
        if os.path.isdir(truth_dir):
            truth = []
            for nm in names:
                t = load_image(os.path.join(truth_dir, nm), cfg.get("output_nc", 3))
                if load_size is not None and tuple(t.shape[-2:]) != (load_size, load_size):
                    t = (
                        F.interpolate(
                            t[None].float(), size=(load_size, load_size), mode="bicubic", align_corners=False
                        )
                        .round()
                        .clamp(0, 255)
                        .to(torch.uint8)[0]
                    )
                truth.append(t.float().div(127.5).sub(1.0))
            r["truth_l1"], r["truth_psnr"] = _l1_psnr(fake, truth)
            if all(x.shape == t.shape for x, t in zip(real, truth)):
                r["identity_truth_l1"], r["identity_truth_psnr"] = _l1_psnr(real, truth)
        if weights is not None:
            target_imgs = domain(dst, cfg.get("output_nc", 3))[0]
            r.update(_fid_kid(fake, target_imgs, weights, device))
        results[name] = r
    return results


def evaluate(
    checkpoint: str,
    dataroot: str,
    phase: str = "test",
    device: str = "auto",
    direction: Optional[str] = None,
    **kw,
) -> dict:
    """Load generators from a run directory (both) or one ``.safetensors`` file (``direction``,
    default AtoB) and evaluate them."""
    from fastcgan.models import load_generator

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if os.path.isdir(checkpoint):
        G_AB = load_generator(checkpoint, "AtoB", map_location=dev)
        G_BA = load_generator(checkpoint, "BtoA", map_location=dev)
    else:
        g = load_generator(checkpoint, map_location=dev)
        G_AB, G_BA = (g, None) if direction in (None, "AtoB") else (None, g)
    return evaluate_generators(G_AB, G_BA, dataroot, phase, dev, **kw)


def format_results(res: dict) -> str:
    lines = []
    for name in ("AtoB", "BtoA"):
        if name in res:
            r = res[name]
            parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()]
            lines.append(f"{name}: " + "  ".join(parts))
    if "fid_status" in res:
        lines.append(res["fid_status"])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcgan-eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="run directory (both generators) or a generator .safetensors"
    )
    p.add_argument("--dataroot", required=True, help="dataset folder with {phase}A/ and {phase}B/")
    p.add_argument("--phase", default="test")
    p.add_argument(
        "--direction",
        choices=("AtoB", "BtoA"),
        default=None,
        help="which direction a single .safetensors file translates (default AtoB)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--load-size", type=int, default=None, help="resize images to this square size first")
    p.add_argument(
        "--no-fid", action="store_true", help="skip FID/KID even when the Inception weights are present"
    )
    p.add_argument("--inception-weights", default=None, help=f"path to {INCEPTION_WEIGHTS_FILE}")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    for flag, v in (
        ("--batch-size", a.batch_size),
        ("--max-images", a.max_images),
        ("--load-size", a.load_size),
    ):
        if v is not None and v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    if not os.path.exists(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint}: no such run directory or file")
    if not os.path.isdir(a.dataroot):
        p.error(f"--dataroot {a.dataroot}: no such directory")
    try:
        res = evaluate(
            a.checkpoint,
            a.dataroot,
            a.phase,
            a.device,
            a.direction,
            batch_size=a.batch_size,
            max_images=a.max_images,
            load_size=a.load_size,
            fid=not a.no_fid,
            inception_weights_path=a.inception_weights,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"fastcgan-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_results(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
