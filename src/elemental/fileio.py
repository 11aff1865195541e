"""Atomic file writes: a crash or Ctrl-C never leaves a half-written file where a finished one belongs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file to write `path` through in pieces: a temp file in the same folder, fsynced and renamed
    over `path` when the block ends; removed, leaving `path` as it was, when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync, and an atomic rename."""
    with atomic_writer(path) as f:
        f.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON (UTF-8, non-ASCII kept readable) atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    Stages that write many files (a saved model, a GGUF folder) build them here, so an
    interrupted stage leaves either the old complete output or nothing, never a mix.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def broken_link(path: Path) -> str | None:
    """What is wrong with `path` when it is a symbolic link to nothing, else None: a photo folder copied
    without the files its links point to is a common mistake, and "not found" alone would hide it."""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (points to {os.readlink(path)}, which does not exist)"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so GGUF files of hundreds of MB stay cheap in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_text_utf8(path: Path) -> str:
    """A text file as UTF-8 (a leading BOM is dropped); anything else is a one-line ElementalError that
    names the file and the byte offset, so a Latin-1 or UTF-16 file is refused, not half-read."""
    from .errors import ElementalError

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ElementalError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ElementalError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                             "save it as UTF-8") from None


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, turning a missing, non-UTF-8 or malformed file into a one-line ElementalError."""
    from .errors import ElementalError

    path = Path(path)
    if not path.is_file():
        raise ElementalError(f"{what} not found: {path}")
    text = read_text_utf8(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ElementalError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise ElementalError(f"{path}: JSON nested too deeply") from None
