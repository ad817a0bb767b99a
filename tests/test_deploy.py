"""ONNX export of every generator arch, onnxruntime parity, the Translator's pad/crop and input
kinds, official checkpoints, bad artifacts, and the TensorRT path (GPU) or its message (CPU)."""

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fastcgan.deploy import ArtifactError, cli, load, onnx_export
from fastcgan.deploy._common import _model_config, spec_for_model
from fastcgan.deploy.runtime import OrtRunner, from_model

from fastcgan.models import build_generator, save_generator, save_official_generator
from fastcgan.deploy._common import GeneratorSpec
from fastcgan.deploy.onnx_export import default_verify_shapes

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
    errs = onnx_export.verify_against_torch(OrtRunner(path, torch.device("cpu")), m, out_spec,
                                            onnx_export.default_verify_shapes(out_spec))
    assert len(errs) == 3 and errs[0][0][2:] == (256, 256)
    for shape, err in errs:
        assert err <= FP32_TOL, f"{arch} {shape}: {err}"
    # Its graph says the output is (N, 3, H, W) of the input's N, H, W: on CUDA the runner binds
    # a torch tensor as the output (no copy through the host).

    assert OrtRunner(path, torch.device("cpu"))._out_channels == 3


def test_ort_output_binding_needs_the_inputs_dims():

    oc = OrtRunner.output_channels
    assert oc(["N", 3, "H", "W"], ["N", 1, "H", "W"]) == 1
    assert oc([1, 3, 64, 64], [1, 3, 64, 64]) == 3
    assert oc(["N", 3, "H", "W"], ["N", 3, "H2", "W"]) is None  # another size: onnxruntime allocates
    assert oc(["N", 3, "H", "W"], ["N", "C", "H", "W"]) is None
    assert oc(["N", 3, None, "W"], ["N", 3, None, "W"]) is None  # an unnamed dim says nothing
    assert oc(["N", 3, "H", "W"], ["N", 3, "H"]) is None


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
    # No --ngf: the width is the checkpoint's (8 here; it had to be given before).
    rc = cli.main(["--from-official", pth, "--arch", "resnet_9blocks", "--norm", "instance",
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
    # Its tile is the model's: too many of them is a refusal that says where that size comes from.
    with pytest.raises(ValueError, match=r"^--static 64x96 --tile-overlap 16 would cut big\.png \(9000x9000\) into "
                       r"[\d,]+ tiles, more than the limit of 16,384: use a larger --static \(or a smaller "
                       r"--tile-overlap\) \(--static: the model's fixed input size, set by fastcgan-export\)$"):
        tr.check_tile_count(9000, 9000, what="big.png")
    half = str(tmp_path / "half.onnx")
    assert cli.main([str(st), "--onnx", half, "--fp16", "--verify-sizes", "1x64x64"]) == 0
    assert onnx.load(half).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    out = capsys.readouterr().out
    assert "max abs error" in out
    # Over tolerance -> non-zero exit.
    assert cli.main([str(st), "--onnx", half, "--overwrite", "--fp16", "--tol", "1e-9",
                     "--verify-sizes", "1x64x64"]) == cli.EXIT_FAIL


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


def test_trt_runner_enqueues_under_a_guard_for_its_device(monkeypatch):
    """TensorRT enqueues on the current CUDA device: ``TrtRunner.__call__`` makes the engine's
    device current around the whole call (a runner on cuda:1 called while cuda:0 is current ran
    on cuda:0). No TensorRT here: a fake execution context, the guard recorded, the runner's
    device a CPU standing for its GPU."""
    import types

    from fastcgan.deploy.tensorrt import TrtRunner

    active, seen = [], []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    class Context:
        def set_input_shape(self, name, shape):
            self.shape = shape
            return True

        def get_tensor_shape(self, name):
            return self.shape

        def set_tensor_address(self, name, ptr):
            seen.append(("address", name, list(active)))

        def execute_async_v3(self, stream):
            seen.append(("execute", stream, list(active)))
            return True

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    runner = object.__new__(TrtRunner)
    runner.device, runner.path, runner.profile = torch.device("cpu"), "g.engine", None
    runner.context, runner.input_name, runner.output_name = Context(), "x", "y"
    runner.in_dtype = runner.out_dtype = torch.float32
    assert runner(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 4, 4)
    assert seen and all(guards == [runner.device] for *_, guards in seen), seen
    assert seen[-1][:2] == ("execute", 7) and not active


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


# --------------------------------------------------------------------------------------------
# fastcgan-export: outputs, inputs and flags checked before any work (exit 2), nothing installed
# that failed verification
# --------------------------------------------------------------------------------------------
def _export(*argv) -> int:
    """cli.main's exit status, whether it returns it or argparse exits with it."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _no_temporaries(folder):
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "run"
    d.mkdir()
    save_generator(_gen("resnet_6blocks", 4), d / "generator_AtoB.safetensors")
    return d


@pytest.fixture(scope="module")
def good_onnx(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.onnx"
    assert _export(run_dir, "--onnx", path, "--verify-sizes", "1x32x32") == 0
    return path


def test_export_existing_output_needs_overwrite(run_dir, good_onnx, tmp_path, capsys):
    other = tmp_path / "other.onnx"
    other.write_text("data\n")
    assert _export(run_dir, "--onnx", other, "--verify-sizes", "1x32x32") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--onnx" in err and "other.onnx" in err and "--overwrite" in err and "Traceback" not in err
    assert other.read_text() == "data\n" and _no_temporaries(tmp_path)
    # A code artifact's manifest is an output too: refused before anything is compiled.
    (tmp_path / "g.pt2.manifest.json").write_text("{}")
    assert _export(run_dir, "--aoti", tmp_path / "g.pt2", "--device", "cpu") == cli.EXIT_USAGE
    assert "g.pt2.manifest.json" in capsys.readouterr().err and not (tmp_path / "g.pt2").exists()
    assert _export(run_dir, "--onnx", other, "--overwrite", "--verify-sizes", "1x32x32") == 0
    assert other.read_bytes() != b"data\n" and onnx_export.read_spec(str(other)).arch == "resnet_6blocks"


def test_export_never_writes_over_its_inputs(run_dir, tmp_path, capsys):
    import os

    gen = run_dir / "generator_AtoB.safetensors"
    before = gen.read_bytes()
    linked = tmp_path / "linked.onnx"
    os.link(gen, linked)
    pth = tmp_path / "latest_net_G_A.pth"
    save_official_generator(_gen("resnet_6blocks", 4), pth)
    official = ["--from-official", pth, "--arch", "resnet_6blocks", "--ngf", "4"]
    os.link(pth, tmp_path / "pth.onnx")
    cases = [  # (argv, words the error must hold)
        ([run_dir, "--trt", gen, "--overwrite"], ["--trt", "input"]),
        ([gen, "--trt", tmp_path / "run_link.engine", "--onnx", linked, "--overwrite"], ["--onnx", "input"]),
        ([*official, "--onnx", tmp_path / "pth.onnx", "--overwrite"], ["--onnx", "input"]),
        ([*official, "--trt", pth, "--overwrite"], ["--trt", "input"]),
        ([run_dir, "--onnx", tmp_path / "g.onnx", "--trt", tmp_path / "g.onnx"], ["--trt", "--onnx"]),
        ([run_dir, "--onnx", tmp_path / "g.onnx", "--trt", tmp_path / "sub" / ".." / "g.onnx"], ["--trt", "--onnx"]),
        ([run_dir, "--trt", tmp_path / "g.engine", "--timing-cache", gen], ["--timing-cache", "input"]),
        ([run_dir, "--trt", tmp_path / "g.engine", "--timing-cache", tmp_path / "g.engine.json"],
         ["--timing-cache", "--trt"]),
    ]
    for argv, words in cases:
        assert _export(*argv) == cli.EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert all(w in err for w in words) and "Traceback" not in err, (argv, err)
    assert gen.read_bytes() == before and linked.read_bytes() == before
    assert not (tmp_path / "g.onnx").exists() and not (tmp_path / "g.engine").exists()


def test_safetensors_output_converts_official_checkpoints(run_dir, tmp_path, capsys):
    """``--safetensors``: an official checkpoint (here pix2pix-style BatchNorm, per-image statistics)
    becomes a fastcgan generator file that gives the official output where translate / eval load it;
    verified before it is installed, and like every output never over an input or an existing file."""
    import os

    from fastcgan.models import load_generator, read_generator_config

    ref = _gen("unet_128", 4, "batch", seed=3)
    pth = tmp_path / "latest_net_G.pth"
    save_official_generator(ref, pth)
    out = tmp_path / "g.safetensors"
    argv = ["--from-official", pth, "--arch", "unet_128", "--norm", "batch", "--safetensors", out,
            "--verify-sizes", "2x128x128"]
    assert _export(*argv) == 0
    assert "safetensors vs PyTorch  input 2x3x128x128: max abs error 0 " in capsys.readouterr().out
    config = read_generator_config(out)
    assert (config["arch"], config["norm"], config["bn_inference"], config["ngf"]) == ("unet_128", "batch",
                                                                                       "per_image", 4)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():  # the official test.py: each image normalised with its own statistics
        want = torch.cat([ref.train()(x[i:i + 1]) for i in range(2)])
        torch.testing.assert_close(load_generator(out, backend="torch")(x), want, atol=1e-5, rtol=1e-5)
    assert _no_temporaries(tmp_path)

    before = out.read_bytes()
    assert _export(*argv) == cli.EXIT_USAGE  # exists
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    gen = run_dir / "generator_AtoB.safetensors"
    assert _export(gen, "--safetensors", gen, "--overwrite") == cli.EXIT_USAGE  # its own input
    assert "input" in capsys.readouterr().err
    assert _export(run_dir, "--safetensors", tmp_path / "g.pth") == cli.EXIT_USAGE  # name
    assert "must end in .safetensors" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert _export(run_dir, "--safetensors", tmp_path / "afile" / "g.safetensors") == cli.EXIT_USAGE
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "afile").unlink()
    nan = _gen("resnet_6blocks", 4)
    with torch.no_grad():
        next(nan.parameters())[0] = float("nan")
    save_generator(nan, tmp_path / "nan.safetensors")
    assert _export(tmp_path / "nan.safetensors", "--safetensors", tmp_path / "new" / "deeper" / "x.safetensors",
                   "--no-verify") == cli.EXIT_USAGE
    assert "non-finite weights" in capsys.readouterr().err
    (tmp_path / "nan.safetensors").unlink()
    # A failed verification leaves none of the folders made for the output.
    assert _export(run_dir, "--onnx", tmp_path / "new" / "deeper" / "g.onnx", "--tol", "1e-12", "--verify-sizes",
                   "1x32x32") == cli.EXIT_FAIL
    assert not (tmp_path / "new").exists()
    # A run's generator comes out as it went in (the same tensors), however it is named.
    copy = tmp_path / "copy.safetensors"
    assert _export(run_dir, "--safetensors", copy, "--verify-sizes", "1x32x32") == 0
    a, b = load_generator(gen, backend="torch").state_dict(), load_generator(copy, backend="torch").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path)) == ["copy.safetensors", "g.safetensors", "latest_net_G.pth"]


def test_failed_verification_installs_nothing(run_dir, good_onnx, tmp_path, capsys):
    before = good_onnx.read_bytes()
    argv = ["--onnx", good_onnx, "--overwrite", "--tol", "1e-12", "--verify-sizes", "1x32x32"]
    assert _export(run_dir, *argv) == cli.EXIT_FAIL
    assert "OVER TOLERANCE" in capsys.readouterr().out
    assert good_onnx.read_bytes() == before and _no_temporaries(good_onnx.parent)
    fresh = tmp_path / "fresh.onnx"
    assert _export(run_dir, "--onnx", fresh, "--tol", "1e-12", "--verify-sizes", "1x32x32") == cli.EXIT_FAIL
    assert not fresh.exists() and _no_temporaries(tmp_path)
    for tol in ("-1", "0", "nan", "inf", "-inf"):
        assert _export(run_dir, "--onnx", fresh, "--tol", tol) == cli.EXIT_USAGE, tol
        assert "--tol" in capsys.readouterr().err
    assert not fresh.exists()


@pytest.mark.parametrize("sizes", ["1x100000x100000", "0x0x0", "0x32x32", "1x-8x16", "65x32x32", "1x4x4", "1x30x32",
                                   "1x32", "1x32x32," * 17, "64x1024x1024"])
def test_verify_sizes_checked_first(run_dir, tmp_path, sizes, capsys):
    out = tmp_path / "g.onnx"
    assert _export(run_dir, "--onnx", out, "--verify-sizes", sizes.rstrip(",")) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--verify-sizes" in err and "Traceback" not in err and "resnet_9blocks" not in err
    assert not out.exists() and _no_temporaries(tmp_path)


def test_size_limits_accept_their_own_bounds():
    """The documented limits are inclusive: 16 --verify-sizes, a batch of MAX_VERIFY_BATCH, a
    --static of exactly MAX_VERIFY_PIXELS (2048x2048) are taken; one more is refused."""
    import argparse

    assert len(cli._bhw_list(",".join(["1x32x32"] * cli.MAX_VERIFY_SIZES))) == cli.MAX_VERIFY_SIZES
    assert cli._bhw_list(f"{cli.MAX_VERIFY_BATCH}x8x8") == [(cli.MAX_VERIFY_BATCH, 8, 8)]
    spec = spec_for_model(_gen("resnet_6blocks", 4))
    assert cli.MAX_VERIFY_PIXELS == 2048 * 2048
    assert cli._check_sizes(argparse.Namespace(static=(2048, 2048), verify_sizes=None), spec) is None
    assert "--static 2048x2052" in cli._check_sizes(argparse.Namespace(static=(2048, 2052), verify_sizes=None), spec)


def test_static_must_fit_the_generator(run_dir, tmp_path, capsys):
    out = tmp_path / "g.onnx"
    assert _export(run_dir, "--onnx", out, "--static", "4x4") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--static 4x4" in err and "multiples of 4" in err and "at least 8" in err
    assert _export(run_dir, "--onnx", out, "--static", "100000x100000") == cli.EXIT_USAGE
    assert "--static" in capsys.readouterr().err
    # Verifying a static model at another size could only fail.
    assert _export(run_dir, "--onnx", out, "--static", "32x32", "--verify-sizes", "1x64x64") == cli.EXIT_USAGE
    assert "--verify-sizes" in capsys.readouterr().err and not out.exists()


def test_official_ngf_is_bounded(tmp_path, capsys):
    from fastcgan.models.io import MAX_WIDTH

    pth = tmp_path / "latest_net_G_A.pth"
    save_official_generator(_gen("resnet_6blocks", 4), pth)
    for ngf in (MAX_WIDTH + 1, 3000, 0, -4):
        assert _export("--from-official", pth, "--arch", "resnet_6blocks", "--ngf", ngf,
                       "--onnx", tmp_path / "g.onnx") == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert "--ngf" in err and str(MAX_WIDTH) in err
    assert not (tmp_path / "g.onnx").exists()


def test_opset_is_honoured_or_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "g7.onnx"
    assert _export(run_dir, "--onnx", out, "--opset", "7", "--verify-sizes", "1x32x32") == 0
    assert "opset 7" in capsys.readouterr().out and onnx_export.opset_of(str(out)) == 7
    for argv in (["--opset", "1"], ["--opset", "99999"], ["--opset", "17", "--exporter", "dynamo"]):
        assert _export(run_dir, "--onnx", tmp_path / "x.onnx", *argv) == cli.EXIT_USAGE, argv
        assert "--opset" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_trt_unavailable_fails_before_any_work(run_dir, tmp_path, monkeypatch, capsys):
    from fastcgan.deploy.tensorrt import TensorRTUnavailable, import_tensorrt

    try:
        import_tensorrt()
        pytest.skip("TensorRT and a GPU are present")
    except TensorRTUnavailable:
        pass

    def no_export(*a, **k):
        raise AssertionError("exported ONNX for a TensorRT engine that cannot be built")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    assert _export(run_dir, "--trt", tmp_path / "g.engine") == cli.EXIT_TRT_MISSING
    assert "pip install tensorrt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_run_also_as_checkpoint_flag(run_dir, tmp_path, capsys):
    """fastcgan-translate and -eval take --checkpoint RUN: export takes it too (RUN positional)."""
    assert _export("--checkpoint", run_dir, "--safetensors", tmp_path / "g.safetensors") == 0
    assert (tmp_path / "g.safetensors").is_file()
    assert _export(run_dir, "--checkpoint", run_dir, "--safetensors", tmp_path / "h.safetensors") == cli.EXIT_USAGE
    assert "give RUN once" in capsys.readouterr().err and not (tmp_path / "h.safetensors").exists()


@pytest.mark.parametrize("absent", ["onnx", "onnxruntime"])
def test_missing_onnx_packages_are_named_before_any_work(run_dir, tmp_path, monkeypatch, capsys, absent):
    """onnx / onnxruntime are the deploy extra: without them --onnx said 'dynamo: ModuleNotFoundError
    ... torchscript: OnnxExporterError' after loading the run; now exit 3 naming the extra."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a))
    assert _export(run_dir, "--onnx", tmp_path / "g.onnx") == cli.EXIT_TRT_MISSING
    err = capsys.readouterr().err
    assert f"--onnx needs {absent}" in err and "pip install 'fastcgan[deploy]'" in err
    assert list(tmp_path.iterdir()) == []
    if absent == "onnxruntime":  # only the verification needs it
        assert _export(run_dir, "--onnx", tmp_path / "g.onnx", "--no-verify") == 0


def test_one_generator_artifacts_keep_their_direction(tmp_path, capsys):
    """Exporting a run's generator_BtoA.safetensors wrote an ONNX model that said AtoB (and
    evaluation then scored it on the A images). A direction given with a one-generator file
    relabels it (a released zebra2horse model sits in an AtoB slot)."""
    from fastcgan.models import read_generator_direction

    run = tmp_path / "run"
    run.mkdir()
    for seed, d in enumerate(("AtoB", "BtoA")):
        save_generator(_gen("resnet_6blocks", 4, seed=seed), run / f"generator_{d}.safetensors", direction=d)
    ba = run / "generator_BtoA.safetensors"
    assert load(str(ba)).spec.direction == "BtoA"
    assert load(str(ba), direction="AtoB").spec.direction == "AtoB"

    assert _export(ba, "--onnx", tmp_path / "ba.onnx", "--verify-sizes", "1x32x32") == 0
    assert load(str(tmp_path / "ba.onnx")).spec.direction == "BtoA"
    assert load(str(tmp_path / "ba.onnx"), direction="AtoB").spec.direction == "AtoB"
    assert _export(run, "--direction", "BtoA", "--safetensors", tmp_path / "out.safetensors") == 0
    assert read_generator_direction(tmp_path / "out.safetensors") == "BtoA"
    capsys.readouterr()

    # Files written before the metadata held it: known by a run's file name, else unknown.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_generator(_gen("resnet_6blocks", 4), legacy / "generator_BtoA_best.safetensors")
    save_generator(_gen("resnet_6blocks", 4), legacy / "zebra2horse.safetensors")
    assert read_generator_direction(legacy / "generator_BtoA_best.safetensors") == "BtoA"
    assert read_generator_direction(legacy / "zebra2horse.safetensors") is None
    assert load(str(legacy / "zebra2horse.safetensors"), direction="BtoA").spec.direction == "BtoA"
    with pytest.raises(ValueError, match="direction must be one of"):
        save_generator(_gen("resnet_6blocks", 4), tmp_path / "x.safetensors", direction="sideways")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("artifact, kw, said", [
    ("onnx", dict(compile_mode="max-autotune"), "compile_mode='max-autotune' applies to engine='compiled' only"),
    ("onnx", dict(channels_last=True), "channels_last=True applies to the torch and compiled engines only"),
    ("onnx", dict(backend="cpp"), "backend='cpp' applies to the torch and compiled engines only"),
    ("onnx", dict(bf16=True), "bf16=True: the onnx engine runs fp32 or an fp16-exported model"),
    ("onnx", dict(fp16=True), "is an fp32 model: fp16=True would do nothing"),
    ("onnx", dict(threads=0), "threads must be an int from 1 to"),
    ("onnx", dict(threads=3000), "threads must be an int from 1 to"),  # 3000 OS threads, very slow
    ("onnx", dict(threads=True), "threads must be an int"),
    ("onnx", dict(max_tiles=0), "max_tiles must be an int >= 1"),
    ("run", dict(threads=1), "threads=1 applies to engine='onnx' only"),
    ("run", dict(backend="nonsense"), "unknown backend 'nonsense'"),
    ("run", dict(backend="cuda"), "backend 'cuda' cannot run on cpu"),
    ("run", dict(compile_mode="default"), "applies to engine='compiled' only (engine is 'torch')"),
    ("run", dict(engine="onnx", bf16=True), "bf16=True: the onnx engine"),
    ("run", dict(direction="sideways"), "direction must be one of"),
])
def test_load_refuses_options_that_would_do_nothing(run_dir, good_onnx, artifact, kw, said):
    """Each of these was accepted and ignored (bf16 ran fp32; threads on a torch engine, a
    backend on an ONNX model) or failed only at the first image (an unknown backend)."""
    path = good_onnx if artifact == "onnx" else run_dir
    with pytest.raises(ValueError, match=re.escape(said)):
        load(str(path), device="cpu", **kw)


def test_load_options_that_apply_are_taken(run_dir, good_onnx):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    ref = load(str(run_dir), device="cpu")(x)
    assert load(str(good_onnx), device="cpu", threads=1)(x).shape == ref.shape
    from fastcgan.ops import available_backends

    cpp = [dict(backend="cpp")] if available_backends()["cpp"].available else []
    for kw in [dict(backend="torch"), dict(channels_last=True)] + cpp:
        torch.testing.assert_close(load(str(run_dir), device="cpu", **kw)(x), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("edit, said", [
    (dict(input_nc=1), "input channels 1, the graph 3"),
    (dict(output_nc=4), "output channels 4, the graph 3"),
    (dict(dtype="float16"), "input type float16, the graph float32"),
    (dict(static_hw=[64, 64]), None),  # stricter than the graph: harmless, kept
    (dict(direction="sideways"), "fastcgan metadata: direction must be one of"),
    (dict(pairs_direction=3), "fastcgan metadata: pairs_direction must be one of"),
])
def test_onnx_metadata_that_contradicts_the_graph_is_refused_at_load(good_onnx, tmp_path, edit, said):
    """An edited metadata entry (input_nc 1 on an RGB graph) loaded, then failed in onnxruntime
    at the first image."""
    import onnx

    from fastcgan.deploy._common import METADATA_KEY

    proto = onnx.load(str(good_onnx))
    prop = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    prop.value = json.dumps({**json.loads(prop.value), **edit})
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    if said is None:
        assert load(str(path), device="cpu").spec.static_hw == (64, 64)
        return
    said = said if said.startswith("fastcgan") else f"the fastcgan metadata says {said}"
    with pytest.raises(ArtifactError, match=re.escape(f"edited.onnx: {said}")):
        load(str(path), device="cpu")


def test_edited_onnx_files_fail_with_messages(good_onnx, tmp_path, capsys):
    """A graph whose H alone was fixed (metadata: any size) loaded and failed in onnxruntime at
    the first image; a metadata size_multiple of 1 (the graph needs 4) failed inside onnxruntime
    with a traceback from fastcgan-translate."""
    import onnx

    from fastcgan.deploy._common import METADATA_KEY
    from fastcgan.translate import main as translate

    proto = onnx.load(str(good_onnx))
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 64
    onnx.save(proto, str(tmp_path / "h64.onnx"))
    with pytest.raises(ArtifactError, match=re.escape("metadata says input size any size, the graph 64xany only")):
        load(str(tmp_path / "h64.onnx"), device="cpu")

    proto = onnx.load(str(good_onnx))
    prop = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    prop.value = json.dumps({**json.loads(prop.value), "size_multiple": 1, "min_size": 8})
    onnx.save(proto, str(tmp_path / "m1.onnx"))
    with pytest.raises(ArtifactError, match="m1.onnx: onnxruntime failed on a 1x3x37x41 input"):
        load(str(tmp_path / "m1.onnx"), device="cpu")(torch.zeros(1, 3, 37, 41))
    from PIL import Image

    Image.new("RGB", (41, 37)).save(tmp_path / "odd.png")
    assert translate(["--checkpoint", str(tmp_path / "m1.onnx"), "--input", str(tmp_path / "odd.png"),
                      "--output", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: translating" in err and "onnxruntime failed" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, said", [
    (["--fp16", "--safetensors", "{t}/g.safetensors"], "--fp16 applies to --onnx / --trt / --aoti only"),
    (["--bf16", "--onnx", "{t}/g.onnx"], "--bf16 applies to --trt / --aoti only"),  # the ONNX model stayed fp32
    (["--device", "cpu", "--onnx", "{t}/g.onnx"], "--device applies to --aoti / --trt only"),  # ONNX: CPU-verified
])
def test_export_precision_flags_no_artifact_uses_exit_2(run_dir, tmp_path, flags, said, capsys):
    assert _export(run_dir, *[f.format(t=tmp_path) for f in flags]) == cli.EXIT_USAGE
    assert said in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_official_bn_inference_needs_batchnorm(tmp_path, capsys):
    pth = tmp_path / "latest_net_G_A.pth"
    save_official_generator(_gen("resnet_6blocks", 4), pth)
    assert _export("--from-official", pth, "--arch", "resnet_6blocks", "--bn-inference", "running",
                   "--onnx", tmp_path / "g.onnx") == cli.EXIT_USAGE
    assert "--bn-inference: a --norm instance generator has no BatchNorm" in capsys.readouterr().err
    assert not (tmp_path / "g.onnx").exists()


def test_load_and_translate_batch_check_their_numbers_first(run_dir, monkeypatch):
    """tile=64.0 was a TypeError from tuple(); tile_overlap without tile on engine='onnx' was
    refused only after the ONNX export; translate_batch(batch_size=0) ran with 1."""
    with pytest.raises(ValueError, match="tile must be a positive number of pixels, got 64.0"):
        load(str(run_dir), tile=64.0)

    def no_export(*a, **k):
        raise AssertionError("exported before refusing the arguments")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    with pytest.raises(ValueError, match="without tile"):
        load(str(run_dir), engine="onnx", tile_overlap=5, device="cpu")
    tr = load(str(run_dir), device="cpu")
    for bad in (0, -5, 2.0):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            tr.translate_batch([torch.zeros(1, 3, 16, 16)], batch_size=bad)


def test_a_forward_pass_is_bounded_in_pixels_not_only_in_images(run_dir, monkeypatch):
    """Activations are ~300x the input: eight 12-Mpx photos at --batch-size 8 asked ~90 GB. A pass
    takes at most BATCH_PIXELS (one image at least); outputs are the same (per-image norms)."""
    from fastcgan.deploy import runtime

    tr = load(str(run_dir), device="cpu", batch_size=8)
    images = [torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(5)]
    whole = [y.clone() for y in tr.translate_batch(images)]
    calls = []
    real = tr.runner.__call__

    def counted(x):
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(tr, "runner", runtime.CallableRunner(counted, tr.runner.device, tr.runner.dtype, "counted"))
    monkeypatch.setattr(runtime, "BATCH_PIXELS", 2 * 32 * 32 + 5)
    split = tr.translate_batch(images)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(torch.cat(split), torch.cat(whole), rtol=1e-5, atol=1e-6)
    calls.clear()
    monkeypatch.setattr(runtime, "BATCH_PIXELS", 10)  # a larger image than the budget: alone
    tr.translate_batch(images[:2])
    assert calls == [1, 1]


def test_running_out_of_memory_says_how_to_translate_smaller(run_dir, tmp_path, monkeypatch, capsys):
    """An allocation failure in the generator was a traceback in fastcgan-eval and a bare torch
    message in fastcgan-translate: both now name the size and the flags that make it fit."""
    from PIL import Image

    from fastcgan.deploy import runtime
    from fastcgan.evaluate import main as evaluate
    from fastcgan.translate import main as translate

    def no_memory(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")

    tr = load(str(run_dir), device="cpu", batch_size=4)
    monkeypatch.setattr(type(tr.runner), "__call__", no_memory)
    with pytest.raises(runtime.InferenceMemoryError, match=r"out of memory on cpu running the generator on a batch "
                       r"of 2 at 20x24 \(WxH\) \(\[enforce fail .* can't allocate memory.*\); "
                       r"use --batch-size 1, or tiles \(--tile 512"):
        tr.translate_batch([torch.rand(1, 3, 24, 20) * 2 - 1] * 2)
    for split in ("testA", "testB"):
        (tmp_path / "data" / split).mkdir(parents=True)
        Image.new("RGB", (40, 36)).save(tmp_path / "data" / split / "a.png")
    argv = ["--checkpoint", str(run_dir), "--device", "cpu", "--no-progress", "--tile", "32"]
    assert translate([*argv, "--input", str(tmp_path / "data" / "testA"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: translating " + str(tmp_path / "data" / "testA" / "a.png") in err
    assert "out of memory on cpu running the generator on a batch of 4 at 32x32 (WxH)" in err  # 2x2 tiles
    assert "use --batch-size 1, or a --tile smaller than 32" in err
    assert evaluate(["--checkpoint", str(run_dir), "--dataroot", str(tmp_path / "data"), "--no-fid",
                     "--device", "cpu"]) == 1
    assert "fastcgan-eval: error: out of memory on cpu running the generator on a batch of 1 at 40x36 (WxH)" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("arch", ["resnet_9blocks", "resnet_6blocks", "unet_128", "unet_256", "udacity"])
def test_the_inference_floor_is_below_what_a_forward_holds(arch, tmp_path):
    """Per pixel, the floor (largest convolution's input and output) is at most the channel bound
    that spares the meta forward, and at most what an eager CPU forward really allocates at once
    (measured here with a dispatch mode summing the bytes of the tensors alive)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastcgan.models import generator_size_multiple

    save_generator(_gen(arch, 8), tmp_path / "g.safetensors")
    tr = load(str(tmp_path / "g.safetensors"), device="cpu", backend="torch")
    precise, bound = tr._floor_per_pixel(True), tr._floor_per_pixel(False)
    assert 0 < precise <= bound
    if arch == "resnet_9blocks":  # ngf 8: the first downsampling reads 8 channels at full size, writes 16 at 1/4
        assert precise == (8 + 16 / 4) * 4 and bound == (32 + 32) * 4  # bytes per pixel, fp32 (bound: a 32-ch block)
    side = max(64, generator_size_multiple(arch))

    class Live(TorchDispatchMode):
        """The bytes of the tensors alive at once, at most (storages freed as Python drops them)."""

        def __init__(self):
            super().__init__()
            self.live, self.peak = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    self.live[s.data_ptr()] = (weakref.ref(s), s.nbytes())
            self.live = {k: v for k, v in self.live.items() if v[0]() is not None}
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    import weakref

    x = torch.rand(1, 3, side, side) * 2 - 1
    with torch.inference_mode(), Live() as live:
        tr.runner(x)
    assert precise * side * side <= live.peak, (precise * side * side, live.peak)


def test_an_image_that_cannot_fit_whole_is_refused_before_anything_is_written(run_dir, tmp_path, monkeypatch,
                                                                              capsys):
    """A single image is translated whole without --tile: a 89-Mpx photo asked ~80 GB of a CPU
    (ResNet-9 fp32), and on Linux the OOM killer ended it without a word. The floor of the largest
    image (and of a tile) is checked against the memory there is before anything runs or is
    written. A batch that does not fit runs fewer images at a time (the same outputs); the API
    refuses one image that cannot fit before running it."""
    from PIL import Image

    import fastcgan.devices as devices
    from fastcgan.deploy import runtime
    from fastcgan.translate import main as translate

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (64, 48)).save(src / "big.png")
    Image.new("RGB", (16, 16)).save(src / "small.png")
    tr = load(str(run_dir), device="cpu", batch_size=4)
    one = tr._floor_per_pixel(True) * 64 * 48
    images = [torch.rand(1, 3, 48, 64) * 2 - 1 for _ in range(3)]
    # A small pass (channel bound under SMALL_FORWARD) does not even ask how much memory is free.
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: pytest.fail("asked"))
    whole = tr.translate_batch(images)
    monkeypatch.setattr(runtime, "SMALL_FORWARD", 0)  # these test images are small: checked from here on
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: int(one) - 1)
    argv = ["--checkpoint", str(run_dir), "--device", "cpu", "--no-progress", "--input", str(src)]
    assert translate([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (f"fastcgan-translate: error: {src / 'big.png'}: running the generator on 64x48 (WxH) needs at least "
            "84.0 KiB (its largest convolution's input and output) and this process may allocate 84.0 KiB; use tiles "
            "(--tile 512") in err
    assert not (tmp_path / "out").exists()
    # In tiles the whole image's own buffers stay (fp32 input, output, blend weights: 28 B/px, as
    # much as this tiny generator's floor) beside one 32x32 tile's floor; with that room every file
    # is translated, one tile at a time.
    tiled = tr._floor_per_pixel(True) * 32 * 32 + tr.tiled_image_bytes(48, 64)
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: int(tiled))
    assert translate([*argv, "--output", str(tmp_path / "out"), "--tile", "32"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["big.png", "small.png"]
    # fastcgan-eval judges the test images' headers the same way, before anything is scored.
    from fastcgan.evaluate import main as evaluate

    for split in ("testA", "testB", "testA_truth_B"):  # a target to score against: the generator is AtoB only
        (tmp_path / "data" / split).mkdir(parents=True)
        Image.new("RGB", (64, 48)).save(tmp_path / "data" / split / "big.png")
    ev = ["--checkpoint", str(run_dir), "--dataroot", str(tmp_path / "data"), "--no-fid", "--device", "cpu"]
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: int(one) - 1)
    assert evaluate(ev) == 2
    big = tmp_path / "data" / "testA" / "big.png"
    assert f"{big}: running the generator on 64x48 (WxH) needs" in capsys.readouterr().err
    assert evaluate([*ev, "--tile", "32"]) == 2  # the image's buffers and a tile's floor are more than that
    assert "big.png: the whole 64x48 (WxH) image's float input, output and blend weights take 93.0 KiB, and " in (
        capsys.readouterr().err)
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: int(tiled))
    assert evaluate([*ev, "--tile", "32"]) == 0

    calls = []
    real = tr.runner

    def counted(x):
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(tr, "runner", runtime.CallableRunner(counted, real.device, real.dtype, "counted",
                                                             floor_dtype=real.dtype))
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: int(2 * one))  # room for two at a time
    torch.testing.assert_close(tr.translate_batch(images), whole)
    assert calls == [2, 1]
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: int(one) - 1)
    with pytest.raises(runtime.InferenceMemoryError, match=r"^running the generator on 64x48 \(WxH\) needs at least "
                       r"84\.0 KiB .*; use tiles"):
        tr.translate_batch(images[:1])
    assert calls == [2, 1]  # refused before it ran
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: None)  # unknown: nothing refused
    assert tr.translate_batch(images[:1])[0].shape == (1, 3, 48, 64)
    monkeypatch.undo()  # the real query, turned off by its environment variable (named in the refusals)
    monkeypatch.setattr(runtime, "SMALL_FORWARD", 0)
    monkeypatch.setattr(devices, "host_available_bytes", lambda: 1)
    with pytest.raises(runtime.InferenceMemoryError, match=r"\(FASTCGAN_MEMORY_CHECK=0 runs it anyway\)$"):
        tr.translate_batch(images[:1])
    monkeypatch.setenv("FASTCGAN_MEMORY_CHECK", "0")
    assert tr.translate_batch(images[:1])[0].shape == (1, 3, 48, 64)
    # A recorded config that does not build (an ONNX file's is data) gives no estimate, and refuses nothing.
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: 1)
    odd = load(str(run_dir), device="cpu")
    odd.spec = odd.spec.replace(config={"arch": "resnet_9blocks", "ngf": "many"})
    assert odd._floor_per_pixel(False) is None and odd._floor_per_pixel(True) is None
    odd.check_memory(48, 64)


def test_onnxruntime_out_of_memory_is_said_as_memory(good_onnx, monkeypatch):
    """onnxruntime's allocation failure became "onnxruntime failed on a ... input" (the model blamed,
    exit 2): it is the out-of-memory error that names the size and --tile."""
    from fastcgan.deploy import runtime

    class Fail(Exception):
        __module__ = "onnxruntime.capi.onnxruntime_pybind11_state"

    def no_memory(x):
        raise Fail("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")

    tr = load(str(good_onnx), device="cpu")
    monkeypatch.setattr(tr.runner, "_run", no_memory)
    with pytest.raises(runtime.InferenceMemoryError, match=r"^out of memory on cpu running the generator on a batch "
                       r"of 1 at 32x32 \(WxH\) \(\[ONNXRuntimeError\].*Failed to allocate memory"):
        tr(torch.zeros(1, 3, 32, 32))


def test_the_inference_floor_follows_the_engine(run_dir, good_onnx, monkeypatch):
    """A tile no larger than the image is what runs (a narrow image's tiles are narrow); an engine
    that holds its own memory (onnxruntime's arena, TensorRT's context) gets no floor; a generator
    under bf16 autocast (in-training FID) counts 2 bytes an element."""
    from fastcgan.deploy import runtime
    from fastcgan.evaluate import _translator
    from fastcgan.models import load_generator

    tr = load(str(run_dir), device="cpu", tile=32)
    monkeypatch.setattr(runtime, "SMALL_FORWARD", 0)
    narrow = tr._floor_per_pixel(True) * 16 * 32  # a 16x100 image runs 16x32 tiles
    narrow += tr.tiled_image_bytes(16, 100)  # beside the whole image's own buffers
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: int(narrow))
    tr.check_images([("narrow.png", 16, 100)])
    with pytest.raises(runtime.InferenceMemoryError, match=r"^wide.png: the whole 100x40 \(WxH\) image's "
                       r"float input, output and blend weights take 121\.1 KiB, and running the generator on a tile "
                       r"of 32x32 \(WxH\)"):
        tr.check_images([("narrow.png", 16, 100), ("wide.png", 40, 100)])
    # In tiles, the image that needs the most is judged, not the first: two images larger than the
    # tile on both sides run the same tiles, and the larger one's own buffers are the larger.
    monkeypatch.setattr(runtime, "memory_to_check",
                        lambda device: int(tr._floor_per_pixel(True) * 32 * 32 + tr.tiled_image_bytes(40, 40)))
    tr.check_images([("small.png", 40, 40)])
    with pytest.raises(runtime.InferenceMemoryError, match=r"^huge.png: the whole 400x400 \(WxH\) image's"):
        tr.check_images([("small.png", 40, 40), ("huge.png", 400, 400)])
    # 4 B of fp32 input, output and blend weight a channel, and on a CPU the decoded uint8 image.
    assert tr.tiled_image_bytes(10, 10) == (4 * (3 + 3 + 1) + 3) * 100
    assert load(str(good_onnx), device="cpu")._floor_per_pixel(True) is None
    net = load_generator(str(run_dir))
    fp32 = _translator(net, "cpu", None, 1)._floor_per_pixel(True)
    assert _translator(net, "cpu", torch.bfloat16, 1)._floor_per_pixel(True) * 2 == fp32 == tr._floor_per_pixel(True)


def test_trt_verify_sizes_outside_the_profile_are_refused_not_dropped(capsys):
    """The TensorRT verification kept only the --verify-sizes inside the engine's profile, without
    a word. Checked with the arguments (TensorRT itself needs a GPU)."""
    import argparse

    spec = spec_for_model(_gen("resnet_6blocks", 4))
    shapes = {"min_shape": None, "opt_shape": None, "max_shape": None}
    args = argparse.Namespace(static=None, verify_sizes=[(1, 64, 64), (16, 64, 64)])
    assert "--verify-sizes 16x64x64: outside the TensorRT profile (batch 1-8" in cli._check_profile(args, spec, shapes)
    args.verify_sizes = [(8, 1024, 1024), (1, 8, 8)]
    assert cli._check_profile(args, spec, shapes) is None


def test_trt_profiles_that_cannot_hold_are_refused_before_any_work():
    """The TensorRT profile is checked with the arguments, before the export starts (TensorRT
    itself needs a GPU): a --static model's profile is static at that size (the default one too),
    and min <= opt <= max holds in every dimension, the batch included."""
    import argparse

    from fastcgan.deploy.tensorrt import check_profile

    spec = spec_for_model(_gen("resnet_6blocks", 4))
    static = argparse.Namespace(static=(64, 64), verify_sizes=None)
    assert "static at 64x64" in cli._check_profile(static, spec, {"min_shape": None, "opt_shape": None,
                                                                  "max_shape": (8, 3, 128, 128)})
    assert cli._check_profile(static, spec, {"min_shape": None, "opt_shape": None, "max_shape": None}) is None
    with pytest.raises(ValueError, match="static at 64x64"):
        check_profile(spec.replace(static_hw=(64, 64)), [(1, 3, 64, 64), (1, 3, 64, 64), (8, 3, 128, 128)])
    with pytest.raises(ValueError, match="min <= opt <= max"):
        check_profile(spec, [(4, 3, 64, 64), (1, 3, 64, 64), (8, 3, 64, 64)])
    check_profile(spec, [(1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64)])


def test_translator_inputs_are_taken_as_files_are(run_dir, tmp_path):
    """A NaN (or a [0, 255] float image) ran through and came back as one flat grey image; a PIL
    photo with an EXIF orientation was translated as stored, while the same file through
    fastcgan-translate is translated as displayed."""
    from PIL import Image

    tr = load(str(run_dir), device="cpu")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for bad in (x.clone().index_fill_(3, torch.tensor([5]), float("nan")), x * 127.5 + 127.5, x + 2):
        with pytest.raises(ValueError, match="float image tensors must hold finite values in \\[-1, 1\\]"):
            tr(bad)
    assert tr(x.clamp(-1, 1)).shape == x.shape and tr(x.half()).dtype == torch.float16
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    from fastcgan.data import load_image

    with Image.open(tmp_path / "rot.jpg") as im:
        out = tr(im)
    assert out.size == (20, 40)
    assert np.array_equal(np.asarray(out), tr(load_image(tmp_path / "rot.jpg").permute(1, 2, 0).numpy()))


def test_a_model_in_training_mode_is_translated_in_eval_mode():
    """from_model / the Translator put the generator in eval mode: dropout off (and BatchNorm on
    its inference statistics), so a model handed over straight from training translates
    deterministically."""
    from fastcgan.deploy.runtime import from_model

    torch.manual_seed(0)
    m = build_generator("resnet_6blocks", ngf=4, use_dropout=True).train()
    tr = from_model(m, "cpu")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert not any(mod.training for mod in m.modules())
    torch.testing.assert_close(tr(x), tr(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(tr(x), m(x), rtol=1e-5, atol=1e-5)


def test_report_fails_any_error_over_the_tolerance(capsys):
    shape = (1, 3, 32, 32)
    assert cli._report("onnxruntime", [(shape, 1e-4)], 1e-4)  # at the tolerance: ok
    assert not cli._report("onnxruntime", [(shape, 5e-5), (shape, 2e-4)], 1e-4)  # 2x over: fails
    assert "OVER TOLERANCE" in capsys.readouterr().out


def test_static_verify_shapes_take_batch_two_up_to_the_pixel_limit():
    spec = GeneratorSpec(static_hw=(16, 24))
    assert default_verify_shapes(spec, max_pixels=2 * 16 * 24) == [(1, 16, 24), (2, 16, 24)]
    assert default_verify_shapes(spec, max_pixels=2 * 16 * 24 - 1) == [(1, 16, 24)]
    assert default_verify_shapes(spec) == [(1, 16, 24), (2, 16, 24)]


def _tiny_translator(tmp_path, **kw):
    from fastcgan.deploy import load
    from fastcgan.models import build_generator, save_generator

    torch.manual_seed(0)
    save_generator(build_generator("resnet_6blocks", ngf=4).eval(), tmp_path / "g.safetensors")
    return load(str(tmp_path / "g.safetensors"), device="cpu", **kw)


def test_a_batch_is_checked_as_a_whole_and_an_exact_fit_runs(tmp_path, monkeypatch):
    """Catches: `bound * n * th * tw <= SMALL_FORWARD` -> `bound * th * tw` (a batch of images each
    under the threshold was never checked, so never split), and `per_pixel * th * tw <= room` ->
    `<` (an image whose floor is exactly the room was refused)."""
    from fastcgan.deploy import runtime

    tr = _tiny_translator(tmp_path, batch_size=2)
    bound, one = tr._floor_per_pixel(False) * 48 * 64, tr._floor_per_pixel(True) * 48 * 64
    assert one == int(one)
    monkeypatch.setattr(runtime, "SMALL_FORWARD", int(1.5 * bound))  # one image under it, two over
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: int(one))  # room for exactly one
    calls, real = [], tr.runner
    monkeypatch.setattr(tr, "runner", runtime.CallableRunner(lambda x: calls.append(x.shape[0]) or real(x),
                                                             real.device, real.dtype, "counted",
                                                             floor_dtype=real.dtype))
    tr.translate_batch([torch.rand(1, 3, 48, 64) * 2 - 1] * 2)
    assert calls == [1, 1]


def test_refusals_with_tiles_name_the_tile_and_a_smaller_tile(tmp_path, monkeypatch):
    """Catches: the hint `if tiled or self.tile` -> `if tiled` (with --tile given, an image smaller
    than the tile was told to use "--tile 512"), `tiled=False` in _run_padded (the API's refusal
    of a tile said "on 32x32", not "a tile of 32x32"), and the CUDA wording of the room."""
    from fastcgan.deploy import runtime

    tr = _tiny_translator(tmp_path, tile=32)
    monkeypatch.setattr(runtime, "SMALL_FORWARD", 0)
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: 1)
    with pytest.raises(runtime.InferenceMemoryError,
                       match=r"^running the generator on a tile of 32x32 \(WxH\) needs .*; use a --tile smaller "
                             r"than 32 "):
        tr(torch.rand(1, 3, 48, 64) * 2 - 1)
    with pytest.raises(runtime.InferenceMemoryError,
                       match=r"^running the generator on 16x16 \(WxH\) needs .*; use a --tile smaller than 32 "):
        tr(torch.rand(1, 3, 16, 16) * 2 - 1)
    tr.runner.device = torch.device("cuda")  # only the wording: nothing runs in check_memory
    with pytest.raises(runtime.InferenceMemoryError, match=r"and cuda has 1 B; use"):
        tr.check_memory(16, 16)


def test_the_memory_check_counts_a_tiled_images_buffers_and_says_what_can_help(tmp_path, monkeypatch):
    """Catches (mutation testing): the small-forward shortcut without the image's own buffers (a huge
    image with a small --tile was never checked), the image's buffers over the room hinting at a
    smaller --tile (no tile helps), and a static model told to use --tile (which it refuses)."""
    import dataclasses

    from fastcgan.deploy import runtime

    tr = _tiny_translator(tmp_path, tile=32)
    monkeypatch.setattr(runtime, "SMALL_FORWARD", int(tr._floor_per_pixel(False) * 32 * 32))  # one tile: under it
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: 1)
    with pytest.raises(runtime.InferenceMemoryError, match=r"the whole 400x400 \(WxH\) image's float input"):
        tr.check_memory(400, 400)
    monkeypatch.setattr(runtime, "SMALL_FORWARD", 0)
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: tr.tiled_image_bytes(400, 400) - 1)
    with pytest.raises(runtime.InferenceMemoryError,
                       match=r"use a smaller image \(--load-size\), or a machine with more memory"):
        tr.check_memory(400, 400)
    static = _tiny_translator(tmp_path / "s")
    static.spec = dataclasses.replace(static.spec, static_hw=(32, 32))
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: 1)
    with pytest.raises(runtime.InferenceMemoryError, match=r"use a model exported with a smaller --static size"):
        static.check_memory(16, 16)


def test_unknown_memory_runs_the_whole_batch_and_uint8_maps_to_the_model_range_exactly(tmp_path, monkeypatch):
    """Catches: unknown memory (FASTCGAN_MEMORY_CHECK=0) running a batch one image at a time, and a
    uint8 scale of 1/128 (255 -> 0.992; the pixel tests allow one level of error)."""
    from fastcgan.deploy import runtime

    tr = _tiny_translator(tmp_path, batch_size=4)
    monkeypatch.setattr(runtime, "SMALL_FORWARD", 0)
    monkeypatch.setattr(runtime, "memory_to_check", lambda device: None)
    calls, real = [], tr.runner
    monkeypatch.setattr(tr, "runner", runtime.CallableRunner(lambda x: calls.append(x.shape[0]) or real(x),
                                                             real.device, real.dtype, "counted",
                                                             floor_dtype=real.dtype))
    tr.translate_batch([torch.rand(1, 3, 48, 64) * 2 - 1] * 3)
    assert calls == [3]
    assert torch.equal(tr._uint8_to_model(torch.tensor([[0, 255]], dtype=torch.uint8)), torch.tensor([[-1.0, 1.0]]))


def test_a_bug_outside_onnxruntime_is_not_blamed_on_the_model(good_onnx, monkeypatch):
    """Catches: every exception inside OrtRunner turned into 'onnxruntime failed' (an ArtifactError
    about the model), not only onnxruntime's own."""
    tr = load(good_onnx, device="cpu")

    def bug(x):
        raise KeyError("bug")

    monkeypatch.setattr(tr.runner, "_run", bug)
    with pytest.raises(KeyError, match="bug"):
        tr(torch.zeros(1, 3, 32, 32))


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler while the test runs: a suite started in the background of a
    script inherits SIGINT ignored, and a signal sent to itself would then do nothing."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.usefixtures("python_ctrl_c")
def test_ctrl_c_inside_an_exporter_is_never_taken_for_its_failure(run_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C while torch's dynamo exporter ran came out of it as another error (an AttributeError
    of a half-imported module, a RuntimeError of a dispatch mode left active): the export fell back
    to the TorchScript exporter, wrote the model and exited 0. Now: exit 130, no output, no fallback."""
    import signal

    from fastcgan.deploy import onnx_export

    ran = []

    def exporter(which, *args, **kwargs):
        ran.append(which)
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the KeyboardInterrupt lands inside torch ...
        except KeyboardInterrupt:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from None  # ... which loses it

    monkeypatch.setattr(onnx_export, "_run_exporter", exporter)
    out = tmp_path / "g.onnx"
    assert _export(run_dir, "--onnx", out, "--no-verify") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "falling back" not in err
    assert ran == ["dynamo"] and not out.exists() and _no_temporaries(tmp_path)


@pytest.mark.usefixtures("python_ctrl_c")
def test_an_interrupt_a_command_swallowed_is_still_exit_130(capsys):
    """Whatever the interrupted code did with the KeyboardInterrupt -- swallowed it and returned 0,
    or raised another error -- the command exits 130 with one line; the next call starts afresh."""
    import signal

    from fastcgan._cli import interruptible

    @interruptible("demo")
    def main(how):
        try:
            if how != "clean":
                os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            if how == "other error":
                raise ValueError("not an interrupt, says the library") from None
        return 0

    assert main("swallowed") == 130 and main("other error") == 130
    assert capsys.readouterr().err.count("demo: interrupted") == 2
    assert main("clean") == 0 and capsys.readouterr().err == ""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_an_onnx_graph_with_a_fixed_batch_runs_one_at_a_time_or_is_refused(good_onnx, tmp_path):
    """A graph whose batch is fixed (other tools export batch 1) loaded and failed in onnxruntime at
    the first batch of more than one image (exit 1; a folder half translated). Batch 1 now runs
    one image per call; another fixed batch is refused by name at load."""
    import onnx

    for batch in (1, 2):
        proto = onnx.load(str(good_onnx))
        proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
        proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = batch
        onnx.save(proto, str(tmp_path / f"b{batch}.onnx"))
    tr = load(str(tmp_path / "b1.onnx"), device="cpu", batch_size=8)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.allclose(tr(x), load(str(good_onnx), device="cpu")(x), atol=1e-5)
    with pytest.raises(ArtifactError, match=re.escape("b2.onnx: its input batch is fixed at 2")):
        load(str(tmp_path / "b2.onnx"), device="cpu")
    with pytest.raises(ArtifactError, match="an onnx artifact cannot run with engine='aoti'"):
        load(str(good_onnx), device="cpu", engine="aoti")


def test_the_compiled_engine_traces_the_generator_in_one_graph(monkeypatch):
    """The first forward probed the kernel backends (loading fastcgan._C, a call Dynamo cannot
    trace) inside the compiled code: a graph break and a three-line Dynamo warning. They are probed
    before compiling; here fullgraph=True turns any break into an error."""
    from fastcgan.deploy.runtime import from_model
    from fastcgan.ops import _backends

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", fullgraph=True))
    monkeypatch.setattr(_backends, "_status_cache", {})  # a fresh process: nothing probed yet
    torch._dynamo.reset()
    g = _gen("resnet_6blocks", 4)
    tr = from_model(g, "cpu", compiled=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(tr(x), from_model(g, "cpu")(x), atol=1e-5)
