"""The vision tower's feature cache: exact (the same tensors, the same training), read back, never wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from elemental.config import PrepareConfig, RunConfig
from elemental.train.targets import lora_target_regex
from elemental.train.tower_cache import TowerCache, find_tower, why_off


@pytest.fixture
def tower(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return find_tower(model).eval()


def _images(tower, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    size, patch = tower.config.image_size, tower.config.patch_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.ones(n, size // patch, size // patch, dtype=torch.bool)


def test_the_cache_gives_the_towers_own_output_and_reads_it_back(tower, tmp_path):
    pixels, mask = _images(tower, 3, seed=0)
    keys_before = list(tower.state_dict())
    want = tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
    cache = TowerCache(tower, tmp_path).install()
    assert list(tower.state_dict()) == keys_before  # the module tree is untouched: checkpoints look the same
    assert torch.equal(tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state, want)
    assert (cache.built, cache.hits) == (3, 0) and len(list(cache.folder.glob("*.safetensors"))) == 3
    assert torch.equal(tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state, want)
    assert (cache.built, cache.hits) == (3, 3)

    # A batch of one known image and one new: the new one alone goes through the tower.
    new, new_mask = _images(tower, 1, seed=1)
    mixed = tower(pixel_values=torch.cat([pixels[:1], new]), patch_attention_mask=torch.cat([mask[:1], new_mask]))
    cache.remove()
    alone = tower(pixel_values=new, patch_attention_mask=new_mask).last_hidden_state
    assert torch.equal(mixed.last_hidden_state[0], want[0]) and torch.equal(mixed.last_hidden_state[1], alone[0])
    assert "forward" not in tower.__dict__  # removed: the class's own forward again


def test_one_photo_twice_in_a_batch_is_one_entry(tower, tmp_path):
    """A photo's label and rationale examples can share a batch: one entry, built once, both served."""
    pixels, mask = _images(tower, 2, seed=4)
    twice, twice_mask = torch.cat([pixels, pixels[:1]]), torch.cat([mask, mask[:1]])
    want = tower(pixel_values=twice, patch_attention_mask=twice_mask).last_hidden_state
    cache = TowerCache(tower, tmp_path).install()
    assert torch.equal(tower(pixel_values=twice, patch_attention_mask=twice_mask).last_hidden_state, want)
    assert (cache.built, cache.hits) == (2, 0) and len(list(cache.folder.glob("*.safetensors"))) == 2
    assert torch.equal(tower(pixel_values=twice, patch_attention_mask=twice_mask).last_hidden_state, want)
    assert (cache.built, cache.hits) == (2, 3)
    cache.remove()


def test_a_corrupt_or_foreign_entry_is_computed_again_never_used(tower, tmp_path, caplog):
    other = TowerCache(tower, tmp_path / "other").install()  # a valid entry, of another image
    tower(*_images(tower, 1, seed=9))
    other.remove()
    (foreign,) = other.folder.glob("*.safetensors")

    pixels, mask = _images(tower, 2, seed=2)
    want = tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
    cache = TowerCache(tower, tmp_path).install()
    tower(pixel_values=pixels, patch_attention_mask=mask)
    first, second = (cache.folder / f"{cache.key(pixels[i], mask[i])}.safetensors" for i in range(2))
    first.write_bytes(first.read_bytes()[:-16] + b"\0" * 16)  # torn or flipped bytes
    shutil.copyfile(foreign, second)  # a file that is whole, but another image's
    got = tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
    assert torch.equal(got, want) and cache.rebuilt == 2 and cache.hits == 0
    assert "is corrupt or foreign; computing it again" in caplog.text
    assert torch.equal(load_file(second)["last_hidden_state"], want[1])  # rewritten with the right entry
    cache.remove()


def test_another_base_model_never_reads_the_cache(tiny_model_dir, tmp_path):
    a = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    b = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        next(find_tower(b).parameters()).add_(1e-3)
    assert TowerCache(find_tower(a), tmp_path).folder != TowerCache(find_tower(b), tmp_path).folder


def test_the_cache_is_off_where_it_would_not_be_exact(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=lora_target_regex()))
    assert why_off(lora, enabled=True, augment=False) is None
    assert why_off(lora, enabled=False, augment=False) == "--no-feature-cache"
    assert "--augment" in why_off(lora, enabled=True, augment=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    vision = get_peft_model(model, LoraConfig(r=4, target_modules=lora_target_regex(["vision"])))
    assert why_off(vision, enabled=True, augment=False) == "the vision tower trains (vision adapters or targets)"


def assert_cache_trains_as_without_it(base_model: Path, photos: Path, tmp_path: Path, task, edge: int) -> dict:
    """20 steps with and without the cache on one dataset: the same loss at every step (1e-5 relative), the
    same adapter (1e-5), the same label-scoring validation. Returns the cached run's metrics."""
    from elemental.data.prepare import prepare_dataset
    from elemental.train.recipe import train

    ds = tmp_path / "ds"
    prepare_dataset(PrepareConfig(sources=[f"folder:{photos}"], output_dir=ds, label_cache=tmp_path / "c.sqlite"),
                    task, say=lambda _: None)

    def run(name: str, cache: bool) -> dict:
        cfg = RunConfig.model_validate({
            "model": {"base_model": str(base_model), "image_longest_edge": edge},
            "train": {"dataset_dir": str(ds), "output_dir": str(tmp_path / name), "max_steps": 20, "batch_size": 4,
                      "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "report_to": "none",
                      "eval_steps": 10, "logging_steps": 1, "gradient_checkpointing": False, "merge_final": False,
                      "feature_cache": cache}})
        return train(cfg, task)

    plain, cached = run("plain", False), run("cached", True)
    assert plain["tower_cache"] == {"used": False, "why_off": "--no-feature-cache"}
    tc = cached["tower_cache"]
    assert tc["used"] and tc["built"] == plain["n_train_records"] + plain["n_val"]
    assert tc["hits"] > 0 and tc["rebuilt"] == 0 and plain["steps"] == cached["steps"] == 20
    losses = [[h["loss"] for h in json.loads((tmp_path / r / "logs" / "log_history.json").read_text()) if "loss" in h]
              for r in ("plain", "cached")]
    worst = max(abs(x - y) / abs(x) for x, y in zip(*losses, strict=True))
    a = load_file(tmp_path / "plain" / "lora_adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cached" / "lora_adapter" / "adapter_model.safetensors")
    print(f"tower cache at {edge} px: {len(losses[0])} logged losses, max relative difference {worst:.2e}; adapter "
          f"max |diff| {max(float((a[k] - b[k]).abs().max()) for k in a):.2e}")
    assert len(losses[0]) >= 15 and worst <= 1e-5
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert [h["eval_accuracy"] for h in plain["eval_history"]] == [h["eval_accuracy"] for h in cached["eval_history"]]
    assert [h["eval_loss"] for h in plain["eval_history"]] == pytest.approx(
        [h["eval_loss"] for h in cached["eval_history"]], rel=1e-5)
    return cached


@pytest.mark.slow
def test_training_from_the_cache_is_training_without_it(tmp_path, tiny_model_dir, task):
    from elemental.synthetic import write_synthetic_photos

    photos = write_synthetic_photos(tmp_path / "photos", task.labels, per_class=4, seed=5)
    assert_cache_trains_as_without_it(tiny_model_dir, photos, tmp_path, task, edge=512)
