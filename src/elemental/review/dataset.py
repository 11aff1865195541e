"""The dataset with a person's reviews applied: what the next `train` and `evaluate` read.

`prepare` writes the teacher's split twice: as `train.json` / `val.json` (the seed's files) and as
`teacher_labels.json` (`{"train": [...], "val": [...]}`), which nothing else writes. The split files are
then always *derived*: the teacher's records with the review log folded over them (`log.states`):
- accepted photos keep the teacher's label; relabelled ones take the person's. Both gain `teacher_element`
  (the teacher's label) and `review` (`accept` / `relabel`), so evaluate can measure the teacher;
- dropped photos leave the split (their JPEG stays in `images/`: an undo brings them back);
- the split itself is the teacher's: a photo never moves between train and val.
`metadata.json` gets the counts of the reviewed dataset and a `reviews` block (reviewed, changed, dropped,
per split) holding the log size it was derived from, so `sync` knows when the split files are behind the
log (a server killed between its append and its rewrite) and derives them again.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.records import Record, load_split, parse_records, save_split
from ..data.split import class_counts
from ..errors import ElementalError
from ..fileio import read_json, write_json_atomic
from ..task import Task
from . import log

TEACHER_FILE = "teacher_labels.json"
SPLITS = ("train", "val")


@dataclass
class Photo:
    """One photo of the dataset as the review sees it: the teacher's record, its split and its identity."""

    record: Record
    split: str
    digest: str


def photo_digest(record: Record, dataset_dir: Path) -> str:
    """The record's sha256 (of the original file, as prepare wrote it); for a seed-made dataset without one,
    the sha256 of its JPEG in the dataset."""
    if record.sha256:
        return record.sha256
    return hashlib.sha256((Path(dataset_dir) / record.image_path).read_bytes()).hexdigest()


def write_teacher_labels(dataset_dir: Path, train: list[Record], val: list[Record]) -> None:
    """What `prepare` calls beside `save_split`: the teacher's split, which reviews never change."""
    write_json_atomic(Path(dataset_dir) / TEACHER_FILE,
                      {"train": [r.to_json() for r in train], "val": [r.to_json() for r in val]})


def teacher_split(dataset_dir: Path, task: Task, check_images: bool = True) -> dict[str, list[Record]]:
    """The teacher's records per split. A dataset without `teacher_labels.json` (made by the seed's scripts or
    before reviews existed) has never been reviewed, so its split files are the teacher's."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / TEACHER_FILE
    if not path.is_file():
        if _has_reviewed(dataset_dir):
            raise ElementalError(
                f"{path} is missing but the split files hold reviewed labels, not the teacher's: restore it from "
                "a copy, or prepare the dataset anew into an empty folder and copy reviews.jsonl in")
        return {s: load_split(dataset_dir, s, task, check_images) for s in SPLITS}
    data = read_json(path, "teacher labels")
    if not isinstance(data, dict) or any(not isinstance(data.get(s), list) for s in SPLITS):
        raise ElementalError(f"{path}: expected {{\"train\": [...], \"val\": [...]}}")
    out: dict[str, list[Record]] = {}
    for s in SPLITS:
        out[s] = parse_records(data[s], dataset_dir, f"{path}[{s}]", task, check_images)
    return out


def _has_reviewed(dataset_dir: Path) -> bool:
    """The split files were derived with reviews applied (metadata says so), so they are not the teacher's."""
    meta = dataset_dir / "metadata.json"
    block = (read_json(meta, "dataset metadata") or {}).get("reviews") if meta.is_file() else None
    return isinstance(block, dict) and bool(block.get("reviewed"))


def photos(dataset_dir: Path, task: Task) -> list[Photo]:
    """Every photo the teacher kept, train then val, in the teacher's file order."""
    base = teacher_split(dataset_dir, task)
    return [Photo(r, s, photo_digest(r, dataset_dir)) for s in SPLITS for r in base[s]]


def reviewed(photo: Photo, decision: log.Decision | None) -> Record | None:
    """The record the next training run reads for `photo` under `decision` (None: dropped)."""
    if decision is None:
        return photo.record
    if decision.action == "drop":
        return None
    extra = {"teacher_element": photo.record.element, "review": decision.action, "reviewed_at": decision.time}
    return photo.record.model_copy(update={"element": decision.new, **extra})


OUTCOMES = ("accepted", "changed", "dropped")


def outcome(decision: log.Decision, teacher: str) -> str:
    """What a standing decision did to the teacher's label: accepted (kept), changed (a new label) or dropped. A
    relabel to the teacher's own label is an accept: the one rule metadata, the page and evaluate count by."""
    if decision.action == "drop":
        return "dropped"
    return "accepted" if decision.new == teacher else "changed"


def tally(all_photos: list[Photo], standing: dict[str, log.Decision]) -> dict[str, Counter[str]]:
    """Per split: photos reviewed, and each `outcome`."""
    out: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    for p in all_photos:
        if (d := standing.get(p.digest)) is not None:
            out[p.split].update(("reviewed", outcome(d, p.record.element)))
    return out


def apply(dataset_dir: Path, task: Task, known: list[Photo] | None = None) -> dict[str, Any]:
    """Derive the split files and metadata counts from the teacher's split and the log; returns the
    metadata's `reviews` block. The caller holds `log.locked(dataset_dir)`. `known` is `photos()` as a caller
    already read it (the review server, which re-reads it when the folder changes), saving a second read."""
    dataset_dir = Path(dataset_dir)
    all_photos = known if known is not None else photos(dataset_dir, task)
    decisions = log.read(dataset_dir)
    standing = log.states(decisions)
    for d in standing.values():
        if d.new is not None and d.new not in task.labels:
            raise ElementalError(f"{log.log_path(dataset_dir)}: photo {d.image_id} was labelled {d.new!r}, "
                                 f"not one of the task's labels {list(task.labels)}")
    teacher_path = dataset_dir / TEACHER_FILE
    if not teacher_path.is_file():  # the first review of an older dataset: keep the teacher's labels first
        by_split = {s: [p.record for p in all_photos if p.split == s] for s in SPLITS}
        write_teacher_labels(dataset_dir, by_split["train"], by_split["val"])
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for p in all_photos:
        if (record := reviewed(p, standing.get(p.digest))) is not None:
            splits[p.split].append(record)
    for s in SPLITS:
        if not splits[s]:
            raise ElementalError(f"every {s} photo is dropped: undo a drop in the review page "
                                 f"(the log {log.log_path(dataset_dir)} keeps them)")
    size = log.log_path(dataset_dir).stat().st_size if log.log_path(dataset_dir).is_file() else 0
    per_split = tally(all_photos, standing)
    kinds = ("reviewed", *OUTCOMES)
    block = {
        "log": log.LOG_NAME,
        "log_bytes": size,
        "decisions": len(decisions),
        **{k: sum(t[k] for t in per_split.values()) for k in kinds},
        "by_split": {s: {k: per_split[s][k] for k in kinds} for s in SPLITS},
        "unseen_digests": len(set(standing) - {p.digest for p in all_photos}),
    }
    for s in SPLITS:
        save_split(dataset_dir / f"{s}.json", splits[s])
    meta_path = dataset_dir / "metadata.json"
    metadata = read_json(meta_path, "dataset metadata") if meta_path.is_file() else {}
    counts = {s: {label: class_counts(records).get(label, 0) for label in task.labels}
              for s, records in (*splits.items(), ("total", splits["train"] + splits["val"]))}
    metadata.update(counts=counts, n_train=len(splits["train"]), n_val=len(splits["val"]), reviews=block)
    write_json_atomic(meta_path, metadata)
    return block


def is_current(dataset_dir: Path) -> bool:
    """True when the split files were derived from the log as it is now (no decision waiting to be applied)."""
    dataset_dir = Path(dataset_dir)
    path = log.log_path(dataset_dir)
    size = path.stat().st_size if path.is_file() else 0
    meta_path = dataset_dir / "metadata.json"
    if not meta_path.is_file():
        return size == 0
    block = (read_json(meta_path, "dataset metadata") or {}).get("reviews")
    if not isinstance(block, dict):
        return size == 0
    return block.get("log_bytes") == size


def load_reviewed(dataset_dir: Path, split: str, task: Task) -> list[Record]:
    """A split as the next stage reads it: `sync` first, so decisions a killed review server saved but never
    applied are in it, then `load_split`'s checks. Every reader of a dataset (train, evaluate, heldout) goes
    through here."""
    sync(dataset_dir, task)
    return load_split(dataset_dir, split, task)


def sync(dataset_dir: Path, task: Task) -> dict[str, Any] | None:
    """Bring the split files up to the log when they are behind it (a review server killed between saving a
    decision and rewriting the splits); returns the `reviews` block when anything was derived."""
    if is_current(dataset_dir):
        return None
    if not os.access(dataset_dir, os.W_OK):
        raise ElementalError(f"{dataset_dir} holds reviews not yet applied to train.json/val.json and the folder "
                             "is read-only: make it writable, or run from a writable copy")
    with log.locked(dataset_dir):
        return apply(dataset_dir, task)
