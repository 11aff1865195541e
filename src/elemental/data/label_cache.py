"""The teacher's answer cache: SQLite, one row per (photo sha256, teacher model, prompt version).

Every answer the teacher is paid for is committed the moment it arrives, so a crash, a Ctrl-C or a
re-run never loses a paid answer and never pays for the same photo twice (DESIGN §6). SQLite is the
embedded default: one file, transactional, safe against a killed process (WAL journal, synchronous
FULL), and readable by another process while a run is going on (the tests count rows mid-run).

Batch API runs are recorded too (input file, batch id, state, the photos in it) so a re-run resumes
polling a batch it already paid for instead of submitting those photos again.

One connection is shared by all threads behind a lock: writes are tiny and rare next to the
seconds a teacher takes to answer, so a lock costs nothing and keeps the module simple.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ..errors import ElementalError

Status = Literal["ok", "rejected"]
# Batch states that will not change any more on the server; "consumed" is ours: its answers are cached.
BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_CONSUMED = "consumed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'rejected')),
    element TEXT,
    reason TEXT,
    confidence REAL,
    reject_reason TEXT,
    attempts INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    via TEXT NOT NULL DEFAULT 'sync',
    created_at TEXT NOT NULL,
    PRIMARY KEY (sha256, model, prompt_version)
);
CREATE TABLE IF NOT EXISTS batches (
    input_file_id TEXT PRIMARY KEY,
    batch_id TEXT UNIQUE,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    state TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    input_file_id TEXT NOT NULL REFERENCES batches(input_file_id),
    sha256 TEXT NOT NULL,
    PRIMARY KEY (input_file_id, sha256)
);
"""


@dataclass(frozen=True)
class CachedLabel:
    """One cached teacher verdict: an accepted label, or a rejection with its reason."""

    sha256: str
    model: str
    prompt_version: str
    status: Status
    element: str | None
    reason: str | None
    confidence: float | None
    reject_reason: str | None
    attempts: int
    tokens_in: int
    tokens_out: int
    via: str
    created_at: str


@dataclass(frozen=True)
class BatchRecord:
    """A Batch API submission: `batch_id` is None while only the input file is known (crash window)."""

    input_file_id: str
    batch_id: str | None
    model: str
    prompt_version: str
    state: str
    output_file_id: str | None
    error_file_id: str | None
    shas: tuple[str, ...]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class LabelCache:
    """Thread-safe SQLite store of teacher answers and Batch API bookkeeping."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit, so every statement is its own committed transaction
            # unless wrapped in `_tx` (a crash can never leave a paid answer uncommitted in a buffer).
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ElementalError(f"{self.path}: not a usable label cache ({e})") from None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LabelCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    # -- labels --------------------------------------------------------------------------------
    def get(self, sha256: str, model: str, prompt_version: str) -> CachedLabel | None:
        """The cached verdict for one photo under this teacher and prompt, or None."""
        return self.get_many([sha256], model, prompt_version).get(sha256)

    def get_many(self, shas: Iterable[str], model: str, prompt_version: str) -> dict[str, CachedLabel]:
        """Cached verdicts for many photos at once (one query per 500, not one per photo)."""
        wanted = list(dict.fromkeys(shas))
        found: dict[str, CachedLabel] = {}
        with self._lock:
            for chunk in _chunks(wanted, 500):
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT * FROM labels WHERE model = ? AND prompt_version = ? AND sha256 IN ({marks})",
                    (model, prompt_version, *chunk),
                ).fetchall()
                for row in rows:
                    found[row[0]] = CachedLabel(*row)
        return found

    def put(
        self,
        sha256: str,
        model: str,
        prompt_version: str,
        *,
        status: Status,
        element: str | None = None,
        reason: str | None = None,
        confidence: float | None = None,
        reject_reason: str | None = None,
        attempts: int = 1,
        tokens_in: int = 0,
        tokens_out: int = 0,
        via: str = "sync",
    ) -> None:
        """Store (or replace) one verdict, committed before this returns."""
        if status not in ("ok", "rejected"):
            raise ValueError(f"status must be 'ok' or 'rejected', got {status!r}")
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sha256, model, prompt_version, status, element, reason, confidence, reject_reason,
                 attempts, tokens_in, tokens_out, via, _now()),
            )

    def delete(self, shas: Iterable[str], model: str, prompt_version: str) -> int:
        """Forget verdicts (e.g. to ask again about rejected photos); returns how many were removed."""
        n = 0
        with self._lock, self._tx():
            for chunk in _chunks(list(shas), 500):
                marks = ",".join("?" * len(chunk))
                cur = self._db.execute(
                    f"DELETE FROM labels WHERE model = ? AND prompt_version = ? AND sha256 IN ({marks})",
                    (model, prompt_version, *chunk),
                )
                n += cur.rowcount
        return n

    def iter_labels(self, model: str | None = None, prompt_version: str | None = None) -> Iterator[CachedLabel]:
        """All cached verdicts (optionally for one teacher/prompt), e.g. to re-filter without paying again."""
        where, args = _where(model, prompt_version)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM labels{where} ORDER BY created_at, sha256", args).fetchall()
        return (CachedLabel(*row) for row in rows)

    def stats(self, model: str | None = None, prompt_version: str | None = None) -> dict[str, int]:
        """Counts and paid tokens of what is cached: entries, ok, rejected, tokens_in, tokens_out, batches."""
        sql = (
            "SELECT COUNT(*), COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(status = 'rejected'), 0), "
            "COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0) FROM labels"
        )
        where, args = _where(model, prompt_version)
        with self._lock:
            entries, ok, rejected, tin, tout = self._db.execute(sql + where, args).fetchone()
            (batches,) = self._db.execute("SELECT COUNT(*) FROM batches" + where, args).fetchone()
        return {"entries": entries, "ok": ok, "rejected": rejected, "tokens_in": tin, "tokens_out": tout,
                "batches": batches}

    # -- Batch API bookkeeping -----------------------------------------------------------------
    def record_batch_upload(self, input_file_id: str, model: str, prompt_version: str, shas: Iterable[str]) -> None:
        """Remember an uploaded batch input file and its photos, before the batch is created."""
        now = _now()
        with self._lock, self._tx():
            self._db.execute(
                "INSERT INTO batches VALUES (?, NULL, ?, ?, 'uploaded', NULL, NULL, ?, ?)",
                (input_file_id, model, prompt_version, now, now),
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO batch_items VALUES (?, ?)", [(input_file_id, s) for s in shas]
            )

    def record_batch_created(self, input_file_id: str, batch_id: str, state: str) -> None:
        """Attach the server's batch id to an uploaded input file: from now on a re-run polls it."""
        with self._lock:
            self._db.execute(
                "UPDATE batches SET batch_id = ?, state = ?, updated_at = ? WHERE input_file_id = ?",
                (batch_id, state, _now(), input_file_id),
            )

    def set_batch_state(
        self, batch_id: str, state: str, output_file_id: str | None = None, error_file_id: str | None = None
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE batches SET state = ?, output_file_id = COALESCE(?, output_file_id), "
                "error_file_id = COALESCE(?, error_file_id), updated_at = ? WHERE batch_id = ?",
                (state, output_file_id, error_file_id, _now(), batch_id),
            )

    def open_batches(self, model: str, prompt_version: str) -> list[BatchRecord]:
        """Batches of this teacher and prompt whose answers are not all cached yet (oldest first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT input_file_id, batch_id, model, prompt_version, state, output_file_id, error_file_id "
                "FROM batches WHERE model = ? AND prompt_version = ? AND state != ? ORDER BY created_at, rowid",
                (model, prompt_version, BATCH_CONSUMED),
            ).fetchall()
            out = []
            for row in rows:
                shas = tuple(
                    s for (s,) in self._db.execute(
                        "SELECT sha256 FROM batch_items WHERE input_file_id = ? ORDER BY rowid", (row[0],)
                    )
                )
                out.append(BatchRecord(*row, shas=shas))
        return out


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _where(model: str | None, prompt_version: str | None) -> tuple[str, list[str]]:
    """A WHERE clause (and its arguments) selecting one teacher and/or prompt version; "" for all."""
    conds = [(col, v) for col, v in (("model", model), ("prompt_version", prompt_version)) if v is not None]
    if not conds:
        return "", []
    return " WHERE " + " AND ".join(f"{col} = ?" for col, _ in conds), [v for _, v in conds]


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
