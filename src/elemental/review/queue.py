"""The review queue: the photos most likely mislabelled by the teacher first.

Order (DESIGN: a person's ten minutes go where the teacher is most likely wrong):
1. photos whose label the student disagrees with, most suspicious first by cleanlab's label-quality score
   (`self_confidence`: the student's probability of the teacher's label) on *out-of-sample* student
   probabilities;
2. the rest below `LOW_CONFIDENCE` teacher confidence, least confident first;
3. everything else, by the same label-quality score, then by teacher confidence.

Out-of-sample means predicted by a model that did not train on the photo. For val photos that is the run's
own evaluation (`validation_results_gguf.json`, what ships, else `validation_results.json`). Train photos were
trained on, so the run's model cannot judge them; they get student probabilities only from a results file
of a model that held them out (`RUN/heldout_results.json`, same format as evaluate's; see the README), and
otherwise are ranked by teacher confidence alone. The queue says which file each photo's probabilities
came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluate import load_results
from .dataset import Photo

LOW_CONFIDENCE = 0.9
# Results files in a run folder whose photos the model did not train on, in order of preference.
VAL_RESULTS = ("validation_results_gguf.json", "validation_results.json")
HELDOUT_RESULTS = "heldout_results.json"


@dataclass
class Item:
    """One photo in the queue, as the page shows it."""

    photo: Photo
    tier: int  # 0: student disagrees, 1: low teacher confidence, 2: the rest
    student: dict[str, float] | None = None  # out-of-sample probabilities per label
    student_label: str | None = None
    score: float | None = None  # cleanlab label quality of the teacher's label (low: likely wrong)
    predictions_from: str | None = None  # the results file the probabilities came from

    def to_json(self) -> dict[str, Any]:
        r = self.photo.record
        return {
            "digest": self.photo.digest, "image_id": r.image_id, "image_path": r.image_path,
            "split": self.photo.split, "teacher": r.element, "reason": r.reason, "confidence": r.confidence,
            "tier": self.tier, "student": self.student, "student_label": self.student_label,
            "score": self.score, "predictions_from": self.predictions_from,
        }


@dataclass
class Queue:
    items: list[Item]
    notes: list[str] = field(default_factory=list)  # what predictions were found, shown on the page


def student_predictions(run_dir: Path | None, labels: list[str]) -> tuple[dict[str, tuple[dict[str, float], str]],
                                                                           list[str]]:
    """image_path -> (probabilities, results file) from a run's out-of-sample results files, and notes."""
    if run_dir is None:
        return {}, ["no --run given: the queue is ordered by teacher confidence alone"]
    run_dir = Path(run_dir)
    found: dict[str, tuple[dict[str, float], str]] = {}
    notes: list[str] = []
    val_file = next((run_dir / n for n in VAL_RESULTS if (run_dir / n).is_file()), None)
    files = [f for f in (val_file, run_dir / HELDOUT_RESULTS) if f is not None and f.is_file()]
    if val_file is None:
        notes.append(f"{run_dir} has no {' or '.join(VAL_RESULTS)}: run `elemental evaluate` to rank val photos")
    if not (run_dir / HELDOUT_RESULTS).is_file():
        notes.append(f"train photos: no held-out predictions ({run_dir / HELDOUT_RESULTS}); "
                     "ordered by teacher confidence")
    for f in files:
        results = load_results(f)
        n = 0
        for p in results["predictions"]:
            probs = p.get("probabilities") or {}
            if set(probs) >= set(labels):
                found[p["image_path"]] = ({k: float(probs[k]) for k in labels}, f.name)
                n += 1
        notes.append(f"student probabilities for {n} photos from {f}")
    return found, notes


def build_queue(all_photos: list[Photo], labels: list[str], run_dir: Path | None) -> Queue:
    """Order the photos for review (module docstring)."""
    from cleanlab.rank import get_label_quality_scores

    preds, notes = student_predictions(run_dir, labels)
    items = [Item(p, tier=2) for p in all_photos]
    scored = [i for i in items if i.photo.record.image_path in preds]
    if scored:
        probs = np.array([[preds[i.photo.record.image_path][0][k] for k in labels] for i in scored], dtype=float)
        probs = np.clip(probs, 1e-12, None)
        probs /= probs.sum(axis=1, keepdims=True)  # cleanlab wants rows summing to 1; scorers' already do
        given = np.array([labels.index(i.photo.record.element) for i in scored])
        quality = get_label_quality_scores(given, probs, method="self_confidence")
        for item, row, q in zip(scored, probs, quality, strict=True):
            item.student = {k: float(v) for k, v in zip(labels, row, strict=True)}
            item.student_label = labels[int(row.argmax())]
            item.score = float(q)
            item.predictions_from = preds[item.photo.record.image_path][1]
    for item in items:
        if item.student_label is not None and item.student_label != item.photo.record.element:
            item.tier = 0
        elif item.photo.record.confidence < LOW_CONFIDENCE:
            item.tier = 1

    def key(item: Item) -> tuple:
        score = item.score if item.score is not None else 1.0
        if item.tier == 1:
            return (1, item.photo.record.confidence, score)
        return (item.tier, score, item.photo.record.confidence)

    items.sort(key=key)  # stable: ties keep the teacher's file order
    return Queue(items, notes)
