"""What labeling produced: one verdict per photo, and the run's counters for the cost report."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from .answers import reject_code


@dataclass(frozen=True)
class LabelResult:
    """The teacher's verdict on one photo. `cached` means no request was made for it in this call."""

    sha256: str
    status: Literal["ok", "rejected"]
    element: str | None
    reason: str | None
    confidence: float | None
    reject_reason: str | None
    cached: bool
    tokens_in: int
    tokens_out: int
    attempts: int = 0


@dataclass
class Prior:
    """What was already paid for a photo before the normal path takes over (a batch answer)."""

    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    problem: str | None = None
    text: str = ""
    served: str = ""  # the model that gave the paid answer


class Stats:
    """Counters for the cost report, shared by the worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.retries = self.reasks = self.api_errors = 0
        self.tokens_in = self.tokens_out = 0
        self.batch_tokens_in = self.batch_tokens_out = self.batch_answers = self.batches_submitted = 0
        self.probes = self.batch_unanswered = 0
        self.batches_failed: list[str] = []  # "batch_id (state)" of batches that ended without all answers
        self.cache_hits = self.labeled = self.rejected = 0
        self.rejects_by_reason: Counter[str] = Counter()

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                setattr(self, key, getattr(self, key) + n)

    def count_result(self, result: LabelResult) -> None:
        with self._lock:
            if result.cached:
                self.cache_hits += 1
            if result.status == "ok":
                self.labeled += 1
            else:
                self.rejected += 1
                self.rejects_by_reason[reject_code(result.reject_reason)] += 1


def result_from_row(row: Any, *, cached: bool) -> LabelResult:
    return LabelResult(row.sha256, row.status, row.element, row.reason, row.confidence, row.reject_reason,
                       cached, row.tokens_in, row.tokens_out, row.attempts)
