"""Validation during training by label scoring (what ships), best-adapter keeping and early stopping.

transformers' own evaluation computes the loss; what a user cares about is whether the model picks
the right label. Every `eval_steps` this callback classifies the val photos exactly as the `hf`
backend does (one pass, label log-probabilities), logs accuracy, macro-F1 and per-class
precision/recall/F1 to every tracker, saves the adapter when accuracy improves and stops training
after `patience` evaluations without improvement.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import TrainerCallback

from ..classify.base import prediction_from_scores
from ..classify.hf import HFClassifier
from ..data.records import Record
from ..evaluate import confusion_matrix_png, evaluate_predictions
from ..images import open_image
from ..task import Task

log = logging.getLogger(__name__)


def label_metrics(model, processor, task: Task, records: Sequence[Record], images: Sequence[Path],
                  rank: int = 0, world: int = 1) -> dict:
    """accuracy / macro-F1 / per-class P/R/F1 of `model` on `records` by label scoring (model left in eval mode).

    Also `loss`: the mean negative log-likelihood of the true label as the answer to the label
    prompt (over the whole vocabulary, not just the labels), the val counterpart of the training
    loss on label examples.

    With `world` data-parallel processes each scores every world-th photo from `rank` on and the
    scores are gathered, so every rank returns the same whole-set results (and takes the same
    early-stopping decision) in 1/world of the time.
    """
    model.eval()
    clf = HFClassifier(model, processor, task)
    mine = []
    for i in range(rank, len(records), world):
        img = open_image(images[i])  # one at a time: a large val set is never all in memory
        t0 = time.perf_counter()
        scores = clf.label_logprobs(img)
        pred = prediction_from_scores(task.labels, scores, (time.perf_counter() - t0) * 1000)
        mine.append((i, pred, -scores[task.labels.index(records[i].element)]))
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        mine = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    preds, nll = [p for _, p, _ in mine], [n for _, _, n in mine]
    results = evaluate_predictions(list(records), preds, task.labels, "hf", {})
    results["loss"] = sum(nll) / len(nll)
    return results


def _wandb_confusion_matrix(cm: dict) -> None:
    """The val confusion matrix as an image in the W&B run (the same PNG `evaluate --plot_cm` writes)."""
    import wandb

    if wandb.run is not None:
        png = Image.open(io.BytesIO(confusion_matrix_png(cm)))
        wandb.run.log({"eval/confusion_matrix": wandb.Image(png)}, commit=False)


class LabelEvalCallback(TrainerCallback):
    """Evaluate by label scoring every `eval_steps`; keep the best adapter in `best_dir`."""

    def __init__(self, processor, task: Task, records: Sequence[Record], images: Sequence[Path],
                 best_dir: Path, eval_steps: int, patience: int | None):
        self.processor, self.task, self.records, self.images = processor, task, records, images
        self.best_dir, self.eval_steps, self.patience = Path(best_dir), eval_steps, patience
        self.best_accuracy = -1.0
        self.best_step = 0
        self.last: dict | None = None
        self.history: list[dict] = []
        self._since_best = 0
        self.log_fn: Callable[[dict[str, float]], None] | None = None  # Trainer.log: reaches W&B and the console

    def _evaluate(self, args, state, control, model) -> None:
        results = label_metrics(model, self.processor, self.task, self.records, self.images,
                                args.process_index, args.world_size)
        model.train()
        # "eval_" keys: transformers' trackers file them under eval/ (W&B: eval/accuracy, the sweep metric).
        logs = {"eval_loss": results["loss"], "eval_accuracy": results["accuracy"],
                "eval_macro_f1": results["macro_f1"]}
        for label, m in results["per_class"].items():
            for key in ("precision", "recall", "f1"):
                logs[f"eval_{label}_{key}"] = m[key]
        self.history.append({"step": state.global_step, **logs})
        self.last = results
        if torch.cuda.is_available():
            logs["eval_gpu_max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.log_fn is not None:
            self.log_fn(logs)
        if "wandb" in (args.report_to or []):
            _wandb_confusion_matrix(results["confusion_matrix"])
        if results["accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_step, self._since_best = results["accuracy"], state.global_step, 0
            if state.is_world_process_zero:  # every rank holds the same gathered results; rank 0 writes
                model.save_pretrained(self.best_dir)
        else:
            self._since_best += 1
            if self.patience is not None and self._since_best >= self.patience:
                log.info("early stopping: no better val accuracy for %d evaluations", self.patience)
                control.should_training_stop = True

    def on_train_begin(self, args, state, control, **kw):
        """On resume, rebuild best/patience/history from the checkpoint's log history (saved atomically with it).

        Without this a resumed run would forget its best accuracy, let a worse evaluation overwrite
        the best adapter, and restart the early-stopping count.
        """
        self.history = [
            {"step": h["step"], **{k: v for k, v in h.items() if k.startswith("eval_") and "gpu" not in k}}
            for h in state.log_history if "eval_accuracy" in h
        ]
        self.best_accuracy, self.best_step, self._since_best = -1.0, 0, 0
        for h in self.history:
            if h["eval_accuracy"] > self.best_accuracy:
                self.best_accuracy, self.best_step, self._since_best = h["eval_accuracy"], h["step"], 0
            else:
                self._since_best += 1
        if self.history:
            log.info("resumed: best val accuracy %.4f at step %d", self.best_accuracy, self.best_step)
        return control

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self._evaluate(args, state, control, model)
        return control

    def on_train_end(self, args, state, control, model=None, **kw):
        if self.last is None or self.history[-1]["step"] != state.global_step:
            self._evaluate(args, state, control, model)
        return control
