"""AOTInductor package on CPU: export with dynamic batch/H/W, load without fastcgan, parity."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from fastcgan.deploy import cli, load
from fastcgan.deploy.manifest import UntrustedArtifactError

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
    assert tr.trust.startswith("verified")  # the manifest fastcgan-export wrote beside the package
    x = torch.rand(2, 3, 37, 50) * 2 - 1  # not a multiple of 4: padded and cropped by the Translator
    ref = load(str(st), device="cpu")(x)
    assert (tr(x) - ref).abs().max().item() <= 1e-4

    # The manifest: sha256 of the package, versions, arch, shapes, dtype.
    import fastcgan

    manifest = json.loads((tmp_path / "g.pt2.manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(pt2.read_bytes()).hexdigest()
    assert manifest["kind"] == "aoti" and manifest["holds_code"] is True
    assert manifest["fastcgan_version"] == fastcgan.__version__ and manifest["arch"] == "resnet_6blocks"
    assert manifest["dtype"] == "float32" and manifest["input_nc"] == 3 and manifest["shapes"]
    # A package changed after export (here: one byte appended) is refused; trusted explicitly, it runs.
    with open(pt2, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UntrustedArtifactError, match="g.pt2.*differs from the manifest"):
        load(str(pt2), device="cpu")
    with pytest.warns(UserWarning, match="--trust-artifact"):
        trusted = load(str(pt2), device="cpu", trust_artifact=True)
    assert trusted.trust.startswith("trusted explicitly")
    assert (trusted(x) - ref).abs().max().item() <= 1e-4


def test_isolated_run_failure_names_how_the_child_ended(tmp_path):
    """A package the fresh process cannot run is reported with the child's exit status or signal
    and its output (the first H200 run got an empty message from a child that died silently)."""
    from fastcgan.deploy.aoti import run_package_isolated

    bad = tmp_path / "g.pt2"
    bad.write_bytes(b"not a zip archive")
    failed = r"(?s)g\.pt2: running the package in a fresh process failed \(exit status \d+\):\n.*Error"
    with pytest.raises(RuntimeError, match=failed), pytest.warns(UserWarning, match="without a verified manifest"):
        run_package_isolated(str(bad), [torch.zeros(1, 3, 8, 8)], torch.device("cpu"), trust_artifact=True)


def test_aoti_that_fails_verification_is_not_installed(tmp_path, monkeypatch, capsys):
    """A package over tolerance is neither installed nor given a manifest (translate would trust
    one), and what was at the destination stays as it was."""
    from fastcgan.deploy import onnx_export

    torch.manual_seed(0)
    st = tmp_path / "g.safetensors"
    save_generator(build_generator("resnet_6blocks", ngf=4).eval(), st)
    monkeypatch.setattr(onnx_export, "verify_against_torch", lambda run, model, spec, shapes, **k:
                        [((s[0], 3, s[1], s[2]), 1.0) for s in shapes])
    pt2 = tmp_path / "failed.pt2"
    pt2.write_bytes(b"the previous package")
    assert cli.main([str(st), "--aoti", str(pt2), "--device", "cpu", "--overwrite",
                     "--verify-sizes", "1x32x32"]) == cli.EXIT_FAIL
    assert "OVER TOLERANCE" in capsys.readouterr().out
    assert pt2.read_bytes() == b"the previous package" and not (tmp_path / "failed.pt2.manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed.pt2", "g.safetensors"]
    # --tol is the tolerance the package is held to: an error of 1.0 within --tol 2 installs it.
    assert cli.main([str(st), "--aoti", str(pt2), "--device", "cpu", "--overwrite", "--tol", "2",
                     "--verify-sizes", "1x32x32"]) == cli.EXIT_OK
    assert "(tol 2) ok" in capsys.readouterr().out
    assert pt2.read_bytes() != b"the previous package" and (tmp_path / "failed.pt2.manifest.json").exists()
