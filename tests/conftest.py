"""Shared fixtures: the default task and a tiny SmolVLM built once per test session."""

from __future__ import annotations

from pathlib import Path

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
    """`elemental demo` run once through the real CLI (about a minute); its outputs serve many CLI tests."""
    from cli_process import elemental

    work = tmp_path_factory.mktemp("demo")
    res = elemental("demo", "--output_dir", "out", cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HF <-> GGUF agreement" in res.stdout
    return work / "out"
