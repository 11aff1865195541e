"""A real local teacher: llama.cpp's own `llama-server`, built from the same sdist, serving the demo model.

`make llama-server` builds it (cached like the wheel; `make test` passes its path as ELEMENTAL_LLAMA_SERVER).
It serves the demo export's text GGUF with its mmproj on 127.0.0.1, and `elemental prepare` labels a flat
folder through it, as a user with no API key would: the request shape must be one a real server takes
(system role, data-URL image, strict json_schema, max_tokens), every photo must end labeled or rejected
with a reason, and a second run must ask the server nothing. The tiny demo model is no good teacher (its
answers are valid JSON by grammar but say little), which is what makes this a test of the plumbing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from elemental.llama_build import server_key
from elemental.synthetic import write_synthetic_photos

pytestmark = pytest.mark.slow
LABELS = ["water", "land", "fire", "wood", "metal"]


def llama_server_binary() -> Path:
    given = os.environ.get("ELEMENTAL_LLAMA_SERVER")
    if given:
        path = Path(given)
    else:
        from elemental.llama_build import detect

        path = Path.home() / ".cache/elemental/llama-server" / server_key(detect("0.3.36")[0]) / "llama-server"
    if not path.is_file():
        pytest.fail(f"llama-server not built at {path}: run `make llama-server` (make test builds it)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_files(demo_dir: Path) -> dict[str, Path]:
    manifest = json.loads((demo_dir / "gguf" / "manifest.json").read_text())
    return {f["role"]: demo_dir / "gguf" / name for name, f in manifest["files"].items()}


@pytest.fixture(scope="module")
def teacher_url(demo_dir, tmp_path_factory):
    """llama-server on 127.0.0.1 with the demo's Q8_0 text model and F16 mmproj; its /v1 URL."""
    files = _demo_files(demo_dir)
    with _serving(files["text"], files["mmproj"], _free_port(), tmp_path_factory.mktemp("server")) as url:
        yield url


@contextlib.contextmanager
def _serving(text: Path, mmproj: Path, port: int, logs: Path) -> Iterator[str]:
    """llama-server serving `text` + `mmproj` on 127.0.0.1:`port` until the block ends; yields its /v1 URL."""
    log = (logs / f"llama-server-{text.name}.log").open("w")
    proc = subprocess.Popen(
        [str(llama_server_binary()), "-m", str(text), "--mmproj", str(mmproj),
         "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "-np", "2", "--threads", "2", "--no-webui"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"llama-server did not start: {Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _prepare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}  # no key at all
    return subprocess.run([sys.executable, "-m", "elemental", "prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_prepare_labels_a_flat_folder_through_a_real_llama_server(teacher_url, demo_dir, tmp_path):
    tree = write_synthetic_photos(tmp_path / "tree", LABELS, 4, seed=1)  # labelled by folder: a dataset for sure
    flat = tmp_path / "flat"  # one flat folder: the teacher must label these
    flat.mkdir()
    for p in sorted(write_synthetic_photos(tmp_path / "more", LABELS, 2, seed=9).rglob("*.*")):
        p.rename(flat / p.name)
    flat_files = sorted(flat.iterdir())
    args = ["--source", f"folder:{tree}", "--source", f"folder:{flat}", "--output_dir", "ds",
            "--labeler-base-url", teacher_url, "--labeler-model", "demo", "--label-cache", "c.sqlite",
            "--min_confidence", "0", "--num_workers", "2"]
    first = _prepare(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    records = [r for split in ("train", "val") for r in json.loads((tmp_path / f"ds/{split}.json").read_text())]
    kept = {r["source_id"]: r for r in records}
    rejected = {r["source_id"]: r for r in meta["rejected"]}
    dupes = {d["source_id"] for d in meta["duplicates"]}
    asked = [p.name for p in flat_files if p.name not in dupes]  # a flat photo's id is its name
    assert len(asked) >= 5
    for sid in asked:  # each one labeled by the teacher, or rejected with the teacher's reason
        assert (sid in kept) != (sid in rejected), sid
        if sid in kept:
            r = kept[sid]
            assert r["labeler"].startswith("demo@") and r["element"] in LABELS and r["reason"], r
        else:
            assert rejected[sid]["kind"] == "teacher" and rejected[sid]["reason"], rejected[sid]
    teacher = meta["teacher"]
    assert teacher["base_url_host"].startswith("127.0.0.1") and teacher["requests"] >= len(asked)
    assert teacher["labeled"] + teacher["rejected"] == len(asked)
    print(f"llama-server teacher: {teacher['labeled']} of {len(asked)} photos labeled, {teacher['rejected']} rejected "
          f"{teacher['rejects_by_reason']}, {teacher['requests']} requests, {teacher['reasks']} re-asks, "
          f"params {teacher['request_params']}, adapted {teacher['adapted_to_endpoint']}")

    # Every answer the server gave, good or rejected, is cached and not asked again; a photo the server failed on
    # (5xx, timeout: nothing billed) is asked again.
    second = _prepare(tmp_path, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "ds" / "metadata.json").read_text())["teacher"]
    server_errors = teacher["rejects_by_reason"].get("server_error", 0)
    assert again["cache_hits"] == teacher["labeled"] + teacher["rejected"] - server_errors
    # Before using the cache it asked the server, once, which model it serves: llama-server names the GGUF file.
    assert teacher["served_models"] == again["served_models"]
    assert [Path(m).name for m in again["served_models"]] == [_demo_files(demo_dir)["text"].name]
    assert teacher["probes"] == 0 and again["probes"] == 1


def test_another_gguf_served_under_the_same_name_is_asked_again(demo_dir, tmp_path):
    """The README's local-teacher recipe: `--labeler-model local`, whatever GGUF the server was started with."""
    files = _demo_files(demo_dir)
    tree = write_synthetic_photos(tmp_path / "tree", LABELS, 2, seed=1)  # labelled by folder: a dataset for sure
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(write_synthetic_photos(tmp_path / "more", LABELS, 1, seed=11).rglob("*.*")):
        p.rename(flat / p.name)
    port = _free_port()
    args = ["--source", f"folder:{tree}", "--source", f"folder:{flat}", "--output_dir", "ds",
            "--labeler-base-url", f"http://127.0.0.1:{port}/v1",
            "--labeler-model", "local", "--label-cache", "c.sqlite", "--min_confidence", "0", "--num_workers", "2"]
    reports = []
    for name in ("teacher-a.gguf", "teacher-b.gguf", "teacher-a.gguf"):  # one server after another, one address
        model = tmp_path / name
        if not model.exists():
            shutil.copyfile(files["text"], model)
        with _serving(model, files["mmproj"], port, tmp_path):
            res = _prepare(tmp_path, *args)
        assert res.returncode == 0, res.stderr[-3000:]
        reports.append(json.loads((tmp_path / "ds" / "metadata.json").read_text())["teacher"])
    first, second, third = reports
    served = [[Path(m).name for m in r["served_models"]] for r in reports]  # llama-server names the file
    assert served == [["teacher-a.gguf"], ["teacher-b.gguf"], ["teacher-a.gguf"]] and first["probes"] == 0
    asked = first["labeled"] + first["rejected"] - first["rejects_by_reason"].get("server_error", 0)
    assert second["reasked_other_model"] == asked and second["requests"] >= asked and second["cache_hits"] == 0
    assert third["cache_hits"] == asked and third["requests"] == 0  # both models' answers are kept
