"""`elemental prepare`: photos from sources → a seed-layout dataset (`images/`, `train.json`, `val.json`,
`metadata.json`, `report.html`).

Photos come from `data.sources` (folders, URL lists, the seed's JSON, Unsplash, Openverse). Each one
is decoded once (upright RGB), identified by the sha256 of its original bytes, and dropped when it is
an exact or near duplicate (perceptual hash) of one kept before. Photos without a known label go to
the teacher (`data.teacher`, asked through `data.labeling`), whose answers live in a SQLite cache
outside the dataset: a crash, a Ctrl-C or a re-run never loses or re-pays an answer, and
`--relabel-only` re-filters from the cache alone. The dataset is built in a temp folder and swapped
in at the end, so an interrupted prepare leaves the previous dataset (or nothing), never a mix.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import PrepareConfig
from ..errors import ElementalError
from ..fileio import atomic_dir, read_json, write_json_atomic
from ..images import (
    NEAR_DUPLICATE_COLOUR,
    PHOTO_MAX_SIDE,
    bounded,
    colour_distance,
    colour_signature,
    encode_jpeg,
    open_image_bytes,
    perceptual_hash,
)
from ..review import log as review_log
from ..review.dataset import apply as review_apply
from ..review.dataset import teacher_split, write_teacher_labels
from ..task import Task
from .labeling import Labeler, confident_counts, wave_size
from .records import Record, save_split
from .report import SheetEntry, thumbnail, write_report
from .sources import UNSPLASH_TERMS_NOTE, Photo, PhotoStream, Rejected, open_source, source_kind
from .split import class_counts, stratified_split
from .teacher.cache import LabelCache
from .teacher.pricing import estimate
from .teacher.results import LabelResult

log = logging.getLogger(__name__)
Say = Callable[[str], None]

FOLDER_LABELER = "folder-name"
FOLDER_REASON = "a photo from the '{label}' folder"
MAX_SIDE = PHOTO_MAX_SIDE
ID_LENGTH = 12
DECODE_WORKERS = max(2, os.cpu_count() or 2)


@dataclass
class _Decoded:
    """What decoding a photo gives (in a worker thread): the normalised JPEG, its hashes, a thumbnail."""

    photo: Photo
    sha256: str
    jpeg_sha256: str
    width: int
    height: int
    phash: str
    colour: str
    jpeg: bytes
    thumb: bytes


@dataclass(slots=True)
class _Item:
    """An admitted photo waiting for (or holding) its label: a few hundred bytes, whatever the photo's size.

    Its normalised JPEG and thumbnail wait on disk in the staging folder (named by the sha256), and the
    original bytes are gone, so memory grows only by this record per photo (benchmarks/memory.py).
    """

    photo: Photo
    sha256: str
    width: int
    height: int
    staging: Path  # shared by every item
    element: str | None = None
    reason: str = ""
    confidence: float = 0.0
    labeler: str = FOLDER_LABELER
    bought: bool = False  # its label was paid for in this run (not from the cache)

    @classmethod
    def staged(cls, d: _Decoded, staging: Path) -> _Item:
        """Write `d`'s JPEG and thumbnail to `staging`; the item keeps only what selection and records need."""
        (staging / f"{d.sha256}.jpg").write_bytes(d.jpeg)
        (staging / f"{d.sha256}.thumb.jpg").write_bytes(d.thumb)
        photo = d.photo
        photo.data, photo.location = b"", None  # the location was for decode errors only
        return cls(photo, d.sha256, d.width, d.height, staging)

    @property
    def jpeg_path(self) -> Path:
        return self.staging / f"{self.sha256}.jpg"

    @property
    def thumb(self) -> Path:
        return self.staging / f"{self.sha256}.thumb.jpg"

    def record(self) -> Record:
        image_id = self.sha256[:ID_LENGTH]
        return Record(
            image_id=image_id, image_path=f"images/{image_id}.jpg", element=self.element or "",
            reason=self.reason, confidence=self.confidence, source=self.photo.source,
            source_id=self.photo.source_id, attribution=self.photo.attribution, sha256=self.sha256,
            width=self.width, height=self.height, labeler=self.labeler,
        )

    def sheet(self) -> SheetEntry:
        return SheetEntry(self.thumb, self.element, self.reason,
                          self.confidence if self.element else None, self.photo.source, self.photo.source_id)


@dataclass
class _Tally:
    """What was dropped or rejected, and why: it goes to metadata.json and report.html."""

    dropped: Counter = field(default_factory=Counter)
    rejected: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)
    rejected_sheet: list[SheetEntry] = field(default_factory=list)
    low_confidence_sheet: list[SheetEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bought_beyond_target: int = 0  # labels paid for in this run that the targets did not need

    def drop(self, why: str, n: int = 1) -> None:
        if n > 0:
            self.dropped[why] += n

    def reject(self, source: str, source_id: str, kind: str, reason: str, thumb: bytes | Path | None = None) -> None:
        self.drop(f"rejected_{kind}")
        self.rejected.append({"source": source, "source_id": source_id, "kind": kind, "reason": reason})
        self.rejected_sheet.append(SheetEntry(thumb, None, reason, None, source, source_id))


class _Dedup:
    """Exact (sha256 of the original and of the normalised JPEG) and near duplicates.

    A near duplicate has nearly the same structure (perceptual hash within `max_distance` bits) and
    nearly the same colours (`images.colour_distance`): the hash alone calls every flat picture the same,
    a blue sky and a night sky included. Each kept photo is remembered (compactly: digests as bytes), so
    a dropped duplicate names the twin that was kept.
    """

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        self.owners: dict[bytes, Photo] = {}
        self.looks: list[tuple[int, str, Photo]] = []

    def check(self, *shas: str, phash: str | None = None, colour: str | None = None) -> tuple[str, Photo] | None:
        """(why, the kept twin) when the photo with these hashes is a duplicate, else None."""
        for sha in shas:
            owner = self.owners.get(_digest(sha))
            if owner is not None:
                return "duplicate", owner
        if phash is not None and colour is not None and self.max_distance > 0:
            bits = int(phash, 16)
            for kept_bits, kept_colour, owner in self.looks:
                if ((bits ^ kept_bits).bit_count() <= self.max_distance
                        and colour_distance(colour, kept_colour) <= NEAR_DUPLICATE_COLOUR):
                    return "near_duplicate", owner
        return None

    def add(self, *shas: str, phash: str, colour: str, photo: Photo) -> None:
        for sha in shas:
            self.owners.setdefault(_digest(sha), photo)
        self.looks.append((int(phash, 16), colour, photo))


def _digest(sha: str) -> bytes:
    """A hex digest as its bytes (half the memory of the string); any other id as UTF-8."""
    try:
        return bytes.fromhex(sha)
    except ValueError:
        return sha.encode()


@dataclass(frozen=True)
class _Unreadable:
    photo: Photo
    error: ElementalError


def _decode(photo: Photo, max_pixels: int) -> _Decoded | _Unreadable:
    """The CPU-heavy part of ingesting (decode, resize, JPEG, hashes); runs in worker threads."""
    try:
        img = bounded(open_image_bytes(photo.data, photo.name, max_side=MAX_SIDE, max_pixels=max_pixels), MAX_SIDE)
    except ElementalError as e:
        return _Unreadable(photo, e)
    jpeg = encode_jpeg(img)
    return _Decoded(photo, hashlib.sha256(photo.data).hexdigest(), hashlib.sha256(jpeg).hexdigest(), img.width,
                    img.height, perceptual_hash(img), colour_signature(img), jpeg, thumbnail(img))


def _decoded(photos: Iterator[Photo], workers: int, max_pixels: int) -> Iterator[_Decoded | _Unreadable]:
    """`_decode` over `photos` in a thread pool (Pillow releases the GIL), in order, a bounded window ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque[Future] = deque()
        for photo in photos:
            window.append(pool.submit(_decode, photo, max_pixels))
            if len(window) > 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _admit(d: _Decoded | _Unreadable, dedup: _Dedup, tally: _Tally, task: Task, staging: Path) -> _Item | None:
    """De-duplicate one decoded photo, stage it and take its known label; None (reason tallied) when dropped."""
    if isinstance(d, _Unreadable):
        d.photo.data = b""
        tally.reject(d.photo.source, d.photo.source_id, "unreadable", str(d.error))
        log.warning("%s", d.error)
        return None
    found = dedup.check(d.sha256, d.jpeg_sha256, phash=d.phash, colour=d.colour)
    if found:
        why, twin = found
        tally.drop(why)
        tally.duplicates.append({"source": d.photo.source, "source_id": d.photo.source_id, "why": why,
                                 "duplicate_of": {"source": twin.source, "source_id": twin.source_id}})
        return None
    dedup.add(d.sha256, d.jpeg_sha256, phash=d.phash, colour=d.colour, photo=d.photo)
    item = _Item.staged(d, staging)
    photo = item.photo
    if photo.label is not None:
        task.check_label(photo.label)
        item.element = photo.label
        item.reason = photo.reason or _folder_reason(photo.label)
        item.confidence = 1.0 if photo.confidence is None else photo.confidence
        item.labeler = "imported" if photo.reason else FOLDER_LABELER
    return item


@functools.lru_cache(maxsize=64)
def _folder_reason(label: str) -> str:
    """One string per label, shared by all its photos (it is the same sentence for each)."""
    return FOLDER_REASON.format(label=label)


def _label(labeler: Labeler, items: list[_Item], tally: _Tally) -> None:
    """Fill in element/reason/confidence; rejected or (relabel-only) uncached items get element None."""
    if not items:
        return
    answers = labeler.answers([(i.sha256, i.jpeg_path) for i in items])  # files read only if the teacher is asked
    labeler.count(answers.values())
    tag = f"{labeler.cfg.labeler_model}@{labeler.prompt_version}"
    for item in items:
        a = answers.get(item.sha256)
        if a is None:
            tally.reject(item.photo.source, item.photo.source_id, "not_in_cache",
                         "no cached answer (--relabel-only never asks the teacher)")
        elif a.status != "ok":
            tally.reject(item.photo.source, item.photo.source_id, "teacher", a.reject_reason or "rejected",
                         item.thumb)
        else:
            item.element, item.reason, item.confidence, item.labeler = a.element, a.reason, a.confidence, tag
            item.bought = isinstance(a, LabelResult) and not a.cached  # --relabel-only's CachedLabels bought none


API_SOURCES = ("unsplash", "openverse")


def _previous_records(output_dir: Path, task: Task, cfg: PrepareConfig) -> list[Record]:
    """The API photos an earlier run of this dataset kept, so a re-run after a rate-limit stop continues.

    Their source ids are skipped by the sources (no second download, no second tracking call), and
    `_previous_photos` brings them back with their labels (no teacher call).
    """
    if not (output_dir / "metadata.json").is_file() or not any(source_kind(s) in API_SOURCES for s in cfg.sources):
        return []
    teacher = teacher_split(output_dir, task)  # the teacher's labels, not a person's review of them
    return [r for split in ("train", "val") for r in teacher[split] if r.source in API_SOURCES and r.source_id]


def _previous_photos(output_dir: Path, records: list[Record]) -> Iterator[Photo]:
    """The earlier run's photos, read one at a time (a large dataset is never all in memory)."""
    for r in records:
        path = output_dir / r.image_path
        yield Photo(path.read_bytes(), r.source, r.source_id, r.element, r.reason, r.confidence, r.attribution,
                    location=str(path))


def _open_streams(cfg: PrepareConfig, task: Task, skip_ids: set[str]) -> list[PhotoStream]:
    """Every source, checked before any photo is read (a bad spec fails before anything is paid)."""
    streams: list[PhotoStream] = []
    try:
        for spec in cfg.sources:
            streams.append(open_source(
                spec, task, queries=cfg.queries, num_images=_source_cap(cfg, task),
                unsplash_api_url=cfg.unsplash_api_url, openverse_api_url=cfg.openverse_api_url, skip_ids=skip_ids,
                allow_private_urls=cfg.allow_private_urls,
            ))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


def _photos(streams: list[PhotoStream], tally: _Tally) -> Iterator[Photo]:
    """Every source's photos in turn; rejects are tallied and the run goes on."""
    for stream in streams:
        for x in stream:
            if isinstance(x, Rejected):
                tally.reject(x.source, x.source_id, x.kind, x.reason)
            else:
                yield x


def _source_cap(cfg: PrepareConfig, task: Task) -> int:
    """How many photos an API source may yield: enough for the target after drops and rejections."""
    wanted = cfg.photo_cap(len(task.labels))
    return max(wanted * 2, wanted + 50)


def _select(items: list[_Item], cfg: PrepareConfig, task: Task, tally: _Tally, keep_first: set[str]) -> list[_Item]:
    """Drop low-confidence items, then cap per class (per_class_target) and in total (num_images), balanced.

    Photos an earlier run already kept (`keep_first`, by source id) are kept before new ones.
    """
    per_label: dict[str, list[_Item]] = {label: [] for label in task.labels}
    for item in items:
        if item.element is None:
            continue
        if item.confidence < cfg.min_confidence:
            tally.drop("low_confidence")
            tally.low_confidence_sheet.append(item.sheet())
            continue
        per_label[item.element].append(item)
    rng = random.Random(cfg.seed)
    for label in task.labels:
        mine = sorted(per_label[label], key=lambda i: i.sha256)
        rng.shuffle(mine)
        mine.sort(key=lambda i: i.photo.source_id not in keep_first)  # stable: earlier-kept first
        if cfg.per_class_target is not None:
            tally.drop("over_per_class_target", len(mine) - cfg.per_class_target)
            tally.bought_beyond_target += sum(i.bought for i in mine[cfg.per_class_target:])
            mine = mine[: cfg.per_class_target]
        per_label[label] = mine[::-1]  # popped from the end below
    kept: list[_Item] = []
    cap = cfg.photo_cap(len(task.labels))
    while len(kept) < cap and any(per_label.values()):
        for label in task.labels:  # round-robin: a balanced cap
            if per_label[label] and len(kept) < cap:
                kept.append(per_label[label].pop())
    tally.drop("over_num_images", sum(len(v) for v in per_label.values()))
    tally.bought_beyond_target += sum(i.bought for v in per_label.values() for i in v)
    return kept


def _enough(items: list[_Item], cfg: PrepareConfig, task: Task) -> bool:
    """True when labelled, confident photos already meet the targets: stop collecting (and paying)."""
    return _met(confident_counts(((i.element, i.confidence) for i in items), cfg.min_confidence), cfg, task)


def _met(have: Counter[str], cfg: PrepareConfig, task: Task) -> bool:
    """True when `have` (confident photos per label) meets per_class_target, or else the photo cap."""
    if cfg.per_class_target is not None:
        return all(have[label] >= cfg.per_class_target for label in task.labels)
    return sum(have.values()) >= cfg.photo_cap(len(task.labels))


def _collect(
    photos: Iterator[Photo], cfg: PrepareConfig, task: Task, dedup: _Dedup, tally: _Tally, labeler: Labeler,
    staging: Path,
) -> list[_Item]:
    """Ingest photos; label the unlabelled ones in chunks (batch waves), and only while the targets are not met."""
    items: list[_Item] = []
    pending: list[_Item] = []
    chunk = labeler.chunk_size((i.element, i.confidence) for i in items)
    for decoded in _decoded(photos, DECODE_WORKERS, cfg.max_pixels):
        item = _admit(decoded, dedup, tally, task, staging)
        if item is None:
            continue
        (items if item.element is not None else pending).append(item)
        if len(pending) < chunk:
            continue
        if _enough(items, cfg, task):
            tally.drop("not_needed", len(pending))
            pending.clear()
            if cfg.per_class_target is not None:
                break
            continue
        _label(labeler, pending, tally)
        items += pending
        pending.clear()
        chunk = labeler.chunk_size((i.element, i.confidence) for i in items)
    if pending and not _enough(items, cfg, task):
        _label(labeler, pending, tally)
        items += pending
    else:
        tally.drop("not_needed", len(pending))
    return items


def estimate_labeling(cfg: PrepareConfig, task: Task, say: Say = print) -> dict[str, Any]:
    """`prepare --estimate`: the photos the sources would send to the teacher, their tokens and price.

    Sources are read, decoded and de-duplicated as prepare does (API sources are searched and downloaded),
    but nothing is sent to the teacher and nothing is written. Photos the label cache has answered (by any
    model this teacher served) and photos the targets do not need are not counted.
    """
    _check_request(cfg, task)
    tally, dedup, labeler = _Tally(), _Dedup(cfg.near_duplicate_distance), Labeler(cfg, task)
    streams = _open_streams(cfg, task, set())
    staging = Path(tempfile.mkdtemp(prefix="elemental-estimate-"))
    try:
        items = [item for d in _decoded(_photos(streams, tally), DECODE_WORKERS, cfg.max_pixels)
                 if (item := _admit(d, dedup, tally, task, staging)) is not None]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for stream in streams:
            stream.close()
    unlabelled = [i for i in items if i.element is None]
    cached = labeler.cached([i.sha256 for i in unlabelled])
    answered = {sha: row for sha, row in cached.items() if row.status == "ok" or not cfg.retry_rejected}
    todo = [i for i in unlabelled if i.sha256 not in answered]
    have = confident_counts([(i.element, 1.0) for i in items if i.element is not None]
                            + [(r.element, r.confidence or 0.0) for r in answered.values() if r.status == "ok"],
                            cfg.min_confidence)
    needed = 0 if _met(have, cfg, task) else wave_size(have, Counter(), 0, cfg, task)
    with LabelCache(labeler.cache_path) as cache:
        history = cache.stats(cfg.labeler_model, labeler.prompt_version)
    est = {"photos_found": len(items) + sum(tally.dropped.values()), "admitted": len(items),
           "labelled_by_source": len(items) - len(unlabelled), "answered_in_cache": len(answered),
           "uncached": len(todo), **estimate(min(len(todo), needed), cfg.labeler_model, cfg.prices, history)}
    for line in _estimate_lines(est, cfg):
        say(line)
    return est


def _estimate_lines(est: dict[str, Any], cfg: PrepareConfig) -> list[str]:
    usd = "unknown price (add the model under [prepare.prices] in the config)"
    if est["sync_usd"] is not None:
        p = est["price_usd_per_1m"]
        usd = (f"${est['sync_usd']:.4f} synchronous, ${est['batch_usd']:.4f} through --batch "
               f"({cfg.labeler_model}: ${p['input']:g} in / ${p['output']:g} out per 1M tokens, prices as of "
               f"{est['prices_as_of']})")
    tokens = ("unknown (no measured answers and no price-table entry for this model)" if est["tokens_in"] is None
              else f"{est['tokens_in']:,} in + {est['tokens_out']:,} out ({est['tokens_per_photo_from']})")
    return [
        f"estimate for teacher {cfg.labeler_model}: {est['photos_found']} photos found, {est['admitted']} after "
        f"duplicates and unreadable ones, {est['labelled_by_source']} labelled by their folder",
        f"  already answered (label cache): {est['answered_in_cache']}; not answered: {est['uncached']}; "
        f"to label for the targets: {est['photos']}",
        f"  expected tokens: {tokens}",
        f"  expected cost: {usd}",
        "  nothing was sent to the teacher",
    ]


def prepare_dataset(cfg: PrepareConfig, task: Task, say: Say = print) -> dict[str, Any]:
    """Build the dataset at `cfg.output_dir` from `cfg.sources`; returns the metadata it wrote."""
    output_dir = Path(cfg.output_dir)
    _check_request(cfg, task)
    _check_replaceable(output_dir)
    if any(source_kind(s) == "unsplash" for s in cfg.sources):
        say(UNSPLASH_TERMS_NOTE)
    tally, dedup, labeler = _Tally(), _Dedup(cfg.near_duplicate_distance), Labeler(cfg, task)
    previous = _previous_records(output_dir, task, cfg)
    earlier = {r.source_id for r in previous if r.source_id}
    streams = _open_streams(cfg, task, earlier)
    # Normalised JPEGs wait here (beside the dataset, so moving them in is a rename) until the dataset is
    # written; removed in every case.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
    try:
        try:
            photos = chain(_previous_photos(output_dir, previous), _photos(streams, tally))
            items = _collect(photos, cfg, task, dedup, tally, labeler, staging)
            teacher_report = labeler.report()
        finally:
            labeler.close()
        kept = _select(items, cfg, task, tally, earlier)
        if not kept:
            raise ElementalError(f"no photos kept from sources {cfg.sources} (dropped: {dict(tally.dropped)})")
        records = [i.record() for i in kept]
        train, val = stratified_split(records, cfg.val_fraction, cfg.seed)
        if not val:
            raise ElementalError(
                f"too few photos for a validation split ({len(records)} kept; a class needs at least 2)")
        tally.notes += [note for stream in streams for note in stream.notes]  # e.g. a rate-limit stop
        complete = not any(stream.stopped_early for stream in streams)
        metadata = _metadata(cfg, task, train, val, tally, teacher_report, labeler.cache_path, complete)
        # Under the review lock: a review server running on this dataset cannot append a decision to the old
        # folder between the copy of its log and the swap (the decision would be lost with the old folder).
        with review_log.locked(output_dir), atomic_dir(output_dir) as tmp:
            (tmp / "images").mkdir()
            for item, rec in zip(kept, records, strict=True):
                os.replace(item.jpeg_path, tmp / rec.image_path)  # part of the whole folder swap
            save_split(tmp / "train.json", train)
            save_split(tmp / "val.json", val)
            write_teacher_labels(tmp, train, val)
            write_json_atomic(tmp / "metadata.json", metadata)
            if review_log.log_path(output_dir).is_file():  # a person's reviews outlive the teacher's re-run
                shutil.copy2(review_log.log_path(output_dir), review_log.log_path(tmp))
                review_apply(tmp, task)  # the split files and counts with the reviews applied
                metadata = read_json(tmp / "metadata.json", "dataset metadata")
            write_report(tmp / "report.html", task.labels, [i.sheet() for i in kept], tally.low_confidence_sheet,
                         tally.rejected_sheet, _summary(metadata))
        for item in kept:  # e.g. Unsplash download tracking: exactly once per kept photo, after it is saved
            if item.photo.on_kept is not None:
                item.photo.on_kept()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for stream in streams:
            stream.close()
    for note in tally.notes:
        say(note)
    _warn_imbalance(metadata, say)
    return metadata


def _check_request(cfg: PrepareConfig, task: Task) -> None:
    """Sources given, targets that do not contradict each other: checked before anything is read or paid."""
    if not cfg.sources:
        raise ElementalError("no sources given: --source folder:PATH | urls:FILE | json:FILE | unsplash | openverse")
    try:
        cfg.check_targets(len(task.labels))
    except ValueError as e:
        raise ElementalError(str(e)) from None


def _summary(metadata: dict[str, Any]) -> str:
    cost = (metadata.get("teacher") or {}).get("estimated_cost_usd")
    spend = f", teacher cost ≈ ${cost:.4f}" if isinstance(cost, float) else ""
    return (f"{metadata['n_train']} train / {metadata['n_val']} val photos; per class "
            f"{metadata['counts']['total']}; dropped {metadata['dropped']}{spend}")


def _warn_imbalance(metadata: dict[str, Any], say: Say) -> None:
    totals = metadata["counts"]["total"]
    top = max(totals.values())
    for label, n in totals.items():
        if n < top / 2:
            say(f"warning: class {label!r} has {n} photos, under half of the largest class ({top})")


def _check_replaceable(output_dir: Path) -> None:
    """Refuse to replace a folder that is not a dataset: the swap would delete whatever is in it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ElementalError(f"output_dir exists and is not a folder: {output_dir}")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / "metadata.json").is_file():
        raise ElementalError(
            f"output_dir {output_dir} is not empty and holds no dataset (no metadata.json); "
            "choose a new or empty folder"
        )


def _metadata(
    cfg: PrepareConfig, task: Task, train: list[Record], val: list[Record], tally: _Tally,
    teacher_report: dict[str, Any] | None, cache_path: Path, complete: bool,
) -> dict[str, Any]:
    def per_label(records: list[Record]) -> dict[str, int]:
        counts = class_counts(records)
        return {label: counts.get(label, 0) for label in task.labels}

    labelers = Counter(r.labeler for r in train + val)
    return {
        "elemental_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sources": list(cfg.sources),
        "queries": list(cfg.queries) if any(source_kind(s) in API_SOURCES for s in cfg.sources) else None,
        "labels": list(task.labels),
        "labeler": FOLDER_LABELER if set(labelers) == {FOLDER_LABELER} else dict(labelers),
        "teacher": teacher_report,
        "labels_beyond_target": tally.bought_beyond_target if teacher_report else 0,
        "label_cache": str(cache_path),
        "counts": {"train": per_label(train), "val": per_label(val), "total": per_label(train + val)},
        "n_train": len(train),
        "n_val": len(val),
        "dropped": dict(tally.dropped),
        "rejected": tally.rejected,
        "duplicates": tally.duplicates,
        "notes": tally.notes,
        "min_confidence": cfg.min_confidence,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "num_images": cfg.photo_cap(len(task.labels)),
        "per_class_target": cfg.per_class_target,
        "near_duplicate_distance": cfg.near_duplicate_distance,
        "image_max_side": MAX_SIDE,
        "unsplash_terms": UNSPLASH_TERMS_NOTE if any(source_kind(s) == "unsplash" for s in cfg.sources) else None,
        # False when an API source stopped at a rate limit or an outage: running prepare again collects more.
        "complete": complete,
    }
