"""`dataset/report.html`: a contact sheet to audit the teacher in a minute.

One section per class (thumbnail, reason, confidence, source), then the photos that were dropped
for low confidence and the ones the teacher rejected, each with its reason. Thumbnails are embedded
(base64 JPEG), so the page is one self-contained file that can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..fileio import atomic_writer
from ..images import bounded, encode_jpeg

THUMB_SIDE = 160


@dataclass(frozen=True)
class SheetEntry:
    """One photo on the sheet: a small JPEG and what the teacher (or the folder) said about it."""

    thumb_jpeg: bytes | Path | None  # a small JPEG, or the file holding it; None: the photo could not be decoded
    label: str | None
    reason: str
    confidence: float | None
    source: str
    source_id: str


def thumbnail(img: Image.Image) -> bytes:
    return encode_jpeg(bounded(img, THUMB_SIDE), quality=75)


def _card(e: SheetEntry) -> str:
    esc = html.escape
    if e.thumb_jpeg is None:
        img = '<div class=none>no image</div>'
    else:
        jpeg = e.thumb_jpeg.read_bytes() if isinstance(e.thumb_jpeg, Path) else e.thumb_jpeg
        data = base64.b64encode(jpeg).decode()
        img = f'<img src="data:image/jpeg;base64,{data}" alt="{esc(e.source_id)}">'
    conf = "" if e.confidence is None else f"<b>{e.confidence:.2f}</b> "
    label = "" if e.label is None else f"{esc(e.label)} · "
    return (
        f"<figure>{img}"
        f"<figcaption>{label}{conf}{esc(e.reason)}<br><small>{esc(e.source)}: {esc(e.source_id)}</small>"
        "</figcaption></figure>"
    )


def _section(title: str, entries: Sequence[SheetEntry]) -> Iterator[str]:
    yield f"<h2>{html.escape(title)} ({len(entries)})</h2><div class=sheet>"
    yield from (_card(e) for e in entries) if entries else iter(["<p>none</p>"])
    yield "</div>\n"


def report_chunks(
    labels: Sequence[str],
    kept: Sequence[SheetEntry],
    low_confidence: Sequence[SheetEntry],
    rejected: Sequence[SheetEntry],
    summary: str,
) -> Iterator[str]:
    """The whole page, a card at a time: kept photos per class (least confident first), then the dropped ones.

    A page for 10,000 photos is ~100 MB of base64: it is written piece by piece (`write_report`), never
    held whole, and each thumbnail is read from its file only while its card is written.
    """
    yield "\n".join([
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>elemental dataset report</title>',
        "<style>body{font-family:sans-serif;margin:1.5em}.sheet{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{width:170px;margin:0;font-size:12px}img{max-width:160px;max-height:160px;display:block}"
        ".none{width:160px;height:60px;background:#eee;color:#888;text-align:center;line-height:60px}"
        "</style></head><body>",
        "<h1>Dataset report</h1>",
        f"<p>{html.escape(summary)}</p>\n",
    ])
    for label in labels:
        mine = sorted((e for e in kept if e.label == label), key=lambda e: (e.confidence or 0.0))
        yield from _section(f"{label}", mine)
    yield from _section("Dropped: confidence below the threshold", low_confidence)
    yield from _section("Rejected by the teacher or unreadable", rejected)
    yield "</body></html>\n"


def write_report(path: Path, *args, **kwargs) -> None:
    """`report_chunks(...)` written to `path` atomically (temp file + rename), in pieces."""
    with atomic_writer(path) as f:
        for chunk in report_chunks(*args, **kwargs):
            f.write(chunk.encode("utf-8"))
