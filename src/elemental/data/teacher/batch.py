"""The teacher through the OpenAI Batch API: half price, answers within the provider's 24-hour window.

A call submits the photos that need a label as several batches (`max_photos` each, within the API's
per-file limits) that run together, polls them all together and consumes each as it finishes, so a
call waits about one batch's turnaround, not one per batch. Every open batch of this teacher is
polled, also those a killed run left: their answers were paid for, and photos in an open batch are
never submitted again.

Batch answers go through the same validation as synchronous ones; an invalid answer (paid for) is
re-asked through the synchronous path. Photos a batch left unanswered (it failed, expired or was
cancelled; nothing was billed for them) are labelled synchronously at full price only with
`fallback="sync"`; otherwise they are rejected for this run, the report says what labeling them
synchronously would cost, and the next run submits them again.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

from openai.types.chat import ChatCompletion
from tqdm import tqdm

from ...errors import ElementalError
from .answers import Verdict, judge_completion
from .cache import BATCH_CONSUMED, BATCH_TERMINAL, BatchRecord
from .pricing import estimate
from .prompt import chat_messages, response_format
from .results import LabelResult, Prior, result_from_row
from .sync import PhotoData, Teacher, bar_off, teacher_jpeg_of, unique_photos

log = logging.getLogger(__name__)

BATCH_ENDPOINT = "/v1/chat/completions"
MAX_BATCH_REQUESTS = 50_000  # the Batch API's per-file limits (50k requests, 200 MB), with headroom
MAX_BATCH_BYTES = 150_000_000
MAX_BATCHES_SCANNED = 1000  # how far back to look for a batch created just before a crash
DEFAULT_MAX_PHOTOS = 250
Fallback = Literal["none", "sync"]


class BatchLabeler:
    """Labels photos for a Teacher through the Batch API (see the module docstring)."""

    def __init__(
        self,
        teacher: Teacher,
        *,
        max_photos: int = DEFAULT_MAX_PHOTOS,
        poll_interval: float = 30.0,
        max_wait: float | None = None,
        fallback: Fallback = "none",
    ) -> None:
        if not 1 <= max_photos <= MAX_BATCH_REQUESTS:
            raise ElementalError(f"batch_max_photos must be 1..{MAX_BATCH_REQUESTS}, got {max_photos}")
        if fallback not in ("none", "sync"):
            raise ElementalError(f"batch_fallback must be 'none' or 'sync', got {fallback!r}")
        self.t = teacher
        self.max_photos = max_photos
        self.poll_interval = poll_interval
        self.max_wait = max_wait
        self.fallback: Fallback = fallback

    def label(
        self, photos: Sequence[tuple[str, PhotoData]], *, progress: bool | None = None
    ) -> dict[str, LabelResult]:
        """Label (sha256, image bytes or file) pairs; one result per distinct photo, in input order.

        With `max_wait` set, raises ElementalError naming the batches still running once it has passed;
        their answers are cached as they finish, and a re-run resumes polling them.
        """
        t = self.t
        unique = unique_photos(photos)
        results = t.cached_results(unique)
        todo = {sha: data for sha, data in unique.items() if sha not in results}
        if not todo:
            return {sha: results[sha] for sha in unique}
        in_flight = {sha for b in t.cache.open_batches(t.key) for sha in b.shas}
        results.update(self._submit({sha: data for sha, data in todo.items() if sha not in in_flight}))
        for b in t.cache.open_batches(t.key):
            if b.batch_id is None:
                self._adopt_or_create(b)
        polled = t.cache.open_batches(t.key)  # all of this teacher's, a killed run's too: paid for either way
        followups, unanswered = self._poll(polled, todo, progress)
        now_cached = t.lookup([sha for sha in todo if sha not in results])
        for sha, row in now_cached.items():
            if sha not in followups and sha not in results:
                results[sha] = result_from_row(row, cached=False)
                t.stats.count_result(results[sha])
        results.update(t.run_pool([(sha, todo[sha], prior) for sha, prior in followups.items()
                                   if sha not in results], progress))
        # Photos no batch answered: a failed, expired or cancelled batch, an error line, or a batch without them.
        for sha in todo:
            if sha not in results and sha not in unanswered:
                unanswered[sha] = "no batch answered it"
        results.update(self._unanswered({sha: why for sha, why in unanswered.items() if sha not in results},
                                        todo, progress))
        for b in polled:
            t.cache.set_batch_state(b.batch_id or "", BATCH_CONSUMED)
        return {sha: results[sha] for sha in unique}

    # -- submitting ----------------------------------------------------------------------------
    def _submit(self, photos: Mapping[str, PhotoData]) -> dict[str, LabelResult]:
        """Upload JSONL input files of `max_photos` photos (within the API's limits) and create their batches.

        Each batch is created as soon as its file is uploaded, so the first ones run while the next are
        built. The input file id is recorded before the batch is created and the batch id right after, so a
        crash between the two is recovered by finding the batch by its input file (`_adopt_or_create`).
        Returns results for photos that could not be read (they are not submitted).
        """
        unreadable: dict[str, LabelResult] = {}
        for n, chunk in enumerate(self._chunks(photos, unreadable)):
            data = b"".join(line for _, line in chunk)
            name = f"elemental-{self.t.prompt_version}-{n}.jsonl"
            file = self.t.call(self.t.client.files.create, file=(name, data, "application/jsonl"), purpose="batch")
            self.t.cache.record_batch_upload(file.id, self.t.key, [sha for sha, _ in chunk])
            batch_id = self._create_batch(file.id)
            log.info("submitted batch %s with %d photos", batch_id, len(chunk))
        return unreadable

    def _chunks(
        self, photos: Mapping[str, PhotoData], unreadable: dict[str, LabelResult]
    ) -> Iterator[list[tuple[str, bytes]]]:
        """Request lines, `max_photos` (and at most MAX_BATCH_BYTES) per chunk; unreadable photos are rejected."""
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for sha, data in photos.items():
            try:
                jpeg = teacher_jpeg_of(data, self.t.max_side, sha)
            except ElementalError as e:
                unreadable[sha] = self.t.reject(sha, f"unreadable: {e}", Prior(), store=False)
                self.t.stats.count_result(unreadable[sha])
                continue
            body = {"model": self.t.model, "messages": chat_messages(self.t.task, jpeg, self.t.detail),
                    "response_format": response_format(self.t.task), **self.t.request_params()}
            line = {"custom_id": sha, "method": "POST", "url": BATCH_ENDPOINT, "body": body}
            encoded = (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")
            if chunk and (len(chunk) >= self.max_photos or size + len(encoded) > MAX_BATCH_BYTES):
                yield chunk
                chunk, size = [], 0
            chunk.append((sha, encoded))
            size += len(encoded)
        if chunk:
            yield chunk

    def _adopt_or_create(self, b: BatchRecord) -> None:
        """An uploaded input file without a recorded batch: find the batch made from it, else create it."""
        recent = self.t.call(self.t.client.batches.list, limit=100)
        for batch in itertools.islice(recent, MAX_BATCHES_SCANNED):  # newest first; ours is recent
            if batch.input_file_id == b.input_file_id:
                self.t.cache.record_batch_created(b.input_file_id, batch.id, batch.status)
                return
        self._create_batch(b.input_file_id)

    def _create_batch(self, input_file_id: str) -> str:
        batch = self.t.call(
            self.t.client.batches.create, input_file_id=input_file_id, endpoint=BATCH_ENDPOINT,
            completion_window="24h",
            metadata={"elemental_model": self.t.model, "elemental_prompt_version": self.t.prompt_version},
        )
        self.t.cache.record_batch_created(input_file_id, batch.id, batch.status)
        self.t.stats.add(batches_submitted=1)
        return batch.id

    # -- polling and consuming -----------------------------------------------------------------
    def _poll(
        self, batches: list[BatchRecord], todo: Mapping[str, PhotoData], progress: bool | None
    ) -> tuple[dict[str, Prior], dict[str, str]]:
        """Poll every batch together until each is finished, consuming each as it finishes.

        Returns the paid-for invalid answers to re-ask (photo -> what was paid) and the photos of `todo`
        a finished batch left unanswered (photo -> why).
        """
        followups: dict[str, Prior] = {}
        unanswered: dict[str, str] = {}
        waiting = list(batches)
        deadline = None if self.max_wait is None else time.monotonic() + self.max_wait
        total = sum(len(b.shas) for b in waiting)
        bar = tqdm(total=total, unit="photo", desc=f"batches ({len(waiting)})", disable=bar_off(progress),
                   dynamic_ncols=True)
        done_counts: dict[str, int] = {}
        try:
            while waiting:
                still: list[BatchRecord] = []
                for b in waiting:
                    batch_id = b.batch_id or ""
                    batch = self.t.call(self.t.client.batches.retrieve, batch_id)
                    self.t.cache.set_batch_state(batch_id, batch.status, batch.output_file_id, batch.error_file_id)
                    counts = batch.request_counts
                    done_counts[batch_id] = (counts.completed + counts.failed) if counts else 0
                    if batch.status in BATCH_TERMINAL:
                        done_counts[batch_id] = len(b.shas)
                        self._consume(b, batch.status, batch.output_file_id, todo, followups, unanswered)
                    else:
                        still.append(b)
                bar.n = min(total, sum(done_counts.values()))
                bar.refresh()
                waiting = still
                if waiting:
                    if deadline is not None and time.monotonic() >= deadline:
                        ids = ", ".join(f"{b.batch_id} ({self._cache_state(b)})" for b in waiting)
                        raise ElementalError(
                            f"batch {ids} not finished after {self.max_wait:g} s (--batch-max-wait); answers so "
                            "far are cached, re-run to resume polling (nothing is submitted again)"
                        )
                    time.sleep(self.poll_interval)
        finally:
            bar.close()
        return followups, unanswered

    def _cache_state(self, b: BatchRecord) -> str:
        for rec in self.t.cache.open_batches(self.t.key):
            if rec.input_file_id == b.input_file_id:
                return rec.state
        return "unknown"

    def _consume(
        self,
        b: BatchRecord,
        status: str,
        output_file_id: str | None,
        todo: Mapping[str, PhotoData],
        followups: dict[str, Prior],
        unanswered: dict[str, str],
    ) -> None:
        """Cache a finished batch's valid answers; invalid ones become follow-ups, missing ones `unanswered`.

        Idempotent: after a crash mid-way the output is read again and photos already cached are skipped.
        """
        t = self.t
        if status != "completed":
            t.stats.batches_failed.append(f"{b.batch_id} ({status})")
        answered: set[str] = set()
        already = t.cache.get_many(b.shas, t.key)
        text = ""
        if output_file_id:
            text = t.call(t.client.files.content, output_file_id).text
        members = set(b.shas)
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                sha = item["custom_id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("batch %s: skipping an unreadable output line", b.batch_id)
                continue
            if sha not in members or sha in answered:
                continue
            response = item.get("response") or {}
            if item.get("error") or response.get("status_code") != 200:
                continue  # not answered, not billed
            answered.add(sha)
            if sha in already:
                continue
            try:
                completion = ChatCompletion.model_validate(response.get("body"))
                verdict = judge_completion(t.task, completion)
                served = t.note_served(completion.model or t.model)
            except (ValueError, TypeError) as e:
                verdict = Verdict(None, f"invalid_json: malformed batch answer ({type(e).__name__})", "", 0, 0)
                served = ""
            t.stats.add(batch_answers=1, tokens_in=verdict.tokens_in, tokens_out=verdict.tokens_out,
                        batch_tokens_in=verdict.tokens_in, batch_tokens_out=verdict.tokens_out)
            if verdict.answer is not None:
                a = verdict.answer
                t.cache.put(sha, t.key, served_model=served, status="ok", element=a.element, reason=a.reason,
                            confidence=a.confidence, attempts=1, tokens_in=verdict.tokens_in,
                            tokens_out=verdict.tokens_out, via="batch")
            elif sha in todo:
                followups[sha] = Prior(1, verdict.tokens_in, verdict.tokens_out, verdict.problem, verdict.text, served)
            else:  # paid for, but its image is not at hand to re-ask: recorded, never silently dropped
                t.cache.put(sha, t.key, served_model=served, status="rejected", attempts=1,
                            reject_reason=f"{verdict.problem} (batch answer, not re-asked)",
                            tokens_in=verdict.tokens_in, tokens_out=verdict.tokens_out, via="batch")
        for sha in b.shas:
            if sha in todo and sha not in answered:
                unanswered[sha] = f"batch {b.batch_id} ended {status} without answering it"

    def _unanswered(
        self, unanswered: Mapping[str, str], todo: Mapping[str, PhotoData], progress: bool | None
    ) -> dict[str, LabelResult]:
        """Photos no batch answered (nothing billed): synchronously with fallback "sync", else rejected for now."""
        if not unanswered:
            return {}
        t = self.t
        cost = self.sync_estimate(len(unanswered))
        price = "unknown price" if cost.get("sync_usd") is None else f"≈ ${cost['sync_usd']:.4f}"
        t.stats.add(batch_unanswered=len(unanswered))
        if self.fallback == "sync":
            log.warning("%d photos were not answered by their batch; labelling them synchronously at full price (%s)",
                        len(unanswered), price)
            return t.run_pool([(sha, todo[sha], None) for sha in unanswered], progress)
        log.warning("%d photos were not answered by their batch (%s); labelling them synchronously would cost %s: "
                    "re-run to submit them again, or add --batch-fallback sync", len(unanswered),
                    next(iter(unanswered.values())), price)
        out: dict[str, LabelResult] = {}
        for sha, why in unanswered.items():
            out[sha] = t.reject(sha, f"batch_unanswered: {why} (not billed; the next run submits it again, "
                                     "--batch-fallback sync labels it at full price)", Prior(), store=False)
            t.stats.count_result(out[sha])
        return out

    def sync_estimate(self, n_photos: int) -> dict[str, object]:
        """What labeling `n_photos` synchronously would cost, from this teacher's cached answers or the price table."""
        t = self.t
        return estimate(n_photos, t.model, t.prices, t.cache.stats(t.model, t.prompt_version))
