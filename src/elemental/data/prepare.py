"""`elemental prepare`: photos from sources → a seed-layout dataset (`images/`, `train.json`, `val.json`,
`metadata.json`).

This version reads `folder:PATH` sources: folder-per-class trees whose subfolder names are the
labels. Every photo is opened through `images.open_image` (upright RGB) and stored as a JPEG with a
bounded long side under an id derived from the original file's sha256, so re-running on the same
photos gives the same ids. Exact duplicates are dropped, the split is stratified, and the whole
dataset is built in a temp folder and swapped in at the end: an error (an unknown class folder, one
unreadable photo) or an interrupt leaves the previous dataset, or nothing, never a mix.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ElementalError
from ..fileio import atomic_dir, write_json_atomic
from ..images import IMAGE_SUFFIXES, bounded, encode_jpeg, open_image, sha256_of_image_file
from ..task import Task
from .records import Record, save_split
from .split import class_counts, stratified_split

SUPPORTED_SOURCES = "folder:PATH"
FOLDER_LABELER = "folder-name"
FOLDER_REASON = "a photo from the '{label}' folder"
MAX_SIDE = 1024
ID_LENGTH = 12


@dataclass(frozen=True)
class _Candidate:
    """A photo file found in a class folder, before it is read."""

    path: Path
    label: str
    source_id: str  # path relative to the source folder


def prepare_dataset(
    sources: list[str],
    output_dir: Path,
    task: Task,
    *,
    val_fraction: float = 0.1,
    seed: int = 42,
    min_confidence: float = 0.7,
    num_images: int | None = None,
) -> dict[str, Any]:
    """Build the dataset at `output_dir` from `sources`; returns the metadata it wrote (prints nothing)."""
    output_dir = Path(output_dir)
    if not sources:
        raise ElementalError(f"no sources given (supported: {SUPPORTED_SOURCES})")
    if not 0.0 <= min_confidence <= 1.0:
        raise ElementalError(f"min_confidence must be between 0 and 1, got {min_confidence}")
    if not 0.0 < val_fraction < 1.0:
        raise ElementalError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if num_images is not None and num_images < 1:
        raise ElementalError(f"num_images must be at least 1, got {num_images}")
    # Everything that can be checked without reading photos is checked before anything is written.
    queues = _candidates(sources, task, seed)
    _check_replaceable(output_dir)

    dropped = {"duplicate": 0, "low_confidence": 0, "over_num_images": 0}
    records: list[Record] = []
    seen: set[str] = set()
    kept = {label: 0 for label in task.labels}
    with atomic_dir(output_dir) as tmp:
        (tmp / "images").mkdir()
        while num_images is None or len(records) < num_images:
            # Always draw from the class with the fewest photos kept so far: a balanced cap.
            open_labels = [label for label in task.labels if queues[label]]
            if not open_labels:
                break
            label = min(open_labels, key=lambda lb: kept[lb])
            ingested = _ingest(queues[label].popleft(), seen)
            if ingested is None:
                dropped["duplicate"] += 1
                continue
            record, jpeg = ingested
            if record.confidence < min_confidence:
                dropped["low_confidence"] += 1
                continue
            (tmp / record.image_path).write_bytes(jpeg)  # atomic as part of the whole folder swap
            records.append(record)
            kept[label] += 1
        dropped["over_num_images"] = sum(len(q) for q in queues.values())
        if not records:
            raise ElementalError(f"no photos kept from sources {sources} (dropped: {dropped})")
        train, val = stratified_split(records, val_fraction, seed)
        if not val:
            raise ElementalError(
                f"too few photos for a validation split ({len(records)} kept; a class needs at least 2)"
            )
        metadata = _metadata(
            sources, task, train, val, dropped, min_confidence, val_fraction, seed, num_images
        )
        save_split(tmp / "train.json", train)
        save_split(tmp / "val.json", val)
        write_json_atomic(tmp / "metadata.json", metadata)
    return metadata


def _candidates(sources: list[str], task: Task, seed: int) -> dict[str, deque[_Candidate]]:
    """Per label, the photo files of every source, in a seeded shuffled order (what a cap keeps)."""
    per_label: dict[str, list[_Candidate]] = {label: [] for label in task.labels}
    for source in sources:
        kind, sep, arg = source.partition(":")
        if kind != "folder" or not sep or not arg:
            raise ElementalError(f"source {source!r} is not supported yet (supported: {SUPPORTED_SOURCES})")
        for cand in _folder_candidates(Path(arg), task):
            per_label[cand.label].append(cand)
    rng = random.Random(seed)
    for label in task.labels:
        per_label[label].sort(key=lambda c: (str(c.path), c.source_id))
        rng.shuffle(per_label[label])
    return {label: deque(cands) for label, cands in per_label.items()}


def _folder_candidates(root: Path, task: Task) -> list[_Candidate]:
    """Photos of a folder-per-class tree; an unknown class folder or a stray photo is an error."""
    if not root.is_dir():
        raise ElementalError(f"source folder not found: {root}")
    found: list[_Candidate] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                raise ElementalError(
                    f"{entry}: photo outside a class folder "
                    f"(put it in {root}/<label>/, one of {list(task.labels)})"
                )
            continue
        if entry.name not in task.labels:
            raise ElementalError(
                f"{entry}: folder name {entry.name!r} is not one of the task's labels {list(task.labels)}"
            )
        for path in sorted(entry.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not _hidden(rel):
                found.append(_Candidate(path=path, label=entry.name, source_id=rel.as_posix()))
    return found


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _check_replaceable(output_dir: Path) -> None:
    """Refuse to replace a folder that is not a dataset: the swap would delete whatever is in it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ElementalError(f"output_dir exists and is not a folder: {output_dir}")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / "metadata.json").is_file():
        raise ElementalError(
            f"output_dir {output_dir} is not empty and holds no dataset (no metadata.json); "
            "choose a new or empty folder"
        )


def _ingest(cand: _Candidate, seen: set[str]) -> tuple[Record, bytes] | None:
    """Normalise one photo to JPEG bytes plus its record; None when it duplicates one seen before.

    `seen` holds the sha256 of every original file and of every normalised JPEG so far (catching
    byte-identical copies and copies that differ only in container or metadata) and the ids in use.
    """
    original_sha = sha256_of_image_file(cand.path)
    if original_sha in seen:
        return None
    small = bounded(open_image(cand.path), MAX_SIDE)
    jpeg = encode_jpeg(small)
    normalised_sha = hashlib.sha256(jpeg).hexdigest()
    if normalised_sha in seen:
        return None
    image_id = original_sha[:ID_LENGTH]
    if image_id in seen:  # a 48-bit prefix clash between different photos: fall back to the full hash
        image_id = original_sha
    seen.update((original_sha, normalised_sha, image_id))
    record = Record(
        image_id=image_id,
        image_path=f"images/{image_id}.jpg",
        element=cand.label,
        reason=FOLDER_REASON.format(label=cand.label),
        confidence=1.0,
        source="local",
        source_id=cand.source_id,
        sha256=original_sha,
        width=small.width,
        height=small.height,
        labeler=FOLDER_LABELER,
    )
    return record, jpeg


def _metadata(
    sources: list[str],
    task: Task,
    train: list[Record],
    val: list[Record],
    dropped: dict[str, int],
    min_confidence: float,
    val_fraction: float,
    seed: int,
    num_images: int | None,
) -> dict[str, Any]:
    def per_label(records: list[Record]) -> dict[str, int]:
        counts = class_counts(records)
        return {label: counts.get(label, 0) for label in task.labels}

    return {
        "elemental_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sources": list(sources),
        "labels": list(task.labels),
        "labeler": FOLDER_LABELER,
        "counts": {"train": per_label(train), "val": per_label(val), "total": per_label(train + val)},
        "n_train": len(train),
        "n_val": len(val),
        "dropped": dropped,
        "min_confidence": min_confidence,
        "val_fraction": val_fraction,
        "seed": seed,
        "num_images": num_images,
        "image_max_side": MAX_SIDE,
    }
