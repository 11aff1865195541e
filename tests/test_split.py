"""Stratified split: deterministic, every class with two or more photos in val, proportions kept."""

from __future__ import annotations

import random

import pytest

from elemental.data.records import Record
from elemental.data.split import class_counts, stratified_split
from elemental.errors import ElementalError

SIZES = {"water": 20, "land": 10, "fire": 2, "wood": 1, "metal": 7}


def _records(sizes: dict[str, int] = SIZES) -> list[Record]:
    return [
        Record(image_id=f"{label}{i:03d}", image_path=f"images/{label}{i:03d}.jpg", element=label,
               reason="r", confidence=1.0)
        for label, n in sizes.items()
        for i in range(n)
    ]


def _ids(records: list[Record]) -> list[str]:
    return [r.image_id for r in records]


def test_partition_in_input_order():
    records = _records()
    train, val = stratified_split(records)
    assert sorted(_ids(train) + _ids(val)) == sorted(_ids(records))
    assert not set(_ids(train)) & set(_ids(val))
    order = {r.image_id: i for i, r in enumerate(records)}
    assert [order[i] for i in _ids(train)] == sorted(order[i] for i in _ids(train))
    assert [order[i] for i in _ids(val)] == sorted(order[i] for i in _ids(val))


@pytest.mark.parametrize(
    "fraction, expected_val",
    [
        # round(n * fraction), at least 1 for classes of 2+, never the whole class.
        (0.1, {"water": 2, "land": 1, "fire": 1, "metal": 1}),
        (0.3, {"water": 6, "land": 3, "fire": 1, "metal": 2}),
        (0.9, {"water": 18, "land": 9, "fire": 1, "metal": 6}),
    ],
)
def test_per_class_counts(fraction: float, expected_val: dict[str, int]):
    train, val = stratified_split(_records(), val_fraction=fraction)
    assert class_counts(val) == dict(sorted(expected_val.items()))
    train_counts = class_counts(train)
    assert train_counts == {label: SIZES[label] - expected_val.get(label, 0) for label in sorted(SIZES)}
    assert all(n >= 1 for n in train_counts.values())  # every class, even "wood" with one photo, trains


def test_deterministic_for_a_seed_and_independent_of_input_order():
    records = _records()
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    a = stratified_split(records, seed=3)
    b = stratified_split(records, seed=3)
    c = stratified_split(shuffled, seed=3)
    assert _ids(a[1]) == _ids(b[1])
    assert sorted(_ids(a[1])) == sorted(_ids(c[1]))
    others = [sorted(_ids(stratified_split(records, seed=s)[1])) for s in range(4, 9)]
    assert any(o != sorted(_ids(a[1])) for o in others)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction(fraction: float):
    with pytest.raises(ElementalError, match="val_fraction"):
        stratified_split(_records(), val_fraction=fraction)


def test_class_counts_sorted_by_label():
    assert class_counts(_records()) == {"fire": 2, "land": 10, "metal": 7, "water": 20, "wood": 1}
    assert list(class_counts(_records())) == ["fire", "land", "metal", "water", "wood"]
    assert class_counts([]) == {}
