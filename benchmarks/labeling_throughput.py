"""Labeling throughput against the loopback OpenAI-compatible server (targets: targets.toml [labeling_throughput]).

Run:  .venv/bin/python benchmarks/labeling_throughput.py [--photos 400] [--workers 8] [--delay 0.05]

The server (tests/fake_openai.py) waits `--delay` seconds per request to stand in for a real
endpoint's latency, so the figure measures what the teacher adds around the wait: image
downscaling, the SDK, the SQLite commit per answer, and how well `num_workers` overlaps requests.
A second run over the same photos must be answered entirely from the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import targets  # this folder's targets.toml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_openai import FakeOpenAI  # noqa: E402

from elemental.config import TaskConfig  # noqa: E402
from elemental.data.teacher import Teacher  # noqa: E402
from elemental.images import encode_jpeg  # noqa: E402
from elemental.synthetic import synthetic_photo  # noqa: E402
from elemental.task import Task  # noqa: E402

TARGET_PHOTOS_PER_S = targets.load("labeling_throughput")["min_photos_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--delay", type=float, default=0.05, help="server latency per request, seconds")
    args = ap.parse_args()

    task = Task.from_config(TaskConfig())
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    photos, truth = [], {}
    for i in range(args.photos):
        label = task.labels[i % len(task.labels)]
        data = encode_jpeg(synthetic_photo(label, rng))
        sha = hashlib.sha256(data).hexdigest()
        photos.append((sha, data))
        truth[sha] = label
    print(f"made {len(photos)} synthetic photos in {time.perf_counter() - t0:.1f} s")

    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(delay=args.delay, expected_key="sk-bench") as server:
        cache = Path(tmp) / "labels.sqlite"
        with Teacher(task, cache_path=cache, base_url=server.base_url, api_key="sk-bench",
                     num_workers=args.workers) as teacher:
            t0 = time.perf_counter()
            results = teacher.label_many(photos, progress=False)
            cold_s = time.perf_counter() - t0
            report = teacher.report()
        duplicates = sum(n - 1 for n in server.billed.values() if n > 1)
        correct = sum(results[sha].element == truth[sha] for sha in truth)

        requests_before = sum(server.requests.values())
        with Teacher(task, cache_path=cache, base_url=server.base_url, api_key="sk-bench",
                     num_workers=args.workers) as teacher:
            t0 = time.perf_counter()
            warm = teacher.label_many(photos, progress=False)
            warm_s = time.perf_counter() - t0
            warm_report = teacher.report()
        warm_requests = sum(server.requests.values()) - requests_before

    rate = len(photos) / cold_s
    hits = sum(r.cached for r in warm.values())
    print(f"cold run : {len(photos)} photos in {cold_s:.2f} s = {rate:.1f} photos/s "
          f"(workers {args.workers}, server delay {args.delay * 1000:.0f} ms; "
          f"ideal {args.workers / args.delay if args.delay else float('inf'):.0f} photos/s)")
    print(f"           billed calls {server.total_billed()}, duplicate billed calls {duplicates}, "
          f"labels correct {correct}/{len(photos)}, max concurrent requests {server.max_inflight}")
    print(f"           tokens in/out {report['tokens_in']}/{report['tokens_out']}, "
          f"estimated cost ${report['estimated_cost_usd']:.4f} ({report['model']} prices)")
    print(f"warm run : {hits}/{len(photos)} cache hits ({100 * hits / len(photos):.0f}%), "
          f"{warm_requests} requests, {warm_s * 1000:.0f} ms, cost ${warm_report['estimated_cost_usd']:.4f}")
    ok = rate >= TARGET_PHOTOS_PER_S and duplicates == 0 and hits == len(photos) and warm_requests == 0
    print(f"target   : ≥ {TARGET_PHOTOS_PER_S:.0f} photos/s, 0 duplicate billed calls, 100% cache hits → "
          f"{'PASS' if ok else 'FAIL'} ({rate / TARGET_PHOTOS_PER_S:.1f}× the target rate)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
