"""Photo sources for `elemental prepare` (`--source`, DESIGN §6): where photos come from, fetched as bytes.

One spec string per source, mixed freely in one dataset:

- `folder:PATH`  local photos, recursive. A folder-per-class tree (PATH/<label>/...) keeps its labels;
  a flat folder (photos directly in PATH) goes to the teacher (label None).
- `urls:FILE`    one http(s) URL a line; bounded size, timeout, content-type check.
- `json:FILE`    the seed's custom JSON (records with image_id, image_path, element, reason, confidence).
- `unsplash`     the Unsplash API, following its API guidelines (hotlinked downloads, download tracking
  for every kept photo, attribution with referral links, rate limits respected).
- `openverse`    openly licensed photos through the Openverse API, licence recorded per photo.

`open_source` checks everything it can before a single photo is read (a missing folder, a class
folder off the label list, a `file://` line, a missing API key are ElementalErrors naming the thing),
then returns a lazy stream of `Photo`s and `Rejected`s: a photo that cannot be had (404, HTML instead
of an image, a timeout, an unreadable file) is recorded with its reason and the run goes on. A
rate-limited API ends its stream cleanly with what it collected and a note in `stream.notes`; a
re-run that passes the collected ids as `skip_ids` continues where it stopped.

Secrets: the Unsplash key travels only in the Authorization header and only to the API's own origin
(never to image hosts, never in a URL); every message built here is scrubbed of it as well. URLs that
are stored (source ids, locations, reasons) lose query parameters that look like credentials
(signatures, tokens, keys: `stored_url`).

Network safety: every download and every redirect goes to public addresses only. A URL, a redirect
or an API item URL that resolves to a loopback, private, link-local (169.254.169.254) or otherwise
non-global address is refused unless `allow_private_urls` (`--allow-private-urls`), at connect time on the
address the connection is made to (a name resolved once for the check and again for the connection would let
DNS rebinding through); the configured API base itself is the user's choice and exempt. A download has a
total deadline (5x the timeout) checked as every piece arrives, so a server that trickles a byte at a time
cannot hold a run. What a server sends is judged by its bytes, not its Content-Type: a JPEG served as
application/octet-stream is a photo, an HTML page served as image/jpeg is not.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpcore
import httpx

from .. import __version__
from ..errors import ElementalError
from ..fileio import broken_link
from ..images import IMAGE_SUFFIXES, SNIFF_BYTES, looks_like_image
from ..task import Task
from .records import load_split

log = logging.getLogger(__name__)

SOURCE_KINDS = "folder:PATH, urls:FILE, json:FILE, unsplash, openverse"
DEFAULT_UNSPLASH_API_URL = "https://api.unsplash.com"
DEFAULT_OPENVERSE_API_URL = "https://api.openverse.org"
UNSPLASH_TERMS_NOTE = (
    "Unsplash's API terms do not allow using Unsplash photos to train machine-learning or AI models "
    "without a separate data licence from Unsplash (https://unsplash.com/api-terms, https://unsplash.com/data): "
    "make sure you hold one before training on photos from the unsplash source."
)
# Unsplash's guidelines ask for these on every link back to a photo or photographer.
UNSPLASH_UTM = {"utm_source": "elemental", "utm_medium": "referral"}
UNSPLASH_LICENSE = ("Unsplash License", "https://unsplash.com/license")
UNSPLASH_PER_PAGE = 30  # the API's maximum: fewest search calls per photo under a 50/hour demo limit
UNSPLASH_DOWNLOAD_WIDTH = 1024  # prepare stores photos with a 1024-px long side; no need for more
OPENVERSE_PAGE_SIZE = 20  # the most an anonymous Openverse client may ask for
OPENVERSE_CATEGORY = "photograph"  # this tool classifies photos, not illustrations or scanned artworks
USER_AGENT = f"elemental/{__version__} (photo dataset builder)"
DOWNLOAD_WORKERS = 4  # downloads in flight at once; photos are still yielded in order
MAX_REDIRECTS = 5
RETRIES = 2  # extra tries of an API call after a timeout, network error or 5xx
RETRY_BACKOFF_S = 0.5  # doubles each retry
MAX_RETRY_AFTER_S = 30.0  # a longer Retry-After stops the source cleanly instead of sleeping

SourceName = Literal["local", "url", "unsplash", "openverse"]


@dataclass(slots=True)
class Photo:
    """One photo from a source, its bytes already fetched (decoding happens in prepare)."""

    data: bytes
    source: SourceName
    source_id: str  # provider photo id, the URL, or the path relative to the folder
    label: str | None = None  # known label (folder-per-class tree, json import); None -> teacher labels it
    reason: str | None = None
    confidence: float | None = None
    # photographer/creator, links, license, license_url, provider, credit (a ready-made credit line)
    attribution: dict[str, Any] | None = None
    on_kept: Callable[[], None] | None = None  # call once if the photo is kept (Unsplash download tracking)
    location: str | None = None  # the file path or URL the bytes came from, for messages

    @property
    def name(self) -> str:
        """What to call the photo in a message: its file path or URL, else `source:id`."""
        return self.location or f"{self.source}:{self.source_id}"


@dataclass
class Rejected:
    """A photo that could not be had; the run goes on and the reason is recorded."""

    source: str
    source_id: str
    reason: str
    # A short category to count rejects by: http_error, not_an_image, too_large, timeout,
    # network_error, unreadable, duplicate, bad_answer.
    kind: str = "unavailable"

    def __str__(self) -> str:
        return f"{self.source} {self.source_id}: {self.reason}"


class PhotoStream(Iterator["Photo | Rejected"]):
    """What `open_source` returns: an iterator of photos and rejects, plus what a person should know.

    `notes` collects messages such as an early stop at a rate limit (also logged as warnings);
    `close()` ends downloads in flight and releases connections (iterating to the end does too,
    except that Unsplash keeps its API connection for `on_kept` calls until `close()`).
    """

    def __init__(self, spec: str, items: Iterator[Photo | Rejected], notes: list[str],
                 on_close: Callable[[], None] | None = None,
                 stopped_early: Callable[[], bool] | None = None) -> None:
        self.spec = spec
        self.notes = notes
        self._items = items
        self._on_close = on_close
        self._stopped_early = stopped_early

    @property
    def stopped_early(self) -> bool:
        """True when an API source ended at a rate limit or an outage: a re-run would collect more."""
        return bool(self._stopped_early and self._stopped_early())

    def __next__(self) -> Photo | Rejected:
        return next(self._items)

    def close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> PhotoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def source_kind(spec: str) -> str:
    """A source spec's kind, as open_source reads it: `Unsplash`, ` unsplash` and `unsplash` are one kind."""
    return spec.partition(":")[0].strip().lower()


def open_source(
    spec: str,
    task: Task,
    *,
    queries: list[str] | None = None,
    num_images: int = 1000,
    unsplash_api_url: str | None = None,
    openverse_api_url: str | None = None,
    timeout: float = 20,
    max_bytes: int = 25_000_000,
    skip_ids: set[str] | None = None,
    openverse_license_type: str | None = None,
    allow_private_urls: bool = False,
) -> PhotoStream:
    """Check the source `spec` and return a lazy stream of its photos (see the module docstring).

    `queries` are the search terms for unsplash/openverse (default: the task's labels), searched in
    turn page by page so every query contributes. `num_images` caps the photos an API source yields
    (file sources yield all; the caller stops when it has enough). `skip_ids` are source_ids already
    collected: they are neither downloaded nor yielded, which is what makes a re-run after a rate
    limit continue instead of starting over. `timeout` is per connect/read (a whole download may take
    at most 5x this); `max_bytes` caps a download. `openverse_license_type` is Openverse's
    `license_type` filter ("commercial", "modification", or both comma-separated); default: every
    open licence. `allow_private_urls` lets downloads reach loopback and private addresses (module docstring).
    """
    _, sep, arg = spec.partition(":")
    kind = source_kind(spec)
    skip = frozenset(skip_ids or ())
    if num_images < 1:
        raise ElementalError(f"num_images must be at least 1, got {num_images}")
    if timeout <= 0 or max_bytes < 1:
        raise ElementalError(f"timeout and max_bytes must be positive, got {timeout} and {max_bytes}")
    if kind in ("folder", "urls", "json"):
        if not sep or not arg.strip():
            raise ElementalError(f"source {spec!r}: {kind}: needs a path, e.g. {kind}:PATH")
        path = Path(arg.strip()).expanduser()
        if kind == "folder":
            return _folder_source(spec, path, task, skip)
        if kind == "json":
            return _json_source(spec, path, task, skip)
        return _urls_source(spec, path, skip, timeout, max_bytes, allow_private_urls)
    if kind in ("unsplash", "openverse"):
        if sep and arg.strip():
            raise ElementalError(f"source {spec!r}: {kind} takes no argument (search terms come from --query)")
        terms = [q.strip() for q in (queries or []) if q.strip()] or list(task.labels)
        if kind == "unsplash":
            return _UnsplashSource(spec, terms, num_images, unsplash_api_url, timeout, max_bytes, skip,
                                   allow_private_urls).stream()
        return _OpenverseSource(spec, terms, num_images, openverse_api_url, timeout, max_bytes, skip,
                                allow_private_urls, openverse_license_type).stream()
    raise ElementalError(f"unknown source {spec!r} (supported: {SOURCE_KINDS})")


# -- folder: ------------------------------------------------------------------------------------------


def _folder_source(spec: str, root: Path, task: Task, skip: frozenset[str]) -> PhotoStream:
    files, others = _scan_folder(root, task)
    notes: list[str] = []

    def photos() -> Iterator[Photo | Rejected]:
        for path, rel, label in files:
            if rel in skip:
                continue
            yield _read_local(path, rel, label)
        for path, rel in others:  # never a silent skip: every file that is not a photo is reported
            yield Rejected("local", rel, f"{path}: {_not_a_photo(path)}; skipped", "not_a_photo")

    return PhotoStream(spec, photos(), notes)


def _is_photo_file(path: Path) -> bool:
    """A photo by its suffix, or (no or an unknown suffix: cameras and phones write such files) by its first bytes."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return looks_like_image(f.read(SNIFF_BYTES))
    except OSError:
        return False


def _not_a_photo(path: Path) -> str:
    if problem := broken_link(path):
        return problem
    kind = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
    return f"not a photo file ({kind}, and its content is not a photo format)"


def _scan_folder(root: Path, task: Task) -> tuple[list[tuple[Path, str, str | None]], list[tuple[Path, str]]]:
    """(path, path relative to root, label) of every photo under `root`, sorted; labels checked now. Also the
    other files found (path, relative path), which the source reports as skipped.

    Photos directly in `root` make it a flat folder (everything under it goes to the teacher); only
    subfolders make it a folder-per-class tree, and then every subfolder must be a label: a typo such
    as `Water/` must fail loudly, not silently turn a labelled set into an unlabelled one.
    """
    if not root.is_dir():
        raise ElementalError(f"source folder not found: {root}")
    entries = [e for e in sorted(root.iterdir()) if not e.name.startswith(".")]
    subdirs = [e for e in entries if e.is_dir() and not e.is_symlink()]
    top_files = [e for e in entries if not e.is_dir()]
    top_photos = any(e.is_file() and _is_photo_file(e) for e in top_files)  # stops at the first photo
    labels = list(task.labels)
    found: list[tuple[Path, str, str | None]] = []
    others: list[tuple[Path, str]] = []
    if top_photos:
        class_dirs = [d.name for d in subdirs if d.name in task.labels]
        if class_dirs:
            raise ElementalError(
                f"{root}: has photos directly in it and class folders {class_dirs}; put every photo in a "
                f"class folder (one of {labels}), or use a flat folder without class folders for the labeler"
            )
        photos, rest = _files_under(root)
        found = [(p, p.relative_to(root).as_posix(), None) for p in photos]
        others = [(p, p.relative_to(root).as_posix()) for p in rest]
    else:
        for d in subdirs:
            if d.name not in task.labels:
                raise ElementalError(
                    f"{d}: folder name {d.name!r} is not one of the task's labels {labels} (in a "
                    f"folder-per-class tree every subfolder is a label; a flat folder of photos goes to the labeler)"
                )
        others = [(p, p.relative_to(root).as_posix()) for p in top_files]
        for d in subdirs:
            photos, rest = _files_under(d)
            found.extend((p, p.relative_to(root).as_posix(), d.name) for p in photos)
            others.extend((p, p.relative_to(root).as_posix()) for p in rest)
    if not found:
        raise ElementalError(f"{root}: no photos found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, and at "
                             "the content of files without these suffixes)")
    return found, others


def _files_under(folder: Path) -> tuple[list[Path], list[Path]]:
    """(photo files, other files) under `folder`, recursively, sorted; hidden files and folders and
    symlinked folders are left out (documented, as a system's own files)."""
    photos: list[Path] = []
    others: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                (photos if path.is_file() and _is_photo_file(path) else others).append(path)
    key = lambda p: p.relative_to(folder).as_posix()  # noqa: E731
    return sorted(photos, key=key), sorted(others, key=key)


def _read_local(path: Path, rel: str, label: str | None, **extra: Any) -> Photo | Rejected:
    """A local photo's bytes as a Photo; a file that cannot be read (gone, no permission, empty) is a Rejected."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if problem := broken_link(path):
            return Rejected("local", rel, f"{path}: {problem}", "unreadable")
        return Rejected("local", rel, f"{path}: file disappeared before it was read", "unreadable")
    except OSError as e:
        return Rejected("local", rel, f"{path}: cannot read ({e.strerror or e})", "unreadable")
    if not data:
        return Rejected("local", rel, f"{path}: empty file (0 bytes), not an image", "unreadable")
    source = extra.pop("source", None) or "local"
    source_id = extra.pop("source_id", None) or rel
    return Photo(data=data, source=source, source_id=source_id, label=label, location=str(path), **extra)


# -- json: --------------------------------------------------------------------------------------------


def _json_source(spec: str, path: Path, task: Task, skip: frozenset[str]) -> PhotoStream:
    """The seed's custom JSON: every record checked now (errors name file[index].field), photos read lazily.

    Records keep any provenance they carry (`source`, `source_id`, `attribution`): re-importing a
    dataset built from Unsplash must not turn its photos into anonymous local files.
    """
    if not path.is_file():
        raise ElementalError(f"json source not found: {path}")
    # load_split's rules are the dataset's: the same checks and messages as for train.json.
    as_file = str(path) if ("/" in str(path) or str(path).endswith(".json")) else f"./{path}"
    records = load_split(path.parent, as_file, task, check_images=True)
    base = path.parent

    def photos() -> Iterator[Photo | Rejected]:
        for record in records:
            source_id = record.source_id or record.image_path
            if source_id in skip:
                continue
            yield _read_local(
                base / record.image_path, record.image_path, record.element,
                source=record.source or "local", source_id=source_id, reason=record.reason,
                confidence=record.confidence, attribution=record.attribution,
            )

    return PhotoStream(spec, photos(), [])


# -- downloads ----------------------------------------------------------------------------------------


class _Refused(httpx.RequestError):
    """A request to an address the user did not allow (loopback, private, link-local, ...)."""


def _is_global(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


def is_private_host(host: str) -> bool:
    """Whether `host` (a name or an IP literal) resolves to any address that is not globally routable.

    Loopback, private ranges, link-local (cloud metadata at 169.254.169.254), carrier-grade NAT,
    multicast, reserved and unspecified addresses all count, IPv4-mapped IPv6 included. A name that
    does not resolve is left to the request itself to fail on.
    """
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return False
    return not all(_is_global(str(info[4][0])) for info in infos)


class _VettedBackend(httpcore.SyncBackend):
    """Connects only to an address it checked itself: the name is resolved once, here, and the connection goes to
    that very address. Checking a name and then letting the connection resolve it again would let a DNS answer that
    changes in between (rebinding) reach a private address. TLS still names the host (httpcore sends the hostname
    for SNI and in the Host header), so certificates are checked as usual. `exempt` is the (host, port) of an API
    the user configured, which may be anywhere."""

    def __init__(self, exempt: tuple[str, int] | None) -> None:
        self._exempt = exempt

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        if (host, port) == self._exempt:
            return super().connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise httpcore.ConnectError(f"{host}: cannot be resolved ({e})") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not all(_is_global(a) for a in addresses):
            raise _Refused(f"{host} is a loopback, private or link-local address: refused (--allow-private-urls "
                           "allows it)")
        for address in addresses[:-1]:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                continue
        return super().connect_tcp(addresses[-1], port, timeout, local_address, socket_options)


class _VettedTransport(httpx.HTTPTransport):
    """httpx's own transport whose connections go through _VettedBackend. httpx takes no network backend, so its
    connection pool is replaced; tests/test_sources.py's rebinding test fails should httpx stop using it."""

    def __init__(self, exempt: tuple[str, int] | None) -> None:
        super().__init__(retries=0)
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(),
                                             network_backend=_VettedBackend(exempt))


def _env_proxy() -> bool:
    """Whether the environment names a proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY), which httpx then uses: a client
    given a transport of its own ignores them, and the proxy resolves names itself anyway."""
    return any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "all"))


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _guard(allow_private: bool, exempt: str | None = None) -> list[Callable[[httpx.Request], None]]:
    """httpx request hooks (run for every request, redirects included) refusing non-public addresses.

    `exempt` is an origin the user configured themselves (an API base URL), which may be anywhere.
    """
    if allow_private:
        return []
    exempt_origin = _origin(httpx.URL(exempt)) if exempt else None

    def check(request: httpx.Request) -> None:
        if exempt_origin is not None and _origin(request.url) == exempt_origin:
            return
        if is_private_host(request.url.host):
            raise _Refused(f"{request.url.host} is a loopback, private or link-local address: refused "
                           "(--allow-private-urls allows it)", request=request)

    return [check]


def _client(timeout: float, headers: dict[str, str] | None = None, *, allow_private: bool = False,
            exempt: str | None = None) -> httpx.Client:
    """A client that refuses non-public addresses (unless `allow_private`): by name before each request (redirects
    included; all that can be checked when a proxy connects for us) and, connecting directly, on the very address
    it connects to."""
    exempt_at = None
    if exempt:
        url = httpx.URL(exempt)
        exempt_at = (url.host, url.port or (443 if url.scheme == "https" else 80))
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        event_hooks={"request": _guard(allow_private, exempt)},
        transport=None if allow_private or _env_proxy() else _VettedTransport(exempt_at),
    )


def _short(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


# Query parameters that carry credentials in signed or tokenised URLs (S3/GCS/Azure/CloudFront signatures,
# API keys, access tokens): never stored in train.json, metadata.json or report.html.
_SECRET_PARAM = re.compile(r"(?i)^(x-amz-.*|x-goog-.*|.*sig.*|.*token.*|.*key.*|.*secret.*|.*passw.*|.*auth.*|"
                           r".*credential.*|policy|key-pair-id|code)$")


def stored_url(url: str) -> str:
    """`url` as it may be stored: without user info and without query parameters that look like credentials."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return url
    kept = [(k, v) for k, v in u.params.multi_items() if not _SECRET_PARAM.match(k)]
    if len(kept) == len(list(u.params.multi_items())) and not u.userinfo:
        return url
    return str(u.copy_with(userinfo=b"", query=None).copy_merge_params(httpx.QueryParams(kept)))


def _download(client: httpx.Client, url: str, timeout: float, max_bytes: int) -> bytes | tuple[str, str]:
    """The body of `url` if it is an image of at most `max_bytes`; else (kind, reason) for a Rejected.

    The body is streamed and reading stops at the limit, so a huge (or endless) answer costs at most
    `max_bytes` of memory; the limit applies after content decoding, so a gzip bomb is caught too.
    The total deadline (5x `timeout`) is checked as each piece arrives, so a trickling server is cut
    off at most one read timeout after it. Whether it is an image is read from its first bytes.
    """
    limit = 5 * timeout
    deadline = time.monotonic() + limit
    try:
        with client.stream("GET", url) as r:
            if not r.is_success or r.status_code == 204:
                return "http_error", f"HTTP {r.status_code} {r.reason_phrase}".strip()
            ctype = r.headers.get("content-type", "").split(";")[0].strip().lower() or "(none)"
            length = r.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                return "too_large", f"{int(length)} bytes is over the {max_bytes}-byte limit"
            body = bytearray()
            sniffed = False
            for chunk in r.iter_bytes():  # as it arrives: the deadline is checked after every read
                body += chunk
                if not sniffed and len(body) >= SNIFF_BYTES:
                    sniffed = True
                    if not looks_like_image(bytes(body[:SNIFF_BYTES])):
                        return "not_an_image", _not_an_image(ctype, bytes(body[:SNIFF_BYTES]))
                if len(body) > max_bytes:
                    return "too_large", f"over the {max_bytes}-byte limit (stopped reading)"
                if time.monotonic() > deadline:
                    return "timeout", f"download took longer than {limit:g} s (stopped reading)"
            if not body:
                return "not_an_image", "empty body"
            if not sniffed and not looks_like_image(bytes(body)):
                return "not_an_image", _not_an_image(ctype, bytes(body))
            return bytes(body)
    except _Refused as e:
        return "private_address", str(e)
    except httpx.TimeoutException:
        return "timeout", f"no answer within {timeout:g} s"
    except httpx.TooManyRedirects:
        return "http_error", f"more than {MAX_REDIRECTS} redirects"
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        return "network_error", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _not_an_image(ctype: str, head: bytes) -> str:
    text = head.lstrip().lower()
    if ctype == "image/svg+xml" or text.startswith((b"<svg", b"<?xml")):
        return f"content-type {ctype}: a vector drawing (SVG), not a photo"
    if text.startswith((b"<!doctype html", b"<html", b"<")):
        return f"content-type {ctype}: an HTML or XML page, not an image"
    return f"content-type {ctype}, and its bytes are not a photo format (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC)"


def _prefetch(jobs: Iterable[Callable[[], Any]], workers: int) -> Iterator[Any]:
    """Results of `jobs` in order, with up to `workers` running ahead in threads (downloads overlap)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="elemental-download")
    pending: deque[Future[Any]] = deque()
    it = iter(jobs)
    try:
        for job in it:
            pending.append(pool.submit(job))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# -- urls: --------------------------------------------------------------------------------------------


def _read_url_list(path: Path) -> list[tuple[int, str]]:
    """(line number, URL) of every URL line; blank lines and # comments skipped; anything but http(s) refused."""
    if not path.is_file():
        raise ElementalError(f"URL list not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ElementalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            url = httpx.URL(line)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise ElementalError(f"{where}: not a valid URL: {_short(line)!r}") from None
        if url.scheme not in ("http", "https"):
            scheme = f"a {url.scheme}: URL" if url.scheme else "a URL without http:// or https://"
            raise ElementalError(f"{where}: only http(s) URLs are allowed, got {scheme}: {_short(line)!r}")
        if not url.host:
            raise ElementalError(f"{where}: URL has no host: {_short(line)!r}")
        out.append((lineno, line))
    if not out:
        raise ElementalError(f"{path}: no URLs (one http(s) URL per line; # starts a comment)")
    return out


def _urls_source(spec: str, path: Path, skip: frozenset[str], timeout: float, max_bytes: int,
                 allow_private: bool) -> PhotoStream:
    lines = _read_url_list(path)
    client = _client(timeout, allow_private=allow_private)

    def fetch(url: str) -> Callable[[], Photo | Rejected]:
        def job() -> Photo | Rejected:
            got = _download(client, url, timeout, max_bytes)
            if isinstance(got, tuple):
                return Rejected("url", stored_url(url), got[1], got[0])
            return Photo(data=got, source="url", source_id=stored_url(url), location=stored_url(url))

        return job

    def jobs() -> Iterator[Callable[[], Photo | Rejected]]:
        first_line: dict[str, int] = {}
        for lineno, url in lines:
            if stored_url(url) in skip:
                continue
            if url in first_line:
                reason = f"duplicate of {path}:{first_line[url]} (line {lineno})"
                yield lambda url=url, reason=reason: Rejected("url", stored_url(url), reason, "duplicate")
                continue
            first_line[url] = lineno
            yield fetch(url)

    def photos() -> Iterator[Photo | Rejected]:
        try:
            yield from _prefetch(jobs(), DOWNLOAD_WORKERS)
        finally:
            client.close()

    return PhotoStream(spec, photos(), [], on_close=client.close)


# -- search APIs --------------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends an API source cleanly (rate limit, outage); the message becomes a note."""


def _api_base(given: str | None, env: str, default: str, what: str) -> str:
    base = (given or os.environ.get(env) or default).strip().rstrip("/")
    try:
        url = httpx.URL(base)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ElementalError(f"{what} API URL is not a valid URL: {base!r}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ElementalError(f"{what} API URL must be an http(s) URL, got {base!r}")
    return base


def _same_origin(a: str, b: str) -> bool:
    try:
        ua, ub = httpx.URL(a), httpx.URL(b)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    return (ua.scheme, ua.host, ua.port) == (ub.scheme, ub.host, ub.port)


def _with_params(url: str, params: dict[str, str]) -> str:
    try:
        return str(httpx.URL(url).copy_merge_params(params))
    except (httpx.InvalidURL, ValueError, TypeError):
        return url


def _interleave(pages: list[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """One result of each query's page in turn, so every query contributes to a capped stream."""
    for i in range(max((len(p) for p in pages), default=0)):
        for page in pages:
            if i < len(page):
                yield page[i]


class _SearchSource:
    """Shared paging, retries, rate-limit handling and downloading of the two search APIs."""

    name: SourceName
    what: str

    def __init__(self, spec: str, queries: list[str], num_images: int, timeout: float, max_bytes: int,
                 skip: frozenset[str], allow_private: bool) -> None:
        self.spec = spec
        self.allow_private = allow_private
        self.stopped_early = False  # a rate limit or an outage ended the stream before the API ran out
        self.queries = queries
        self.num_images = num_images
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.skip = skip
        self.notes: list[str] = []
        self.yielded = 0
        self._secret: str | None = None
        self._download_client = _client(timeout, allow_private=allow_private)

    # subclasses
    def _search(self, query: str, page: int) -> tuple[list[dict[str, Any]], bool]:
        """One page of results and whether more pages follow."""
        raise NotImplementedError

    def _photo(self, item: dict[str, Any], data: bytes) -> Photo:
        raise NotImplementedError

    def _download_url(self, item: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def _may_yield(self) -> bool:
        """Whether another photo may be handed out (Unsplash: budget left for its tracking call)."""
        return True

    def _before_search(self) -> None:
        """Raise _Stop when another search would break the API's limits."""

    def _handed_out(self) -> None:
        """Hook: a photo is about to be yielded."""

    # shared
    def stream(self) -> PhotoStream:
        return PhotoStream(self.spec, self._photos(), self.notes, on_close=self.close,
                           stopped_early=lambda: self.stopped_early)

    def close(self) -> None:
        self._download_client.close()

    def scrub(self, text: str) -> str:
        """`text` with the API key cut out: no message built here may carry it."""
        return text.replace(self._secret, "[redacted]") if self._secret else text

    def note(self, text: str) -> None:
        text = self.scrub(text)
        self.notes.append(text)
        log.warning("%s", text)

    def _photos(self) -> Iterator[Photo | Rejected]:
        try:
            for item in self._items():
                if self.yielded >= self.num_images:
                    return
                if isinstance(item, Photo) and not self._may_yield():
                    self.stopped_early = True
                    self.note(
                        f"{self.what}: API rate limit reached after {self.yielded} new photo(s); stopped cleanly. "
                        "Run again later (the limit resets hourly) to continue: photos already collected are skipped."
                    )
                    return
                if isinstance(item, Photo):
                    self.yielded += 1
                    self._handed_out()
                yield item
        except _Stop as stop:
            self.stopped_early = True
            self.note(f"{self.what}: {stop} Stopped after {self.yielded} new photo(s); run again later to continue.")
        finally:
            self._download_client.close()

    def _items(self) -> Iterator[Photo | Rejected]:
        """Search every query page by page, in turn, and download the results (ahead, in threads)."""
        page = {q: 1 for q in self.queries}
        active = list(self.queries)
        seen: set[str] = set()
        while active:
            pages: list[list[dict[str, Any]]] = []
            for q in list(active):
                self._before_search()
                results, more = self._search(q, page[q])
                page[q] += 1
                if not more or not results:
                    active.remove(q)
                pages.append(results)
            fresh: list[dict[str, Any]] = []
            for item in _interleave(pages):
                pid = str(item.get("id") or "")
                if not pid or pid in seen or pid in self.skip:
                    continue
                seen.add(pid)
                fresh.append(item)
            # Lazy: when the consumer has enough (or _photos stops at num_images), the downloads still
            # in flight are cancelled, so at most DOWNLOAD_WORKERS photos are fetched in vain.
            yield from _prefetch((lambda it=it: self._fetch(it) for it in fresh), DOWNLOAD_WORKERS)

    def _fetch(self, item: dict[str, Any]) -> Photo | Rejected:
        pid = str(item["id"])
        url = self._download_url(item)
        if not url:
            return Rejected(self.name, pid, "no download URL in the API's answer", "bad_answer")
        if httpx.URL(url).scheme not in ("http", "https"):
            return Rejected(self.name, pid, f"download URL is not http(s): {_short(stored_url(url))}", "bad_answer")
        got = _download(self._download_client, url, self.timeout, self.max_bytes)
        if isinstance(got, tuple):
            return Rejected(self.name, pid, self.scrub(f"{_short(stored_url(url))}: {got[1]}"), got[0])
        return self._photo(item, got)

    def _get_json(self, client: httpx.Client, url: str, params: dict[str, Any] | None, what: str) -> httpx.Response:
        """GET an API URL with bounded retries on timeouts, network errors, 5xx and short Retry-After 429s.

        Returns the final response (any status); raises _Stop when the API stays unreachable.
        """
        delay = RETRY_BACKOFF_S
        for attempt in range(RETRIES + 1):
            last = attempt == RETRIES
            try:
                r = client.get(url, params=params)
            except _Refused as e:
                raise _Stop(self.scrub(f"{what}: {e}.")) from None
            except httpx.TimeoutException:
                problem = f"no answer within {self.timeout:g} s"
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            else:
                self._saw(r)
                if r.status_code == 429:
                    wait = _retry_after(r)
                    if wait is None or wait > MAX_RETRY_AFTER_S or last:
                        raise _Stop(f"{what}: rate limited (HTTP 429, Retry-After {r.headers.get('retry-after')})")
                    time.sleep(wait)
                    continue
                if r.status_code < 500:
                    return r
                problem = f"HTTP {r.status_code}"
            if last:
                raise _Stop(self.scrub(f"{what} failed {RETRIES + 1} times ({problem})."))
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _saw(self, response: httpx.Response) -> None:
        """Hook: every API response passes here (Unsplash reads its rate-limit header)."""


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _json_body(r: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = r.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise _Stop(f"{what}: the API answered with something that is not JSON.") from None
    if not isinstance(body, dict):
        raise _Stop(f"{what}: unexpected answer from the API (not a JSON object).")
    return body


def _snippet(r: httpx.Response) -> str:
    try:
        return " ".join(r.text.split())[:160]
    except (UnicodeDecodeError, httpx.ResponseNotRead):
        return ""


# -- unsplash -----------------------------------------------------------------------------------------


class _UnsplashSource(_SearchSource):
    """Unsplash search → hotlinked downloads; `on_kept` triggers the photo's download tracking.

    Budgeting: every API call (search and tracking) returns X-Ratelimit-Remaining. Each photo handed
    out reserves one call for its tracking until its `on_kept` runs, because a caller may keep
    photos long after it received them (prepare tracks after the dataset is saved). A search needs
    two unreserved calls (itself and one photo's tracking) and a photo is handed out only while one
    is unreserved, so a kept photo is never left untracked by our own doing. A photo that is dropped
    keeps its reservation: conservative, it can only end a stream early. At the limit the stream
    ends cleanly and a re-run (with `skip_ids`) continues.
    """

    name: SourceName = "unsplash"
    what = "unsplash"

    def __init__(self, spec: str, queries: list[str], num_images: int, api_url: str | None, timeout: float,
                 max_bytes: int, skip: frozenset[str], allow_private: bool) -> None:
        key = os.environ.get("UNSPLASH_ACCESS_KEY", "").strip()
        if not key:
            raise ElementalError(
                "the unsplash source needs an access key in the environment variable UNSPLASH_ACCESS_KEY "
                "(create an app at https://unsplash.com/oauth/applications)"
            )
        self.base = _api_base(api_url, "UNSPLASH_API_URL", DEFAULT_UNSPLASH_API_URL, "Unsplash")
        super().__init__(spec, queries, num_images, timeout, max_bytes, skip, allow_private)
        self._secret = key
        self._key = key
        self._api = self._api_client()
        self._lock = threading.Lock()
        self.remaining: int | None = None  # X-Ratelimit-Remaining of the latest API answer
        self.reserved = 0  # photos handed out whose on_kept has not run: one tracking call each
        self.tracked = 0

    def _api_client(self) -> httpx.Client:
        # httpx drops the Authorization header on a redirect to another origin.
        return _client(self.timeout, {"Authorization": f"Client-ID {self._key}", "Accept-Version": "v1"},
                       allow_private=self.allow_private, exempt=self.base)

    def close(self) -> None:
        super().close()
        self._api.close()

    def _saw(self, response: httpx.Response) -> None:
        value = response.headers.get("x-ratelimit-remaining", "").strip()
        if value.lstrip("-").isdigit():
            with self._lock:
                self.remaining = int(value)

    def _unreserved(self) -> int | None:
        with self._lock:
            return None if self.remaining is None else self.remaining - self.reserved

    def _before_search(self) -> None:
        free = self._unreserved()
        if free is not None and free < 2:
            raise _Stop(
                f"API rate limit reached (X-Ratelimit-Remaining: {self.remaining}, "
                f"{self.reserved} kept for download tracking)."
            )

    def _may_yield(self) -> bool:
        free = self._unreserved()
        return free is None or free >= 1

    def _handed_out(self) -> None:
        with self._lock:
            self.reserved += 1

    def _search(self, query: str, page: int) -> tuple[list[dict[str, Any]], bool]:
        what = f"search for {query!r} (page {page})"
        r = self._get_json(
            self._api, f"{self.base}/search/photos",
            {"query": query, "page": page, "per_page": UNSPLASH_PER_PAGE}, what,
        )
        if r.status_code == 403 and (self.remaining == 0 or "rate limit" in _snippet(r).lower()):
            with self._lock:
                self.remaining = 0
            raise _Stop("API rate limit reached (HTTP 403 Rate Limit Exceeded).")
        if r.status_code == 401:
            raise ElementalError(
                self.scrub(f"unsplash: the API refused the access key (HTTP 401 on {what}); check UNSPLASH_ACCESS_KEY")
            )
        if r.status_code != 200:
            raise ElementalError(self.scrub(f"unsplash: {what} failed: HTTP {r.status_code} {_snippet(r)}"))
        body = _json_body(r, f"unsplash {what}")
        results = [x for x in body.get("results") or [] if isinstance(x, dict)]
        total_pages = body.get("total_pages")
        more = isinstance(total_pages, int) and page < total_pages and len(results) > 0
        return results, more

    def _download_url(self, item: dict[str, Any]) -> str | None:
        regular = (item.get("urls") or {}).get("regular")
        if not isinstance(regular, str) or not regular:
            return None
        return _with_params(regular, {"w": str(UNSPLASH_DOWNLOAD_WIDTH)})

    def _photo(self, item: dict[str, Any], data: bytes) -> Photo:
        pid = str(item["id"])
        user = item.get("user") or {}
        links = item.get("links") or {}
        name = user.get("name") or user.get("username") or "unknown"
        attribution: dict[str, Any] = {
            "provider": "unsplash",
            "photographer": name,
            "username": user.get("username"),
            "photographer_url": _with_params(str((user.get("links") or {}).get("html") or ""), UNSPLASH_UTM) or None,
            "link": _with_params(str(links.get("html") or ""), UNSPLASH_UTM) or None,
            "license": UNSPLASH_LICENSE[0],
            "license_url": UNSPLASH_LICENSE[1],
            "credit": f"Photo by {name} on Unsplash",
        }
        attribution = {k: self.scrub(v) if isinstance(v, str) else v for k, v in attribution.items() if v}
        location = links.get("download_location")
        return Photo(
            data=data, source="unsplash", source_id=pid, attribution=attribution,
            on_kept=self._tracker(pid, location if isinstance(location, str) else None),
        )

    def _tracker(self, pid: str, location: str | None) -> Callable[[], None]:
        """`on_kept` for one photo: the download-tracking call, made at most once however often it is called."""
        done = threading.Event()
        lock = threading.Lock()

        def on_kept() -> None:
            with lock:
                if done.is_set():
                    return
                done.set()
            with self._lock:
                self.reserved = max(0, self.reserved - 1)
            self._track(pid, location)

        return on_kept

    def _track(self, pid: str, location: str | None) -> None:
        """Tell Unsplash the photo was downloaded (its API guidelines require it). Never raises: the
        photo is already kept, so a failure is a note for the person, not a lost run."""
        if not location:
            self.note(f"unsplash: photo {pid} came without links.download_location; its download was not tracked")
            return
        if not _same_origin(location, self.base):
            # Never send the key to a host that is not the API.
            self.note(f"unsplash: photo {pid}: download_location is not on {self.base}; not tracked")
            return
        if self._api.is_closed:
            self._api = self._api_client()
        try:
            r = self._get_json(self._api, location, None, f"download tracking of photo {pid}")
        except _Stop as stop:
            self.stopped_early = True
            self.note(f"unsplash: {stop} Photo {pid} was kept but its download was not tracked.")
            return
        if r.status_code == 403:
            with self._lock:
                self.remaining = 0
        if not r.is_success:
            self.note(f"unsplash: download tracking of photo {pid} failed (HTTP {r.status_code})")
            return
        with self._lock:
            self.tracked += 1


# -- openverse ----------------------------------------------------------------------------------------


class _OpenverseSource(_SearchSource):
    """Openverse image search (openly licensed photos); licence, creator and source recorded per photo."""

    name: SourceName = "openverse"
    what = "openverse"

    def __init__(self, spec: str, queries: list[str], num_images: int, api_url: str | None, timeout: float,
                 max_bytes: int, skip: frozenset[str], allow_private: bool, license_type: str | None) -> None:
        self.base = _api_base(api_url, "OPENVERSE_API_URL", DEFAULT_OPENVERSE_API_URL, "Openverse")
        super().__init__(spec, queries, num_images, timeout, max_bytes, skip, allow_private)
        self.license_type = (license_type or "").strip() or None
        self._api = _client(timeout, allow_private=allow_private, exempt=self.base)

    def close(self) -> None:
        super().close()
        self._api.close()

    def _photos(self) -> Iterator[Photo | Rejected]:
        try:
            yield from super()._photos()
        finally:
            self._api.close()

    def _search(self, query: str, page: int) -> tuple[list[dict[str, Any]], bool]:
        what = f"search for {query!r} (page {page})"
        params: dict[str, Any] = {"q": query, "page": page, "page_size": OPENVERSE_PAGE_SIZE,
                                  "category": OPENVERSE_CATEGORY}
        if self.license_type:
            params["license_type"] = self.license_type
        r = self._get_json(self._api, f"{self.base}/v1/images/", params, what)
        if r.status_code in (400, 401, 403) and page > 1:
            # Anonymous clients may only page so deep; that query is done, the others go on.
            self.note(f"openverse: {what}: HTTP {r.status_code}, no further pages for this query")
            return [], False
        if r.status_code != 200:
            raise ElementalError(f"openverse: {what} failed: HTTP {r.status_code} {_snippet(r)}")
        body = _json_body(r, f"openverse {what}")
        results = [x for x in body.get("results") or [] if isinstance(x, dict) and not x.get("mature")]
        page_count = body.get("page_count")
        more = isinstance(page_count, int) and page < page_count and bool(body.get("results"))
        return results, more

    def _download_url(self, item: dict[str, Any]) -> str | None:
        url = item.get("url")
        return url if isinstance(url, str) and url else None

    def _photo(self, item: dict[str, Any], data: bytes) -> Photo:
        license_code = str(item.get("license") or "")
        version = str(item.get("license_version") or "")
        creator = item.get("creator")
        title = item.get("title")
        if license_code.lower() in ("cc0", "pdm"):
            license_name = license_code.upper()
        else:
            license_name = f"CC {license_code.upper()} {version}".strip() if license_code else ""
        credit = item.get("attribution") or " ".join(
            part for part in [
                f'"{title}"' if title else "This image",
                f"by {creator}" if creator else "",
                f"is licensed under {license_name}" if license_name else "",
            ] if part
        )
        attribution = {
            "provider": item.get("provider"),
            "source": item.get("source"),
            "creator": creator,
            "creator_url": item.get("creator_url"),
            "title": title,
            "license": license_code or None,
            "license_version": version or None,
            "license_url": item.get("license_url"),
            "foreign_landing_url": item.get("foreign_landing_url"),
            "link": item.get("foreign_landing_url"),
            "credit": credit,
        }
        return Photo(
            data=data, source="openverse", source_id=str(item["id"]),
            attribution={k: v for k, v in attribution.items() if v},
            location=stored_url(self._download_url(item) or ""),
        )


__all__ = [
    "DEFAULT_OPENVERSE_API_URL",
    "DEFAULT_UNSPLASH_API_URL",
    "Photo",
    "PhotoStream",
    "Rejected",
    "SOURCE_KINDS",
    "UNSPLASH_TERMS_NOTE",
    "open_source",
]
