"""Running the real `elemental` CLI in a subprocess, and checking its one-line errors (shared by the CLI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def elemental(*args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None,
              timeout: int = 1500) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "elemental", *args], cwd=cwd, env=full_env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2 and exactly one `error:` line on stderr, holding every needle."""
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def export_evaluate_config(path: Path, demo_dir: Path, out: Path, name: str, quants: list[str]) -> Path:
    """A config at `path` that exports the demo's merged model as `name` at `quants` into out/gguf and evaluates
    the GGUF files into out/res_gguf.json (`elemental run` of the last two stages)."""
    path.write_text(
        'stages = ["export", "evaluate"]\n'
        f'[model]\nbase_model = "{demo_dir / "base_model"}"\n'
        f'[train]\ndataset_dir = "{demo_dir / "dataset"}"\noutput_dir = "{demo_dir / "run"}"\n'
        f'[export]\noutput_dir = "{out / "gguf"}"\nname = "{name}"\nquant = {json.dumps(quants)}\n'
        f'[evaluate]\nbackends = ["gguf"]\noutput_path = "{out / "res.json"}"\n'
    )
    return path


def train_at_geometry(demo_dir: Path, out: Path, edge: int) -> Path:
    """The demo's training, merge, export and evaluate again at image size `edge` (`elemental run` in `out`), as a
    user who picked a smaller geometry ships it; returns `out` (run/, gguf/, run.toml)."""
    from elemental.pipeline import demo_config

    cfg = demo_config(demo_dir)
    train = {k: v for k, v in cfg.train.model_dump().items() if v is not None and not isinstance(v, list)}
    train.update(output_dir=str(out / "run"), dataset_dir=str(demo_dir / "dataset"))
    lines = ['stages = ["train", "merge", "export", "evaluate"]',
             f'[model]\nbase_model = "{cfg.model.base_model}"\nimage_longest_edge = {edge}', "[train]"]
    lines += [f"{k} = {json.dumps(str(v) if k.endswith('_dir') else v)}" for k, v in train.items()]
    lines += [f'[export]\noutput_dir = "{out / "gguf"}"\nname = "Tiny{edge}"', "[evaluate]\nplot_cm = false"]
    (out / "run.toml").write_text("\n".join(lines) + "\n")
    res = elemental("run", "run.toml", cwd=out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def run_realistic(out: Path, edge: int = 384) -> Path:
    """The pipeline (`elemental run`: prepare, a short training, merge, export, evaluate on HF and GGUF) at image size
    `edge` on the SmolVLM2-256M-shaped model around the real pretrained SmolLM2-135M-Instruct (its probabilities move,
    where the tiny model's saturate near 0 and 1); returns `out` (model/, photos/, ds/, run/, gguf/)."""
    from elemental.config import TaskConfig
    from elemental.synthetic import build_realistic_256m, write_synthetic_photos
    from elemental.task import Task

    model = build_realistic_256m(out / "model")
    write_synthetic_photos(out / "photos", Task.from_config(TaskConfig()).labels, 12, seed=2)
    (out / "real.toml").write_text(
        f'[model]\nbase_model = "{model}"\nimage_longest_edge = {edge}\n'
        f'[prepare]\nsources = ["folder:{out / "photos"}"]\noutput_dir = "{out / "ds"}"\n'
        f'label_cache = "{out / "c.sqlite"}"\nval_fraction = 0.2\n'
        f'[train]\ndataset_dir = "{out / "ds"}"\noutput_dir = "{out / "run"}"\nbatch_size = 4\n'
        'gradient_accumulation_steps = 1\nmax_steps = 30\nlearning_rate = 1e-3\nreport_to = "none"\n'
        'gradient_checkpointing = false\neval_steps = 0\nreason_mode = "none"\n'
        f'[export]\noutput_dir = "{out / "gguf"}"\nname = "Real256M"\nquant = ["Q8_0"]\n'
        '[evaluate]\nbackends = ["hf", "gguf"]\nplot_cm = false\n'
    )
    res = elemental("run", str(out / "real.toml"), cwd=out, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out
