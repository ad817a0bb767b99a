"""fastcgan-download --pretrained: the released generators, from a local HTTP server (no network),
converted into a folder that translate / export / eval take; bad files leave nothing behind."""

import hashlib
import io
import os

import pytest
import torch
from test_download import _Server
from test_official_checkpoint import official

from fastcgan.data.download import DownloadError, main
from fastcgan.models import load_generator, load_official_generator, read_generator_config
from fastcgan.models import pretrained as pt
from fastcgan.models.io import MAX_WIDTH

pytestmark = pytest.mark.filterwarnings("ignore:.*download is unverified")  # checked in test_download.py


def _pth(sd, legacy=False):
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _resnet(seed=0, ngf=4):
    torch.manual_seed(seed)
    return official("resnet_9blocks", ngf).eval()


def _old_style(sd):
    """As the 2017 releases: InstanceNorm running stats that no current network has."""
    sd = dict(sd)
    sd["model.2.running_mean"], sd["model.2.running_var"] = torch.zeros(4), torch.ones(4)
    return sd


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _get(server, root, name="horse2zebra", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.0)
    kw.setdefault("url", server.base)
    return pt.download_pretrained(name, str(root), **kw)


def _leftovers(root):
    return sorted(f for f in os.listdir(root) if f.startswith(".") or f.endswith((".part", ".source")))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_download_converts_and_the_folder_translates(server, tmp_path, capsys, legacy):
    ref = _resnet()
    data = _pth(_old_style(ref.state_dict()), legacy=legacy)
    server.files["/data/horse2zebra.pth"] = data
    target = _get(server, tmp_path, sha256=hashlib.sha256(data).hexdigest())
    assert target == str(tmp_path / "horse2zebra_pretrained")
    assert sorted(os.listdir(target)) == ["generator_AtoB.safetensors", "latest_net_G.pth"]
    assert (tmp_path / "horse2zebra_pretrained" / "latest_net_G.pth").read_bytes() == data  # the official file
    assert _leftovers(tmp_path) == []
    config = read_generator_config(os.path.join(target, "generator_AtoB.safetensors"))
    assert (config["arch"], config["norm"], config["ngf"], config["use_dropout"]) == ("resnet_9blocks", "instance",
                                                                                     4, False)
    ours = load_generator(target, backend="torch")
    x = torch.rand(2, 3, 32, 40) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)

    # The folder is what translate takes (as a run directory).
    from PIL import Image

    from fastcgan.translate import main as translate

    Image.new("RGB", (40, 32), (200, 30, 90)).save(tmp_path / "horse.png")
    rc = translate(["--checkpoint", target, "--input", str(tmp_path / "horse.png"), "--output",
                    str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    assert rc == 0 and os.listdir(tmp_path / "out")
    # The official file itself is not an artifact translate runs: the error says what to do.
    rc = translate(["--checkpoint", os.path.join(target, "latest_net_G.pth"), "--input", str(tmp_path / "horse.png"),
                    "--output", str(tmp_path / "out2"), "--no-progress"])
    assert rc == 2 and "fastcgan-download NAME --pretrained" in capsys.readouterr().err


def test_pix2pix_model_runs_as_the_official_test(server, tmp_path):
    """edges2shoes is pix2pix only: a U-Net-256 with BatchNorm from the pix2pix server path; the
    converted generator normalises each image with its own statistics, as test.py (no --eval)."""
    torch.manual_seed(1)
    ref = official("unet_256", 2, norm="batch")
    pix2pix = server.base.replace("/data", "/p2p")
    server.files["/p2p/edges2shoes.pth"] = _pth(ref.state_dict())
    assert pt.pretrained_url("edges2shoes", pix2pix) == f"{pix2pix}/edges2shoes.pth"
    assert pt.pretrained_url("edges2shoes").startswith(pt.PIX2PIX_MODEL_URL)
    target = _get(server, tmp_path, "edges2shoes", url=pix2pix)
    config = read_generator_config(os.path.join(target, "generator_AtoB.safetensors"))
    assert (config["arch"], config["norm"], config["bn_inference"]) == ("unet_256", "batch", "per_image")
    ours = load_generator(target, backend="torch")
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.train()(x), atol=1e-5, rtol=1e-5)


def test_names_collections_and_cli(server, tmp_path, capsys):
    assert pt.pretrained_collection("sat2map") == "cyclegan"  # in both: CycleGAN unless --pix2pix
    assert pt.pretrained_collection("sat2map", "pix2pix") == "pix2pix"
    assert pt.pretrained_url("horse2zebra") == f"{pt.CYCLEGAN_MODEL_URL}/horse2zebra.pth"
    with pytest.raises(ValueError, match="unknown pretrained cyclegan model 'horse2zebr'.*valid names"):
        pt.download_pretrained("horse2zebr", str(tmp_path))
    with pytest.raises(ValueError, match="invalid model name"):
        pt.download_pretrained("../x", str(tmp_path), url="http://127.0.0.1:9/x.pth")
    with pytest.raises(ValueError, match="64 hex digits"):
        pt.download_pretrained("horse2zebra", str(tmp_path), sha256="abc")
    assert os.listdir(tmp_path) == []

    assert main(["--pretrained", "--list"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert "style_monet" in listed and "day2night (pix2pix)" in listed and "horse2zebra" in listed
    assert main(["--pretrained", "nope", "--root", str(tmp_path)]) == 2
    assert "unknown pretrained cyclegan model 'nope'" in capsys.readouterr().err

    server.files["/data/monet2photo.pth"] = _pth(_resnet().state_dict())
    rc = main(["--pretrained", "monet2photo", "--root", str(tmp_path), "--url", server.base, "--no-progress"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "monet2photo_pretrained")


class _Evil:
    def __reduce__(self):
        return (open, (os.environ["FASTCGAN_TEST_MARKER"], "w"))


@pytest.mark.parametrize("what", ["html", "code", "unet-for-cyclegan", "nan", "checksum"])
def test_bad_files_leave_nothing(server, tmp_path, monkeypatch, what):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FASTCGAN_TEST_MARKER", str(marker))
    root = tmp_path / "ckpt"
    sha = None
    if what == "html":
        data = b"<html><body>404 moved</body></html>" * 50
    elif what == "code":
        data = _pth({"model.1.weight": _Evil()})
    elif what == "unet-for-cyclegan":
        data = _pth(official("unet_256", 2, norm="batch").state_dict())
    elif what == "nan":
        sd = _resnet().state_dict()
        sd["model.1.weight"][0, 0, 0, 0] = float("nan")
        data = _pth(sd)
    else:
        data, sha = _pth(_resnet().state_dict()), "0" * 64
    server.files["/data/horse2zebra.pth"] = data
    with pytest.raises(DownloadError, match="horse2zebra.pth"):
        _get(server, root, sha256=sha)
    assert not marker.exists()  # tensors only: the pickle's code never ran
    assert not root.exists()  # the folder it made, no model, .part or lock


def test_too_large_is_refused_before_it_is_fetched(server, tmp_path, monkeypatch):
    data = _pth(_resnet().state_dict())
    server.files["/data/horse2zebra.pth"] = data
    monkeypatch.setattr(pt, "MAX_MODEL_BYTES", len(data) - 1)
    with pytest.raises(DownloadError, match=f"larger than {len(data) - 1:,} bytes"):
        _get(server, tmp_path)
    assert os.listdir(tmp_path) == []


def test_existing_folder_is_kept_and_force_replaces_only_on_success(server, tmp_path):
    first = _resnet(seed=0)
    server.files["/data/horse2zebra.pth"] = _pth(first.state_dict())
    target = _get(server, tmp_path)
    server.requests.clear()
    assert _get(server, tmp_path) == target and server.requests == []  # kept, nothing fetched

    server.files["/data/horse2zebra.pth"] = b"not a checkpoint"
    with pytest.raises(DownloadError):
        _get(server, tmp_path, force=True)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():  # the old model is still there, whole
        torch.testing.assert_close(load_generator(target, backend="torch")(x), first(x), atol=1e-6, rtol=1e-6)

    second = _resnet(seed=5)
    server.files["/data/horse2zebra.pth"] = _pth(second.state_dict())
    assert _get(server, tmp_path, force=True) == target
    with torch.no_grad():
        torch.testing.assert_close(load_generator(target, backend="torch")(x), second(x), atol=1e-6, rtol=1e-6)
    assert _leftovers(tmp_path) == []

    other = tmp_path / "other"
    (other / "zebra2horse_pretrained").mkdir(parents=True)
    (other / "zebra2horse_pretrained" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds other files"):
        _get(server, other, "zebra2horse")
    assert os.listdir(other / "zebra2horse_pretrained") == ["notes.txt"]


def test_official_loader_reads_the_widths_from_the_file():
    """ngf / input_nc / output_nc default to the weights' own (export --from-official needed --ngf
    for anything but 64, and could not load a 1-channel checkpoint at all)."""
    torch.manual_seed(0)
    ref = official("resnet_6blocks", 6, input_nc=1, output_nc=2).eval()
    ours = load_official_generator(ref.state_dict(), "resnet_6blocks", backend="torch")
    assert (ours.input_nc, ours.output_nc, ours.ngf) == (1, 2, 6)
    x = torch.rand(1, 1, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)
    unet = official("unet_128", 3, input_nc=3, output_nc=1).eval()
    got = load_official_generator(unet.state_dict(), "unet_128", norm="instance")
    assert (got.input_nc, got.output_nc, got.ngf) == (3, 1, 3)
    with pytest.raises(ValueError, match="expected"):  # given, it must match
        load_official_generator(ref.state_dict(), "resnet_6blocks", ngf=8)

    # A few bytes claiming a huge width are refused before a network of that width is built.
    sd = {k: v for k, v in ref.state_dict().items()}
    sd["model.1.weight"] = torch.zeros(4 * MAX_WIDTH, 1, 1, 1)
    with pytest.raises(ValueError, match=f"ngf={4 * MAX_WIDTH}, outside"):
        load_official_generator(sd, "resnet_6blocks")


def _cut_tar(members):
    """A tar like the CUT repository's ``pretrained_models.tar``: ``{name: bytes | "symlink"}``."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cut_generator(seed=0, antialias=True):
    from test_antialias import _OfficialCUTGenerator

    torch.manual_seed(seed)
    return _OfficialCUTGenerator(4, 9, antialias, antialias).eval()


def test_cut_model_is_read_out_of_the_archive(server, tmp_path):
    """horse2zebra_cut comes out of the CUT archive (``checkpoints/<name>_pretrained/latest_net_G.pth``
    beside the other models) as the anti-aliased generator it is; the archive is not kept."""
    ref, other = _cut_generator(0), _cut_generator(1)
    want = _pth(ref.state_dict())
    server.files["/data/pretrained_models.tar"] = _cut_tar({
        "checkpoints/cat2dog_cut_pretrained/latest_net_G.pth": _pth(other.state_dict()),
        "checkpoints/horse2zebra_cut_pretrained/latest_net_D.pth": b"D" * 100,
        "./checkpoints/horse2zebra_cut_pretrained/latest_net_G.pth": want,
    })
    assert pt.pretrained_collection("horse2zebra_cut") == "cut"
    assert pt.pretrained_url("cat2dog_fastcut") == f"{pt.CUT_MODEL_URL}/pretrained_models.tar"
    target = _get(server, tmp_path, "horse2zebra_cut")
    assert target == str(tmp_path / "horse2zebra_cut_pretrained")  # where the official tar puts it
    assert sorted(os.listdir(target)) == ["generator_AtoB.safetensors", "latest_net_G.pth"]
    assert (tmp_path / "horse2zebra_cut_pretrained" / "latest_net_G.pth").read_bytes() == want
    assert _leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["horse2zebra_cut_pretrained"]
    config = read_generator_config(os.path.join(target, "generator_AtoB.safetensors"))
    assert (config["arch"], config.get("antialias"), config.get("antialias_up")) == ("resnet_9blocks", True, True)
    x = torch.rand(1, 3, 32, 36) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_generator(target, backend="torch")(x), ref.model(x), atol=1e-5, rtol=1e-5)
    # A strided CUT generator (--no_antialias --no_antialias_up) is a CUT model too; the CycleGAN
    # collection takes only the strided one.
    strided = _cut_generator(2, antialias=False)
    server.files["/data/pretrained_models.tar"] = _cut_tar(
        {"checkpoints/cat2dog_fastcut_pretrained/latest_net_G.pth": _pth(strided.state_dict())})
    assert read_generator_config(os.path.join(_get(server, tmp_path, "cat2dog_fastcut"),
                                              "generator_AtoB.safetensors")).get("antialias") is None
    server.files["/data/horse2zebra.pth"] = want
    with pytest.raises(DownloadError, match="not an official cyclegan resnet_9blocks .*antialias=False"):
        _get(server, tmp_path / "c", "horse2zebra")


@pytest.mark.parametrize("what", ["missing", "symlink", "not-a-tar", "truncated", "code", "twice", "gzip",
                                  "int-key"])
def test_bad_cut_archives_leave_nothing(server, tmp_path, monkeypatch, what):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FASTCGAN_TEST_MARKER", str(marker))
    member = "checkpoints/horse2zebra_cut_pretrained/latest_net_G.pth"
    good = _pth(_cut_generator().state_dict())
    data = {
        "missing": lambda: _cut_tar({"checkpoints/cat2dog_cut_pretrained/latest_net_G.pth": good}),
        "symlink": lambda: _cut_tar({member: "symlink"}),
        "not-a-tar": lambda: b"<html>moved</html>" * 100,
        "truncated": lambda: _cut_tar({member: good})[: 512 + len(good) // 2],
        "code": lambda: _cut_tar({member: _pth({"model.1.weight": _Evil()})}),
        "twice": lambda: _cut_tar({member: good, "x/" + member: good}),
        "gzip": lambda: __import__("gzip").compress(_cut_tar({member: good})),  # the official one is plain
        "int-key": lambda: _cut_tar({member: _pth({**_cut_generator().state_dict(), 7: torch.zeros(1)})}),
    }[what]()
    server.files["/data/pretrained_models.tar"] = data
    root = tmp_path / "ckpt"
    with pytest.raises(DownloadError, match="pretrained_models.tar"):
        _get(server, root, "horse2zebra_cut")
    assert not marker.exists()
    assert not root.exists()


def test_cut_names_and_cli(server, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown pretrained cyclegan model 'horse2zebra_cutt'.*CUT: horse2zebra_cut"):
        pt.download_pretrained("horse2zebra_cutt", str(tmp_path))
    with pytest.raises(ValueError, match="unknown pretrained CUT model 'x'"):  # the name picks the member
        pt.download_pretrained("x", str(tmp_path), url="http://127.0.0.1:9/a.tar", collection="cut")
    assert main(["--pretrained", "--list"]) == 0
    assert "horse2zebra_fastcut (CUT)" in capsys.readouterr().out.split("\n")
    server.files["/data/pretrained_models.tar"] = _cut_tar(
        {"checkpoints/cityscapes_cut_pretrained/latest_net_G.pth": _pth(_cut_generator().state_dict())})
    rc = main(["--pretrained", "cityscapes_cut", "--root", str(tmp_path), "--url", server.base + "/pretrained_models.tar",
               "--no-progress"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "cityscapes_cut_pretrained")


def test_cut_member_is_never_written_through_a_planted_link(server, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    root = tmp_path / "ckpt"
    root.mkdir()
    os.symlink(victim, root / "horse2zebra_cut_pretrained.pth.part")
    server.files["/data/pretrained_models.tar"] = _cut_tar(
        {"checkpoints/horse2zebra_cut_pretrained/latest_net_G.pth": _pth(_cut_generator().state_dict())})
    target = _get(server, root, "horse2zebra_cut")
    assert victim.read_text() == "mine" and sorted(os.listdir(root)) == ["horse2zebra_cut_pretrained"]
    assert os.path.isfile(os.path.join(target, "latest_net_G.pth"))


def test_crafted_official_files_are_refused_before_a_network_is_built(resnet_builds):
    """A few bytes whose first weight claims a wide (allowed) network, with the other keys stubbed,
    are compared with the network on the meta device: refused, never allocated. A key that is not
    a name is a ValueError (the callers' "not an official generator"), not a crash."""
    sd = dict(_resnet().state_dict())
    sd["model.1.weight"] = torch.zeros(256, 3, 7, 7)
    resnet_builds.clear()  # _resnet() built one
    with pytest.raises(ValueError, match="has shape"):
        load_official_generator(sd, "resnet_9blocks")
    assert resnet_builds == ["meta"]
    with pytest.raises(ValueError, match="key 7 is not a name"):
        load_official_generator({**_resnet().state_dict(), 7: torch.zeros(1)}, "resnet_9blocks")


def test_views_claiming_more_than_they_hold_are_refused(tmp_path):
    """torch.save keeps a stride-0 view as it is: a small official file whose tensors have the full
    shapes of a wide network (and so pass every shape check) is refused for what they claim."""
    with torch.device("meta"):
        wide = official("resnet_9blocks", 256)
    sd = {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in wide.state_dict().items()}
    torch.save(sd, tmp_path / "wide.pth")
    assert (tmp_path / "wide.pth").stat().st_size < 1 << 20
    with pytest.raises(ValueError, match="claim .* bytes more than they hold"):
        load_official_generator(tmp_path / "wide.pth", "resnet_9blocks")


def test_cut_archive_headers_are_bounded_and_the_folder_is_readable(server, tmp_path, monkeypatch):
    """Extended tar headers count against one budget for the archive (tarfile keeps them in memory);
    the installed folder has the umask's mode, not mkdtemp's 0700."""
    import tarfile

    from fastcgan.data import download as dl

    member = "checkpoints/horse2zebra_cut_pretrained/latest_net_G.pth"
    good = _pth(_cut_generator().state_dict())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(4):
            info = tarfile.TarInfo(f"pad{i}")
            info.pax_headers = {"comment": "x" * 3000}
            tf.addfile(info, io.BytesIO(b""))
        info = tarfile.TarInfo(member)
        info.size = len(good)
        tf.addfile(info, io.BytesIO(good))
    server.files["/data/pretrained_models.tar"] = buf.getvalue()
    monkeypatch.setattr(dl, "MAX_TAR_HEADERS", 8000)
    with pytest.raises(DownloadError, match="not a valid tar archive: extended headers of more than 8,000 bytes"):
        _get(server, tmp_path / "a", "horse2zebra_cut")
    monkeypatch.setattr(dl, "MAX_TAR_HEADERS", 64 << 20)
    old = os.umask(0o022)
    try:
        target = _get(server, tmp_path / "b", "horse2zebra_cut")
    finally:
        os.umask(old)
    assert os.stat(target).st_mode & 0o777 == 0o755
