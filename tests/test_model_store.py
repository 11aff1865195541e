"""Model delivery (issue 20, item 7): org.elemental.ModelStore on the desktop JVM against a faulty local server.

`make native` builds build/native/elemental-jvm.jar; its ModelStoreMain runs `install` (HTTP) and `installFrom`
(a local folder) and prints one JSON line or `error: ...` (exit code 2). The server here (http.server in a
thread on 127.0.0.1) serves a small export written by the test: a manifest in the export's format and three
files of random bytes. Faults, per file: a transfer cut short, a server that dies mid-file, wrong bytes, 404,
Range ignored, 416, a stall; redirects by path. Checked: the installed files are the source's bytes,
verified.json, resume with `Range: bytes=N-` (each byte served once), nothing half-installed after a failure,
the previous install kept through a failed update, and error messages that name the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import re
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JAR = ROOT / "build" / "native" / "elemental-jvm.jar"
NAME = "demo-model"
BIG = "Demo-Q8_0.gguf"
MMPROJ = "mmproj Demo+F16.gguf"  # a space and a '+': the client must percent-encode the URL path
FILES = {  # name: (role, quant, size)
    BIG: ("text", "Q8_0", 3 * 1024 * 1024 + 17),
    "Demo-Q4_0.gguf": ("text", "Q4_0", 1536 * 1024),
    MMPROJ: ("mmproj", "F16", 2 * 1024 * 1024 + 5),
}
CUT = 1_000_000


def write_export(folder: Path, seed: int) -> Path:
    """A folder shaped like `elemental export`'s: random bytes for the GGUFs, their sizes and sha256 listed."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    entries = {}
    for name, (role, quant, size) in FILES.items():
        data = rng.randbytes(size)
        (folder / name).write_bytes(data)
        entries[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": size, "role": role, "quant": quant}
    manifest = {"format": "elemental-gguf/1", "name": "Demo", "labels": ["fire", "water"],
                "prompt": "Which element is this? «fire» or «water»\n", "image": {"longest_edge": 512, "scale": 1.5e-3},
                "label_token_ids": [[1, 2], [3]], "first_token_scoring": False, "files": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the server keeps its own log
        pass

    def do_GET(self) -> None:
        server: Server = self.server.owner
        with server.lock:
            server.active += 1
        try:
            self.answer(server)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this response (a size it refused, a timeout)
        finally:
            with server.lock:
                server.active -= 1

    def answer(self, server: Server) -> None:
        raw = urlsplit(self.path).path.removeprefix("/")
        path = unquote(raw)
        entry = {"path": path, "range": self.headers.get("Range"), "status": 0, "sent": 0}
        server.log.append(entry)
        prefix, _, rest = raw.partition("/")  # still quoted: a Location is a URL
        redirects = {"moved": "/" + rest, "away": "ftp://127.0.0.1/" + rest, "loop": self.path}
        if rest and prefix in redirects:
            entry["status"] = 302
            self.send_response(302)
            self.send_header("Location", redirects[prefix])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        kind, *arg = server.faults.get(path, ("",))
        file = server.folder / path
        if kind == "404" or "/" in path or not file.is_file():
            entry["status"] = 404
            self.send_error(404)
            return
        data = file.read_bytes()
        if kind == "corrupt":
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:]
        start, status = 0, 200
        if entry["range"] and kind != "ignore-range":
            m = re.fullmatch(r"bytes=(\d+)-", entry["range"])
            start = int(m.group(1)) if m else len(data)
            if kind == "416" or start >= len(data):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        entry["status"] = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))  # the whole body's, also when it is then cut
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        limit = arg[0] if kind in ("cut", "die", "stall") else len(body)
        for i in range(0, min(limit, len(body)), 64 * 1024):
            piece = body[i: min(i + 64 * 1024, limit)]
            entry["sent"] += len(piece)
            self.wfile.write(piece)
        if kind == "stall":
            server.release.wait(30)
        if kind in ("cut", "die"):
            self.connection.shutdown(socket.SHUT_WR)  # FIN after the bytes sent: the client gets exactly `limit`
        if kind == "die":
            server.httpd.shutdown()
            server.httpd.server_close()


class Server:
    """http.server on 127.0.0.1 serving `folder`; `faults[file name] = (kind, *arg)`; `log` of every request."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.faults: dict[str, tuple] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.active = 0
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def requests(self, path: str) -> list[dict]:
        """The requests for `path` so far, once no response is still being written."""
        deadline = time.monotonic() + 10
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        return [r for r in self.log if r["path"] == path]

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "v1", seed=1)


@pytest.fixture
def server(export):
    s = Server(export)
    yield s
    s.stop()


def store(command: str, root: Path, source: str | Path, *options: str, name: str = NAME,
          timeout: int = 120) -> subprocess.CompletedProcess:
    if not JAR.is_file():
        pytest.fail(f"{JAR} is missing: run `make native` (tests/test_model_store.py needs it built)")
    return subprocess.run(["java", "-cp", str(JAR), "ModelStoreMain", command, str(root), name, str(source), *options],
                          capture_output=True, text=True, timeout=timeout)


def installed(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr[-3000:]
    line = res.stdout.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    return line


def check_install(root: Path, export: Path, files: list[str] | None = None, failed_update: bool = False) -> None:
    """root/NAME holds exactly `files` (default: all) with the export's bytes, a manifest copy listing them, and
    verified.json; nothing else is left in root but the name's lock file (and, after a failed update, its
    .partial folder, for the next call to resume)."""
    files = sorted(files or FILES)
    folder = root / NAME
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, "manifest.json", "verified.json"])
    source = json.loads((export / "manifest.json").read_text())
    for name in files:
        assert (folder / name).read_bytes() == (export / name).read_bytes(), name
    copy = json.loads((folder / "manifest.json").read_text())
    assert copy == {**source, "files": {n: source["files"][n] for n in files}}
    if len(files) == len(FILES):  # nothing to filter: the server's bytes, as they came
        assert (folder / "manifest.json").read_bytes() == (export / "manifest.json").read_bytes()
    stamp = json.loads((folder / "verified.json").read_text())
    assert stamp == {"format": 1, "files": {
        n: {"size": (folder / n).stat().st_size, "mtime_ms": (folder / n).stat().st_mtime_ns // 1_000_000,
            "sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest()} for n in files}}
    left = [NAME, f"{NAME}.lock"] + ([f"{NAME}.partial"] if failed_update else [])
    assert sorted(p.name for p in root.iterdir()) == sorted(left)


def test_install_over_http(tmp_path, export, server):
    out = installed(store("install", tmp_path, server.url + "/"))
    assert out["folder"] == str(tmp_path / NAME)
    total = sum(size for _, _, size in FILES.values())
    assert out["progress"]["done"] == out["progress"]["total"] == total and out["progress"]["calls"] > 3
    check_install(tmp_path, export)
    assert [r["range"] for r in server.log] == [None] * 4 and {r["status"] for r in server.log} == {200}


def test_quants_keep_only_those_text_files(tmp_path, export, server):
    installed(store("install", tmp_path, server.url, "--quants", "Q4_0"))
    check_install(tmp_path, export, ["Demo-Q4_0.gguf", MMPROJ])
    assert not server.requests(BIG)
    msg = error(store("install", tmp_path / "other", server.url, "--quants", "Q4_0,Q2_K"))
    assert "manifest.json lists no text GGUF of type [Q2_K]" in msg and "[Q8_0, Q4_0]" in msg


def test_cut_transfer_keeps_previous_install(tmp_path, tmp_path_factory, export, server):
    installed(store("install", tmp_path, server.url))
    v2 = write_export(tmp_path_factory.mktemp("v2") / "export", seed=2)
    server.folder = v2
    server.faults[BIG] = ("cut", CUT)
    msg = error(store("install", tmp_path, server.url))
    assert f"{server.url}/{BIG}: the transfer ended after {CUT} of {FILES[BIG][2]} bytes" in msg
    check_install(tmp_path, export, failed_update=True)
    (part,) = (tmp_path / f"{NAME}.partial").glob(f"{BIG}.*.part")
    assert part.read_bytes() == (v2 / BIG).read_bytes()[:CUT]
    server.faults.clear()
    installed(store("install", tmp_path, server.url))
    check_install(tmp_path, v2)


def test_server_dies_mid_file_then_resume(tmp_path, export, server):
    server.faults[BIG] = ("die", CUT)
    msg = error(store("install", tmp_path, server.url))
    assert BIG in msg and f"after {CUT} of {FILES[BIG][2]} bytes" in msg and "install again to resume" in msg
    assert not (tmp_path / NAME).exists()
    restarted = Server(export)  # the same files at another address: the .part is keyed by digest, not URL
    try:
        installed(store("install", tmp_path, restarted.url))
        (first,) = server.requests(BIG)
        (second,) = restarted.requests(BIG)
    finally:
        restarted.stop()
    assert first["range"] is None and first["sent"] == CUT
    assert second["range"] == f"bytes={CUT}-" and second["status"] == 206
    assert first["sent"] + second["sent"] == FILES[BIG][2]  # each byte served once
    check_install(tmp_path, export)


def test_cancel_then_resume(tmp_path, export, server):
    res = store("install", tmp_path, server.url, "--cancel-after", str(CUT))
    assert res.returncode == 3 and res.stdout.startswith("cancelled: install of demo-model cancelled"), res.stdout
    (part,) = (tmp_path / f"{NAME}.partial").glob(f"{BIG}.*.part")
    have = part.stat().st_size
    assert CUT <= have < FILES[BIG][2]
    installed(store("install", tmp_path, server.url))
    assert [r["range"] for r in server.requests(BIG)] == [None, f"bytes={have}-"]
    check_install(tmp_path, export)


def test_wrong_digest_is_named_and_deleted(tmp_path, export, server):
    server.faults[MMPROJ] = ("corrupt",)
    msg = error(store("install", tmp_path, server.url))
    assert msg.startswith(f"error: {server.url}/mmproj%20Demo%2BF16.gguf: sha256 ")
    assert f"differs from {hashlib.sha256((export / MMPROJ).read_bytes()).hexdigest()[:12]}... in " in msg
    assert not (tmp_path / NAME).exists()
    staged = sorted(p.name for p in (tmp_path / f"{NAME}.partial").iterdir())
    assert staged == sorted([BIG, "Demo-Q4_0.gguf"])  # the bad download is gone, the verified files stay
    server.faults.clear()
    installed(store("install", tmp_path, server.url))
    assert [len(server.requests(n)) for n in FILES] == [1, 1, 2]  # only the bad file is fetched again
    check_install(tmp_path, export)


def test_corrupt_partial_file_fails_the_check(tmp_path, export, server):
    server.faults[BIG] = ("cut", CUT)
    error(store("install", tmp_path, server.url))
    (part,) = (tmp_path / f"{NAME}.partial").glob(f"{BIG}.*.part")
    data = bytearray(part.read_bytes())
    data[10] ^= 1  # the resumed prefix is hashed from disk, so this must not pass
    part.write_bytes(data)
    server.faults.clear()
    assert error(store("install", tmp_path, server.url)).startswith(f"error: {server.url}/{BIG}: sha256 ")
    assert not part.exists() and not (tmp_path / NAME).exists()
    installed(store("install", tmp_path, server.url))
    check_install(tmp_path, export)


@pytest.mark.parametrize("fault, after_cut", [
    ("ignore-range", [(f"bytes={CUT}-", 200)]),  # the whole body, from byte 0
    ("416", [(f"bytes={CUT}-", 416), (None, 200)]),  # the part is not a prefix any more: asked whole
])
def test_a_server_that_cannot_resume_makes_the_file_start_over(tmp_path, export, server, fault, after_cut):
    server.faults[BIG] = ("cut", CUT)
    error(store("install", tmp_path, server.url))
    server.faults[BIG] = (fault,)
    installed(store("install", tmp_path, server.url))
    requests = server.requests(BIG)[1:]
    assert [(r["range"], r["status"]) for r in requests] == after_cut and requests[-1]["sent"] == FILES[BIG][2]
    check_install(tmp_path, export)


def test_404_for_a_listed_file(tmp_path, server):
    server.faults["Demo-Q4_0.gguf"] = ("404",)
    assert error(store("install", tmp_path, server.url)) == f"error: {server.url}/Demo-Q4_0.gguf: HTTP 404 Not Found"
    assert not (tmp_path / NAME).exists()


def test_stalled_server_times_out(tmp_path, server):
    server.faults[BIG] = ("stall", CUT)
    start = time.monotonic()
    msg = error(store("install", tmp_path, server.url, "--read-timeout-ms", "500"))
    assert time.monotonic() - start < 20
    assert f"{server.url}/{BIG}: connection lost after {CUT} of" in msg and "timed out" in msg


def test_size_on_server_differs_from_manifest(tmp_path, tmp_path_factory, export, server):
    other = tmp_path_factory.mktemp("short")
    for p in export.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    (other / BIG).write_bytes((export / BIG).read_bytes()[:-1])
    server.folder = other
    msg = error(store("install", tmp_path, server.url))
    assert msg == (f"error: {server.url}/{BIG}: the server's file is {FILES[BIG][2] - 1} bytes, "
                   f"{server.url}/manifest.json says {FILES[BIG][2]}")


@pytest.mark.parametrize("evil", ["../evil", "/tmp/evil", "..", "sub/x.gguf", "a\\..\\b"])
def test_manifest_with_a_path_is_refused(tmp_path, evil, server):
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "elemental-gguf/1", "files": {
        evil: {"sha256": "0" * 64, "size_bytes": 3, "role": "text", "quant": "Q8_0"}}}))
    server.folder = folder
    root = tmp_path / "models" / "inside"
    msg = error(store("install", root, server.url))
    assert f"files['{evil}']: file name refused" in msg
    assert [r["path"] for r in server.log] == ["manifest.json"]
    assert not list((tmp_path / "models").rglob("*evil*"))


def test_redirect_followed(tmp_path, export, server):
    installed(store("install", tmp_path, server.url + "/moved"))
    assert [r["status"] for r in server.log] == [302, 200] * 4
    check_install(tmp_path, export)


@pytest.mark.parametrize(("prefix", "why"), [("away", "only http and https are followed"),
                                             ("loop", "more than 5 redirects")])
def test_redirect_refused(tmp_path, server, prefix, why):
    msg = error(store("install", tmp_path, f"{server.url}/{prefix}"))
    assert f"{server.url}/{prefix}/manifest.json" in msg and why in msg
    assert not (tmp_path / NAME).exists()


def test_install_from_a_folder(tmp_path, tmp_path_factory, export):
    installed(store("install-from", tmp_path, export))
    check_install(tmp_path, export)
    bad = tmp_path_factory.mktemp("bad") / "export"
    write_export(bad, seed=3)
    data = bytearray((bad / "Demo-Q4_0.gguf").read_bytes())
    data[1000] ^= 0xFF
    (bad / "Demo-Q4_0.gguf").write_bytes(data)
    msg = error(store("install-from", tmp_path, bad))
    assert msg.startswith(f"error: {bad / 'Demo-Q4_0.gguf'}: sha256 ") and f"in {bad / 'manifest.json'}" in msg
    check_install(tmp_path, export, failed_update=True)
    data[1000] ^= 0xFF
    (bad / "Demo-Q4_0.gguf").write_bytes(data)
    (bad / MMPROJ).unlink()
    assert store("install-from", tmp_path / "m", bad).stdout.strip() == (
        f"error: {bad / MMPROJ}: missing (listed in {bad / 'manifest.json'})")


def test_bad_name_and_busy_name(tmp_path, server):
    for name in ("../x", ".hidden", "a/b", "x.partial"):
        assert f"model name '{name}' refused" in error(store("install", tmp_path, server.url, name=name))
    assert not server.log
    with open(tmp_path / f"{NAME}.lock", "w") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)  # another process installing the same name
        assert error(store("install", tmp_path, server.url)).endswith(f"another install of '{NAME}' is running")
