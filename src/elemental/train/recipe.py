"""`elemental train`: LoRA fine-tuning of SmolVLM with transformers' Trainer and PEFT (one recipe, one file).

Reads `dataset/{train,val}.json`, trains LoRA adapters on the text model's attention and MLP
projections and on the connector (never the vision tower, whose layers share names with the text
model's), with the loss on the answer tokens only, and writes the seed's layout:
`OUTPUT/lora_adapter/` (adapter + processor with the training geometry + task.json),
`OUTPUT/logs/`, `OUTPUT/checkpoints/` and `OUTPUT/metrics.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.records import load_split
from ..fileio import atomic_dir, write_json_atomic
from ..images import open_image
from ..model_io import load_processor, pick_device
from ..task import Task
from .callbacks import LabelEvalCallback
from .collate import Collator
from .examples import Example, build_examples

log = logging.getLogger(__name__)

# Text-model projections and the connector; anchored so SigLIP's q_proj/k_proj/... never match.
LORA_TARGETS = (
    r".*text_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    r"|.*connector\.modality_projection\.proj"
)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def _setup_tracking(cfg: RunConfig, logs_dir: Path) -> list[str]:
    """W&B by default, offline when there is no API key (sync later with `wandb sync`)."""
    if cfg.train.report_to != "wandb":
        return [] if cfg.train.report_to == "none" else [cfg.train.report_to]
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_PROJECT", cfg.train.wandb_project)
    os.environ.setdefault("WANDB_DIR", str(logs_dir))
    return ["wandb"]


def _training_dtype_flags(cfg: RunConfig, device: torch.device) -> dict[str, bool]:
    """bf16 mixed precision only where the hardware has it; CPUs here train in fp32."""
    if cfg.train.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return {"bf16": True}
    if cfg.train.bf16:
        log.warning("--bf16 asked for but this device has no native bf16: training in fp32")
    return {"bf16": False}


def load_model_for_training(base_model: str, device: torch.device):
    """fp32 master weights (bf16 comes from autocast), the same loader as the real model."""
    from transformers import AutoModelForImageTextToText

    from ..model_io import check_smolvlm_dir

    check_smolvlm_dir(base_model)
    return AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch.float32).to(device)


def _last_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` folder (None: nothing to resume, start from scratch)."""
    from transformers.trainer_utils import get_last_checkpoint

    if not folder.is_dir():
        return None
    last = get_last_checkpoint(str(folder))
    if last is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", folder)
    return last


def train(cfg: RunConfig, task: Task) -> dict:
    """Run the training recipe described in the module docstring; returns the metrics written."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    tc = cfg.train
    dataset_dir, out = Path(tc.dataset_dir), Path(tc.output_dir)
    # Validate everything before the (slow) model load: a bad record fails in seconds.
    train_records = load_split(dataset_dir, "train", task)
    val_records = load_split(dataset_dir, "val", task)
    set_seed(tc.seed)
    device = pick_device()
    processor = load_processor(cfg.model.base_model, longest_edge=cfg.model.image_longest_edge)
    if not task.first_tokens_unique(processor.tokenizer):
        log.info("labels share a first token: classifiers will score whole label continuations")
    model = load_model_for_training(cfg.model.base_model, device)
    lora = LoraConfig(
        r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
        target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if tc.gradient_checkpointing:
        model.enable_input_require_grads()
    n_trainable, n_total = model.get_nb_trainable_parameters()

    examples = build_examples(
        train_records, task, tc.reason_mode, tc.rationale_ratio, tc.context_dropout, tc.seed
    )
    logs_dir = out / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        num_train_epochs=tc.num_epochs,
        max_steps=tc.max_steps,
        learning_rate=tc.learning_rate,
        warmup_steps=tc.warmup_ratio,
        weight_decay=tc.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=tc.logging_steps,
        save_strategy="epoch",
        save_total_limit=1,
        report_to=_setup_tracking(cfg, logs_dir),
        run_name=out.name,
        remove_unused_columns=False,
        activation_checkpointing=tc.gradient_checkpointing,
        dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        include_num_input_tokens_seen="non_padding",
        seed=tc.seed,
        data_seed=tc.seed,
        disable_tqdm=False,
        **_training_dtype_flags(cfg, device),
    )
    best_dir = out / "checkpoints" / "best_adapter"
    evaluator = LabelEvalCallback(
        processor, task, val_records, [open_image(dataset_dir / r.image_path) for r in val_records],
        best_dir, tc.eval_steps, tc.early_stopping_patience,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_Examples(examples),
        data_collator=Collator(processor, dataset_dir), callbacks=[evaluator],
    )
    evaluator.log_fn = trainer.log
    t0 = time.time()
    resumed_from = _last_checkpoint(out / "checkpoints") if tc.resume else None
    result = trainer.train(resume_from_checkpoint=resumed_from)
    train_seconds = time.time() - t0

    write_json_atomic(logs_dir / "log_history.json", trainer.state.log_history)
    with atomic_dir(out / "lora_adapter") as tmp:
        if tc.keep_best:
            shutil.copytree(best_dir, tmp, dirs_exist_ok=True)
        else:
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json_atomic(tmp / "task.json", {
            "labels": list(task.labels), "instruction": task.instruction,
            "explain_instruction": task.explain_instruction,
            "base_model": str(cfg.model.base_model), "image_longest_edge": cfg.model.image_longest_edge,
        })
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        # The accuracy of what lora_adapter/ holds (the best evaluation, or the last one).
        "val_accuracy": evaluator.best_accuracy if tc.keep_best else evaluator.last["accuracy"],
        "best_val_accuracy": evaluator.best_accuracy,
        "best_step": evaluator.best_step,
        "final_val_accuracy": evaluator.last["accuracy"],
        "final_val_macro_f1": evaluator.last["macro_f1"],
        "final_val_per_class": evaluator.last["per_class"],
        "final_val_confusion_matrix": evaluator.last["confusion_matrix"],
        "eval_history": evaluator.history,
        "n_train_records": len(train_records),
        "n_train_examples": len(examples),
        "n_val": len(val_records),
        "steps": trainer.state.global_step,
        "resumed_from": resumed_from,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(trainer.state.num_input_tokens_seen / max(train_seconds, 1e-9), 1),
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "device": str(device),
        "reason_mode": tc.reason_mode,
        "config": json.loads(cfg.train.model_dump_json()),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
