"""What `elemental run` has already built, and from what: content hashes of each stage's inputs and outputs.

A stage is up to date when its record in `<run folder>/run_state.json` says it finished, its inputs
(the config sections it reads, the task, and the content of the files it reads) hash as they did
then, and its outputs are still there, unchanged. Changes cascade by content: a stage that re-runs
and writes different files makes the next stage's inputs differ; one that writes the same files
(a deterministic re-run) leaves the rest of the pipeline up to date.

Hashes are of file contents, not times, so touching a file without changing it re-runs nothing.
Recomputing them is cheap on a re-run: a file whose size and mtime are as recorded keeps its hash.
A stage marked started but never finished was interrupted; `run` resumes training from its last
checkpoint when the inputs are still the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import ElementalError
from .fileio import read_json, sha256_file, write_json_atomic
from .review.dataset import TEACHER_FILE

STATE_FILE = "run_state.json"
FORMAT = "elemental-run-state/1"
# Settings that change how a stage runs but not what it produces.
NOT_INPUTS = {
    # How fast or at what price labels are bought does not change which labels a dataset holds.
    "prepare": {"num_workers", "prices", "batch_max_photos", "batch_poll_interval", "batch_max_wait"},
    "train": {"resume", "report_to", "wandb_project", "logging_steps", "feature_cache", "feature_cache_dir"},
    "evaluate": {"threads", "min_accuracy"},
}
MISSING = "missing"


class Hasher:
    """sha256 of files and folders, reusing a known hash while a file's size and mtime are unchanged."""

    def __init__(self, known: dict[str, list] | None = None):
        self.known: dict[str, list] = dict(known or {})  # abs path -> [size, mtime_ns, sha256]

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            st = path.stat()
        except FileNotFoundError:
            return MISSING
        key = str(path)
        hit = self.known.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(path)
        self.known[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def tree(self, path: Path, only: tuple[str, ...] = ()) -> str:
        """One hash over a folder's files (relative names + contents); `only` limits it to those entries."""
        root = Path(path)
        if not root.exists():
            return MISSING
        if root.is_file():
            return self.file(root)
        tops = [root / name for name in only] if only else [root]
        h = hashlib.sha256()
        for top in tops:
            files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
            for p in files:
                h.update(f"{p.relative_to(root).as_posix()}\0{self.file(p)}\n".encode())
        return h.hexdigest()

    def export(self, folder: Path) -> str:
        """An export folder by what it ships: manifest.json and the files it lists. The phone library records its
        sha256 checks in verified.json beside them (native/src/verified.h); that stamp changes no answer, so
        classifying with the native CLI must not make the next run redo export and evaluate."""
        manifest = Path(folder) / "manifest.json"
        try:
            names = tuple(json.loads(manifest.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return self.tree(folder)  # no readable manifest: the whole folder, so any change shows
        return self.tree(folder, ("manifest.json", *names))

    def model(self, name_or_path: str | Path) -> str:
        """A local model folder by content; a hub id by its name (its files are the hub's to version)."""
        p = Path(name_or_path)
        return self.tree(p) if p.exists() else f"hub:{name_or_path}"

    def source(self, spec: str) -> str:
        """A prepare source: local folders and files by content, API sources by their spelling.

        An API source's answers change over time; a prepare that it ended early (rate limit) is
        recorded as incomplete instead (RunState.changed), so the next run collects the rest.
        """
        from .data.sources import source_kind

        kind, arg = source_kind(spec), spec.partition(":")[2].strip()
        if kind == "folder":
            return self.tree(Path(arg))
        if kind in ("urls", "json"):
            return self.file(Path(arg))
        return spec


def _config(cfg: RunConfig, section: str) -> dict:
    data = json.loads(getattr(cfg, section).model_dump_json())
    return {k: v for k, v in data.items() if k not in NOT_INPUTS.get(section, set())}


DATASET_FILES = ("train.json", "val.json", "images")


def stage_inputs(name: str, cfg: RunConfig, h: Hasher) -> dict[str, Any]:
    """What stage `name` reads, each part reduced to a hash or a plain value."""
    task = json.loads(cfg.task.model_dump_json())
    run = Path(cfg.train.output_dir)
    if name == "prepare":
        return {"config": _config(cfg, "prepare"), "task": task,
                "sources": {s: h.source(s) for s in cfg.prepare.sources}}
    if name == "train":
        return {"config": _config(cfg, "train"), "task": task, "model": _config(cfg, "model"),
                "base_model": h.model(cfg.model.base_model),
                "dataset": h.tree(cfg.train.dataset_dir, DATASET_FILES)}
    if name == "merge":
        return {"base_model": h.model(cfg.model.base_model), "adapter": h.tree(run / "lora_adapter"),
                "check_photos": h.tree(cfg.train.dataset_dir, ("val.json",))}
    if name == "export":
        return {"config": _config(cfg, "export"), "model": h.tree(cfg.merged_model_dir())}
    if name == "evaluate":
        inputs = {"config": _config(cfg, "evaluate"), "dataset": h.tree(cfg.train.dataset_dir, DATASET_FILES)}
        if "hf" in cfg.evaluate.backends:
            inputs["model"] = h.tree(cfg.merged_model_dir())
        if "gguf" in cfg.evaluate.backends:
            inputs["gguf"] = h.export(cfg.export.output_dir)
        return inputs
    raise ValueError(name)


def stage_outputs(name: str, cfg: RunConfig, h: Hasher) -> dict[str, str]:
    """What stage `name` writes, as hashes (MISSING where a file or folder is not there)."""
    run = Path(cfg.train.output_dir)
    if name == "prepare":
        # The teacher's split, not the split files: a person's review rewrites those (and metadata's counts), and
        # that must re-run training, not prepare. A dataset from before teacher_labels.json hashes its split files.
        out = Path(cfg.prepare.output_dir)
        if (out / TEACHER_FILE).is_file():
            return {"dataset": h.tree(out, (TEACHER_FILE, "images"))}
        return {"dataset": h.tree(out, (*DATASET_FILES, "metadata.json"))}
    if name == "train":
        trained = run / "final" if cfg.train.full_finetune else run / "lora_adapter"
        return {"model": h.tree(trained), "metrics": h.file(run / "metrics.json")}
    if name == "merge":
        return {"final": h.tree(cfg.merged_model_dir())}
    if name == "export":
        return {"gguf": h.export(cfg.export.output_dir)}
    if name == "evaluate":
        return {b: h.file(cfg.results_path(b)) for b in cfg.evaluate.backends}
    raise ValueError(name)


class RunState:
    """`run_state.json`: per stage its status, input and output hashes, and wall time; plus known file hashes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        data: dict[str, Any] = {}
        if self.path.is_file():
            data = read_json(self.path, "run state")
            if data.get("format") != FORMAT:
                raise ElementalError(f"{self.path}: not an elemental run state (format {data.get('format')!r})")
        self.stages: dict[str, dict] = data.get("stages", {})
        self.hasher = Hasher(data.get("file_hashes", {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        live = {k: v for k, v in self.hasher.known.items() if os.path.exists(k)}
        write_json_atomic(self.path, {"format": FORMAT, "stages": self.stages, "file_hashes": live})

    def changed(self, name: str, inputs: dict, outputs: dict) -> list[str]:
        """Why stage `name` must run ([] when it is up to date)."""
        rec = self.stages.get(name)
        if rec is None:
            return ["never ran"]
        if rec.get("status") == "incomplete":
            return ["an API source stopped early last time (rate limit); collecting the rest"]
        if rec.get("status") != "done":
            return ["interrupted"]
        why = [f"{k} changed" for k in sorted(inputs.keys() | rec["inputs"].keys())
               if inputs.get(k) != rec["inputs"].get(k)]
        why += [f"output {k} {'missing' if outputs.get(k) == MISSING else 'changed'}"
                for k in sorted(outputs.keys() | rec["outputs"].keys()) if outputs.get(k) != rec["outputs"].get(k)]
        return why

    def interrupted_with(self, name: str, inputs: dict) -> bool:
        """Stage `name` started from these very inputs and never finished."""
        rec = self.stages.get(name)
        return bool(rec) and rec.get("status") == "started" and rec.get("inputs") == inputs

    def started(self, name: str, inputs: dict) -> None:
        self.stages[name] = {"status": "started", "inputs": inputs, "started_at": time.time()}
        self.save()

    def done(self, name: str, inputs: dict, outputs: dict, seconds: float, complete: bool = True) -> None:
        """Stage `name` finished; `complete` False (an API source stopped early) makes the next run re-run it."""
        self.stages[name] = {"status": "done" if complete else "incomplete", "inputs": inputs, "outputs": outputs,
                             "seconds": round(seconds, 1), "finished_at": time.time()}
        self.save()
