"""The stages as functions of the run config, `run` (all stages in order) and `demo` (offline, end to end).

The CLI only parses flags into a `RunConfig` and calls these; tests call them too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .classify.base import Classifier
from .config import RunConfig
from .data.records import Record
from .errors import ElementalError
from .fileio import read_json, write_json_atomic
from .lineage import is_gguf_path
from .review import dataset as review_dataset
from .runstate import STATE_FILE, RunState, stage_inputs, stage_outputs
from .task import Task

log = logging.getLogger(__name__)
Say = Callable[[str], None]


def open_classifier(
    model_path: Path,
    task: Task,
    backend: str | None = None,
    lora_path: Path | None = None,
    longest_edge: int | None = None,
    quant: str | None = None,
    threads: int | None = None,
) -> Classifier:
    """An `hf` or `gguf` classifier for `model_path` (the backend is guessed from the files if not given)."""
    backend = backend or ("gguf" if is_gguf_path(model_path) else "hf")
    if backend == "gguf":
        from .classify.gguf import GGUFClassifier

        return GGUFClassifier(Path(model_path), quant=quant, n_threads=threads)
    from .classify.hf import HFClassifier

    return HFClassifier.from_path(model_path, task, lora_path=lora_path, longest_edge=longest_edge)


# -- stages ----------------------------------------------------------------------------------------

def stage_prepare(cfg: RunConfig, task: Task, say: Say = print) -> dict:
    from .data.prepare import prepare_dataset

    meta = prepare_dataset(cfg.prepare, task, say)
    if cfg.prepare.hf_dataset:
        from .data.hf_export import export_hf_dataset

        say(f"prepare: Hugging Face dataset at {export_hf_dataset(cfg.prepare.output_dir, task)}")
    teacher = meta.get("teacher") or {}
    cost = teacher.get("estimated_cost_usd")
    spend = ""
    if teacher:
        spend = (f"; teacher {teacher['model']}: {teacher['requests']} requests, {teacher['cache_hits']} cached, "
                 f"{teacher['tokens_in']}+{teacher['tokens_out']} tokens billed, "
                 + (f"≈ ${cost:.4f}" if cost is not None else "unknown price"))
        if teacher["batches_submitted"] or teacher["batch_answers"]:
            spend += (f"; {teacher['batches_submitted']} batches submitted, {teacher['batch_answers']} batch answers, "
                      f"{meta['labels_beyond_target']} labels bought beyond the target")
        if teacher["batch_unanswered"]:
            usd = (teacher.get("batch_unanswered_sync_estimate") or {}).get("sync_usd")
            spend += (f"; {teacher['batch_unanswered']} photos left unanswered by batches "
                      f"{', '.join(teacher['batches_failed']) or ''} (labeling them synchronously: "
                      + (f"≈ ${usd:.4f}" if usd is not None else "unknown price") + ")")
        if teacher["adapted_to_endpoint"]:
            spend += f"; request settings changed for this endpoint: {'; '.join(teacher['adapted_to_endpoint'])}"
    say(f"prepare: {cfg.prepare.output_dir}: {meta['n_train']} train / {meta['n_val']} val photos, "
        f"per class {meta['counts']['total']}, dropped {meta['dropped']}{spend}")
    return meta


def stage_train(cfg: RunConfig, task: Task, say: Say = print) -> dict:
    from .train.recipe import train

    metrics = train(cfg, task)
    if not metrics:  # a non-zero rank of a multi-GPU run: rank 0 reports
        return metrics
    cache = metrics["tower_cache"]
    tower = (f"vision tower cache: {cache['built']} photos built in {cache['build_seconds']:.1f} s, "
             f"{cache['hits']} read back" if cache["used"] else f"vision tower cache off ({cache['why_off']})")
    say(
        f"train: {cfg.train.output_dir} loss {metrics['first_logged_loss']} -> {metrics['last_logged_loss']}, "
        f"val accuracy {metrics['val_accuracy']:.3f} ({metrics['train_seconds']} s); tracking: {metrics['tracking']}; "
        f"{tower}"
    )
    return metrics


def check_photos(cfg: RunConfig, task: Task, n: int = 3) -> list:
    """A few val photos for the merge logits check (synthetic ones when there is no dataset)."""
    from .data.records import load_split
    from .images import open_image

    ds = Path(cfg.train.dataset_dir)
    if (ds / "val.json").is_file():
        recs = load_split(ds, "val", task)[:n]
        return [open_image(ds / r.image_path) for r in recs]
    import numpy as np

    from .synthetic import synthetic_photo

    rng = np.random.default_rng(0)
    return [synthetic_photo(task.labels[i % len(task.labels)], rng) for i in range(n)]


def stage_merge(cfg: RunConfig, task: Task, say: Say = print, lora_path: Path | None = None) -> dict:
    """Merge the adapter into final/, unless final/ already holds this adapter merged (train merges at its end)."""
    from .export.merge import merge, merged_from

    lora = Path(lora_path or Path(cfg.train.output_dir) / "lora_adapter")
    out = cfg.merged_model_dir()
    manifest = merged_from(out, lora, cfg.model.base_model)
    if manifest is None and not lora.exists() and (out / "manifest.json").is_file():
        recorded = read_json(out / "manifest.json", "model manifest")
        if recorded.get("full_finetune"):
            say(f"merge: {out} is a full fine-tune, nothing to merge")
            return recorded
    if manifest is not None:
        say(f"merge: {out} already holds this adapter merged (max |Δlogit| "
            f"{manifest['logits_check']['max_abs_diff']:.2e}); skipped")
        return manifest
    manifest = merge(cfg.model.base_model, lora, out, task, check_photos(cfg, task))
    say(f"merge: {out} (max |Δlogit| adapter vs merged: {manifest['logits_check']['max_abs_diff']:.2e})")
    return manifest


def stage_export(cfg: RunConfig, task: Task, say: Say = print) -> dict:
    from .export.gguf import export_gguf

    ec = cfg.export
    manifest = export_gguf(
        cfg.merged_model_dir(), ec.output_dir, task, name=ec.name, quants=ec.quant,
        mmproj_type=ec.mmproj_type, source_run=str(cfg.train.output_dir),
    )
    sizes = ", ".join(f"{n} {f['size_bytes'] / 1e6:.1f} MB" for n, f in manifest["files"].items())
    say(f"export: {ec.output_dir}: {sizes}")
    return manifest


def evaluate_model(
    classifier: Classifier, dataset_dir: Path, split: str, task: Task, output_path: Path, plot_cm: bool,
    say: Say = print, records: list[Record] | None = None,
) -> dict:
    """Classify every photo of a split and write validation_results.json (+ plots, error gallery).

    `records` is the split already loaded and checked (the CLI reads it before loading a model, so
    a bad split fails in a second, not after the model load); otherwise the split is read here.
    """
    from tqdm import tqdm

    from .evaluate import evaluate_predictions, write_results
    from .images import open_image
    from .review.measure import summary_lines, teacher_vs_person

    unknown = set(classifier.labels) ^ set(task.labels)
    if unknown:
        raise ElementalError(f"model labels {list(classifier.labels)} differ from the task's {list(task.labels)}")
    if records is None:
        records = review_dataset.load_reviewed(Path(dataset_dir), split, task)
    preds = [
        classifier.classify(open_image(Path(dataset_dir) / r.image_path))
        for r in tqdm(records, desc=f"evaluate ({classifier.backend})", unit="photo", leave=False)
    ]
    results = evaluate_predictions(records, preds, classifier.labels, classifier.backend, classifier.model_files())
    if (review := teacher_vs_person(Path(dataset_dir), task, split, results)) is not None:
        results["review"] = review
    write_results(results, output_path, Path(dataset_dir), plot_cm=plot_cm)
    say(
        f"evaluate ({classifier.backend}): accuracy {results['accuracy']:.3f}, macro-F1 {results['macro_f1']:.3f}, "
        f"top-2 {results['top2_accuracy']:.3f}, ECE {results['ece']:.3f}, "
        f"p50 {results['latency_ms']['p50']:.1f} ms -> {output_path}"
    )
    for line in summary_lines(review) if review is not None else []:
        say(line)
    return results


def stage_evaluate(cfg: RunConfig, task: Task, say: Say = print) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for backend in cfg.evaluate.backends:
        model = cfg.export.output_dir if backend == "gguf" else cfg.merged_model_dir()
        # At the geometry the model was trained at (its saved processor / manifest), with a quant that was exported.
        clf = open_classifier(model, task, backend, quant=cfg.export.quant[0], threads=cfg.evaluate.threads)
        out[backend] = evaluate_model(
            clf, cfg.train.dataset_dir, cfg.evaluate.split, task, cfg.results_path(backend),
            cfg.evaluate.plot_cm, say,
        )
    return out


STAGES = {
    "prepare": stage_prepare,
    "train": stage_train,
    "merge": stage_merge,
    "export": stage_export,
    "evaluate": stage_evaluate,
}


ORDER = list(STAGES)


def _saved_result(name: str, cfg: RunConfig) -> dict:
    """What a skipped stage would have returned, read back from the files it wrote."""

    run_dir = Path(cfg.train.output_dir)
    if name == "prepare":
        return read_json(Path(cfg.prepare.output_dir) / "metadata.json", "dataset metadata")
    if name == "train":
        return read_json(run_dir / "metrics.json", "training metrics")
    if name == "merge":
        return read_json(cfg.merged_model_dir() / "manifest.json", "merge manifest")
    if name == "export":
        return read_json(Path(cfg.export.output_dir) / "manifest.json", "GGUF manifest")
    return {b: read_json(cfg.results_path(b), "results") for b in cfg.evaluate.backends}


def _stages_to_run(cfg: RunConfig, from_stage: str | None, only: str | None) -> tuple[list[str], bool]:
    """(stages, forced): `--only` one stage, `--from` a stage to the end, else the config's stages."""
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ElementalError(f"{flag} {value!r}: not a stage; choose from {ORDER}")
    if only:
        return [only], True
    if from_stage:
        return [s for s in cfg.stages if ORDER.index(s) >= ORDER.index(from_stage)], True
    return list(cfg.stages), False


def run(cfg: RunConfig, say: Say = print, from_stage: str | None = None, only: str | None = None) -> dict:
    """Run the config's stages in order, skipping those whose inputs and outputs are unchanged (runstate).

    `from_stage` / `only` force those stages to run. A training run that was interrupted resumes
    from its last checkpoint. Returns each stage's result, wall times, what was skipped and the
    run summary (also written to `<run>/run_summary.json`).
    """
    task = Task.from_config(cfg.task)
    stages, forced = _stages_to_run(cfg, from_stage, only)
    state = RunState(Path(cfg.train.output_dir) / STATE_FILE)
    results: dict = {"stages": {}, "seconds": {}, "skipped": []}
    if Path(cfg.train.dataset_dir).is_dir():
        # Reviews a killed review server saved but never applied: applied before the split is hashed, so the stages
        # run on what the person decided and record that as their input (a prepare that runs applies them too).
        review_dataset.sync(Path(cfg.train.dataset_dir), task)
    for name in stages:
        inputs = stage_inputs(name, cfg, state.hasher)
        why = state.changed(name, inputs, stage_outputs(name, cfg, state.hasher))
        if not why and not forced:
            say(f"{name}: up to date, skipped")
            results["stages"][name] = _saved_result(name, cfg)
            results["skipped"].append(name)
            continue
        say(f"{name}: running ({'forced' if forced else ', '.join(why)})")
        stage_cfg = cfg
        if name == "train" and state.interrupted_with(name, inputs) and not cfg.train.resume:
            say("train: resuming the interrupted run from its last checkpoint")
            stage_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})})
        state.started(name, inputs)
        t0 = time.time()
        results["stages"][name] = STAGES[name](stage_cfg, task, say)
        results["seconds"][name] = round(time.time() - t0, 1)
        complete = results["stages"][name].get("complete", True) if name == "prepare" else True
        state.done(name, inputs, stage_outputs(name, cfg, state.hasher), time.time() - t0, complete)
    results["summary"] = run_summary(cfg, results)
    write_json_atomic(Path(cfg.train.output_dir) / "run_summary.json", results["summary"])
    return results


def run_summary(cfg: RunConfig, results: dict) -> dict:
    """The figures a user checks after a run, from the files the stages wrote (run or skipped)."""
    from .evaluate import agreement

    out: dict = {"seconds": results["seconds"], "skipped": results["skipped"]}
    got = results["stages"]
    if "prepare" in got:
        meta = got["prepare"]
        teacher = meta.get("teacher") or {}
        out["dataset"] = {"train": meta.get("n_train"), "val": meta.get("n_val"),
                          "per_class": (meta.get("counts") or {}).get("total"),
                          "teacher_cost_usd": teacher.get("estimated_cost_usd")}
    if "train" in got:
        m = got["train"]
        out["train"] = {"seconds": m.get("train_seconds"), "val_accuracy": m.get("val_accuracy"),
                        "steps": m.get("steps"), "tokens_per_second": m.get("tokens_per_second")}
    if "export" in got:
        out["gguf_files_mb"] = {n: round(f["size_bytes"] / 1e6, 1) for n, f in got["export"].get("files", {}).items()}
    if "evaluate" in got:
        ev = got["evaluate"]
        out["val"] = {b: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "latency_ms": r["latency_ms"]}
                      for b, r in ev.items()}
        if "hf" in ev and "gguf" in ev:
            out["val"]["hf_gguf_agreement"] = agreement(ev["hf"], ev["gguf"])
    return out


def format_summary(summary: dict) -> list[str]:
    """The run summary as a few printable lines."""
    lines = ["== elemental run summary =="]
    if ds := summary.get("dataset"):
        cost = ds["teacher_cost_usd"]
        lines.append(f"dataset: {ds['train']} train / {ds['val']} val, per class {ds['per_class']}, "
                     f"teacher cost {'n/a' if cost is None else f'${cost:.4f}'}")
    if tr := summary.get("train"):
        lines.append(f"train: {tr['steps']} steps in {tr['seconds']} s, val accuracy {tr['val_accuracy']:.3f}")
    for backend, r in summary.get("val", {}).items():
        if backend == "hf_gguf_agreement":
            lines.append(f"HF <-> GGUF agreement: {r:.3f}")
        else:
            lines.append(f"val ({backend}): accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f}, "
                         f"latency p50 {r['latency_ms']['p50']:.1f} ms / p95 {r['latency_ms']['p95']:.1f} ms")
    if files := summary.get("gguf_files_mb"):
        lines.append("files: " + ", ".join(f"{n} {mb} MB" for n, mb in files.items()))
    lines.append(f"stage seconds: {summary['seconds']}; skipped (up to date): {summary['skipped'] or 'none'}")
    return lines


def evaluate_baseline(
    base_model: str, task: Task, dataset_dir: Path, split: str, output_path: Path, plot_cm: bool,
    longest_edge: int = 512, say: Say = print, records: list[Record] | None = None,
) -> dict:
    """Zero-shot: the base model asked the fine-tune's exact prompt and labels, through the `hf` backend.

    What fine-tuning bought is the lift over this; the results file has the same keys and side files
    as the fine-tune's. `baseline_model` checked the base up front; weights that still fail to load
    (a download cut off, a cache half written) end in one line, not a traceback.
    """
    try:
        clf = open_classifier(Path(base_model), task, "hf", longest_edge=longest_edge)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ElementalError(f"base model {base_model!r} could not be loaded: {first[:200]}") from None
    return evaluate_model(clf, dataset_dir, split, task, output_path, plot_cm, say, records=records)


# -- demo ------------------------------------------------------------------------------------------

def demo_config(out_dir: Path) -> RunConfig:
    """The offline demo's config (configs/demo.toml says the same for out_dir=runs/demo)."""
    out_dir = Path(out_dir)
    return RunConfig.model_validate({
        "model": {"base_model": str(out_dir / "base_model")},
        "prepare": {"sources": [f"folder:{out_dir / 'photos'}"], "output_dir": str(out_dir / "dataset"),
                    "num_images": 1000, "min_confidence": 0.7, "val_fraction": 0.1, "seed": 42},
        "train": {"dataset_dir": str(out_dir / "dataset"), "output_dir": str(out_dir / "run"),
                  "batch_size": 8, "gradient_accumulation_steps": 1, "num_epochs": 4, "learning_rate": 2e-3,
                  "warmup_ratio": 0.05, "report_to": "none", "gradient_checkpointing": False,
                  "logging_steps": 5, "reason_mode": "multitask", "rationale_ratio": 0.3},
        "export": {"output_dir": str(out_dir / "gguf"), "name": "SmolVLM2-Tiny-Element", "quant": ["Q8_0"],
                   "mmproj_type": "F16"},
        "evaluate": {"backends": ["hf", "gguf"], "plot_cm": True},
    })


def demo(out_dir: Path, per_class: int = 60, seed: int = 0, cfg: RunConfig | None = None, say: Say = print) -> dict:
    """Everything offline: tiny SmolVLM + synthetic photos -> prepare -> train -> merge -> export -> evaluate."""
    from .evaluate import agreement
    from .synthetic import build_tiny_model, write_synthetic_photos

    out_dir = Path(out_dir)
    cfg = cfg or demo_config(out_dir)
    task = Task.from_config(cfg.task)
    t0 = time.time()
    build_tiny_model(Path(cfg.model.base_model), task, seed=seed)
    photos = out_dir / "photos"
    if not photos.is_dir():
        write_synthetic_photos(photos, task.labels, per_class, seed=seed)
    say(f"demo: tiny SmolVLM at {cfg.model.base_model}, {per_class} synthetic photos per class at {photos}")
    results = run(cfg, say)
    hf, gg = results["stages"]["evaluate"]["hf"], results["stages"]["evaluate"]["gguf"]
    manifest = results["stages"]["export"]
    summary = {
        "hf_accuracy": hf["accuracy"],
        "gguf_accuracy": gg["accuracy"],
        "agreement": agreement(hf, gg),
        "val_photos": hf["n"],
        "train_val_accuracy": results["stages"]["train"]["val_accuracy"],
        "merge_max_abs_logit_diff": results["stages"]["merge"].get("logits_check", {}).get("max_abs_diff"),
        "latency_ms": {"hf": hf["latency_ms"], "gguf": gg["latency_ms"]},
        "gguf_files": {n: f["size_bytes"] for n, f in manifest["files"].items()},
        "seconds": {**results["seconds"], "total": round(time.time() - t0, 1)},
        "paths": {
            "base_model": str(cfg.model.base_model),
            "dataset": str(cfg.prepare.output_dir),
            "run": str(cfg.train.output_dir),
            "lora_adapter": str(Path(cfg.train.output_dir) / "lora_adapter"),
            "final": str(cfg.merged_model_dir()),
            "gguf": str(cfg.export.output_dir),
            "hf_results": str(cfg.results_path("hf")),
            "gguf_results": str(cfg.results_path("gguf")),
        },
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
