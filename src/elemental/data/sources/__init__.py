"""Photo sources for `elemental prepare` (`--source`, DESIGN §6): where photos come from, fetched as bytes.

- `dispatch.py`   `open_source`: a source spec checked and opened as a lazy stream (the list of specs is there).
- `base.py`       what every source yields: `Photo`, `Rejected`, the `PhotoStream` around them, `source_kind`.
- `folder.py`     `folder:PATH` (local photos) and `json:FILE` (the seed's custom JSON), read from disk.
- `urls.py`       `urls:FILE`: one http(s) URL a line.
- `search.py`     what the search-API sources share: paging, retries, rate limits, downloads ahead.
- `unsplash.py`   the Unsplash API source, its guidelines and its terms note.
- `openverse.py`  the Openverse API source.
- `net.py`        downloads: the HTTP client, the guard that keeps it on public addresses, `stored_url`.
"""

from .base import Photo, PhotoStream, Rejected, source_kind
from .dispatch import SOURCE_KINDS, open_source
from .net import is_private_host, stored_url
from .openverse import DEFAULT_OPENVERSE_API_URL
from .unsplash import DEFAULT_UNSPLASH_API_URL, UNSPLASH_TERMS_NOTE

__all__ = [
    "DEFAULT_OPENVERSE_API_URL",
    "DEFAULT_UNSPLASH_API_URL",
    "Photo",
    "PhotoStream",
    "Rejected",
    "SOURCE_KINDS",
    "UNSPLASH_TERMS_NOTE",
    "is_private_host",
    "open_source",
    "source_kind",
    "stored_url",
]
