"""The `urls:FILE` source: one http(s) URL a line, downloaded ahead in threads and yielded in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from ...errors import ElementalError
from .base import Photo, PhotoStream, Rejected
from .net import DOWNLOAD_WORKERS, _client, _download, _prefetch, _short, stored_url


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
