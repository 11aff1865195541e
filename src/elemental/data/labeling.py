"""The teacher: a vision LLM behind any OpenAI-compatible endpoint labels photos (DESIGN §6).

Labels cost money (or GPU time on a local server), so this module is built around never paying twice
and never keeping a bad answer:

* Every answer is committed to a SQLite cache (`label_cache.LabelCache`) keyed by (photo sha256,
  teacher model, prompt version) the moment it arrives; a re-run, a crash or Ctrl-C loses nothing
  and asks nothing again. The prompt version is a hash of everything that changes the answer, so
  editing a prompt or the label list re-labels instead of silently reusing stale answers.
* Answers use strict structured output (a JSON schema whose `element` is an enum of the task's
  labels) and are still validated here, since local servers may not enforce the schema; an invalid
  answer is re-asked a bounded number of times, then recorded as rejected with the reason.
* HTTP retries (429/5xx/timeouts, with exponential backoff that honours `Retry-After`) are the
  `openai` SDK's own (`max_retries`); the tests prove against a loopback server that it waits at least
  the delay the server asked for. A fault that outlasts them stays the photo's: a 5xx or a timeout
  makes it `rejected: server_error ...` for this run (not cached: nothing was billed, so the next run asks
  again) and the run goes on. Only
  systemic faults stop a run: a refused key (401/403), an unknown model or endpoint (404), an exhausted
  quota (429), or `max_consecutive_failures` failures in a row.
* Requests fit real servers (llama-server, vLLM, Ollama as well as OpenAI): `max_tokens`, temperature 0
  and a seed are sent; a server whose error says one of them is unsupported gets the request without it
  (the answer-length cap is only ever renamed, max_tokens to max_completion_tokens, never dropped: a
  context-length error that names max_tokens changes nothing). Answers are read leniently (code fences,
  text parts around the JSON) and validated strictly.
* The API key never reaches a log, a file, the cache or an exception message: SDK errors are
  re-raised as one-line ElementalErrors with the key (and anything that looks like a key) scrubbed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletion
from tqdm import tqdm

from ..errors import ElementalError
from ..images import bounded, encode_jpeg, open_image_bytes
from ..task import Task
from .label_cache import BATCH_CONSUMED, BATCH_TERMINAL, BatchRecord, LabelCache

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-mini"
# A photo for the teacher: its bytes, or the file holding them (read only if the teacher is asked, so a
# re-run whose answers are all cached reads no photo).
PhotoData = bytes | Path
DEFAULT_MAX_SIDE = 512
DEFAULT_DETAIL = "low"
JPEG_QUALITY = 85
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY_PLACEHOLDER = "no-key"  # local servers (llama-server, vLLM, Ollama) ignore the key but the SDK wants one
SCHEMA_NAME = "element_label"
MAX_REASON_CHARS = 300
# An answer is ~40 tokens; a cap a few times that stops a local model that rambles (or loops inside the
# reason string) with finish_reason=length, which is re-asked, instead of running to the context limit.
MAX_ANSWER_TOKENS = 300
DEFAULT_TEMPERATURE = 0.0
DEFAULT_SEED = 0
# This many failed requests in a row (refusals, server errors, timeouts) means the endpoint or the
# configuration is broken, not the photos: the run stops with one line instead of rejecting them all.
MAX_CONSECUTIVE_FAILURES = 10

# USD per 1M tokens (input, output), standard tier. The Batch API costs half.
PRICES_PER_1M: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
BATCH_DISCOUNT = 0.5
BATCH_ENDPOINT = "/v1/chat/completions"
MAX_BATCH_REQUESTS = 50_000  # the Batch API's per-file limits (50k requests, 200 MB), with headroom
MAX_BATCH_BYTES = 150_000_000
MAX_BATCHES_SCANNED = 1000  # how far back to look for a batch created just before a crash

SYSTEM_PROMPT = (
    "You label photos for an image classifier. Choose exactly one label from this list: {labels}. "
    "Answer with a JSON object: \"element\" (one label from the list, spelled exactly), \"reason\" "
    "(one short sentence saying what in the photo shows it) and \"confidence\" (a number from 0 to 1: "
    "how sure you are). If the photo fits no label well, pick the closest one with a low confidence."
)
REASK_PROMPT = (
    "That answer was invalid ({problem}). Reply again with only a JSON object with \"element\" (one of: "
    "{labels}), \"reason\" (one short sentence) and \"confidence\" (a number from 0 to 1)."
)

Detail = Literal["low", "high", "auto"]
_T = TypeVar("_T")


# -- prompt, schema, image ---------------------------------------------------------------------------

def answer_schema(task: Task) -> dict[str, Any]:
    """The strict JSON schema of one answer: the label must be one of the task's labels."""
    return {
        "type": "object",
        "properties": {
            "element": {"type": "string", "enum": list(task.labels)},
            "reason": {"type": "string", "description": "One short sentence: what in the photo shows the label."},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["element", "reason", "confidence"],
        "additionalProperties": False,
    }


def response_format(task: Task) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": answer_schema(task)}}


def system_prompt(task: Task) -> str:
    return SYSTEM_PROMPT.format(labels=", ".join(task.labels))


def prompt_version(task: Task, *, detail: Detail = DEFAULT_DETAIL, max_side: int = DEFAULT_MAX_SIDE) -> str:
    """A short hash of everything that changes the teacher's answer except the model (a cache key part).

    Changing a prompt, the labels, the schema or how the photo is sent gives a new version, so old
    answers are not reused for a question that is no longer the one being asked.
    """
    spec = {
        "system": system_prompt(task),
        "user": task.user_text("label"),
        "reask": REASK_PROMPT,
        "schema": response_format(task),
        "labels": list(task.labels),
        "detail": detail,
        "max_side": max_side,
        "jpeg_quality": JPEG_QUALITY,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def teacher_jpeg(image: bytes, max_side: int = DEFAULT_MAX_SIDE, name: str = "photo") -> bytes:
    """The exact JPEG the teacher is sent: upright RGB, long side ≤ `max_side`; deterministic bytes.

    Downscaling first is most of the cost saving: a 512-px low-detail image is a fixed small number
    of input tokens however large the original was.
    """
    rgb = open_image_bytes(image, name, max_side=max_side)  # upright sRGB; errors name the photo
    return encode_jpeg(bounded(rgb, max_side), quality=JPEG_QUALITY)


def chat_messages(task: Task, jpeg: bytes, detail: Detail = DEFAULT_DETAIL) -> list[dict[str, Any]]:
    """System prompt, then the task's instruction and the photo as a data URL."""
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    return [
        {"role": "system", "content": system_prompt(task)},
        {"role": "user", "content": [
            {"type": "text", "text": task.user_text("label")},
            {"type": "image_url", "image_url": {"url": url, "detail": detail}},
        ]},
    ]


def _reask_messages(task: Task, bad_answer: str, problem: str) -> list[dict[str, Any]]:
    return [
        {"role": "assistant", "content": bad_answer or "(no answer)"},
        {"role": "user", "content": REASK_PROMPT.format(problem=problem, labels=", ".join(task.labels))},
    ]


# -- answers -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    element: str
    reason: str
    confidence: float


@dataclass(frozen=True)
class _Verdict:
    """What one completion amounted to: an answer, or a problem (plus the text to show on a re-ask)."""

    answer: Answer | None
    problem: str | None
    text: str
    tokens_in: int
    tokens_out: int


def judge_completion(task: Task, completion: ChatCompletion) -> _Verdict:
    """Validate a completion against the task; the schema is checked again here, never trusted."""
    usage = completion.usage
    tin = int(usage.prompt_tokens or 0) if usage else 0
    tout = int(usage.completion_tokens or 0) if usage else 0
    if not completion.choices:
        return _Verdict(None, "empty: the answer has no choices", "", tin, tout)
    choice = completion.choices[0]
    message = choice.message
    refusal = getattr(message, "refusal", None)
    if refusal:
        return _Verdict(None, f"refusal: {_one_line(refusal, 120)}", refusal, tin, tout)
    text = _content_text(message.content)
    answer, problem = parse_answer(task, text)
    if answer is None and choice.finish_reason == "length":
        problem = f"truncated: the answer hit the token limit before its JSON ended ({problem})"
    return _Verdict(answer, problem, text, tin, tout)


def _content_text(content: Any) -> str:
    """A message's text: a string, or (some servers) a list of content parts whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") if isinstance(p, dict) else getattr(p, "text", "") for p in content]
        return "".join(p for p in parts if isinstance(p, str))
    return str(content)


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def _json_object(text: str) -> Any:
    """The JSON in `text`, read leniently: inside a ``` fence, or the first object with words around it.

    Raises json.JSONDecodeError for the text as a whole when no object can be read.
    """
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as whole:
        start = stripped.find("{")
        if start < 0:
            raise whole from None
        try:
            return json.JSONDecoder().raw_decode(stripped, start)[0]
        except json.JSONDecodeError:
            raise whole from None


def parse_answer(task: Task, text: str) -> tuple[Answer | None, str | None]:
    """Parse and check one answer's JSON text: (answer, None) or (None, "code: what is wrong")."""
    if not text.strip():
        return None, "empty: the answer has no content"
    try:
        data = _json_object(text)
    except json.JSONDecodeError as e:
        return None, f"invalid_json: not JSON ({e.msg} at char {e.pos})"
    if not isinstance(data, dict):
        return None, f"invalid_json: expected a JSON object, got {type(data).__name__}"
    element = data.get("element")
    if element not in task.labels:
        return None, f"off_list: element {_short_repr(element)} is not one of {list(task.labels)}"
    confidence = data.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        return None, f"confidence: {_short_repr(confidence)} is not a number"
    if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
        return None, f"confidence: {confidence!r} is outside 0..1"
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return None, "reason: missing or empty"
    return Answer(element=element, reason=_one_line(reason, MAX_REASON_CHARS), confidence=float(confidence)), None


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _short_repr(value: Any) -> str:
    return _one_line(repr(value), 60)


def _reject_code(reject_reason: str | None) -> str:
    return (reject_reason or "unknown").split(":", 1)[0]


# -- cost --------------------------------------------------------------------------------------------

def price_per_1m(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for a known model or a dated snapshot of one; None if unknown."""
    if model in PRICES_PER_1M:
        return PRICES_PER_1M[model]
    base = re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model)
    return PRICES_PER_1M.get(base)


def estimate_cost(
    model: str, tokens_in: int, tokens_out: int, batch_tokens_in: int = 0, batch_tokens_out: int = 0
) -> float | None:
    """Estimated USD for the given usage (batch tokens at the Batch API's half price); None if unknown."""
    price = price_per_1m(model)
    if price is None:
        return None
    sync = tokens_in * price[0] + tokens_out * price[1]
    batch = (batch_tokens_in * price[0] + batch_tokens_out * price[1]) * BATCH_DISCOUNT
    return (sync + batch) / 1_000_000


# -- results and run statistics ----------------------------------------------------------------------

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
class _Prior:
    """What was already paid for a photo before the normal path takes over (a batch answer)."""

    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    problem: str | None = None
    text: str = ""


class _Stats:
    """Counters for the cost report, shared by the worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.retries = self.reasks = self.api_errors = 0
        self.tokens_in = self.tokens_out = 0
        self.batch_tokens_in = self.batch_tokens_out = self.batch_answers = self.batches_submitted = 0
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
                self.rejects_by_reason[_reject_code(result.reject_reason)] += 1


# How servers say a request parameter is not theirs (OpenAI "Unsupported parameter", vLLM/pydantic "Extra inputs are
# not permitted", others "unknown"/"unrecognized"/"not supported"): only then is a parameter dropped or renamed.
_UNSUPPORTED = re.compile(r"unsupported|not supported|does not support|unrecognized|unknown (parameter|field|argument)"
                          r"|extra (inputs|fields) (are )?not permitted|not allowed")


class _PhotoFailure(Exception):
    """A request for this one photo failed after the SDK's retries; the photo is rejected, the run goes on.

    `code` is the rejection's code: "api_error" (the endpoint refused the request: 400/413/415/422) or
    "server_error" (5xx, timeout, lost connection). Neither is cached: neither was billed, so the next run
    asks again (unless earlier attempts of this photo were paid for).
    """

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


# -- the teacher -------------------------------------------------------------------------------------

class Teacher:
    """Labels photos with a vision LLM through the `openai` SDK, caching every answer (thread-safe)."""

    def __init__(
        self,
        task: Task,
        *,
        cache_path: Path,
        model: str = DEFAULT_MODEL,
        base_url: str | None = None,
        api_key: str | None = None,
        num_workers: int = 4,
        max_reasks: int = 2,
        max_retries: int = 5,
        timeout: float = 60.0,
        detail: Detail = DEFAULT_DETAIL,
        max_side: int = DEFAULT_MAX_SIDE,
        temperature: float = DEFAULT_TEMPERATURE,
        seed: int | None = DEFAULT_SEED,
        max_tokens: int = MAX_ANSWER_TOKENS,
        max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
        retry_rejected: bool = False,
    ) -> None:
        if max_consecutive_failures < 1 or max_tokens < 16:
            raise ElementalError("max_consecutive_failures must be at least 1 and max_tokens at least 16")
        if num_workers < 1:
            raise ElementalError(f"num_workers must be at least 1, got {num_workers}")
        if max_reasks < 0 or max_retries < 0:
            raise ElementalError("max_reasks and max_retries must be 0 or more")
        if detail not in ("low", "high", "auto"):
            raise ElementalError(f"detail must be 'low', 'high' or 'auto', got {detail!r}")
        if max_side < 32:
            raise ElementalError(f"max_side must be at least 32 px, got {max_side}")
        self.task = task
        self.model = model
        self.num_workers = num_workers
        self.max_reasks = max_reasks
        self.detail: Detail = detail
        self.max_side = max_side
        self.prompt_version = prompt_version(task, detail=detail, max_side=max_side)
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.base_url_host = _host(self.base_url or OPENAI_DEFAULT_BASE_URL)
        key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if key is None:
            if self.base_url is None or self.base_url_host.split(":")[0].endswith("openai.com"):
                raise ElementalError(
                    "OPENAI_API_KEY is not set (needed for the OpenAI API; for a local OpenAI-compatible "
                    "server set OPENAI_BASE_URL or --labeler-base-url)"
                )
            key = NO_KEY_PLACEHOLDER
        self._secrets = tuple(
            s for s in {key, api_key, os.environ.get("OPENAI_API_KEY")} if s and len(s) >= 4 and s != NO_KEY_PLACEHOLDER
        )
        self.cache_path = Path(cache_path)
        self._cache = LabelCache(self.cache_path)
        self._client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout)
        self._stats = _Stats()
        self.max_consecutive_failures = max_consecutive_failures
        self.retry_rejected = retry_rejected
        self._retried: set[str] = set()  # with retry_rejected: photos asked again in this Teacher's life
        # Sampling settings sent with every request; a server that rejects one by name loses it (_adapt).
        self._params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            self._params["seed"] = seed
        self.adapted: list[str] = []  # what was changed for this server, for the report
        self._state_lock = threading.Lock()
        self._failure_streak = 0
        self._inflight_lock = threading.RLock()  # RLock: a done callback may run inside the lock
        self._inflight: dict[str, Future[LabelResult]] = {}
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:  # never the key
        return f"Teacher(model={self.model!r}, host={self.base_url_host!r}, prompt_version={self.prompt_version!r})"

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._cache.close()
        self._client.close()

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cache(self) -> LabelCache:
        return self._cache

    # -- public API ----------------------------------------------------------------------------
    def label_many(
        self, photos: Sequence[tuple[str, PhotoData]], *, progress: bool | None = None
    ) -> dict[str, LabelResult]:
        """Label (sha256, image bytes or file) pairs; cached photos cost nothing, the rest run `num_workers` at a time.

        Returns one result per distinct sha256, in input order. Raises ElementalError when the
        endpoint itself fails (auth, model not found, retries exhausted); every answer received
        before that is already in the cache, so a re-run continues where this one stopped.
        """
        unique = _unique(photos)
        results = self._cached_results(unique)
        todo = [(sha, data, None) for sha, data in unique.items() if sha not in results]
        self._warn_if_in_open_batches([sha for sha, _, _ in todo])
        results.update(self._run_pool(todo, progress))
        return {sha: results[sha] for sha in unique}

    def label_batch(
        self,
        photos: Sequence[tuple[str, PhotoData]],
        *,
        poll_interval: float = 30.0,
        max_wait: float | None = None,
        progress: bool | None = None,
    ) -> dict[str, LabelResult]:
        """Label through the OpenAI Batch API (half price, answers within 24 h), resuming open batches.

        Photos in a batch this cache already submitted (same model and prompt version) are not
        submitted again: the batch is polled by id. Batch answers go through the same validation;
        invalid ones are re-asked, and photos the batch did not answer are labelled, through the
        normal path. With `max_wait` set, raises ElementalError naming the batches still running
        once it has passed; a re-run resumes them.
        """
        unique = _unique(photos)
        results = self._cached_results(unique)
        todo = {sha: data for sha, data in unique.items() if sha not in results}
        if todo:
            open_batches = self._cache.open_batches(self.model, self.prompt_version)
            in_flight = {sha for b in open_batches for sha in b.shas}
            new = {sha: data for sha, data in todo.items() if sha not in in_flight}
            results.update(self._submit_batches(new))
            for b in self._cache.open_batches(self.model, self.prompt_version):
                if b.batch_id is None:
                    self._adopt_or_create(b)
            relevant = [
                b for b in self._cache.open_batches(self.model, self.prompt_version) if set(b.shas) & todo.keys()
            ]
            followups = self._poll_batches(relevant, todo, poll_interval, max_wait, progress)
            now_cached = self._cache.get_many(todo, self.model, self.prompt_version)
            for sha, row in now_cached.items():
                if sha not in followups:
                    results[sha] = _result_from_row(row, cached=False)
                    self._stats.count_result(results[sha])
            jobs = [(sha, todo[sha], prior) for sha, prior in followups.items() if sha not in results]
            results.update(self._run_pool(jobs, progress))
            for b in relevant:
                self._cache.set_batch_state(b.batch_id or "", BATCH_CONSUMED)
            missing = [sha for sha in todo if sha not in results]  # e.g. a batch that never listed them
            results.update(self._run_pool([(sha, todo[sha], None) for sha in missing], progress))
        return {sha: results[sha] for sha in unique}

    def _warn_if_in_open_batches(self, shas: list[str]) -> None:
        """Photos already paid for in an unfinished batch would be paid again here: say so."""
        if not shas:
            return
        wanted = set(shas)
        for b in self._cache.open_batches(self.model, self.prompt_version):
            overlap = len(wanted.intersection(b.shas))
            if overlap:
                log.warning("%d of these photos are in unfinished batch %s; labelling them now pays for them "
                            "again (label_batch would collect the batch's answers instead)", overlap, b.batch_id)

    def report(self) -> dict[str, Any]:
        """The cost report of this Teacher's lifetime: requests, retries, tokens, estimated USD, cache hits."""
        s = self._stats
        with s._lock:
            price = price_per_1m(self.model)
            cost = estimate_cost(self.model, s.tokens_in - s.batch_tokens_in, s.tokens_out - s.batch_tokens_out,
                                 s.batch_tokens_in, s.batch_tokens_out)
            return {
                "model": self.model,
                "base_url_host": self.base_url_host,
                "prompt_version": self.prompt_version,
                "requests": s.requests,
                "retries": s.retries,
                "reasks": s.reasks,
                "api_errors": s.api_errors,
                "tokens_in": s.tokens_in,
                "tokens_out": s.tokens_out,
                "batch_tokens_in": s.batch_tokens_in,
                "batch_tokens_out": s.batch_tokens_out,
                "batches_submitted": s.batches_submitted,
                "batch_answers": s.batch_answers,
                "estimated_cost_usd": None if cost is None else round(cost, 6),
                "price_usd_per_1m": {"input": price[0], "output": price[1]} if price else "unknown price",
                "cache_hits": s.cache_hits,
                "labeled": s.labeled,
                "rejected": s.rejected,
                "rejects_by_reason": dict(s.rejects_by_reason),
                "request_params": self.request_params(),
                "adapted_to_endpoint": list(self.adapted),
            }

    def spent_usd(self) -> float | None:
        return self.report()["estimated_cost_usd"]

    # -- the normal (synchronous) path ---------------------------------------------------------
    def _cached_results(self, unique: dict[str, PhotoData]) -> dict[str, LabelResult]:
        rows = self._cache.get_many(unique, self.model, self.prompt_version)
        results = {sha: _result_from_row(row, cached=True) for sha, row in rows.items() if not self._ask_again(row)}
        for r in results.values():
            self._stats.count_result(r)
        return results

    def _run_pool(
        self, jobs: Sequence[tuple[str, PhotoData, _Prior | None]], progress: bool | None
    ) -> dict[str, LabelResult]:
        """Label `jobs` on the Teacher's `num_workers` threads; a fatal error cancels what has not started.

        A photo another call of this Teacher is already asking about is awaited, not asked again,
        so concurrent calls with overlapping photos still pay once per photo.
        """
        if not jobs:
            return {}
        mine: list[Future[LabelResult]] = []
        theirs: list[Future[LabelResult]] = []
        # Set by the first job that fails, before its future completes: the pool's next job may
        # start before this thread sees the failure and cancels, and must not send a request.
        stop = threading.Event()
        with self._inflight_lock:
            pool = self._pool()
            for sha, data, prior in jobs:
                running = self._inflight.get(sha)
                if running is not None and prior is None:
                    theirs.append(running)
                    continue
                fut = pool.submit(self._label_unless_stopped, stop, sha, data, prior)
                self._inflight[sha] = fut
                fut.add_done_callback(functools.partial(self._forget, sha))
                mine.append(fut)
        out: dict[str, LabelResult] = {}
        bar = tqdm(total=len(jobs), unit="photo", desc=f"labeling ({self.model})", disable=_bar_off(progress),
                   dynamic_ncols=True, smoothing=0.1)
        try:
            for fut in as_completed(mine):
                try:
                    result = fut.result()
                except CancelledError:
                    continue  # stopped by the failure that this loop is about to meet
                self._stats.count_result(result)
                out[result.sha256] = result
                bar.update(1)
                bar.set_postfix_str(self._spend_text(), refresh=False)
            for fut in theirs:  # counted in the report by the call that asked
                try:
                    result = fut.result()
                except CancelledError:
                    raise ElementalError("labeling stopped: a concurrent call on this Teacher failed") from None
                out[result.sha256] = result
                bar.update(1)
        except BaseException:
            for fut in mine:
                fut.cancel()
            raise
        finally:
            bar.close()
        return out

    def _label_unless_stopped(
        self, stop: threading.Event, sha: str, image: PhotoData, prior: _Prior | None
    ) -> LabelResult:
        """`_label_one`, unless a job of the same call has failed: then end as cancelled, asking nothing."""
        if stop.is_set():
            raise CancelledError
        try:
            return self._label_one(sha, image, prior)
        except BaseException:
            stop.set()
            raise

    def _pool(self) -> ThreadPoolExecutor:
        """One pool per Teacher, so `num_workers` bounds all concurrent calls together."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="teacher")
        return self._executor

    def _forget(self, sha: str, fut: Future[LabelResult]) -> None:
        with self._inflight_lock:
            if self._inflight.get(sha) is fut:
                del self._inflight[sha]

    def _spend_text(self) -> str:
        cost = self.spent_usd()
        return "spent: unknown price" if cost is None else f"spent ${cost:.4f}"

    def _label_one(self, sha: str, image: PhotoData, prior: _Prior | None = None) -> LabelResult:
        """Ask about one photo until a valid answer or `max_reasks` re-asks; cache the verdict at once."""
        p = prior or _Prior()
        if prior is None:
            # Another call (or process) may have answered it since this call read the cache.
            row = self._cache.get(sha, self.model, self.prompt_version)
            if row is not None and not self._ask_again(row):
                return _result_from_row(row, cached=True)
        if self.retry_rejected:
            with self._state_lock:
                self._retried.add(sha)
        try:
            jpeg = _teacher_jpeg_of(image, self.max_side, sha)
        except ElementalError as e:
            return self._reject(sha, f"unreadable: {e}", p, store=p.attempts > 0)
        messages = chat_messages(self.task, jpeg, self.detail)
        problem, text = p.problem, p.text
        attempts, tin, tout = p.attempts, p.tokens_in, p.tokens_out
        while True:
            if problem is not None:
                if attempts >= self.max_reasks + 1:
                    reason = f"{problem} (after {attempts} attempt{'s' if attempts > 1 else ''})"
                    return self._reject(sha, reason, _Prior(attempts, tin, tout), store=True)
                messages = messages + _reask_messages(self.task, text, problem)
                self._stats.add(reasks=1)
            try:
                completion = self._create(messages)
            except _PhotoFailure as e:
                return self._reject(sha, f"{e.code}: {e}", _Prior(attempts, tin, tout),
                                    store=attempts > 0)
            verdict = judge_completion(self.task, completion)
            attempts += 1
            tin += verdict.tokens_in
            tout += verdict.tokens_out
            self._stats.add(tokens_in=verdict.tokens_in, tokens_out=verdict.tokens_out)
            if verdict.answer is not None:
                a = verdict.answer
                self._cache.put(sha, self.model, self.prompt_version, status="ok", element=a.element,
                                reason=a.reason, confidence=a.confidence, attempts=attempts,
                                tokens_in=tin, tokens_out=tout, via="sync" if p.attempts == 0 else "batch+sync")
                return LabelResult(sha, "ok", a.element, a.reason, a.confidence, None, False, tin, tout, attempts)
            problem, text = verdict.problem, verdict.text
            log.debug("photo %s: invalid answer (%s)", sha[:12], problem)

    def _reject(self, sha: str, reason: str, p: _Prior, *, store: bool) -> LabelResult:
        """A rejected photo; stored in the cache when an answer was paid for (so it is never paid again)."""
        reason = _one_line(self._scrub(reason), 500)
        if store:
            self._cache.put(sha, self.model, self.prompt_version, status="rejected", reject_reason=reason,
                            attempts=p.attempts, tokens_in=p.tokens_in, tokens_out=p.tokens_out)
        return LabelResult(sha, "rejected", None, None, None, reason, False, p.tokens_in, p.tokens_out, p.attempts)

    def _ask_again(self, row: Any) -> bool:
        """With retry_rejected, a cached rejection is asked about again (once in this Teacher's life)."""
        if not self.retry_rejected or row.status != "rejected":
            return False
        with self._state_lock:
            return row.sha256 not in self._retried

    def request_params(self) -> dict[str, Any]:
        """max_tokens, temperature and seed as this endpoint takes them (see `_adapt`)."""
        with self._state_lock:
            return dict(self._params)

    def _create(self, messages: list[dict[str, Any]]) -> ChatCompletion:
        """One chat completion; the SDK retries 429/5xx/timeouts itself, honouring Retry-After.

        What still fails is sorted: the photo's problem (`_PhotoFailure`: the run goes on) or the run's
        (ElementalError: auth, unknown model, exhausted quota, or too many failures in a row).
        """
        while True:
            params = self.request_params()
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, response_format=response_format(self.task),  # type: ignore[arg-type]
                    **params,
                )
                completion = raw.parse()
            except openai.OpenAIError as e:
                # Built outside the `except` so no traceback chains the SDK error (its request holds the key).
                failure: Exception = e
            else:
                failure = None
            if failure is None:
                break
            self._stats.add(api_errors=1)
            if not self._adapt(failure, params):
                raise self._sort_failure(failure)
        with self._state_lock:
            self._failure_streak = 0
        self._stats.add(requests=1, retries=raw.retries_taken)
        if not isinstance(completion, ChatCompletion):
            raise self._fatal_text(f"the endpoint answered with something that is not a chat completion "
                                   f"({type(completion).__name__})")
        return completion

    def _adapt(self, failure: Exception, sent: dict[str, Any]) -> bool:
        """A 400 saying one of our sampling parameters is unsupported: drop it, or rename the answer-length cap.

        OpenAI's reasoning models want max_completion_tokens and no temperature; some servers refuse seed. Only an
        error that says the parameter is unsupported counts: vLLM's context-length error names max_tokens too,
        and dropping the cap for it would let every later answer run on. The cap is renamed when the error names
        the other spelling, never dropped.
        """
        if not isinstance(failure, openai.BadRequestError):
            return False
        text = str(failure).lower()
        if not _UNSUPPORTED.search(text):
            return False
        for name in ("max_tokens", "max_completion_tokens", "temperature", "seed"):
            if name not in sent or not re.search(rf"\b{name}\b", text):
                continue
            other = {"max_tokens": "max_completion_tokens", "max_completion_tokens": "max_tokens"}.get(name)
            if other is not None and not re.search(rf"\b{other}\b", text.replace(name, "")):
                return False  # the cap, and no other spelling offered: the request fails as it is
            with self._state_lock:
                if name not in self._params:
                    return True  # another thread adapted it already: retry with what is there now
                value = self._params.pop(name)
                if other is not None:
                    self._params[other] = value
                    self.adapted.append(f"{name} sent as {other}")
                else:
                    self.adapted.append(f"{name} not sent (the endpoint does not support it)")
            log.warning("teacher endpoint refused %s: %s", name, self.adapted[-1])
            return True
        return False

    def _sort_failure(self, e: Exception) -> Exception:
        """The photo's problem (_PhotoFailure) or the run's (ElementalError), after the SDK's own retries."""
        if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
            return self._fatal_text(f"the key was refused ({self._error_text(e)}); check OPENAI_API_KEY")
        if isinstance(e, openai.NotFoundError):
            return self._fatal_text(f"model {self.model!r} or the endpoint was not found ({self._error_text(e)}); "
                                    "check --labeler-model and --labeler-base-url")
        if isinstance(e, openai.RateLimitError):
            return self._fatal_text(f"still rate limited after retries, or out of quota ({self._error_text(e)})")
        if isinstance(e, openai.APIStatusError) and e.status_code in (400, 413, 415, 422):
            failure = _PhotoFailure("api_error", self._error_text(e))
        elif (isinstance(e, openai.APIStatusError) and e.status_code >= 500
              or isinstance(e, openai.APITimeoutError | openai.APIConnectionError)):
            failure = _PhotoFailure("server_error", self._error_text(e))
        else:
            return self._fatal(e)
        with self._state_lock:
            self._failure_streak += 1
            streak = self._failure_streak
        if streak >= self.max_consecutive_failures:
            return self._fatal_text(f"{streak} requests in a row failed (max_consecutive_failures), last: {failure}; "
                                    "photos rejected for server errors are asked again on the next run")
        return failure

    # -- the Batch API path --------------------------------------------------------------------
    def _submit_batches(self, photos: dict[str, PhotoData]) -> dict[str, LabelResult]:
        """Upload JSONL input files (split at the API's limits) and create their batches.

        The input file id is recorded before the batch is created and the batch id right after, so
        a crash between the two is recovered by finding the batch by its input file (`_adopt_or_create`).
        Returns results for photos that could not be read (they are not submitted).
        """
        unreadable: dict[str, LabelResult] = {}
        lines: list[tuple[str, bytes]] = []
        for sha, data in photos.items():
            try:
                jpeg = _teacher_jpeg_of(data, self.max_side, sha)
            except ElementalError as e:
                unreadable[sha] = self._reject(sha, f"unreadable: {e}", _Prior(), store=False)
                self._stats.count_result(unreadable[sha])
                continue
            body = {"model": self.model, "messages": chat_messages(self.task, jpeg, self.detail),
                    "response_format": response_format(self.task), **self.request_params()}
            line = {"custom_id": sha, "method": "POST", "url": BATCH_ENDPOINT, "body": body}
            lines.append((sha, (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")))
        for n, chunk in enumerate(_batch_chunks(lines)):
            data = b"".join(line for _, line in chunk)
            name = f"elemental-{self.prompt_version}-{n}.jsonl"
            file = self._call(self._client.files.create, file=(name, data, "application/jsonl"), purpose="batch")
            self._cache.record_batch_upload(file.id, self.model, self.prompt_version, [sha for sha, _ in chunk])
            batch_id = self._create_batch(file.id)
            log.info("submitted batch %s with %d photos", batch_id, len(chunk))
        return unreadable

    def _adopt_or_create(self, b: BatchRecord) -> None:
        """An uploaded input file without a recorded batch: find the batch made from it, else create it."""
        recent = self._call(self._client.batches.list, limit=100)
        for batch in itertools.islice(recent, MAX_BATCHES_SCANNED):  # newest first; ours is recent
            if batch.input_file_id == b.input_file_id:
                self._cache.record_batch_created(b.input_file_id, batch.id, batch.status)
                return
        self._create_batch(b.input_file_id)

    def _create_batch(self, input_file_id: str) -> str:
        batch = self._call(
            self._client.batches.create, input_file_id=input_file_id, endpoint=BATCH_ENDPOINT,
            completion_window="24h",
            metadata={"elemental_model": self.model, "elemental_prompt_version": self.prompt_version},
        )
        self._cache.record_batch_created(input_file_id, batch.id, batch.status)
        self._stats.add(batches_submitted=1)
        return batch.id

    def _poll_batches(
        self,
        batches: list[BatchRecord],
        todo: dict[str, PhotoData],
        poll_interval: float,
        max_wait: float | None,
        progress: bool | None,
    ) -> dict[str, _Prior | None]:
        """Poll until every batch is finished; cache valid answers; return photos the normal path must do."""
        followups: dict[str, _Prior | None] = {}
        waiting = list(batches)
        deadline = None if max_wait is None else time.monotonic() + max_wait
        total = sum(len(b.shas) for b in waiting)
        bar = tqdm(total=total, unit="photo", desc="batch", disable=_bar_off(progress), dynamic_ncols=True)
        done_counts: dict[str, int] = {}
        try:
            while waiting:
                still: list[BatchRecord] = []
                for b in waiting:
                    batch_id = b.batch_id or ""
                    batch = self._call(self._client.batches.retrieve, batch_id)
                    self._cache.set_batch_state(batch_id, batch.status, batch.output_file_id, batch.error_file_id)
                    counts = batch.request_counts
                    done_counts[batch_id] = (counts.completed + counts.failed) if counts else 0
                    if batch.status in BATCH_TERMINAL:
                        done_counts[batch_id] = len(b.shas)
                        self._consume(b, batch.status, batch.output_file_id, todo, followups)
                    else:
                        still.append(b)
                bar.n = min(total, sum(done_counts.values()))
                bar.refresh()
                waiting = still
                if waiting:
                    if deadline is not None and time.monotonic() >= deadline:
                        ids = ", ".join(f"{b.batch_id} ({self._cache_state(b)})" for b in waiting)
                        raise ElementalError(
                            f"batch {ids} not finished after {max_wait:g} s; answers so far are cached, "
                            "re-run to resume polling (nothing is submitted again)"
                        )
                    time.sleep(poll_interval)
        finally:
            bar.close()
        return followups

    def _cache_state(self, b: BatchRecord) -> str:
        for rec in self._cache.open_batches(self.model, self.prompt_version):
            if rec.input_file_id == b.input_file_id:
                return rec.state
        return "unknown"

    def _consume(
        self,
        b: BatchRecord,
        status: str,
        output_file_id: str | None,
        todo: dict[str, PhotoData],
        followups: dict[str, _Prior | None],
    ) -> None:
        """Cache a finished batch's valid answers; invalid or missing ones become follow-ups.

        Idempotent: after a crash mid-way the output is read again and photos already cached are skipped.
        """
        if status != "completed":
            log.warning("batch %s ended %s; its unanswered photos go through the normal path", b.batch_id, status)
        answered: set[str] = set()
        already = self._cache.get_many(b.shas, self.model, self.prompt_version)
        text = ""
        if output_file_id:
            text = self._call(self._client.files.content, output_file_id).text
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
            answered.add(sha)
            if sha in already:
                continue
            response = item.get("response") or {}
            if item.get("error") or response.get("status_code") != 200:
                continue  # not answered, not billed: the normal path labels it
            try:
                completion = ChatCompletion.model_validate(response.get("body"))
                verdict = judge_completion(self.task, completion)
            except (ValueError, TypeError) as e:
                verdict = _Verdict(None, f"invalid_json: malformed batch answer ({type(e).__name__})", "", 0, 0)
            self._stats.add(batch_answers=1, tokens_in=verdict.tokens_in, tokens_out=verdict.tokens_out,
                            batch_tokens_in=verdict.tokens_in, batch_tokens_out=verdict.tokens_out)
            if verdict.answer is not None:
                a = verdict.answer
                self._cache.put(sha, self.model, self.prompt_version, status="ok", element=a.element,
                                reason=a.reason, confidence=a.confidence, attempts=1,
                                tokens_in=verdict.tokens_in, tokens_out=verdict.tokens_out, via="batch")
            elif sha in todo:
                followups[sha] = _Prior(1, verdict.tokens_in, verdict.tokens_out, verdict.problem, verdict.text)
            else:  # paid for, but its image is not at hand to re-ask: recorded, never silently dropped
                self._cache.put(sha, self.model, self.prompt_version, status="rejected", attempts=1,
                                reject_reason=f"{verdict.problem} (batch answer, not re-asked)",
                                tokens_in=verdict.tokens_in, tokens_out=verdict.tokens_out, via="batch")
        # Photos the batch did not answer (no line, or an error line: not billed) go through the normal path.
        unanswered = [sha for sha in b.shas if sha in todo and sha not in followups]
        cached_now = self._cache.get_many(unanswered, self.model, self.prompt_version)
        for sha in unanswered:
            if sha not in cached_now:
                followups[sha] = None

    # -- errors --------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run one SDK call (files, batches), turning its errors into key-free ElementalErrors."""
        try:
            return fn(*args, **kwargs)
        except openai.OpenAIError as e:
            failure = e
        self._stats.add(api_errors=1)
        raise self._fatal(failure)

    def _error_text(self, e: Exception) -> str:
        return _one_line(self._scrub(f"{type(e).__name__}: {e}"), 300)

    def _fatal(self, e: Exception) -> ElementalError:
        return self._fatal_text(self._error_text(e))

    def _fatal_text(self, text: str) -> ElementalError:
        done = self._cache.stats(self.model, self.prompt_version)["entries"]
        return ElementalError(
            f"teacher {self.model} at {self.base_url_host} failed: {self._scrub(text)} "
            f"({done} answers are cached; re-run to continue without paying for them again)"
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
        return re.sub(r"sk-[A-Za-z0-9_\-]{6,}", "sk-***", text)


# -- helpers -----------------------------------------------------------------------------------------

def _unique(photos: Iterable[tuple[str, PhotoData]]) -> dict[str, PhotoData]:
    unique: dict[str, PhotoData] = {}
    for i, item in enumerate(photos):
        try:
            sha, data = item
        except (TypeError, ValueError):
            raise ElementalError(f"photos[{i}]: expected a (sha256, image bytes or file) pair") from None
        if not isinstance(sha, str) or not sha or not isinstance(data, bytes | bytearray | Path):
            raise ElementalError(f"photos[{i}]: expected a (sha256 str, image bytes or file) pair")
        unique.setdefault(sha, data if isinstance(data, Path) else bytes(data))
    return unique


def _teacher_jpeg_of(data: PhotoData, max_side: int, sha: str) -> bytes:
    """What the teacher is sent for a photo given as bytes or as a file (read now, only when asked)."""
    name = f"photo {sha[:12]}"
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except OSError as e:
            raise ElementalError(f"{name}: cannot read {data} ({e.strerror or e})") from None
    return teacher_jpeg(data, max_side, name=name)


def _result_from_row(row: Any, *, cached: bool) -> LabelResult:
    return LabelResult(row.sha256, row.status, row.element, row.reason, row.confidence, row.reject_reason,
                       cached, row.tokens_in, row.tokens_out, row.attempts)


def _batch_chunks(lines: list[tuple[str, bytes]]) -> Iterable[list[tuple[str, bytes]]]:
    chunk: list[tuple[str, bytes]] = []
    size = 0
    for item in lines:
        if chunk and (len(chunk) >= MAX_BATCH_REQUESTS or size + len(item[1]) > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[1])
    if chunk:
        yield chunk


def _host(url: str) -> str:
    """host[:port] of a URL: what the report may show (never a path, query or user info)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


def _bar_off(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets it decide (off when stderr is not a terminal)."""
    return None if progress is None else not progress
