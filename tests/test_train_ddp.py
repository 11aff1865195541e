"""Data-parallel training for real: the demo training on 2 CPU processes (gloo) through torchrun.

Shows what a multi-GPU run relies on, without GPUs: the Trainer sees both processes and shards the
data (half the optimizer steps of the 1-process demo run at the same per-device batch), validation is
split between the ranks and gathered, exactly one `final/` and one `metrics.json` are written (by rank 0),
and `--resume` after killing both processes mid-run ends where an uninterrupted 2-process run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _torchrun(demo_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 -m elemental train` on the demo's dataset and base model."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "elemental", "train", "--config", str(REPO / "configs/demo.toml"),
           "--dataset_dir", str(demo_dir / "dataset"), "--base_model", str(demo_dir / "base_model"),
           "--output_dir", str(out), *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "ELEMENTAL_LOG": "INFO"}
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def kill_all(run: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers and torchrun, as a crash of the machine would (torchrun starts each
    worker in a session of its own, so killing torchrun's process group alone leaves them running)."""
    workers = psutil.Process(run.pid).children(recursive=True)
    assert len([w for w in workers if "elemental" in " ".join(w.cmdline())]) == 2, workers
    for p in [*workers, psutil.Process(run.pid)]:
        p.send_signal(signal.SIGKILL)
    run.communicate()
    psutil.wait_procs(workers, timeout=30)


def _finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


def _written(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name in ("metrics.json", "final"))


def test_two_processes_shard_the_data_write_once_and_resume(demo_dir, tmp_path):
    one = json.loads((demo_dir / "run/metrics.json").read_text())  # the demo's 1-process training
    whole = tmp_path / "whole"
    log = _finish(_torchrun(demo_dir, whole, "--no-feature-cache"))
    assert "process 1 of 2" in log and "process 0 of 2" in log

    m = json.loads((whole / "metrics.json").read_text())
    assert m["processes"] == 2 and one["processes"] == 1
    assert m["per_device_batch_size"] == one["per_device_batch_size"] == 8
    assert m["n_train_examples"] == one["n_train_examples"]
    assert m["steps"] * 2 == one["steps"], (m["steps"], one["steps"])  # each rank saw half of every epoch
    assert m["val_accuracy"] >= 0.9
    assert m["n_val"] == one["n_val"] and sum(sum(r) for r in m["final_val_confusion_matrix"]["counts"]) == m["n_val"]
    assert _written(whole) == ["final", "metrics.json"]  # one of each, from rank 0
    assert (whole / "final/config.json").is_file() and (whole / "lora_adapter/adapter_model.safetensors").is_file()

    # Kill both processes once the first epoch checkpoint is complete (every rank's RNG state), then resume.
    resumed = tmp_path / "resumed"
    run = _torchrun(demo_dir, resumed)
    deadline = time.time() + 600
    ckpts = resumed / "checkpoints"
    while not any(all((c / f).is_file() for f in ("trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"))
                  for c in ckpts.glob("checkpoint-*")):
        assert run.poll() is None and time.time() < deadline, "training ended before a checkpoint"
        time.sleep(0.05)
    kill_all(run)
    assert not (resumed / "lora_adapter").exists() and not (resumed / "metrics.json").exists()
    _finish(_torchrun(demo_dir, resumed, "--resume"))

    r = json.loads((resumed / "metrics.json").read_text())
    assert Path(r["resumed_from"]).name.startswith("checkpoint-") and m["resumed_from"] is None
    assert r["steps"] == m["steps"] and r["val_accuracy"] == m["val_accuracy"]
    a = load_file(whole / "lora_adapter/adapter_model.safetensors")
    b = load_file(resumed / "lora_adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff  # the resumed run ends where the uninterrupted one ends
    # ... and the one trained from the vision tower's cache where the one without it ends. Both ranks wrote
    # into one cache, each photo once, and the resumed run read back what the killed one had built.
    assert m["tower_cache"]["used"] is False and r["tower_cache"]["used"] and r["tower_cache"]["hits"] > 0
    photos = {rec["image_path"] for split in ("train", "val")
              for rec in json.loads((demo_dir / "dataset" / f"{split}.json").read_text())}
    assert len(list((tmp_path / ".feature-cache").glob("*/*.safetensors"))) == len(photos)
    assert _written(resumed) == ["final", "metrics.json"]
