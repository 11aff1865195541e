"""fp32 vs bf16 on this CPU: a LoRA training step and an HF classification (issue 10, "use the hardware").

Run:  .venv/bin/python benchmarks/cpu_precision.py [--model-dir DIR] [--steps 4] [--photos 4]

On the full-size random-weight SmolVLM2-500M (`elemental.synthetic.build_full_size_random_model`),
with our one-tile geometry (64 image tokens), torch on all cores of this CPU, it measures in one run:

1. a LoRA training step (default targets, r=16, batch `--batch` (4), forward + backward + AdamW) in fp32
   and under bf16 autocast, which is what `Trainer(bf16=True)` runs on a CPU (fp32 master weights,
   bf16 matmuls). The two alternate step by step so background load hits both alike; each gets one
   warm-up step, then the median of `--steps`.
2. one HF classification (`HFClassifier.label_logprobs`) in fp32, under bf16 autocast, and with the
   weights cast to bf16; beside the time, the largest |Δ label log-prob| against fp32 and whether
   the top label is the same.

Then it prints what `elemental train --bf16` does on this CPU (`elemental.train.recipe.training_precision`,
which decides from /proc/cpuinfo: bf16 autocast where the CPU has AVX512-BF16/AMX-BF16 or Arm BF16, fp32
elsewhere) and judges it: exit code 1 when that choice is the slower one by more than the margin in
targets.toml [cpu_precision]; otherwise 0.
Classification stays fp32 on every CPU (it is the reference the GGUF files are held to); its bf16
figures are printed, not judged.

Without `--model-dir` the model is built into a temporary folder (~20 s, ~2 GB) and deleted afterwards.
Run it alone: another heavy job on 2 cores stretches both several-fold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import targets  # this folder's targets.toml
import torch

from elemental.classify.hf import HFClassifier
from elemental.config import TaskConfig
from elemental.hardware import BF16_FLAGS, this_cpu
from elemental.model_io import load_processor
from elemental.synthetic import build_full_size_random_model, synthetic_photo
from elemental.task import Task
from elemental.train.collate import encode_example
from elemental.train.recipe import load_model_for_training, training_precision
from elemental.train.targets import lora_target_regex

EDGE = 512
# A choice within this share of the faster precision is not called wrong: that is run-to-run noise here.
MARGIN = targets.load("cpu_precision")["margin"]
PHOTO_SIZES = [(4032, 3024), (3024, 4032), (3024, 3024), (1600, 1200)]


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def train_step(model, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], bf16: bool) -> float:
    t0 = time.perf_counter()
    with autocast(bf16):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def batches(processor, task: Task, photos: list, batch: int) -> list[dict[str, torch.Tensor]]:
    """Training batches of `batch` label examples, encoded as `elemental train` encodes them."""
    examples = [encode_example(processor, task.prompt("label"), img, task.label_answer(task.labels[i % 5]))
                for i, img in enumerate(photos)]
    out = []
    for i in range(0, len(examples) - batch + 1, batch):
        group = examples[i:i + batch]
        width = max(len(e["input_ids"]) for e in group)
        pad = processor.tokenizer.pad_token_id
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for j, e in enumerate(group):
            n = len(e["input_ids"])
            ids[j, :n], labels[j, :n], mask[j, :n] = e["input_ids"], e["labels"], 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                    "pixel_values": torch.stack([e["pixel_values"] for e in group])})
    return out


def bench_training(model_dir: Path, task: Task, photos: list, steps: int, batch: int) -> dict[str, list[float]]:
    from peft import LoraConfig, get_peft_model

    model = load_model_for_training(str(model_dir), torch.device("cpu"))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=lora_target_regex(), task_type="CAUSAL_LM"))
    model.train()
    data = batches(load_processor(model_dir, longest_edge=EDGE), task, photos, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opts = {False: torch.optim.AdamW(params, lr=1e-5), True: torch.optim.AdamW(params, lr=1e-5)}
    times: dict[str, list[float]] = {"fp32": [], "bf16 autocast": []}
    for bf16 in (False, True):
        print(f"  training warm-up, {'bf16 autocast' if bf16 else 'fp32'}: "
              f"{train_step(model, opts[bf16], data[0], bf16):.2f} s", flush=True)
    for i in range(steps):
        for bf16 in ((False, True) if i % 2 == 0 else (True, False)):
            name = "bf16 autocast" if bf16 else "fp32"
            times[name].append(train_step(model, opts[bf16], data[i % len(data)], bf16))
            print(f"  training step {i + 1}/{steps} {name}: {times[name][-1]:.2f} s", flush=True)
    del model, opts
    return times


def bench_classify(model_dir: Path, task: Task, photos: list) -> tuple[dict[str, list[float]], dict[str, tuple]]:
    """Seconds per photo per variant, and (max |Δ log-prob|, top labels equal) of each bf16 variant vs fp32."""
    clf = HFClassifier.from_path(model_dir, task, longest_edge=EDGE, device="cpu")
    variants = {"fp32": (clf, False), "bf16 autocast": (clf, True)}
    weights_bf16 = HFClassifier.from_path(model_dir, task, longest_edge=EDGE, device="cpu")
    weights_bf16.model.to(torch.bfloat16)
    variants["bf16 weights"] = (weights_bf16, False)
    times: dict[str, list[float]] = {name: [] for name in variants}
    scores: dict[str, list[list[float]]] = {name: [] for name in variants}
    with torch.no_grad():
        for c, bf16 in variants.values():
            with autocast(bf16):
                c.label_logprobs(photos[0])  # warm-up
        for photo in photos:
            for name, (c, bf16) in variants.items():
                t0 = time.perf_counter()
                with autocast(bf16):
                    scores[name].append(c.label_logprobs(photo))
                times[name].append(time.perf_counter() - t0)
    ref = scores["fp32"]
    agreement = {}
    for name in variants:
        diff = max(abs(a - b) for s, r in zip(scores[name], ref) for a, b in zip(s, r))
        same = all(int(np.argmax(s)) == int(np.argmax(r)) for s, r in zip(scores[name], ref))
        agreement[name] = (diff, same)
    return times, agreement


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="full-size random model folder (built if missing)")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per precision after 1 warm-up (4)")
    ap.add_argument("--batch", type=int, default=4, help="training batch size (4, the default config's)")
    ap.add_argument("--photos", type=int, default=4, help="photos for classification timing (4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    cpu = this_cpu()
    task = Task.from_config(TaskConfig())
    rng = np.random.default_rng(args.seed)
    photos = [synthetic_photo(task.labels[i % 5], rng, size=PHOTO_SIZES[i % len(PHOTO_SIZES)])
              for i in range(max(args.photos, args.batch * 2))]
    bf16_flags = ", ".join(sorted(cpu.flags & BF16_FLAGS)) or "none"
    print(f"CPU: {cpu.model} ({cpu.kind()}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"native bf16: {cpu.native_bf16} (flags: {bf16_flags})", flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="elemental_full_") as tmp:
        model_dir = args.model_dir or Path(tmp) / "smolvlm2_500m_random"
        if not (model_dir / "config.json").is_file():
            print(f"building the full-size random SmolVLM2-500M in {model_dir} ...", flush=True)
            build_full_size_random_model(model_dir, task, seed=args.seed)
        train_s = bench_training(model_dir, task, photos, args.steps, args.batch)
        classify_s, agreement = bench_classify(model_dir, task, photos[:args.photos])

    med = {k: statistics.median(v) for k, v in train_s.items()}
    cmed = {k: statistics.median(v) for k, v in classify_s.items()}
    print(f"\nLoRA training step, batch {args.batch}, median of {args.steps} (ms): "
          + ", ".join(f"{k} {v * 1000:.0f}" for k, v in med.items())
          + f"; bf16 autocast / fp32 = {med['bf16 autocast'] / med['fp32']:.2f}×")
    print(f"HF classification per photo, median of {len(photos[:args.photos])} (ms): "
          + ", ".join(f"{k} {v * 1000:.0f} (×{v / cmed['fp32']:.2f}; max |Δ log-prob| {agreement[k][0]:.3g}, "
                      f"top label {'same' if agreement[k][1] else 'DIFFERS'})" for k, v in cmed.items()))
    use_bf16, why = training_precision(True, torch.device("cpu"), cpu)
    chosen, other = ("bf16 autocast", "fp32") if use_bf16 else ("fp32", "bf16 autocast")
    ok = med[chosen] <= med[other] * (1 + MARGIN)
    print(f"\n`elemental train --bf16` on this CPU: {chosen} ({why})")
    print(f"its step {med[chosen] * 1000:.0f} ms vs {other} {med[other] * 1000:.0f} ms: "
          + (f"the faster one (or within {MARGIN:.0%})" if ok else "SLOWER: the rule is wrong for this CPU"))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    print(f"verdict: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
