"""Benchmark: `prepare_dataset` end to end on a local folder-per-class tree of 1,000 photos.

Everything `elemental prepare --source folder:PATH` does is timed: listing, reading, decoding in a
thread pool, de-duplication (sha256 + perceptual hash), JPEG normalisation, split, report.html and the
atomic write. The photos (web-size JPEGs, 1080 px long side, synthetic) are generated first, untimed.

Target (issue 3): photos/s on 2 cores, at least `min_photos_per_s` in targets.toml [prepare_folder].

    .venv/bin/python benchmarks/prepare_folder.py [--n 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import targets  # this folder's targets.toml

from elemental.config import PrepareConfig, TaskConfig
from elemental.data.prepare import prepare_dataset
from elemental.synthetic import synthetic_photo
from elemental.task import Task

TARGET_PHOTOS_PER_S = targets.load("prepare_folder")["min_photos_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    task = Task.from_config(TaskConfig())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "photos"
        for i in range(args.n):
            label = task.labels[i % len(task.labels)]
            (root / label).mkdir(parents=True, exist_ok=True)
            size = (1080, 720) if i % 2 else (720, 1080)
            synthetic_photo(label, rng, size=size).save(root / label / f"{i:05d}.jpg", quality=90)
        cfg = PrepareConfig(sources=[f"folder:{root}"], output_dir=Path(d) / "ds", num_images=args.n,
                            label_cache=Path(d) / "labels.sqlite")
        t0 = time.perf_counter()
        meta = prepare_dataset(cfg, task, say=lambda _: None)
        seconds = time.perf_counter() - t0
    kept = meta["n_train"] + meta["n_val"]
    print(f"prepare_dataset on {args.n} photos: {seconds:.1f} s, {args.n / seconds:.1f} photos/s "
          f"(target >= {TARGET_PHOTOS_PER_S:g}), kept {kept}, dropped {meta['dropped']}")


if __name__ == "__main__":
    main()
