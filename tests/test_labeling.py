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

from elemental.config import ModelPrice, TaskConfig
from elemental.data.teacher import BatchLabeler, Teacher
from elemental.data.teacher.batch import BATCH_ENDPOINT
from elemental.data.teacher.cache import LabelCache, TeacherKey
from elemental.data.teacher.pricing import cost_usd, default_prices, price_for
from elemental.data.teacher.prompt import chat_messages, prompt_version, response_format, teacher_jpeg
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
    assert report["requests"] == 0 and report["cache_hits"] == 6
    # Before trusting the cache, one text-only request asks which model answers under this name now.
    assert server.probes == 1 and report["probes"] == 1 and report["tokens_in"] == 12
    assert report["estimated_cost_usd"] == pytest.approx((12 * 0.15 + 1 * 0.60) / 1e6, abs=1e-6)


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
    from elemental.data.teacher import Teacher
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
    assert LabelCache(teacher.cache_path).get(sha, teacher.key) is None
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
    row = LabelCache(teacher.cache_path).get(bad_sha, teacher.key)
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
    prices = default_prices()

    def per_1m(model):
        p = price_for(model, prices)
        return None if p is None else (p.input_per_1m, p.output_per_1m)

    assert per_1m("gpt-4o") == (2.50, 10.00)
    assert per_1m("gpt-4o-mini-2024-07-18") == (0.15, 0.60)  # a dated snapshot, as OpenAI names what answered
    assert per_1m("gpt-4.1-nano") == (0.10, 0.40)
    assert per_1m("llava:13b") is None
    assert cost_usd(prices["gpt-4.1-mini"], 1_000_000, 1_000_000) == pytest.approx(2.00)
    assert cost_usd(prices["gpt-4o-mini"], 1_000_000, 1_000_000, batch=True) == pytest.approx(0.375)  # half
    mine = {**prices, "local": ModelPrice(input_per_1m=0, output_per_1m=0, photo_tokens_in=300)}
    assert cost_usd(price_for("local", mine), 10**6, 10**6) == 0.0


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
    BatchLabeler(teacher, poll_interval=0.01).label(make_photos(task, 3, seed=1)[0], progress=False)
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
    server.script(key_of(errored[1]), "500")  # this batch line fails: not billed
    teacher = teacher_factory()
    results = BatchLabeler(teacher, poll_interval=0.01).label(photos, progress=False)

    # Unanswered by its batch: rejected for this run (not at full price behind the user's back), not cached.
    r = results.pop(errored[0])
    assert r.status == "rejected" and r.reject_reason.startswith("batch_unanswered: batch batch_0001 ended completed")
    assert teacher.cache.get(errored[0], teacher.key) is None and server.billed[key_of(errored[1])] == 0
    assert {sha: r.element for sha, r in results.items()} == {s: t for s, t in truth.items() if s != errored[0]}
    assert all(r.status == "ok" for r in results.values())
    assert server.endpoint_calls["POST /v1/files"] == 1 and server.endpoint_calls["POST /v1/batches"] == 1
    assert server.billed[key_of(reasked[1])] == 2 and results[reasked[0]].attempts == 2
    assert sum(server.billed.values()) == 10
    report = teacher.report()
    assert report["batches_submitted"] == 1 and report["batch_answers"] == 9 and report["reasks"] == 1
    assert report["batch_unanswered"] == 1 and report["batches_failed"] == []
    assert report["batch_tokens_in"] == server.batch_usage_in
    assert report["tokens_in"] == server.usage_in and report["tokens_out"] == server.usage_out
    sync_in, sync_out = server.usage_in - server.batch_usage_in, server.usage_out - server.batch_usage_out
    expected = (sync_in * 0.15 + sync_out * 0.60 + (server.batch_usage_in * 0.15 + server.batch_usage_out * 0.6) / 2)
    assert report["estimated_cost_usd"] == pytest.approx(expected / 1e6, abs=1e-6)

    # The next run submits the unanswered photo again (nothing was paid for it); the rest is cached.
    again = BatchLabeler(teacher, poll_interval=0.01).label(photos, progress=False)
    assert {sha: r.element for sha, r in again.items()} == truth
    assert [s for s, r in again.items() if not r.cached] == [errored[0]]
    assert server.endpoint_calls["POST /v1/files"] == 2 and server.billed[key_of(errored[1])] == 1


def test_batch_resumes_by_id_instead_of_paying_again(server, teacher_factory, task):
    photos, truth = make_photos(task, 6)
    server.batch_hold = True  # the batch takes longer than this run is willing to wait
    first = teacher_factory()
    with pytest.raises(ElementalError, match=r"batch_0001 .*re-run to resume"):
        BatchLabeler(first, poll_interval=0.01, max_wait=0.2).label(photos, progress=False)
    first.close()
    assert server.endpoint_calls["POST /v1/batches"] == 1

    server.batch_hold = False
    more, more_truth = make_photos(task, 2, seed=7)  # photos not in the running batch get a batch of their own
    second = teacher_factory()
    results = BatchLabeler(second, poll_interval=0.01).label(photos + more, progress=False)
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
    teacher.cache.record_batch_upload(file.id, teacher.key, [s for s, _ in photos])
    client.batches.create(input_file_id=file.id, endpoint=BATCH_ENDPOINT, completion_window="24h")
    client.close()

    results = BatchLabeler(teacher, poll_interval=0.01).label(photos, progress=False)
    assert {s: r.element for s, r in results.items()} == truth
    assert server.endpoint_calls["POST /v1/batches"] == 1 and server.endpoint_calls["POST /v1/files"] == 1
    assert set(server.billed.values()) == {1}


def test_batches_run_together_and_are_consumed_as_they_finish(task, tmp_path):
    photos, truth = make_photos(task, 24)
    with FakeOpenAI(batch_seconds=0.3) as srv, Teacher(task, cache_path=tmp_path / "c.sqlite",
                                                        base_url=srv.base_url) as teacher:
        results = BatchLabeler(teacher, max_photos=5, poll_interval=0.05).label(photos, progress=False)
        report = teacher.report()
    assert {s: r.element for s, r in results.items()} == truth
    assert report["batches_submitted"] == 5 == srv.endpoint_calls["POST /v1/batches"]  # 5+5+5+5+4 photos
    # All five were in flight at once: the last was created before the first one finished.
    assert srv.max_batches_running == 5
    assert set(srv.billed.values()) == {1} and report["requests"] == 0


@pytest.mark.parametrize("fallback", ["none", "sync"])
def test_an_expired_batch_falls_back_to_full_price_only_when_asked(task, tmp_path, fallback, caplog):
    photos, truth = make_photos(task, 6)
    with FakeOpenAI() as srv, Teacher(task, cache_path=tmp_path / "c.sqlite", base_url=srv.base_url) as teacher:
        srv.batch_end_status, srv.batch_answer_first = "expired", 4  # it finished 4 of 6 in its window
        results = BatchLabeler(teacher, poll_interval=0.01, fallback=fallback).label(photos, progress=False)
        report = teacher.report()
    done = [s for s, r in results.items() if r.status == "ok"]
    assert report["batches_failed"] == ["batch_0001 (expired)"] and report["batch_unanswered"] == 2
    assert "labelling them synchronously" in caplog.text  # and what that costs, priced from the price table
    assert all(results[s].element == truth[s] for s in done)
    if fallback == "none":
        assert len(done) == 4 and report["requests"] == 0 and sum(srv.billed.values()) == 4
        left = [r for r in results.values() if r.status == "rejected"]
        assert all(r.reject_reason.startswith("batch_unanswered: batch batch_0001 ended expired") for r in left)
        assert "would cost ≈ $" in caplog.text
    else:
        assert len(done) == 6 and report["requests"] == 2 and sum(srv.billed.values()) == 6


def test_another_model_behind_the_same_name_is_asked_again(task, tmp_path):
    """llama-server names the GGUF it serves in every answer, whatever model name was asked for."""
    photos, truth = make_photos(task, 4)
    cache = tmp_path / "c.sqlite"
    with FakeOpenAI(served_model="qwen-7b-q4.gguf") as srv:
        def run() -> dict:
            with Teacher(task, cache_path=cache, base_url=srv.base_url, model="local") as teacher:
                results = teacher.label_many(photos, progress=False)
                assert {s: r.element for s, r in results.items()} == truth
                return teacher.report()

        first = run()
        assert first["served_models"] == ["qwen-7b-q4.gguf"] and first["probes"] == 0  # nothing cached to check
        srv.served_model = "llava-13b.gguf"  # the user restarts the server with another model, same name
        second = run()
        assert second["probes"] == 1 and second["requests"] == 4 and second["reasked_other_model"] == 4
        assert set(srv.billed.values()) == {2}
        srv.served_model = "qwen-7b-q4.gguf"  # and back: both models' answers are kept
        third = run()
        assert third["probes"] == 1 and third["requests"] == 0 and third["cache_hits"] == 4
    with LabelCache(cache) as c:
        key = TeacherKey("local", prompt_version(task), srv.base_url.split("/")[2])
        assert c.served_models(key) == {"qwen-7b-q4.gguf": 4, "llava-13b.gguf": 4}


def test_a_failed_probe_leaves_the_cached_answers_in_use(task, tmp_path, caplog):
    photos, truth = make_photos(task, 3)
    with FakeOpenAI() as srv:
        with Teacher(task, cache_path=tmp_path / "c.sqlite", base_url=srv.base_url, model="local") as first:
            first.label_many(photos, progress=False)
        srv.probe_fails = True
        with Teacher(task, cache_path=tmp_path / "c.sqlite", base_url=srv.base_url, model="local",
                     max_retries=0) as teacher:
            results = teacher.label_many(photos, progress=False)
            report = teacher.report()
    assert all(r.cached for r in results.values()) and {s: r.element for s, r in results.items()} == truth
    assert srv.probes == 1 and report["requests"] == 0 and report["probes"] == 0
    assert "could not ask" in caplog.text and "cached answers are used as they are" in caplog.text


def test_answers_of_another_host_are_not_reused(task, tmp_path):
    photos, _ = make_photos(task, 3)
    cache = tmp_path / "c.sqlite"
    for _ in range(2):  # two servers, two ports: two teachers, though the model name is the same
        with FakeOpenAI() as srv, Teacher(task, cache_path=cache, base_url=srv.base_url, model="local") as teacher:
            teacher.label_many(photos, progress=False)
            assert teacher.report()["requests"] == 3 and srv.probes == 0


# -- the cache on its own --------------------------------------------------------------------------

def test_label_cache_api(tmp_path):
    path = tmp_path / "deep" / "labels.sqlite"
    k1, k2 = TeacherKey("m", "pv1", "h:1"), TeacherKey("m", "pv2", "h:1")
    with LabelCache(path) as cache:
        cache.put("a" * 64, k1, served_model="m.gguf", status="ok", element="fire", reason="flames", confidence=0.9,
                  attempts=1, tokens_in=120, tokens_out=22)
        cache.put("b" * 64, k1, served_model="m.gguf", status="rejected", reject_reason="off_list: 'plasma'",
                  attempts=3, tokens_in=300, tokens_out=60)
        cache.put("a" * 64, k2, served_model="m.gguf", status="ok", element="water", reason="waves", confidence=0.8)
        assert cache.get("a" * 64, k1).element == "fire"
        assert cache.get("a" * 64, TeacherKey("other-model", "pv1", "h:1")) is None
        assert cache.get("a" * 64, TeacherKey("m", "pv1", "other-host")) is None  # another endpoint's answers
        assert set(cache.get_many(["a" * 64, "b" * 64, "c" * 64], k1)) == {"a" * 64, "b" * 64}
        # Another model behind the same name: its answer is kept beside the first, and each is found by its model.
        cache.put("a" * 64, k1, served_model="other.gguf", status="ok", element="wood", reason="bark", confidence=0.7)
        assert cache.get("a" * 64, k1, served="m.gguf").element == "fire"
        assert cache.get("a" * 64, k1, served="other.gguf").element == "wood"
        assert cache.get("a" * 64, k1, served="third.gguf") is None
        assert cache.served_models(k1) == {"m.gguf": 2, "other.gguf": 1}
        assert cache.stats("m", "pv1") == {"entries": 3, "ok": 2, "rejected": 1, "tokens_in": 420,
                                           "tokens_out": 82, "batches": 0}
        assert [r.element for r in cache.iter_labels(prompt_version="pv2")] == ["water"]
        with pytest.raises(ValueError):
            cache.put("c" * 64, k1, served_model="m", status="maybe")  # type: ignore[arg-type]
        cache.record_batch_upload("file-1", k1, ["a" * 64, "b" * 64])
        assert cache.open_batches(k1)[0].batch_id is None
        assert cache.open_batches(TeacherKey("m", "pv1", "other-host")) == []
        cache.record_batch_created("file-1", "batch_1", "validating")
        cache.set_batch_state("batch_1", "completed", output_file_id="file-2")
        (rec,) = cache.open_batches(k1)
        assert (rec.batch_id, rec.state, rec.output_file_id, rec.shas) == ("batch_1", "completed", "file-2",
                                                                           ("a" * 64, "b" * 64))
        cache.set_batch_state("batch_1", "consumed")
        assert cache.open_batches(k1) == []


def test_a_cache_from_before_hosts_were_recorded_is_migrated_and_stays_readable(tmp_path):
    """Schema 0 (keyed by photo, model and prompt version): its answers came from OpenAI, the default endpoint."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE labels (sha256 TEXT NOT NULL, model TEXT NOT NULL, prompt_version TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('ok', 'rejected')), element TEXT, reason TEXT, confidence REAL,
            reject_reason TEXT, attempts INTEGER NOT NULL, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL,
            via TEXT NOT NULL DEFAULT 'sync', created_at TEXT NOT NULL, PRIMARY KEY (sha256, model, prompt_version));
        CREATE TABLE batches (input_file_id TEXT PRIMARY KEY, batch_id TEXT UNIQUE, model TEXT NOT NULL,
            prompt_version TEXT NOT NULL, state TEXT NOT NULL, output_file_id TEXT, error_file_id TEXT,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
        CREATE TABLE batch_items (input_file_id TEXT NOT NULL REFERENCES batches(input_file_id),
            sha256 TEXT NOT NULL, PRIMARY KEY (input_file_id, sha256));
        INSERT INTO labels VALUES ('aaaa', 'gpt-4o-mini', 'pv1', 'ok', 'fire', 'flames', 0.9, NULL, 1, 100, 20,
                                   'sync', '2026-01-01T00:00:00+00:00');
        INSERT INTO batches VALUES ('file-1', 'batch_1', 'gpt-4o-mini', 'pv1', 'in_progress', NULL, NULL,
                                    '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00');
        INSERT INTO batch_items VALUES ('file-1', 'bbbb');
    """)
    db.close()
    openai_key = TeacherKey("gpt-4o-mini", "pv1", "api.openai.com", legacy=True)
    with LabelCache(path) as cache:
        row = cache.get("aaaa", openai_key, served="gpt-4o-mini-2024-07-18")
        assert (row.element, row.host, row.served_model) == ("fire", "", "")
        assert [b.batch_id for b in cache.open_batches(openai_key)] == ["batch_1"]  # still resumed
        assert cache.get("aaaa", TeacherKey("gpt-4o-mini", "pv1", "127.0.0.1:8080")) is None  # not another host's
    with LabelCache(path) as cache:  # opening it again migrates nothing twice
        assert cache.stats()["entries"] == 1
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (1,)


def test_a_file_that_is_not_a_cache_is_a_clear_error(tmp_path):
    bad = tmp_path / "labels.sqlite"
    bad.write_bytes(b"this is not a database, just some text" * 100)
    with pytest.raises(ElementalError, match="labels.sqlite: not a usable label cache"):
        LabelCache(bad)
