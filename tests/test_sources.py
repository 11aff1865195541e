"""Photo sources against real HTTP: small servers on 127.0.0.1 that behave like Unsplash, Openverse and
ordinary web servers (no mock of the HTTP client). Photos and trees are made in the tests."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from elemental.data.sources import (
    UNSPLASH_TERMS_NOTE,
    Photo,
    Rejected,
    folder,
    is_private_host,
    net,
    open_source,
    search,
    source_kind,
    stored_url,
)
from elemental.errors import ElementalError
from elemental.images import open_image_bytes

KEY = "uk-SECRET-0123456789abcdef"

# -- a tiny HTTP server framework -------------------------------------------------------------------


@dataclass
class Req:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    handler: BaseHTTPRequestHandler


Reply = tuple[int, dict[str, str], bytes]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up early (a cancelled download ahead, a timeout) is expected, not news."""


class Server:
    """ThreadingHTTPServer on a free loopback port, answering with `app(req)`; stopped by the fixture."""

    def __init__(self, app: Callable[[Req], Reply | None]) -> None:
        self.release = threading.Event()  # wakes handlers that hang on purpose

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                split = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(split.query).items()}
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = app(Req(split.path, query, headers, self))
                if reply is None:  # the app wrote the response itself
                    return
                status, extra, body = reply
                self.send_response(status)
                extra = {"Content-Length": str(len(body)), **extra}
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Req], Reply | None]], Server]]:
    started: list[Server] = []

    def start(app: Callable[[Req], Reply | None]) -> Server:
        s = Server(app)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _jpeg_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


def _collect(stream: Iterator[Photo | Rejected]) -> tuple[list[Photo], list[Rejected]]:
    photos: list[Photo] = []
    rejected: list[Rejected] = []
    for item in stream:
        (photos if isinstance(item, Photo) else rejected).append(item)
    return photos, rejected


# -- a fake Unsplash ------------------------------------------------------------------------------------


@dataclass
class FakeUnsplash:
    """Search with paging, hotlinked downloads, download tracking counted per photo, rate limits."""

    photos: dict[str, list[str]] = field(
        default_factory=lambda: {"ocean": [f"oc{i:02d}" for i in range(45)], "forest": [f"fo{i:02d}" for i in range(8)]}
    )
    budget: int | None = None  # X-Ratelimit-Remaining; None: header not sent
    forbid: set[tuple[str, int]] = field(default_factory=set)  # (query, page) answered 403 Rate Limit Exceeded
    broken: set[str] = field(default_factory=set)  # photo ids whose download 404s
    fail_once: set[tuple[str, int]] = field(default_factory=set)  # (query, page) answered 500 once
    tracked: Counter = field(default_factory=Counter)
    searches: list[tuple[str, int]] = field(default_factory=list)
    over_limit_calls: int = 0
    image_auth: list[str] = field(default_factory=list)  # Authorization headers seen by the image host
    image_widths: list[str] = field(default_factory=list)
    base: str = ""

    def app(self, req: Req) -> Reply | None:
        if req.path.startswith("/img/"):
            self.image_auth.extend([req.headers["authorization"]] if "authorization" in req.headers else [])
            self.image_widths.append(req.query.get("w", ""))
            pid = req.path.rsplit("/", 1)[1].removesuffix(".jpg")
            if pid in self.broken:
                return 404, {"Content-Type": "text/plain"}, b"gone"
            return 200, {"Content-Type": "image/jpeg"}, _jpeg_bytes(sum(map(ord, pid)))
        if req.headers.get("authorization") != f"Client-ID {KEY}":
            return _json({"errors": ["OAuth error: The access token is invalid"]}, 401)
        if self.budget is not None:
            if self.budget <= 0:
                self.over_limit_calls += 1
                return 403, {"X-Ratelimit-Remaining": "0", "Content-Type": "text/plain"}, b"Rate Limit Exceeded"
            self.budget -= 1
        headers = {} if self.budget is None else {"X-Ratelimit-Limit": "50", "X-Ratelimit-Remaining": str(self.budget)}
        if req.path == "/search/photos":
            query, page = req.query["query"], int(req.query["page"])
            per_page = int(req.query["per_page"])
            self.searches.append((query, page))
            if (query, page) in self.forbid:
                return 403, {"Content-Type": "text/plain"}, b"Rate Limit Exceeded"
            if (query, page) in self.fail_once:
                self.fail_once.discard((query, page))
                return 500, {"Content-Type": "text/plain"}, b"oops"
            ids = self.photos.get(query, [])
            chunk = ids[(page - 1) * per_page : page * per_page]
            total_pages = -(-len(ids) // per_page)
            return _json({"total": len(ids), "total_pages": total_pages, "results": [self._photo(p) for p in chunk]},
                         headers=headers)
        if req.path.startswith("/photos/") and req.path.endswith("/download"):
            pid = req.path.split("/")[2]
            assert req.query.get("ixid") == "track-" + pid  # the link is called as given
            self.tracked[pid] += 1
            return _json({"url": f"{self.base}/img/{pid}.jpg"}, headers=headers)
        return _json({"errors": ["not found"]}, 404)

    def _photo(self, pid: str) -> dict[str, Any]:
        return {
            "id": pid,
            "alt_description": "a photo",
            "urls": {"regular": f"{self.base}/img/{pid}.jpg?ixid=abc&w=1080&fm=jpg"},
            "links": {
                "html": f"https://unsplash.com/photos/{pid}",
                "download_location": f"{self.base}/photos/{pid}/download?ixid=track-{pid}",
            },
            "user": {"name": "Ann Example", "username": "ann_ex", "links": {"html": "https://unsplash.com/@ann_ex"}},
        }


@pytest.fixture
def unsplash(serve, monkeypatch: pytest.MonkeyPatch) -> FakeUnsplash:
    fake = FakeUnsplash()
    fake.base = serve(fake.app).url
    monkeypatch.setenv("UNSPLASH_ACCESS_KEY", KEY)
    monkeypatch.delenv("UNSPLASH_API_URL", raising=False)
    return fake


def _unsplash(task, fake: FakeUnsplash, queries: list[str], num_images: int, **kw):
    return open_source("unsplash", task, queries=queries, num_images=num_images, unsplash_api_url=fake.base,
                       openverse_api_url=None, timeout=5, allow_private_urls=True, **kw)


def _no_key_anywhere(*things: Any) -> None:
    for thing in things:
        assert KEY not in repr(thing)


def test_unsplash_tracks_exactly_the_kept_photos_once(task, unsplash: FakeUnsplash, caplog):
    caplog.set_level(logging.DEBUG)
    stream = _unsplash(task, unsplash, ["ocean", "forest"], 20)
    kept, dropped, seen = [], [], []
    with stream:
        for i, item in enumerate(stream):
            assert isinstance(item, Photo)
            seen.append(item)
            assert open_image_bytes(item.data, item.name).size == (64, 48)
            if i % 3 == 0:
                dropped.append(item.source_id)  # e.g. a duplicate or low confidence: never tracked
                continue
            item.on_kept()
            if i == 1:
                item.on_kept()  # a second call must not track twice
            kept.append(item.source_id)
    assert len(seen) == 20
    assert dict(unsplash.tracked) == {pid: 1 for pid in kept}
    assert not set(unsplash.tracked) & set(dropped)
    # Both queries contribute (interleaved), each page fetched once, one page per query was enough.
    assert {p.source_id[:2] for p in seen} == {"oc", "fo"}
    assert unsplash.searches == [("ocean", 1), ("forest", 1)]
    # Hotlinked downloads, resized by the CDN, and the key never sent to the image host.
    assert unsplash.image_auth == [] and set(unsplash.image_widths) == {"1024"}
    _no_key_anywhere(seen, stream.notes, caplog.text)


def test_unsplash_attribution(task, unsplash: FakeUnsplash):
    with _unsplash(task, unsplash, ["forest"], 1) as stream:
        photo = next(stream)
    assert isinstance(photo, Photo) and photo.source == "unsplash" and photo.source_id == "fo00"
    assert photo.label is None and photo.name == "unsplash:fo00"
    a = photo.attribution
    assert a["provider"] == "unsplash"
    assert a["photographer"] == "Ann Example" and a["username"] == "ann_ex"
    assert a["photographer_url"] == "https://unsplash.com/@ann_ex?utm_source=elemental&utm_medium=referral"
    assert a["link"] == "https://unsplash.com/photos/fo00?utm_source=elemental&utm_medium=referral"
    assert a["license"] == "Unsplash License" and a["license_url"] == "https://unsplash.com/license"
    assert a["credit"] == "Photo by Ann Example on Unsplash"
    _no_key_anywhere(a)
    assert "licence" in UNSPLASH_TERMS_NOTE and "unsplash.com" in UNSPLASH_TERMS_NOTE


def test_unsplash_pages_until_num_images(task, unsplash: FakeUnsplash):
    with _unsplash(task, unsplash, ["ocean"], 40) as stream:
        photos, rejected = _collect(stream)
    assert [p.source_id for p in photos] == [f"oc{i:02d}" for i in range(40)] and not rejected
    assert unsplash.searches == [("ocean", 1), ("ocean", 2)]
    # Exhausted queries end the stream without asking for pages that do not exist.
    with _unsplash(task, unsplash, ["forest", "nothing"], 100) as stream:
        photos, _ = _collect(stream)
    assert len(photos) == 8 and ("forest", 2) not in unsplash.searches


def test_unsplash_rate_limit_header_stops_cleanly_and_a_rerun_continues(task, unsplash: FakeUnsplash):
    unsplash.budget = 4  # one search + three tracking calls
    stream = _unsplash(task, unsplash, ["ocean"], 10)
    collected = []
    for item in stream:
        assert isinstance(item, Photo)
        item.on_kept()
        collected.append(item.source_id)
    stream.close()
    assert collected == ["oc00", "oc01", "oc02"]
    assert dict(unsplash.tracked) == {pid: 1 for pid in collected}
    assert unsplash.over_limit_calls == 0  # never asked again once the header said 0
    assert len(stream.notes) == 1 and "rate limit" in stream.notes[0] and "Run again later" in stream.notes[0]

    unsplash.budget = 50  # the next hour
    with _unsplash(task, unsplash, ["ocean"], 5, skip_ids=set(collected)) as again:
        more = []
        for item in again:
            item.on_kept()
            more.append(item.source_id)
    assert more == ["oc03", "oc04", "oc05", "oc06", "oc07"]
    assert all(unsplash.tracked[pid] == 1 for pid in collected + more)


def test_unsplash_budget_holds_when_photos_are_kept_after_the_stream(task, unsplash: FakeUnsplash):
    """prepare keeps photos (and calls on_kept) only after the dataset is saved: every handed-out photo
    must still have an API call left for its tracking then."""
    unsplash.budget = 4
    with _unsplash(task, unsplash, ["ocean"], 10) as stream:
        photos = list(stream)
        assert [p.source_id for p in photos] == ["oc00", "oc01", "oc02"]
        assert "rate limit" in stream.notes[0]
        for p in photos:
            p.on_kept()
    assert dict(unsplash.tracked) == {"oc00": 1, "oc01": 1, "oc02": 1}
    assert unsplash.over_limit_calls == 0 and not stream.notes[1:]


def test_unsplash_403_rate_limit_ends_with_what_was_collected(task, unsplash: FakeUnsplash):
    unsplash.forbid = {("ocean", 2)}
    with _unsplash(task, unsplash, ["ocean"], 100) as stream:
        photos, rejected = _collect(stream)
    assert len(photos) == 30 and not rejected
    assert unsplash.searches == [("ocean", 1), ("ocean", 2)]
    assert "rate limit" in stream.notes[0].lower() and "Stopped after 30 new photo(s)" in stream.notes[0]


def test_unsplash_retries_a_5xx_and_rejects_a_broken_download(task, unsplash: FakeUnsplash, monkeypatch):
    monkeypatch.setattr(search, "RETRY_BACKOFF_S", 0.01)
    unsplash.fail_once = {("forest", 1)}
    unsplash.broken = {"fo02"}
    with _unsplash(task, unsplash, ["forest"], 8) as stream:
        photos, rejected = _collect(stream)
    assert unsplash.searches == [("forest", 1), ("forest", 1)]
    assert len(photos) == 7 and [r.source_id for r in rejected] == ["fo02"]
    assert rejected[0].kind == "http_error"
    assert "HTTP 404" in rejected[0].reason and "/img/fo02.jpg" in rejected[0].reason
    _no_key_anywhere(rejected, stream.notes)


def test_unsplash_key_missing_or_refused(task, unsplash: FakeUnsplash, monkeypatch):
    monkeypatch.delenv("UNSPLASH_ACCESS_KEY")
    with pytest.raises(ElementalError, match="UNSPLASH_ACCESS_KEY"):
        _unsplash(task, unsplash, ["ocean"], 1)
    monkeypatch.setenv("UNSPLASH_ACCESS_KEY", KEY + "-wrong")
    with pytest.raises(ElementalError, match="refused the access key") as e:
        list(_unsplash(task, unsplash, ["ocean"], 1))
    assert KEY not in str(e.value)


def test_unsplash_key_never_leaks_even_when_the_server_echoes_it(task, serve, monkeypatch):
    """A misbehaving API that puts the key into URLs and error bodies still leaks it nowhere we write."""
    def app(req: Req) -> Reply:
        auth = req.headers.get("authorization", "")
        if req.path == "/search/photos" and req.query["query"] == "echo":
            return 400, {"Content-Type": "text/plain"}, f"bad request from {auth}".encode()
        if req.path == "/search/photos":
            pid = "e1"
            return _json({"total_pages": 1, "results": [{
                "id": pid, "urls": {"regular": f"{base}/missing.jpg?token={auth.split()[-1]}"},
                "links": {"html": f"https://unsplash.com/photos/{pid}?k={auth}", "download_location": ""},
                "user": {"name": auth, "username": "u", "links": {"html": "https://unsplash.com/@u"}},
            }, {
                "id": "e2", "urls": {"regular": f"{base}/ok.jpg"},
                "links": {"html": f"https://unsplash.com/photos/e2?k={auth}",
                          "download_location": f"{other.url}/track"},
                "user": {"name": auth, "username": "u", "links": {"html": "https://unsplash.com/@u"}},
            }]})
        if req.path == "/ok.jpg":
            return 200, {"Content-Type": "image/jpeg"}, _jpeg_bytes(1)
        return 404, {"Content-Type": "text/plain"}, b"no"

    other_calls: list[dict[str, str]] = []
    other = serve(lambda req: other_calls.append(req.headers) or _json({}))  # another origin
    base = serve(app).url
    monkeypatch.setenv("UNSPLASH_ACCESS_KEY", KEY)
    with pytest.raises(ElementalError) as e:
        list(open_source("unsplash", task, queries=["echo"], unsplash_api_url=base, allow_private_urls=True))
    assert "HTTP 400" in str(e.value) and KEY not in str(e.value)
    with open_source("unsplash", task, queries=["x"], unsplash_api_url=base, allow_private_urls=True) as stream:
        items = list(stream)
        for item in items:
            if isinstance(item, Photo):
                item.on_kept()  # download_location on another host: not called with the key
    assert [type(i).__name__ for i in items] == ["Rejected", "Photo"]
    assert "not tracked" in " ".join(stream.notes)
    assert other_calls == []  # the key goes to the API's own origin only
    _no_key_anywhere(items, stream.notes)


# -- a fake Openverse -----------------------------------------------------------------------------------


@dataclass
class FakeOpenverse:
    ids: list[str] = field(default_factory=lambda: [f"ov-{i}" for i in range(30)])
    requests: list[dict[str, str]] = field(default_factory=list)
    throttle_once: bool = False
    base: str = ""
    image_base: str = ""  # where item URLs point (default: this server)

    def app(self, req: Req) -> Reply:
        if req.path.startswith("/files/"):
            name = req.path.rsplit("/", 1)[1]
            if name == "ov-3.jpg":
                return 404, {"Content-Type": "text/html"}, b"<html>gone</html>"
            return 200, {"Content-Type": "image/jpeg"}, _jpeg_bytes(len(name))
        if req.path != "/v1/images/":
            return 404, {}, b""
        if self.throttle_once:
            self.throttle_once = False
            return _json({"detail": "throttled"}, 429, {"Retry-After": "0"})
        self.requests.append(req.query)
        page, size = int(req.query["page"]), int(req.query["page_size"])
        chunk = self.ids[(page - 1) * size : page * size]
        results = [{
            "id": i, "title": f"Photo {i}", "url": f"{self.image_base or self.base}/files/{i}.jpg",
            "foreign_landing_url": f"https://www.flickr.com/photos/x/{i}", "creator": "Bo Maker",
            "creator_url": "https://www.flickr.com/photos/bo", "license": "by", "license_version": "2.0",
            "license_url": "https://creativecommons.org/licenses/by/2.0/", "provider": "flickr", "source": "flickr",
            "mature": i == "ov-5",
        } for i in chunk]
        return _json({"result_count": len(self.ids), "page_count": -(-len(self.ids) // size), "page_size": size,
                      "page": page, "results": results})


def test_openverse_licence_per_photo_and_rejects(task, serve):
    fake = FakeOpenverse()
    fake.base = serve(fake.app).url
    with open_source("openverse", task, queries=["river"], num_images=25, unsplash_api_url=None,
                     openverse_api_url=fake.base, openverse_license_type="commercial",
                     allow_private_urls=True) as stream:
        photos, rejected = _collect(stream)
    assert len(photos) == 25
    assert [r.source_id for r in rejected] == ["ov-3"] and rejected[0].kind == "http_error"
    assert "ov-5" not in {p.source_id for p in photos}  # mature results are left out
    assert [q["page"] for q in fake.requests] == ["1", "2"]
    assert fake.requests[0] == {"q": "river", "page": "1", "page_size": "20", "category": "photograph",
                                "license_type": "commercial"}
    p = photos[0]
    assert p.source == "openverse" and p.source_id == "ov-0" and p.label is None
    assert p.attribution == {
        "provider": "flickr", "source": "flickr", "creator": "Bo Maker",
        "creator_url": "https://www.flickr.com/photos/bo", "title": "Photo ov-0", "license": "by",
        "license_version": "2.0", "license_url": "https://creativecommons.org/licenses/by/2.0/",
        "foreign_landing_url": "https://www.flickr.com/photos/x/ov-0", "link": "https://www.flickr.com/photos/x/ov-0",
        "credit": '"Photo ov-0" by Bo Maker is licensed under CC BY 2.0',
    }


def test_openverse_honours_a_short_retry_after(task, serve, monkeypatch):
    fake = FakeOpenverse(ids=["a", "b"], throttle_once=True)
    fake.base = serve(fake.app).url
    monkeypatch.setenv("OPENVERSE_API_URL", fake.base)  # the env var is the default base URL
    with open_source("openverse", task, queries=["x"], num_images=5, allow_private_urls=True) as stream:
        photos, _ = _collect(stream)
    assert [p.source_id for p in photos] == ["a", "b"] and len(fake.requests) == 1


# -- urls: ----------------------------------------------------------------------------------------------


@pytest.fixture
def web(serve) -> Server:
    big = b"\xff\xd8" + b"\x00" * 300_000

    def app(req: Req) -> Reply | None:
        h = req.handler
        if req.path == "/ok.jpg":
            return 200, {"Content-Type": "image/jpeg"}, _jpeg_bytes(5)
        if req.path == "/page.html":
            return 200, {"Content-Type": "text/html; charset=utf-8"}, b"<html>not a photo</html>"
        if req.path == "/drawing.svg":
            return 200, {"Content-Type": "image/svg+xml"}, b"<svg/>"
        if req.path == "/hang.jpg":
            server.release.wait(10)
            return 200, {"Content-Type": "image/jpeg"}, b""
        if req.path == "/big.jpg":
            return 200, {"Content-Type": "image/jpeg"}, big
        if req.path == "/stream.jpg":  # no Content-Length: the size is only found out by reading
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.end_headers()
            try:
                h.wfile.write(b"\xff\xd8\xff\xe0" + b"\x00" * 60)  # starts like a JPEG: only its size is wrong
                for _ in range(50):
                    h.wfile.write(b"\x00" * 10_000)
            except OSError:
                pass
            return None
        if req.path == "/moved":
            return 302, {"Location": "/ok.jpg"}, b""
        if req.path == "/loop":
            return 302, {"Location": "/loop"}, b""
        return 404, {"Content-Type": "text/html"}, b"<html>404</html>"

    server = serve(app)
    return server


def test_urls_source(task, web: Server, tmp_path: Path):
    u = web.url
    lines = ["# photos", "", f"{u}/ok.jpg", f"{u}/page.html", f"{u}/missing.jpg", f"  {u}/hang.jpg  ",
             f"{u}/big.jpg", f"{u}/stream.jpg", f"{u}/moved", f"{u}/loop", f"{u}/drawing.svg", f"{u}/ok.jpg"]
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    with open_source(f"urls:{tmp_path / 'urls.txt'}", task, timeout=0.5, max_bytes=100_000,
                     allow_private_urls=True) as stream:
        items = list(stream)
    assert time.monotonic() - t0 < 8
    got = {(i.source_id, type(i).__name__, getattr(i, "kind", "")) for i in items}
    assert [i.source_id for i in items] == [line.strip() for line in lines[2:]]  # in file order
    assert got == {
        (f"{u}/ok.jpg", "Photo", ""), (f"{u}/moved", "Photo", ""),
        (f"{u}/page.html", "Rejected", "not_an_image"), (f"{u}/drawing.svg", "Rejected", "not_an_image"),
        (f"{u}/missing.jpg", "Rejected", "http_error"), (f"{u}/loop", "Rejected", "http_error"),
        (f"{u}/hang.jpg", "Rejected", "timeout"),
        (f"{u}/big.jpg", "Rejected", "too_large"), (f"{u}/stream.jpg", "Rejected", "too_large"),
        (f"{u}/ok.jpg", "Rejected", "duplicate"),
    }
    by_id = {(i.source_id, type(i).__name__): i for i in items}
    assert by_id[(f"{u}/page.html", "Rejected")].reason == "content-type text/html: an HTML or XML page, not an image"
    assert "SVG" in by_id[(f"{u}/drawing.svg", "Rejected")].reason
    assert by_id[(f"{u}/missing.jpg", "Rejected")].reason == "HTTP 404 Not Found"
    assert "0.5 s" in by_id[(f"{u}/hang.jpg", "Rejected")].reason
    assert "stopped reading" in by_id[(f"{u}/stream.jpg", "Rejected")].reason
    assert str(by_id[(f"{u}/missing.jpg", "Rejected")]) == f"url {u}/missing.jpg: HTTP 404 Not Found"
    photo = by_id[(f"{u}/ok.jpg", "Photo")]
    assert photo.source == "url" and photo.data == _jpeg_bytes(5) and photo.name == f"{u}/ok.jpg"
    assert "line 12" in by_id[(f"{u}/ok.jpg", "Rejected")].reason


@pytest.mark.parametrize("bad", ["ftp://example.com/a.jpg", "file:///etc/passwd", "javascript:alert(1)",
                                 "example.com/photo.jpg", "http://"])
def test_urls_only_http(task, tmp_path: Path, bad: str):
    f = tmp_path / "list.txt"
    f.write_text(f"# ok\nhttps://example.com/a.jpg\n{bad}\n")
    with pytest.raises(ElementalError, match=rf"^{f}:3: "):
        open_source(f"urls:{f}", task)


def test_urls_file_missing_or_empty(task, tmp_path: Path):
    with pytest.raises(ElementalError, match="URL list not found"):
        open_source(f"urls:{tmp_path / 'nope.txt'}", task)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ElementalError, match="no URLs"):
        open_source(f"urls:{tmp_path / 'empty.txt'}", task)


# -- network safety: private addresses, trickling servers, sniffed content, stored URLs ----------------------


@pytest.mark.parametrize("host, private", [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("169.254.169.254", True), ("10.1.2.3", True),
    ("192.168.0.10", True), ("172.16.5.4", True), ("100.64.0.1", True), ("0.0.0.0", True), ("fc00::1", True),
    ("::ffff:127.0.0.1", True), ("8.8.8.8", False), ("1.1.1.1", False), ("2606:4700:4700::1111", False),
    ("no-such-host.invalid", False),  # does not resolve: the request itself fails on it
])
def test_private_hosts_are_recognised(host, private):
    assert is_private_host(host) is private


def test_downloads_to_private_addresses_are_refused_unless_allowed(task, web: Server, tmp_path: Path):
    (tmp_path / "urls.txt").write_text(f"{web.url}/ok.jpg\nhttp://169.254.169.254/latest/meta-data/\n")
    with open_source(f"urls:{tmp_path / 'urls.txt'}", task, timeout=0.5) as stream:
        items = list(stream)
    assert [type(i).__name__ for i in items] == ["Rejected", "Rejected"]
    assert {i.kind for i in items} == {"private_address"} and "--allow-private-urls" in items[0].reason
    with open_source(f"urls:{tmp_path / 'urls.txt'}", task, timeout=0.5, allow_private_urls=True) as stream:
        assert isinstance(next(stream), Photo)  # the user allowed it


def test_a_dns_answer_that_changes_after_the_check_cannot_reach_a_private_address(task, serve, monkeypatch):
    """DNS rebinding: a name resolves to a public address (8.8.8.8) the first time and to loopback afterwards. The
    connection is made to the address its own check saw, so the loopback server never sees a request (when the
    request hook checked and the connection resolved again, unchecked, the photo came from the loopback server)."""
    asked: list[str] = []
    local = serve(lambda req: (asked.append(req.path), (200, {"Content-Type": "image/jpeg"}, _jpeg_bytes(3)))[1])
    port = int(local.url.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    answered: list[str] = []

    def rebinding(host, *args, **kwargs):
        if host != "rebind.example":
            return real(host, *args, **kwargs)
        answered.append("8.8.8.8" if not answered else "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answered[-1], port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with net._client(0.5) as client:
        got = net._download(client, f"http://rebind.example:{port}/ok.jpg", 0.5, 1_000_000)
    # The request hook saw 8.8.8.8; the connection resolved once more, saw loopback, and refused it itself.
    assert answered == ["8.8.8.8", "127.0.0.1"] and asked == [], (answered, asked)
    assert got == ("private_address", "rebind.example is a loopback, private or link-local address: refused "
                                      "(--allow-private-urls allows it)")


def test_downloads_go_through_the_proxy_the_environment_names(task, serve, monkeypatch):
    """HTTP_PROXY is honoured: the proxy gets the absolute URL and answers for a host this machine cannot resolve
    (the connect-time check is for direct connections; a proxy resolves names itself)."""
    seen: list[str] = []
    proxy = serve(lambda req: (seen.append(req.handler.path), (200, {"Content-Type": "image/jpeg"}, _jpeg_bytes(4)))[1])
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with net._client(2.0) as client:
        got = net._download(client, "http://photos.example.invalid/ok.jpg", 2.0, 1_000_000)
    assert isinstance(got, bytes) and seen == ["http://photos.example.invalid/ok.jpg"]


def test_api_item_urls_and_redirects_to_private_addresses_are_refused(task, serve, web: Server):
    """The configured API base may be anywhere (the user chose it); what it points at may not."""
    fake = FakeOpenverse(ids=["a", "b"])
    fake.image_base = web.url  # item URLs on another loopback origin
    fake.base = serve(fake.app).url
    with open_source("openverse", task, queries=["x"], num_images=5, openverse_api_url=fake.base) as stream:
        photos, rejected = _collect(stream)
    assert not photos and {r.kind for r in rejected} == {"private_address"}
    assert fake.requests  # the API itself was asked
    hop = serve(lambda req: (302, {"Location": f"{web.url}/ok.jpg"}, b""))  # the API answers with a redirect
    with open_source("openverse", task, queries=["x"], num_images=5, openverse_api_url=hop.url) as stream:
        assert list(stream) == [] and stream.stopped_early
        assert any("loopback, private or link-local" in n for n in stream.notes)


def test_a_trickling_server_is_cut_off_at_the_total_deadline(task, serve, tmp_path: Path):
    """One byte every 0.1 s never trips the 0.5 s read timeout; only the total deadline (5 x 0.5 s) ends it."""
    def trickle(req: Req) -> Reply | None:
        h = req.handler
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.end_headers()
        try:
            h.wfile.write(b"\xff\xd8\xff\xe0")
            for _ in range(600):  # a minute, if nobody hangs up
                h.wfile.write(b"\x00")
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass
        return None

    server = serve(trickle)
    (tmp_path / "urls.txt").write_text(f"{server.url}/slow.jpg\n")
    t0 = time.monotonic()
    with open_source(f"urls:{tmp_path / 'urls.txt'}", task, timeout=0.5, allow_private_urls=True) as stream:
        item = next(stream)
    took = time.monotonic() - t0
    assert isinstance(item, Rejected) and item.kind == "timeout" and "longer than 2.5 s" in item.reason
    assert 2.5 <= took < 5, took


def test_what_a_server_sends_is_judged_by_its_bytes(task, serve, tmp_path: Path):
    jpeg = _jpeg_bytes(3)

    def app(req: Req) -> Reply:
        if req.path == "/octet":
            return 200, {"Content-Type": "application/octet-stream"}, jpeg
        if req.path == "/none":
            return 200, {}, jpeg
        return 200, {"Content-Type": "image/jpeg"}, b"<!DOCTYPE html><html><body>login</body></html>"

    server = serve(app)
    (tmp_path / "urls.txt").write_text("".join(f"{server.url}/{p}\n" for p in ("octet", "none", "liar.jpg")))
    with open_source(f"urls:{tmp_path / 'urls.txt'}", task, allow_private_urls=True) as stream:
        octet, none, liar = list(stream)
    assert isinstance(octet, Photo) and octet.data == jpeg and isinstance(none, Photo)
    assert isinstance(liar, Rejected) and liar.kind == "not_an_image" and "HTML" in liar.reason


def test_credentials_in_urls_are_never_stored(task, web: Server, tmp_path: Path):
    signed = (f"{web.url}/ok.jpg?w=800&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F2026"
              "&X-Amz-Signature=deadbeef&token=t0ps3cret&api_key=k3y&sig=abc")
    (tmp_path / "urls.txt").write_text(signed + "\n" + signed.replace("ok.jpg", "missing.jpg") + "\n")
    with open_source(f"urls:{tmp_path / 'urls.txt'}", task, allow_private_urls=True) as stream:
        photo, missing = list(stream)
    assert photo.data == _jpeg_bytes(5)  # downloaded with the full signed URL
    for stored in (photo.source_id, photo.location, missing.source_id, str(missing)):
        assert "w=800" in stored or "missing" in stored
        for secret in ("AKIAEXAMPLE", "deadbeef", "t0ps3cret", "k3y", "abc", "X-Amz"):
            assert secret not in stored, stored
    assert stored_url("https://u:p@example.com/a.jpg?size=2") == "https://example.com/a.jpg?size=2"
    assert stored_url("https://example.com/a.jpg?size=2") == "https://example.com/a.jpg?size=2"


def test_source_kinds_are_case_insensitive(task, tmp_path: Path):
    assert source_kind(" Unsplash") == source_kind("UNSPLASH") == "unsplash"
    assert source_kind("Folder:x") == "folder"
    root = tmp_path / "photos" / "water"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(_jpeg_bytes(1))
    assert [p.source_id for p in open_source(f"FOLDER:{tmp_path / 'photos'}", task)] == ["water/a.jpg"]


# -- folder: --------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_per_class_tree(task, tmp_path: Path):
    root = tmp_path / "photos"
    _write(root / "water" / "b.jpg", _jpeg_bytes(1))
    _write(root / "water" / "deep" / "a.png", _jpeg_bytes(2))
    _write(root / "fire" / "c.WEBP", _jpeg_bytes(3))
    _write(root / "fire" / "notes.txt", b"not a photo")
    _write(root / "fire" / ".DS_Store.jpg", b"hidden")
    _write(root / ".trash" / "x.jpg", b"hidden folder")
    _write(root / "fire" / "empty.jpg", b"")
    (root / "fire" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    _write(root / "water" / "IMG_0042", _jpeg_bytes(4))  # a camera file without a suffix: a photo by its bytes
    items = list(open_source(f"folder:{root}", task))
    photos = [i for i in items if isinstance(i, Photo)]
    assert [(p.source_id, p.label) for p in photos] == [
        ("fire/c.WEBP", "fire"), ("water/IMG_0042", "water"), ("water/b.jpg", "water"), ("water/deep/a.png", "water")
    ]
    assert photos[0].source == "local" and photos[0].data == _jpeg_bytes(3)
    assert photos[0].name == str(root / "fire" / "c.WEBP")
    rejected = {r.source_id: r for r in items if isinstance(r, Rejected)}
    assert set(rejected) == {"fire/empty.jpg", "fire/gone.jpg", "fire/notes.txt"}  # nothing skipped without a word
    assert "empty file" in rejected["fire/empty.jpg"].reason
    gone = rejected["fire/gone.jpg"].reason
    assert "broken symbolic link" in gone and "nowhere.jpg" in gone
    assert rejected["fire/notes.txt"].kind == "not_a_photo" and "suffix '.txt'" in rejected["fire/notes.txt"].reason
    skipped = list(open_source(f"folder:{root}", task, skip_ids={"water/b.jpg"}))
    assert "water/b.jpg" not in {i.source_id for i in skipped} and len(skipped) == len(items) - 1


def test_photo_whose_link_breaks_after_the_scan_is_rejected_with_the_target(tmp_path: Path):
    """A folder is scanned first and read later: a link broken in between is reported, not a crash."""
    link = tmp_path / "a.jpg"
    link.symlink_to(tmp_path / "elsewhere" / "a.jpg")
    got = folder._read_local(link, "a.jpg", "water")
    assert isinstance(got, Rejected) and got.kind == "unreadable"
    target = tmp_path / "elsewhere" / "a.jpg"
    assert got.reason == f"{link}: broken symbolic link (points to {target}, which does not exist)"
    gone = folder._read_local(tmp_path / "b.jpg", "b.jpg", "water")
    assert isinstance(gone, Rejected) and "disappeared before it was read" in gone.reason


def test_flat_folder_goes_to_the_labeler(task, tmp_path: Path):
    root = tmp_path / "inbox"
    _write(root / "b.jpg", _jpeg_bytes(1))
    _write(root / "a.gif", _jpeg_bytes(2))
    _write(root / "2023" / "trip" / "c.heic", b"heic bytes")
    photos = list(open_source(f"folder:{root}", task))
    assert [(p.source_id, p.label) for p in photos] == [("2023/trip/c.heic", None), ("a.gif", None), ("b.jpg", None)]


def test_folder_errors(task, tmp_path: Path):
    with pytest.raises(ElementalError, match="source folder not found"):
        open_source(f"folder:{tmp_path / 'nope'}", task)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ElementalError, match="no photos found"):
        open_source(f"folder:{tmp_path / 'empty'}", task)
    tree = tmp_path / "tree"
    _write(tree / "water" / "a.jpg", _jpeg_bytes(1))
    _write(tree / "Lava" / "b.jpg", _jpeg_bytes(2))
    with pytest.raises(ElementalError, match=r"tree/Lava: folder name 'Lava' is not one of the task's labels \['wat"):
        open_source(f"folder:{tree}", task)
    mixed = tmp_path / "mixed"
    _write(mixed / "water" / "a.jpg", _jpeg_bytes(1))
    _write(mixed / "stray.jpg", _jpeg_bytes(2))
    with pytest.raises(ElementalError, match=r"mixed: has photos directly in it and class folders \['water'\]"):
        open_source(f"folder:{mixed}", task)


# -- json: ----------------------------------------------------------------------------------------------


def _seed_json(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    for r in records:
        if isinstance(r, dict) and "image_path" in r and not r["image_path"].startswith("missing"):
            _write(tmp_path / r["image_path"], _jpeg_bytes(len(r["image_path"])))
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(records))
    return path


def _rec(i: int, **kw: Any) -> dict[str, Any]:
    return {"image_id": f"id{i}", "image_path": f"images/p{i}.jpg", "element": "fire", "reason": "flames",
            "confidence": 0.9, **kw}


def test_json_import(task, tmp_path: Path):
    attribution = {"provider": "unsplash", "photographer": "Ann"}
    path = _seed_json(tmp_path, [_rec(0), _rec(1, element="water", confidence=0.75, source="unsplash",
                                                 source_id="abc", attribution=attribution)])
    photos = list(open_source(f"json:{path}", task))
    assert [(p.source, p.source_id, p.label, p.reason, p.confidence) for p in photos] == [
        ("local", "images/p0.jpg", "fire", "flames", 0.9), ("unsplash", "abc", "water", "flames", 0.75)
    ]
    assert photos[1].attribution == attribution and photos[0].data == (tmp_path / "images/p0.jpg").read_bytes()
    assert photos[0].on_kept is None


@pytest.mark.parametrize("bad,where", [
    ({"reason": None}, r"\[1\]\.reason"),
    ({"element": "lava"}, r"\[1\]\.element: 'lava' is not one of the task's labels"),
    ({"confidence": 1.5}, r"\[1\]\.confidence"),
    ({"image_path": "missing/x.jpg"}, r"\[1\]\.image_path: image not found"),
])
def test_json_errors_name_file_index_field(task, tmp_path: Path, bad: dict[str, Any], where: str):
    second = {k: v for k, v in _rec(1, **bad).items() if v is not None}
    path = _seed_json(tmp_path, [_rec(0), second])
    with pytest.raises(ElementalError, match=rf"custom\.json{where}"):
        open_source(f"json:{path}", task)


def test_json_not_a_list_or_missing(task, tmp_path: Path):
    with pytest.raises(ElementalError, match="json source not found"):
        open_source(f"json:{tmp_path / 'x.json'}", task)
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(ElementalError, match="expected a JSON list"):
        open_source(f"json:{tmp_path / 'obj.json'}", task)


def test_unknown_source_spec(task):
    with pytest.raises(ElementalError, match="unknown source 'flickr:x'"):
        open_source("flickr:x", task)
    with pytest.raises(ElementalError, match="needs a path"):
        open_source("folder:", task)
    with pytest.raises(ElementalError, match="takes no argument"):
        open_source("openverse:cats", task)
