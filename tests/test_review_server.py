"""The review server over HTTP (Starlette's TestClient): the token, the photo route, decisions and undo reaching
reviews.jsonl and train.json / val.json, bad input, a read-only dataset, a dataset prepared again under the
server, two servers on one dataset, and the real `elemental review` process printing its URL and stopping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from elemental.errors import ElementalError
from elemental.fileio import write_json_atomic
from elemental.review import dataset, log, server

TOKEN = "test-token-0123456789"
AUTH = {"X-Review-Token": TOKEN}


@pytest.fixture
def demo_copy(demo_dir, tmp_path) -> Path:
    """A writable copy of the demo's dataset (the session fixture is shared and never written)."""
    return Path(shutil.copytree(demo_dir / "dataset", tmp_path / "dataset"))


def client(dataset_dir: Path, task, run_dir: Path | None = None) -> TestClient:
    return TestClient(server.make_app(dataset_dir, task, run_dir, TOKEN))


def tiny_dataset(folder: Path, labels: dict[str, list[str]]) -> Path:
    """A hand-made dataset: split -> teacher labels, one distinct small JPEG per photo."""
    (folder / "images").mkdir(parents=True)
    n = 0
    for split, elements in labels.items():
        records = []
        for element in elements:
            n += 1
            Image.new("RGB", (32, 32), (n * 20 % 256, n * 50 % 256, n * 90 % 256)).save(folder / f"images/p{n}.jpg")
            records.append({"image_id": f"p{n}", "image_path": f"images/p{n}.jpg", "element": element,
                            "reason": f"looks like {element}", "confidence": 0.5 + n / 100})
        (folder / f"{split}.json").write_text(json.dumps(records))
    return folder


def state(c: TestClient) -> dict:
    res = c.get("/api/state", headers=AUTH)
    assert res.status_code == 200, res.text
    return res.json()


def decide(c: TestClient, digest: str, action: str, label: str | None = None) -> dict:
    res = c.post("/api/decide", headers=AUTH, json={"digest": digest, "action": action, "label": label})
    assert res.status_code == 200, res.text
    return res.json()


def split_records(dataset_dir: Path) -> dict[str, dict[str, dict]]:
    """split -> image_id -> record, as the next `train` reads them."""
    return {s: {r["image_id"]: r for r in json.loads((dataset_dir / f"{s}.json").read_text())}
            for s in ("train", "val")}


def log_lines(dataset_dir: Path) -> list[dict]:
    path = dataset_dir / log.LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# -- the token --------------------------------------------------------------------------------------------------
def test_every_route_needs_the_token(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    c = client(ds, task)
    digest = state(c)["items"][0]["digest"]
    for path in ("/", "/api/state", f"/img/{digest}", "/static/review.js", "/nowhere"):
        for suffix, headers in (("", {}), ("?token=wrong", {}), ("", {"X-Review-Token": "wrong"}),
                                ("?token=" + TOKEN[:-1], {})):
            res = c.get(path + suffix, headers=headers)
            assert res.status_code == 403, (path, suffix, headers)
            assert "token" in res.text and TOKEN not in res.text
    res = c.post("/api/decide", json={"digest": digest, "action": "accept"})
    assert res.status_code == 403 and not (ds / log.LOG_NAME).exists()
    assert c.get("/api/state?token=" + "é" * 5).status_code == 403  # not ASCII: refused, not a crash

    page = c.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert f"static/review.js?token={TOKEN}" in page.text and "__TOKEN__" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
    for name in ("review.js", "review.css"):
        assert c.get(f"/static/{name}?token={TOKEN}").status_code == 200
    for name in ("review.html", "..%2Fserver.py", "nope.js"):
        assert c.get(f"/static/{name}?token={TOKEN}").status_code == 404


# -- photos -----------------------------------------------------------------------------------------------------
def test_images_only_by_digest_and_only_inside_the_dataset(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    secret = tmp_path / "secret.jpg"
    shutil.copy(ds / "images/p2.jpg", secret)
    (ds / "images/p2.jpg").unlink()
    (ds / "images/p2.jpg").symlink_to(secret)  # a record whose JPEG resolves outside the dataset
    c = client(ds, task)
    by_id = {i["image_id"]: i["digest"] for i in state(c)["items"]}

    res = c.get(f"/img/{by_id['p1']}?token={TOKEN}")
    assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
    assert res.content == (ds / "images/p1.jpg").read_bytes()
    assert "max-age" in res.headers["cache-control"]
    assert c.get(f"/img/{by_id['p2']}?token={TOKEN}").status_code == 404
    for bad in ("0" * 64, "..%2Ftrain.json", "..%2F..%2Fsecret.jpg", "images%2Fp1.jpg", "%2Fetc%2Fpasswd"):
        res = c.get(f"/img/{bad}?token={TOKEN}")
        assert res.status_code == 404, bad
        assert res.content[:2] != b"\xff\xd8"  # no JPEG under any of these names


# -- decisions ----------------------------------------------------------------------------------------------------
def test_decide_and_undo_reach_the_log_and_the_splits(demo_copy, demo_dir, task):
    c = client(demo_copy, task, demo_dir / "run")
    items = state(c)["items"]
    val = [i for i in items if i["split"] == "val"]
    train = [i for i in items if i["split"] == "train"]
    assert val and items[0]["split"] == "val" and items[0]["student"]  # val photos have the run's probabilities
    relabel, accept, drop = val[0], val[1], train[0]
    other = next(label for label in task.labels if label != relabel["teacher"])

    answer = decide(c, relabel["digest"], "relabel", other)
    assert answer["decision"]["action"] == "relabel" and answer["decision"]["new"] == other
    assert answer["counts"] == {"total": 300, "reviewed": 1, "changed": 1, "dropped": 0}
    decide(c, accept["digest"], "relabel", accept["teacher"])  # the teacher's own label: an accept
    decide(c, drop["digest"], "drop")

    lines = log_lines(demo_copy)
    assert [(d["digest"], d["action"], d["old"], d["new"]) for d in lines] == [
        (relabel["digest"], "relabel", relabel["teacher"], other),
        (accept["digest"], "accept", accept["teacher"], accept["teacher"]),
        (drop["digest"], "drop", drop["teacher"], None)]
    assert [d["image_id"] for d in lines] == [relabel["image_id"], accept["image_id"], drop["image_id"]]
    splits = split_records(demo_copy)
    r = splits["val"][relabel["image_id"]]
    assert (r["element"], r["teacher_element"], r["review"]) == (other, relabel["teacher"], "relabel")
    a = splits["val"][accept["image_id"]]
    assert (a["element"], a["teacher_element"], a["review"]) == (accept["teacher"], accept["teacher"], "accept")
    assert drop["image_id"] not in splits["train"] and len(splits["train"]) == 269 and len(splits["val"]) == 30
    assert (demo_copy / drop["image_path"]).is_file()  # the JPEG stays: an undo brings the photo back
    meta = json.loads((demo_copy / "metadata.json").read_text())
    assert {k: meta["reviews"][k] for k in ("reviewed", "changed", "dropped")} == {"reviewed": 3, "changed": 1,
                                                                                   "dropped": 1}
    assert meta["n_train"] == 269

    s = {i["digest"]: i for i in state(c)["items"]}
    assert s[relabel["digest"]]["decision"]["new"] == other and s[drop["digest"]]["decision"]["action"] == "drop"
    assert s[relabel["digest"]]["teacher"] == relabel["teacher"]  # the page always shows the teacher's label
    assert state(c)["notice"] is None and state(c)["generation"] == 0  # its own first apply is no "change on disk"

    for item in (relabel, drop):
        res = c.post("/api/undo", headers=AUTH, json={"digest": item["digest"]})
        assert res.status_code == 200 and res.json()["decision"] is None
    assert [d["action"] for d in log_lines(demo_copy)][-2:] == ["undo", "undo"]
    splits = split_records(demo_copy)
    assert splits["val"][relabel["image_id"]]["element"] == relabel["teacher"]
    assert "teacher_element" not in splits["val"][relabel["image_id"]]
    assert drop["image_id"] in splits["train"] and len(splits["train"]) == 270
    assert state(c)["counts"] == {"total": 300, "reviewed": 1, "changed": 0, "dropped": 0}


def test_undo_pops_one_level_at_a_time(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    c = client(ds, task)
    digest = next(i["digest"] for i in state(c)["items"] if i["image_id"] == "p1")
    decide(c, digest, "relabel", "fire")
    decide(c, digest, "relabel", "metal")
    assert c.post("/api/undo", headers=AUTH, json={"digest": digest}).json()["decision"]["new"] == "fire"
    assert split_records(ds)["train"]["p1"]["element"] == "fire"
    assert c.post("/api/undo", headers=AUTH, json={"digest": digest}).json()["decision"] is None
    res = c.post("/api/undo", headers=AUTH, json={"digest": digest})
    assert res.status_code == 400 and "digest" in res.json()["error"] and "no decision" in res.json()["error"]


@pytest.mark.parametrize(("body", "field"), [
    (b"not json", "body"), (b"[1, 2]", "body"), (b"{}", "digest"), (b'{"digest": 5, "action": "accept"}', "digest"),
    (b'{"digest": "ffff", "action": "accept"}', "digest"), (b'{"digest": "@", "action": "burn"}', "action"),
    (b'{"digest": "@", "action": "relabel"}', "label"), (b'{"digest": "@", "action": "relabel", "label": "plasma"}',
                                                         "label"),
    (b'{"digest": "@"}', "action"),
])
def test_bad_input_is_400_naming_the_field(tmp_path, task, body, field):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    c = client(ds, task)
    digest = state(c)["items"][0]["digest"]
    res = c.post("/api/decide", headers=AUTH, content=body.replace(b"@", digest.encode()))
    assert res.status_code == 400, res.text
    assert res.json()["error"].startswith(f"{field}:"), res.json()
    assert not (ds / log.LOG_NAME).exists()
    res = c.post("/api/undo", headers=AUTH, content=b'{"digest": "' + b"0" * 64 + b'"}')
    assert res.status_code == 400 and res.json()["error"].startswith("digest:")


def test_dropping_the_last_photo_of_a_split_is_refused_and_undone(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    c = client(ds, task)
    only_val = next(i["digest"] for i in state(c)["items"] if i["split"] == "val")
    res = c.post("/api/decide", headers=AUTH, json={"digest": only_val, "action": "drop"})
    assert res.status_code == 409 and "every val photo is dropped" in res.json()["error"]
    assert [d["action"] for d in log_lines(ds)] == ["drop", "undo"]  # the log and the splits agree
    assert list(split_records(ds)["val"]) == ["p3"]
    assert next(i for i in state(c)["items"] if i["digest"] == only_val)["decision"] is None


def test_start_applies_decisions_a_killed_server_left(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    digest = dataset.photo_digest(dataset.photos(ds, task)[0].record, ds)
    with log.locked(ds):  # appended, then killed before `apply`
        log.append(ds, log.Decision(digest, "p1", "relabel", "water", "wood", log.now()))
    assert split_records(ds)["train"]["p1"]["element"] == "water"
    c = client(ds, task)
    assert split_records(ds)["train"]["p1"]["element"] == "wood"
    assert state(c)["counts"]["changed"] == 1


# -- a dataset that cannot be written -----------------------------------------------------------------------------
def test_read_only_folder_shows_a_banner_and_refuses_with_503(tmp_path, task, monkeypatch):
    """Tests run as root, where chmod 0o555 does not stop writes: the banner's check (os.access) is made to say
    what it says for a person on a read-only folder."""
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    c = client(ds, task)
    digest = state(c)["items"][0]["digest"]
    before = (ds / "train.json").read_bytes()
    real_access = os.access
    monkeypatch.setattr(server.os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode)
                        if Path(p) == ds else real_access(p, mode))
    s = state(c)
    assert "read-only" in s["warning"] and str(ds) in s["warning"]
    res = c.post("/api/decide", headers=AUTH, json={"digest": digest, "action": "accept"})
    assert res.status_code == 503 and "read-only" in res.json()["error"]
    assert not (ds / log.LOG_NAME).exists() and (ds / "train.json").read_bytes() == before


def test_log_that_cannot_be_appended_to_is_503_and_keeps_every_line(tmp_path, task):
    """What a read-only folder does even for root: the append fails (here the log path is a folder)."""
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    c = client(ds, task)
    digest = state(c)["items"][0]["digest"]
    decide(c, digest, "relabel", "metal")
    state(c)  # the server takes in the teacher_labels.json its first decision wrote, while the log is readable
    saved = (ds / log.LOG_NAME).read_bytes()
    splits = (ds / "train.json").read_bytes()
    (ds / log.LOG_NAME).rename(ds / "saved.jsonl")
    (ds / log.LOG_NAME).mkdir()
    res = c.post("/api/decide", headers=AUTH, json={"digest": digest, "action": "accept"})
    assert res.status_code == 503
    assert res.json()["error"].startswith("not saved: cannot write") and log.LOG_NAME in res.json()["error"]
    assert (ds / "train.json").read_bytes() == splits
    (ds / log.LOG_NAME).rmdir()
    (ds / "saved.jsonl").rename(ds / log.LOG_NAME)
    assert (ds / log.LOG_NAME).read_bytes() == saved
    assert state(c)["counts"]["changed"] == 1  # the server goes on once the log is back


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555; the two tests above cover it")
def test_chmod_read_only_folder(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    c = client(ds, task)
    digest = state(c)["items"][0]["digest"]
    ds.chmod(0o555)
    try:
        assert "read-only" in state(c)["warning"]
        res = c.post("/api/decide", headers=AUTH, json={"digest": digest, "action": "accept"})
        assert res.status_code == 503 and "read-only" in res.json()["error"]
    finally:
        ds.chmod(0o755)


# -- the dataset changing under the server ---------------------------------------------------------------------------
def test_dataset_prepared_again_reloads_the_queue_with_a_notice(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire", "wood"], "val": ["land"]})
    c = client(ds, task)
    first = state(c)
    assert first["notice"] is None and len(first["items"]) == 4
    p1 = next(i["digest"] for i in first["items"] if i["image_id"] == "p1")
    p2 = next(i["digest"] for i in first["items"] if i["image_id"] == "p2")
    decide(c, p1, "relabel", "metal")  # the first decision writes teacher_labels.json: not a change to report
    assert state(c)["notice"] is None and state(c)["generation"] == 0

    teacher = json.loads((ds / dataset.TEACHER_FILE).read_text())  # `prepare` again: p2 gone, p3 relabelled
    teacher["train"] = [r for r in teacher["train"] if r["image_id"] != "p2"]
    teacher["train"][-1]["element"] = "metal"
    write_json_atomic(ds / dataset.TEACHER_FILE, teacher)
    s = state(c)
    assert s["generation"] == 1 and "changed on disk" in s["notice"]
    assert [i["image_id"] for i in s["items"] if i["split"] == "train"] == ["p1", "p3"]
    assert next(i for i in s["items"] if i["image_id"] == "p3")["teacher"] == "metal"
    assert next(i for i in s["items"] if i["image_id"] == "p1")["decision"]["new"] == "metal"  # the log is kept
    res = c.post("/api/decide", headers=AUTH, json={"digest": p2, "action": "accept"})
    assert res.status_code == 400 and "no photo" in res.json()["error"]
    assert decide(c, p1, "accept")["generation"] == 1
    assert list(split_records(ds)["train"]) == ["p1", "p3"]  # the next decision derives the splits anew


def test_dataset_folder_replaced_or_gone(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    c = client(ds, task)
    digest = state(c)["items"][0]["digest"]
    fresh = tiny_dataset(tmp_path / "fresh", {"train": ["water", "fire", "wood"], "val": ["land"]})
    ds.rename(tmp_path / "old")
    res = c.get("/api/state", headers=AUTH)
    assert res.status_code == 410 and "is gone" in res.json()["error"] and str(ds) in res.json()["error"]
    res = c.post("/api/decide", headers=AUTH, json={"digest": digest, "action": "accept"})
    assert res.status_code == 410
    fresh.rename(ds)  # `prepare` replaces the folder in one rename
    s = state(c)
    assert len(s["items"]) == 4 and "changed on disk" in s["notice"]


# -- two writers ----------------------------------------------------------------------------------------------------
def test_two_servers_interleaving_lose_no_decision(demo_copy, task):
    one, two = client(demo_copy, task), client(demo_copy, task)
    items = state(one)["items"]
    shared = items[:5]
    for item in shared:  # both decide the same photos, alternately: the later line wins
        decide(one, item["digest"], "accept")
        decide(two, item["digest"], "relabel", next(lb for lb in task.labels if lb != item["teacher"]))

    def burst(c: TestClient, batch: list[dict]) -> None:
        for item in batch:
            decide(c, item["digest"], "drop" if item["split"] == "train" and item["image_id"] < "4" else "accept")

    batches = items[5:25], items[25:45]
    threads = [threading.Thread(target=burst, args=(c, b)) for c, b in zip((one, two), batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    lines = log_lines(demo_copy)
    assert len(lines) == 10 + 40
    assert {d["digest"] for d in lines} == {i["digest"] for i in items[:45]}
    for c in (one, two):
        s = {i["digest"]: i for i in state(c)["items"]}
        for item in shared:
            assert s[item["digest"]]["decision"]["action"] == "relabel"
        assert sum(i["decision"] is not None for i in s.values()) == 45
    splits = split_records(demo_copy)
    dropped = [i for i in items[5:45] if i["split"] == "train" and i["image_id"] < "4"]
    assert len(splits["train"]) + len(splits["val"]) == 300 - len(dropped)
    assert all(splits["val" if i["split"] == "val" else "train"][i["image_id"]]["review"] == "relabel"
               for i in shared)


# -- the real process -----------------------------------------------------------------------------------------------
def test_review_command_prints_one_url_line_and_stops_on_sigterm(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    proc = subprocess.Popen([sys.executable, "-m", "elemental", "review", str(ds), "--no-browser", "--port", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("review: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[1]
        token = url.split("?token=")[1]
        request = urllib.request.Request(url.split("?")[0] + "api/state", headers={"X-Review-Token": token})
        with urllib.request.urlopen(request, timeout=10) as res:
            assert len(json.load(res)["items"]) == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert token not in out + err and "Traceback" not in err
    assert out.startswith("review: stopped")


def test_port_in_use_is_one_clear_error(tmp_path, task):
    ds = tiny_dataset(tmp_path / "ds", {"train": ["water", "fire"], "val": ["land"]})
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(ElementalError, match=f"cannot listen on 127.0.0.1:{port}"):
            server.serve(ds, task, None, port=port, open_browser=False, say=lambda _: None)
