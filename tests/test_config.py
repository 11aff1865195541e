from pathlib import Path

import pytest

from elemental.config import REAL_BASE_MODEL, load_config
from elemental.errors import ElementalError
from elemental.pipeline import demo_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_seed_recipe():
    cfg = load_config()
    assert cfg.model.base_model == "HuggingFaceTB/SmolVLM2-500M-Video-Instruct" == REAL_BASE_MODEL
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.train.num_epochs) == (4, 4, 3)
    assert (cfg.train.learning_rate, cfg.train.lora_r, cfg.train.lora_alpha) == (2e-4, 16, 32)
    assert cfg.prepare.min_confidence == 0.7 and cfg.prepare.val_fraction == 0.1
    assert cfg.task.labels == ["water", "land", "fire", "wood", "metal"]
    assert cfg.model.image_longest_edge == 512


def test_shipped_configs_load():
    default = load_config(ROOT / "configs/default.toml")
    assert default.model.base_model == REAL_BASE_MODEL
    assert default.export.name == "SmolVLM2-500M-Element"
    assert load_config(ROOT / "configs/demo.toml") == demo_config(Path("runs/demo"))


def test_flags_override_file_and_none_leaves_it(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nlora_r = 8\nbatch_size = 2\n')
    cfg = load_config(f, {"train.lora_r": 32, "train.batch_size": None})
    assert cfg.train.lora_r == 32 and cfg.train.batch_size == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[train]\nlora_rank = 8\n", "train.lora_rank: unknown key"),
        ("[train]\nlora_r = \"big\"\n", "train.lora_r: Input should be a valid integer"),
        ("[bogus]\nx = 1\n", "bogus: unknown key"),
        ("[task]\nlabels = [\"a\"]\n", "task.labels"),
        ("[task]\nlabels = [\"a b\", \"c\"]\n", "without spaces"),
        ("stages = [\"train\", \"prepare\"]\n", "pipeline order"),
        ("[train\n", "invalid TOML"),
        ("[prepare.prices.local]\ninput_per_1m = 0\n", "prepare.prices.local.output_per_1m: Field required"),
        ("[prepare]\nbatch_fallback = \"maybe\"\n", "prepare.batch_fallback"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ElementalError) as e:
        load_config(f)
    assert str(f) in str(e.value) and expected in str(e.value)


def test_a_price_table_in_the_config_adds_to_the_dated_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[prepare.prices.local]\ninput_per_1m = 0\noutput_per_1m = 0\nphoto_tokens_in = 900\n'
                 '[prepare.prices."gpt-4o"]\ninput_per_1m = 2.0\noutput_per_1m = 8.0\nphoto_tokens_in = 250\n')
    prices = load_config(f).prepare.prices
    assert prices["local"].photo_tokens_in == 900 and prices["local"].batch_discount == 0.5
    assert (prices["gpt-4o"].input_per_1m, prices["gpt-4o"].photo_tokens_in) == (2.0, 250)  # overridden
    assert prices["gpt-4o-mini"].input_per_1m == 0.15  # the defaults stay


def test_bad_override_names_the_flag_key():
    with pytest.raises(ElementalError, match="command-line flags: train.learning_rate"):
        load_config(None, {"train.learning_rate": -1.0})


def test_missing_config_file():
    with pytest.raises(ElementalError, match="config file not found"):
        load_config(Path("/nonexistent/x.toml"))


def test_smolvlm2_256m_preset():
    cfg = load_config(ROOT / "configs/smolvlm2-256m.toml")
    assert cfg.model.base_model == "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
    assert cfg.model.image_longest_edge == 384 and cfg.export.name == "SmolVLM2-256M-Element"
    default = load_config(ROOT / "configs/default.toml")
    assert cfg.model_copy(update={"model": default.model, "export": default.export, "train": default.train}) == default
