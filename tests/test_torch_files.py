"""fastcgan.models.torch_files: what torch.load(weights_only=True) is allowed to read. It builds
whatever a file describes (deflated zip members inflated in memory, ~230 bytes of objects per byte
of pickle), so a file's layout and pickle sizes are checked first, on the open file it then reads."""

import io
import os
import pickle
import struct

import pytest
import torch

from fastcgan.models import build_discriminator, load_official_state_dict
from fastcgan.models.torch_files import MAX_PICKLE_BYTES, TorchFileRefused, load_torch_file, torch_file_problem


def _legacy(obj, path, **kw):
    torch.save(obj, path, _use_new_zipfile_serialization=False, **kw)
    return path


def test_archives_torch_load_reads_differently_than_zipfile_are_refused(tmp_path):
    """torch.load's zip reader (miniz) finds the central directory by the last end record and the
    ZIP64 record its locator names; Python's zipfile by other rules. Any layout torch.save never
    writes is refused, so no reader's view can hide a deflated member; genuine files (both formats)
    load."""
    torch.save({"w": torch.ones(64, 64), "n": torch.tensor(7)}, tmp_path / "ok.pth")
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch_file_problem(tmp_path / "ok.pth") is None
    assert torch_file_problem(tmp_path / "legacy.pth") is None
    raw = (tmp_path / "ok.pth").read_bytes()
    end = len(raw) - 22
    locator, zip64 = end - 20, end - 20 - 56
    cd_off = struct.unpack("<Q", raw[zip64 + 48:zip64 + 56])[0]
    first_local = 0
    variants = {
        "gap before the end records": raw[:zip64] + b"\0" * 64 + raw[zip64:],
        "trailing bytes": raw + b"\0" * 8,
        "a comment": raw[:-2] + struct.pack("<H", 3) + b"abc",
        "ZIP64 locator elsewhere": raw[:locator + 8] + struct.pack("<Q", 0) + raw[locator + 16:],
        "deflated in the directory": raw[:cd_off + 10] + struct.pack("<H", 8) + raw[cd_off + 12:],
        "deflated in the local header": raw[:first_local + 8] + struct.pack("<H", 8) + raw[first_local + 10:],
        "truncated": raw[: len(raw) // 2],
    }
    for what, data in variants.items():
        (tmp_path / "x.pth").write_bytes(data)
        assert torch_file_problem(tmp_path / "x.pth"), what


def test_legacy_files_load(tmp_path):
    """Official releases before PyTorch 1.6 are in the legacy format (torch.save's own pickle
    protocol 2: torch's weights_only unpickler reads no other in it)."""
    from fastcgan.models import official_state_dict

    d, back = build_discriminator("basic", 3, ndf=4), build_discriminator("basic", 3, ndf=4)
    _legacy(official_state_dict(d), tmp_path / "latest_net_D_A.pth")
    assert torch_file_problem(tmp_path / "latest_net_D_A.pth") is None
    back.load_state_dict(load_official_state_dict(tmp_path / "latest_net_D_A.pth", back))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in d.state_dict().items())


def test_legacy_pickles_over_the_limit_are_refused_unbuilt(tmp_path, monkeypatch):
    """The legacy format is five pickles then raw data: their size is not in any header, so they
    are walked (not built); a structure over MAX_PICKLE_BYTES is refused as the zip format's is."""
    _legacy({"x": list(range(MAX_PICKLE_BYTES // 4))}, tmp_path / "big.pth")
    assert os.path.getsize(tmp_path / "big.pth") > MAX_PICKLE_BYTES
    built = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: built.append(a))
    with pytest.raises(TorchFileRefused, match=r"big.pth: not a file torch.save writes \(its structure is over"):
        load_torch_file(str(tmp_path / "big.pth"))
    with pytest.raises(ValueError, match="its structure is over"):
        load_official_state_dict(tmp_path / "big.pth", build_discriminator("basic", 3, ndf=4))
    assert built == []
    monkeypatch.undo()
    _legacy({"x": list(range(MAX_PICKLE_BYTES // 16))}, tmp_path / "ok.pth")  # ~1 MB: below the limit
    assert load_torch_file(str(tmp_path / "ok.pth"))["x"][-1] == MAX_PICKLE_BYTES // 16 - 1


def test_files_that_are_not_torch_files_are_refused_before_unpickling(tmp_path, monkeypatch):
    """torch.load reads a legacy file's first pickle before it checks that it is the magic number: a
    plain pickle of any size was built in full first."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    cases = {
        "plain.pkl": pickle.dumps({"w": list(range(100))}),
        "notes.txt": b"hello world\n",
        "empty.pth": b"",
        "wrong-protocol.pth": pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(999, 2),
        "a-bigger-plain.pkl": pickle.dumps([[]] * (MAX_PICKLE_BYTES // 2), 2),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TorchFileRefused, match=f"{name}: (not a file torch.save writes|an empty file)"):
            load_torch_file(str(tmp_path / name))


@pytest.mark.parametrize("mmap", [False, True])
def test_the_checked_file_is_the_file_read(tmp_path, monkeypatch, mmap):
    """A file swapped in between the check and the load is not the one read: both read one open file
    (with mmap, through /proc/self/fd where there is one)."""
    import fastcgan.models.torch_files as tf

    torch.save({"w": torch.ones(8)}, tmp_path / "good.pth")
    torch.save({"w": torch.full((8,), 7.0)}, tmp_path / "other.pth")
    check = tf.torch_file_problem

    def check_then_swap(fh):
        why = check(fh)
        os.replace(tmp_path / "other.pth", tmp_path / "good.pth")
        return why

    monkeypatch.setattr(tf, "torch_file_problem", check_then_swap)
    if mmap and not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd: torch maps the path")
    assert torch.equal(load_torch_file(str(tmp_path / "good.pth"), mmap=mmap)["w"], torch.ones(8))
    assert torch.equal(torch.load(tmp_path / "good.pth", weights_only=True)["w"], torch.full((8,), 7.0))


def test_any_open_binary_file_is_checked(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    buf = io.BytesIO((tmp_path / "ok.pth").read_bytes())
    assert torch_file_problem(buf) is None
    assert "compressed" not in (torch_file_problem(io.BytesIO(buf.getvalue()[:100])) or "")
    assert torch_file_problem(tmp_path / "missing.pth").startswith("cannot be read")


def _long1(n):
    b = pickle.encode_long(n)
    return b"\x8a" + bytes([len(b)]) + b


_MAGIC, _NONE = pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2), b"\x80\x02N."


def _zip_with_structure(pkl, path):
    """A torch.save archive whose structure pickle is ``pkl`` (stored, as torch.save writes it)."""
    import zipfile

    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as z:
        for info in zin.infolist():
            z.writestr(info.filename, pkl if info.filename.endswith("/data.pkl") else zin.read(info.filename))
    return path


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_structures_naming_what_no_checkpoint_holds_are_refused(tmp_path, monkeypatch):
    """torch's weights_only unpickler allows bytearray(N) (a 62-byte file asked for 2 GiB) and a
    rebuild that converts a stride-0 view into a full tensor (1.8 KB -> 2 GiB): only the globals a
    state dict or checkpoint names pass, in both formats."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    bytearray_pkl = b"\x80\x02cbuiltins\nbytearray\n" + _long1(2**31 - 1) + b"\x85R."
    (tmp_path / "a.pth").write_bytes(_MAGIC + bytearray_pkl + _NONE + pickle.dumps([], 2))
    _zip_with_structure(bytearray_pkl, tmp_path / "b.pth")
    monkeypatch.undo()
    view = torch.zeros(1).expand(2**28)
    expand = _Reduce(torch._utils._rebuild_device_tensor_from_cpu_tensor, view, torch.float64, "cpu", False)
    torch.save({"w": expand}, tmp_path / "c.pth")
    _legacy({"w": expand}, tmp_path / "d.pth")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    for name, named in (("a", "builtins.bytearray"), ("b", "builtins.bytearray"),
                        ("c", "_rebuild_device_tensor_from_cpu_tensor"), ("d", "_rebuild_device_tensor_from_cpu")):
        with pytest.raises(TorchFileRefused, match=f"structure names .*{named}"):
            load_torch_file(str(tmp_path / f"{name}.pth"))


def test_keys_that_could_all_hash_alike_are_refused(tmp_path):
    """Int keys k * (2**61 - 1) share one hash: each insert compared with every earlier key (300k
    of them, 3.9 MB, took 454 s). Such keys need big ints or floats; a checkpoint holds neither in
    number."""
    from fastcgan.models.torch_files import MAX_BIG_INTS

    def keys(n):
        return b"\x80\x02}(" + b"".join(_long1(k * (2**61 - 1)) + b"N" for k in range(1, n + 1)) + b"u."

    (tmp_path / "a.pth").write_bytes(_MAGIC + _NONE + keys(MAX_BIG_INTS + 1) + pickle.dumps([], 2))
    _zip_with_structure(keys(MAX_BIG_INTS + 1), tmp_path / "b.pth")
    for name in "ab":
        assert f"{MAX_BIG_INTS + 1:,} integers of 2**32 or more" in torch_file_problem(tmp_path / f"{name}.pth")
    _zip_with_structure(keys(MAX_BIG_INTS), tmp_path / "ok.pth")
    assert len(load_torch_file(str(tmp_path / "ok.pth"))) == MAX_BIG_INTS


def test_zip_member_names_are_compared_as_torch_reads_them(tmp_path):
    """torch's zip reader finds ``data.pkl`` whatever its case: an 8 MiB ``DATA.PKL`` passed the
    size limit (1.9 GiB built); two names that differ only in case are refused."""
    import zipfile

    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as zin:
        items = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]
    big = b"\x80\x02](" + b"\x8f" * (MAX_PICKLE_BYTES + 16) + b"e."  # 4 MiB of empty sets
    for what, members in (("is 4,194,", [(n.replace("data.pkl", "DATA.PKL"), big if n.endswith("data.pkl") else d)
                                         for n, d in items]),
                          ("differ only in case", items + [(items[0][0].upper(), items[0][1])])):
        with zipfile.ZipFile(tmp_path / "x.pth", "w") as z:
            for n, d in members:
                z.writestr(n, d)
        assert what in torch_file_problem(tmp_path / "x.pth")


def test_legacy_files_are_read_as_streams(tmp_path, monkeypatch):
    """torch.load probes a legacy file for the pre-0.4 tar format first when it has a fileno, and
    tarfile's header parser is quadratic before Python 3.11.10: legacy files go to torch.load
    without one (they load the same), and are never memory-mapped."""
    d = build_discriminator("basic", 3, ndf=4)
    _legacy(d.state_dict(), tmp_path / "d.pth")
    real, seen = torch.load, []

    def spy(f, *a, **k):
        seen.append(f)
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", spy)
    back = load_torch_file(str(tmp_path / "d.pth"))
    assert not hasattr(seen[0], "fileno") and all(torch.equal(back[k], v) for k, v in d.state_dict().items())
    with pytest.raises(TorchFileRefused, match="legacy-format .* only the zip format"):
        load_torch_file(str(tmp_path / "d.pth"), mmap=True)
