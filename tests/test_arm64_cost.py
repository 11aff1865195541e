"""benchmarks/arm64_cost.py's per-layer extrapolation: what it counts at each depth and how it adds it up."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from arm64_cost import extrapolate, plan  # noqa: E402

EDGES, TEXTS, MMPROJS, DEPTH = [512, 384, 256], ["Q8_0", "Q4_0"], ["F16", "Q8_0"], (12, 30)


def linear_count(config, depth) -> int:
    """A count that really is fixed + per vision layer + per text layer, each depending only on what it touches."""
    edge, text, mmproj = config
    fixed = 1000 * edge + 7 * len(text) + 3 * len(mmproj)
    vision = edge * edge * (5 if mmproj == "F16" else 6)
    lm = edge * (11 if text == "Q8_0" else 13)
    return fixed + depth[0] * vision + depth[1] * lm


def test_the_cut_counts_recover_the_whole_model_count_of_every_configuration():
    todo, cheapest = plan(EDGES, TEXTS, MMPROJS, DEPTH, full=False)
    counts = {(d, c): linear_count(c, d) for d, configs in todo.items() for c in configs}
    for config in todo[1, 1]:
        assert extrapolate(counts, config, DEPTH, cheapest[1], cheapest[2]) == linear_count(config, DEPTH)


def test_the_plan_counts_each_slope_once_and_the_whole_model_once():
    todo, cheapest = plan(EDGES, TEXTS, MMPROJS, DEPTH, full=False)
    assert cheapest == (256, "Q4_0", "Q8_0")
    assert len(todo[1, 1]) == 12 and todo[DEPTH] == [cheapest]
    assert sorted(todo[2, 1]) == sorted((e, "Q4_0", m) for e in EDGES for m in MMPROJS)  # vision: any text type
    assert sorted(todo[1, 2]) == sorted((e, t, "Q8_0") for e in EDGES for t in TEXTS)  # text: the cheap mmproj
    full, _ = plan(EDGES, TEXTS, MMPROJS, DEPTH, full=True)
    assert list(full) == [DEPTH] and len(full[DEPTH]) == 12
