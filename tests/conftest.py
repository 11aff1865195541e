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
