"""Shared fixtures: the default task, a tiny SmolVLM built once per test session, the demo and its val photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from elemental.config import TaskConfig
from elemental.task import Task


@pytest.fixture(scope="session")
def task() -> Task:
    return Task.from_config(TaskConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, task) -> Path:
    from elemental.synthetic import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base_model", task)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from elemental.model_io import load_processor

    return load_processor(tiny_model_dir, longest_edge=512)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """`elemental demo` run once through the real CLI (about a minute); its outputs serve many CLI tests.

    ELEMENTAL_TEST_DEMO_DIR names the output folder of an earlier `elemental demo` to reuse instead, for working
    on one test file at a time (the folder is read, never written).
    """
    from cli_process import elemental

    if reuse := os.environ.get("ELEMENTAL_TEST_DEMO_DIR"):
        assert (Path(reuse) / "summary.json").is_file(), f"ELEMENTAL_TEST_DEMO_DIR={reuse} holds no demo output"
        return Path(reuse)
    work = tmp_path_factory.mktemp("demo")
    res = elemental("demo", "--output_dir", "out", cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HF <-> GGUF agreement" in res.stdout
    assert "elemental review out/dataset --run out/run" in res.stdout  # the next step, as a user types it
    assert "vision tower cache: " in res.stdout and " photos built in " in res.stdout  # the train line says it
    return work / "out"


@pytest.fixture(scope="session")
def trained_at(demo_dir, tmp_path_factory):
    """edge -> a folder holding the demo trained, merged, exported and evaluated at that image size (each made once
    per session, on first use: the geometry tests and the ARM64 tests share them)."""
    from cli_process import train_at_geometry

    made: dict[int, Path] = {}

    def get(edge: int) -> Path:
        if edge not in made:
            made[edge] = train_at_geometry(demo_dir, tmp_path_factory.mktemp(f"demo{edge}"), edge)
        return made[edge]

    return get


@pytest.fixture(scope="session")
def val_photos(demo_dir) -> list[Path]:
    """The demo's val JPEGs (the phone-side tests classify them natively and against `elemental classify`)."""
    val = json.loads((demo_dir / "dataset/val.json").read_text())
    return [demo_dir / "dataset" / r["image_path"] for r in val]


@pytest.fixture(scope="session")
def png_photos(val_photos, tmp_path_factory) -> list[Path]:
    """The val photos decoded by Pillow and saved losslessly, plus a 3000x2000 photo the pre-shrink must bring down."""
    from elemental.images import open_image
    from elemental.synthetic import synthetic_photo

    folder = tmp_path_factory.mktemp("png")
    out = []
    for p in val_photos:
        out.append(folder / f"{p.stem}.png")
        open_image(p).save(out[-1])
    out.append(folder / "large-3000x2000.png")
    synthetic_photo("fire", np.random.default_rng(7), size=(3000, 2000)).save(out[-1])
    return out


@pytest.fixture(scope="session")
def realistic_run(tmp_path_factory) -> Path:
    """The pipeline at 384 px on the SmolVLM2-256M-shaped model around the real SmolLM2-135M (cli_process.run_realistic;
    about 5 minutes on 2 cores, once per session): test_real_model and the fidelity tests share it."""
    from cli_process import run_realistic

    return run_realistic(tmp_path_factory.mktemp("real"))
