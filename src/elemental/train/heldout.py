"""Held-out student predictions for the training photos: what the review queue ranks them by.

The run's own model trained on every train photo, so its probabilities there are in-sample (confident even on
a wrong label it memorised) and cleanlab's scores on them would miss exactly the errors a review looks for.
Here the train split is cut into K folds, stratified by label; for each fold the run's own recipe (same config,
same base, same LoRA) trains on the other K-1 folds and the fold is classified by that model, so every train
photo gets probabilities from a model that never saw it (K-fold cross-fitting; K=2 is "the split's other
half"). The cost is K trainings on (K-1)/K of the data, e.g. one full training for K=2; the frozen vision
tower's cache is shared with the run, so no photo goes through the tower twice.

Written to `RUN/heldout_results.json`, evaluate's results format (every train photo once), plus each fold's
adapter and results under `RUN/heldout/fold{k}/`.
"""

from __future__ import annotations

import random
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..classify.base import Prediction
from ..config import RunConfig
from ..data.records import Record, save_split
from ..errors import ElementalError
from ..fileio import write_json_atomic
from ..task import Task

RESULTS_NAME = "heldout_results.json"


def assign_folds(records: list[Record], folds: int, seed: int) -> dict[str, int]:
    """image_id -> fold, each label dealt round-robin over the folds after a seeded shuffle (by id first, so the
    assignment does not depend on file order)."""
    by_label: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_label[r.element].append(r)
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    start = 0
    for label in sorted(by_label):
        members = sorted(by_label[label], key=lambda r: r.image_id)
        rng.shuffle(members)
        for i, r in enumerate(members):
            fold_of[r.image_id] = (start + i) % folds
        start += len(members)  # the next label starts where this one stopped: fold sizes stay within one
    return fold_of


def _fold_dataset(dataset_dir: Path, folder: Path, train: list[Record], held: list[Record]) -> Path:
    """A dataset folder for one fold: its own train.json / val.json, the photos through a link to the dataset's
    images/ (nothing copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images"
    if images.is_symlink() or images.exists():
        images.unlink()
    images.symlink_to((dataset_dir / "images").resolve(), target_is_directory=True)
    save_split(folder / "train.json", train)
    save_split(folder / "val.json", held)
    return folder


def heldout_predictions(cfg: RunConfig, task: Task, folds: int = 2, say: Callable[[str], None] = print
                        ) -> dict[str, Any]:
    """Train K fold models and classify each fold with the model that held it out (module docstring)."""
    from ..evaluate import evaluate_predictions, write_results
    from ..pipeline import evaluate_model, open_classifier
    from ..review import dataset as review_dataset
    from .recipe import train

    if folds < 2:
        raise ElementalError(f"--folds must be at least 2, got {folds}")
    dataset_dir, run = Path(cfg.train.dataset_dir), Path(cfg.train.output_dir)
    records = review_dataset.load_reviewed(dataset_dir, "train", task)
    fold_of = assign_folds(records, folds, cfg.train.seed)
    work = run / "heldout"
    cache_dir = cfg.train.feature_cache_dir or run.parent / ".feature-cache"  # the run's own (recipe._tower_cache)
    predictions: list[dict[str, Any]] = []
    for k in range(folds):
        held = [r for r in records if fold_of[r.image_id] == k]
        rest = [r for r in records if fold_of[r.image_id] != k]
        if not held or len({r.element for r in rest}) < 2:
            raise ElementalError(f"too few train photos for {folds} folds ({len(records)}): use fewer --folds")
        ds = _fold_dataset(dataset_dir, work / f"fold{k}" / "dataset", rest, held)
        fold_cfg = cfg.model_copy(deep=True)
        fold_cfg.train.dataset_dir = ds
        fold_cfg.train.output_dir = work / f"fold{k}" / "run"
        fold_cfg.train.feature_cache_dir = cache_dir
        fold_cfg.train.report_to = "none"  # K side runs would clutter the W&B project; their metrics stay on disk
        fold_cfg.train.merge_final = False
        say(f"heldout: fold {k + 1}/{folds}: training on {len(rest)} photos, predicting {len(held)}")
        train(fold_cfg, task)
        out = fold_cfg.train.output_dir
        final = out / "final"
        clf = (open_classifier(final, task, "hf") if fold_cfg.train.full_finetune
               else open_classifier(Path(cfg.model.base_model), task, "hf", lora_path=out / "lora_adapter"))
        results = evaluate_model(clf, ds, "val", task, work / f"fold{k}" / "results.json", False, say)
        predictions += [{**p, "fold": k} for p in results["predictions"]]
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # nothing resumes a finished fold; the adapter stays
    by_path = {r.image_path: r for r in records}
    ordered = [by_path[p["image_path"]] for p in predictions]
    combined = evaluate_predictions(
        ordered, [Prediction(p["predicted"], p["probabilities"], p["ms"]) for p in predictions], list(task.labels),
        "hf", {})
    for p, src in zip(combined["predictions"], predictions, strict=True):
        p["fold"] = src["fold"]
    combined["heldout"] = {"folds": folds, "fold_sizes": [sum(v == k for v in fold_of.values()) for k in range(folds)],
                           "seed": cfg.train.seed}
    path = run / RESULTS_NAME
    write_results(combined, path, dataset_dir, plot_cm=False)
    write_json_atomic(work / "folds.json", fold_of)
    say(f"heldout: {len(predictions)} train photos predicted by models that held them out: accuracy "
        f"{combined['accuracy']:.3f} vs the labels -> {path}")
    return combined
