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
