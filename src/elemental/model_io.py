"""Loading SmolVLM models and processors: the same code for the real model and the tiny one.

The image geometry (DESIGN §3) is applied here and only here: one `longest_edge`-px image, no
tiling, so a photo is `image_seq_len` (64) image tokens and one vision-encoder pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


DEFAULT_LONGEST_EDGE = 512  # the vision tower's own tile: 64 image tokens


@dataclass(frozen=True)
class VisionGeometry:
    """What the vision tower fixes: its tile (position table side x patch), patch size and pixel-shuffle factor."""

    image_size: int = 512
    patch_size: int = 16
    scale_factor: int = 4

    @property
    def unit(self) -> int:
        """Photo sides must be a multiple of this: whole patches that pixel-shuffle into whole tokens."""
        return self.patch_size * self.scale_factor

    def tokens(self, longest_edge: int) -> int:
        """Image tokens of one `longest_edge`-px image: (side / patch)^2 patches, shuffled by scale^2."""
        return (longest_edge // self.patch_size) ** 2 // self.scale_factor**2

    def check(self, longest_edge: int, where: str = "image_longest_edge") -> None:
        if longest_edge % self.unit or not self.unit <= longest_edge <= self.image_size:
            sizes = ", ".join(str(e) for e in range(self.image_size, self.unit - 1, -self.unit)[:6])
            raise ElementalError(
                f"{where} {longest_edge}: must be a multiple of {self.unit} (patch {self.patch_size} x pixel "
                f"shuffle {self.scale_factor}) from {self.unit} to the vision tower's {self.image_size}, e.g. {sizes}")


def vision_geometry(model: str | Path) -> VisionGeometry:
    """The vision tower's geometry from a model folder's config.json (or a hub id's config)."""
    p = Path(model)
    if (p / "config.json").is_file():
        config = json.loads((p / "config.json").read_text())
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model)).to_dict()
    vision = config.get("vision_config") or {}
    return VisionGeometry(int(vision.get("image_size", 512)), int(vision.get("patch_size", 16)),
                          int(config.get("scale_factor", 4)))


def apply_geometry(processor, longest_edge: int, geometry: VisionGeometry | None = None):
    """One `longest_edge` image per photo, no tiles: what training, merge, export and the phone share.

    512 px (the tower's own tile) is 64 image tokens; 384 is 36 and 256 is 16, one encoder pass over
    fewer patches. The vision embeddings map a smaller patch grid onto the tower's 32x32 position table
    by bucketing, so any multiple of patch x pixel shuffle up to the tile works unchanged in HF.
    """
    geometry = geometry or VisionGeometry()
    geometry.check(longest_edge)
    ip = processor.image_processor
    ip.size = {"longest_edge": longest_edge}
    ip.max_image_size = {"longest_edge": longest_edge}
    ip.do_image_splitting = False
    processor.image_seq_len = geometry.tokens(longest_edge)
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
        apply_geometry(processor, longest_edge, vision_geometry(path))
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
