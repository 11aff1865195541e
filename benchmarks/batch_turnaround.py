"""`prepare --batch` waits about one batch turnaround, not one per batch (targets: targets.toml [batch_turnaround]).

Run:  .venv/bin/python benchmarks/batch_turnaround.py [--photos 400] [--seconds 5] [--per-batch 50]

The loopback OpenAI-compatible server (tests/fake_openai.py) finishes each batch `--seconds` (T) after it
was created. The script runs the real CLI twice on the same folder of synthetic photos, each time with a
fresh label cache: once with batches that take T, once with batches that finish at the first poll (the
labeling time: decoding, de-duplication, building and uploading the batch files, writing the dataset).
It prints how many turnarounds the first run waited, (t_T - t_0) / T, and the target: t_T < 3 T + t_0.
For comparison it also prints the serial count the previous code needed: one turnaround per chunk of
max(32, 8 x workers) photos.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import targets  # this folder's targets.toml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_openai import FakeOpenAI  # noqa: E402

from elemental.synthetic import write_synthetic_photos  # noqa: E402

LABELS = ["water", "land", "fire", "wood", "metal"]
KEY = "sk-bench"
MAX_TURNAROUNDS = targets.load("batch_turnaround")["max_turnarounds"]


def run(folder: Path, work: Path, seconds: float, per_batch: int) -> tuple[float, int, int]:
    """Wall seconds of one `prepare --batch`, the batches it created and the most of them running at once."""
    with FakeOpenAI(expected_key=KEY, batch_seconds=seconds) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        env.pop("OPENAI_BASE_URL", None)
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "elemental", "prepare", "--source", f"folder:{folder}", "--output_dir",
             str(work / "ds"), "--label-cache", str(work / "labels.sqlite"), "--labeler-base-url", server.base_url,
             "--batch", "--batch-max-photos", str(per_batch), "--batch-poll-interval", "0.25"],
            env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"prepare failed: {res.stderr[-2000:]}")
        if set(server.billed.values()) != {1}:
            raise SystemExit(f"a photo was billed twice: {max(server.billed.values())}")
        return elapsed, len(server.batches), server.max_batches_running


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=5.0, help="T: how long each batch takes on the server")
    ap.add_argument("--per-batch", type=int, default=50, help="--batch-max-photos")
    args = ap.parse_args()
    per_class = math.ceil(args.photos / len(LABELS))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tree = write_synthetic_photos(root / "tree", LABELS, per_class, seed=5)
        flat = root / "flat"
        flat.mkdir()
        for p in sorted(tree.rglob("*.*")):
            p.rename(flat / p.name)
        (root / "a").mkdir()
        (root / "b").mkdir()
        base, _, _ = run(flat, root / "a", 0.0, args.per_batch)
        slow, n_batches, together = run(flat, root / "b", args.seconds, args.per_batch)
    n = per_class * len(LABELS)
    waited = (slow - base) / args.seconds
    old = math.ceil(n / 32)
    print(f"{n} photos, {n_batches} batches of at most {args.per_batch}, at most {together} running at once")
    print(f"labeling time (instant batches): {base:.1f} s; with T = {args.seconds:g} s per batch: {slow:.1f} s")
    print(f"turnarounds waited: {waited:.2f} (the previous code: {old}, one per chunk of 32 photos)")
    met = slow < MAX_TURNAROUNDS * args.seconds + base
    print(f"target: < {MAX_TURNAROUNDS:g} T + labeling time = {MAX_TURNAROUNDS * args.seconds + base:.1f} s: "
          f"{'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
