"""The benchmarks' acceptance targets, read from targets.toml beside this file: `load("gguf_speed")["seed_ratio"]`.

The scripts run as `python benchmarks/<script>.py`, which puts this folder on sys.path, so `import targets` finds it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

FILE = Path(__file__).resolve().with_name("targets.toml")


class TargetError(LookupError):
    """A table or key the benchmark reads is not in the targets file (or the file does not parse)."""


class Targets(dict):
    """One table of the file; a missing key raises TargetError naming the file, the table and the key."""

    def __init__(self, data: dict, path: Path, table: str):
        super().__init__({k: Targets(v, path, f"{table}.{k}") if isinstance(v, dict) else v for k, v in data.items()})
        self.path, self.table = path, table

    def __missing__(self, key: str) -> object:
        raise TargetError(f"{self.path}: no key {key!r} in table [{self.table}]")


def load(benchmark: str, path: Path = FILE) -> Targets:
    """The table `[benchmark]` of the targets file at `path`."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: {e}") from e
    if not isinstance(data.get(benchmark), dict):
        raise TargetError(f"{path}: no table [{benchmark}]")
    return Targets(data[benchmark], Path(path), benchmark)
