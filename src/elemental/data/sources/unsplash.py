"""The `unsplash` source: the Unsplash API, following its API guidelines (hotlinked downloads, download tracking
for every kept photo, attribution with referral links, rate limits respected).

Secrets: the Unsplash key travels only in the Authorization header and only to the API's own origin
(never to image hosts, never in a URL); every message built here is scrubbed of it as well.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import httpx

from ...errors import ElementalError
from .base import Photo, SourceName
from .net import _client
from .search import _api_base, _json_body, _same_origin, _SearchSource, _snippet, _Stop, _with_params

DEFAULT_UNSPLASH_API_URL = "https://api.unsplash.com"
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
