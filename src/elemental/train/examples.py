"""Training examples from dataset records, per `reason_mode` (DESIGN §2).

The label prompt is the one `Task.prompt("label")` renders, the same string the classifiers and
the GGUF manifest use; reasons become a second target (`multitask`) or, for comparison with the
seed, context inside the prompt (`context`), never a different inference prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..data.records import Record
from ..task import PromptKind, Task


@dataclass(frozen=True)
class Example:
    """One (photo, prompt, answer) triple; `prompt` holds the `<image>` marker where the photo goes."""

    image_path: str
    prompt: str
    answer: str
    kind: PromptKind


def build_examples(
    records: Sequence[Record],
    task: Task,
    reason_mode: Literal["multitask", "context", "none"] = "multitask",
    rationale_ratio: float = 0.5,
    context_dropout: float = 0.5,
    seed: int = 42,
) -> list[Example]:
    """Turn records into examples. Deterministic for a seed, so a resumed run sees the same data."""
    rng = random.Random(seed)
    out: list[Example] = []
    for r in records:
        label_answer = task.label_answer(r.element)
        has_reason = bool(r.reason and r.reason.strip())
        if reason_mode == "context" and has_reason and rng.random() >= context_dropout:
            prompt = task.prompt("context", reason=r.reason)
            out.append(Example(r.image_path, prompt, label_answer, "context"))
        else:
            out.append(Example(r.image_path, task.prompt("label"), label_answer, "label"))
        if reason_mode == "multitask" and has_reason and rng.random() < rationale_ratio:
            out.append(Example(r.image_path, task.prompt("explain"), task.reason_answer(r.reason), "explain"))
    return out
