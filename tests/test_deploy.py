"""ONNX export of every generator arch, onnxruntime parity, the Translator's pad/crop and input
kinds, official checkpoints, bad artifacts, and the TensorRT path (GPU) or its message (CPU)."""

import json
import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fastcgan.deploy import ArtifactError, cli, load, onnx_export
from fastcgan.deploy._common import _model_config, spec_for_model
from fastcgan.deploy.runtime import from_model

from fastcgan.models import build_generator, save_generator, save_official_generator

FP32_TOL = 1e-4
STANDARD_OPS = {"Conv", "ConvTranspose", "InstanceNormalization", "BatchNormalization", "Relu", "LeakyRelu",
                "Pad", "Add", "Slice", "Concat", "Tanh"}

ARCHS = [  # (arch, ngf, norm): small ngf keeps CPU export and inference fast
    ("resnet_9blocks", 8, "instance"),
    ("resnet_6blocks", 8, "instance"),
    ("unet_128", 4, "instance"),
    ("unet_256", 4, "instance"),
    ("udacity", 8, "batch"),
]


def _gen(arch="resnet_6blocks", ngf=8, norm="instance", seed=0, **kw):
    torch.manual_seed(seed)
    m = build_generator(arch, ngf=ngf, norm=norm, **kw).eval()
    if norm == "batch":  # non-trivial running statistics, so BatchNormalization is exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("arch,ngf,norm", ARCHS, ids=[a[0] for a in ARCHS])
def test_onnx_export_each_arch(tmp_path, arch, ngf, norm):
    m = _gen(arch, ngf, norm)
    spec = spec_for_model(m, config=_model_config(m))
    path = str(tmp_path / f"{arch}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to the TorchScript exporter warns
        out_spec = onnx_export.export_onnx(m, path, spec)
    onnx.checker.check_model(path, full_check=True)
    ops = set(onnx_export.op_types(path))
    assert ops <= STANDARD_OPS, f"non-standard ops in the graph: {ops - STANDARD_OPS}"
    if norm == "instance":
        assert "InstanceNormalization" in ops
    proto = onnx.load(path)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True]  # dynamic B, H, W
    assert onnx_export.read_spec(path) == out_spec
    # 256^2, batched non-square, wide: fp32 parity with PyTorch.
    errs = onnx_export.verify_against_torch(onnx_export.onnx_runner(path), m, out_spec,
                                            onnx_export.default_verify_shapes(out_spec))
    assert len(errs) == 3 and errs[0][0][2:] == (256, 256)
    for shape, err in errs:
        assert err <= FP32_TOL, f"{arch} {shape}: {err}"


def test_onnx_translator_pads_and_crops(tmp_path):
    """Non-square and non-multiple-of-4 sizes go through the Translator (reflect pad, crop)."""
    m = _gen("resnet_6blocks", 8)
    d = tmp_path / "run"
    d.mkdir()
    save_generator(m, d / "generator_AtoB.safetensors")
    onnx_path = str(tmp_path / "g.onnx")
    assert cli.main([str(d), "--onnx", onnx_path, "--verify-sizes", "1x64x96"]) == 0
    t_onnx = load(onnx_path, device="cpu")
    t_torch = load(str(d), device="cpu")
    assert t_onnx.engine == "onnx" and t_torch.engine == "torch"
    g = torch.Generator().manual_seed(1)
    for h, w in [(96, 64), (37, 53), (6, 5)]:  # 6x5 is below the minimum size: padded up, cropped back
        x = torch.rand(2, 3, h, w, generator=g) * 2 - 1
        y_onnx, y_torch = t_onnx(x), t_torch(x)
        assert y_onnx.shape == x.shape and y_onnx.dtype == torch.float32
        assert (y_onnx - y_torch).abs().max().item() <= FP32_TOL
    # The padded size is what the generator sees; cropping keeps the top-left h x w.
    x = torch.rand(1, 3, 37, 53, generator=g) * 2 - 1
    xp = torch.nn.functional.pad(x, (0, 3, 0, 3), mode="reflect")
    with torch.no_grad():
        ref = m(xp)[:, :, :37, :53]
    assert (t_onnx(x) - ref).abs().max().item() <= FP32_TOL


def test_translator_input_kinds():
    from PIL import Image

    m = _gen("resnet_6blocks", 4)
    tr = from_model(m, "cpu")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    out = tr(img)
    assert isinstance(out, np.ndarray) and out.shape == img.shape and out.dtype == np.uint8
    pil = tr(Image.fromarray(img))
    assert isinstance(pil, Image.Image) and pil.size == (41, 30) and pil.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil), out)
    t = tr(torch.from_numpy(img).permute(2, 0, 1))
    assert t.dtype == torch.uint8 and t.shape == (3, 30, 41)
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), out)
    batch = tr(np.stack([img, img]))
    assert batch.shape == (2, 30, 41, 3)
    outs = tr.translate_batch([img, img[:17], Image.fromarray(img), img], batch_size=2)
    assert [type(o) for o in outs] == [np.ndarray, np.ndarray, Image.Image, np.ndarray]
    assert outs[1].shape == (17, 41, 3)
    np.testing.assert_array_equal(outs[0], out)
    np.testing.assert_array_equal(outs[3], out)
    with pytest.raises(ValueError, match="channels"):
        tr(img[:, :, :1].copy())
    with pytest.raises(TypeError, match="uint8"):
        tr(img.astype(np.float32))


def test_official_checkpoint_exports_and_matches(tmp_path):
    m = _gen("resnet_9blocks", 8, seed=3)
    pth = str(tmp_path / "latest_net_G_A.pth")
    save_official_generator(m, pth)
    sd = torch.load(pth)
    assert "model.1.weight" in sd  # official layout (ReflectionPad2d at model.0, Conv at model.1)
    onnx_path = str(tmp_path / "official.onnx")
    rc = cli.main(["--from-official", pth, "--arch", "resnet_9blocks", "--ngf", "8", "--norm", "instance",
                   "--no-dropout", "--onnx", onnx_path, "--verify-sizes", "1x64x64,2x32x48"])
    assert rc == 0
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref = m(x)
    assert (load(onnx_path, device="cpu")(x) - ref).abs().max().item() <= FP32_TOL
    # Wrong arch for the checkpoint: clear error naming the file, usage exit code.
    assert cli.main(["--from-official", pth, "--arch", "resnet_6blocks", "--ngf", "8",
                     "--onnx", str(tmp_path / "x.onnx")]) == cli.EXIT_USAGE


def test_cli_static_and_fp16(tmp_path, capsys):
    m = _gen("resnet_6blocks", 8)
    st = tmp_path / "g.safetensors"
    save_generator(m, st)
    static = str(tmp_path / "static.onnx")
    assert cli.main([str(st), "--onnx", static, "--static", "64x96"]) == 0
    dims = onnx.load(static).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 64, 96] and dims[0].HasField("dim_param")
    # A static engine tiles larger images and pads smaller ones to its size.
    tr = load(static, device="cpu", tile_overlap=16)
    x = torch.rand(1, 3, 100, 150) * 2 - 1
    assert tr(x).shape == x.shape and tr(x[:, :, :30, :40]).shape == (1, 3, 30, 40)
    half = str(tmp_path / "half.onnx")
    assert cli.main([str(st), "--onnx", half, "--fp16", "--verify-sizes", "1x64x64"]) == 0
    assert onnx.load(half).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    out = capsys.readouterr().out
    assert "max abs error" in out
    # Over tolerance -> non-zero exit.
    assert cli.main([str(st), "--onnx", half, "--fp16", "--tol", "1e-9", "--verify-sizes", "1x64x64"]) == cli.EXIT_FAIL


def test_bad_artifacts_name_the_file(tmp_path):
    txt = tmp_path / "model.txt"
    txt.write_text("hello")
    with pytest.raises(ArtifactError, match="model.txt"):
        load(str(txt))
    trunc = tmp_path / "trunc.onnx"
    m = _gen("resnet_6blocks", 4)
    good = tmp_path / "good.onnx"
    onnx_export.export_onnx(m, str(good), spec_for_model(m, config=_model_config(m)))
    trunc.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ArtifactError, match="trunc.onnx"):
        load(str(trunc), device="cpu")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ArtifactError, match="foreign.safetensors.*not a fastcgan generator"):
        load(str(foreign))
    fake_pt2 = tmp_path / "fake.pt2"
    fake_pt2.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="fake.pt2"):
        load(str(fake_pt2), device="cpu")
    with pytest.raises(ArtifactError, match="missing_dir"):
        load(str(tmp_path / "missing_dir"))
    with pytest.raises(ArtifactError, match="engine='aoti'"):
        load(str(good), engine="aoti")
    # Channel mismatch: a 1-channel generator given RGB.
    g1 = build_generator("resnet_6blocks", input_nc=1, output_nc=1, ngf=4).eval()
    one = tmp_path / "gray.onnx"
    onnx_export.export_onnx(g1, str(one), spec_for_model(g1, config=_model_config(g1)))
    tr = load(str(one), device="cpu")
    assert tr.input_nc == 1
    with pytest.raises(ValueError, match="3 channels.*expects 1.*gray.onnx"):
        tr(np.zeros((16, 16, 3), np.uint8))
    assert tr(np.zeros((16, 16), np.uint8)).shape == (16, 16)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([str(tmp_path)])  # nothing to do
    with pytest.raises(SystemExit):
        cli.main(["--from-official", "x.pth", "--onnx", "g.onnx"])  # no --arch
    assert cli.main([str(tmp_path / "nope"), "--onnx", str(tmp_path / "g.onnx")]) == cli.EXIT_USAGE
    assert "nope" in capsys.readouterr().err


def test_trt_without_tensorrt_still_writes_onnx(tmp_path, capsys):
    """Without TensorRT (or a GPU) --trt fails with install instructions and exit 3; --onnx is still made."""
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present: the real build is tested in test_trt_engine")
    except ImportError:
        pass
    m = _gen("resnet_6blocks", 4)
    st = tmp_path / "g.safetensors"
    save_generator(m, st)
    onnx_path, engine = tmp_path / "g.onnx", tmp_path / "g.engine"
    rc = cli.main([str(st), "--onnx", str(onnx_path), "--trt", str(engine), "--verify-sizes", "1x32x32"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_TRT_MISSING
    assert "pip install tensorrt" in err
    assert onnx_path.exists() and not engine.exists()
    from fastcgan.deploy.tensorrt import TensorRTUnavailable

    with pytest.raises(TensorRTUnavailable, match="pip install"):
        load(str(onnx_path), engine="trt")


@pytest.mark.cuda
def test_trt_engine(tmp_path):
    pytest.importorskip("tensorrt")
    m = _gen("resnet_6blocks", 8)
    st = tmp_path / "g.safetensors"
    save_generator(m, st)
    engine = tmp_path / "g.engine"
    rc = cli.main([str(st), "--trt", str(engine), "--min-shape", "1x3x64x64", "--opt-shape", "2x3x128x128",
                   "--max-shape", "4x3x256x256", "--timing-cache", str(tmp_path / "cache.bin"),
                   "--verify-sizes", "1x128x128,2x64x96"])
    assert rc == 0 and engine.exists()
    meta = json.loads((tmp_path / "g.engine.json").read_text())
    assert meta["profile"][2] == [4, 3, 256, 256]
    tr = load(str(engine))
    x = torch.rand(3, 3, 100, 130, device="cuda") * 2 - 1
    ref = load(str(st), device="cuda", backend="torch")(x)
    assert (tr(x) - ref).abs().max().item() <= 1e-3


@pytest.mark.cuda
def test_onnxruntime_cuda_provider_or_message(tmp_path):
    m = _gen("resnet_6blocks", 4)
    path = tmp_path / "g.onnx"
    onnx_export.export_onnx(m, str(path), spec_for_model(m, config=_model_config(m)))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            load(str(path), device="cuda")
        return
    tr = load(str(path), device="cuda")
    x = torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1
    ref = load(str(path), device="cpu")(x.cpu())
    assert (tr(x).cpu() - ref).abs().max().item() <= 1e-3
