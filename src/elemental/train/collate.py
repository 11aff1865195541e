"""Batch collation: prompt tokens come from the processor exactly as at inference; loss only on the answer.

Each example is encoded as `processor(prompt, image)` (the same call the `hf` classifier makes)
followed by the answer's token ids. Labels are -100 everywhere except the answer tokens (the label,
or the reason, and the end-of-utterance token), so prompt, image tokens and padding never train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..images import open_image
from .examples import Example

IGNORE_INDEX = -100


def encode_example(processor, prompt: str, image, answer: str) -> dict[str, torch.Tensor]:
    """input_ids/labels (1-D) plus pixel tensors for one example."""
    enc = processor(text=[prompt], images=[[image]], return_tensors="pt")
    prompt_ids = enc["input_ids"][0]
    answer_ids = torch.tensor(processor.tokenizer.encode(answer, add_special_tokens=False), dtype=torch.long)
    input_ids = torch.cat([prompt_ids, answer_ids])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[len(prompt_ids):] = answer_ids
    out = {"input_ids": input_ids, "labels": labels, "pixel_values": enc["pixel_values"][0]}
    if "pixel_attention_mask" in enc:
        out["pixel_attention_mask"] = enc["pixel_attention_mask"][0]
    return out


class Collator:
    """Loads the photos of a batch (augmented when `augment` is given), encodes each example, right-pads."""

    def __init__(self, processor, dataset_dir: Path, augment: Callable[[Image.Image], Image.Image] | None = None):
        self.processor = processor
        self.dataset_dir = Path(dataset_dir)
        self.pad_id = processor.tokenizer.pad_token_id
        self.augment = augment

    def _photo(self, ex: Example) -> Image.Image:
        image = open_image(self.dataset_dir / ex.image_path)
        return self.augment(image) if self.augment is not None else image

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        items = [encode_example(self.processor, ex.prompt, self._photo(ex), ex.answer) for ex in batch]
        longest = max(len(it["input_ids"]) for it in items)
        n = len(items)
        input_ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            input_ids[i, :k] = it["input_ids"]
            labels[i, :k] = it["labels"]
            attention[i, :k] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        }
        if "pixel_attention_mask" in items[0]:
            out["pixel_attention_mask"] = torch.stack([it["pixel_attention_mask"] for it in items])
        return out
