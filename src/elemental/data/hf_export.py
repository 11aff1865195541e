"""Export a prepared dataset as a Hugging Face `datasets.DatasetDict` (train / validation), saved to disk.

For people who train with other tools: `datasets.load_from_disk("dataset/hf")` gives the photos as
an `Image` column next to `element`, `reason` and `confidence`. The seed layout stays the source of
truth; this is a derived copy, written atomically beside it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ElementalError
from ..fileio import atomic_dir
from ..task import Task
from .records import load_split

SPLITS = {"train": "train", "val": "validation"}


def export_hf_dataset(dataset_dir: Path, task: Task, out_dir: Path | None = None) -> Path:
    """Write `dataset_dir/hf` (or `out_dir`) with `DatasetDict.save_to_disk`; returns the folder."""
    try:
        import datasets
    except ImportError:
        raise ElementalError("the Hugging Face export needs the `datasets` package: pip install datasets") from None
    dataset_dir = Path(dataset_dir)
    out_dir = Path(out_dir or dataset_dir / "hf")
    features = datasets.Features({
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "element": datasets.ClassLabel(names=list(task.labels)),
        "reason": datasets.Value("string"),
        "confidence": datasets.Value("float32"),
    })
    parts = {}
    for split, name in SPLITS.items():
        rows = [
            {"image": str(dataset_dir / r.image_path), "image_id": r.image_id, "element": r.element,
             "reason": r.reason, "confidence": r.confidence}
            for r in load_split(dataset_dir, split, task)
        ]
        parts[name] = datasets.Dataset.from_list(rows, features=features)
    with atomic_dir(out_dir) as tmp:
        datasets.DatasetDict(parts).save_to_disk(str(tmp))
    return out_dir
