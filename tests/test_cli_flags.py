"""The CLI's surface: every stage is a command, and the seed recipe's flag spellings are accepted."""

import typer
from typer.testing import CliRunner

from elemental.cli import app

SEED_ALIASES = {
    "prepare": ["--output_dir", "--num_images", "--min_confidence"],
    "train": ["--dataset_dir", "--output_dir", "--batch_size", "--gradient_accumulation_steps", "--num_epochs",
              "--learning_rate", "--lora_r", "--lora_alpha", "--bf16", "--wandb_project", "--base_model",
              "--load_in_8bit", "--load_in_4bit", "--lora_targets", "--full_finetune", "--max_steps", "--seed"],
    "merge": ["--base_model", "--lora_path", "--output_path"],
    "export": ["--model_path", "--output_dir"],
    "evaluate": ["--model_path", "--dataset_dir", "--output_path", "--plot_cm"],
}


def _options(command: str) -> set[str]:
    group = typer.main.get_command(app)
    cmd = group.commands[command]
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def test_every_stage_is_a_command():
    group = typer.main.get_command(app)
    assert set(group.commands) == {"prepare", "train", "merge", "export", "evaluate", "classify", "run", "demo",
                                   "review", "heldout"}


def test_seed_flag_spellings_are_aliases():
    for command, flags in SEED_ALIASES.items():
        missing = set(flags) - _options(command)
        assert not missing, f"{command} lacks {missing}"


def test_help_explains_each_command():
    runner = CliRunner()
    for command in ("prepare", "train", "merge", "export", "evaluate", "classify", "run", "demo"):
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_prepare_through_seed_aliases(tmp_path, task):
    from elemental.synthetic import write_synthetic_photos

    write_synthetic_photos(tmp_path / "photos", task.labels, per_class=4, seed=1)
    res = CliRunner().invoke(app, ["prepare", "--source", f"folder:{tmp_path / 'photos'}",
                                   "--output_dir", str(tmp_path / "ds"), "--num_images", "15",
                                   "--min_confidence", "0.5"])
    assert res.exit_code == 0, res.output
    import json

    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["n_train"] + meta["n_val"] == 15 and meta["min_confidence"] == 0.5


def test_sweep_parameters_are_train_flags():
    from pathlib import Path

    import yaml

    sweep = yaml.safe_load((Path(__file__).parents[1] / "configs/sweep.yaml").read_text())
    assert sweep["command"][1:3] == ["elemental", "train"]
    assert {f"--{p}" for p in sweep["parameters"]} <= _options("train")
    # W&B passes --name=value: the CLI takes that form.
    res = CliRunner().invoke(app, ["train", "--lora_r=x"])
    assert res.exit_code == 2 and "lora" in res.output
