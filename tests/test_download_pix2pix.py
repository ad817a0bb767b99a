"""fastcgan-download for the official pix2pix datasets (tar.gz of train/ val/ test/ pair folders):
the same resume / checksum / safe-extraction behaviour as the CycleGAN zips, against a local server."""

import hashlib
import io
import os
import tarfile
import types

import pytest
from test_download import _Server

from fastcgan.data import download as dl
from fastcgan.data.download import ChecksumError, DownloadError, download_dataset, main


def _tgz(members, links=(), level=9):
    """A tar.gz of ``members``; ``level`` 0 stores the bytes as they are in the deflate stream."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=level) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


PAYLOAD = {
    "facades/train/1.jpg": os.urandom(50_000),
    "facades/val/1.jpg": os.urandom(2_000),
    "facades/test/1.jpg": os.urandom(2_000),
}
TGZ = _tgz(PAYLOAD)
SHA = hashlib.sha256(TGZ).hexdigest()


@pytest.fixture
def server():
    s = _Server()
    s.files["/data/facades.tar.gz"] = TGZ
    s.files["/data/edges2shoes.tar.gz"] = _tgz({"edges2shoes/train/1_AB.jpg": b"x" * 3000})
    yield s
    s.close()


def _leftovers(root):
    return [f for f in os.listdir(root) if f.startswith(".") or f.endswith(".part")]


def test_urls_and_collections(monkeypatch):
    assert dl.dataset_url("edges2shoes") == f"{dl.PIX2PIX_BASE_URL}/edges2shoes.tar.gz"
    assert dl.PIX2PIX_BASE_URL == "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets"
    assert dl.dataset_url("facades").endswith("/cyclegan/datasets/facades.zip")  # the unpaired one
    assert dl.dataset_url("facades", collection="pix2pix") == f"{dl.PIX2PIX_BASE_URL}/facades.tar.gz"
    monkeypatch.setenv("FASTCGAN_PIX2PIX_URL", "http://mirror/p2p")
    assert dl.dataset_url("night2day") == "http://mirror/p2p/night2day.tar.gz"
    assert set(dl.PIX2PIX_DATASETS) == {
        "facades", "cityscapes", "maps", "edges2shoes", "edges2handbags", "night2day"
    }


def test_download_resume_verify_extract(server, tmp_path):
    server.drop_first = 1  # the first transfer breaks half way: the second resumes with Range
    target = download_dataset("facades", str(tmp_path), url=server.base, sha256=SHA, progress=False,
                              backoff=0.0, collection="pix2pix")
    assert target == str(tmp_path / "facades")
    assert sorted(os.listdir(target)) == ["test", "train", "val"]
    with open(os.path.join(target, "train", "1.jpg"), "rb") as fh:
        assert fh.read() == PAYLOAD["facades/train/1.jpg"]
    ranges = [r for p, r in server.requests if p.endswith(".tar.gz")]
    assert ranges[0] is None and 0 < int(ranges[1].split("=")[1].rstrip("-")) < len(TGZ)
    assert _leftovers(tmp_path) == []
    # The unpaired facades may not be "found" in the pix2pix folder, nor the reverse.
    with pytest.raises(FileExistsError, match="paired pix2pix layout"):
        download_dataset("facades", str(tmp_path), url=server.base, progress=False)


def test_pix2pix_only_names_need_no_flag_and_unverified_warns(server, tmp_path, capsys):
    with pytest.warns(UserWarning, match="unverified"):
        target = download_dataset("edges2shoes", str(tmp_path), url=server.base, progress=False)
    assert os.listdir(os.path.join(target, "train")) == ["1_AB.jpg"]
    rc = main(["facades", "--pix2pix", "--root", str(tmp_path / "cli"), "--url", server.base,
               "--sha256", SHA, "--no-progress"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "cli" / "facades")


def test_checksum_mismatch_corrupt_and_unsafe_archives(server, tmp_path):
    with pytest.raises(ChecksumError, match="facades.tar.gz"):
        download_dataset("facades", str(tmp_path), url=server.base, sha256="ab" * 32, progress=False,
                         collection="pix2pix")
    assert os.listdir(tmp_path) == []
    server.files["/data/facades.tar.gz"] = TGZ[: len(TGZ) // 2] + bytes(len(TGZ) - len(TGZ) // 2)
    with pytest.warns(UserWarning), pytest.raises(DownloadError, match="not a valid tar.gz"):
        download_dataset("facades", str(tmp_path), url=server.base, progress=False, collection="pix2pix")
    assert os.listdir(tmp_path) == []
    for evil in (_tgz({"facades/train/ok.jpg": b"1", "../escaped.txt": b"x"}),
                 _tgz({"facades/train/ok.jpg": b"1"}, links=[("facades/train/l.jpg", "/etc/passwd")])):
        server.files["/data/facades.tar.gz"] = evil
        with pytest.raises(DownloadError, match="refusing"):
            download_dataset("facades", str(tmp_path), url=server.base, progress=False, collection="pix2pix",
                             sha256=hashlib.sha256(evil).hexdigest())
        assert os.listdir(tmp_path) == [] and not os.path.exists(tmp_path.parent / "escaped.txt")


@pytest.mark.parametrize("args, said", [(["facades"], "dataset"), (["facades_label2photo", "--pretrained"], "model"),
                                        (["facades", "--pix2pix"], None), (["horse2zebra"], None)])
def test_a_name_both_collections_have_says_which_it_fetches(monkeypatch, tmp_path, capsys, args, said):
    """facades / maps (datasets) and sat2map / map2sat / facades_label2photo (models) exist in both
    collections; the CycleGAN one was fetched without a word when --pix2pix was left out."""
    from fastcgan.models import pretrained

    got = []
    for mod, fn in ((dl, "download_dataset"), (pretrained, "download_pretrained")):
        monkeypatch.setattr(mod, fn, lambda name, root, collection=None, **kw: got.append(collection) or root)
    assert main([*args, "--root", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert got == ["pix2pix" if "--pix2pix" in args else None]
    if said:
        assert f"{args[0]} is a CycleGAN and a pix2pix {said}: fetching the CycleGAN one (--pix2pix" in err
    else:
        assert "fetching the CycleGAN one" not in err


def test_names(tmp_path, capsys):
    with pytest.raises(ValueError, match="license"):
        download_dataset("cityscapes", str(tmp_path), collection="pix2pix")
    with pytest.raises(ValueError, match="unknown pix2pix dataset 'horse2zebra'"):
        download_dataset("horse2zebra", str(tmp_path), collection="pix2pix")
    assert main(["--list"]) == 0
    assert "edges2handbags (pix2pix)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # --root "$UNSET": said, not the default ./datasets instead
        main(["facades", "--root", ""])
    assert e.value.code == 2 and "--root '': name a folder" in capsys.readouterr().err


def test_tar_bomb_is_refused_before_anything_is_written(server, tmp_path):
    bomb = _tgz({"facades/train/1.jpg": b"\0" * (64 << 20)})
    assert len(bomb) < 1 << 20
    server.files["/data/facades.tar.gz"] = bomb
    root = tmp_path / "root"
    with pytest.raises(dl.DownloadError, match="decompression bomb"):
        download_dataset("facades", str(root), url=server.base, sha256=hashlib.sha256(bomb).hexdigest(),
                         progress=False, backoff=0.0, collection="pix2pix")
    assert not root.exists()  # nor the folder it made


def test_huge_extended_tar_header_is_refused_unread(server, tmp_path):
    """A pax header claiming 2 GiB (a few KB of gzip) would be decompressed into memory whole by
    tarfile: refused from its size, before it is read."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 2 << 30
    raw.write(header.tobuf(format=tarfile.USTAR_FORMAT))
    raw.write(b"\0" * (1 << 20))  # the start of the "header" (never read)
    data = gzip.compress(raw.getvalue())
    assert len(data) < 1 << 20
    server.files["/data/facades.tar.gz"] = data
    root = tmp_path / "root"
    with pytest.raises(dl.DownloadError, match=r"not a valid tar\.gz archive: an extended header of 2,147,483,648"):
        download_dataset("facades", str(root), url=server.base, sha256=hashlib.sha256(data).hexdigest(),
                         progress=False, backoff=0.0, collection="pix2pix")
    assert not root.exists()


@pytest.mark.parametrize("form", ["gnu", "pax-1.0"])
def test_sparse_tar_members_are_refused_before_their_block_maps_are_read(server, tmp_path, form):
    """A sparse member's block map is read into memory as long as the archive says: a 3.5 MB
    gzip of one GNU sparse header and 2 million extension blocks grew past 6 GB in tarfile's
    next(), then spun for minutes. No dataset archive holds a sparse file: refused, nothing written."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    if form == "gnu":
        member = tarfile.TarInfo("facades/train/1.jpg")
        member.type = tarfile.GNUTYPE_SPARSE
        block = bytearray(member.tobuf(format=tarfile.GNU_FORMAT))
        block[482] = 1  # "isextended": extension blocks of 21 (offset, size) pairs follow
        block[148:156] = b"        "
        block[148:156] = b"%06o\0 " % sum(block)
        extension = bytearray(512)
        extension[504] = 1  # and another one after it, 2,000 times (the audit's archive: 2 million)
        raw.write(bytes(block) + bytes(extension) * 2000)
    else:
        pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "facades/train/1.jpg",
               "GNU.sparse.realsize": "1"}
        member = tarfile.TarInfo("facades/train/GNUSparseFile.0/1.jpg")
        member.size, member.pax_headers = 512 * 2000, pax
        raw.write(member.tobuf(format=tarfile.PAX_FORMAT))
        raw.write(b"999999999999\n" + b"\0" * (512 * 2000 - 13))  # the map's entry count, then its "entries"
    raw.write(b"\0" * 1024)
    data = gzip.compress(raw.getvalue())
    server.files["/data/facades.tar.gz"] = data
    root = tmp_path / "root"
    refused = r"not a valid tar\.gz archive: sparse member 'facades/train/(GNUSparseFile\.0/)?1\.jpg'"
    with pytest.raises(dl.DownloadError, match=refused):
        download_dataset("facades", str(root), url=server.base, sha256=hashlib.sha256(data).hexdigest(),
                         progress=False, backoff=0.0, collection="pix2pix")
    assert not root.exists()


def test_a_global_tar_header_counts_once_per_member(server, tmp_path):
    """tarfile copies the global pax headers into every member: 880 KB of them (under the 1 MiB
    limit of one header) in a 185 KB archive of 1,000 members took 2.6 GB. A global header is at
    most 64 KiB and counts against the 64 MiB budget once per member; git archive's (a commit
    id) stays fine."""
    import io
    import tarfile

    def archive(comment: str, members: int) -> bytes:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": comment}) as tf:
            for i in range(members):
                info = tarfile.TarInfo(f"facades/train/{i}.jpg")
                tf.addfile(info, io.BytesIO(b""))
        return raw.getvalue()

    root = tmp_path / "root"
    for data, said in ((archive("x" * (65 << 10), 1), "a global header of 66,"),
                       (archive("x" * (60 << 10), 1200), "extended headers of more than 67,108,864 bytes in all")):
        server.files["/data/facades.tar.gz"] = data
        with pytest.raises(dl.DownloadError, match=f"not a valid tar\\.gz archive: {said}"):
            download_dataset("facades", str(root), url=server.base, sha256=hashlib.sha256(data).hexdigest(),
                             progress=False, backoff=0.0, collection="pix2pix")
        assert not root.exists()
    with tarfile.open(fileobj=io.BytesIO(archive("a" * 40, 1200)), tarinfo=dl.BoundedTarInfo) as tf:
        assert len(tf.getmembers()) == 1200  # a git archive's global header


def test_archive_that_does_not_fit_on_the_disk_is_refused_before_extracting(server, tmp_path, monkeypatch):
    """An archive whose files need more room than the disk has free is refused with the numbers,
    before anything is extracted (else it fails half way, leaving a partial dataset)."""
    small = _tgz({"facades/train/1.jpg": b"\0" * 300_000, "facades/test/1.jpg": b"\0" * 10})
    assert len(small) < 10_000  # the download itself fits in the 100 kB "free"
    server.files["/data/facades.tar.gz"] = small
    real = dl.shutil.disk_usage
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: types.SimpleNamespace(
        total=real(p).total, used=real(p).total - 100_000, free=100_000))
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="to extract"):
        download_dataset("facades", str(root), url=server.base, sha256=hashlib.sha256(small).hexdigest(),
                         progress=False, backoff=0.0, collection="pix2pix")
    assert not (root / "facades").exists()


@pytest.mark.parametrize("damage", ["flipped byte", "flipped crc", "cut trailer"])
def test_a_corrupt_or_cut_tar_gz_is_refused_by_its_gzip_crc(server, tmp_path, damage):
    """The tar reader stops at the tar's end-of-archive block, before the gzip trailer: a flipped
    byte in an image, a flipped CRC or a download cut in its last bytes installed, exit 0 (the
    README promised the gzip CRC catches corruption)."""
    # Stored (level 0): a flipped byte changes only that byte, and only the gzip CRC-32 can tell.
    good = _tgz({"facades/train/1.jpg": b"IMAGEDATA" * 2000, "facades/test/1.jpg": b"T" * 100}, level=0)
    bad = bytearray(good)
    if damage == "flipped byte":
        i = bytes(bad).index(b"IMAGEDATA")
        bad[i + 5] ^= 0x01
    elif damage == "flipped crc":
        bad[-8] ^= 0x01
    else:
        bad = bad[:-5]
    server.files["/data/facades.tar.gz"] = bytes(bad)
    with pytest.warns(UserWarning), pytest.raises(DownloadError, match="not a valid tar.gz archive"):
        download_dataset("facades", str(tmp_path), url=server.base, progress=False, collection="pix2pix")
    assert os.listdir(tmp_path) == []
    server.files["/data/facades.tar.gz"] = good  # the same archive intact installs
    with pytest.warns(UserWarning):
        download_dataset("facades", str(tmp_path), url=server.base, progress=False, collection="pix2pix")
    assert (tmp_path / "facades" / "train" / "1.jpg").read_bytes() == b"IMAGEDATA" * 2000
