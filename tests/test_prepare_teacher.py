"""`elemental prepare` with the teacher, through the real CLI and a loopback OpenAI-compatible server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_openai import FakeOpenAI

from elemental.synthetic import synthetic_photo, write_synthetic_photos

KEY = "sk-test-SECRET-prepare-789"
LABELS = ["water", "land", "fire", "wood", "metal"]


def _flat_folder(root: Path, per_class: int = 8) -> Path:
    """Synthetic photos of every class in one flat folder: the teacher must label them."""
    tree = write_synthetic_photos(root / "tree", LABELS, per_class, seed=5)
    flat = root / "flat"
    flat.mkdir()
    for p in sorted(tree.rglob("*.*")):
        p.rename(flat / p.name)
    return flat


def _prepare(cwd: Path, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    if key:
        env["OPENAI_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "elemental", "prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def server():
    with FakeOpenAI(expected_key=KEY) as s:
        yield s


def test_teacher_labels_a_flat_folder_and_never_pays_twice(tmp_path, server):
    flat = _flat_folder(tmp_path)
    args = ["--source", f"folder:{flat}", "--output_dir", "ds", "--labeler-base-url", server.base_url,
            "--label-cache", "cache/labels.sqlite", "--num_workers", "4"]
    res = _prepare(tmp_path, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["n_train"] + meta["n_val"] == 40
    records = json.loads((tmp_path / "ds" / "train.json").read_text())
    # The teacher's answer is recorded with its reason, confidence and the teacher + prompt version.
    assert all(r["labeler"].startswith("gpt-4o-mini@") and r["reason"] and 0 <= r["confidence"] <= 1
               for r in records)
    # The photo's own label (its file name, water_0003.jpg) agrees with the teacher's.
    agree = sum(r["element"] == r["source_id"].split("_")[0] for r in records)
    assert agree >= 0.9 * len(records)
    teacher = meta["teacher"]
    assert teacher["requests"] == 40 and teacher["tokens_in"] > 0 and teacher["estimated_cost_usd"] > 0
    assert server.total_billed() == 40
    assert "teacher gpt-4o-mini: 40 requests" in res.stdout

    # A re-run pays nothing: every answer comes from the cache.
    res = _prepare(tmp_path, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert server.total_billed() == 40
    assert json.loads((tmp_path / "ds" / "metadata.json").read_text())["teacher"]["cache_hits"] == 40

    # The key is in no file written: dataset, cache, anything under the work folder.
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p


def test_relabel_only_refilters_from_the_cache_without_the_teacher(tmp_path, server):
    flat = _flat_folder(tmp_path, per_class=4)
    common = ["--source", f"folder:{flat}", "--label-cache", "cache/labels.sqlite"]
    # Too strict a threshold: nothing is kept, but every paid answer is in the cache.
    res = _prepare(tmp_path, *common, "--output_dir", "ds", "--labeler-base-url", server.base_url,
                   "--min_confidence", "0.95")
    assert res.returncode == 2 and "low_confidence" in res.stderr
    billed = server.total_billed()
    assert billed == 20
    # No key, and the endpoint is never called: --relabel-only needs neither.
    calls = sum(server.endpoint_calls.values())
    res = _prepare(tmp_path, *common, "--output_dir", "ds", "--relabel-only", "--min_confidence", "0.7",
                   "--labeler-base-url", server.base_url, key=None)
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert server.total_billed() == billed and sum(server.endpoint_calls.values()) == calls
    assert meta["n_train"] + meta["n_val"] == 20 and meta["teacher"] is None


def test_teacher_rejects_are_recorded_and_reported(tmp_path, server):
    flat = _flat_folder(tmp_path, per_class=4)
    server.default = ["off_list"]  # every answer invalid: retried, then rejected with the reason
    res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", "--labeler-base-url",
                   server.base_url, "--label-cache", "c.sqlite")
    assert res.returncode == 2
    assert "no photos kept" in res.stderr and not (tmp_path / "ds").exists()
    assert KEY not in res.stderr


def test_missing_api_key_is_one_line(tmp_path):
    flat = _flat_folder(tmp_path, per_class=2)
    res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", "--label-cache", "c.sqlite",
                   key=None)
    assert res.returncode == 2 and "OPENAI_API_KEY is not set" in res.stderr


def _photo_unsplash():
    """The Unsplash fake of test_sources, serving a distinct synthetic photo per id (flat-colour
    images would all be near duplicates), started on loopback."""
    from test_sources import FakeUnsplash, Server

    class PhotoUnsplash(FakeUnsplash):
        def app(self, req):
            if req.path.startswith("/img/"):
                self.image_widths.append(req.query.get("w", ""))
                pid = req.path.rsplit("/", 1)[1].removesuffix(".jpg")
                seed = int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16)
                buf = io.BytesIO()
                synthetic_photo(LABELS[seed % 5], np.random.default_rng(seed), size=(320, 240)).save(buf, "JPEG")
                return 200, {"Content-Type": "image/jpeg"}, buf.getvalue()
            return super().app(req)

    fake = PhotoUnsplash()
    web = Server(fake.app)
    fake.base = web.url
    return fake, web


def _prepare_unsplash(tmp_path, server, fake, *extra, source="unsplash"):
    from test_sources import KEY as UNSPLASH_KEY

    os.environ["UNSPLASH_ACCESS_KEY"] = UNSPLASH_KEY
    try:
        return _prepare(tmp_path, "--source", source, "--query", "ocean", "--query", "forest",
                        "--unsplash-api-url", fake.base, "--output_dir", "ds", "--labeler-base-url",
                        server.base_url, "--label-cache", "c.sqlite", "--min_confidence", "0.5",
                        "--allow-private-urls", *extra)  # the test servers are on loopback
    finally:
        os.environ.pop("UNSPLASH_ACCESS_KEY", None)


def _kept(tmp_path) -> list[dict]:
    return [r for split in ("train", "val") for r in json.loads((tmp_path / "ds" / f"{split}.json").read_text())]


def test_unsplash_photos_labelled_and_tracked_once_per_kept_photo(tmp_path, server):
    from test_sources import KEY as UNSPLASH_KEY

    fake, web = _photo_unsplash()
    try:
        res = _prepare_unsplash(tmp_path, server, fake, "--num_images", "12")
    finally:
        web.stop()
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Unsplash" in res.stdout  # the terms note is printed
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    records = _kept(tmp_path)
    kept = {r["source_id"] for r in records}
    assert len(kept) == meta["n_train"] + meta["n_val"] <= 12
    assert dict(fake.tracked) == {pid: 1 for pid in kept}  # exactly the kept photos, once each
    assert all(r["source"] == "unsplash" and r["attribution"] for r in records)
    assert meta["unsplash_terms"]
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert UNSPLASH_KEY.encode() not in p.read_bytes() and KEY.encode() not in p.read_bytes(), p


@pytest.mark.parametrize("spelling", ["unsplash", "Unsplash"])  # source kinds are case-insensitive
def test_unsplash_rate_limit_stop_then_rerun_continues(tmp_path, server, spelling):
    fake, web = _photo_unsplash()
    try:
        fake.budget = 8  # the API's remaining calls: the first run stops cleanly with what it has
        first = _prepare_unsplash(tmp_path, server, fake, "--num_images", "20", source=spelling)
        assert first.returncode == 0, first.stderr[-2000:]
        assert "Unsplash's API terms" in first.stdout
        before = {r["source_id"] for r in _kept(tmp_path)}
        assert 2 <= len(before) < 20
        meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
        assert meta["notes"] and meta["complete"] is False and meta["unsplash_terms"]  # says it stopped early
        fake.budget = 100  # the limit resets: a re-run continues instead of starting over
        second = _prepare_unsplash(tmp_path, server, fake, "--num_images", "20", source=spelling)
        assert second.returncode == 0, second.stderr[-2000:]
    finally:
        web.stop()
    after = {r["source_id"] for r in _kept(tmp_path)}
    assert before < after and len(after) == 20
    assert all(n == 1 for n in fake.tracked.values())  # no photo tracked twice across the runs
    assert server.total_billed() == len(set(server.billed))  # and no photo labelled twice


def test_per_class_target_stops_paying_once_every_class_is_full(tmp_path, server):
    flat = _flat_folder(tmp_path, per_class=30)
    res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", "--labeler-base-url",
                   server.base_url, "--label-cache", "c.sqlite", "--per_class_target", "3", "--num_workers", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["counts"]["total"] == {label: 3 for label in LABELS}
    assert server.total_billed() < 150  # labelled in chunks, stopped when every class had 3


def test_batch_mode_through_prepare(tmp_path, server):
    flat = _flat_folder(tmp_path, per_class=3)
    res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", "--labeler-base-url",
                   server.base_url, "--label-cache", "c.sqlite", "--batch")
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["teacher"]["batches_submitted"] >= 1 and meta["n_train"] + meta["n_val"] == 15


def test_run_runs_again_a_prepare_whose_api_source_stopped_early(tmp_path, server):
    """`elemental run` must not call a rate-limited prepare up to date: the re-run it recommends must happen."""
    from test_sources import KEY as UNSPLASH_KEY

    fake, web = _photo_unsplash()
    (tmp_path / "run.toml").write_text(
        'stages = ["prepare"]\n[prepare]\nsources = ["unsplash"]\nqueries = ["ocean", "forest"]\noutput_dir = "ds"\n'
        f'num_images = 20\nmin_confidence = 0.5\nlabeler_base_url = "{server.base_url}"\nlabel_cache = "c.sqlite"\n'
        f'unsplash_api_url = "{fake.base}"\nallow_private_urls = true\n[train]\noutput_dir = "run"\n')
    env = {**os.environ, "OPENAI_API_KEY": KEY, "UNSPLASH_ACCESS_KEY": UNSPLASH_KEY}

    def run() -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "elemental", "run", "run.toml"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res

    try:
        fake.budget = 8
        run()
        fake.budget = 100
        second = run()
        third = run()
    finally:
        web.stop()
    assert "prepare: running (an API source stopped early last time" in second.stdout
    assert len(_kept(tmp_path)) == 20
    assert "prepare: up to date, skipped" in third.stdout  # complete now: nothing more to collect


def test_api_key_on_the_command_line_is_warned_about_and_never_shown(tmp_path, server):
    flat = _flat_folder(tmp_path, per_class=2)
    res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", "--labeler-base-url",
                   server.base_url, "--label-cache", "c.sqlite", "--openai_api_key", KEY, key=None)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--openai-api-key leaves the key in the process list and your shell history" in res.stderr
    assert KEY not in res.stderr and KEY not in res.stdout


def test_batch_waves_keep_every_batch_in_flight_together(tmp_path):
    """400 photos, 50 per batch: one wave of 8 batches submitted before any finishes, each photo billed once."""
    flat = _flat_folder(tmp_path, per_class=80)
    with FakeOpenAI(expected_key=KEY, batch_seconds=1.0) as srv:
        res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", "--labeler-base-url",
                       srv.base_url, "--label-cache", "c.sqlite", "--batch", "--batch-max-photos", "50",
                       "--batch-poll-interval", "0.1")
        assert res.returncode == 0, res.stderr[-2000:]
        assert srv.endpoint_calls["POST /v1/batches"] == 8 and srv.max_batches_running == 8
        assert len(srv.billed) == 400 and set(srv.billed.values()) == {1}
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["n_train"] + meta["n_val"] == 400 and meta["labels_beyond_target"] == 0
    assert "8 batches submitted, 400 batch answers, 0 labels bought beyond the target" in res.stdout


def test_batch_waves_stop_when_the_targets_are_met(tmp_path):
    flat = _flat_folder(tmp_path, per_class=40)
    for p in flat.iterdir():  # camera-style names: the classes come mixed, not sorted by name
        p.rename(flat / f"IMG_{hashlib.sha256(p.name.encode()).hexdigest()[:8]}{p.suffix}")
    with FakeOpenAI(expected_key=KEY, batch_seconds=0.2) as srv:
        res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", "--labeler-base-url",
                       srv.base_url, "--label-cache", "c.sqlite", "--batch", "--batch-max-photos", "25",
                       "--batch-poll-interval", "0.05", "--per_class_target", "6")
        assert res.returncode == 0, res.stderr[-2000:]
        billed = srv.total_billed()
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["counts"]["total"] == {label: 6 for label in LABELS}
    assert billed < 200 and meta["dropped"].get("not_needed", 0) > 0  # it stopped buying before the folder ended
    # Every label bought that the dataset does not keep is one bought beyond the target, and says so.
    assert meta["labels_beyond_target"] == billed - 30
    assert f"{billed - 30} labels bought beyond the target" in res.stdout


def test_a_killed_batch_run_resumes_its_batches_and_submits_none_twice(tmp_path):
    flat = _flat_folder(tmp_path, per_class=12)
    args = ["--source", f"folder:{flat}", "--output_dir", "ds", "--label-cache", "c.sqlite", "--batch",
            "--batch-max-photos", "20", "--batch-poll-interval", "0.05"]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    with FakeOpenAI(expected_key=KEY) as srv:
        srv.batch_hold = True  # the batches run longer than this process lives
        proc = subprocess.Popen([sys.executable, "-m", "elemental", "prepare", *args, "--labeler-base-url",
                                 srv.base_url], cwd=tmp_path, env={**env, "OPENAI_API_KEY": KEY},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # until it polls all three batches, twice
                with srv.lock:
                    if len(srv.batches) == 3 and min(b["_polls"] for b in srv.batches.values()) >= 2:
                        break
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
        assert srv.endpoint_calls["POST /v1/batches"] == 3 and not (tmp_path / "ds").exists()
        srv.batch_hold = False
        res = _prepare(tmp_path, *args, "--labeler-base-url", srv.base_url)
        assert res.returncode == 0, res.stderr[-2000:]
        assert srv.endpoint_calls["POST /v1/batches"] == 3 and srv.endpoint_calls["POST /v1/files"] == 3
        assert len(srv.billed) == 60 and set(srv.billed.values()) == {1}
    assert json.loads((tmp_path / "ds" / "metadata.json").read_text())["n_train"] > 0


def test_estimate_prints_the_cost_sends_nothing_and_matches_what_the_run_bills(tmp_path, server):
    flat = _flat_folder(tmp_path, per_class=12)  # 60 photos
    first = tmp_path / "first"
    first.mkdir()
    for p in sorted(flat.iterdir())[::3]:  # 20 of them labelled earlier: the cache's answers calibrate tokens
        (first / p.name).write_bytes(p.read_bytes())
    common = ["--label-cache", "c.sqlite", "--labeler-base-url", server.base_url]
    res = _prepare(tmp_path, "--source", f"folder:{first}", "--output_dir", "ds1", *common)
    assert res.returncode == 0, res.stderr[-2000:]
    billed_in, billed_out, photos_billed = server.usage_in, server.usage_out, len(server.billed)

    res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", *common, "--estimate")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(server.billed) == photos_billed and server.probes == 0  # nothing was sent
    assert not (tmp_path / "ds").exists()
    out = res.stdout
    assert "already answered (label cache): 20; not answered: 40; to label for the targets: 40" in out
    assert "mean of 20 cached answers" in out and "nothing was sent to the teacher" in out
    tokens_in = int(out.split("expected tokens: ")[1].split(" in")[0].replace(",", ""))
    sync, batch = (float(x.split(" ")[0]) for x in out.split("expected cost: $")[1].split("$")[:2])
    assert batch == pytest.approx(sync / 2, abs=1e-4)

    res = _prepare(tmp_path, "--source", f"folder:{flat}", "--output_dir", "ds", *common)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(server.billed) == photos_billed + 40  # the photos the estimate counted, no more
    run_in, run_out = server.usage_in - billed_in - 12, server.usage_out - billed_out - 1  # less the probe
    assert tokens_in == pytest.approx(run_in, rel=0.2)
    assert sync == pytest.approx((run_in * 0.15 + run_out * 0.60) / 1e6, rel=0.2)


def test_batch_max_wait_and_fallback_from_the_command_line(tmp_path):
    flat = _flat_folder(tmp_path, per_class=2)
    args = ["--source", f"folder:{flat}", "--output_dir", "ds", "--label-cache", "c.sqlite", "--batch",
            "--batch-poll-interval", "0.05", "--min_confidence", "0"]
    with FakeOpenAI(expected_key=KEY) as srv:
        srv.batch_hold = True
        res = _prepare(tmp_path, *args, "--labeler-base-url", srv.base_url, "--batch-max-wait", "0.5")
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
        assert "batch_0001 (in_progress) not finished after 0.5 s (--batch-max-wait)" in errors[0]
        assert "re-run to resume polling" in errors[0]
        # The batch then expires having answered 6 of 10; with --batch-fallback sync the rest go at full price.
        srv.batch_hold, srv.batch_end_status, srv.batch_answer_first = False, "expired", 6
        res = _prepare(tmp_path, *args, "--labeler-base-url", srv.base_url, "--batch-fallback", "sync")
        assert res.returncode == 0, res.stderr[-2000:]
        assert srv.endpoint_calls["POST /v1/batches"] == 1 and srv.total_billed() == 10
    teacher = json.loads((tmp_path / "ds" / "metadata.json").read_text())["teacher"]
    assert teacher["batches_failed"] == ["batch_0001 (expired)"] and teacher["batch_unanswered"] == 4
    assert teacher["batch_answers"] == 6 and teacher["requests"] == 4
    assert "4 photos left unanswered by batches batch_0001 (expired) (labeling them synchronously: ≈ $" in res.stdout
