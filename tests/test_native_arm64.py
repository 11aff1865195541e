"""The phone's CPU (issue 19): native/ cross-built for ARM64 with the Android module's llama.cpp options, run
under qemu-aarch64, against `elemental classify` on this x86 machine.

`make native-arm64` builds build/native-arm64/ (bin/elemental-native-classify, lib/ with libllama, libmtmd and
one libggml-cpu-<variant>.so per ARM level, loaded at run time as from an APK's nativeLibraryDir). Here:
- each emulated CPU loads its own backend variant (`--print-backend`), and ARM's weight repacking really runs;
- the phone default (repacking on) gives `elemental classify`'s label on every val photo at 512, 384 and 256 px,
  |Δp| ≤ 5e-3 end to end at 512 px (at 384 and 256 px within the measured ARM_GAP: not the promise), and so
  do cortex-a53 and max at 512 px; every CPU with repacking on and off on a few photos at every geometry;
- with an F16 text model, ARM64 answers as the x86 build within 5e-3 at 384 and 256 px: the Q8_0 activations make
  the instruction set's share of the gap, not the ARM kernels as such;
- Q4_0, the type llama.cpp repacks for ARM, measured against HF and Q8_0;
- bad input ends as one `error:` line and exit 2 on ARM too, never a signal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_process import elemental
from test_native import BAD_EXPORTS, END_TO_END, _copy, _text_file, lines, max_dp, run
from test_native import CLI as X86_CLI

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARM64 = ROOT / "build" / "native-arm64"
CLI = ARM64 / "bin" / "elemental-native-classify"
SYSROOT = "/usr/aarch64-linux-gnu"
# END_TO_END (test_native): the promise, the phone answers as `elemental classify`; met on ARM64 at 512 px. Not met
# at 384 and 256 px with the Q8_0 text model: ARM64 differs from classify by up to 6.7e-3 and 9.3e-3 on a borderline
# photo (p ~ 0.57), the labels never. Two parts, measured on the val JPEGs: the instruction set (ARM64 vs the x86
# build of the same library: 1.1e-2 and 9.4e-3; cortex-a53, which computes in fp32 as x86 does, 7.8e-3 on PNGs) and
# the JPEG decoder (the native stb_image vs classify's Pillow: 4.3e-3 at 384 px; issue 24). The instruction-set part
# is the Q8_0 text model's 8-bit activations turning last-bit differences into rounding flips: with an F16 text model
# it is 1.6e-3 and 1.4e-4 (test below). This bound guards the gap from growing.
ARM_GAP = 2e-2
# Three emulated CPUs that pick different backend variants: plain ARMv8.0 (an old phone's Cortex-A53), ARMv8.2
# with dotprod and fp16 (Cortex-A76-class, the phone default here), and QEMU's everything (i8mm, SVE, SVE2, SME)
# with SVE vectors of 128 bits, as phones' Cortex-A710/X2 and later have them (QEMU's default, 512 bits, is a
# server's, and emulating it takes 15 times as long).
PHONE = "neoverse-n1"
MAX = "max,sve-default-vector-length=16"
CPUS = ("cortex-a53", PHONE, MAX)
EDGES = (512, 384, 256)
FEW = 3  # photos per run off the phone default


def qemu(cpu: str, *args: str | Path, timeout: int = 900) -> subprocess.CompletedProcess:
    if not CLI.is_file():
        pytest.fail(f"{CLI} is missing: run `make native-arm64` (tests/test_native_arm64.py needs it built)")
    if shutil.which("qemu-aarch64") is None:
        pytest.fail("qemu-aarch64 is missing: apt-get install qemu-user (or run make test, which installs it)")
    env = {**os.environ, "QEMU_LD_PREFIX": SYSROOT, "QEMU_CPU": cpu}
    return subprocess.run(["qemu-aarch64", str(CLI), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def bound(edge: int) -> float:
    return END_TO_END if edge == 512 else ARM_GAP


def export_text_as(model: Path, out: Path, quant: str) -> dict:
    """`model` exported with the text model at `quant` only (and the default mmproj); its manifest."""
    from elemental.config import TaskConfig
    from elemental.export.gguf import export_gguf
    from elemental.task import Task

    return export_gguf(model, out, Task.from_config(TaskConfig()), quants=(quant,))


def backend(cpu: str, *args: str | Path) -> dict:
    res = qemu(cpu, *args, "--print-backend")
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def val_photos(demo_dir) -> list[Path]:
    val = json.loads((demo_dir / "dataset/val.json").read_text())
    return [demo_dir / "dataset" / r["image_path"] for r in val]


@pytest.fixture(scope="module")
def exports(demo_dir, trained_at) -> dict[int, Path]:
    """The demo's export at each geometry, each trained at that geometry as a user ships it (Q8_0, F16 mmproj)."""
    return {512: demo_dir / "gguf", **{edge: trained_at(edge) / "gguf" for edge in EDGES[1:]}}


@pytest.fixture(scope="module")
def on_x86(exports, val_photos, tmp_path_factory) -> dict[int, dict[str, dict]]:
    """`elemental classify` (Python, llama.cpp on this x86 CPU) on every val photo at every geometry."""
    cwd = tmp_path_factory.mktemp("x86")
    out = {}
    for edge, gguf in exports.items():
        res = elemental("classify", "--model_path", str(gguf), *map(str, val_photos), cwd=cwd)
        out[edge] = lines(res)
    return out


# -- backends: one variant per CPU, loaded from one folder ------------------------------------------------

def test_each_emulated_cpu_loads_its_own_backend_variant():
    seen = {cpu: backend(cpu) for cpu in CPUS}
    for cpu, b in seen.items():
        print(f"QEMU_CPU={cpu}: {b['variant']} {' '.join(f'{k}={v}' for k, v in b['features'].items())}")
        assert b["backend"] == "CPU" and Path(b["library"]).name == f"libggml-cpu-{b['variant']}.so"
        assert Path(b["library"]).parent.resolve() == (ARM64 / "lib").resolve()
        assert b["features"].get("NEON") == "1"
    assert len({b["variant"] for b in seen.values()}) == len(CPUS), seen
    a53, n1, top = (seen[c]["features"] for c in CPUS)
    assert "DOTPROD" not in a53 and "DOTPROD" in n1 and "FP16_VA" in n1  # plain ARMv8.0 vs dotprod + fp16
    assert {"MATMUL_INT8", "SVE"} <= top.keys() and "SVE" not in n1


def test_backend_folder_missing_or_empty_is_one_clear_error(demo_dir, tmp_path, val_photos):
    (tmp_path / "empty").mkdir()
    for folder, needle in ((tmp_path / "nowhere", "not found"), (tmp_path / "empty", "holds no libggml-cpu-*.so")):
        for args in (["--print-backend"], [demo_dir / "gguf", val_photos[0]]):
            res = qemu(PHONE, "--backend-dir", folder, *args)
            errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
            assert res.returncode == 2 and len(errors) == 1, (res.returncode, res.stderr[-2000:])
            assert f"backend folder {folder} {needle}" in errors[0] and "no compute backend" not in res.stderr


def test_arm_repacks_weights_when_on_and_not_when_off(demo_dir):
    on, off = backend(PHONE, demo_dir / "gguf"), backend(PHONE, "--repack", "off", demo_dir / "gguf")
    print(f"{PHONE}, Q8_0: repack on -> {on['weight_buffers']}, off -> {off['weight_buffers']}")
    assert on["repack"] is True and "CPU_REPACK" in on["weight_buffers"]  # the phone's fast path is taken
    assert off["repack"] is False and "CPU_REPACK" not in off["weight_buffers"]


# -- the same answers as `elemental classify` -------------------------------------------------------------

@pytest.mark.parametrize("cpu, edge", [(PHONE, 512), (PHONE, 384), (PHONE, 256), ("cortex-a53", 512), (MAX, 512)])
def test_every_val_photo_answers_as_classify(cpu, edge, exports, val_photos, on_x86):
    """The phone default (repacking on) at every geometry; the oldest and the newest CPU at the default one."""
    ours, theirs = lines(qemu(cpu, exports[edge], *val_photos)), on_x86[edge]
    assert len(ours) == len(val_photos) >= 20
    assert {k: o["label"] for k, o in ours.items()} == {k: t["label"] for k, t in theirs.items()}
    delta = max_dp(ours, theirs)
    print(f"ARM64 ({cpu}, repack on) vs elemental classify on x86, {edge} px, {len(ours)} val JPEGs: "
          f"same labels, max |Δp| {delta:.2e}")
    assert delta <= bound(edge)


@pytest.mark.parametrize("cpu, repack, edge", [
    (cpu, repack, edge) for edge in EDGES for cpu, repack in
    (("cortex-a53", "on"), ("cortex-a53", "off"), (MAX, "on"), (MAX, "off"), (PHONE, "off"))
    if not (repack == "on" and edge == 512)  # those run on every photo above
])
def test_other_cpus_and_repack_off_answer_alike(cpu, repack, edge, exports, val_photos, on_x86):
    """Every CPU with repacking on and off, at every geometry, on a few photos."""
    some = val_photos[edge // 128 - 1:][:FEW]  # a different few per geometry
    ours = lines(qemu(cpu, "--repack", repack, exports[edge], *some))
    theirs = {k: on_x86[edge][k] for k in ours}
    assert {k: o["label"] for k, o in ours.items()} == {k: t["label"] for k, t in theirs.items()}
    delta = max_dp(ours, theirs)
    print(f"ARM64 ({cpu}, repack {repack}) vs x86, {edge} px, {len(ours)} photos: max |Δp| {delta:.2e}")
    assert delta <= bound(edge)


@pytest.mark.parametrize("edge", EDGES[1:])
def test_arm_kernels_answer_as_x86_where_the_text_model_is_not_quantized(edge, trained_at, val_photos, tmp_path):
    """Where ARM_GAP comes from: the Q8_0 text model's 8-bit activations, not the ARM kernels as such.

    The same trained model exported with an F16 text model (and the default F16 mmproj), ARM64 on the phone default
    against the x86 build of the same library on the same JPEGs (same decoder: only the instruction set differs):
    within END_TO_END on every val photo at 384 and 256 px (measured 1.6e-3 and 1.4e-4). With Q8_0 the same
    comparison gives 1.1e-2 and 9.4e-3: llama.cpp rounds the text model's activations to 8 bits before each
    matmul, so last-bit differences upstream (fp16 accumulation on ARM, summation order) flip roundings.
    """
    gguf = tmp_path / "gguf"
    export_text_as(trained_at(edge) / "run" / "final", gguf, "F16")
    theirs = lines(run(X86_CLI, "--quant", "F16", gguf, *val_photos))
    ours = lines(qemu(PHONE, "--quant", "F16", gguf, *val_photos))
    assert len(ours) == len(val_photos) and ours.keys() == theirs.keys()
    assert {k: o["label"] for k, o in ours.items()} == {k: t["label"] for k, t in theirs.items()}
    delta = max_dp(ours, theirs)
    print(f"ARM64 ({PHONE}, repack on) vs the x86 native build, F16 text, {edge} px, {len(ours)} val JPEGs: "
          f"same labels, max |Δp| {delta:.2e}")
    assert delta <= END_TO_END


# -- Q4_0: the type ARM repacks ---------------------------------------------------------------------------

def test_q4_0_on_arm_against_hf_and_q8_0(demo_dir, val_photos, on_x86, tmp_path):
    manifest = export_text_as(demo_dir / "run" / "final", tmp_path / "gguf", "Q4_0")
    assert [f["quant"] for f in manifest["files"].values() if f["role"] == "text"] == ["Q4_0"]
    b = backend(PHONE, "--quant", "Q4_0", tmp_path / "gguf")
    assert "CPU_REPACK" in b["weight_buffers"], b
    q4 = lines(qemu(PHONE, "--quant", "Q4_0", tmp_path / "gguf", *val_photos))
    hf = json.loads((demo_dir / "run" / "validation_results.json").read_text())
    truth = {Path(p["image_path"]).name: p["element"] for p in hf["predictions"]}
    hf_label = {Path(p["image_path"]).name: p["predicted"] for p in hf["predictions"]}
    q8 = on_x86[512]  # x86's Q8_0, whose labels ARM64 gives on every photo (test above)
    acc = {name: sum(a[k]["label"] == truth[k] for k in a) / len(a) for name, a in (("Q4_0", q4), ("Q8_0", q8))}
    agree = {name: sum(a[k]["label"] == hf_label[k] for k in a) / len(a) for name, a in (("Q4_0", q4), ("Q8_0", q8))}
    size = {f["quant"]: f["size_bytes"] for f in manifest["files"].values() if f["role"] == "text"}["Q4_0"]
    print(f"demo val ({len(q4)} photos): Q4_0 on ARM64 {PHONE} with repacking: accuracy {acc['Q4_0']:.3f}, agreement "
          f"with HF {agree['Q4_0']:.3f}; Q8_0: accuracy {acc['Q8_0']:.3f}, agreement {agree['Q8_0']:.3f}; Q4_0 vs "
          f"Q8_0 max |Δp| {max_dp(q4, q8):.2e}; Q4_0 text GGUF {size / 1e6:.1f} MB")
    assert agree["Q4_0"] >= 0.9 and acc["Q4_0"] >= acc["Q8_0"] - 0.1


# -- bad input: one line, exit 2, never a signal ------------------------------------------------------------

def _foreign(folder: Path) -> None:
    """The text GGUF replaced by another GGUF (the projector), the manifest updated to match: llama.cpp refuses it."""
    import hashlib

    text, m = _text_file(folder), json.loads((folder / "manifest.json").read_text())
    shutil.copyfile(folder / next(n for n, f in m["files"].items() if f["role"] == "mmproj"), text)
    m["files"][text.name].update(sha256=hashlib.sha256(text.read_bytes()).hexdigest(), size_bytes=text.stat().st_size)
    (folder / "manifest.json").write_text(json.dumps(m))


BAD_ON_ARM = {"foreign GGUF": (_foreign, "could not load"),
              **{case: BAD_EXPORTS[case] for case in ("file truncated", "wrong prompt tokens")}}


@pytest.mark.parametrize("case", list(BAD_ON_ARM))
def test_bad_export_on_arm_is_one_line_and_exit_2(demo_dir, val_photos, tmp_path, case):
    damage, needle = BAD_ON_ARM[case]
    folder = _copy(demo_dir, tmp_path)
    damage(folder)
    res = qemu(PHONE, folder, val_photos[0])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, (res.returncode, res.stderr[-2000:])
    assert needle in errors[0], errors[0]


def test_photo_the_decoder_refuses_on_arm_is_one_line_and_exit_2(demo_dir, val_photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + bytes(300))  # a JPEG's first marker, then nothing a decoder can read
    res = qemu(PHONE, demo_dir / "gguf", broken)
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "broken.jpg" in res.stderr, res.stderr
