"""Stratified train/val split: every class is represented in val, in its own proportion.

A plain random 90/10 split (the seed's) can leave a rare class out of val entirely, so its
accuracy is never measured. Here each class is split on its own: `round(n * val_fraction)`
photos go to val, at least one when the class has two or more, and at least one stays in train.
The split depends only on the records' ids and the seed, not on their order in the input.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from ..errors import ElementalError
from .records import Record


def stratified_split(
    records: Sequence[Record], val_fraction: float = 0.1, seed: int = 42
) -> tuple[list[Record], list[Record]]:
    """Split into (train, val), both in the input order; deterministic for a seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ElementalError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_class[r.element].append(i)
    rng = random.Random(seed)
    val_index: set[int] = set()
    for label in sorted(by_class):
        # Sorting by id first makes the draw independent of the input order.
        members = sorted(by_class[label], key=lambda i: (records[i].image_id, i))
        rng.shuffle(members)
        n = len(members)
        n_val = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
        val_index.update(members[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_index]
    val = [r for i, r in enumerate(records) if i in val_index]
    return train, val


def class_counts(records: Sequence[Record]) -> dict[str, int]:
    """Number of records per label, sorted by label name (stable output for metadata and logs)."""
    counts = Counter(r.element for r in records)
    return {label: counts[label] for label in sorted(counts)}
