"""The pipeline on a realistic model: SmolVLM2-256M's shape around the real pretrained SmolLM2-135M-Instruct and its
real tokenizer (`synthetic.build_realistic_256m`).

What the tiny model cannot show: llama.cpp's converter recognising a real tokenizer on its own (no pre-tokenizer
override), a 30-layer pretrained language model through train → merge → export → evaluate at 384 px, and HF and the
GGUF files agreeing on it. The run (`realistic_run`, about 5 minutes on 2 cores) is part of `make test`, shared with
the phone-side fidelity tests (tests/test_fidelity_real.py). The tower cache's exactness on it takes 3 more minutes and
stays opt-in: `make test-real` (ELEMENTAL_TEST_REAL=1).
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow
EDGE = 384


def test_train_merge_export_evaluate_on_a_realistic_model(realistic_run):
    from elemental.evaluate import agreement
    from elemental.synthetic import tiny_marker

    assert tiny_marker(realistic_run / "model") is None  # the converter gets no help with this tokenizer
    manifest = json.loads((realistic_run / "gguf" / "manifest.json").read_text())
    assert manifest["converter"]["tokenizer_pre_override"] is None
    assert manifest["image"]["longest_edge"] == EDGE and manifest["image"]["n_image_tokens"] == 36
    hf = json.loads((realistic_run / "run" / "validation_results.json").read_text())
    gg = json.loads((realistic_run / "run" / "validation_results_gguf.json").read_text())
    agree = agreement(hf, gg)
    print(f"realistic 256M-shaped model at {EDGE} px: HF accuracy {hf['accuracy']:.3f}, GGUF {gg['accuracy']:.3f}, "
          f"agreement {agree:.3f} on {hf['n']} photos; GGUF p50 {gg['latency_ms']['p50']:.0f} ms")
    assert agree >= 0.9


@pytest.mark.skipif(not os.environ.get("ELEMENTAL_TEST_REAL"), reason="opt-in: make test-real (about 3 minutes)")
def test_training_from_the_tower_cache_is_exact_on_a_realistic_model(realistic_run, tmp_path):
    """Issue 22: in fp32, 20 steps from the vision tower's cache give the uncached run's losses and adapter."""
    from test_tower_cache import assert_cache_trains_as_without_it

    from elemental.config import TaskConfig
    from elemental.synthetic import write_synthetic_photos
    from elemental.task import Task

    task = Task.from_config(TaskConfig())
    photos = write_synthetic_photos(tmp_path / "photos", task.labels, 4, seed=3)
    assert_cache_trains_as_without_it(realistic_run / "model", photos, tmp_path, task, edge=EDGE)
