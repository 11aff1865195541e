"""`elemental train` options beyond the default LoRA run: targets, full fine-tune, quantized base, augmentation,
the merge at the end of training, and the best-checkpoint state a resumed run must not forget."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from elemental.config import PrepareConfig, RunConfig, TrainConfig
from elemental.errors import ElementalError
from elemental.synthetic import synthetic_photo
from elemental.train.augment import make_augment
from elemental.train.callbacks import LabelEvalCallback
from elemental.train.targets import lora_target_regex

TEXT = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def linear_names(tiny_model_dir) -> list[str]:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _hits(regex: str, names: list[str]) -> list[str]:
    return [n for n in names if re.fullmatch(regex, n)]


# -- --lora_targets ------------------------------------------------------------------------------

def test_named_targets_stay_in_the_text_model(linear_names):
    hit = _hits(lora_target_regex(["q_proj", "v_proj"]), linear_names)
    assert hit and all("text_model" in n for n in hit)
    assert {n.rsplit(".", 1)[1] for n in hit} == {"q_proj", "v_proj"}


def test_default_targets_are_text_projections_and_connector(linear_names):
    hit = _hits(lora_target_regex(), linear_names)
    assert {n.rsplit(".", 1)[1] for n in hit if "text_model" in n} == TEXT
    assert [n for n in hit if "text_model" not in n] == ["model.connector.modality_projection.proj"]


def test_vision_tower_only_by_name(linear_names):
    hit = _hits(lora_target_regex(["vision"]), linear_names)
    assert hit and all("vision_model" in n for n in hit)
    assert {n.rsplit(".", 1)[1] for n in hit} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_raw_regex_is_used_as_written(linear_names):
    assert _hits(lora_target_regex([r"re:.*text_model\.layers\.0\.mlp\.down_proj"]), linear_names) == [
        "model.text_model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize("targets, needle", [
    (["qproj"], "'qproj'"), ([], "empty"), (["re:q_proj", "v_proj"], "only item"), (["re:("], "invalid regex"),
])
def test_bad_targets_are_named(targets, needle):
    with pytest.raises(ElementalError, match=re.escape(needle)):
        lora_target_regex(targets)


def test_quantization_and_full_finetune_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        TrainConfig(load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="full_finetune"):
        TrainConfig(full_finetune=True, load_in_4bit=True)


# -- --augment -------------------------------------------------------------------------------------

def test_augmentation_keeps_size_and_colour_and_follows_the_seed():
    red = Image.new("RGB", (320, 240), (200, 40, 30))
    photo = synthetic_photo("fire", np.random.default_rng(0))
    augment = make_augment()
    torch.manual_seed(7)
    first = [augment(photo) for _ in range(4)]
    torch.manual_seed(7)
    again = [augment(photo) for _ in range(4)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))  # resumable
    assert any(not np.array_equal(np.asarray(a), np.asarray(photo)) for a in first)  # it does something
    for _ in range(20):
        out = augment(red)
        assert out.size == red.size
        r, g, b = np.asarray(out, dtype=float).reshape(-1, 3).mean(0)
        assert r > 2 * g and r > 2 * b, "no hue jitter: a red photo stays red"


# -- best-checkpoint state across --resume ---------------------------------------------------------

def test_resumed_evaluator_remembers_best_and_patience(tmp_path, task):
    state = TrainerState()
    state.log_history = [
        {"loss": 3.0, "step": 5},
        {"eval_accuracy": 0.6, "eval_loss": 1.0, "eval_macro_f1": 0.5, "step": 10, "epoch": 1.0},
        {"eval_accuracy": 0.8, "eval_loss": 0.5, "eval_macro_f1": 0.7, "step": 20, "epoch": 2.0},
        {"eval_accuracy": 0.7, "eval_loss": 0.6, "eval_macro_f1": 0.6, "eval_gpu_max_memory_gb": 1.0, "step": 30},
    ]
    cb = LabelEvalCallback(None, task, [], [], tmp_path / "best", eval_steps=10, patience=2)
    cb.on_train_begin(TrainingArguments(output_dir=str(tmp_path), report_to=[]), state, TrainerControl())
    assert (cb.best_accuracy, cb.best_step, cb._since_best) == (0.8, 20, 1)
    assert [h["step"] for h in cb.history] == [10, 20, 30]
    assert "eval_gpu_max_memory_gb" not in cb.history[-1] and cb.history[-1]["eval_loss"] == 0.6


# -- through the CLI on the tiny model -------------------------------------------------------------

def _elemental(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "elemental", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, task) -> Path:
    from elemental.data.prepare import prepare_dataset
    from elemental.synthetic import write_synthetic_photos

    root = tmp_path_factory.mktemp("small")
    photos = write_synthetic_photos(root / "photos", task.labels, per_class=4, seed=5)
    prepare_dataset(PrepareConfig(sources=[f"folder:{photos}"], output_dir=root / "ds",
                                  label_cache=root / "c.sqlite"), task, say=lambda _: None)
    return root / "ds"


def _train_args(ds: Path, base: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--dataset_dir", str(ds), "--base_model", str(base), "--output_dir", out,
            "--max_steps", "4", "--batch_size", "4", "--gradient_accumulation_steps", "1", "--report_to", "none",
            "--eval-steps", "0", "--no-gradient-checkpointing", "--learning_rate", "5e-3", *extra]


@pytest.mark.slow
def test_quantized_base_on_cpu_is_a_clear_error(tmp_path, small_dataset, tiny_model_dir):
    res = _elemental(*_train_args(small_dataset, tiny_model_dir, "run", "--load_in_4bit"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--load_in_4bit needs a CUDA GPU" in res.stderr and not (tmp_path / "run" / "lora_adapter").exists()
    res = _elemental(*_train_args(small_dataset, tiny_model_dir, "run", "--lora_targets", "q_proj,qkv"),
                     cwd=tmp_path)
    assert res.returncode == 2 and "'qkv'" in res.stderr


@pytest.mark.slow
def test_lora_targets_reach_the_adapter_and_train_merges_final(tmp_path, small_dataset, tiny_model_dir, task):
    from elemental.export.merge import adapter_sha256
    from elemental.pipeline import stage_merge

    res = _elemental(*_train_args(small_dataset, tiny_model_dir, "run", "--lora_targets", "v_proj,down_proj"),
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    weights = load_file(tmp_path / "run" / "lora_adapter" / "adapter_model.safetensors")
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in weights} == {"v_proj", "down_proj"}
    assert all("text_model" in k for k in weights)
    manifest = json.loads((tmp_path / "run" / "final" / "manifest.json").read_text())
    assert manifest["adapter_sha256"] == adapter_sha256(tmp_path / "run" / "lora_adapter")
    assert manifest["logits_check"]["max_abs_diff"] < 1e-3
    cfg = RunConfig.model_validate({"model": {"base_model": str(tiny_model_dir)},
                                    "train": {"dataset_dir": str(small_dataset), "output_dir": str(tmp_path / "run")}})
    said: list[str] = []
    assert stage_merge(cfg, task, said.append) == manifest
    assert "skipped" in said[0]  # `elemental run`'s merge stage does not merge the same adapter twice


@pytest.mark.slow
def test_full_finetune_writes_final_and_keeps_the_vision_tower(tmp_path, small_dataset, tiny_model_dir):
    res = _elemental(*_train_args(small_dataset, tiny_model_dir, "run", "--full_finetune", "--keep-last"),
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "lora_adapter").exists()
    assert json.loads((run / "final" / "manifest.json").read_text())["full_finetune"] is True
    assert (run / "final" / "task.json").is_file() and (run / "final" / "processor_config.json").is_file()
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any("vision_model" in k for k in changed)
    assert any("connector" in k for k in changed) and any("text_model" in k for k in changed)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trains"].startswith("full") and metrics["final"] == "run/final"
    res = _elemental("evaluate", "--model_path", str(run / "final"), "--dataset_dir", str(small_dataset),
                     "--output_path", "res.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "res.json").read_text())["n"] >= 5


@pytest.mark.slow
def test_missing_tracker_package_fails_before_training(tmp_path, small_dataset, tiny_model_dir):
    import importlib.util

    if importlib.util.find_spec("trackio"):
        pytest.skip("trackio is installed here")
    res = _elemental(*_train_args(small_dataset, tiny_model_dir, "run"), "--report_to", "trackio",  # last wins
                     cwd=tmp_path)
    assert res.returncode == 2 and "pip install trackio" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
