"""The teacher measured against the person: what `evaluate` reports once photos were reviewed.

Two questions a user has after reviewing: how good was the teacher (is reviewing more worth it?), and how
good is the student against labels a person vouched for rather than against the teacher's.
- `teacher`: over every reviewed photo (train and val), the share whose label the person kept; a drop counts
  as a disagreement (the teacher kept a photo the person would not). Per class, by the teacher's label. The
  queue shows likely errors first, so on a partly reviewed dataset this is a lower bound on the teacher's
  accuracy, and the report says so.
- `student`: on the evaluated split, accuracy against the teacher's labels (all photos still in the split)
  and against the person's (the reviewed ones), with the teacher's accuracy on those same photos beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..task import Task
from . import dataset, log


def teacher_vs_person(dataset_dir: Path, task: Task, split: str, results: dict[str, Any]) -> dict[str, Any] | None:
    """The `review` block of evaluate's results for `split` (train/val), or None when nothing was reviewed."""
    if split not in dataset.SPLITS:  # a split file given by path: not the dataset's own photos
        return None
    standing = log.states(log.read(dataset_dir))
    if not standing:
        return None
    photos = dataset.photos(dataset_dir, task)
    per_class = {label: {"reviewed": 0, "agreed": 0} for label in task.labels}
    for p in photos:
        d = standing.get(p.digest)
        if d is not None:
            per_class[p.record.element]["reviewed"] += 1
            per_class[p.record.element]["agreed"] += dataset.outcome(d, p.record.element) == "accepted"
    reviewed = sum(c["reviewed"] for c in per_class.values())
    agreed = sum(c["agreed"] for c in per_class.values())
    by_path = {p.record.image_path: p for p in photos if p.split == split}
    vs_teacher: list[bool] = []
    vs_person: list[tuple[bool, bool]] = []  # (student right, teacher right) against the person
    for pred in results["predictions"]:
        photo = by_path.get(pred["image_path"])
        if photo is None:  # a record added to the split file by hand: the teacher's label is not known
            continue
        vs_teacher.append(pred["predicted"] == photo.record.element)
        d = standing.get(photo.digest)
        if d is not None and d.action != "drop":
            vs_person.append((pred["predicted"] == d.new, photo.record.element == d.new))
    dropped = sum(1 for p in by_path.values() if (d := standing.get(p.digest)) is not None and d.action == "drop")
    return {
        "teacher": {
            "reviewed": reviewed,
            "agreement": agreed / reviewed if reviewed else None,
            "per_class": {label: {**c, "agreement": c["agreed"] / c["reviewed"] if c["reviewed"] else None}
                          for label, c in per_class.items()},
            "of_photos": len(photos),
        },
        "student": {
            "split": split,
            "accuracy_vs_teacher": sum(vs_teacher) / len(vs_teacher) if vs_teacher else None,
            "n": len(vs_teacher),
            "reviewed": len(vs_person),
            "dropped": dropped,
            "accuracy_vs_person": sum(s for s, _ in vs_person) / len(vs_person) if vs_person else None,
            "teacher_accuracy_vs_person": sum(t for _, t in vs_person) / len(vs_person) if vs_person else None,
        },
    }


def summary_lines(block: dict[str, Any]) -> list[str]:
    """What evaluate prints under its accuracy line."""
    t, s = block["teacher"], block["student"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"teacher vs person: kept {pct(t['agreement'])} of {t['reviewed']} reviewed photos (of {t['of_photos']}; "
             "the queue shows likely errors first, so a lower bound)"]
    lines.append("  per class: " + ", ".join(f"{label} {pct(c['agreement'])} ({c['reviewed']})"
                                             for label, c in t["per_class"].items() if c["reviewed"]))
    lines.append(f"student on {s['split']}: accuracy vs teacher {pct(s['accuracy_vs_teacher'])} ({s['n']} photos); "
                 f"vs person {pct(s['accuracy_vs_person'])} on {s['reviewed']} reviewed "
                 f"(teacher {pct(s['teacher_accuracy_vs_person'])} on the same)")
    return lines
