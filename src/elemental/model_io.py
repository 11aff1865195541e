"""Loading SmolVLM models and processors: the same code for the real model and the tiny one.

The image geometry (DESIGN §3) is applied here and only here: one `longest_edge`-px image, no
tiling, so a photo is `image_seq_len` (64) image tokens and one vision-encoder pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ElementalError


def check_smolvlm_dir(path: str | Path) -> None:
    """Fail with one line unless `path` is a hub id or a folder holding a SmolVLM config."""
    p = Path(path)
    if not p.exists():
        if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
            return  # a hub id such as HuggingFaceTB/SmolVLM2-500M-Video-Instruct
        raise ElementalError(f"model not found: {path}")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ElementalError(f"{p} is not a model folder (no config.json)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError:
        raise ElementalError(f"{cfg}: invalid JSON") from None
    if model_type not in ("smolvlm", "idefics3"):
        raise ElementalError(f"{p} is not a SmolVLM model (config.json model_type={model_type!r})")


def apply_geometry(processor, longest_edge: int):
    """One `longest_edge` image per photo, no tiles: what training, merge, export and the phone share."""
    ip = processor.image_processor
    ip.size = {"longest_edge": longest_edge}
    ip.max_image_size = {"longest_edge": longest_edge}
    ip.do_image_splitting = False
    return processor


def load_processor(path: str | Path, longest_edge: int | None = None):
    """AutoProcessor for a SmolVLM, with our geometry applied when `longest_edge` is given."""
    from transformers import AutoProcessor

    p = Path(path)
    if p.is_dir() and not any((p / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        raise ElementalError(f"{p} has no processor (processor_config.json / preprocessor_config.json)")
    if not p.is_dir():
        check_smolvlm_dir(path)
    processor = AutoProcessor.from_pretrained(str(path))
    if longest_edge is not None:
        apply_geometry(processor, longest_edge)
    return processor


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, bf16: bool | None = None) -> torch.dtype:
    """bf16 on a GPU that supports it (unless disabled), fp32 elsewhere: CPUs here have no native bf16."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported() and bf16 is not False:
        return torch.bfloat16
    return torch.float32


def load_model(path: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """AutoModelForImageTextToText in eval mode on `device` (default: CUDA when present)."""
    from transformers import AutoModelForImageTextToText

    check_smolvlm_dir(path)
    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()
