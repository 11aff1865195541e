"""The pipeline on a realistic model (opt-in: `make test-real`): SmolVLM2-256M's shape around the real
pretrained SmolLM2-135M-Instruct and its real tokenizer (`synthetic.build_realistic_256m`).

What the tiny model cannot show: llama.cpp's converter recognising a real tokenizer on its own (no
pre-tokenizer override), a 30-layer pretrained language model through train → merge → export →
evaluate at 384 px, and HF and the GGUF files agreeing on it. About 5 minutes on 2 CPU cores, so
`make test` leaves it out; `make test-real` (ELEMENTAL_TEST_REAL=1) runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_process import elemental

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("ELEMENTAL_TEST_REAL"),
                                                    reason="opt-in: make test-real (about 5 minutes)")]
EDGE = 384


@pytest.fixture(scope="module")
def realistic_model(tmp_path_factory) -> Path:
    from elemental.synthetic import build_realistic_256m

    return build_realistic_256m(tmp_path_factory.mktemp("real") / "smolvlm2-256m-shaped")


def test_train_merge_export_evaluate_on_a_realistic_model(realistic_model, tmp_path):
    from elemental.config import TaskConfig
    from elemental.synthetic import tiny_marker, write_synthetic_photos
    from elemental.task import Task

    assert tiny_marker(realistic_model) is None  # the converter gets no help with this tokenizer
    task = Task.from_config(TaskConfig())
    write_synthetic_photos(tmp_path / "photos", task.labels, 12, seed=2)
    cfg = tmp_path / "real.toml"
    cfg.write_text(
        f'[model]\nbase_model = "{realistic_model}"\nimage_longest_edge = {EDGE}\n'
        f'[prepare]\nsources = ["folder:{tmp_path / "photos"}"]\noutput_dir = "{tmp_path / "ds"}"\n'
        f'label_cache = "{tmp_path / "c.sqlite"}"\nval_fraction = 0.2\n'
        f'[train]\ndataset_dir = "{tmp_path / "ds"}"\noutput_dir = "{tmp_path / "run"}"\nbatch_size = 4\n'
        'gradient_accumulation_steps = 1\nmax_steps = 30\nlearning_rate = 1e-3\nreport_to = "none"\n'
        'gradient_checkpointing = false\neval_steps = 0\nreason_mode = "none"\n'
        f'[export]\noutput_dir = "{tmp_path / "gguf"}"\nname = "Real256M"\nquant = ["Q8_0"]\n'
        '[evaluate]\nbackends = ["hf", "gguf"]\nplot_cm = false\n'
    )
    res = elemental("run", str(cfg), cwd=tmp_path, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((tmp_path / "gguf" / "manifest.json").read_text())
    assert manifest["converter"]["tokenizer_pre_override"] is None
    assert manifest["image"]["longest_edge"] == EDGE and manifest["image"]["n_image_tokens"] == 36
    hf = json.loads((tmp_path / "run" / "validation_results.json").read_text())
    gg = json.loads((tmp_path / "run" / "validation_results_gguf.json").read_text())
    from elemental.evaluate import agreement

    agree = agreement(hf, gg)
    print(f"realistic 256M-shaped model at {EDGE} px: HF accuracy {hf['accuracy']:.3f}, GGUF {gg['accuracy']:.3f}, "
          f"agreement {agree:.3f} on {hf['n']} photos; GGUF p50 {gg['latency_ms']['p50']:.0f} ms")
    assert agree >= 0.9


def test_training_from_the_tower_cache_is_exact_on_a_realistic_model(realistic_model, tmp_path):
    """Issue 22: in fp32, 20 steps from the vision tower's cache give the uncached run's losses and adapter."""
    from test_tower_cache import assert_cache_trains_as_without_it

    from elemental.config import TaskConfig
    from elemental.synthetic import write_synthetic_photos
    from elemental.task import Task

    task = Task.from_config(TaskConfig())
    photos = write_synthetic_photos(tmp_path / "photos", task.labels, 4, seed=3)
    assert_cache_trains_as_without_it(realistic_model, photos, tmp_path, task, edge=EDGE)
