"""The review log: `DATASET_DIR/reviews.jsonl`, one JSON object per decision a person made, appended and fsynced.

The log is the only record of a person's work, so it is append-only: a decision is on disk before the page
is told it was saved, a killed server or a closed tab loses nothing, and two tabs (or two servers) on one
dataset interleave their lines under one lock instead of overwriting each other. Everything else (the
reviewed `train.json` / `val.json`, the counts in `metadata.json`) is derived from it and can be derived
again at any time (`review.dataset.sync`).

A photo's state is the fold of its lines in file order: `accept`, `relabel` and `drop` push a decision,
`undo` pops the newest one still standing. The newest standing decision wins, so when two tabs decide the
same photo the later line is the answer and the earlier one is still in the log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ..errors import ElementalError

logger = logging.getLogger(__name__)

LOG_NAME = "reviews.jsonl"
Action = Literal["accept", "relabel", "drop", "undo"]
ACTIONS: tuple[str, ...] = ("accept", "relabel", "drop", "undo")


@dataclass(frozen=True)
class Decision:
    """One line of the log. `digest` is the photo's identity (the record's sha256 of the original file);
    `old` is the teacher's label; `new` is the person's label, None when the photo was dropped or for an
    undo."""

    digest: str
    image_id: str
    action: Action
    old: str | None
    new: str | None
    time: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def now() -> str:
    """Milliseconds in UTC: two decisions within a second keep their order when read by a person."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def log_path(dataset_dir: Path) -> Path:
    return Path(dataset_dir) / LOG_NAME


@contextmanager
def locked(dataset_dir: Path) -> Iterator[None]:
    """Exclusive lock over the log and everything derived from it (one writer at a time, across processes).

    The lock is the dataset's parent folder, not a file in the dataset: `prepare` replaces the whole dataset
    folder in one rename, and a lock inside it would not keep a review server from appending to the folder
    being replaced; a lock file beside it would be litter in the user's folder. (Reviews of sibling datasets
    share it; each holds it for one append and rewrite.)
    """
    parent = Path(dataset_dir).resolve().parent
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ElementalError(f"cannot open {parent} to lock the review log: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def append(dataset_dir: Path, decision: Decision) -> None:
    """Append one decision and fsync it (and the folder, when the log is new) before returning.

    The caller holds `locked(dataset_dir)`. A failure (read-only folder, full disk) raises ElementalError
    with the reason; the log keeps every line written before.
    """
    path = log_path(dataset_dir)
    created = not path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise ElementalError(f"cannot write {path}: {e.strerror}") from None
    try:
        data = (decision.to_json() + "\n").encode("utf-8")
        if not created and _ends_torn(path):  # a write cut by a crash: start a line of our own after it
            data = b"\n" + data
        if os.write(fd, data) != len(data):
            raise ElementalError(f"cannot write {path}: short write")
        os.fsync(fd)
    except OSError as e:
        raise ElementalError(f"cannot write {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if created:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _ends_torn(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read(dataset_dir: Path) -> list[Decision]:
    """Every decision in file order.

    A line that is not JSON at all is a write a crash cut short (`append` starts a new line after one): it is
    skipped with a warning naming file:line, since nothing the page was told is saved can be in it (the page
    hears "saved" only after the fsync). A JSON line with a bad field stops with file:line.field.
    """
    path = log_path(dataset_dir)
    if not path.is_file():
        return []
    out: list[Decision] = []
    for n, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("%s:%d: skipped a torn write (not JSON): %r", path, n, line[:60])
            continue
        out.append(_parse(obj, f"{path}:{n}"))
    return out


def _parse(obj: object, where: str) -> Decision:
    if not isinstance(obj, dict):
        raise ElementalError(f"{where}: expected a JSON object")
    for key in ("digest", "image_id", "action", "time"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise ElementalError(f"{where}.{key}: missing or not a string")
    if obj["action"] not in ACTIONS:
        raise ElementalError(f"{where}.action: {obj['action']!r} is not one of {list(ACTIONS)}")
    for key in ("old", "new"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise ElementalError(f"{where}.{key}: must be a label or null")
    if obj["action"] in ("accept", "relabel") and not obj.get("new"):
        raise ElementalError(f"{where}.new: a {obj['action']} needs the label")
    return Decision(obj["digest"], obj["image_id"], obj["action"], obj.get("old"), obj.get("new"), obj["time"])


def states(decisions: list[Decision]) -> dict[str, Decision]:
    """Each photo's standing decision (accept, relabel or drop); photos whose every decision was undone,
    or that were never decided, are absent."""
    stacks: dict[str, list[Decision]] = {}
    for d in decisions:
        stack = stacks.setdefault(d.digest, [])
        if d.action == "undo":
            if stack:
                stack.pop()
        else:
            stack.append(d)
    return {digest: stack[-1] for digest, stack in stacks.items() if stack}
