"""Benchmark: local-folder import of 1,000 photos through the decode path `prepare` uses.

Per photo: read the file, sha256 of the original bytes, `open_image_bytes` (safe decode, EXIF
orientation, RGB; JPEGs decoded at a reduced DCT scale when `max_side` is given), `bounded` to the
stored long side, `encode_jpeg`, sha256 of the stored JPEG and the perceptual hash. The photos are
generated first (untimed): JPEGs of mixed camera sizes (up to 12 MP) and some PNGs.

Target (issue 3): photos/s on 2 cores, at least `min_photos_per_s` in targets.toml [import_folder].

    .venv/bin/python benchmarks/import_folder.py [--n 1000] [--workers 1 2] [--no-baseline]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import targets  # this folder's targets.toml
from PIL import Image

from elemental.images import bounded, encode_jpeg, open_image_bytes, perceptual_hash

MAX_SIDE = 1024  # prepare's stored long side
TARGET_PHOTOS_PER_S = targets.load("import_folder")["min_photos_per_s"]
# ((width, height), share, format) per mix. "web": what downloads and the seed's photos look like
# (Unsplash "regular" is 1080 px wide; Openverse and screenshots similar). "camera": a phone/camera
# folder, a third of it 6-12 MP, the hardest case for a decoder.
MIXES = {
    "web": [
        ((1080, 720), 0.30, "JPEG"),
        ((1080, 1350), 0.20, "JPEG"),
        ((1280, 853), 0.20, "JPEG"),
        ((1920, 1280), 0.10, "JPEG"),
        ((640, 480), 0.10, "JPEG"),
        ((800, 600), 0.10, "PNG"),
    ],
    "camera": [
        ((1024, 768), 0.30, "JPEG"),
        ((1600, 1200), 0.20, "JPEG"),
        ((1080, 1920), 0.10, "JPEG"),
        ((3000, 2000), 0.15, "JPEG"),
        ((4000, 3000), 0.15, "JPEG"),
        ((800, 600), 0.10, "PNG"),
    ],
}


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like picture: smooth random colour fields plus sensor-like noise (so JPEG sizes are real)."""
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def generate(folder: Path, n: int, mix: str, seed: int = 0) -> list[Path]:
    """`n` distinct photos in `folder` (a few textures per size, each photo shifted in colour and marked)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    bases = {size: [_texture(rng, size) for _ in range(3)] for size, _, _ in MIXES[mix]}
    sizes = [(size, fmt) for size, share, fmt in MIXES[mix] for _ in range(round(share * 100))]
    paths = []
    for i in range(n):
        size, fmt = pick.choice(sizes)
        img = pick.choice(bases[size]).copy()
        shift = pick.randint(-30, 30)
        img = img.point(lambda v, s=shift: max(0, min(255, v + s)))
        x, y = pick.randint(0, size[0] - 64), pick.randint(0, size[1] - 64)
        img.paste(tuple(pick.randint(0, 255) for _ in range(3)), (x, y, x + 64, y + 64))
        path = folder / f"photo_{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def ingest(path: Path, draft: bool) -> tuple[str, str, str, int]:
    """What prepare does to one local photo; returns (sha256, stored sha256, perceptual hash, JPEG size)."""
    data = path.read_bytes()
    original_sha = hashlib.sha256(data).hexdigest()
    img = open_image_bytes(data, str(path), max_side=MAX_SIDE if draft else None)
    small = bounded(img, MAX_SIDE)
    jpeg = encode_jpeg(small)
    return original_sha, hashlib.sha256(jpeg).hexdigest(), perceptual_hash(small), len(jpeg)


def run(paths: list[Path], workers: int, draft: bool) -> float:
    t0 = time.perf_counter()
    if workers == 1:
        for p in paths:
            ingest(p, draft)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda p: ingest(p, draft), paths))
    return len(paths) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--mix", choices=[*MIXES, "both"], default="both")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-baseline", action="store_true", help="skip the full-size decode (no draft) runs")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} (other work on the machine skews the rates)")
    met = True
    for mix in ([*MIXES] if args.mix == "both" else [args.mix]):
        with tempfile.TemporaryDirectory(prefix="elemental-bench-") as tmp:
            t0 = time.perf_counter()
            paths = generate(Path(tmp), args.n, mix)
            mb = sum(p.stat().st_size for p in paths) / 1e6
            print(f"[{mix}] generated {len(paths)} photos ({mb:.0f} MB) in {time.perf_counter() - t0:.1f} s (untimed)")
            ingest(paths[0], True)  # warm-up: imports, codecs
            best = 0.0
            for workers in args.workers:
                for draft in ([True] if args.no_baseline else [False, True]):
                    rate = run(paths, workers, draft)
                    best = max(best, rate) if draft else best
                    mode = "DCT-scaled JPEG decode (prepare's path)" if draft else "full-size decode (baseline)"
                    print(f"[{mix}] workers={workers}  {mode:42s} {rate:7.1f} photos/s")
            ok = best >= TARGET_PHOTOS_PER_S
            print(f"[{mix}] target >= {TARGET_PHOTOS_PER_S:g} photos/s: {'met' if ok else 'NOT met'} "
                  f"(best {best:.1f} photos/s)")
            met = met and ok
    print("all targets met" if met else "a target was not met (see above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
