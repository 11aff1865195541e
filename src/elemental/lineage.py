"""Where a model folder came from: the task it answers and the base model it was fine-tuned from.

Read from the files the stages leave behind: train's `task.json` (carried by merge into `final/`),
merge's `manifest.json`, and a GGUF export's `manifest.json`. Evaluating with the model's own task
(not the config's) is what makes a score mean what it says.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ElementalError
from .fileio import read_json
from .task import BOS, IMAGE_TOKEN, Task


def task_for_model(model_path: Path, fallback: Task) -> Task:
    """The task an HF model was trained for (task.json, written by train and carried by merge), else `fallback`."""
    p = Path(model_path) / "task.json"
    if not p.is_file():
        return fallback
    data = json.loads(p.read_text())
    return Task(tuple(data["labels"]), data["instruction"], data["explain_instruction"])


def is_gguf_path(model_path: Path) -> bool:
    p = Path(model_path)
    return (p.is_file() and p.suffix == ".json") or (p.is_dir() and any(p.glob("*.gguf")))


def evaluation_task(model_path: Path, fallback: Task, backend: str | None = None,
                    lora_path: Path | None = None) -> Task:
    """The task a model answers: a GGUF export's manifest, an adapter's or HF model's task.json, else `fallback`.

    The model's own labels and prompt, not the config's: otherwise a score, or a baseline "with the same
    prompt", would measure a question the model was never trained to answer.
    """
    backend = backend or ("gguf" if is_gguf_path(model_path) else "hf")
    if backend == "gguf":
        from .classify.gguf import load_manifest

        folder, manifest = load_manifest(model_path)
        return task_from_manifest(manifest, folder / "manifest.json", fallback)
    if lora_path is not None and (Path(lora_path) / "task.json").is_file():
        return task_for_model(lora_path, fallback)
    return task_for_model(model_path, fallback)


def task_from_manifest(manifest: dict, where: Path, fallback: Task) -> Task:
    """Rebuild the task from a GGUF manifest's labels and rendered prompt (it ships no instruction field).

    The label prompt is `{BOS}User: {instruction}<image>...`; the rebuilt task must render that prompt
    byte for byte, or the manifest was not written by this code. Only the label prompt is recovered:
    the explain prompt is training-only, so `fallback`'s stands in.
    """
    prompt, labels = manifest.get("prompt"), manifest.get("labels")
    head = f"{BOS}User: "
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise ElementalError(f"{where}: labels: expected a list of at least two label strings")
    if not isinstance(prompt, str) or not prompt.startswith(head) or IMAGE_TOKEN not in prompt:
        raise ElementalError(f"{where}: prompt: not an elemental label prompt ({head}...{IMAGE_TOKEN}...)")
    task = Task(tuple(labels), prompt[len(head):prompt.index(IMAGE_TOKEN)], fallback.explain_instruction)
    if task.prompt("label") != prompt:
        raise ElementalError(f"{where}: prompt: does not have the layout of an elemental label prompt")
    return task


def baseline_model(model_path: Path, lora_path: Path | None = None, override: str | None = None,
                   backend: str | None = None) -> str:
    """The model a fine-tune started from, for `evaluate --baseline`, checked to be loadable.

    Base + `--lora_path`: the base itself. A GGUF export: its manifest's `base_model`. A merged HF
    folder: merge's manifest.json, else train's task.json. `override` (`--base_model`) beats them all,
    for a recorded relative path or a base that has moved. Checked before any evaluation runs, so a
    missing base costs a second, not a full evaluation of the fine-tune first.
    """
    model_path = Path(model_path)
    backend = backend or ("gguf" if is_gguf_path(model_path) else "hf")
    base: str | None = None
    if override:
        base, source = str(override), "--base_model"
    elif lora_path is not None:
        base, source = str(model_path), "--model_path (the base of --lora_path)"
    elif backend == "gguf":
        from .classify.gguf import load_manifest

        folder, manifest = load_manifest(model_path)
        base, source = manifest.get("base_model"), str(folder / "manifest.json")
    else:
        source = f"{model_path}/manifest.json or task.json"
        for name in ("manifest.json", "task.json"):
            if (model_path / name).is_file():
                recorded = read_json(model_path / name, "model manifest")
                base = recorded.get("base_model") if isinstance(recorded, dict) else None
                if base:
                    source = str(model_path / name)
                    break
    if not base or not isinstance(base, str):
        raise ElementalError(f"no base_model recorded in {source}: pass --base_model for --baseline")
    _check_loadable(base, source)
    return base


def _check_loadable(base: str, source: str) -> None:
    """A local SmolVLM folder, or a hub id whose config can be fetched (or is cached when offline).

    `org/name` may be a relative folder or a hub id, so a miss says both.
    """
    from .model_io import check_smolvlm_dir

    if not Path(base).exists():
        missing = (f"base model {base!r} (from {source}) is not a folder here (a relative path is from where "
                   "the fine-tune ran)")
        if not (base.count("/") == 1 and not base.startswith((".", "/"))):
            raise ElementalError(f"{missing}: pass --base_model")
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(base)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ElementalError(f"{missing}, nor loadable from the Hugging Face hub or its cache "
                                 f"({first[:160]}): pass --base_model") from None
    check_smolvlm_dir(base)
