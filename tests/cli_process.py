"""Running the real `elemental` CLI in a subprocess, and checking its one-line errors (shared by the CLI tests)."""

from __future__ import annotations

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
