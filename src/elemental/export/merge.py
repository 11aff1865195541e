"""`elemental merge`: fold the LoRA adapter into the base model, and prove the result is the same model.

The proof is a logits check: the adapter model and the merged model (saved and reloaded from disk)
see the same photos and prompt; max |Δlogit| is printed and written to the output's manifest.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..errors import ElementalError
from ..fileio import atomic_dir, read_json, sha256_file, write_json_atomic
from ..model_io import check_smolvlm_dir, load_model, load_processor, pick_device
from ..synthetic import TINY_MARKER
from ..task import Task

# fp32 merge_and_unload reorders a few float operations: ~1e-6 on the tiny model; far above that is a bug.
MAX_LOGIT_DIFF = 1e-3


def _adapter_base(lora_path: Path) -> str:
    cfg = read_json(lora_path / "adapter_config.json", "LoRA adapter config")
    return str(cfg.get("base_model_name_or_path") or "")


def _same_base(requested: str, recorded: str) -> bool:
    if requested == recorded:
        return True
    a, b = Path(requested), Path(recorded)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def adapter_sha256(lora_path: Path) -> str:
    """Identity of an adapter's weights: a merged folder records it, so the same merge is never redone."""
    return sha256_file(Path(lora_path) / "adapter_model.safetensors")


def merged_from(output_path: Path, lora_path: Path, base_model: str) -> dict | None:
    """The merge manifest in `output_path` when it was merged from this very adapter and base, else None."""
    manifest_path = Path(output_path) / "manifest.json"
    weights = Path(lora_path) / "adapter_model.safetensors"
    if not (manifest_path.is_file() and weights.is_file()):
        return None
    manifest = read_json(manifest_path, "merge manifest")
    same = (manifest.get("stage") == "merge" and manifest.get("adapter_sha256") == adapter_sha256(lora_path)
            and _same_base(str(base_model), str(manifest.get("base_model", ""))))
    return manifest if same else None


@torch.no_grad()
def _logits(model, processor, prompt: str, images: Sequence[Image.Image]) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = []
    for img in images:
        enc = processor(text=[prompt], images=[[img]], return_tensors="pt").to(device)
        outs.append(model(**enc).logits[0].float().cpu())
    return torch.stack(outs)


def merge(
    base_model: str,
    lora_path: Path,
    output_path: Path,
    task: Task,
    check_images: Sequence[Image.Image],
    device: str | None = None,
) -> dict:
    """Merge `lora_path` into `base_model`, save to `output_path`, and check logits on `check_images`."""
    from peft import PeftModel

    lora_path, output_path = Path(lora_path), Path(output_path)
    if not (lora_path / "adapter_config.json").is_file():
        raise ElementalError(f"{lora_path} is not a LoRA adapter folder (no adapter_config.json)")
    check_smolvlm_dir(base_model)
    recorded = _adapter_base(lora_path)
    if recorded and not _same_base(str(base_model), recorded):
        raise ElementalError(
            f"adapter {lora_path} was trained on {recorded!r}, not on --base_model {base_model!r}"
        )
    dev = pick_device(device)
    dtype = torch.float32  # merge in fp32: the merged weights are what every later stage is built from
    # The adapter folder carries the processor with the training geometry: it is what ships.
    processor = load_processor(lora_path)
    peft_model = PeftModel.from_pretrained(load_model(base_model, dev, dtype), str(lora_path)).eval()
    prompt = task.prompt("label")
    before = _logits(peft_model, processor, prompt, check_images)
    merged = peft_model.merge_and_unload()
    with atomic_dir(output_path) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # What the merged folder inherits: the task it was trained for and, for the locally built
        # tiny model, the marker that tells export how llama.cpp should treat its tokenizer.
        for carried in (lora_path / "task.json", Path(base_model) / TINY_MARKER):
            if carried.is_file():
                shutil.copyfile(carried, tmp / carried.name)
        reloaded = load_model(tmp, dev, dtype)
        after = _logits(reloaded, processor, prompt, check_images)
        max_diff = float((before - after).abs().max())
        manifest = {
            "stage": "merge",
            "base_model": str(base_model),
            "lora_path": str(lora_path),
            "adapter_sha256": adapter_sha256(lora_path),
            "logits_check": {"n_images": len(check_images), "max_abs_diff": max_diff, "dtype": str(dtype)},
        }
        if max_diff > MAX_LOGIT_DIFF:
            raise ElementalError(
                f"merged model differs from the adapter model: max |Δlogit| {max_diff:.2e} > {MAX_LOGIT_DIFF}"
            )
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest

