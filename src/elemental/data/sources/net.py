"""Downloads: the HTTP client every source uses, the guard that keeps it on public addresses, and what is stored
of a URL.

URLs that are stored (source ids, locations, reasons) lose query parameters that look like credentials
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
import re
import socket
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpcore
import httpx

from ... import __version__
from ...images import SNIFF_BYTES, looks_like_image

USER_AGENT = f"elemental/{__version__} (photo dataset builder)"
DOWNLOAD_WORKERS = 4  # downloads in flight at once; photos are still yielded in order
MAX_REDIRECTS = 5


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
