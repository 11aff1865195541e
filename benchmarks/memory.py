"""Memory that stays flat as the input grows (issue 13): `prepare` and `evaluate` at 1,000 and 10,000 photos.

Run:  .venv/bin/python benchmarks/memory.py [--photos 10000] [--small 1000] [--work-dir DIR] [--keep]

It generates `--photos` distinct 2000x1500 JPEGs in class folders (a synthetic photo per class and
seed, each with its own coloured block and brightness, so near-duplicate detection keeps them apart),
and a second tree of hard links to the first `--small` of them. For each tree it runs, in a fresh
process each:
- `elemental prepare --source folder:TREE` (labels from the folder names: no teacher), and
- `elemental evaluate` of the tiny SmolVLM (`build_tiny_model`, hf backend) on the dataset's val split,
and reads the process's peak RSS (Linux VmHWM) and wall time. It prints peak RSS at both sizes, the
ratio big/small, and photos/s. Targets (targets.toml [memory]): upper bounds on that ratio for prepare
and for evaluate, and on prepare's peak RSS at the big size. Exit code 1 when one fails. The generated photos
and datasets are removed at the end unless `--keep` (they take about 2 GB for 10,000 photos).
Run it alone: it uses every core, and so would anything beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import targets  # this folder's targets.toml

from elemental.config import TaskConfig
from elemental.synthetic import build_tiny_model, synthetic_photo
from elemental.task import Task

GiB = 1024**3
TARGETS = targets.load("memory")
RATIO_TARGET = TARGETS["peak_rss_ratio"]
PREPARE_PEAK_TARGET = TARGETS["prepare_peak_gib"] * GiB
SIZE = (2000, 1500)
BASES_PER_CLASS = 16  # synthetic photos per class; every generated photo is one of them with its own block

# Runs the CLI in this process, then reports the process's peak resident memory on stderr.
PEAK_WRAPPER = """
import runpy, sys
sys.argv = ["elemental", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("elemental", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
peak = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(f"PEAK_KB {peak}", file=sys.stderr)
sys.exit(code)
"""


def _make(args: tuple[str, int, int, Path]) -> None:
    """One class's photos: base photos with a different coloured block and brightness each (a worker process)."""
    label, start, count, folder = args
    from PIL import Image

    rng = np.random.default_rng(start)
    bases = [np.asarray(synthetic_photo(label, np.random.default_rng(1000 * start + b), size=SIZE), dtype=np.int16)
             for b in range(BASES_PER_CLASS)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        a = bases[i % BASES_PER_CLASS].copy()
        h, w = a.shape[:2]
        bh, bw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        a[y:y + bh, x:x + bw] = rng.integers(0, 256, 3)
        a += int(rng.integers(-30, 31))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
        (folder / f"{start + i:06d}.jpg").write_bytes(buf.getvalue())


def generate(root: Path, labels: list[str], n: int) -> None:
    per = n // len(labels)
    chunk = 250
    jobs = [(label, k * 100_000 + s, min(chunk, per - s), root / label)
            for k, label in enumerate(labels) for s in range(0, per, chunk)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_make, jobs))


def link_subset(src: Path, dst: Path, labels: list[str], n: int) -> None:
    per = n // len(labels)
    for label in labels:
        (dst / label).mkdir(parents=True, exist_ok=True)
        for p in sorted((src / label).iterdir())[:per]:
            os.link(p, dst / label / p.name)


def run_measured(args: list[str], cwd: Path) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of `elemental ARGS` in a fresh process; fails loudly if the command does."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - t0
    peak = [line for line in res.stderr.splitlines() if line.startswith("PEAK_KB ")]
    if res.returncode != 0 or not peak:
        raise SystemExit(f"elemental {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return seconds, int(peak[-1].split()[1]) * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated photos and datasets")
    args = ap.parse_args(argv)
    task = Task.from_config(TaskConfig())
    labels = list(task.labels)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="elemental_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        big, small = work / "photos", work / "photos_small"
        if not big.is_dir():
            t0 = time.perf_counter()
            print(f"generating {args.photos} photos of {SIZE[0]}x{SIZE[1]} in {big} ...", flush=True)
            generate(big, labels, args.photos)
            print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
        if not small.is_dir():
            link_subset(big, small, labels, args.small)
        model = work / "model"
        if not (model / "config.json").is_file():
            build_tiny_model(model, task)
        rows = {}
        for name, tree, n in (("small", small, args.small), ("big", big, args.photos)):
            ds = work / f"ds_{name}"
            shutil.rmtree(ds, ignore_errors=True)
            print(f"prepare on {n} photos ...", flush=True)
            p_s, p_peak = run_measured(["prepare", "--source", f"folder:{tree}", "--output_dir", str(ds),
                                        "--label-cache", str(work / "labels.sqlite"), "--num_images", str(n)], work)
            n_val = len(json.loads((ds / "val.json").read_text()))
            print(f"  {p_s:.0f} s, peak RSS {p_peak / GiB:.2f} GiB; evaluate on its {n_val} val photos ...", flush=True)
            e_s, e_peak = run_measured(["evaluate", "--model_path", str(model), "--dataset_dir", str(ds),
                                        "--output_path", str(work / f"res_{name}.json")], work)
            print(f"  {e_s:.0f} s, peak RSS {e_peak / GiB:.2f} GiB", flush=True)
            rows[name] = (n, p_s, p_peak, n_val, e_s, e_peak)
        n1, p1, pk1, v1, e1, ek1 = rows["small"]
        n2, p2, pk2, v2, e2, ek2 = rows["big"]
        prep_ratio, eval_ratio = pk2 / pk1, ek2 / ek1
        print(f"\n{'':<10}{'photos':>8}{'prepare s':>11}{'photos/s':>10}{'peak GiB':>10}"
              f"{'val':>7}{'evaluate s':>12}{'photos/s':>10}{'peak GiB':>10}")
        for name, (n, p_s, pk, nv, e_s, ek) in rows.items():
            print(f"{name:<10}{n:>8}{p_s:>11.0f}{n / p_s:>10.1f}{pk / GiB:>10.2f}{nv:>7}{e_s:>12.0f}{nv / e_s:>10.1f}"
                  f"{ek / GiB:>10.2f}")
        checks = [
            (f"prepare peak RSS {n2} / {n1} photos", prep_ratio, f"{prep_ratio:.2f}", prep_ratio <= RATIO_TARGET),
            (f"evaluate peak RSS {v2} / {v1} val photos", eval_ratio, f"{eval_ratio:.2f}", eval_ratio <= RATIO_TARGET),
            (f"prepare peak RSS at {n2} photos", pk2, f"{pk2 / GiB:.2f} GiB", pk2 <= PREPARE_PEAK_TARGET),
        ]
        print()
        for what, _, shown, ok in checks:
            target = f"≤ {RATIO_TARGET}" if "/" in what else f"≤ {PREPARE_PEAK_TARGET / GiB:.1f} GiB"
            print(f"  {what:<42} {shown:>10}  target {target:<12} {'PASS' if ok else 'FAIL'}")
        failed = [what for what, _, _, ok in checks if not ok]
        print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
        print(f"verdict: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}")
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
