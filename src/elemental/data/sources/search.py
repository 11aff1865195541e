"""What the search-API sources (unsplash, openverse) share: paging through every query in turn, bounded
retries, stopping cleanly at a rate limit or an outage, and downloading the results ahead in threads."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx

from ...errors import ElementalError
from .base import Photo, PhotoStream, Rejected, SourceName
from .net import DOWNLOAD_WORKERS, _client, _download, _prefetch, _Refused, _short, stored_url

log = logging.getLogger(__name__)

RETRIES = 2  # extra tries of an API call after a timeout, network error or 5xx
RETRY_BACKOFF_S = 0.5  # doubles each retry
MAX_RETRY_AFTER_S = 30.0  # a longer Retry-After stops the source cleanly instead of sleeping


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
