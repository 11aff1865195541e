"""The teacher against a real HTTP server on 127.0.0.1 (tests/fake_openai.py), through the real `openai` SDK.

Nothing here mocks the client: every claim (labels right, nothing paid twice, Retry-After honoured,
bad answers re-asked then rejected, the key never written anywhere) is checked by what the server
saw and what landed on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from elemental.config import TaskConfig
from elemental.data.label_cache import LabelCache
from elemental.data.labeling import (
    BATCH_ENDPOINT,
    Teacher,
    chat_messages,
    estimate_cost,
    price_per_1m,
    prompt_version,
    response_format,
    teacher_jpeg,
)
from elemental.errors import ElementalError
from elemental.images import encode_jpeg
from elemental.synthetic import synthetic_photo
from elemental.task import Task

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI, photo_key  # noqa: E402

KEY = "sk-test-SECRET-123"


def make_photos(task: Task, n: int, seed: int = 0) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """n synthetic photos cycling through the labels: (sha256, JPEG bytes) pairs and sha → true label."""
    rng = np.random.default_rng(seed)
    photos, truth = [], {}
    for i in range(n):
        label = task.labels[i % len(task.labels)]
        data = encode_jpeg(synthetic_photo(label, rng, size=(int(rng.integers(80, 700)), int(rng.integers(80, 700)))))
        sha = hashlib.sha256(data).hexdigest()
        photos.append((sha, data))
        truth[sha] = label
    return photos, truth


def key_of(data: bytes) -> str:
    """The server's id of a photo: the hash of the JPEG the teacher sends."""
    return photo_key(teacher_jpeg(data))


@pytest.fixture
def server():
    with FakeOpenAI(expected_key=KEY) as s:
        yield s


@pytest.fixture
def teacher_factory(server, tmp_path, task):
    made: list[Teacher] = []

    def make(**kw) -> Teacher:
        kw.setdefault("cache_path", tmp_path / "cache" / "labels.sqlite")
        kw.setdefault("base_url", server.base_url)
        kw.setdefault("api_key", KEY)
        t = Teacher(kw.pop("task", task), **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


# -- the happy path --------------------------------------------------------------------------------

def test_labels_are_correct_and_requests_well_formed(server, teacher_factory, task):
    photos, truth = make_photos(task, 15)
    teacher = teacher_factory(num_workers=4)
    results = teacher.label_many(photos, progress=False)

    assert list(results) == [sha for sha, _ in photos]
    for sha, r in results.items():
        assert r.status == "ok" and not r.cached and r.attempts == 1
        assert r.element == truth[sha]
        assert 0.0 <= r.confidence <= 1.0 and r.reason
    assert sorted(server.billed.values()) == [1] * 15  # each photo paid once
    assert server.auth_headers == {f"Bearer {KEY}"}
    assert server.details == {"low"}  # downscaled, low detail (the server refuses images over 512 px)


def test_cache_hit_makes_zero_requests(server, teacher_factory, task, tmp_path):
    photos, truth = make_photos(task, 6)
    first = teacher_factory()
    first.label_many(photos, progress=False)
    first.close()
    before = sum(server.requests.values())

    again = teacher_factory()  # a fresh process would do the same: the cache is on disk
    results = again.label_many(photos + photos[:2], progress=False)  # duplicates are asked once anyway
    assert sum(server.requests.values()) == before
    assert all(r.cached for r in results.values()) and len(results) == 6
    assert {sha: r.element for sha, r in results.items()} == truth
    report = again.report()
    assert report["requests"] == 0 and report["cache_hits"] == 6 and report["estimated_cost_usd"] == 0.0


def test_photos_given_as_files_are_read_only_when_the_teacher_is_asked(server, teacher_factory, task, tmp_path):
    photos, truth = make_photos(task, 4)
    files = []
    for sha, data in photos:
        (tmp_path / f"{sha}.jpg").write_bytes(data)
        files.append((sha, tmp_path / f"{sha}.jpg"))
    results = teacher_factory().label_many(files[:3], progress=False)
    assert {sha: r.element for sha, r in results.items()} == {sha: truth[sha] for sha, _ in files[:3]}
    for _, path in files[:3]:
        path.unlink()  # cached answers need no photo: a re-run reads none of them
    (tmp_path / f"{files[3][0]}.jpg").write_bytes(b"not a photo")
    again = teacher_factory().label_many(files + [(sha, tmp_path / "gone.jpg") for sha in ["f" * 64]], progress=False)
    assert [again[sha].cached for sha, _ in files[:3]] == [True, True, True]
    assert again[files[3][0]].status == "rejected" and "unreadable" in again[files[3][0]].reject_reason
    gone = again["f" * 64]
    assert gone.status == "rejected" and "cannot read" in gone.reject_reason and "gone.jpg" in gone.reject_reason
    assert sum(server.billed.values()) == 3  # the unreadable photos cost nothing


def test_prompt_version_and_model_are_part_of_the_cache_key(server, teacher_factory, task):
    pv = prompt_version(task)
    assert pv == prompt_version(Task.from_config(TaskConfig()))
    assert pv != prompt_version(task, detail="high")
    assert pv != prompt_version(task, max_side=384)
    assert pv != prompt_version(Task.from_config(TaskConfig(labels=["water", "land", "fire", "wood", "stone"])))
    assert pv != prompt_version(Task.from_config(TaskConfig(instruction="Which element? {labels}")))

    photos, _ = make_photos(task, 3)
    teacher_factory().label_many(photos, progress=False)
    teacher_factory(model="gpt-4.1-mini").label_many(photos, progress=False)
    assert sorted(server.billed.values()) == [2, 2, 2]  # another teacher model is another question


def test_concurrency_is_bounded_and_real(task, tmp_path):
    photos, _ = make_photos(task, 12)
    with FakeOpenAI(delay=0.2) as srv:  # also: a local server without a key
        teacher = Teacher(task, cache_path=tmp_path / "c.sqlite", base_url=srv.base_url, api_key=None,
                          num_workers=3)
        t0 = time.monotonic()
        teacher.label_many(photos, progress=False)
        elapsed = time.monotonic() - t0
        teacher.close()
    assert srv.max_inflight == 3
    assert elapsed < 12 * 0.2 * 0.75  # sequential would take 2.4 s, 3 at a time 0.8 s


def test_concurrent_calls_with_the_same_photos_pay_once(server, teacher_factory, task):
    photos, _ = make_photos(task, 10)
    server.delay = 0.05
    teacher = teacher_factory(num_workers=4)
    outs: list[dict] = []
    threads = [threading.Thread(target=lambda: outs.append(teacher.label_many(photos, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outs) == 3 and all(len(o) == 10 and all(r.status == "ok" for r in o.values()) for o in outs)
    assert sorted(server.billed.values()) == [1] * 10


# -- never lose, never pay twice -------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import hashlib, pathlib, sys
    from elemental.config import TaskConfig
    from elemental.data.labeling import Teacher
    from elemental.task import Task
    photo_dir, cache, url, key = sys.argv[1:5]
    photos = [(hashlib.sha256(b).hexdigest(), b)
              for b in (p.read_bytes() for p in sorted(pathlib.Path(photo_dir).iterdir()))]
    teacher = Teacher(Task.from_config(TaskConfig()), cache_path=pathlib.Path(cache), base_url=url, api_key=key,
                      num_workers=4)
    teacher.label_many(photos, progress=False)
    print("FINISHED")
""")


def test_resume_after_sigkill_loses_nothing_and_rebills_nothing(server, tmp_path, task):
    photos, truth = make_photos(task, 20)
    photo_dir = tmp_path / "photos"
    photo_dir.mkdir()
    for i, (_, data) in enumerate(photos):
        (photo_dir / f"{i:03d}.jpg").write_bytes(data)
    cache = tmp_path / "labels.sqlite"
    server.hold_after = 8  # answer about 8, then hang the rest: the run is killed mid-flight
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(photo_dir), str(cache), server.base_url, KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        committed = -1
        while time.monotonic() < deadline:
            if server.held >= 1 and cache.exists():
                with sqlite3.connect(cache) as db:
                    committed = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
                if committed == server.total_billed() >= 8:
                    break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail(f"child never reached the kill point (committed={committed}, billed={server.total_billed()})")
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no atexit: the harshest crash
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"FINISHED" not in proc.stdout.read()
    paid_before_kill = server.total_billed()
    server.release()  # the hung requests end unanswered (not billed)

    with Teacher(task, cache_path=cache, base_url=server.base_url, api_key=KEY, num_workers=4) as teacher:
        results = teacher.label_many(photos, progress=False)
    assert sum(r.cached for r in results.values()) == paid_before_kill  # every paid answer survived
    assert {sha: r.element for sha, r in results.items()} == truth
    assert len(server.billed) == 20 and set(server.billed.values()) == {1}  # each photo paid exactly once


# -- retries ---------------------------------------------------------------------------------------

def test_429_waits_at_least_retry_after(server, teacher_factory, task):
    photos, truth = make_photos(task, 2)
    sha, data = photos[0]
    server.script(key_of(data), ("429", 1))
    teacher = teacher_factory()
    results = teacher.label_many(photos, progress=False)
    times = server.request_times[key_of(data)]
    assert len(times) == 2 and times[1] - times[0] >= 1.0  # the SDK's own backoff would be < 0.5 s
    assert results[sha].element == truth[sha] and server.billed[key_of(data)] == 1
    assert teacher.report()["retries"] == 1


def test_5xx_and_timeouts_are_retried(server, teacher_factory, task):
    photos, truth = make_photos(task, 2)
    (sha_a, a), (sha_b, b) = photos
    server.script(key_of(a), "500", "500")
    server.script(key_of(b), ("slow", 1.5))
    teacher = teacher_factory(timeout=0.5)
    results = teacher.label_many(photos, progress=False)
    assert results[sha_a].element == truth[sha_a] and server.requests[key_of(a)] == 3
    assert results[sha_b].element == truth[sha_b] and server.requests[key_of(b)] == 2
    assert teacher.report()["retries"] == 3


def test_a_persistent_server_error_rejects_the_photo_and_the_run_goes_on(server, teacher_factory, task):
    photos, truth = make_photos(task, 3)
    sha, data = photos[0]
    server.script(key_of(data), "500", "500")  # the first try and its one retry
    teacher = teacher_factory(max_retries=1)
    results = teacher.label_many(photos, progress=False)
    r = results[sha]
    assert r.status == "rejected" and r.reject_reason.startswith("server_error:") and "500" in r.reject_reason
    assert KEY not in r.reject_reason
    assert all(results[s].element == truth[s] for s, _ in photos[1:])  # the others were labeled meanwhile
    # A server fault bills nothing: it is not cached as a rejection, and the next run asks again by itself.
    assert LabelCache(teacher.cache_path).get(sha, teacher.model, teacher.prompt_version) is None
    again = teacher_factory(max_retries=1).label_many(photos, progress=False)
    assert again[sha].status == "ok" and not again[sha].cached and again[sha].element == truth[sha]
    assert all(again[s].cached for s, _ in photos[1:])
    assert sum(server.billed.values()) == 3  # and the good answers were never paid twice


def test_a_timeout_that_persists_is_a_per_photo_server_error(server, teacher_factory, task):
    photos, truth = make_photos(task, 2)
    sha, data = photos[0]
    server.script(key_of(data), ("slow", 1.0), ("slow", 1.0))
    results = teacher_factory(timeout=0.3, max_retries=1).label_many(photos, progress=False)
    assert results[sha].status == "rejected" and results[sha].reject_reason.startswith("server_error:")
    assert results[photos[1][0]].element == truth[photos[1][0]]


def test_consecutive_failures_stop_the_run_with_a_clear_keyless_error(server, teacher_factory, task):
    photos, _ = make_photos(task, 5)
    server.default = ["500"]
    teacher = teacher_factory(max_retries=0, num_workers=1, max_consecutive_failures=3)
    with pytest.raises(ElementalError) as e:
        teacher.label_many(photos, progress=False)
    msg = str(e.value)
    assert "3 requests in a row failed" in msg and "500" in msg and "asked again on the next run" in msg
    assert KEY not in msg and "\n" not in msg
    assert sum(server.requests.values()) == 3  # it stopped asking


@pytest.mark.parametrize("status, needle", [(401, "the key was refused"), (403, "the key was refused"),
                                            (404, "was not found"), (429, "rate limited")])
def test_systemic_faults_stop_at_once(server, teacher_factory, task, status, needle):
    photos, _ = make_photos(task, 4)
    server.default = [("status", status, {}, {"error": {"message": f"failure {status}"}})]
    with pytest.raises(ElementalError, match=needle) as e:
        teacher_factory(max_retries=0, num_workers=1).label_many(photos, progress=False)
    assert KEY not in str(e.value) and sum(server.requests.values()) == 1


def test_a_fatal_error_sends_no_further_request_however_threads_interleave(server, teacher_factory, task):
    """The worker that met the error must not start the next queued photo before the caller cancels it.

    A tiny GIL switch interval makes the losing interleaving the usual one (without the stop flag,
    19 of 20 runs sent a second request).
    """
    photos, _ = make_photos(task, 12)
    server.default = [("status", 403, {}, {"error": {"message": "failure 403"}})]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        sent = []
        for _ in range(20):
            before = sum(server.requests.values())
            with pytest.raises(ElementalError, match="the key was refused"):
                teacher_factory(max_retries=0, num_workers=1).label_many(photos, progress=False)
            sent.append(sum(server.requests.values()) - before)
    finally:
        sys.setswitchinterval(old)
    assert sent == [1] * 20


def test_an_unreachable_server_is_not_cached_and_stops_after_the_streak(task, tmp_path):
    with FakeOpenAI() as gone:
        url = gone.base_url  # a port that nothing listens on once this server is closed
    photos, _ = make_photos(task, 4)
    teacher = Teacher(task, cache_path=tmp_path / "c.sqlite", base_url=url, api_key=KEY, max_retries=0,
                      num_workers=1, max_consecutive_failures=2)
    with pytest.raises(ElementalError, match="2 requests in a row failed"):
        teacher.label_many(photos, progress=False)
    assert LabelCache(tmp_path / "c.sqlite").stats()["entries"] == 0  # nothing reached a server: ask again later
    teacher.close()


# -- what real servers take and send -----------------------------------------------------------------

def test_requests_cap_tokens_and_are_deterministic(server, teacher_factory, task):
    photos, _ = make_photos(task, 2)
    teacher = teacher_factory()
    teacher.label_many(photos, progress=False)
    assert server.params_seen and all(p == {"max_tokens": 300, "temperature": 0.0, "seed": 0}
                                      for p in server.params_seen)
    assert teacher.report()["request_params"] == {"max_tokens": 300, "temperature": 0.0, "seed": 0}


def test_parameters_an_endpoint_refuses_are_adapted_once(task, tmp_path):
    with FakeOpenAI(refuse_params=frozenset({"max_tokens", "seed"})) as server:
        photos, truth = make_photos(task, 3)
        teacher = Teacher(task, cache_path=tmp_path / "c.sqlite", base_url=server.base_url, api_key=KEY,
                          num_workers=1)
        results = teacher.label_many(photos, progress=False)
        assert all(results[s].element == truth[s] for s, _ in photos)
        assert server.params_seen[-1] == {"max_completion_tokens": 300, "temperature": 0.0}
        assert sum(1 for p in server.params_seen if "max_tokens" in p or "seed" in p) == 2  # one refusal each
        assert sorted(teacher.report()["adapted_to_endpoint"]) == [
            "max_tokens sent as max_completion_tokens", "seed not sent (the endpoint does not support it)"]
        teacher.close()


def test_a_context_length_error_naming_max_tokens_keeps_the_answer_length_cap(server, teacher_factory, task):
    """vLLM's context-length 400 names max_tokens (and max_completion_tokens): that photo fails, nothing changes."""
    photos, truth = make_photos(task, 3)
    sha, data = photos[0]
    vllm = ("'max_tokens' or 'max_completion_tokens' is too large: 300. This model's maximum context length is 2048 "
            "tokens and your request has 1800 input tokens (300 > 2048 - 1800).")
    server.script(key_of(data), ("status", 400, {}, {"error": {"message": vllm, "type": "BadRequestError",
                                                               "param": "max_tokens"}}))
    teacher = teacher_factory(num_workers=1)
    results = teacher.label_many(photos, progress=False)
    assert results[sha].status == "rejected" and results[sha].reject_reason.startswith("api_error:")
    assert all(results[s].element == truth[s] for s, _ in photos[1:])
    assert server.params_seen and all(p.get("max_tokens") == 300 for p in server.params_seen)
    assert teacher.report()["adapted_to_endpoint"] == [] and teacher.request_params()["max_tokens"] == 300


@pytest.mark.parametrize("kind", ["fenced", "parts", "chatty"])
def test_answers_wrapped_as_real_servers_wrap_them_are_read(server, teacher_factory, task, kind):
    photos, truth = make_photos(task, 1)
    sha, data = photos[0]
    server.script(key_of(data), kind)
    r = teacher_factory().label_many(photos, progress=False)[sha]
    assert r.status == "ok" and r.element == truth[sha] and r.attempts == 1


def test_an_answer_cut_off_by_the_token_cap_is_reasked_then_rejected(server, teacher_factory, task):
    photos, truth = make_photos(task, 2)
    (sha, data), (sha_b, data_b) = photos
    server.script(key_of(data), "truncated", "truncated", "truncated")
    server.script(key_of(data_b), "truncated")
    results = teacher_factory(max_reasks=2).label_many(photos, progress=False)
    assert results[sha].status == "rejected" and results[sha].reject_reason.startswith("truncated:")
    assert results[sha_b].status == "ok" and results[sha_b].element == truth[sha_b]  # the re-ask was enough


# -- bad answers -----------------------------------------------------------------------------------

BAD = [
    ("malformed", "invalid_json"),
    ("off_list", "off_list"),
    ("confidence_high", "confidence"),
    ("confidence_text", "confidence"),
    ("refusal", "refusal"),
    ("empty", "empty"),
    ("no_reason", "reason"),
]


@pytest.mark.parametrize(("kind", "code"), BAD)
def test_bad_answers_are_reasked_then_rejected_with_the_reason(server, teacher_factory, task, kind, code):
    photos, truth = make_photos(task, 2)
    (bad_sha, bad), (good_sha, _) = photos
    server.script(key_of(bad), kind, kind, kind)
    teacher = teacher_factory(max_reasks=2)
    results = teacher.label_many(photos, progress=False)

    r = results[bad_sha]
    assert r.status == "rejected" and r.element is None and r.attempts == 3
    assert r.reject_reason.startswith(code + ":") and "after 3 attempts" in r.reject_reason
    assert server.billed[key_of(bad)] == 3  # first ask + 2 re-asks, then it stops
    assert server.messages_seen[key_of(bad)] == [2, 4, 6]  # each re-ask shows the bad answer and what is wrong
    assert results[good_sha].element == truth[good_sha]
    row = LabelCache(teacher.cache_path).get(bad_sha, teacher.model, teacher.prompt_version)
    assert row.status == "rejected" and row.reject_reason == r.reject_reason and row.tokens_in > 0
    report = teacher.report()
    assert report["reasks"] == 2 and report["rejected"] == 1 and report["rejects_by_reason"] == {code: 1}

    again = teacher.label_many(photos, progress=False)  # a rejected photo is not paid for again
    assert again[bad_sha].cached and again[bad_sha].status == "rejected"
    assert server.billed[key_of(bad)] == 3


@pytest.mark.parametrize(("kind", "code"), BAD[:3] + BAD[4:5])
def test_a_bad_answer_then_a_good_one_is_accepted(server, teacher_factory, task, kind, code):
    photos, truth = make_photos(task, 1)
    sha, data = photos[0]
    server.script(key_of(data), kind)
    teacher = teacher_factory()
    r = teacher.label_many(photos, progress=False)[sha]
    assert r.status == "ok" and r.element == truth[sha] and r.attempts == 2
    assert teacher.report()["reasks"] == 1 and server.billed[key_of(data)] == 2


def test_max_reasks_zero_rejects_at_once(server, teacher_factory, task):
    photos, _ = make_photos(task, 1)
    sha, data = photos[0]
    server.script(key_of(data), "off_list")
    r = teacher_factory(max_reasks=0).label_many(photos, progress=False)[sha]
    assert r.status == "rejected" and r.attempts == 1 and server.billed[key_of(data)] == 1


def test_unreadable_photo_and_refused_request_are_not_cached(server, teacher_factory, task):
    photos, truth = make_photos(task, 2)
    (sha_ok, _), (sha_400, data_400) = photos
    server.script(key_of(data_400), ("status", 400, {}, {"error": {"message": "invalid image"}}))
    junk = ("f" * 64, b"this is a text file named .jpg")
    teacher = teacher_factory()
    results = teacher.label_many([*photos, junk], progress=False)
    assert results[sha_ok].element == truth[sha_ok]
    assert results[sha_400].status == "rejected" and results[sha_400].reject_reason.startswith("api_error:")
    assert results[junk[0]].status == "rejected" and results[junk[0]].reject_reason.startswith("unreadable:")
    assert sum(server.requests.values()) == 2  # the junk was never sent
    # Neither was paid for, so neither is cached: a re-run asks about the refused one again.
    again = teacher.label_many(photos, progress=False)
    assert again[sha_400].status == "ok" and not again[sha_400].cached


def test_bad_photos_argument_is_a_clear_error(teacher_factory):
    with pytest.raises(ElementalError, match=r"photos\[1\]"):
        teacher_factory().label_many([("a" * 64, b"x"), ("b" * 64,)], progress=False)


# -- cost ------------------------------------------------------------------------------------------

def test_cost_report_matches_the_usage_the_server_returned(server, teacher_factory, task):
    photos, _ = make_photos(task, 8)
    server.script(key_of(photos[0][1]), "off_list")
    server.script(key_of(photos[1][1]), ("429", 0.2))
    teacher = teacher_factory()
    teacher.label_many(photos, progress=False)
    report = teacher.report()
    assert report["tokens_in"] == server.usage_in and report["tokens_out"] == server.usage_out
    assert report["requests"] == server.total_billed() == 9
    assert report["retries"] == 1 and report["reasks"] == 1
    expected = server.usage_in * 0.15 / 1e6 + server.usage_out * 0.60 / 1e6
    assert report["estimated_cost_usd"] == pytest.approx(expected, abs=1e-6)
    assert report["model"] == "gpt-4o-mini" and report["base_url_host"] == server.base_url.split("/")[2]
    assert report["price_usd_per_1m"] == {"input": 0.15, "output": 0.60}


def test_price_table():
    assert price_per_1m("gpt-4o") == (2.50, 10.00)
    assert price_per_1m("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert price_per_1m("gpt-4.1-nano") == (0.10, 0.40)
    assert price_per_1m("llava:13b") is None and estimate_cost("llava:13b", 1000, 10) is None
    assert estimate_cost("gpt-4.1-mini", 1_000_000, 1_000_000) == pytest.approx(2.00)
    assert estimate_cost("gpt-4o-mini", 0, 0, 1_000_000, 1_000_000) == pytest.approx(0.375)  # batch: half


def test_unknown_model_reports_unknown_price(task, tmp_path):
    photos, _ = make_photos(task, 2)
    with FakeOpenAI() as srv, Teacher(task, cache_path=tmp_path / "c.sqlite", base_url=srv.base_url,
                                      model="qwen2.5-vl-7b") as teacher:
        teacher.label_many(photos, progress=False)
        report = teacher.report()
    assert report["estimated_cost_usd"] is None and report["price_usd_per_1m"] == "unknown price"
    assert report["tokens_in"] == srv.usage_in


# -- the key ---------------------------------------------------------------------------------------

def test_api_key_is_never_written_logged_or_raised(server, teacher_factory, task, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # everything, including the SDK's own debug logs
    photos, _ = make_photos(task, 5)
    server.script(key_of(photos[0][1]), "confidence_high", "confidence_high", "confidence_high")
    teacher = teacher_factory()
    teacher.label_many(photos, progress=False)
    teacher.label_batch(make_photos(task, 3, seed=1)[0], poll_interval=0.01, progress=False)
    messages = [repr(teacher), json.dumps(teacher.report())]

    server.default = ["echo_auth"]  # a careless server that repeats the Authorization header in its error
    with pytest.raises(ElementalError) as e:
        teacher.label_many(make_photos(task, 2, seed=2)[0], progress=False)
    messages.append(str(e.value))
    assert e.value.__cause__ is None and e.value.__context__ is None
    teacher.close()

    wrong = teacher_factory(api_key="sk-wrong-SECRET-456")
    server.default = []
    with pytest.raises(ElementalError) as e2:
        wrong.label_many(make_photos(task, 1, seed=3)[0], progress=False)
    messages.append(str(e2.value))
    assert "401" in messages[-1] or "Incorrect API key" in messages[-1]

    for text in [*messages, caplog.text]:
        assert KEY not in text and "SECRET" not in text, text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.startswith("labels.sqlite") for p in written)
    for p in written:
        assert b"SECRET" not in p.read_bytes(), p


def test_missing_key_against_openai_is_a_clear_error(monkeypatch, task, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ElementalError, match="OPENAI_API_KEY is not set"):
        Teacher(task, cache_path=tmp_path / "c.sqlite")
    with pytest.raises(ElementalError, match="OPENAI_API_KEY is not set"):
        Teacher(task, cache_path=tmp_path / "c.sqlite", base_url="https://api.openai.com/v1")


def test_base_url_and_key_from_the_environment(monkeypatch, server, task, tmp_path):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    photos, truth = make_photos(task, 2)
    with Teacher(task, cache_path=tmp_path / "c.sqlite") as teacher:
        results = teacher.label_many(photos, progress=False)
        assert teacher.report()["base_url_host"] == server.base_url.split("/")[2]
    assert {s: r.element for s, r in results.items()} == truth


# -- Batch API -------------------------------------------------------------------------------------

def test_batch_mode_end_to_end(server, teacher_factory, task):
    photos, truth = make_photos(task, 10)
    reasked, errored = photos[0], photos[1]
    server.script(key_of(reasked[1]), "off_list")  # the batch answer is invalid: re-asked through the normal path
    server.script(key_of(errored[1]), "500")  # this batch line fails: not billed, labelled through the normal path
    teacher = teacher_factory()
    results = teacher.label_batch(photos, poll_interval=0.01, progress=False)

    assert {sha: r.element for sha, r in results.items()} == truth
    assert all(r.status == "ok" for r in results.values())
    assert server.endpoint_calls["POST /v1/files"] == 1 and server.endpoint_calls["POST /v1/batches"] == 1
    assert server.billed[key_of(reasked[1])] == 2 and results[reasked[0]].attempts == 2
    assert server.billed[key_of(errored[1])] == 1
    assert sum(server.billed.values()) == 11
    report = teacher.report()
    assert report["batches_submitted"] == 1 and report["batch_answers"] == 9 and report["reasks"] == 1
    assert report["batch_tokens_in"] == server.batch_usage_in
    assert report["tokens_in"] == server.usage_in and report["tokens_out"] == server.usage_out
    sync_in, sync_out = server.usage_in - server.batch_usage_in, server.usage_out - server.batch_usage_out
    expected = (sync_in * 0.15 + sync_out * 0.60 + (server.batch_usage_in * 0.15 + server.batch_usage_out * 0.6) / 2)
    assert report["estimated_cost_usd"] == pytest.approx(expected / 1e6, abs=1e-6)

    before = sum(server.requests.values())
    again = teacher.label_batch(photos, poll_interval=0.01, progress=False)
    assert all(r.cached for r in again.values()) and sum(server.requests.values()) == before
    assert server.endpoint_calls["POST /v1/files"] == 1


def test_batch_resumes_by_id_instead_of_paying_again(server, teacher_factory, task):
    photos, truth = make_photos(task, 6)
    server.batch_hold = True  # the batch takes longer than this run is willing to wait
    first = teacher_factory()
    with pytest.raises(ElementalError, match=r"batch_0001 .*re-run to resume"):
        first.label_batch(photos, poll_interval=0.01, max_wait=0.2, progress=False)
    first.close()
    assert server.endpoint_calls["POST /v1/batches"] == 1

    server.batch_hold = False
    more, more_truth = make_photos(task, 2, seed=7)  # photos not in the running batch get a batch of their own
    second = teacher_factory()
    results = second.label_batch(photos + more, poll_interval=0.01, progress=False)
    assert {s: r.element for s, r in results.items()} == {**truth, **more_truth}
    assert server.endpoint_calls["POST /v1/batches"] == 2 and server.endpoint_calls["POST /v1/files"] == 2
    assert len(server.billed) == 8 and set(server.billed.values()) == {1}
    assert second.report()["batches_submitted"] == 1


def test_batch_created_but_not_recorded_is_adopted_not_resubmitted(server, teacher_factory, task):
    """A crash between batches.create and recording its id: the batch is found by its input file."""
    import openai

    photos, truth = make_photos(task, 4)
    teacher = teacher_factory()
    lines = [json.dumps({"custom_id": sha, "method": "POST", "url": BATCH_ENDPOINT,
                         "body": {"model": teacher.model, "messages": chat_messages(task, teacher_jpeg(data)),
                                  "response_format": response_format(task)}}) for sha, data in photos]
    client = openai.OpenAI(api_key=KEY, base_url=server.base_url)
    file = client.files.create(file=("in.jsonl", "\n".join(lines).encode(), "application/jsonl"), purpose="batch")
    teacher.cache.record_batch_upload(file.id, teacher.model, teacher.prompt_version, [s for s, _ in photos])
    client.batches.create(input_file_id=file.id, endpoint=BATCH_ENDPOINT, completion_window="24h")
    client.close()

    results = teacher.label_batch(photos, poll_interval=0.01, progress=False)
    assert {s: r.element for s, r in results.items()} == truth
    assert server.endpoint_calls["POST /v1/batches"] == 1 and server.endpoint_calls["POST /v1/files"] == 1
    assert set(server.billed.values()) == {1}


# -- the cache on its own --------------------------------------------------------------------------

def test_label_cache_api(tmp_path):
    path = tmp_path / "deep" / "labels.sqlite"
    with LabelCache(path) as cache:
        cache.put("a" * 64, "m", "pv1", status="ok", element="fire", reason="flames", confidence=0.9,
                  attempts=1, tokens_in=120, tokens_out=22)
        cache.put("b" * 64, "m", "pv1", status="rejected", reject_reason="off_list: 'plasma'", attempts=3,
                  tokens_in=300, tokens_out=60)
        cache.put("a" * 64, "m", "pv2", status="ok", element="water", reason="waves", confidence=0.8)
        assert cache.get("a" * 64, "m", "pv1").element == "fire"
        assert cache.get("a" * 64, "other-model", "pv1") is None
        assert set(cache.get_many(["a" * 64, "b" * 64, "c" * 64], "m", "pv1")) == {"a" * 64, "b" * 64}
        assert cache.stats("m", "pv1") == {"entries": 2, "ok": 1, "rejected": 1, "tokens_in": 420,
                                           "tokens_out": 82, "batches": 0}
        assert [r.element for r in cache.iter_labels(prompt_version="pv2")] == ["water"]
        assert cache.delete(["b" * 64], "m", "pv1") == 1 and cache.stats()["entries"] == 2
        with pytest.raises(ValueError):
            cache.put("c" * 64, "m", "pv1", status="maybe")  # type: ignore[arg-type]
        cache.record_batch_upload("file-1", "m", "pv1", ["a" * 64, "b" * 64])
        assert cache.open_batches("m", "pv1")[0].batch_id is None
        cache.record_batch_created("file-1", "batch_1", "validating")
        cache.set_batch_state("batch_1", "completed", output_file_id="file-2")
        (rec,) = cache.open_batches("m", "pv1")
        assert (rec.batch_id, rec.state, rec.output_file_id, rec.shas) == ("batch_1", "completed", "file-2",
                                                                           ("a" * 64, "b" * 64))
        cache.set_batch_state("batch_1", "consumed")
        assert cache.open_batches("m", "pv1") == []


def test_a_file_that_is_not_a_cache_is_a_clear_error(tmp_path):
    bad = tmp_path / "labels.sqlite"
    bad.write_bytes(b"this is not a database, just some text" * 100)
    with pytest.raises(ElementalError, match="labels.sqlite: not a usable label cache"):
        LabelCache(bad)
