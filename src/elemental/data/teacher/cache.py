"""The teacher's answer cache: SQLite, one row per (photo, model asked for, prompt version, host, model that answered).

Every answer the teacher is paid for is committed the moment it arrives, so a crash, a Ctrl-C or a
re-run never loses a paid answer and never pays for the same photo twice (DESIGN §6). SQLite is the
embedded default: one file, transactional, safe against a killed process (WAL journal, synchronous
FULL), and readable by another process while a run is going on (the tests count rows mid-run).

An answer is tied to its teacher: the model name asked for, the API base URL's host, and the model the
server says answered (the response's `model` field). A local server can put another GGUF behind the
same name; its answers are then another teacher's and are asked again (`get_many(served=...)`).
Caches written before hosts were recorded (schema 0) are migrated in place: their rows keep an empty
host and served model and stay readable where they came from, OpenAI's default endpoint.

Batch API runs are recorded too (input file, batch id, state, the photos in it) so a re-run resumes
polling a batch it already paid for instead of submitting those photos again.

One connection is shared by all threads behind a lock: writes are tiny and rare next to the
seconds a teacher takes to answer, so a lock costs nothing and keeps the module simple.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ...errors import ElementalError

Status = Literal["ok", "rejected"]
# Batch states that will not change any more on the server; "consumed" is ours: its answers are cached.
BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_CONSUMED = "consumed"
SCHEMA_VERSION = 1  # 0: keyed by (sha256, model, prompt_version) alone
LEGACY = ""  # host and served model of rows written before they were recorded

_LABELS = """
CREATE TABLE IF NOT EXISTS {name} (
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
    host TEXT NOT NULL DEFAULT '',
    served_model TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (sha256, model, prompt_version, host, served_model)
);
"""
_SCHEMA = _LABELS.format(name="labels") + """
CREATE TABLE IF NOT EXISTS batches (
    input_file_id TEXT PRIMARY KEY,
    batch_id TEXT UNIQUE,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    state TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    host TEXT NOT NULL DEFAULT ''
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
    host: str = LEGACY
    served_model: str = LEGACY


@dataclass(frozen=True)
class TeacherKey:
    """Whose answers: the model asked for, the prompt version and the endpoint's host.

    `legacy` also reads rows from before hosts were recorded; the Teacher sets it for OpenAI's own
    endpoint, the default those rows came from.
    """

    model: str
    prompt_version: str
    host: str
    legacy: bool = False

    def hosts(self) -> tuple[str, ...]:
        return (self.host, LEGACY) if self.legacy else (self.host,)


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
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ElementalError(f"{self.path}: not a usable label cache ({e})") from None
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        """Schema 0 -> 1 in one transaction: labels gain host and served model (in the key), batches a host."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version >= SCHEMA_VERSION:
            return
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(labels)")}
        with self._tx():
            if "host" not in columns:
                self._db.execute(_LABELS.format(name="labels_v1"))
                self._db.execute("INSERT INTO labels_v1 SELECT *, '', '' FROM labels")
                self._db.execute("DROP TABLE labels")
                self._db.execute("ALTER TABLE labels_v1 RENAME TO labels")
            if "host" not in {row[1] for row in self._db.execute("PRAGMA table_info(batches)")}:
                self._db.execute("ALTER TABLE batches ADD COLUMN host TEXT NOT NULL DEFAULT ''")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
    def get(self, sha256: str, key: TeacherKey, served: str | None = None) -> CachedLabel | None:
        """The cached verdict for one photo from this teacher, or None (see `get_many`)."""
        return self.get_many([sha256], key, served).get(sha256)

    def get_many(self, shas: Iterable[str], key: TeacherKey, served: str | None = None) -> dict[str, CachedLabel]:
        """Cached verdicts for many photos at once (one query per 500, not one per photo).

        With `served`, only answers from that served model count (and legacy rows, whose answering model
        was never recorded); without it, any. Where a photo has several, the newest of that model wins.
        """
        wanted = list(dict.fromkeys(shas))
        found: dict[str, CachedLabel] = {}
        hosts = key.hosts()
        served_sql, served_args = ("", []) if served is None else (" AND served_model IN (?, ?)", [served, LEGACY])
        with self._lock:
            for chunk in _chunks(wanted, 500):
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT * FROM labels WHERE model = ? AND prompt_version = ? "
                    f"AND host IN ({','.join('?' * len(hosts))}){served_sql} AND sha256 IN ({marks}) "
                    "ORDER BY served_model != '', created_at, rowid",
                    (key.model, key.prompt_version, *hosts, *served_args, *chunk),
                ).fetchall()
                for row in rows:
                    found[row[0]] = CachedLabel(*row)
        return found

    def put(
        self,
        sha256: str,
        key: TeacherKey,
        *,
        served_model: str,
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
        """Store (or replace) one verdict of the model that answered, committed before this returns."""
        if status not in ("ok", "rejected"):
            raise ValueError(f"status must be 'ok' or 'rejected', got {status!r}")
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sha256, key.model, key.prompt_version, status, element, reason, confidence, reject_reason,
                 attempts, tokens_in, tokens_out, via, _now(), key.host, served_model),
            )

    def served_models(self, key: TeacherKey) -> Counter[str]:
        """How many answers each served model gave under this key ("" for legacy rows)."""
        hosts = key.hosts()
        with self._lock:
            rows = self._db.execute(
                f"SELECT served_model, COUNT(*) FROM labels WHERE model = ? AND prompt_version = ? "
                f"AND host IN ({','.join('?' * len(hosts))}) GROUP BY served_model",
                (key.model, key.prompt_version, *hosts),
            ).fetchall()
        return Counter(dict(rows))

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
    def record_batch_upload(self, input_file_id: str, key: TeacherKey, shas: Iterable[str]) -> None:
        """Remember an uploaded batch input file and its photos, before the batch is created."""
        now = _now()
        with self._lock, self._tx():
            self._db.execute(
                "INSERT INTO batches VALUES (?, NULL, ?, ?, 'uploaded', NULL, NULL, ?, ?, ?)",
                (input_file_id, key.model, key.prompt_version, now, now, key.host),
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

    def open_batches(self, key: TeacherKey) -> list[BatchRecord]:
        """Batches of this teacher whose answers are not all cached yet (oldest first)."""
        hosts = key.hosts()
        with self._lock:
            rows = self._db.execute(
                "SELECT input_file_id, batch_id, model, prompt_version, state, output_file_id, error_file_id "
                f"FROM batches WHERE model = ? AND prompt_version = ? AND host IN ({','.join('?' * len(hosts))}) "
                "AND state != ? ORDER BY created_at, rowid",
                (key.model, key.prompt_version, *hosts, BATCH_CONSUMED),
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
