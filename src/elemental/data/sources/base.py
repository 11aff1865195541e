"""What every photo source yields and how it is handed out: `Photo`, `Rejected`, the `PhotoStream` around them,
and `source_kind`, which reads a source spec's kind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

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
