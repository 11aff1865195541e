"""`open_source`: a source spec checked and opened as a lazy stream of photos.

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
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ElementalError
from ...task import Task
from .base import PhotoStream, source_kind
from .folder import _folder_source, _json_source
from .openverse import _OpenverseSource
from .unsplash import _UnsplashSource
from .urls import _urls_source

SOURCE_KINDS = "folder:PATH, urls:FILE, json:FILE, unsplash, openverse"


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
    open licence. `allow_private_urls` lets downloads reach loopback and private addresses (net.py's docstring).
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
