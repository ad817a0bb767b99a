"""AOTInductor package on CPU: export with dynamic batch/H/W, load without fastcgan, parity."""

import subprocess
import sys

import pytest
import torch
from fastcgan.deploy import cli, load

from fastcgan.models import build_generator, save_generator

pytestmark = pytest.mark.skipif(not hasattr(torch._inductor, "aoti_compile_and_package"),
                                reason="torch without AOTInductor packaging")


def test_aoti_package_cpu(tmp_path):
    """One small ResNet generator compiled once (C++ build, ~20-40 s on 2 cores)."""
    torch.manual_seed(0)
    m = build_generator("resnet_6blocks", ngf=4).eval()
    st = tmp_path / "g.safetensors"
    save_generator(m, st)
    pt2 = tmp_path / "g.pt2"
    assert cli.main([str(st), "--aoti", str(pt2), "--device", "cpu", "--verify-sizes", "1x64x64,3x32x48"]) == 0
    # Runs with torch alone (no fastcgan import) on sizes it was not traced at.
    code = (
        "import torch, json, sys\n"
        f"m = torch._inductor.aoti_load_package({str(pt2)!r})\n"
        "x = torch.rand(2, 3, 40, 56) * 2 - 1\n"
        "y = m(x)\n"
        "y = y[0] if isinstance(y, (list, tuple)) else y\n"
        "assert 'fastcgan' not in sys.modules\n"
        "print(tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(2, 3, 40, 56)")
    tr = load(str(pt2), device="cpu")
    assert tr.engine == "aoti" and tr.spec.arch == "resnet_6blocks"
    x = torch.rand(2, 3, 37, 50) * 2 - 1  # not a multiple of 4: padded and cropped by the Translator
    ref = load(str(st), device="cpu")(x)
    assert (tr(x) - ref).abs().max().item() <= 1e-4
