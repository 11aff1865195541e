"""The `openverse` source: openly licensed photos through the Openverse API, licence recorded per photo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...errors import ElementalError
from .base import Photo, Rejected, SourceName
from .net import _client, stored_url
from .search import _api_base, _json_body, _SearchSource, _snippet

DEFAULT_OPENVERSE_API_URL = "https://api.openverse.org"
OPENVERSE_PAGE_SIZE = 20  # the most an anonymous Openverse client may ask for
OPENVERSE_CATEGORY = "photograph"  # this tool classifies photos, not illustrations or scanned artworks


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
