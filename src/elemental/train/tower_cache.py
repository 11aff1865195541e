"""The frozen vision tower's output, computed once per photo and read back from disk after that.

With the defaults (LoRA on the text model and the connector, the SigLIP tower frozen, no augmentation)
every epoch pushes every photo through the tower again and gets the same numbers out. `TowerCache`
wraps the tower's `forward` on the model instance (the module tree, its state dict and what is saved are
untouched): an image whose output is on disk is read back, the others go through the real tower in one
call, as the uncached path would send them, and are written.

An entry is keyed by what decides the tower's output, so it cannot be served for another input: the
image's pixel tensor and patch mask as the model receives them (the photo, the geometry and the
processor's normalisation), their dtype and the autocast dtype in force, under a folder named by the
digest of the tower's weights (the base model). Entries are safetensors files (read memory-mapped),
written to a temp file and renamed, each holding its key and the sha256 of its tensor: a torn, corrupt or
foreign file is detected, removed and computed again, never trained on. Ranks of a data-parallel run share the
folder: each computes what its own batches need and never waits on another's file.

It is exact only when the tower is frozen and the pixels do not change between epochs: `why_off` says
when it must not be used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.modeling_outputs import BaseModelOutput

log = logging.getLogger(__name__)

TENSOR = "last_hidden_state"


def find_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower of a SmolVLM (plain, PEFT-wrapped or data-parallel-wrapped)."""
    for name, module in model.named_modules():
        if name == "vision_model" or name.endswith(".vision_model"):
            return module
    raise ValueError("no vision_model in this model")


def why_off(model: torch.nn.Module, *, enabled: bool, augment: bool) -> str | None:
    """Why the cache must not be used for this run (None: it is exact and on)."""
    if not enabled:
        return "--no-feature-cache"
    if augment:
        return "--augment changes every photo's pixels each epoch"
    if any(p.requires_grad for p in find_tower(model).parameters()):
        return "the vision tower trains (vision adapters or targets)"
    return None


def tower_digest(tower: torch.nn.Module) -> str:
    """A digest of the tower's weights and buffers: the cache folder, so another base model never reads it."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(_bytes(t))
    return h.hexdigest()[:24]


def _bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes (any dtype, bf16 included, on any device)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


class TowerCache:
    """The on-disk cache of a frozen tower (see the module docstring): `install()` wraps its forward, `remove()`
    undoes that."""

    def __init__(self, tower: torch.nn.Module, root: Path):
        self.tower = tower
        self.folder = Path(root) / tower_digest(tower)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.built = self.rebuilt = 0
        self.build_seconds = 0.0
        self._forward = tower.forward

    def install(self) -> TowerCache:
        """Wrap the tower's forward; an instance attribute, so the module tree and its state dict are untouched."""
        self.tower.forward = MethodType(_cached_forward, self)
        return self

    def remove(self) -> None:
        """Give the tower its own forward back."""
        if self.tower.__dict__.get("forward") is not None:
            del self.tower.forward

    def summary(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "hits": self.hits, "built": self.built, "rebuilt": self.rebuilt,
                "build_seconds": round(self.build_seconds, 3)}

    # -- entries -------------------------------------------------------------------------------
    def key(self, pixels: torch.Tensor, mask: torch.Tensor | None) -> str:
        """What decides one image's output: its pixels and patch mask, their dtype, the autocast dtype."""
        h = hashlib.blake2b(digest_size=20)
        device = pixels.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        h.update(f"{tuple(pixels.shape)}|{pixels.dtype}|{cast}|".encode())
        h.update(_bytes(pixels))
        if mask is not None:
            h.update(_bytes(mask.to(torch.uint8)))
        return h.hexdigest()

    def load(self, key: str) -> torch.Tensor | None:
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:  # memory-mapped
                t, meta = f.get_tensor(TENSOR), f.metadata() or {}
            ok = meta.get("key") == key and meta.get("sha256") == _sha(t)
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            t, ok = None, False
            log.debug("tower cache %s: %s", path.name, e)
        if not ok:
            log.warning("tower cache: %s is corrupt or foreign; computing it again", path.name)
            path.unlink(missing_ok=True)
            self.rebuilt += 1
            return None
        return t

    def save(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        path = self.folder / f"{key}.safetensors"
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        save_file({TENSOR: t}, tmp, metadata={"key": key, "sha256": _sha(t)})
        os.replace(tmp, path)


def _cached_forward(cache: TowerCache, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None,
                    **kwargs: Any) -> BaseModelOutput:
    """The tower's forward, reading what is cached and computing (and caching) the rest in one call.

    An image twice in one batch (a photo's label and rationale examples) is one entry, built once.
    """
    keys = [cache.key(pixel_values[i], None if patch_attention_mask is None else patch_attention_mask[i])
            for i in range(pixel_values.shape[0])]
    first = {k: keys.index(k) for k in dict.fromkeys(keys)}  # each entry's first image in the batch
    found = {k: cache.load(k) for k in first}
    missing = [k for k, t in found.items() if t is None]
    cache.hits += len(keys) - sum(keys.count(k) for k in missing)
    if missing:
        t0 = time.perf_counter()
        if len(missing) == len(found):  # nothing cached: the whole batch, exactly as the uncached path sends it
            out = cache._forward(pixel_values=pixel_values, patch_attention_mask=patch_attention_mask, **kwargs)
            states = {k: out.last_hidden_state[first[k]] for k in missing}
        else:
            idx = torch.tensor([first[k] for k in missing], device=pixel_values.device)
            mask = None if patch_attention_mask is None else patch_attention_mask[idx]
            out = cache._forward(pixel_values=pixel_values[idx], patch_attention_mask=mask, **kwargs)
            states = dict(zip(missing, out.last_hidden_state, strict=True))
        for k, t in states.items():
            found[k] = t
            cache.save(k, t)
        cache.built += len(missing)
        cache.build_seconds += time.perf_counter() - t0
        if len(missing) == len(found):
            return out
    return BaseModelOutput(last_hidden_state=torch.stack([found[k].to(pixel_values.device) for k in keys]))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(_bytes(t)).hexdigest()

