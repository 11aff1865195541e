"""The llama.cpp settings that depend on the CPU, measured on this one (issue 10): threads, weight repacking,
mmproj type and text quantization, against the defaults `elemental classify` picks here.

Run:  .venv/bin/python benchmarks/llama_cpu.py [--model-dir /tmp/full500m] [--work-dir /tmp/llama_cpu]
                                               [--rounds 3] [--photos 3]

On the full-size random-weight SmolVLM2-500M (`elemental.synthetic.build_full_size_random_model`),
exported by `export_gguf` three times (text Q8_0 + Q4_K_M with mmproj F16, and text Q8_0 with mmproj
Q8_0 and with mmproj F32; cached in `--work-dir`), every variant is a `GGUFClassifier` classifying the
same synthetic phone photos:

- default: what `elemental classify` opens here (Q8_0 text, F16 mmproj, one thread per core, weight
  repacking ("extra buffer types") as `llama_runtime` decides for this build and CPU);
- threads 1..cores (and the default's other repacking setting);
- mmproj Q8_0 and F32 instead of F16 (F32 is informational: twice F16's size, it is a desktop choice,
  while the default is the file a phone loads);
- text Q4_K_M with repacking on and off: on x86 with AVX2, repacking is what makes Q4_K fast, and it is
  what a runtime "no repack" switch (llama.cpp's `--no-repack`, the other way out of the AMX crash)
  would cost. That is why the wheel is built without AMX kernels instead, keeping repacking on.

It prints the build's features (`llama_print_system_info`), where the weights live per variant, and the
median seconds per photo (variants interleaved, one warm-up call each). Verdict: exit code 1 when a
default (threads, repacking, mmproj type) is slower than its alternative here by more than the margin in
targets.toml [llama_cpu]; else 0.
Run it alone: with one thread per core, another job stretches every call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np
import targets  # this folder's targets.toml
from gguf_speed import ours_geometry, scratch_model  # this folder's benchmark: the same scratch copy

from elemental.classify.gguf import GGUFClassifier
from elemental.classify.llama_runtime import build_has_amx, system_info
from elemental.config import TaskConfig
from elemental.export.gguf import export_gguf
from elemental.hardware import this_cpu
from elemental.synthetic import build_full_size_random_model, synthetic_photo
from elemental.task import Task

MARGIN = targets.load("llama_cpu")["margin"]  # a default this much slower than an alternative is wrong
PHOTO_SIZES = [(4032, 3024), (3024, 4032), (3024, 3024)]


def exports(model_dir: Path, work: Path, task: Task) -> dict[str, Path]:
    """{"F16": folder with Q8_0 + Q4_K_M text and an F16 mmproj, "Q8_0"/"F32": Q8_0 text + that mmproj}, cached."""
    if not (model_dir / "config.json").is_file():
        print(f"building the full-size random SmolVLM2-500M in {model_dir} ...", flush=True)
        build_full_size_random_model(model_dir, task)
    merged = scratch_model(model_dir, work / "model", ours_geometry)  # as merge leaves it: one 512-px tile
    out = {t: work / f"mmproj-{t}" for t in ("F16", "Q8_0", "F32")}
    for mmproj, quants in (("F16", ("Q8_0", "Q4_K_M")), ("Q8_0", ("Q8_0",)), ("F32", ("Q8_0",))):
        if not (out[mmproj] / "manifest.json").is_file():
            print(f"exporting text {'+'.join(quants)}, mmproj {mmproj} to {out[mmproj]} ...", flush=True)
            export_gguf(merged, out[mmproj], task, quants=quants, mmproj_type=mmproj)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/full500m"))
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/llama_cpu"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--photos", type=int, default=len(PHOTO_SIZES))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    task = Task.from_config(TaskConfig())
    folders = exports(args.model_dir, args.work_dir, task)
    cpu, cores = this_cpu(), os.cpu_count() or 1
    info = system_info()
    print(f"CPU: {cpu.model} ({cpu.kind()})\nllama.cpp {llama_cpp.__version__}: "
          + " ".join(f"{k}={v}" for k, v in info.items() if k not in ("CPU",)) + f"; AMX kernels: {build_has_amx()}",
          flush=True)

    default = GGUFClassifier(folders["F16"])
    auto = default.extra_bufts
    variants: dict[str, GGUFClassifier] = {f"default ({default.n_threads} threads, repack {'on' if auto else 'off'})":
                                           default}
    for t in range(1, cores + 1):
        if t != default.n_threads:
            variants[f"{t} threads"] = GGUFClassifier(folders["F16"], n_threads=t)
    variants[f"repack {'off' if auto else 'on'}"] = GGUFClassifier(folders["F16"], extra_bufts=not auto)
    variants["mmproj Q8_0"] = GGUFClassifier(folders["Q8_0"])
    variants["mmproj F32"] = GGUFClassifier(folders["F32"])
    variants["text Q4_K_M, repack on"] = GGUFClassifier(folders["F16"], quant="Q4_K_M", extra_bufts=True)
    variants["text Q4_K_M, repack off"] = GGUFClassifier(folders["F16"], quant="Q4_K_M", extra_bufts=False)
    for name, clf in variants.items():
        weights = ", ".join(f"{k} {v:.0f} MiB" for k, v in clf.weight_buffers.items())
        print(f"  {name:<34} weights: {weights}", flush=True)

    rng = np.random.default_rng(0)
    photos = [synthetic_photo(task.labels[i % 5], rng, size=PHOTO_SIZES[i % len(PHOTO_SIZES)])
              for i in range(args.photos)]
    for clf in variants.values():
        clf.classify(photos[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rnd in range(args.rounds):
        for photo in photos:
            for name in names if rnd % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                variants[name].classify(photo)
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = next(iter(med.values()))
    print(f"\nseconds per photo (median of {args.rounds} rounds x {len(photos)} photos, interleaved):")
    for name, s in med.items():
        print(f"  {name:<34} {s:6.3f} s  ({s / base:.2f}x the default)")

    d = next(iter(med))
    checks = [("threads", min(med[n] for n in med if n.endswith("threads")) if cores > 1 else med[d]),
              ("repack", med[f"repack {'off' if auto else 'on'}"]),
              ("mmproj type", med["mmproj Q8_0"])]
    print("\ndefaults vs their alternatives on this CPU:")
    failed = []
    for what, alternative in checks:
        ok = med[d] <= alternative * (1 + MARGIN)
        print(f"  {what:<12} default {med[d]:.3f} s vs best alternative {alternative:.3f} s: "
              f"{'PASS' if ok else 'FAIL (the default is slower here)'}")
        if not ok:
            failed.append(what)
    print(f"  mmproj F32 / F16 = {med['mmproj F32'] / med[d]:.2f}x (a desktop-only choice: twice the file size)")
    q4 = med["text Q4_K_M, repack off"] / med["text Q4_K_M, repack on"]
    print(f"  Q4_K_M: repack off / on = {q4:.2f}x (what turning repacking off at run time would cost)")
    for clf in variants.values():
        clf.close()
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    print(f"verdict: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
