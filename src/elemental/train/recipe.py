"""`elemental train`: fine-tuning SmolVLM with transformers' Trainer and PEFT (one recipe, one file).

Reads `dataset/{train,val}.json` and trains LoRA adapters (default: the text model's attention and
MLP projections and the connector, never the vision tower by accident; `train.targets`), or with
`full_finetune` the connector and text model themselves, with the loss on the answer tokens only.
Writes the seed's layout: `OUTPUT/lora_adapter/` (adapter + processor with the training geometry +
task.json), `OUTPUT/final/` (merged through the same code as `elemental merge`, or the fully
fine-tuned model), `OUTPUT/logs/`, `OUTPUT/checkpoints/` and `OUTPUT/metrics.json`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer

from ..config import RunConfig
from ..errors import ElementalError
from ..fileio import atomic_dir, write_json_atomic
from ..hardware import BF16_FLAGS, CPU, this_cpu
from ..images import open_image
from ..model_io import load_processor, pick_device
from ..review import dataset as review_dataset
from ..task import Task
from .augment import make_augment
from .callbacks import LabelEvalCallback
from .collate import Collator
from .examples import Example, build_examples
from .targets import lora_target_regex
from .tower_cache import TowerCache, find_tower, why_off

log = logging.getLogger(__name__)

class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


# What each tracker needs installed (wandb is a dependency; the others are the user's choice).
TRACKER_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",)}


def _setup_tracking(cfg: RunConfig, logs_dir: Path) -> tuple[list[str], str]:
    """(report_to, how tracking runs): W&B by default, online when you are logged in (WANDB_API_KEY or
    `wandb login`), offline otherwise (sync later with `wandb sync`).

    A tracker whose package is missing fails here, before the model loads, with the pip command.
    """
    import importlib.util

    tracker = cfg.train.report_to
    if tracker == "none":
        return [], "none"
    if not any(importlib.util.find_spec(m) for m in TRACKER_PACKAGES[tracker]):
        raise ElementalError(f"--report_to {tracker} needs the {TRACKER_PACKAGES[tracker][0]} package: "
                             f"pip install {TRACKER_PACKAGES[tracker][0]} (or --report_to none)")
    if tracker != "wandb":
        return [tracker], tracker
    login = wandb_login()
    if "WANDB_MODE" in os.environ:
        how = f"W&B {os.environ['WANDB_MODE']} (WANDB_MODE)"
    elif login:
        how = f"W&B online (logged in through {login})"
    else:
        os.environ["WANDB_MODE"] = "offline"
        how = f"W&B offline (no WANDB_API_KEY, no `wandb login`): wandb sync {logs_dir}/wandb/offline-run-*"
    log.info("%s", how)
    os.environ.setdefault("WANDB_PROJECT", cfg.train.wandb_project)
    os.environ.setdefault("WANDB_DIR", str(logs_dir))
    return ["wandb"], how


def wandb_login() -> str | None:
    """Where W&B would find an API key: WANDB_API_KEY, or the netrc entry `wandb login` writes; None if nowhere.

    The key itself is never read into anything we log or save.
    """
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return f"{path} ({host})" if entry and entry[2] else None


def training_precision(want_bf16: bool, device: torch.device, cpu: CPU | None = None) -> tuple[bool, str]:
    """(train in bf16?, why) for `--bf16` on this device; the reason is logged and kept in metrics.json.

    bf16 is autocast (fp32 master weights, bf16 matmuls), what `Trainer(bf16=True)` runs. On a CPU it
    pays only with native bf16 instructions: on an Intel Xeon with AVX512-BF16 and AMX-BF16 a LoRA step
    of SmolVLM2-500M at batch 4 took 0.58x the fp32 time, while on a CPU without them bf16 is emulated
    and was 5x slower (benchmarks/cpu_precision.py), so there `--bf16` trains in fp32 and says why.
    """
    if not want_bf16:
        return False, "fp32 (--bf16 not asked for)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"bf16 autocast on {torch.cuda.get_device_name(device)}"
        return False, f"fp32: {torch.cuda.get_device_name(device)} has no bf16"
    if device.type == "cpu":
        cpu = cpu or this_cpu()
        if cpu.native_bf16:
            flags = ", ".join(sorted(cpu.flags & BF16_FLAGS))
            return True, f"bf16 autocast on the CPU (native bf16: {flags})"
        return False, ("fp32: this CPU has no native bf16 (no avx512_bf16/amx_bf16/bf16 in /proc/cpuinfo), where "
                       "bf16 is emulated and measured 5x slower than fp32")
    return False, f"fp32: bf16 is not supported here on {device.type}"


def _training_dtype_flags(cfg: RunConfig, device: torch.device, bf16: bool, why: str) -> dict[str, bool]:
    """TrainingArguments' precision flags for `--bf16` on this device (`training_precision` decided bf16, why)."""
    if cfg.train.bf16:
        (log.info if bf16 else log.warning)("--bf16: training in %s", why)
    # On a CPU the Trainer must be told so: it then autocasts bf16 on the CPU, and under torchrun /
    # `accelerate launch` it joins the gloo process group (without use_cpu it sees world size 1 and
    # every process trains on all the data).
    return {"bf16": bf16, "use_cpu": device.type == "cpu"}


def training_device() -> torch.device:
    """This process's device: its own GPU under torchrun / `accelerate launch` (LOCAL_RANK), else CUDA or CPU."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return pick_device()


def load_model_for_training(base_model: str, device: torch.device, quantize: str | None = None,
                            gradient_checkpointing: bool = False):
    """fp32 master weights (bf16 comes from autocast), the same loader as the real model.

    `quantize` ("8bit"/"4bit") loads the base through bitsandbytes for QLoRA-style training on small
    GPUs; the vision tower and the LM head stay unquantized. bitsandbytes needs CUDA.
    """
    from transformers import AutoModelForImageTextToText

    from ..model_io import check_smolvlm_dir

    check_smolvlm_dir(base_model)
    if quantize is None:
        return AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch.float32).to(device)
    if device.type != "cuda":
        raise ElementalError(f"--load_in_{quantize} needs a CUDA GPU (bitsandbytes); this machine has none: "
                             "drop the flag, LoRA on the full-precision model trains here in fp32")
    try:
        import bitsandbytes  # noqa: F401 - only checking that it is installed
    except ImportError:
        raise ElementalError(f"--load_in_{quantize} needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(
        load_in_8bit=quantize == "8bit", load_in_4bit=quantize == "4bit",
        bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=["vision_model", "lm_head"],
    )
    model = AutoModelForImageTextToText.from_pretrained(
        base_model, quantization_config=quant, dtype=compute, device_map={"": device.index or 0}
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def prepare_trainable(model, cfg: RunConfig):
    """LoRA adapters on the configured targets, or (full fine-tune) everything but the vision tower.

    Returns (model, description of what trains) for metrics.json.
    """
    tc = cfg.train
    if tc.full_finetune:
        for name, param in model.named_parameters():
            param.requires_grad_(".vision_model." not in f".{name}")
        if tc.learning_rate > 1e-4:
            log.warning("full fine-tune with learning rate %g: LoRA's rates are usually too high here (try 2e-5)",
                        tc.learning_rate)
        return model, "full: connector + text model (vision tower frozen)"
    from peft import LoraConfig, get_peft_model

    targets = lora_target_regex(tc.lora_targets)
    lora = LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # PEFT: no module matched
        raise ElementalError(f"lora_targets {tc.lora_targets or 'default'}: {e}") from None
    if tc.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, f"lora: {targets}"


def _count_parameters(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _task_json(cfg: RunConfig, task: Task) -> dict:
    """What later stages need to know about the task (carried by merge into final/)."""
    return {
        "labels": list(task.labels), "instruction": task.instruction,
        "explain_instruction": task.explain_instruction,
        "base_model": str(cfg.model.base_model), "image_longest_edge": cfg.model.image_longest_edge,
    }


class TrackedTrainer(Trainer):
    """transformers' Trainer, plus peak GPU memory on each training log line (CUDA only).

    Loss, grad norm, learning rate and tokens/s (`include_num_input_tokens_seen`) come from
    transformers itself; the memory that decides a user's batch size is added here.
    """

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and torch.cuda.is_available():
            logs["gpu_max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        super().log(logs, start_time)


def process_role(args) -> tuple[int, int]:
    """(this process's rank, number of processes): the one answer every write in training goes by.

    It is the Trainer's (accelerate's) view, checked against torch.distributed, because they have
    disagreed before: a CPU run under torchrun without `use_cpu` had a world-size-2 process group while
    the Trainer saw one process, so both ranks trained on all the data and both wrote `final/`.
    """
    import torch.distributed as dist

    rank, world = args.process_index, args.world_size
    if dist.is_available() and dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise ElementalError(
                f"torch.distributed says process {dist.get_rank()} of {dist.get_world_size()} but the Trainer "
                f"says {rank} of {world}: launch with `torchrun --nproc_per_node N -m elemental train ...` or "
                "`accelerate launch --config_file configs/accelerate/...yaml -m elemental train ...`")
    elif world > 1:
        raise ElementalError(f"the Trainer expects {world} processes but torch.distributed is not initialized")
    return rank, world


def _last_checkpoint(folder: Path, world: int = 1) -> str | None:
    """The newest complete `checkpoint-N` folder (None: nothing to resume, start from scratch).

    The Trainer writes a checkpoint in place: weights, optimizer, then each rank its RNG state, then
    rank 0 `trainer_state.json`. A kill in between leaves a newer folder that cannot be resumed
    exactly, so only folders holding the trainer state and every rank's RNG state count.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    rng = ["rng_state.pth"] if world == 1 else [f"rng_state_{i}.pth" for i in range(world)]
    found = []
    for ckpt in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        step = ckpt.name.rsplit("-", 1)[1]
        if step.isdigit() and all((ckpt / name).is_file() for name in ["trainer_state.json", *rng]):
            found.append((int(step), ckpt))
    if not found:
        log.warning("--resume: no complete checkpoint for %d process(es) in %s, starting from scratch", world, folder)
        return None
    return str(max(found)[1])


def train(cfg: RunConfig, task: Task) -> dict:
    """Run the training recipe described in the module docstring; returns the metrics written."""
    from transformers import TrainingArguments, set_seed

    tc = cfg.train
    dataset_dir, out = Path(tc.dataset_dir), Path(tc.output_dir)
    # Validate everything before the (slow) model load: a bad record fails in seconds. Reviews a killed review
    # server saved but never applied go into the split files first: training reads what the person decided.
    train_records = review_dataset.load_reviewed(dataset_dir, "train", task)
    val_records = review_dataset.load_reviewed(dataset_dir, "val", task)
    if tc.lora_targets is not None:
        lora_target_regex(tc.lora_targets)  # a bad target list fails before the model loads too
    logs_dir = out / "logs"
    report_to, tracking = _setup_tracking(cfg, logs_dir)
    set_seed(tc.seed)
    device = training_device()
    precision = training_precision(tc.bf16, device)  # (bf16?, why): read once, used by the Trainer and metrics
    processor = load_processor(cfg.model.base_model, longest_edge=cfg.model.image_longest_edge)
    if not task.first_tokens_unique(processor.tokenizer):
        log.info("labels share a first token: classifiers will score whole label continuations")
    quantize = "8bit" if tc.load_in_8bit else "4bit" if tc.load_in_4bit else None
    model = load_model_for_training(cfg.model.base_model, device, quantize, tc.gradient_checkpointing)
    model, trains = prepare_trainable(model, cfg)
    n_trainable, n_total = _count_parameters(model)
    log.info("training %s: %d of %d parameters", trains, n_trainable, n_total)

    examples = build_examples(
        train_records, task, tc.reason_mode, tc.rationale_ratio, tc.context_dropout, tc.seed
    )
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        num_train_epochs=tc.num_epochs,
        max_steps=tc.max_steps,
        learning_rate=tc.learning_rate,
        warmup_steps=tc.warmup_ratio,  # transformers 5: a float < 1 is a share of the total steps
        weight_decay=tc.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=tc.logging_steps,
        save_strategy="epoch",
        save_total_limit=1,
        report_to=report_to,
        run_name=out.name,
        remove_unused_columns=False,
        activation_checkpointing=tc.gradient_checkpointing,
        dataloader_num_workers=0,  # augmentation draws from torch's RNG, which checkpoints save
        dataloader_pin_memory=device.type == "cuda",
        include_num_input_tokens_seen="non_padding",
        seed=tc.seed,
        data_seed=tc.seed,
        disable_tqdm=False,
        **_training_dtype_flags(cfg, device, *precision),
    )
    rank, world = process_role(args)
    if rank == 0:  # every other rank writes nothing of ours (the Trainer adds its RNG state to checkpoints)
        logs_dir.mkdir(parents=True, exist_ok=True)
    if world > 1:
        log.info("process %d of %d (%s): %d examples per epoch each, per-device batch %d", rank, world,
                 args.parallel_mode.value, -(-len(examples) // world), tc.batch_size)
    best_dir = out / "checkpoints" / "best_adapter"
    evaluator = LabelEvalCallback(
        processor, task, val_records, [dataset_dir / r.image_path for r in val_records],  # opened per evaluation
        best_dir, tc.eval_steps, tc.early_stopping_patience,
    )
    trainer = TrackedTrainer(
        model=model, args=args, train_dataset=_Examples(examples),
        data_collator=Collator(processor, dataset_dir, make_augment() if tc.augment else None),
        callbacks=[evaluator],
    )
    evaluator.log_fn = trainer.log
    cache, cache_report = _tower_cache(model, cfg, out)
    t0 = time.time()
    resumed_from = _last_checkpoint(out / "checkpoints", world) if tc.resume else None
    try:
        result = trainer.train(resume_from_checkpoint=resumed_from)
    finally:
        if cache is not None:
            cache.remove()
    train_seconds = time.time() - t0
    if cache is not None:
        cache_report.update(cache.summary())
        log.info("vision tower cache: %d photos built in %.1f s, %d read back, %d rebuilt", cache.built,
                 cache.build_seconds, cache.hits, cache.rebuilt)
    if rank != 0:
        return {}  # data-parallel: the other ranks are done; rank 0 writes the outputs and merges
    write_json_atomic(logs_dir / "log_history.json", trainer.state.log_history)

    if tc.full_finetune:
        _save_full_model(model, processor, cfg, task, best_dir if tc.keep_best else None, out / "final")
    else:
        with atomic_dir(out / "lora_adapter") as tmp:
            if tc.keep_best:
                shutil.copytree(best_dir, tmp, dirs_exist_ok=True)
            else:
                model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            write_json_atomic(tmp / "task.json", _task_json(cfg, task))
    state, log_history = trainer.state, trainer.state.log_history
    del trainer, model  # free the training copy before merge loads the base again
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    merged = None
    if tc.merge_final and not tc.full_finetune:
        from ..export.merge import merge

        check = [open_image(dataset_dir / r.image_path) for r in val_records[:3]]
        merged = merge(cfg.model.base_model, out / "lora_adapter", out / "final", task, check)

    losses = [h["loss"] for h in log_history if "loss" in h]
    metrics = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        # The accuracy of what lora_adapter/ (or final/) holds: the best evaluation, or the last one.
        "val_accuracy": evaluator.best_accuracy if tc.keep_best else evaluator.last["accuracy"],
        "best_val_accuracy": evaluator.best_accuracy,
        "best_step": evaluator.best_step,
        "final_val_accuracy": evaluator.last["accuracy"],
        "final_val_loss": evaluator.last["loss"],
        "best_val_loss": min((h["eval_loss"] for h in evaluator.history), default=None),
        "final_val_macro_f1": evaluator.last["macro_f1"],
        "final_val_per_class": evaluator.last["per_class"],
        "final_val_confusion_matrix": evaluator.last["confusion_matrix"],
        "eval_history": evaluator.history,
        "n_train_records": len(train_records),
        "n_train_examples": len(examples),
        "n_val": len(val_records),
        "steps": state.global_step,
        "processes": world,  # data-parallel processes; each ran `steps` optimizer steps on 1/processes of the data
        "per_device_batch_size": tc.batch_size,
        "resumed_from": resumed_from,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(state.num_input_tokens_seen / max(train_seconds, 1e-9), 1),
        "trains": trains,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "device": str(device),
        "precision": "bf16" if args.bf16 else "fp32",
        "precision_reason": precision[1],
        "tracking": tracking,
        "quantized_base": quantize,
        "reason_mode": tc.reason_mode,
        "final": str(out / "final") if (merged or tc.full_finetune) else None,
        "merge_max_abs_logit_diff": merged["logits_check"]["max_abs_diff"] if merged else None,
        "tower_cache": cache_report,
        "config": json.loads(cfg.train.model_dump_json()),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _tower_cache(model, cfg: RunConfig, out: Path) -> tuple[TowerCache | None, dict]:
    """The frozen vision tower's cache (`train.tower_cache`), when it is exact for this run; (cache, report)."""
    off = why_off(model, enabled=cfg.train.feature_cache, augment=cfg.train.augment)
    if off is not None:
        log.info("vision tower cache: off (%s)", off)
        return None, {"used": False, "why_off": off}
    # Beside the run, so another run on the same data (other LoRA settings, a sweep) reads it too; entries are
    # keyed by their input and the tower's weights, so sharing can never serve a wrong one.
    cache = TowerCache(find_tower(model), Path(cfg.train.feature_cache_dir or out.parent / ".feature-cache")).install()
    log.info("vision tower cache: on, in %s", cache.folder)
    return cache, {"used": True}


def _save_full_model(model, processor, cfg: RunConfig, task: Task, best_dir: Path | None, final: Path) -> None:
    """A full fine-tune has nothing to merge: final/ is the (best) model itself, laid out as merge lays it out."""
    from ..synthetic import TINY_MARKER

    with atomic_dir(final) as tmp:
        if best_dir is not None:
            shutil.copytree(best_dir, tmp, dirs_exist_ok=True)
        else:
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json_atomic(tmp / "task.json", _task_json(cfg, task))
        marker = Path(cfg.model.base_model) / TINY_MARKER
        if marker.is_file():
            shutil.copyfile(marker, tmp / TINY_MARKER)
        write_json_atomic(tmp / "manifest.json", {
            "stage": "train", "full_finetune": True, "base_model": str(cfg.model.base_model),
        })
