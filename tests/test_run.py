"""`elemental run`: stages skipped when their inputs and outputs are unchanged, re-run when they are not,
`--from` / `--only`, and an interrupted run that continues to the same results. Through the real CLI on
the tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elemental.runstate import MISSING, Hasher
from elemental.synthetic import write_synthetic_photos

STAGES = ["prepare", "train", "merge", "export", "evaluate"]


# -- the hashes (no model needed) ------------------------------------------------------------------

def test_hasher_reuses_hashes_until_a_file_changes(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    h = Hasher()
    first = h.file(f)
    h.known[str(f.resolve())][2] = "stale"  # a reused hash is visible as such
    assert h.file(f) == "stale"
    f.write_bytes(b"two!")  # new size, new mtime: hashed again
    assert h.file(f) not in ("stale", first)
    assert h.file(tmp_path / "nope") == MISSING


def test_tree_hash_sees_contents_and_names_not_times(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "x.txt").write_text("x")
    (tmp_path / "d" / "y.txt").write_text("y")
    before = Hasher().tree(tmp_path / "d")
    os.utime(tmp_path / "d" / "y.txt", (1, 1))  # touched, same content
    assert Hasher().tree(tmp_path / "d") == before
    (tmp_path / "d" / "y.txt").rename(tmp_path / "d" / "z.txt")
    assert Hasher().tree(tmp_path / "d") != before
    only_sub = Hasher().tree(tmp_path / "d", ("sub",))
    (tmp_path / "d" / "z.txt").write_text("changed outside the entries hashed")
    assert Hasher().tree(tmp_path / "d", ("sub",)) == only_sub
    absent = Hasher().tree(tmp_path / "d", ("sub", "train.json"))
    (tmp_path / "d" / "train.json").write_text("[]")
    assert Hasher().tree(tmp_path / "d", ("sub", "train.json")) != absent  # a file appearing counts


# -- through the CLI -------------------------------------------------------------------------------

def _config(work: Path, base_model: Path, **train: object) -> Path:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in train.items())
    cfg = work / "run.toml"
    cfg.write_text(
        f'[model]\nbase_model = "{base_model}"\n'
        '[prepare]\nsources = ["folder:photos"]\noutput_dir = "ds"\nlabel_cache = "labels.sqlite"\n'
        '[train]\ndataset_dir = "ds"\noutput_dir = "run"\nbatch_size = 4\ngradient_accumulation_steps = 1\n'
        'report_to = "none"\neval_steps = 0\ngradient_checkpointing = false\nlearning_rate = 5e-3\n'
        'lora_dropout = 0.0\n' + extra +
        '[export]\noutput_dir = "gguf"\nname = "T"\n'
        '[evaluate]\nbackends = ["hf", "gguf"]\n'
    )
    return cfg


def _run(work: Path, *flags: str, rc: int = 0) -> tuple[list[str], str]:
    """`elemental run run.toml FLAGS` in `work`: (stages that ran, stdout + stderr)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "elemental", "run", "run.toml", *flags], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == rc, res.stderr[-3000:]
    ran = [m.group(1) for m in re.finditer(r"^(\w+): running", res.stdout, re.M)]
    skipped = [m.group(1) for m in re.finditer(r"^(\w+): up to date, skipped", res.stdout, re.M)]
    assert sorted(ran + skipped) == sorted(set(ran + skipped)), res.stdout
    return ran, res.stdout + res.stderr


@pytest.mark.slow
def test_export_hash_is_what_ships_not_the_phone_librarys_stamp(tmp_path):
    """The native library writes verified.json into an export folder it opens: that must not look like a new export."""
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"weights")
    (folder / "manifest.json").write_text(json.dumps({"files": {"model.gguf": {"sha256": "..."}}}))
    before = Hasher().export(folder)
    (folder / "verified.json").write_text('{"format": 1, "files": {}}')
    assert Hasher().export(folder) == before
    (folder / "model.gguf").write_bytes(b"other weights")
    assert Hasher().export(folder) != before
    (folder / "manifest.json").write_text("not json")  # unreadable: the whole folder counts
    assert Hasher().export(folder) == Hasher().tree(folder)


def test_run_skips_what_is_up_to_date_and_reruns_what_changed(tmp_path, tiny_model_dir, task):
    write_synthetic_photos(tmp_path / "photos", task.labels, per_class=4, seed=11)
    _config(tmp_path, tiny_model_dir, max_steps=4)
    ran, out = _run(tmp_path)
    assert ran == STAGES
    assert "== elemental run summary ==" in out and "HF <-> GGUF agreement" in out
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["dataset"]["train"] + summary["dataset"]["val"] == 20 and "T-Q8_0.gguf" in summary["gguf_files_mb"]

    ran, out = _run(tmp_path)
    assert ran == [] and out.count("up to date, skipped") == 5

    photo = sorted((tmp_path / "photos" / "fire").iterdir())[0]  # new content in one source photo
    img = np.asarray(Image.open(photo).convert("RGB")).copy()
    img[:20, :20] = 0
    Image.fromarray(img).save(photo)
    ran, out = _run(tmp_path)
    assert ran == STAGES, out

    cfg = (tmp_path / "run.toml").read_text().replace('name = "T"\n', 'name = "T"\nquant = ["Q8_0", "Q4_K_M"]\n')
    (tmp_path / "run.toml").write_text(cfg)
    ran, out = _run(tmp_path)
    assert ran == ["export", "evaluate"], out
    assert "export: running (config changed)" in out

    ran, _ = _run(tmp_path, "--only", "evaluate")
    assert ran == ["evaluate"]
    best = max(json.loads((tmp_path / "run" / f).read_text())["accuracy"]
               for f in ("validation_results.json", "validation_results_gguf.json"))
    assert best < 1.0, "4 steps should not make the tiny model perfect"
    floor = round(best + 0.001, 4)
    config = (tmp_path / "run.toml").read_text()
    (tmp_path / "run.toml").write_text(config + f"min_accuracy = {floor}\n")
    ran, out = _run(tmp_path, rc=1)  # a floor for CI: nothing re-runs, the exit code says "below"
    assert ran == [] and f"below evaluate.min_accuracy {floor:g}" in out
    (tmp_path / "run.toml").write_text(config)
    ran, _ = _run(tmp_path, "--from", "merge")
    assert ran == ["merge", "export", "evaluate"]

    for f in (tmp_path / "gguf").iterdir():
        f.unlink()
    (tmp_path / "gguf").rmdir()
    ran, out = _run(tmp_path)
    # The export is deterministic: the same files come back, so what was evaluated on them stays up to date.
    assert ran == ["export"] and "output gguf missing" in out and "evaluate: up to date" in out


@pytest.mark.slow
def test_interrupted_run_continues_to_the_same_results(tmp_path, tiny_model_dir, task):
    """Kill `elemental run` during training (after its first checkpoint); the re-run skips prepare, resumes
    training from the checkpoint and ends with the predictions of a run that was never interrupted."""
    dirs = {}
    for name in ("whole", "killed"):
        work = dirs[name] = tmp_path / name
        write_synthetic_photos(work / "photos", task.labels, per_class=4, seed=12)
        _config(work, tiny_model_dir, num_epochs=3)
    _run(dirs["whole"])

    work = dirs["killed"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "elemental", "run", "run.toml"], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not any((work / "run" / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "run" / "metrics.json").exists()

    ran, out = _run(work)
    assert ran == ["train", "merge", "export", "evaluate"] and "train: running (interrupted)" in out
    assert "resuming the interrupted run" in out
    assert json.loads((work / "run" / "metrics.json").read_text())["resumed_from"]
    for results in ("validation_results.json", "validation_results_gguf.json"):
        a = json.loads((dirs["whole"] / "run" / results).read_text())["predictions"]
        b = json.loads((work / "run" / results).read_text())["predictions"]
        assert [p["predicted"] for p in a] == [p["predicted"] for p in b]
        for pa, pb in zip(a, b):
            assert max(abs(pa["probabilities"][k] - pb["probabilities"][k]) for k in pa["probabilities"]) < 1e-4
