"""What one photo costs on the phone's CPU, without a phone: ARM64 instructions counted under qemu (issue 19).

Run:  .venv/bin/python benchmarks/arm64_cost.py [--cpu neoverse-n1] [--edges 512,384,256] [--work-dir DIR]

`make native-arm64` must have built build/native-arm64 (the library the app links, cross-compiled with the Android
module's llama.cpp options). On the SmolVLM2-256M-shaped realistic model (`synthetic.build_realistic_256m`, the
model of `make test-real`: the real SmolLM2-135M and a SigLIP-B/16-shaped tower), exported at each geometry
(512/384/256 px: 64/36/16 image tokens) with text Q8_0 and Q4_0 and mmproj F16 and Q8_0, it runs the ARM64
elemental-native-classify under qemu-aarch64 (`QEMU_CPU=--cpu`, one thread, repacking on as on a phone) with a
small TCG plugin (benchmarks/qemu_insn_count.c) that counts the guest instructions executed. A photo's cost is
the count when the classifier has printed its answer minus the count when `--print-backend MODEL_DIR` has
opened the same export (backends loaded, manifest and checksums checked, model loaded, instruction decoded):
the photo's decode (a 1024x768 JPEG, already at the pre-shrink bound, a small share), pre-shrink, libmtmd's
preprocessing, the vision encode, the prefill and the label scoring.

It prints, per configuration, the instructions per photo and the ratio to the 512-px Q8_0/F16 default measured
in the same run. Instructions are not time: SIMD width, memory stalls and the phone's cores decide that; the
ratio between configurations of the same work on the same kernels is what carries over. One thread, so ggml's
thread pool spends nothing spinning. Emulation is slow where the variant computes in fp16 (qemu does that in
software): on a 2-core AVX512/AMX Xeon the exports took about 5 minutes, opening the realistic export about a
minute of emulation per run, and one 512-px photo on `neoverse-n1` did not finish in 20 minutes, so the full
sweep takes hours there; `--text`/`--mmproj`/`--edges` narrow it (the default configuration stays in it), and
`--model-dir runs/demo/run/final` runs it on the tiny demo model in under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from elemental.config import TaskConfig
from elemental.task import Task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_speed import sweep_exports  # this folder's benchmark: the same scratch copies and exports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "build" / "native-arm64" / "bin" / "elemental-native-classify"
PLUGIN_SOURCE = Path(__file__).resolve().parent / "qemu_insn_count.c"
SYSROOT = "/usr/aarch64-linux-gnu"
TEXT_TYPES = ("Q8_0", "Q4_0")
MMPROJ_TYPES = ("F16", "Q8_0")
DEFAULT = (512, "Q8_0", "F16")


def build_plugin(work: Path) -> Path:
    """The counting plugin, compiled for this host and loadable by this qemu (the plugin API version it asks)."""
    probe = None
    for version in (1, 2, 3, 4, 5):
        plugin = work / f"qemu_insn_count.v{version}.so"
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", f"-DPLUGIN_API_VERSION={version}",
                        "-o", str(plugin), str(PLUGIN_SOURCE)], check=True)
        probe = run_counted(plugin, "cortex-a53", [CLI, "--help"], work / "probe.txt")
        if probe.returncode == 0:
            return plugin
    raise SystemExit(f"error: qemu-aarch64 loads none of the plugin API versions 1-5: {probe.stderr.strip()[-500:]}")


def qemu_env(cpu: str) -> dict[str, str]:
    return {**os.environ, "QEMU_LD_PREFIX": SYSROOT, "QEMU_CPU": cpu}


def run_counted(plugin: Path, cpu: str, cmd: list, counts: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-aarch64", "-plugin", f"{plugin},out={counts}", *map(str, cmd)], env=qemu_env(cpu),
                          capture_output=True, text=True)


def first_write(counts: Path) -> int:
    """The instructions executed when the program first wrote to its standard output."""
    for line in counts.read_text().splitlines():
        if line.startswith("write "):
            return int(line.split()[1])
    raise SystemExit(f"error: {counts}: the program wrote nothing to its standard output")


def photo_cost(plugin: Path, cpu: str, gguf: Path, quant: str, photo: Path, work: Path) -> tuple[int, int, dict]:
    """(instructions of one photo, of opening the export, the answer line)."""
    common = ["--threads", "1", "--repack", "on", "--quant", quant]
    opened = run_counted(plugin, cpu, [CLI, *common, "--print-backend", gguf], work / "open.txt")
    if opened.returncode != 0:
        raise SystemExit(f"error: opening {gguf} under qemu failed: {opened.stderr.strip()[-500:]}")
    answered = run_counted(plugin, cpu, [CLI, *common, gguf, photo], work / "photo.txt")
    if answered.returncode != 0:
        raise SystemExit(f"error: classifying under qemu failed: {answered.stderr.strip()[-500:]}")
    open_cost = first_write(work / "open.txt")
    return first_write(work / "photo.txt") - open_cost, open_cost, json.loads(answered.stdout.splitlines()[0])


def file_mb(gguf: Path, role: str, quant: str) -> float:
    files = json.loads((gguf / "manifest.json").read_text())["files"]
    return next(f["size_bytes"] for f in files.values() if f["role"] == role and f.get("quant") == quant) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", default="neoverse-n1", help="QEMU_CPU to emulate (default neoverse-n1: dotprod + fp16)")
    ap.add_argument("--edges", default="512,384,256", help="image sizes (default 512,384,256)")
    ap.add_argument("--text", default=",".join(TEXT_TYPES), help=f"text GGUF types (default {','.join(TEXT_TYPES)})")
    ap.add_argument("--mmproj", default=",".join(MMPROJ_TYPES),
                    help=f"mmproj types (default {','.join(MMPROJ_TYPES)})")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/arm64_cost"),
                    help="cache for the realistic model and its exports, reused by reruns (default /tmp/arm64_cost)")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a model folder to use instead (e.g. the demo's run/final, to try the benchmark quickly)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not CLI.is_file():
        raise SystemExit(f"error: {CLI} is missing: run make native-arm64")
    edges, texts, mmprojs = [int(e) for e in args.edges.split(",")], args.text.split(","), args.mmproj.split(",")
    if (DEFAULT[0] not in edges or DEFAULT[1] not in texts or DEFAULT[2] not in mmprojs
            or not set(texts) <= set(TEXT_TYPES) or not set(mmprojs) <= set(MMPROJ_TYPES)):
        raise SystemExit(f"error: --edges/--text/--mmproj must include the default {DEFAULT} every ratio is taken "
                         f"against, and only {TEXT_TYPES} / {MMPROJ_TYPES}")
    task = Task.from_config(TaskConfig())
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = args.model_dir or args.work_dir / "realistic-256m"
    if not (model / "config.json").is_file():
        from elemental.synthetic import build_realistic_256m

        print(f"building the SmolVLM2-256M-shaped model (real SmolLM2-135M) in {model} ...", flush=True)
        build_realistic_256m(model, seed=args.seed)
    folders = {key: gguf for key, (_, gguf) in sweep_exports(model, args.work_dir, edges, task, mmprojs,
                                                              quants=TEXT_TYPES).items()}

    from elemental.synthetic import synthetic_photo

    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="arm64-cost-") as tmp:
        work = Path(tmp)
        photo = work / "photo.jpg"
        synthetic_photo("water", np.random.default_rng(args.seed), size=(1024, 768)).save(photo, quality=90)
        plugin = build_plugin(work)
        variant = json.loads(subprocess.run(["qemu-aarch64", str(CLI), "--print-backend"], capture_output=True,
                                            text=True, check=True, env=qemu_env(args.cpu)).stdout)["variant"]
        print(f"QEMU_CPU={args.cpu}: backend variant {variant}; one thread, repacking on; photo 1024x768 JPEG",
              flush=True)
        for edge in edges:
            for text in texts:
                for mmproj in mmprojs:
                    gguf = folders[edge, mmproj]
                    t = time.time()
                    cost, open_cost, answer = photo_cost(plugin, args.cpu, gguf, text, photo, work)
                    rows.append({"edge": edge, "text": text, "mmproj": mmproj, "insns": cost, "open": open_cost,
                                 "label": answer["label"], "seconds": time.time() - t,
                                 "mb": file_mb(gguf, "text", text) + file_mb(gguf, "mmproj", mmproj)})
                    print(f"  {edge} px, text {text}, mmproj {mmproj}: {cost / 1e9:.2f} G instructions per photo "
                          f"({time.time() - t:.0f} s emulated)", flush=True)
    base = next(r["insns"] for r in rows if (r["edge"], r["text"], r["mmproj"]) == DEFAULT)
    print(f"\nARM64 instructions per photo, {model.name}, QEMU_CPU={args.cpu} ({variant}), 1 thread, "
          f"repacking on ({time.time() - t0:.0f} s)")
    print(f"{'px':>4} {'text':>5} {'mmproj':>6} {'G insns':>8} {'ratio':>6} {'files MB':>9}")
    for r in rows:
        print(f"{r['edge']:>4} {r['text']:>5} {r['mmproj']:>6} {r['insns'] / 1e9:>8.2f} {r['insns'] / base:>6.2f} "
              f"{r['mb']:>9.0f}")
    print(f"ratio: instructions per photo / the {DEFAULT[0]}-px {DEFAULT[1]}/{DEFAULT[2]} default's, same run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
