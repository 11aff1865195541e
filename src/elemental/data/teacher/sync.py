"""The teacher's synchronous path: photos asked one request each, `num_workers` at a time, every answer cached.

* Every answer is committed to the label cache (`cache.LabelCache`) the moment it arrives, keyed by the photo,
  the model asked for, the prompt version, the endpoint's host and the model that answered; a re-run, a
  crash or Ctrl-C loses nothing and asks nothing again. Before cached answers are used, the server is asked
  which model it serves now (one text-only request, `probe_served_model`): answers of another model behind
  the same name are asked again.
* Answers use strict structured output and are still validated (`answers`); an invalid answer is re-asked a
  bounded number of times, then recorded as rejected with the reason.
* HTTP retries (429/5xx/timeouts, with exponential backoff that honours `Retry-After`) are the `openai` SDK's
  own (`max_retries`); the tests prove against a loopback server that it waits at least the delay the server
  asked for. A fault that outlasts them stays the photo's: a 5xx or a timeout makes it
  `rejected: server_error ...` for this run (not cached: nothing was billed, so the next run asks again) and
  the run goes on. Only systemic faults stop a run: a refused key (401/403), an unknown model or endpoint
  (404), an exhausted quota (429), or `max_consecutive_failures` failures in a row.
* Requests fit real servers (llama-server, vLLM, Ollama as well as OpenAI): `max_tokens`, temperature 0 and a
  seed are sent; a server whose error says one of them is unsupported gets the request without it (the
  answer-length cap is only ever renamed, max_tokens to max_completion_tokens, never dropped: a
  context-length error that names max_tokens changes nothing).
* The API key never reaches a log, a file, the cache or an exception message: SDK errors are re-raised as
  one-line ElementalErrors with the key (and anything that looks like a key) scrubbed.

The Batch API path (`batch`) shares this Teacher's client, cache, counters and error handling.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletion
from tqdm import tqdm

from ...config import ModelPrice
from ...errors import ElementalError
from ...task import Task
from .answers import judge_completion, one_line
from .cache import CachedLabel, LabelCache, TeacherKey
from .pricing import cost_usd, default_prices, price_for
from .prompt import (
    DEFAULT_DETAIL,
    DEFAULT_MAX_SIDE,
    Detail,
    chat_messages,
    prompt_version,
    reask_messages,
    response_format,
    teacher_jpeg,
)
from .results import LabelResult, Prior, Stats, result_from_row

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-mini"
# A photo for the teacher: its bytes, or the file holding them (read only if the teacher is asked, so a
# re-run whose answers are all cached reads no photo).
PhotoData = bytes | Path
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY_PLACEHOLDER = "no-key"  # local servers (llama-server, vLLM, Ollama) ignore the key but the SDK wants one
# An answer is ~40 tokens; a cap a few times that stops a local model that rambles (or loops inside the
# reason string) with finish_reason=length, which is re-asked, instead of running to the context limit.
MAX_ANSWER_TOKENS = 300
DEFAULT_TEMPERATURE = 0.0
DEFAULT_SEED = 0
# This many failed requests in a row (refusals, server errors, timeouts) means the endpoint or the
# configuration is broken, not the photos: the run stops with one line instead of rejecting them all.
MAX_CONSECUTIVE_FAILURES = 10
# Sent once before cached answers are trusted: its answer's `model` names the model the server serves now.
PROBE_PROMPT = "Reply with the word OK."

_T = TypeVar("_T")

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
        prices: Mapping[str, ModelPrice] | None = None,
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
        self.base_url = endpoint(base_url)
        self.key = teacher_key(model, self.prompt_version, self.base_url)
        self.base_url_host = self.key.host
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
        self.prices = default_prices() if prices is None else dict(prices)
        self.served: str | None = None  # the model the server says answers, once known (probe or first answer)
        self._probed = False
        self._probe_lock = threading.Lock()
        self.served_seen: set[str] = set()  # every `model` the answers of this run named, for the report
        self._other_model: set[str] = set()  # photos whose cached answers came from another served model
        self.cache_path = Path(cache_path)
        self._cache = LabelCache(self.cache_path)
        self.client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout)
        self._stats = Stats()
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
        self.client.close()

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cache(self) -> LabelCache:
        return self._cache

    @property
    def stats(self) -> Stats:
        return self._stats

    # -- public API ----------------------------------------------------------------------------
    def label_many(
        self, photos: Sequence[tuple[str, PhotoData]], *, progress: bool | None = None
    ) -> dict[str, LabelResult]:
        """Label (sha256, image bytes or file) pairs; cached photos cost nothing, the rest run `num_workers` at a time.

        Returns one result per distinct sha256, in input order. Raises ElementalError when the
        endpoint itself fails (auth, model not found, retries exhausted); every answer received
        before that is already in the cache, so a re-run continues where this one stopped.
        """
        unique = unique_photos(photos)
        results = self.cached_results(unique)
        todo = [(sha, data, None) for sha, data in unique.items() if sha not in results]
        self._warn_if_in_open_batches([sha for sha, _, _ in todo])
        results.update(self.run_pool(todo, progress))
        return {sha: results[sha] for sha in unique}

    def _warn_if_in_open_batches(self, shas: list[str]) -> None:
        """Photos already paid for in an unfinished batch would be paid again here: say so."""
        if not shas:
            return
        wanted = set(shas)
        for b in self._cache.open_batches(self.key):
            overlap = len(wanted.intersection(b.shas))
            if overlap:
                log.warning("%d of these photos are in unfinished batch %s; labelling them now pays for them "
                            "again (BatchLabeler would collect the batch's answers instead)", overlap, b.batch_id)

    def report(self) -> dict[str, Any]:
        """The cost report of this Teacher's lifetime: requests, retries, tokens, USD billed, cache hits."""
        s = self._stats
        price = price_for(self.served or self.model, self.prices) or price_for(self.model, self.prices)
        with s._lock:
            sync_in, sync_out = s.tokens_in - s.batch_tokens_in, s.tokens_out - s.batch_tokens_out
            cost = None if price is None else (cost_usd(price, sync_in, sync_out)
                                               + cost_usd(price, s.batch_tokens_in, s.batch_tokens_out, batch=True))
            return {
                "model": self.model,
                "served_models": sorted(self.served_seen),
                "base_url_host": self.base_url_host,
                "prompt_version": self.prompt_version,
                "requests": s.requests,
                "probes": s.probes,
                "retries": s.retries,
                "reasks": s.reasks,
                "api_errors": s.api_errors,
                "tokens_in": s.tokens_in,
                "tokens_out": s.tokens_out,
                "batch_tokens_in": s.batch_tokens_in,
                "batch_tokens_out": s.batch_tokens_out,
                "batches_submitted": s.batches_submitted,
                "batch_answers": s.batch_answers,
                "batches_failed": list(s.batches_failed),
                "batch_unanswered": s.batch_unanswered,
                "estimated_cost_usd": None if cost is None else round(cost, 6),
                "price_usd_per_1m": ({"input": price.input_per_1m, "output": price.output_per_1m}
                                     if price else "unknown price"),
                "cache_hits": s.cache_hits,
                "reasked_other_model": len(self._other_model),
                "labeled": s.labeled,
                "rejected": s.rejected,
                "rejects_by_reason": dict(s.rejects_by_reason),
                "request_params": self.request_params(),
                "adapted_to_endpoint": list(self.adapted),
            }

    def spent_usd(self) -> float | None:
        return self.report()["estimated_cost_usd"]

    # -- the cache, tied to the model that answers ---------------------------------------------
    def cached_results(self, unique: Mapping[str, PhotoData]) -> dict[str, LabelResult]:
        """Photos this teacher has answered already (counted as cache hits), by the model it serves now."""
        rows = self.lookup(unique)
        results = {sha: result_from_row(row, cached=True) for sha, row in rows.items() if not self._ask_again(row)}
        for r in results.values():
            self._stats.count_result(r)
        return results

    def lookup(self, shas: Iterable[str]) -> dict[str, CachedLabel]:
        """Cached answers of the model the server serves now; asks it which one first if that is not known yet.

        Answers cached from another model behind the same name are not returned (they are asked again).
        """
        wanted = list(shas)
        rows = self._cache.get_many(wanted, self.key)
        if not rows:
            return rows
        with self._probe_lock:  # one probe, however many workers find cached answers at once
            if not self._probed and self.served is None:
                self.probe_served_model()
        if self.served is None:
            return rows
        mine = self._cache.get_many(wanted, self.key, self.served)
        with self._state_lock:
            others = rows.keys() - mine.keys() - self._other_model
            self._other_model |= others
        if others:
            log.warning("%d cached answers for %s at %s came from another model than the one it serves now (%s): "
                        "asking again", len(others), self.model, self.base_url_host, self.served)
        return mine

    def probe_served_model(self) -> str | None:
        """Ask the server, in one text-only request, which model answers under this name (its answer's `model`).

        Costs a few tokens (billed and reported as a probe). A probe that fails for a reason that is not the
        run's (a 5xx, a 400) leaves the model unknown: cached answers are then used as they are.
        """
        self._probed = True
        try:
            completion = self._create([{"role": "user", "content": PROBE_PROMPT}], probe=True)
        except _PhotoFailure as e:
            log.warning("could not ask %s which model it serves (%s); cached answers are used as they are",
                        self.base_url_host, e)
            return None
        usage = completion.usage
        tin = int(usage.prompt_tokens or 0) if usage else 0
        tout = int(usage.completion_tokens or 0) if usage else 0
        self._stats.add(tokens_in=tin, tokens_out=tout)
        return self.note_served(completion.model or self.model)

    def note_served(self, served: str) -> str:
        """The model that answered (a response's `model`), remembered for the cache and the report."""
        with self._state_lock:
            self.served_seen.add(served)
            if self.served is None:
                self.served = served
        return served

    def run_pool(
        self, jobs: Sequence[tuple[str, PhotoData, Prior | None]], progress: bool | None
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
        bar = tqdm(total=len(jobs), unit="photo", desc=f"labeling ({self.model})", disable=bar_off(progress),
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
        self, stop: threading.Event, sha: str, image: PhotoData, prior: Prior | None
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

    def _label_one(self, sha: str, image: PhotoData, prior: Prior | None = None) -> LabelResult:
        """Ask about one photo until a valid answer or `max_reasks` re-asks; cache the verdict at once."""
        p = prior or Prior()
        if prior is None:
            # Another call (or process) may have answered it since this call read the cache.
            row = self.lookup([sha]).get(sha)
            if row is not None and not self._ask_again(row):
                return result_from_row(row, cached=True)
        if self.retry_rejected:
            with self._state_lock:
                self._retried.add(sha)
        try:
            jpeg = teacher_jpeg_of(image, self.max_side, sha)
        except ElementalError as e:
            return self.reject(sha, f"unreadable: {e}", p, store=p.attempts > 0)
        messages = chat_messages(self.task, jpeg, self.detail)
        problem, text = p.problem, p.text
        attempts, tin, tout, served = p.attempts, p.tokens_in, p.tokens_out, p.served
        while True:
            if problem is not None:
                if attempts >= self.max_reasks + 1:
                    reason = f"{problem} (after {attempts} attempt{'s' if attempts > 1 else ''})"
                    return self.reject(sha, reason, Prior(attempts, tin, tout, served=served), store=True)
                messages = messages + reask_messages(self.task, text, problem)
                self._stats.add(reasks=1)
            try:
                completion = self._create(messages)
            except _PhotoFailure as e:
                return self.reject(sha, f"{e.code}: {e}", Prior(attempts, tin, tout, served=served),
                                    store=attempts > 0)
            served = self.note_served(completion.model or self.model)
            verdict = judge_completion(self.task, completion)
            attempts += 1
            tin += verdict.tokens_in
            tout += verdict.tokens_out
            self._stats.add(tokens_in=verdict.tokens_in, tokens_out=verdict.tokens_out)
            if verdict.answer is not None:
                a = verdict.answer
                self._cache.put(sha, self.key, served_model=served, status="ok", element=a.element,
                                reason=a.reason, confidence=a.confidence, attempts=attempts,
                                tokens_in=tin, tokens_out=tout, via="sync" if p.attempts == 0 else "batch+sync")
                return LabelResult(sha, "ok", a.element, a.reason, a.confidence, None, False, tin, tout, attempts)
            problem, text = verdict.problem, verdict.text
            log.debug("photo %s: invalid answer (%s)", sha[:12], problem)

    def reject(self, sha: str, reason: str, p: Prior, *, store: bool) -> LabelResult:
        """A rejected photo; stored in the cache when an answer was paid for (so it is never paid again)."""
        reason = one_line(self._scrub(reason), 500)
        if store:
            self._cache.put(sha, self.key, served_model=p.served, status="rejected", reject_reason=reason,
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

    def _create(self, messages: list[dict[str, Any]], *, probe: bool = False) -> ChatCompletion:
        """One chat completion; the SDK retries 429/5xx/timeouts itself, honouring Retry-After.

        A probe (`probe_served_model`) is sent without the answer schema and counted apart from labeling requests.

        What still fails is sorted: the photo's problem (`_PhotoFailure`: the run goes on) or the run's
        (ElementalError: auth, unknown model, exhausted quota, or too many failures in a row).
        """
        while True:
            params = self.request_params()
            try:
                schema = {} if probe else {"response_format": response_format(self.task)}
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, **schema, **params,  # type: ignore[arg-type]
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
        self._stats.add(retries=raw.retries_taken, **({"probes": 1} if probe else {"requests": 1}))
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

    # -- errors --------------------------------------------------------------------------------
    def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run one SDK call (files, batches), turning its errors into key-free ElementalErrors."""
        try:
            return fn(*args, **kwargs)
        except openai.OpenAIError as e:
            failure = e
        self._stats.add(api_errors=1)
        raise self._fatal(failure)

    def _error_text(self, e: Exception) -> str:
        return one_line(self._scrub(f"{type(e).__name__}: {e}"), 300)

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

def unique_photos(photos: Iterable[tuple[str, PhotoData]]) -> dict[str, PhotoData]:
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


def teacher_jpeg_of(data: PhotoData, max_side: int, sha: str) -> bytes:
    """What the teacher is sent for a photo given as bytes or as a file (read now, only when asked)."""
    name = f"photo {sha[:12]}"
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except OSError as e:
            raise ElementalError(f"{name}: cannot read {data} ({e.strerror or e})") from None
    return teacher_jpeg(data, max_side, name=name)


def endpoint(base_url: str | None) -> str | None:
    """The base URL requests go to: the one given, else env OPENAI_BASE_URL; None is OpenAI's own."""
    return base_url or os.environ.get("OPENAI_BASE_URL") or None


def teacher_key(model: str, prompt_version: str, base_url: str | None) -> TeacherKey:
    """The cache key of a teacher; OpenAI's own endpoint also reads answers cached before hosts were recorded."""
    host = _host(base_url or OPENAI_DEFAULT_BASE_URL)
    return TeacherKey(model, prompt_version, host, legacy=host.split(":")[0].endswith("openai.com"))


def _host(url: str) -> str:
    """host[:port] of a URL: what the report may show (never a path, query or user info)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


def bar_off(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets it decide (off when stderr is not a terminal)."""
    return None if progress is None else not progress
