"""W&B tracking of a real (tiny) training run, offline: metrics reach the run, secrets never do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from elemental.config import PrepareConfig
from elemental.data.prepare import prepare_dataset
from elemental.synthetic import write_synthetic_photos

pytestmark = pytest.mark.slow
SECRET = "sk-test-SECRET-wandb-4242"


def test_wandb_offline_run_holds_metrics_and_no_secret(tmp_path, task, tiny_model_dir):
    photos = write_synthetic_photos(tmp_path / "photos", task.labels, per_class=6, seed=4)
    prepare_dataset(PrepareConfig(sources=[f"folder:{photos}"], output_dir=tmp_path / "ds",
                                  label_cache=tmp_path / "c.sqlite"), task, say=lambda _: None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(OPENAI_API_KEY=SECRET, UNSPLASH_ACCESS_KEY=SECRET, PYTHONWARNINGS="ignore")
    res = subprocess.run(
        [sys.executable, "-m", "elemental", "train", "--base_model", str(tiny_model_dir), "--dataset_dir", "ds",
         "--output_dir", "run", "--report_to", "wandb", "--max_steps", "10", "--eval_steps", "5",
         "--logging_steps", "2", "--batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "2e-3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "no key: W&B must run offline under OUTPUT/logs"
    blob = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())
    for key in (b"eval/accuracy", b"eval/macro_f1", b"eval/water_f1", b"train/loss", b"train/learning_rate",
                b"train/grad_norm",
                b"eval/confusion_matrix"):
        assert key in blob, key
    assert SECRET.encode() not in blob
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tokens_per_second"] > 0 and len(metrics["eval_history"]) == 2
    assert SECRET not in (tmp_path / "run" / "metrics.json").read_text()
