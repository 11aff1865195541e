"""The `elemental` command: one subcommand per pipeline stage, plus `run` and `demo`.

Thin on purpose: each command turns its flags into config overrides (the seed recipe's underscore
spellings are accepted beside the dashed ones) and calls a function in `elemental.pipeline`.
Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .config import RunConfig, load_config
from .errors import ElementalError
from .task import Task

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune SmolVLM2-500M into an image classifier and ship it to Android as llama.cpp GGUF files.\n\n"
    "Stages: prepare -> train -> merge -> export -> evaluate. `elemental run CONFIG.toml` runs them all; "
    "`elemental demo` runs everything offline on synthetic photos and a tiny model.",
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Run config (TOML); flags override it.")]


def _opt(*names: str, help: str):  # noqa: A002 - mirrors typer's keyword
    """An option under its dashed name and the seed recipe's underscore alias."""
    return typer.Option(*names, help=help, show_default=False)


def _load(config: Path | None, overrides: dict) -> tuple[RunConfig, Task]:
    cfg = load_config(config, overrides)
    return cfg, Task.from_config(cfg.task)


@app.command()
def prepare(
    config: ConfigOpt = None,
    source: Annotated[list[str] | None, _opt("--source", help="Repeatable: folder:PATH (a folder per label, or flat "
                                             "for the teacher), urls:FILE, json:FILE, unsplash, openverse.")] = None,
    query: Annotated[list[str] | None, _opt("--query", help="Search term for unsplash/openverse, repeatable.")] = None,
    output_dir: Annotated[Path | None, _opt("--output-dir", "--output_dir", help="Dataset folder to write.")] = None,
    num_images: Annotated[int | None, _opt("--num-images", "--num_images", help="Cap on photos kept (default "
                                           "1000, or per_class_target x labels).")] = None,
    per_class_target: Annotated[int | None, _opt("--per-class-target", "--per_class_target",
                                                 help="Keep collecting until every class has N photos.")] = None,
    min_confidence: Annotated[float | None, _opt("--min-confidence", "--min_confidence",
                                                 help="Drop labels below this confidence (0..1).")] = None,
    val_fraction: Annotated[float | None, _opt("--val-fraction", "--val_fraction", help="Share for val.")] = None,
    seed: Annotated[int | None, _opt("--seed", help="Split seed.")] = None,
    labeler_model: Annotated[str | None, _opt("--labeler-model", "--labeler_model",
                                              help="Teacher model, e.g. gpt-4o-mini.")] = None,
    labeler_base_url: Annotated[str | None, _opt("--labeler-base-url", "--labeler_base_url",
                                                 help="OpenAI-compatible endpoint (env OPENAI_BASE_URL).")] = None,
    openai_api_key: Annotated[str | None, _opt("--openai-api-key", "--openai_api_key",
                                               help="Teacher API key (better: env OPENAI_API_KEY).")] = None,
    num_workers: Annotated[int | None, _opt("--num-workers", "--num_workers", help="Teacher requests in flight.")]
    = None,
    labeler_temperature: Annotated[float | None, _opt("--labeler-temperature", help="Teacher sampling "
                                                      "temperature (0).")] = None,
    labeler_max_tokens: Annotated[int | None, _opt("--labeler-max-tokens", help="Cap on the teacher's answer "
                                                   "tokens (300).")] = None,
    max_consecutive_failures: Annotated[int | None, _opt("--max-consecutive-failures", help="Failed teacher "
                                                         "requests in a row that stop the run (10).")] = None,
    retry_rejected: Annotated[bool | None, typer.Option("--retry-rejected", help="Ask the teacher again about "
                                                        "photos it rejected before (e.g. for server errors).",
                                                        show_default=False)] = None,
    batch: Annotated[bool | None, typer.Option("--batch/--no-batch", help="Label through the OpenAI Batch API "
                                               "(half price; several batches in flight together).",
                                               show_default=False)] = None,
    batch_max_photos: Annotated[int | None, _opt("--batch-max-photos", help="Photos per batch (250).")] = None,
    batch_poll_interval: Annotated[float | None, _opt("--batch-poll-interval", help="Seconds between polls of "
                                                      "the open batches (30).")] = None,
    batch_max_wait: Annotated[float | None, _opt("--batch-max-wait", help="Seconds to wait for open batches; "
                                                 "then stop (a re-run resumes them). Default: no limit.")] = None,
    batch_fallback: Annotated[str | None, _opt("--batch-fallback", help="none | sync: label photos a failed or "
                                               "expired batch left synchronously, at full price (none).")] = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print the photos to label, the expected tokens "
                                           "and the price (sync and batch); send nothing, write nothing.",
                                           show_default=False)] = False,
    relabel_only: Annotated[bool | None, typer.Option("--relabel-only", help="Re-filter from cached answers; "
                                                      "never call the teacher.", show_default=False)] = None,
    hf_dataset: Annotated[bool | None, typer.Option("--hf-dataset", help="Also write dataset/hf for "
                                                    "datasets.load_from_disk.", show_default=False)] = None,
    label_cache: Annotated[Path | None, _opt("--label-cache", help="SQLite cache of the teacher's answers "
                                             "(default ~/.cache/elemental/labels.sqlite).")] = None,
    allow_private_urls: Annotated[bool | None, typer.Option("--allow-private-urls", help="Let downloads and "
                                                            "redirects reach loopback, private and link-local "
                                                            "addresses (refused by default).",
                                                            show_default=False)] = None,
    max_pixels: Annotated[int | None, _opt("--max-pixels", help="Skip photos with more pixels to decode (100000000; "
                                           "JPEGs are decoded at reduced scale first).")] = None,
    unsplash_api_url: Annotated[str | None, _opt("--unsplash-api-url", help="Unsplash API base URL.")] = None,
    openverse_api_url: Annotated[str | None, _opt("--openverse-api-url", help="Openverse API base URL.")] = None,
) -> None:
    """Collect photos, label them with a vision LLM (cached: never paid twice), filter, de-duplicate and split
    into dataset/ (images/, train.json, val.json, metadata.json, report.html)."""
    from .pipeline import stage_prepare

    if openai_api_key:
        print("warning: --openai-api-key leaves the key in the process list and your shell history; "
              "prefer the OPENAI_API_KEY environment variable", file=sys.stderr)
        os.environ["OPENAI_API_KEY"] = openai_api_key  # process env only: never in config, logs or metadata
    cfg, task = _load(config, {
        "prepare.sources": source or None, "prepare.queries": query or None, "prepare.output_dir": output_dir,
        "prepare.num_images": num_images, "prepare.per_class_target": per_class_target,
        "prepare.min_confidence": min_confidence, "prepare.val_fraction": val_fraction, "prepare.seed": seed,
        "prepare.labeler_model": labeler_model, "prepare.labeler_base_url": labeler_base_url,
        "prepare.num_workers": num_workers, "prepare.batch": batch, "prepare.relabel_only": relabel_only,
        "prepare.labeler_temperature": labeler_temperature, "prepare.labeler_max_tokens": labeler_max_tokens,
        "prepare.max_consecutive_failures": max_consecutive_failures, "prepare.retry_rejected": retry_rejected,
        "prepare.label_cache": label_cache, "prepare.unsplash_api_url": unsplash_api_url,
        "prepare.openverse_api_url": openverse_api_url, "prepare.hf_dataset": hf_dataset,
        "prepare.allow_private_urls": allow_private_urls, "prepare.max_pixels": max_pixels,
        "prepare.batch_max_photos": batch_max_photos, "prepare.batch_poll_interval": batch_poll_interval,
        "prepare.batch_max_wait": batch_max_wait, "prepare.batch_fallback": batch_fallback,
    })
    if estimate:
        from .data.prepare import estimate_labeling

        estimate_labeling(cfg.prepare, task)
        return
    stage_prepare(cfg, task)


@app.command()
def train(
    config: ConfigOpt = None,
    dataset_dir: Annotated[Path | None, _opt("--dataset-dir", "--dataset_dir", help="Dataset folder.")] = None,
    output_dir: Annotated[Path | None, _opt("--output-dir", "--output_dir", help="Run folder to write.")] = None,
    base_model: Annotated[str | None, _opt("--base-model", "--base_model", help="HF id or folder.")] = None,
    image_longest_edge: Annotated[int | None, _opt(
        "--image-longest-edge", "--image_longest_edge",
        help="Image size: 512 (64 image tokens), 384 (36) or 256 (16); kept by merge, export and the phone.")] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", "--batch_size", help="Per-device batch.")] = None,
    gradient_accumulation_steps: Annotated[int | None, _opt(
        "--gradient-accumulation-steps", "--gradient_accumulation_steps", help="Steps per update.")] = None,
    num_epochs: Annotated[float | None, _opt("--num-epochs", "--num_epochs", help="Epochs.")] = None,
    max_steps: Annotated[int | None, _opt("--max-steps", "--max_steps", help="Stop after N steps.")] = None,
    learning_rate: Annotated[float | None, _opt("--learning-rate", "--learning_rate", help="Peak LR.")] = None,
    lora_r: Annotated[int | None, _opt("--lora-r", "--lora_r", help="LoRA rank.")] = None,
    lora_alpha: Annotated[int | None, _opt("--lora-alpha", "--lora_alpha", help="LoRA alpha.")] = None,
    lora_dropout: Annotated[float | None, _opt("--lora-dropout", "--lora_dropout", help="LoRA dropout.")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 mixed precision (CUDA only).",
                                              show_default=False)] = None,
    reason_mode: Annotated[str | None, _opt("--reason-mode", "--reason_mode",
                                            help="multitask | context | none (DESIGN §2).")] = None,
    report_to: Annotated[str | None, _opt("--report-to", "--report_to",
                                          help="wandb | tensorboard | trackio | none.")] = None,
    wandb_project: Annotated[str | None, _opt("--wandb-project", "--wandb_project", help="W&B project.")] = None,
    seed: Annotated[int | None, _opt("--seed", help="Random seed.")] = None,
    logging_steps: Annotated[int | None, _opt("--logging-steps", "--logging_steps",
                                              help="Log loss and learning rate every N steps.")] = None,
    eval_steps: Annotated[int | None, _opt("--eval-steps", "--eval_steps",
                                           help="Validate by label scoring every N steps.")] = None,
    resume: Annotated[bool | None, typer.Option("--resume", help="Continue from the last checkpoint.",
                                                show_default=False)] = None,
    lora_targets: Annotated[str | None, _opt("--lora-targets", "--lora_targets", help=(
        "Comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (text model), connector, "
        "vision; or re:REGEX. Default: all text projections + connector."))] = None,
    full_finetune: Annotated[bool | None, typer.Option("--full-finetune", "--full_finetune", help=(
        "Train connector + text model fully instead of LoRA (vision tower frozen)."), show_default=False)] = None,
    load_in_8bit: Annotated[bool | None, typer.Option("--load-in-8bit", "--load_in_8bit", help=(
        "8-bit base via bitsandbytes (CUDA only)."), show_default=False)] = None,
    load_in_4bit: Annotated[bool | None, typer.Option("--load-in-4bit", "--load_in_4bit", help=(
        "4-bit NF4 base via bitsandbytes, QLoRA (CUDA only)."), show_default=False)] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory (default on).",
        show_default=False)] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help=(
        "Random resized crop, flip, brightness/contrast/saturation jitter (default off)."), show_default=False)]
    = None,
    feature_cache: Annotated[bool | None, typer.Option("--feature-cache/--no-feature-cache", help=(
        "Compute the frozen vision tower's output once per photo and read it back after that (default on; off "
        "by itself with --augment or a training vision tower)."), show_default=False)] = None,
    warmup_ratio: Annotated[float | None, _opt("--warmup-ratio", "--warmup_ratio", help="Warm-up share.")] = None,
    weight_decay: Annotated[float | None, _opt("--weight-decay", "--weight_decay", help="AdamW decay.")] = None,
    rationale_ratio: Annotated[float | None, _opt("--rationale-ratio", "--rationale_ratio",
                                                  help="multitask: share of records also taught their reason.")]
    = None,
    context_dropout: Annotated[float | None, _opt("--context-dropout", "--context_dropout",
                                                  help="context: share of examples without the reason.")] = None,
    early_stopping_patience: Annotated[int | None, _opt(
        "--early-stopping-patience", "--early_stopping_patience",
        help="Stop after N evaluations without better val accuracy.")] = None,
    keep_best: Annotated[bool | None, typer.Option("--keep-best/--keep-last", help=(
        "Ship the best val-accuracy checkpoint (default) or the last."), show_default=False)] = None,
    merge_final: Annotated[bool | None, typer.Option("--merge-final/--no-merge-final", help=(
        "Write OUTPUT/final, the adapter merged into the base (default on)."), show_default=False)] = None,
) -> None:
    """Fine-tune on dataset/ (LoRA by default): writes lora_adapter/, final/, logs/, checkpoints/, metrics.json."""
    from .pipeline import stage_train

    cfg, task = _load(config, {
        "train.dataset_dir": dataset_dir, "train.output_dir": output_dir, "model.base_model": base_model,
        "model.image_longest_edge": image_longest_edge, "train.batch_size": batch_size,
        "train.gradient_accumulation_steps": gradient_accumulation_steps,
        "train.num_epochs": num_epochs, "train.max_steps": max_steps, "train.learning_rate": learning_rate,
        "train.lora_r": lora_r, "train.lora_alpha": lora_alpha, "train.lora_dropout": lora_dropout,
        "train.bf16": bf16, "train.reason_mode": reason_mode, "train.report_to": report_to,
        "train.wandb_project": wandb_project, "train.seed": seed, "train.eval_steps": eval_steps,
        "train.logging_steps": logging_steps, "train.resume": resume,
        "train.lora_targets": lora_targets.split(",") if lora_targets else None,
        "train.full_finetune": full_finetune, "train.load_in_8bit": load_in_8bit, "train.load_in_4bit": load_in_4bit,
        "train.gradient_checkpointing": gradient_checkpointing, "train.augment": augment,
        "train.warmup_ratio": warmup_ratio, "train.weight_decay": weight_decay,
        "train.rationale_ratio": rationale_ratio, "train.context_dropout": context_dropout,
        "train.early_stopping_patience": early_stopping_patience, "train.keep_best": keep_best,
        "train.merge_final": merge_final, "train.feature_cache": feature_cache,
    })
    stage_train(cfg, task)


@app.command()
def merge(
    config: ConfigOpt = None,
    base_model: Annotated[str | None, _opt("--base-model", "--base_model", help="HF id or folder.")] = None,
    lora_path: Annotated[Path | None, _opt("--lora-path", "--lora_path", help="LoRA adapter folder.")] = None,
    output_path: Annotated[Path | None, _opt("--output-path", "--output_path", help="Merged model folder.")] = None,
    dataset_dir: Annotated[Path | None, _opt("--dataset-dir", "--dataset_dir",
                                             help="Val photos for the logits check.")] = None,
) -> None:
    """Fold the LoRA adapter into the base model and prove equality with a logits check."""
    from .pipeline import stage_merge

    cfg, task = _load(config, {"model.base_model": base_model, "export.model_path": output_path,
                               "train.dataset_dir": dataset_dir})
    if lora_path is not None:
        from .lineage import task_for_model

        task = task_for_model(lora_path, task)
    stage_merge(cfg, task, lora_path=lora_path)


@app.command()
def export(
    config: ConfigOpt = None,
    model_path: Annotated[Path | None, _opt("--model-path", "--model_path", help="Merged HF model folder.")] = None,
    output_dir: Annotated[Path | None, _opt("--output-dir", "--output_dir", help="GGUF folder to write.")] = None,
    name: Annotated[str | None, _opt("--name", help="File stem, e.g. SmolVLM2-500M-Element.")] = None,
    quant: Annotated[str | None, _opt(
        "--quant", help="Comma list: Q8_0,Q4_0,Q4_K_M,F16 (Q4_0: ARM repacks it).")] = None,
    mmproj_type: Annotated[str | None, _opt("--mmproj-type", "--mmproj_type",
                                            help="F16 (default), Q8_0 or F32.")] = None,
) -> None:
    """Convert the merged model to llama.cpp GGUF (text model + mmproj) with a manifest for the app."""
    from .lineage import task_for_model
    from .pipeline import stage_export

    cfg, task = _load(config, {
        "export.model_path": model_path, "export.output_dir": output_dir, "export.name": name,
        "export.quant": quant.split(",") if quant else None, "export.mmproj_type": mmproj_type,
    })
    stage_export(cfg, task_for_model(cfg.merged_model_dir(), task))


BackendOpt = Annotated[str | None, typer.Option("--backend", help="hf or gguf (default: from the files).")]


@app.command()
def evaluate(
    config: ConfigOpt = None,
    model_path: Annotated[Path | None, _opt("--model-path", "--model_path",
                                            help="HF model folder, or GGUF folder / manifest.json.")] = None,
    lora_path: Annotated[Path | None, _opt("--lora-path", "--lora_path", help="Adapter for an HF base.")] = None,
    dataset_dir: Annotated[Path | None, _opt("--dataset-dir", "--dataset_dir", help="Dataset folder.")] = None,
    split: Annotated[str, typer.Option("--split", help="val, train, or a JSON file.")] = "val",
    output_path: Annotated[Path | None, _opt("--output-path", "--output_path",
                                             help="Results JSON (with --compare: the comparison JSON).")] = None,
    plot_cm: Annotated[bool, typer.Option("--plot-cm", "--plot_cm", help="Write confusion_matrix.png.")] = False,
    backend: BackendOpt = None,
    quant: Annotated[str | None, typer.Option("--quant", help="GGUF text model quant to use (default: the "
                                              "first one exported).")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help=(
        "Also evaluate the base model zero-shot with the same prompt (hf backend) into <results>_baseline.json "
        "and print the lift."))] = False,
    base_model: Annotated[str | None, _opt("--base-model", "--base_model", help=(
        "The base for --baseline (default: the one recorded with the model)."))] = None,
    compare: Annotated[tuple[Path, Path] | None, typer.Option("--compare", help=(
        "Two results files side by side, with their label agreement; no model is loaded."),
        metavar="A.json B.json", show_default=False)] = None,
    min_accuracy: Annotated[float | None, _opt("--min-accuracy", "--min_accuracy", help=(
        "Exit with code 1 when accuracy is below X (results are written first)."))] = None,
) -> None:
    """Accuracy, macro-F1, top-2, calibration (ECE), per-class P/R/F1, confusion matrix and latency on a split,
    for an HF model or the GGUF files; or, with --compare, two results files side by side."""
    if compare is not None:
        given = [flag for flag, value in (("--model_path", model_path), ("--lora_path", lora_path),
                                          ("--baseline", baseline), ("--base_model", base_model),
                                          ("--min_accuracy", min_accuracy)) if value not in (None, False)]
        if given:
            raise ElementalError(f"--compare reads two results files and loads no model: drop {', '.join(given)}")
        _compare_results_files(*compare, output_path)
        return
    if base_model is not None and not baseline:
        raise ElementalError("--base_model is only used with --baseline")

    from .evaluate import baseline_results_path, compare_results, format_comparison
    from .lineage import baseline_model, evaluation_task
    from .pipeline import evaluate_baseline, evaluate_model, open_classifier
    from .review import dataset as review_dataset

    cfg, task = _load(config, {"train.dataset_dir": dataset_dir})
    path = model_path or cfg.merged_model_dir()
    task = evaluation_task(path, task, backend, lora_path)
    # Everything that can be wrong with the input is checked before a model loads.
    records = review_dataset.load_reviewed(cfg.train.dataset_dir, split, task)
    base = baseline_model(path, lora_path, base_model, backend) if baseline else None
    clf = open_classifier(path, task, backend, lora_path, quant=quant)  # at the geometry it was trained at
    default = "validation_results.json" if clf.backend == "hf" else f"validation_results_{clf.backend}.json"
    out = output_path or Path(default)
    results = evaluate_model(clf, cfg.train.dataset_dir, split, task, out, plot_cm, records=records)
    if base is not None:
        # The base sees the photo as the fine-tune did: a GGUF export's geometry is its manifest's.
        base_results = evaluate_baseline(base, task, cfg.train.dataset_dir, split, baseline_results_path(out),
                                         plot_cm, clf.longest_edge, records=records)
        print(f"\nzero-shot base {base} vs fine-tuned {path} ({clf.backend}), {results['n']} photos:")
        print(format_comparison(compare_results(base_results, results, latency=False),
                                ("baseline", "fine-tuned", "lift")))
    if min_accuracy is not None:
        if results["accuracy"] < min_accuracy:
            print(f"accuracy {results['accuracy']:.3f} < --min_accuracy {min_accuracy:g}", file=sys.stderr)
            raise typer.Exit(code=1)
        print(f"accuracy {results['accuracy']:.3f} >= --min_accuracy {min_accuracy:g}")


def _compare_results_files(a: Path, b: Path, output_path: Path | None, show: int = 10) -> None:
    """`evaluate --compare A B`: the table, the label agreement, the first `show` photos they disagree on
    and, with --output_path, the comparison JSON (with every disagreement)."""
    from .evaluate import agreement, compare_results, disagreements, format_comparison, load_results
    from .fileio import write_json_atomic

    ra, rb = load_results(a), load_results(b)
    agree = agreement(ra, rb, (str(a), str(b)))
    differ = disagreements(ra, rb)
    rows = compare_results(ra, rb)
    n = len(ra["predictions"])
    for name, path, r in (("A", a, ra), ("B", b, rb)):
        print(f"{name}: {path} (backend {r.get('backend', 'n/a')}, {n} photos)")
    print(format_comparison(rows, ("A", "B", "B - A")))
    print(f"label agreement: {agree:.3f} on {n} photos")
    for d in differ[:show]:
        print(f"  differ: {d['image_path']}: truth {d['element']}, A {d['a']}, B {d['b']}")
    if len(differ) > show:
        print(f"  ... and {len(differ) - show} more" + (f" (all in {output_path})" if output_path else ""))
    if output_path is not None:
        write_json_atomic(output_path, {"a": str(a), "b": str(b), "n": n, "agreement": agree, "rows": rows,
                                        "disagreements": differ})
        print(f"comparison -> {output_path}")


def _photo_paths(inputs: list[str]) -> list[Path]:
    """The photos named or found (recursively) in folders: the suffixes `prepare` reads, HEIC/HEIF/AVIF included."""
    from .images import IMAGE_SUFFIXES

    if inputs == ["-"]:
        inputs = [line.strip() for line in sys.stdin if line.strip()]
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise ElementalError(f"photo not found: {p}")
    return out


@app.command()
def classify(
    photos: Annotated[list[str], typer.Argument(help="Photos or folders; '-' reads paths from stdin.")],
    model_path: Annotated[Path, typer.Option("--model-path", "--model_path",
                                             help="HF model folder, or GGUF folder / manifest.json.")],
    config: ConfigOpt = None,
    lora_path: Annotated[Path | None, _opt("--lora-path", "--lora_path", help="Adapter for an HF base.")] = None,
    backend: BackendOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "--top_k", help="Labels to list per photo.")] = 1,
    quant: Annotated[str | None, typer.Option("--quant", help="GGUF text model quant to use (default: the "
                                              "first one exported).")] = None,
) -> None:
    """Classify photos: one JSON line per photo with the label, probabilities and milliseconds.

    A photo that fails on its own (it does not decode, it is over the pixel cap, too wide or tall for the model)
    gets a line {"path", "error"} in its place and an `error:` line on stderr; the others are classified, and the
    exit code is 2 once all are done. The native CLI (the phone's code) does the same, line for line.
    """
    from .images import PHOTO_MAX_SIDE, open_image
    from .lineage import evaluation_task
    from .pipeline import open_classifier

    cfg, task = _load(config, {})
    paths = _photo_paths(photos)
    clf = open_classifier(model_path, evaluation_task(model_path, task, backend, lora_path), backend, lora_path,
                          quant=quant)  # at the geometry the model was trained at
    failed = False
    for p in paths:
        try:
            pred = clf.classify(open_image(p, max_side=PHOTO_MAX_SIDE))  # decoded as `prepare` decodes
        except ElementalError as e:
            message = str(e) if str(e).startswith(str(p)) else f"{p}: {e}"
            print(json.dumps({"path": str(p), "error": message}), flush=True)
            print(f"error: {message}", file=sys.stderr, flush=True)
            failed = True
            continue
        print(json.dumps({"path": str(p), "label": pred.label, "top_k": pred.top_k(top_k),
                          "probabilities": pred.probabilities, "ms": round(pred.ms, 2)}), flush=True)
    if failed:
        raise typer.Exit(2)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config (TOML), e.g. configs/default.toml.")],
    from_stage: Annotated[str | None, typer.Option("--from", help="Re-run from this stage to the end.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run just this stage.")] = None,
) -> None:
    """Run the config's stages in order (prepare, train, merge, export, evaluate); stages whose inputs and
    outputs are unchanged since they last finished are skipped, an interrupted run continues."""
    from .pipeline import format_summary
    from .pipeline import run as run_pipeline

    if from_stage and only:
        raise ElementalError("--from and --only exclude each other")
    cfg = load_config(config)
    results = run_pipeline(cfg, from_stage=from_stage, only=only)
    print("\n".join(format_summary(results["summary"])))
    print(f"summary: {Path(cfg.train.output_dir) / 'run_summary.json'}")
    floor = cfg.evaluate.min_accuracy
    below = {b: r["accuracy"] for b, r in (results["stages"].get("evaluate") or {}).items()
             if floor is not None and r["accuracy"] < floor}
    if below:
        worst = ", ".join(f"{b} {acc:.3f}" for b, acc in below.items())
        print(f"accuracy below evaluate.min_accuracy {floor:g}: {worst}", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
def heldout(
    config: ConfigOpt = None,
    dataset_dir: Annotated[Path | None, _opt("--dataset-dir", "--dataset_dir", help="Dataset folder.")] = None,
    output_dir: Annotated[Path | None, _opt("--output-dir", "--output_dir", help="The run folder.")] = None,
    folds: Annotated[int, typer.Option("--folds", help="K: each fold is predicted by a model trained on the "
                                       "other K-1 (2: the split's other half).")] = 2,
) -> None:
    """Student probabilities for every train photo from models that never trained on it (K-fold), written to
    RUN/heldout_results.json, so `elemental review --run RUN` ranks train photos as well as val ones."""
    from .train.heldout import heldout_predictions

    cfg, task = _load(config, {"train.dataset_dir": dataset_dir, "train.output_dir": output_dir})
    heldout_predictions(cfg, task, folds)


@app.command()
def review(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset folder written by `elemental prepare`.")],
    run: Annotated[Path | None, typer.Option("--run", help=(
        "Training run folder: its out-of-sample predictions put the likely label errors first."))] = None,
    config: ConfigOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (another than 127.0.0.1 exposes the page "
                                      "to the network; the token still guards it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free one).")] = 8765,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL, do not open a browser.")] = False,
) -> None:
    """A local page to check the teacher's labels, likely errors first; every decision goes to reviews.jsonl
    at once and into the train.json / val.json the next `train` reads."""
    from .review.server import serve

    cfg, task = _load(config, {})
    if config is None:  # the labels, in their order (the page's number keys), are the dataset's own
        task = _dataset_task(dataset_dir, cfg) or task
    serve(dataset_dir, task, run, host=host, port=port, open_browser=not no_browser)


def _dataset_task(dataset_dir: Path, cfg: RunConfig) -> Task | None:
    """The task with the labels `prepare` wrote into the dataset's metadata.json (None when it names none)."""
    from .fileio import read_json

    meta = dataset_dir / "metadata.json"
    labels = (read_json(meta, "dataset metadata") or {}).get("labels") if meta.is_file() else None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        return None
    from pydantic import ValidationError

    try:
        return Task.from_config(type(cfg.task).model_validate({**cfg.task.model_dump(), "labels": labels}))
    except ValidationError as e:
        raise ElementalError(f"{meta}: labels: {e.errors()[0]['msg']}") from None


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "--output_dir", help="Where the demo writes.")] = Path(
        "runs/demo"),
    per_class: Annotated[int, typer.Option("--per-class", help="Synthetic photos per label.")] = 60,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the model and the photos.")] = 0,
) -> None:
    """The whole pipeline offline: tiny SmolVLM + synthetic photos, HF and GGUF evaluated, summary printed."""
    from .pipeline import demo as run_demo

    summary = run_demo(output_dir, per_class=per_class, seed=seed)
    print("\n== elemental demo summary ==")
    print(f"HF accuracy (val):    {summary['hf_accuracy']:.3f}")
    print(f"GGUF accuracy (val):  {summary['gguf_accuracy']:.3f}")
    print(f"HF <-> GGUF agreement: {summary['agreement']:.3f}  on {summary['val_photos']} photos")
    lat = summary["latency_ms"]
    print(f"latency p50: HF {lat['hf']['p50']:.1f} ms, GGUF {lat['gguf']['p50']:.1f} ms")
    print(f"time: {summary['seconds']}")
    print(f"summary: {output_dir / 'summary.json'}")
    paths = summary["paths"]
    print(f"check the labels, likely errors first: elemental review {paths['dataset']} --run {paths['run']}")


def main() -> None:
    """Entry point: run the Typer app, turning ElementalError into one line on stderr and exit 2."""
    logging.basicConfig(level=os.environ.get("ELEMENTAL_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()  # standalone: usage errors print and exit 2 as usual
    except ElementalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
