"""The file sources: `folder:PATH` (local photos, a folder-per-class tree or a flat folder) and `json:FILE` (the
seed's custom JSON), both read from disk lazily."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import ElementalError
from ...fileio import broken_link
from ...images import IMAGE_SUFFIXES, SNIFF_BYTES, looks_like_image
from ...task import Task
from ..records import load_split
from .base import Photo, PhotoStream, Rejected


def _folder_source(spec: str, root: Path, task: Task, skip: frozenset[str]) -> PhotoStream:
    files, others = _scan_folder(root, task)
    notes: list[str] = []

    def photos() -> Iterator[Photo | Rejected]:
        for path, rel, label in files:
            if rel in skip:
                continue
            yield _read_local(path, rel, label)
        for path, rel in others:  # never a silent skip: every file that is not a photo is reported
            yield Rejected("local", rel, f"{path}: {_not_a_photo(path)}; skipped", "not_a_photo")

    return PhotoStream(spec, photos(), notes)


def _is_photo_file(path: Path) -> bool:
    """A photo by its suffix, or (no or an unknown suffix: cameras and phones write such files) by its first bytes."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return looks_like_image(f.read(SNIFF_BYTES))
    except OSError:
        return False


def _not_a_photo(path: Path) -> str:
    if problem := broken_link(path):
        return problem
    kind = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
    return f"not a photo file ({kind}, and its content is not a photo format)"


def _scan_folder(root: Path, task: Task) -> tuple[list[tuple[Path, str, str | None]], list[tuple[Path, str]]]:
    """(path, path relative to root, label) of every photo under `root`, sorted; labels checked now. Also the
    other files found (path, relative path), which the source reports as skipped.

    Photos directly in `root` make it a flat folder (everything under it goes to the teacher); only
    subfolders make it a folder-per-class tree, and then every subfolder must be a label: a typo such
    as `Water/` must fail loudly, not silently turn a labelled set into an unlabelled one.
    """
    if not root.is_dir():
        raise ElementalError(f"source folder not found: {root}")
    entries = [e for e in sorted(root.iterdir()) if not e.name.startswith(".")]
    subdirs = [e for e in entries if e.is_dir() and not e.is_symlink()]
    top_files = [e for e in entries if not e.is_dir()]
    top_photos = any(e.is_file() and _is_photo_file(e) for e in top_files)  # stops at the first photo
    labels = list(task.labels)
    found: list[tuple[Path, str, str | None]] = []
    others: list[tuple[Path, str]] = []
    if top_photos:
        class_dirs = [d.name for d in subdirs if d.name in task.labels]
        if class_dirs:
            raise ElementalError(
                f"{root}: has photos directly in it and class folders {class_dirs}; put every photo in a "
                f"class folder (one of {labels}), or use a flat folder without class folders for the labeler"
            )
        photos, rest = _files_under(root)
        found = [(p, p.relative_to(root).as_posix(), None) for p in photos]
        others = [(p, p.relative_to(root).as_posix()) for p in rest]
    else:
        for d in subdirs:
            if d.name not in task.labels:
                raise ElementalError(
                    f"{d}: folder name {d.name!r} is not one of the task's labels {labels} (in a "
                    f"folder-per-class tree every subfolder is a label; a flat folder of photos goes to the labeler)"
                )
        others = [(p, p.relative_to(root).as_posix()) for p in top_files]
        for d in subdirs:
            photos, rest = _files_under(d)
            found.extend((p, p.relative_to(root).as_posix(), d.name) for p in photos)
            others.extend((p, p.relative_to(root).as_posix()) for p in rest)
    if not found:
        raise ElementalError(f"{root}: no photos found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, and at "
                             "the content of files without these suffixes)")
    return found, others


def _files_under(folder: Path) -> tuple[list[Path], list[Path]]:
    """(photo files, other files) under `folder`, recursively, sorted; hidden files and folders and
    symlinked folders are left out (documented, as a system's own files)."""
    photos: list[Path] = []
    others: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                (photos if path.is_file() and _is_photo_file(path) else others).append(path)
    key = lambda p: p.relative_to(folder).as_posix()  # noqa: E731
    return sorted(photos, key=key), sorted(others, key=key)


def _read_local(path: Path, rel: str, label: str | None, **extra: Any) -> Photo | Rejected:
    """A local photo's bytes as a Photo; a file that cannot be read (gone, no permission, empty) is a Rejected."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if problem := broken_link(path):
            return Rejected("local", rel, f"{path}: {problem}", "unreadable")
        return Rejected("local", rel, f"{path}: file disappeared before it was read", "unreadable")
    except OSError as e:
        return Rejected("local", rel, f"{path}: cannot read ({e.strerror or e})", "unreadable")
    if not data:
        return Rejected("local", rel, f"{path}: empty file (0 bytes), not an image", "unreadable")
    source = extra.pop("source", None) or "local"
    source_id = extra.pop("source_id", None) or rel
    return Photo(data=data, source=source, source_id=source_id, label=label, location=str(path), **extra)


# -- json: --------------------------------------------------------------------------------------------


def _json_source(spec: str, path: Path, task: Task, skip: frozenset[str]) -> PhotoStream:
    """The seed's custom JSON: every record checked now (errors name file[index].field), photos read lazily.

    Records keep any provenance they carry (`source`, `source_id`, `attribution`): re-importing a
    dataset built from Unsplash must not turn its photos into anonymous local files.
    """
    if not path.is_file():
        raise ElementalError(f"json source not found: {path}")
    # load_split's rules are the dataset's: the same checks and messages as for train.json.
    as_file = str(path) if ("/" in str(path) or str(path).endswith(".json")) else f"./{path}"
    records = load_split(path.parent, as_file, task, check_images=True)
    base = path.parent

    def photos() -> Iterator[Photo | Rejected]:
        for record in records:
            source_id = record.source_id or record.image_path
            if source_id in skip:
                continue
            yield _read_local(
                base / record.image_path, record.image_path, record.element,
                source=record.source or "local", source_id=source_id, reason=record.reason,
                confidence=record.confidence, attribution=record.attribution,
            )

    return PhotoStream(spec, photos(), [])
