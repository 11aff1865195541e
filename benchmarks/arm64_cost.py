"""What one photo costs on the phone's CPU, without a phone: ARM64 instructions counted under qemu (issue 19).

Run:  .venv/bin/python benchmarks/arm64_cost.py [--cpu neoverse-n1] [--edges 512,384,256] [--full] [--work-dir DIR]

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

Emulating the whole model is slow where the variant computes in fp16 (qemu does that in software): one 256-px
photo with the F16 mmproj took 10 minutes (beside other work) on a 2-core AVX512/AMX Xeon, so the 12
configurations take hours (`--full` does that). By default the count is taken from the same model cut to its
first layers instead: the layers of each tower have one shape, so each adds the same instructions, and a photo's
count is
    C(1, 1) + (V - 1) * [C(2, 1) - C(1, 1)] + (T - 1) * [C(1, 2) - C(1, 1)]
where C(v, t) is the count with v vision and t text layers and V, T the model's own (12 and 30). C(1, 1) is
counted for every configuration; the vision slope once per geometry and mmproj type (the text type does not
touch the encoder), the text slope once per geometry and text type (with the cheapest mmproj: the mmproj type
does not touch the text layers). The run ends by counting the whole model for its cheapest configuration and
printing that count beside the extrapolated one, so the extrapolation's error is measured in the same run.

It prints, per configuration, the instructions per photo and the ratio to the 512-px Q8_0/F16 default measured
in the same run. Instructions are not time: SIMD width, memory stalls and the phone's cores decide that; the
ratio between configurations of the same work on the same kernels is what carries over. One thread, so ggml's
thread pool spends nothing spinning. `--model-dir runs/demo/run/final` runs it on the tiny demo model in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
WEIGHTS_INDEX = "model.safetensors.index.json"  # names the uncut shards: not copied into a cut model


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


def photo_cost(plugin: Path, cpu: str, gguf: Path, quant: str, photo: Path, work: Path) -> int:
    """The instructions of one photo: answering it minus opening the export."""
    counts = {}
    for step, args in (("open", ["--print-backend", gguf]), ("photo", [gguf, photo])):
        res = run_counted(plugin, cpu, [CLI, "--threads", "1", "--repack", "on", "--quant", quant, *args],
                          work / f"{step}.txt")
        if res.returncode != 0:
            raise SystemExit(f"error: {step} of {gguf} under qemu failed: {res.stderr.strip()[-500:]}")
        counts[step] = first_write(work / f"{step}.txt")
    return counts["photo"] - counts["open"]


def layers(model: Path) -> tuple[int, int]:
    """(vision layers, text layers) of a saved SmolVLM."""
    config = json.loads((model / "config.json").read_text())
    return config["vision_config"]["num_hidden_layers"], config["text_config"]["num_hidden_layers"]


def cut(model: Path, out: Path, vision_layers: int, text_layers: int) -> Path:
    """`model` with only its first layers in each tower: every other file (processor, tokenizer, markers) kept."""
    if (out / "config.json").is_file():
        return out
    import transformers
    from transformers import AutoConfig, SmolVLMForConditionalGeneration

    from elemental.fileio import atomic_dir

    config = AutoConfig.from_pretrained(model)
    config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers = vision_layers, text_layers
    transformers.logging.set_verbosity_error()  # not a list of every dropped layer's tensors
    with atomic_dir(out) as tmp:
        for f in model.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", WEIGHTS_INDEX):
                shutil.copy2(f, tmp / f.name)
        SmolVLMForConditionalGeneration.from_pretrained(model, config=config).save_pretrained(tmp)
    return out


Config = tuple[int, str, str]  # (edge, text type, mmproj type)


def plan(edges: list[int], texts: list[str], mmprojs: list[str], depth: tuple[int, int], full: bool,
         ) -> tuple[dict[tuple[int, int], list[Config]], Config]:
    """{(vision layers, text layers): the configurations to count at that depth}, and the cheapest configuration."""
    cheap_text = "Q4_0" if "Q4_0" in texts else texts[0]
    cheap_mmproj = "Q8_0" if "Q8_0" in mmprojs else mmprojs[0]
    cheapest = (min(edges), cheap_text, cheap_mmproj)
    every = [(e, t, m) for e in edges for t in texts for m in mmprojs]
    if full:
        return {depth: every}, cheapest
    return {(1, 1): every,
            (2, 1): [(e, cheap_text, m) for e in edges for m in mmprojs],  # a vision layer's count
            (1, 2): [(e, t, cheap_mmproj) for e in edges for t in texts],  # a text layer's count
            depth: [cheapest]}, cheapest  # the whole model once: the extrapolation's error


def extrapolate(counts: dict[tuple[tuple[int, int], Config], int], config: Config, depth: tuple[int, int],
                cheap_text: str, cheap_mmproj: str) -> int:
    """The whole model's count from the cut models' (the module docstring's formula)."""
    edge, text, mmproj = config
    base = counts[(1, 1), config]
    vision = counts[(2, 1), (edge, cheap_text, mmproj)] - counts[(1, 1), (edge, cheap_text, mmproj)]
    lm = counts[(1, 2), (edge, text, cheap_mmproj)] - counts[(1, 1), (edge, text, cheap_mmproj)]
    return base + (depth[0] - 1) * vision + (depth[1] - 1) * lm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", default="neoverse-n1", help="QEMU_CPU to emulate (default neoverse-n1: dotprod + fp16)")
    ap.add_argument("--edges", default="512,384,256", help="image sizes (default 512,384,256)")
    ap.add_argument("--text", default=",".join(TEXT_TYPES), help=f"text GGUF types (default {','.join(TEXT_TYPES)})")
    ap.add_argument("--mmproj", default=",".join(MMPROJ_TYPES),
                    help=f"mmproj types (default {','.join(MMPROJ_TYPES)})")
    ap.add_argument("--full", action="store_true",
                    help="count the whole model for every configuration instead of extrapolating from cut ones (hours)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/arm64_cost"),
                    help="cache for the realistic model, its cut copies and their exports, reused by reruns "
                         "(default /tmp/arm64_cost)")
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
    depth = layers(model)
    full = args.full or min(depth) < 2  # a tower of one layer has no slope to measure: count it whole
    todo, cheapest = plan(edges, texts, mmprojs, depth, full)
    exports = {}
    for d, configs in todo.items():
        # The whole model's exports live in the work folder itself, each cut model's in a folder of its own;
        # every text type in each, so a rerun with other --text finds them.
        root = args.work_dir if d == depth else args.work_dir / f"cut-{d[0]}x{d[1]}"
        cut_model = model if d == depth else cut(model, root / "model", *d)
        folders = sweep_exports(cut_model, root, sorted({e for e, _, _ in configs}), task,
                                sorted({m for _, _, m in configs}), quants=TEXT_TYPES)
        for key, (_, gguf) in folders.items():
            exports[d, key] = gguf

    from elemental.synthetic import synthetic_photo

    t0 = time.time()
    counts = {}
    with tempfile.TemporaryDirectory(prefix="arm64-cost-") as tmp:
        work = Path(tmp)
        photo = work / "photo.jpg"
        synthetic_photo("water", np.random.default_rng(args.seed), size=(1024, 768)).save(photo, quality=90)
        plugin = build_plugin(work)
        variant = json.loads(subprocess.run(["qemu-aarch64", str(CLI), "--print-backend"], capture_output=True,
                                            text=True, check=True, env=qemu_env(args.cpu)).stdout)["variant"]
        print(f"QEMU_CPU={args.cpu}: backend variant {variant}; one thread, repacking on; photo 1024x768 JPEG; "
              f"{model.name}: {depth[0]} vision and {depth[1]} text layers", flush=True)
        for d, configs in todo.items():
            for config in configs:
                edge, text, mmproj = config
                t = time.time()
                counts[d, config] = photo_cost(plugin, args.cpu, exports[d, (edge, mmproj)], text, photo, work)
                print(f"  {d[0]} vision + {d[1]} text layers, {edge} px, text {text}, mmproj {mmproj}: "
                      f"{counts[d, config] / 1e9:.2f} G instructions per photo ({time.time() - t:.0f} s emulated)",
                      flush=True)
    _, cheap_text, cheap_mmproj = cheapest
    whole = {c: counts[depth, c] for c in todo[depth]} if full else {
        c: extrapolate(counts, c, depth, cheap_text, cheap_mmproj) for c in todo[1, 1]}
    base = whole[DEFAULT]
    how = "counted" if full else "extrapolated from the cut models"
    print(f"\nARM64 instructions per photo, {model.name} ({how}), QEMU_CPU={args.cpu} ({variant}), 1 thread, "
          f"repacking on ({time.time() - t0:.0f} s)")
    print(f"{'px':>4} {'text':>5} {'mmproj':>6} {'G insns':>8} {'ratio':>6}")
    for (edge, text, mmproj), n in whole.items():
        print(f"{edge:>4} {text:>5} {mmproj:>6} {n / 1e9:>8.2f} {n / base:>6.2f}")
    print(f"ratio: instructions per photo / the {DEFAULT[0]}-px {DEFAULT[1]}/{DEFAULT[2]} default's, same run")
    if not full:
        counted, guessed = counts[depth, cheapest], whole[cheapest]
        print(f"check: the whole model at {cheapest[0]} px, text {cheap_text}, mmproj {cheap_mmproj}: counted "
              f"{counted / 1e9:.3f} G, extrapolated {guessed / 1e9:.3f} G ({guessed / counted - 1:+.2%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
