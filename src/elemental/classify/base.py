"""What every classifier backend returns, and the one rule that turns label scores into a prediction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class Prediction:
    """A valid label, a probability for every label (summing to 1), and the time it took."""

    label: str
    probabilities: dict[str, float]
    ms: float

    def top_k(self, k: int) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


def prediction_from_scores(labels: Sequence[str], logprobs: Sequence[float], ms: float) -> Prediction:
    """Softmax over the labels' log-probabilities (restricted to the closed label set, DESIGN §4)."""
    top = max(logprobs)
    exps = [math.exp(lp - top) for lp in logprobs]
    total = sum(exps)
    probs = {label: e / total for label, e in zip(labels, exps)}
    best = max(range(len(labels)), key=lambda i: logprobs[i])
    return Prediction(label=labels[best], probabilities=probs, ms=ms)


class Classifier(Protocol):
    """The interface `classify` and `evaluate` use; implemented by the `hf` and `gguf` backends."""

    backend: str
    labels: tuple[str, ...]

    def classify(self, image: Image.Image) -> Prediction: ...

    def model_files(self) -> dict[str, str]:
        """Files that define the model, mapped to their sha256 (for result files)."""
        ...
