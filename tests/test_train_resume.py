"""`elemental train --resume` after a kill ends where an uninterrupted run ends (same data order, optimizer,
scheduler and RNG state), on the tiny model through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from elemental.config import PrepareConfig
from elemental.data.prepare import prepare_dataset
from elemental.synthetic import write_synthetic_photos

pytestmark = pytest.mark.slow


def _cli(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "elemental", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_kill_equals_uninterrupted(tmp_path, task, tiny_model_dir):
    photos = write_synthetic_photos(tmp_path / "photos", task.labels, per_class=8, seed=3)
    prepare_dataset(PrepareConfig(sources=[f"folder:{photos}"], output_dir=tmp_path / "ds",
                                  label_cache=tmp_path / "c.sqlite"), task, say=lambda _: None)
    (tmp_path / "c.toml").write_text(
        f'[model]\nbase_model = "{tiny_model_dir}"\n'
        f'[train]\ndataset_dir = "{tmp_path / "ds"}"\nbatch_size = 4\ngradient_accumulation_steps = 1\n'
        'num_epochs = 4\nlearning_rate = 2e-3\nlora_dropout = 0.0\nreport_to = "none"\n'
        'gradient_checkpointing = false\neval_steps = 0\nkeep_best = false\nlogging_steps = 1\n'
    )
    whole = _cli(tmp_path, "--config", "c.toml", "--output_dir", "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-2000:]

    # Kill the second run as soon as its first (epoch) checkpoint is complete, then resume it.
    run = _cli(tmp_path, "--config", "c.toml", "--output_dir", "resumed")
    ckpts = tmp_path / "resumed" / "checkpoints"
    deadline = time.time() + 600
    while not any(ckpts.glob("checkpoint-*/trainer_state.json")):
        assert run.poll() is None and time.time() < deadline, "training ended before a checkpoint"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "resumed" / "lora_adapter").exists()
    resumed = _cli(tmp_path, "--config", "c.toml", "--output_dir", "resumed", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]

    a = load_file(tmp_path / "whole" / "lora_adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "lora_adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-6, diff
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it trained
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert Path(metrics["resumed_from"]).name.startswith("checkpoint-")  # it resumed, not restarted
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["resumed_from"] is None
