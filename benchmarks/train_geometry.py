"""Training cost of our image geometry vs HF's default SmolVLM2 processor (issue 4, "Speed"; DESIGN §3).

Run:  .venv/bin/python benchmarks/train_geometry.py [--model-dir DIR] [--steps 3]

On the full-size random-weight SmolVLM2-500M (`elemental.synthetic.build_full_size_random_model`,
the real config's sizes, ≈507 M parameters), on CPU in fp32 (this CPU has no native bf16; `--bf16`
is for CUDA), with synthetic phone-like photos, it measures in one run:

1. image tokens per training photo: `<image>` tokens in the input_ids that
   `train.collate.encode_example` builds with HF's default processor (longest edge 2048, 512-px
   tiles + overview) vs ours (`model_io.apply_geometry(processor, 512)`: one 512-px image).
   Target ≥ 15× fewer. Note: HF tiles a 4:3 photo into 4×3 tiles + 1 overview = 832 tokens; only a
   square photo reaches 4×4 + 1 = 1,088, so the table shows both shapes.
2. training step time: LoRA (`train.recipe.LORA_TARGETS`, r=16) on the same model, batch size 1,
   AdamW, forward + backward + optimizer step, one warm-up step then the median of `--steps`
   steps cycling through the photos; the vision tower is frozen as in `elemental train`.
   Target ≥ 8× faster. Timed steps alternate between the two geometries so background load
   hits both alike. Photo preprocessing (the processor call) is timed separately; peak resident
   memory is sampled during each geometry's warm-up step (ours first, in a fresh process).

Without `--model-dir` the full-size model is built into a temporary folder first (~20 s and
~2 GB on disk here) and deleted afterwards; pass `--model-dir` to reuse one (it is built there
when the folder does not exist yet). HF's default geometry costs tens of seconds per step on a
2-core CPU, so keep `--steps` small.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from elemental.config import TaskConfig
from elemental.model_io import apply_geometry, load_processor
from elemental.synthetic import build_full_size_random_model, synthetic_photo, tiny_marker
from elemental.task import IMAGE_TOKEN, Task
from elemental.train.collate import encode_example
from elemental.train.recipe import LORA_TARGETS, load_model_for_training

OUR_EDGE = 512
TOKEN_TARGET = 15.0
STEP_TARGET = 8.0
# (name, size): phone photos in landscape, portrait and square modes, and a smaller camera photo.
PHOTOS: list[tuple[str, tuple[int, int]]] = [
    ("4032x3024", (4032, 3024)),
    ("3024x4032", (3024, 4032)),
    ("3024x3024", (3024, 3024)),
    ("1600x1200", (1600, 1200)),
]
GiB = 1024**3


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak` is the highest value seen."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


@dataclass
class GeometryResult:
    name: str
    tokens: dict[str, int] = field(default_factory=dict)  # photo -> <image> tokens
    seq_len: dict[str, int] = field(default_factory=dict)  # photo -> input_ids length
    passes: dict[str, int] = field(default_factory=dict)  # photo -> vision-encoder passes (sub-images)
    preprocess_s: dict[str, float] = field(default_factory=dict)  # photo -> processor seconds
    warmup_s: float = 0.0
    step_s: list[tuple[str, float]] = field(default_factory=list)  # (photo, seconds) per timed step
    peak_rss: int = 0  # highest RSS during this geometry's warm-up step (ours runs first, in a fresh process)

    @property
    def median_step(self) -> float:
        return statistics.median(s for _, s in self.step_s)


def encode_all(processor, task: Task, photos: dict, label: str, res: GeometryResult) -> dict[str, dict]:
    """Encode every photo as training does; record image tokens, sequence length and preprocessing time."""
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    batches = {}
    for name, img in photos.items():
        t0 = time.perf_counter()
        ex = encode_example(processor, task.prompt("label"), img, task.label_answer(label))
        res.preprocess_s[name] = time.perf_counter() - t0
        res.tokens[name] = int((ex["input_ids"] == image_id).sum())
        res.seq_len[name] = int(ex["input_ids"].numel())
        res.passes[name] = int(ex["pixel_values"].shape[0])
        batch = {
            "input_ids": ex["input_ids"][None],
            "attention_mask": torch.ones_like(ex["input_ids"])[None],
            "labels": ex["labels"][None],
            "pixel_values": ex["pixel_values"][None],
        }
        if "pixel_attention_mask" in ex:
            batch["pixel_attention_mask"] = ex["pixel_attention_mask"][None]
        batches[name] = batch
    return batches


def train_step(model, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One forward + backward + AdamW step at batch size 1: (wall seconds, peak RSS during it)."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
    return seconds, mem.peak


class OtherLoad:
    """CPU time other processes used while timing, as a share of all cores (contention makes timings noisy)."""

    def __enter__(self) -> OtherLoad:
        self.proc = psutil.Process()
        self.t0 = time.perf_counter()
        self.sys0 = psutil.cpu_times()
        self.own0 = self.proc.cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        sys1, own1 = psutil.cpu_times(), self.proc.cpu_times()
        busy = (sys1.user + sys1.system + getattr(sys1, "nice", 0.0)) - (
            self.sys0.user + self.sys0.system + getattr(self.sys0, "nice", 0.0))
        own = (own1.user + own1.system) - (self.own0.user + self.own0.system)
        self.share = max(0.0, busy - own) / (wall * (psutil.cpu_count() or 1))


def run_steps(model, runs: list[tuple[GeometryResult, dict[str, dict]]], steps: int) -> None:
    """Warm up each geometry once, then alternate their timed steps so background load hits both alike.

    Peak memory comes from the warm-up steps: ours runs first, before the default geometry's larger
    activations have grown the heap (freed memory stays in the process, so later peaks overlap).
    """
    optimizers = [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) for _ in runs]
    model.train()
    for (res, batches), opt in zip(runs, optimizers):
        first = next(iter(batches))
        res.warmup_s, res.peak_rss = train_step(model, opt, batches[first])
        print(f"  {res.name:<10} warm-up step ({first}): {res.warmup_s:.2f} s, "
              f"peak RSS {res.peak_rss / GiB:.2f} GiB", flush=True)
    for i in range(steps):
        for (res, batches), opt in zip(runs, optimizers):
            names = list(batches)
            name = names[i % len(names)]
            s, _ = train_step(model, opt, batches[name])
            res.step_s.append((name, s))
            print(f"  {res.name:<10} step {i + 1}/{steps} ({name}): {s:.2f} s", flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="full-size random model folder to reuse (built there if missing; default: a temp dir)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per geometry after 1 warm-up (3)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    task = Task.from_config(TaskConfig())
    label = task.labels[0]
    t_start = time.perf_counter()
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="elemental_full_")
        model_dir = Path(tmp.name) / "smolvlm2_500m_random"
    try:
        if not (model_dir / "config.json").is_file():
            print(f"building the full-size random SmolVLM2-500M in {model_dir} ...", flush=True)
            t0 = time.perf_counter()
            build_full_size_random_model(model_dir, task, seed=args.seed)
            print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
        marker = tiny_marker(model_dir)
        if marker is not None and marker.get("size") != "full":
            print(f"warning: {model_dir} is a {marker.get('size')!r} model, not the full-size one", flush=True)
        return _bench(model_dir, task, label, args, t_start)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _bench(model_dir: Path, task: Task, label: str, args: argparse.Namespace, t_start: float) -> int:
    from peft import LoraConfig, get_peft_model

    rng = np.random.default_rng(args.seed)
    photos = {name: synthetic_photo(label, rng, size=size) for name, size in PHOTOS}

    t0 = time.perf_counter()
    model = load_model_for_training(str(model_dir), torch.device("cpu"))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    n_trainable, n_total = model.get_nb_trainable_parameters()
    print(f"model: {model_dir} ({n_total / 1e6:.0f} M params, {n_trainable / 1e6:.2f} M trainable LoRA), "
          f"CPU fp32, {torch.get_num_threads()} threads, loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    hf_proc = load_processor(model_dir)  # as shipped: HF's default geometry
    ip = hf_proc.image_processor
    print(f"HF default geometry: longest edge {ip.size['longest_edge']}, tiles {ip.max_image_size['longest_edge']} px, "
          f"splitting {ip.do_image_splitting}; ours: one {OUR_EDGE}-px image", flush=True)
    ours_proc = apply_geometry(load_processor(model_dir), OUR_EDGE)

    ours = GeometryResult("ours")
    hf = GeometryResult("HF default")
    runs = []
    for res, proc in ((ours, ours_proc), (hf, hf_proc)):
        batches = encode_all(processor=proc, task=task, photos=photos, label=label, res=res)
        for name in batches:
            print(f"  {res.name:<10} {name}: {res.tokens[name]:>5} image tokens, {res.passes[name]:>2} vision passes, "
                  f"seq {res.seq_len[name]:>5}, preprocess {res.preprocess_s[name]:.2f} s", flush=True)
        runs.append((res, batches))
    print(f"training steps (load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}):", flush=True)
    with OtherLoad() as other:
        run_steps(model, runs, args.steps)

    # -- summary -----------------------------------------------------------------------------------
    print("\nimage tokens per training photo")
    print(f"  {'photo':<11}{'HF default':>11}{'ours':>6}{'ratio':>8}  target ≥ {TOKEN_TARGET:g}×")
    token_ok = {}
    for name, _ in PHOTOS:
        r = hf.tokens[name] / ours.tokens[name]
        token_ok[name] = r >= TOKEN_TARGET
        print(f"  {name:<11}{hf.tokens[name]:>11}{ours.tokens[name]:>6}{r:>7.1f}×  {verdict(token_ok[name])}")

    step_ratio = hf.median_step / ours.median_step
    token_ratios = [hf.tokens[n] / ours.tokens[n] for n, _ in PHOTOS]
    steps_used = ", ".join(n for n, _ in hf.step_s)
    print(f"\nsummary (full-size random SmolVLM2-500M, CPU fp32, {torch.get_num_threads()} threads, LoRA r=16, "
          f"batch 1, median of {args.steps} steps after 1 warm-up; step photos: {steps_used})")
    rows = [
        ("image tokens / photo (min..max)", f"{min(hf.tokens.values())}..{max(hf.tokens.values())}",
         f"{min(ours.tokens.values())}..{max(ours.tokens.values())}",
         f"{min(token_ratios):.1f}..{max(token_ratios):.1f}×", f"≥ {TOKEN_TARGET:g}×",
         "PASS" if all(token_ok.values()) else
         ("FAIL" if not any(token_ok.values()) else
          f"PASS {sum(token_ok.values())}/{len(token_ok)} photos")),
        ("vision passes / photo (min..max)", f"{min(hf.passes.values())}..{max(hf.passes.values())}",
         f"{min(ours.passes.values())}..{max(ours.passes.values())}", "", "", ""),
        ("train step, s (median)", f"{hf.median_step:.2f}", f"{ours.median_step:.2f}", f"{step_ratio:.1f}×",
         f"≥ {STEP_TARGET:g}×", verdict(step_ratio >= STEP_TARGET)),
        ("preprocess / photo, s (mean)", f"{statistics.mean(hf.preprocess_s.values()):.2f}",
         f"{statistics.mean(ours.preprocess_s.values()):.2f}", "", "", ""),
        ("peak RSS in warm-up step, GiB", f"{hf.peak_rss / GiB:.2f}", f"{ours.peak_rss / GiB:.2f}",
         f"{hf.peak_rss / ours.peak_rss:.2f}×", "", ""),
    ]
    header = ("metric", "HF default", "ours", "ratio", "target", "result")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  " + "  ".join(cells))
    print(f"\nother processes used {other.share:.0%} of the CPUs while steps were timed"
          + (" (timings are noisy: rerun on an idle machine)" if other.share > 0.1 else ""))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0 if all(token_ok.values()) and step_ratio >= STEP_TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
