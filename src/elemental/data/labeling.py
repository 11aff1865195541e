"""How prepare asks the teacher: how many photos to label at a time, through which path, from which cache.

The synchronous path labels in small chunks between checks of the targets, so it stops paying soon
after they are met. The Batch API path labels in waves: each wave is as many photos as the targets
still need divided by the yield so far (confident labels per photo asked, per class with
`per_class_target`), so a run waits about one batch turnaround per wave, usually one or two, and
the run summary says how many labels were bought beyond the target.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..config import PrepareConfig
from ..task import Task
from .teacher.cache import CachedLabel, LabelCache
from .teacher.prompt import prompt_version
from .teacher.results import LabelResult
from .teacher.sync import endpoint, teacher_key

DEFAULT_LABEL_CACHE = Path("~/.cache/elemental/labels.sqlite")
SYNC_CHUNK_MIN = 32  # photos per synchronous chunk: at least this, or 8 per worker
WAVE_MARGIN = 1.1  # a wave asks 10% more than the yield so far says the targets need: fewer waves, each hours


def confident_counts(labels: Iterable[tuple[str | None, float]], min_confidence: float) -> Counter[str]:
    """Per label, the (label, confidence) pairs that count toward the targets (None: not labelled)."""
    return Counter(label for label, confidence in labels if label is not None and confidence >= min_confidence)


def wave_size(have: Counter[str], got: Counter[str], asked: int, cfg: PrepareConfig, task: Task) -> int:
    """Photos to send in the next wave: what the targets still need over the yield so far, plus WAVE_MARGIN.

    `have`: confident photos per label so far (every source); `got`: confident teacher labels per label
    among the `asked` photos sent so far. Yields are smoothed (add-one), so the first wave assumes every
    photo counts, spread evenly over the labels.
    """
    labels = task.labels
    if cfg.per_class_target is not None:
        need = 0.0
        for label in labels:
            short = cfg.per_class_target - have[label]
            if short > 0:
                need = max(need, short * (asked + len(labels)) / (got[label] + 1))
    else:
        short = cfg.photo_cap(len(labels)) - sum(have.values())
        need = max(0, short) * (asked + 1) / (sum(got.values()) + 1)
    return max(1, math.ceil(need * WAVE_MARGIN))


class Labeler:
    """Labels photos for prepare with the teacher (sync or batch), or with `relabel_only` from its cache alone."""

    def __init__(self, cfg: PrepareConfig, task: Task):
        self.cfg, self.task = cfg, task
        self.cache_path = (cfg.label_cache or DEFAULT_LABEL_CACHE).expanduser()
        # The cache key and the records' `labeler` tag: the same version the Teacher computes.
        self.prompt_version = prompt_version(task, detail=cfg.detail)
        self.asked = 0  # photos sent to label()
        self.got: Counter[str] = Counter()  # confident labels among them
        self._teacher = None
        self._batch = None

    @property
    def teacher(self):
        if self._teacher is None:
            from .teacher.sync import Teacher

            c = self.cfg
            self._teacher = Teacher(
                self.task, cache_path=self.cache_path, model=c.labeler_model, base_url=c.labeler_base_url,
                num_workers=c.num_workers, max_reasks=c.max_reasks, detail=c.detail,
                temperature=c.labeler_temperature, seed=c.labeler_seed, max_tokens=c.labeler_max_tokens,
                max_consecutive_failures=c.max_consecutive_failures, retry_rejected=c.retry_rejected,
                prices=c.prices,
            )
        return self._teacher

    @property
    def batch(self):
        if self._batch is None:
            from .teacher.batch import BatchLabeler

            c = self.cfg
            self._batch = BatchLabeler(self.teacher, max_photos=c.batch_max_photos,
                                       poll_interval=c.batch_poll_interval, max_wait=c.batch_max_wait,
                                       fallback=c.batch_fallback)
        return self._batch

    def chunk_size(self, labels: Iterable[tuple[str | None, float]]) -> int:
        """How many unlabelled photos to gather before labeling them: a sync chunk, or the next batch wave.

        `labels`: (label, confidence) of every photo at hand (None: not labelled).
        """
        if not self.cfg.batch or self.cfg.relabel_only:
            return max(SYNC_CHUNK_MIN, self.cfg.num_workers * 8)
        have = confident_counts(labels, self.cfg.min_confidence)
        return wave_size(have, self.got, self.asked, self.cfg, self.task)

    def cached(self, shas: Sequence[str]) -> dict[str, CachedLabel]:
        """Cached answers of this teacher (any model it served), asking nothing: `--relabel-only` and `--estimate`."""
        key = teacher_key(self.cfg.labeler_model, self.prompt_version, endpoint(self.cfg.labeler_base_url))
        with LabelCache(self.cache_path) as cache:
            return cache.get_many(shas, key)

    def answers(self, photos: Sequence[tuple[str, Path]]) -> dict[str, LabelResult | CachedLabel]:
        """The teacher's verdicts on (sha256, JPEG file) pairs: from the cache alone, in batches, or one by one."""
        if self.cfg.relabel_only:
            return self.cached([sha for sha, _ in photos])
        if self.cfg.batch:
            return self.batch.label(photos)
        return self.teacher.label_many(photos)

    def count(self, answers: Iterable[LabelResult | CachedLabel]) -> None:
        """Record one more wave's yield (what `chunk_size` sizes the next wave from)."""
        answers = list(answers)
        self.asked += len(answers)
        self.got += confident_counts(((a.element if a.status == "ok" else None, a.confidence or 0.0)
                                      for a in answers), self.cfg.min_confidence)

    def report(self) -> dict[str, Any] | None:
        if self._teacher is None:
            return None
        report = self._teacher.report()
        if self._batch is not None and report["batch_unanswered"]:
            report["batch_unanswered_sync_estimate"] = self._batch.sync_estimate(report["batch_unanswered"])
        return report

    def close(self) -> None:
        if self._teacher is not None:
            self._teacher.close()
