"""fastcgan-download against a local HTTP server on 127.0.0.1 (no network needed)."""

import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from fastcgan.data import download as dl
from fastcgan.data.download import ChecksumError, DownloadError, download_dataset, main

NAME = "horse2zebra"


def _zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# Incompressible payload so "half way" is half of the bytes on the wire.
PAYLOAD = {
    f"{NAME}/trainA/a 1.jpg": os.urandom(40_000),
    f"{NAME}/trainB/b.jpg": os.urandom(30_000),
    f"{NAME}/testA/ä.jpg": os.urandom(1000),
    f"{NAME}/testB/b.jpg": os.urandom(1000),
}
ZIP = _zip_bytes(PAYLOAD)
SHA = hashlib.sha256(ZIP).hexdigest()


class _Server:
    """Files by URL path; options to drop the connection part-way or to ignore Range."""

    def __init__(self):
        self.files = {}
        self.requests = []  # (path, Range header or None)
        self.drop_first = 0  # drop this many full-body responses half way
        self.ignore_range = False
        self.etags = {}  # path -> strong ETag: sent, and an If-Range that differs gets the whole file
        self.no_length = False  # answer without Content-Length (the body ends when the connection closes)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                etag = outer.etags.get(self.path)
                if_range = self.headers.get("If-Range")
                if rng and if_range is not None and if_range != etag:
                    rng = None  # RFC 9110: the representation changed, send all of it
                if rng and not outer.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                if etag:
                    self.send_header("ETag", etag)
                if outer.no_length:
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.drop_first > 0 and len(body) > 1000:
                    outer.drop_first -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    s.files[f"/data/{NAME}.zip"] = ZIP
    yield s
    s.close()


def _get(root, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.0)
    return download_dataset(NAME, str(root), **kw)


def _check_extracted(target):
    for member, data in PAYLOAD.items():
        with open(os.path.join(os.path.dirname(target), member), "rb") as fh:
            assert fh.read() == data


def _leftovers(root):
    return [f for f in os.listdir(root) if f.startswith(".") or f.endswith((".part", ".source"))]


def test_download_verify_extract(server, tmp_path):
    target = _get(tmp_path, url=server.base, sha256=SHA)
    assert target == str(tmp_path / NAME)
    _check_extracted(target)
    assert sorted(os.listdir(target)) == ["testA", "testB", "trainA", "trainB"]
    assert _leftovers(tmp_path) == []
    n = len(server.requests)
    assert _get(tmp_path, url=server.base, sha256=SHA) == target  # present: no new request
    assert len(server.requests) == n


def test_published_checksum_is_used(server, tmp_path):
    server.files[f"/data/{NAME}.zip.sha256"] = f"{SHA}  {NAME}.zip\n".encode()
    _check_extracted(_get(tmp_path, url=server.base))
    assert (f"/data/{NAME}.zip.sha256", None) in server.requests


def test_published_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.files[f"/data/{NAME}.zip.sha256"] = ("0" * 64).encode()
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        _get(tmp_path, url=server.base)
    assert not os.path.exists(tmp_path / NAME) and _leftovers(tmp_path) == []


def test_wrong_sha256_argument(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"{NAME}.zip"):
        _get(tmp_path, url=server.base, sha256="ab" * 32)
    assert os.listdir(tmp_path) == []


def test_unverified_download_warns(server, tmp_path):
    with pytest.warns(UserWarning, match="unverified"):
        _check_extracted(_get(tmp_path, url=server.base))


def test_cli_says_unverified_once(server, tmp_path):
    """The CLI printed the warning twice: its log line, then the raw UserWarning with a source line."""
    cmd = [sys.executable, "-m", "fastcgan.data.download", NAME, "--root", str(tmp_path), "--url", server.base,
           "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("unverified") == 1 and "UserWarning" not in p.stderr, p.stderr
    _check_extracted(str(tmp_path / NAME))


def test_module_run_gives_user_errors_one_line(tmp_path):
    """``python -m fastcgan.data.download`` made the file __main__, a second copy of the module whose
    DownloadError was not the class fastcgan.models.pretrained raises: a traceback and exit 1
    where the console script said one line and exit 2."""
    import torch

    bad = tmp_path / "x.pth"
    torch.save({"a": torch.zeros(3)}, bad)
    cmd = [sys.executable, "-m", "fastcgan.data.download", "horse2zebra", "--pretrained", "--root",
           str(tmp_path / "pt"), "--url", bad.as_uri(), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "not an official" in p.stderr and p.stderr.count("unverified") <= 1, p.stderr


def test_resume_after_dropped_connection(server, tmp_path):
    server.drop_first = 1
    _check_extracted(_get(tmp_path, url=server.base, sha256=SHA))
    zip_requests = [r for r in server.requests if r[0].endswith(".zip")]
    assert len(zip_requests) == 2
    assert zip_requests[0][1] is None
    start = int(zip_requests[1][1].split("=")[1].rstrip("-"))
    assert 0 < start < len(ZIP)  # the second request resumed, it did not start over


def test_resume_existing_part_file(server, tmp_path):
    (tmp_path / f"{NAME}.zip.part").write_bytes(ZIP[:12345])
    _check_extracted(_get(tmp_path, url=server.base, sha256=SHA))
    assert server.requests[0] == (f"/data/{NAME}.zip", "bytes=12345-")
    assert _leftovers(tmp_path) == []


def test_complete_part_file_and_server_ignoring_range(server, tmp_path):
    (tmp_path / f"{NAME}.zip.part").write_bytes(ZIP)
    _check_extracted(_get(tmp_path, url=server.base, sha256=SHA))  # 416 -> already complete
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / f"{NAME}.zip.part").write_bytes(b"stale bytes from another file")
    server.ignore_range = True  # 200 for a Range request: must restart from byte 0
    _check_extracted(_get(tmp_path / "again", url=server.base, sha256=SHA))


def test_gives_up_after_retries(server, tmp_path):
    server.drop_first = 10
    with pytest.raises(DownloadError, match=f"{NAME}.zip"):
        _get(tmp_path, url=server.base, sha256=SHA, retries=1)
    assert not os.path.exists(tmp_path / NAME)


def test_http_error_names_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"HTTP 404.*/missing/horse2zebra\.zip"):
        _get(tmp_path, url=server.base.replace("/data", "/missing"))
    # A first download that fails leaves none of the folders it made; one that can resume keeps its .part.
    with pytest.raises(DownloadError, match="HTTP 404"):
        _get(tmp_path / "new" / "root", url=server.base.replace("/data", "/missing"))
    assert not (tmp_path / "new").exists()
    server.drop_first = 10
    with pytest.raises(DownloadError):
        _get(tmp_path / "new" / "root", url=server.base, sha256=SHA, retries=0)
    assert os.listdir(tmp_path / "new" / "root") == [f"{NAME}.zip.part", f"{NAME}.zip.part.source"]


def test_env_url_and_full_url(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCGAN_DATASET_URL", server.base)
    assert dl.dataset_url(NAME) == f"{server.base}/{NAME}.zip"
    _check_extracted(_get(tmp_path / "env", sha256=SHA))
    monkeypatch.delenv("FASTCGAN_DATASET_URL")
    assert dl.dataset_url(NAME).startswith(dl.DEFAULT_BASE_URL)
    server.files["/custom/my_set.zip"] = _zip_bytes({"trainA/x.png": b"1", "trainB/y.png": b"2"})
    url = server.base.replace("/data", "/custom/my_set.zip")
    with pytest.warns(UserWarning, match="unverified"):
        target = download_dataset("my_set", str(tmp_path), url=url, progress=False)
    assert sorted(os.listdir(target)) == ["trainA", "trainB"]  # a flat zip lands in <root>/<name>


def test_path_traversal_is_refused(server, tmp_path):
    evil = _zip_bytes({f"{NAME}/trainA/ok.png": b"1", "../escaped.txt": b"gotcha"})
    server.files[f"/data/{NAME}.zip"] = evil
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="unsafe path"):
        _get(root, url=server.base, sha256=hashlib.sha256(evil).hexdigest())
    assert not os.path.exists(tmp_path / "escaped.txt")
    assert not root.exists()


def test_an_archive_without_a_dataset_never_replaces_one(server, tmp_path):
    """An empty zip (or the wrong file behind a mirror URL) was installed as the dataset, exit 0,
    and with --force it replaced a complete one."""
    _check_extracted(_get(tmp_path, url=server.base, sha256=SHA))
    for members in ({}, {f"{NAME}/readme.txt": b"moved"}, {f"{NAME}/trainA/a.jpg": b"x"}):
        server.files[f"/data/{NAME}.zip"] = _zip_bytes(members)
        with pytest.raises(DownloadError, match="holds no cyclegan dataset: no .*trainB/ folder"):
            _get(tmp_path, url=server.base, force=True)
        _check_extracted(str(tmp_path / NAME))
        assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("members, entry", [
    ({f"{NAME}/trainA": b"a file", f"{NAME}/trainA/0.png": b"x"}, f"{NAME}/trainA/0.png"),
    ({f"{NAME}/trainA/" + "n" * 300 + ".png": b"x"}, "n" * 300),
])
def test_entries_that_cannot_be_files_are_named(server, tmp_path, members, entry):
    """A file and a folder of one name, or a name over the file system's limit, said
    '[Errno 20] Not a directory: <a deleted temporary path>'."""
    server.files[f"/data/{NAME}.zip"] = _zip_bytes(members)
    with pytest.raises(DownloadError, match="cannot unpack entry") as e:
        _get(tmp_path, url=server.base)
    assert entry in str(e.value) and f"{NAME}.zip" in str(e.value) and ".extract-" not in str(e.value)
    assert not (tmp_path / NAME).exists() and _leftovers(tmp_path) == []


def test_zip_entry_count_is_bounded_before_zipfile_reads_the_directory(server, tmp_path, monkeypatch):
    """zipfile.ZipFile builds an object per entry (~1 KB) before the entry limit was checked: a
    100 MB zip of 1.2 M empty entries took 1.2 GB. Its central directory is counted first, stopping
    past the limit; zipfile never opens such an archive."""
    members = {f"{NAME}/trainA/{i}.png": b"" for i in range(60)}
    server.files[f"/data/{NAME}.zip"] = _zip_bytes(members)
    monkeypatch.setattr(dl, "MAX_MEMBERS", 50)
    opened = []
    real_zipfile = zipfile.ZipFile
    monkeypatch.setattr(dl.zipfile, "ZipFile", lambda *a, **k: opened.append(a) or real_zipfile(*a, **k))
    with pytest.raises(DownloadError, match="more than 50 entries"):
        _get(tmp_path, url=server.base)
    assert opened == [] and not (tmp_path / NAME).exists()
    assert dl._zip_entry_count(str(_write_zip(tmp_path / "ok.zip", members)), 10**6) == 60


def test_a_zip64_record_behind_a_plain_end_record_is_counted(tmp_path):
    """zipfile follows a zip64 locator in front of the end record whatever that record says; the
    count followed it only when the record held 0xFFFF markers, so a plain record claiming 1 entry
    in front of a zip64 one of 2 M entries passed the limit (1.6 GB before zipfile refused it)."""
    import struct

    plain = _zip_bytes({f"{NAME}/trainA/{i}.png": b"" for i in range(60)})
    at = plain.rfind(b"PK\x05\x06")
    n, cd_size, cd_off = struct.unpack("<HLL", plain[at + 10:at + 20])
    z64 = b"PK\x06\x06" + struct.pack("<Q2H2L4Q", 44, 45, 45, 0, 0, n, n, cd_size, cd_off)
    locator = b"PK\x06\x07" + struct.pack("<LQL", 0, at, 1)
    small = b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, 1, 1, 46, cd_off, 0)  # no 0xFFFF marker
    path = tmp_path / "z64.zip"
    path.write_bytes(plain[:at] + z64 + locator + small)
    with zipfile.ZipFile(path) as zf:
        assert len(zf.infolist()) == 60  # what zipfile would build objects for
    assert dl._zip_entry_count(str(path), 10**6) == 60
    assert dl._zip_entry_count(str(path), 50) == 51  # stops just past the limit


def _write_zip(path, members):
    path.write_bytes(_zip_bytes(members))
    return path


def test_zip_bomb_is_refused_before_anything_is_written(server, tmp_path):
    """64 MB of zeros deflate to ~64 kB: nothing bounded what an archive could write (a few MB
    on the wire could fill the disk). The declared sizes are checked against the archive's size
    before extraction."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{NAME}/trainA/a.png", b"\0" * (64 << 20))
    bomb = buf.getvalue()
    assert len(bomb) < 1 << 20
    server.files[f"/data/{NAME}.zip"] = bomb
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="decompression bomb"):
        _get(root, url=server.base, sha256=hashlib.sha256(bomb).hexdigest())
    assert not root.exists()


def test_corrupt_zip(server, tmp_path):
    server.files[f"/data/{NAME}.zip"] = b"PK\x03\x04 definitely not a zip"
    with pytest.warns(UserWarning), pytest.raises(DownloadError, match="not a valid zip"):
        _get(tmp_path, url=server.base)
    assert os.listdir(tmp_path) == []


def test_names_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="valid names: .*horse2zebra"):
        download_dataset("horse2pony", str(tmp_path))
    with pytest.raises(ValueError, match="license"):
        download_dataset("cityscapes", str(tmp_path))
    assert main(["horse2pony", "--root", str(tmp_path)]) == 2
    assert "monet2photo" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert "vangogh2photo" in capsys.readouterr().out
    assert main([NAME, "--sha256", "xyz", "--root", str(tmp_path)]) == 2
    assert "64 hex" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    for root in [tmp_path / "afile" / "sub"] + ([Path("/proc/fastcgan-test")] if os.path.isdir("/proc/self") else []):
        assert main([NAME, "--root", str(root), "--url", "http://127.0.0.1:9/none"]) == 2  # before any download
        assert f"--root {root}: " in capsys.readouterr().err
    assert {"horse2zebra", "monet2photo", "summer2winter_yosemite", "apple2orange", "facades"} <= set(
        dl.CYCLEGAN_DATASETS
    )


def test_cli_download(server, tmp_path, capsys):
    rc = main([NAME, "--root", str(tmp_path), "--url", server.base, "--sha256", SHA, "--no-progress"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / NAME)
    _check_extracted(str(tmp_path / NAME))


def test_part_from_another_url_starts_over(server, tmp_path):
    """A .part begun from another URL (an earlier --url) was resumed from this one: the archive
    became two files spliced together (a zip error at the end, the download lost)."""
    other = server.base.replace("/data", "/mirror") + f"/{NAME}.zip"
    server.files[f"/mirror/{NAME}.zip"] = _zip_bytes({f"{NAME}/trainA/z.jpg": os.urandom(50_000)})
    with pytest.raises(DownloadError):  # leaves a .part and its .source behind
        server.drop_first = 10
        download_dataset(NAME, str(tmp_path), url=other, progress=False, backoff=0.0, retries=0)
    assert (tmp_path / f"{NAME}.zip.part.source").is_file()
    server.drop_first = 0
    server.requests.clear()
    _check_extracted(_get(tmp_path, url=server.base, sha256=SHA))
    assert server.requests[0] == (f"/data/{NAME}.zip", None)  # from byte 0, not resumed
    assert _leftovers(tmp_path) == []


def test_changed_file_is_not_spliced(server, tmp_path):
    """The file changed on the server between two attempts: If-Range (its ETag) makes the server
    send it whole instead of the rest of the new file after the start of the old one."""
    path = f"/data/{NAME}.zip"
    server.etags[path] = '"v1"'
    server.files[path] = _zip_bytes({f"{NAME}/trainA/old.jpg": os.urandom(60_000)})
    server.drop_first = 10
    with pytest.raises(DownloadError):
        _get(tmp_path, url=server.base, retries=0)
    assert 0 < (tmp_path / f"{NAME}.zip.part").stat().st_size < len(server.files[path])
    server.files[path], server.etags[path], server.drop_first = ZIP, '"v2"', 0
    server.requests.clear()
    _check_extracted(_get(tmp_path, url=server.base, sha256=SHA))
    assert server.requests[0][1] is not None  # it asked to resume, and got the new file whole


def test_force_keeps_the_old_dataset_until_the_new_one_is_unpacked(server, tmp_path):
    """--force deleted <root>/<name> before downloading: a failed download left nothing."""
    _check_extracted(_get(tmp_path, url=server.base, sha256=SHA))
    with pytest.raises(ChecksumError):
        _get(tmp_path, url=server.base, sha256="ab" * 32, force=True)
    _check_extracted(str(tmp_path / NAME))
    new = _zip_bytes({f"{NAME}/trainA/new.jpg": b"1", f"{NAME}/trainB/new.jpg": b"2"})
    server.files[f"/data/{NAME}.zip"] = new
    _get(tmp_path, url=server.base, sha256=hashlib.sha256(new).hexdigest(), force=True)
    assert sorted(os.listdir(tmp_path / NAME / "trainA")) == ["new.jpg"]
    assert _leftovers(tmp_path) == []


def test_one_download_at_a_time(server, tmp_path):
    """Two downloads of one dataset appended to one .part."""
    with dl.download_lock(str(tmp_path), NAME), pytest.raises(DownloadError, match="another fastcgan-download"):
        _get(tmp_path, url=server.base, sha256=SHA)
    assert not [r for r in server.requests if r[0].endswith(".zip")]
    _check_extracted(_get(tmp_path, url=server.base, sha256=SHA))  # the lock went with its holder
    assert _leftovers(tmp_path) == []


def test_disk_full_is_named_not_retried(server, tmp_path, monkeypatch):
    """A full disk looked like a dropped connection: retried (re-downloading) and reported as
    "interrupted". Known sizes are checked against the free space first."""
    import errno

    class _Full(io.FileIO):  # as /dev/full: every write ENOSPC
        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(dl, "open", lambda f, mode="r", *a, **k: _Full(f, mode.replace("b", "")), raising=False)
        with pytest.raises(DownloadError, match="cannot write .*No space left"):
            _get(tmp_path, url=server.base, sha256=SHA)
    assert len([r for r in server.requests if r[0].endswith(".zip")]) == 1
    dl.discard_download(str(tmp_path / f"{NAME}.zip.part"))
    usage = dl.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DownloadError, match="GB free"):
        _get(tmp_path, url=server.base, sha256=SHA)


def test_a_link_at_the_part_name_is_not_written_through(server, tmp_path):
    """Someone who can write into the root plants <name>.zip.part -> a file of yours: the download
    must not overwrite that file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(victim, root / f"{NAME}.zip.part")
    with pytest.raises(DownloadError, match="symbolic link"):
        _get(root, url=server.base, sha256=SHA)
    assert victim.read_text() == "precious"


def test_a_download_of_unannounced_size_is_bounded(server, tmp_path, monkeypatch):
    """A server that sends no Content-Length and streams without end filled the disk (2.5 GB in 6 s):
    dataset archives are capped (twice the largest official one) and, with no size announced, the
    folder's free space is checked as the bytes arrive; either way the partial download is deleted."""
    import shutil

    server.no_length = True
    server.files[f"/data/{NAME}.zip"] = ZIP + bytes(300_000)  # padding after the zip: a long stream
    monkeypatch.setattr(dl, "MAX_DATASET_BYTES", 200_000)
    with pytest.raises(dl.TooLargeError, match="larger than 200,000 bytes"):
        _get(tmp_path, url=server.base)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(dl, "MAX_DATASET_BYTES", 1 << 30)
    monkeypatch.setattr(dl, "FREE_SPACE_CHECK_EVERY", 100_000)
    usage = shutil.disk_usage
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: usage(p)._replace(free=10 << 20))
    with pytest.raises(dl.DiskFullError, match="its folder has 10 MB free"):
        _get(tmp_path, url=server.base)
    assert os.listdir(tmp_path) == []
