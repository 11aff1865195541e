"""The tiny model and the synthetic photos that tests, the demo and benchmarks share."""

import json

import numpy as np
import torch

from elemental.synthetic import FULL_SIZE, TINY_MARKER, _model_config, synthetic_photo, write_synthetic_photos


def test_tiny_model_loads_through_the_real_loading_code(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "SmolVLMForConditionalGeneration"
    assert model.config.text_config.architectures == ["VLlama3ForCausalLM"]
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    # Shipped like the real model: HF's default geometry (2048 + 512 tiles), which training overrides.
    assert processor.image_processor.size["longest_edge"] == 2048
    assert processor.image_processor.do_image_splitting
    assert json.loads((tiny_model_dir / TINY_MARKER).read_text())["tokenizer_pre"] == "smollm"


def test_tiny_tokenizer_has_smollm2_shape(tiny_processor):
    tok = tiny_processor.tokenizer
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for special in ("<fake_token_around_image>", "<image>", "<global-img>", "<row_1_col_1>", "<end_of_utterance>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert len(tok.encode("\n", add_special_tokens=False)) == 1
    assert len(tok.encode("\n\n", add_special_tokens=False)) == 1
    # Digits split one by one, as SmolLM2's pre-tokenizer does.
    assert len(tok.encode("2026", add_special_tokens=False)) == 4


def test_one_tile_geometry_gives_64_image_tokens(task, tiny_processor):
    img = synthetic_photo("water", np.random.default_rng(0), size=(1600, 900))
    enc = tiny_processor(text=[task.prompt()], images=[[img]], return_tensors="pt")
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((enc["input_ids"] == image_id).sum()) == 64
    assert tuple(enc["pixel_values"].shape) == (1, 1, 3, 512, 512)


def test_full_size_config_is_smolvlm2_500m():
    from transformers import SmolVLMForConditionalGeneration

    config = _model_config(FULL_SIZE, vocab_size=49280, image_token_id=49190, pad_token_id=2)
    with torch.device("meta"):
        model = SmolVLMForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    assert 500e6 < n < 515e6, n
    assert config.text_config.architectures == ["VLlama3ForCausalLM"]


def test_synthetic_photos_vary_in_size_and_format_and_differ_by_class(tmp_path):
    write_synthetic_photos(tmp_path, ["water", "fire"], per_class=6, seed=3)
    files = sorted(tmp_path.rglob("*.*"))
    assert {f.suffix for f in files} == {".jpg", ".png"}
    from PIL import Image

    sizes = {Image.open(f).size for f in files}
    assert len(sizes) == len(files)
    mean = {lab: np.mean([np.asarray(Image.open(f)).reshape(-1, 3).mean(0) for f in (tmp_path / lab).iterdir()], 0)
            for lab in ("water", "fire")}
    assert mean["water"][2] > mean["water"][0] and mean["fire"][0] > mean["fire"][2]
