"""The phone side (native/, the JNI glue, the Kotlin API) against `elemental classify` (issue 11).

`make native` builds build/native/ (the library, elemental-native-classify, elemental-native-shrink,
libelemental_jni.so and elemental-jvm.jar) against the venv's llama.cpp; these tests run them:
- the native CLI on the demo export answers as `elemental classify` on every val photo: the same label,
  |Δp| ≤ 1e-6, on PNGs and on the JPEGs themselves (the library decodes JPEGs as Pillow does: elemental/photo.h);
- its pre-shrink is Pillow's to the pixel, and EXIF orientation turns JPEGs as Pillow does;
- every bad input is one `error:` line with exit code 2, never a crash;
- the Kotlin class through the JNI glue, in a JVM, gives the same answers and the same errors.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cli_process import elemental
from PIL import Image

from elemental.images import bounded, open_image
from elemental.synthetic import synthetic_photo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "build" / "native"
CLI = NATIVE / "elemental-native-classify"
SHRINK = NATIVE / "elemental-native-shrink"
JAR = NATIVE / "elemental-jvm.jar"
SAME_PIXELS = 1e-6
END_TO_END = 5e-3


def run(*cmd: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    for tool in (CLI, SHRINK, JAR):
        if not tool.is_file():
            pytest.fail(f"{tool} is missing: run `make native` (tests/test_native.py needs it built)")
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def lines(res: subprocess.CompletedProcess) -> dict[str, dict]:
    assert res.returncode == 0, res.stderr[-3000:]
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {Path(o["path"]).name: o for o in out}


def python_classify(model: Path, photos: list[Path], cwd: Path) -> dict[str, dict]:
    return lines(elemental("classify", "--model_path", str(model), *map(str, photos), cwd=cwd))


def max_dp(a: dict[str, dict], b: dict[str, dict]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k]["probabilities"][lab] - b[k]["probabilities"][lab]) for k in a for lab in a[k]["probabilities"])


# -- the native CLI against `elemental classify` --------------------------------------------------------

def test_native_cli_answers_as_elemental_classify_on_every_val_photo(demo_dir, val_photos, tmp_path):
    gguf = demo_dir / "gguf"
    ours, theirs = lines(run(CLI, gguf, *val_photos)), python_classify(gguf, val_photos, tmp_path)
    assert len(ours) == len(val_photos) >= 20
    assert [ours[k]["label"] for k in ours] == [theirs[k]["label"] for k in ours]
    delta = max_dp(ours, theirs)
    print(f"native vs elemental classify, {len(ours)} val JPEGs: same labels, max |Δp| {delta:.2e}")
    assert delta <= SAME_PIXELS  # one JPEG decode on both sides (elemental/photo.h: Pillow's pixels)
    truth = {Path(r["image_path"]).name: r["element"] for r in json.loads((demo_dir / "dataset/val.json").read_text())}
    assert sum(ours[k]["label"] == truth[k] for k in ours) / len(ours) >= 0.9  # and it learned, as the demo did


def test_same_pixels_give_the_same_probabilities(demo_dir, png_photos, tmp_path):
    gguf = demo_dir / "gguf"
    ours, theirs = lines(run(CLI, gguf, *png_photos)), python_classify(gguf, png_photos, tmp_path)
    assert [ours[k]["label"] for k in ours] == [theirs[k]["label"] for k in ours]
    delta = max_dp(ours, theirs)
    print(f"native vs elemental classify, {len(ours)} PNGs (one 3000x2000): max |Δp| {delta:.2e}")
    assert delta <= SAME_PIXELS
    assert set(ours["large-3000x2000.png"]) >= {"path", "label", "top_k", "probabilities", "ms"}


@pytest.mark.parametrize("flags", [["--threads", "1"], ["--repack", "off"], ["--repack", "on"]])
def test_threads_and_repack_are_parameters_with_the_same_answers(demo_dir, png_photos, flags):
    some = png_photos[:4]
    base = lines(run(CLI, demo_dir / "gguf", *some))
    assert max_dp(lines(run(CLI, *flags, demo_dir / "gguf", *some)), base) <= SAME_PIXELS


def test_labels_sharing_a_first_token_are_scored_over_all_their_tokens(tmp_path, png_photos):
    from elemental.config import TaskConfig
    from elemental.export.gguf import export_gguf
    from elemental.model_io import load_processor
    from elemental.synthetic import build_tiny_model
    from elemental.task import Task

    task = Task.from_config(TaskConfig(labels=["water", "waterfall", "land"]))
    model = build_tiny_model(tmp_path / "model", Task.from_config(TaskConfig()))  # its tokenizer splits "waterfall"
    load_processor(model, longest_edge=512).save_pretrained(model)
    manifest = export_gguf(model, tmp_path / "gguf", task)
    assert manifest["first_token_scoring"] is False
    photos = png_photos[:3]
    ours = lines(run(CLI, tmp_path / "gguf", *photos))
    theirs = python_classify(tmp_path / "gguf", photos, tmp_path)
    assert max_dp(ours, theirs) <= SAME_PIXELS


# -- pixels: the pre-shrink and EXIF orientation --------------------------------------------------------

@pytest.mark.parametrize("size, max_side", [
    ((3000, 2000), 1024), ((4032, 3024), 1024), ((3024, 4032), 1024), ((1025, 700), 1024), ((2047, 1025), 1024),
    ((1500, 1500), 512), ((640, 480), 300), ((5000, 37), 1024), ((20, 4000), 1024), ((3, 9000), 1024),
    ((800, 600), 1024),  # already small: untouched
])
def test_pre_shrink_is_pillows_to_the_pixel(tmp_path, size, max_side):
    rng = np.random.default_rng(size[0] * 7 + size[1])
    smooth = np.asarray(synthetic_photo("water", rng, size=size), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-40, 41, smooth.shape), 0, 255).astype(np.uint8)  # every tap matters
    Image.fromarray(noisy).save(tmp_path / "in.png")
    res = run(SHRINK, tmp_path / "in.png", tmp_path / "out.ppm", str(max_side))
    assert res.returncode == 0, res.stderr
    ours = np.asarray(Image.open(tmp_path / "out.ppm"))
    pillow = np.asarray(bounded(open_image(tmp_path / "in.png"), max_side))
    assert ours.shape == pillow.shape
    assert np.array_equal(ours, pillow), f"max |diff| {np.abs(ours.astype(int) - pillow).max()}"


def _quadrants(w: int, h: int) -> Image.Image:
    """Four flat colours, so any wrong turn or flip shows; JPEG keeps flat areas nearly exact."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (220, 30, 30)
    a[: h // 2, w // 2:] = (30, 200, 40)
    a[h // 2:, : w // 2] = (40, 40, 210)
    a[h // 2:, w // 2:] = (230, 230, 40)
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_jpegs_as_pillow_does(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    _quadrants(160, 96).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "p.jpg").write_bytes(buf.getvalue())
    res = run(SHRINK, tmp_path / "p.jpg", tmp_path / "out.ppm", "1024")
    assert res.returncode == 0, res.stderr
    ours = np.asarray(Image.open(tmp_path / "out.ppm"), dtype=int)
    pillow = np.asarray(open_image(tmp_path / "p.jpg"), dtype=int)
    assert ours.shape == pillow.shape
    assert np.abs(ours - pillow).mean() < 2.0  # two JPEG decoders, the same picture the same way up


# -- bad input: one line, exit 2, never a crash ---------------------------------------------------------

def _copy(demo_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_dir / "gguf", tmp_path / "gguf"))


def _edit_manifest(folder: Path, change) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _text_file(folder: Path) -> Path:
    m = json.loads((folder / "manifest.json").read_text())
    return folder / next(n for n, f in m["files"].items() if f["role"] == "text")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


BAD_EXPORTS = {
    "missing folder": (lambda g: shutil.rmtree(g), "model folder not found"),
    "no manifest": (lambda g: (g / "manifest.json").unlink(), "has no manifest.json"),
    "manifest not JSON": (lambda g: (g / "manifest.json").write_text("{oops"), "not valid JSON"),
    "unknown format": (lambda g: _edit_manifest(g, lambda m: m.update(format="elemental-gguf/9")),
                       "format 'elemental-gguf/9' is not one this library reads"),
    "field missing": (lambda g: _edit_manifest(g, lambda m: m["image"].pop("n_image_tokens")),
                      "field 'image.n_image_tokens' is missing"),
    "field of the wrong type": (lambda g: _edit_manifest(g, lambda m: m.update(labels="water")),
                                "field 'labels' has the wrong type"),
    "file missing": (lambda g: _text_file(g).unlink(), "GGUF file missing or unreadable"),
    "file truncated": (lambda g: _text_file(g).write_bytes(_text_file(g).read_bytes()[:-10]),
                       "bytes, the manifest says"),
    "file changed": (lambda g: _flip_last_byte(_text_file(g)), "differs from"),
    "wrong prompt tokens": (lambda g: _edit_manifest(g, lambda m: m["prompt_prefix_token_ids"].append(1)),
                            "llama.cpp tokenizes prompt_prefix as"),
    "label id outside the vocabulary": (
        lambda g: _edit_manifest(g, lambda m: m["label_token_ids"][0].__setitem__(0, 10**6)), "outside the vocabulary"),
    "wrong image token count": (lambda g: _edit_manifest(g, lambda m: m["image"].update(n_image_tokens=65)),
                                "overview image is 64 tokens, the manifest says 65"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_bad_export_is_one_line_and_exit_2(demo_dir, png_photos, tmp_path, case):
    damage, needle = BAD_EXPORTS[case]
    folder = _copy(demo_dir, tmp_path)
    damage(folder)
    res = run(CLI, folder, png_photos[0])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, (res.returncode, res.stderr[-2000:])
    assert needle in errors[0], errors[0]


@pytest.mark.parametrize("photo, needle", [
    ("missing.png", "photo not found"),
    ("empty.png", "empty file"),
    ("text.jpg", "not a readable image"),
])
def test_bad_photo_is_one_line_and_exit_2(demo_dir, tmp_path, photo, needle):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a photo")
    res = run(CLI, demo_dir / "gguf", tmp_path / photo)
    assert res.returncode == 2 and needle in res.stderr and res.stderr.count("error:") == 1, res.stderr


def test_unknown_option_and_quant_are_refused(demo_dir, png_photos):
    res = run(CLI, "--quant", "Q2_K", demo_dir / "gguf", png_photos[0])
    assert res.returncode == 2 and "lists no text GGUF of type Q2_K" in res.stderr
    res = run(CLI, "--repack", "maybe", demo_dir / "gguf", png_photos[0])
    assert res.returncode == 2 and "--repack takes auto, on or off" in res.stderr


def test_print_backend_names_the_linked_cpu_backend_and_where_weights_land(demo_dir, tmp_path):
    """The desktop build links its CPU backend (the wheel's libggml-cpu): no backend folder is needed or read."""
    res = run(CLI, "--backend-dir", tmp_path / "nowhere", "--print-backend", demo_dir / "gguf")
    assert res.returncode == 0, res.stderr[-2000:]
    b = json.loads(res.stdout)
    assert b["backend"] == "CPU" and b["variant"] == "linked" and Path(b["library"]).name.startswith("libggml-cpu")
    assert b["features"] and all(isinstance(v, str) for v in b["features"].values())
    assert b["weight_buffers"] and isinstance(b["repack"], bool) and b["threads"] >= 1


def _backend(*args: str | Path) -> dict:
    res = run(CLI, "--print-backend", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_open_hashes_each_file_once_then_trusts_the_stamp_until_the_file_changes(demo_dir, tmp_path):
    """A phone hashing hundreds of MB at every start is slow: the sha256 is checked once, then verified.json vouches."""
    export = tmp_path / "gguf"
    shutil.copytree(demo_dir / "gguf", export, ignore=shutil.ignore_patterns("verified.json"))
    files = json.loads((export / "manifest.json").read_text())["files"]
    text = next(n for n, f in files.items() if f["role"] == "text")
    mmproj = next(n for n, f in files.items() if f["role"] == "mmproj")
    assert sorted(_backend(export)["hashed"]) == sorted([text, mmproj])  # the first open hashes both
    stamp = json.loads((export / "verified.json").read_text())
    assert stamp["format"] == 1 and stamp["files"].keys() == {text, mmproj}
    for name, entry in stamp["files"].items():
        st = (export / name).stat()
        assert entry == {"size": st.st_size, "mtime_ms": st.st_mtime_ns // 1_000_000, "sha256": files[name]["sha256"]}
    assert _backend(export)["hashed"] == []  # later opens trust the stamp
    st = (export / text).stat()
    os.utime(export / text, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # touched: same bytes, new time
    assert _backend(export)["hashed"] == [text]
    assert _backend(export)["hashed"] == []
    stamp = json.loads((export / "verified.json").read_text())
    stamp["files"][mmproj]["sha256"] = "0" * 64  # a stamp vouching for another digest is not believed
    (export / "verified.json").write_text(json.dumps(stamp))
    assert _backend(export)["hashed"] == [mmproj]
    data = bytearray((export / mmproj).read_bytes())  # changed bytes, same size, a new time: caught
    data[-1] ^= 0xFF
    (export / mmproj).write_bytes(bytes(data))
    res = run(CLI, "--print-backend", export)
    assert res.returncode == 2 and f"{mmproj}: sha256" in res.stderr
    assert mmproj not in json.loads((export / "verified.json").read_text())["files"]


def _cpu_sysfs(root: Path, top_khz: list[int], offline: tuple[int, ...] = ()) -> Path:
    """A /sys/devices/system/cpu tree as Linux writes it for `top_khz` (cpuinfo_max_freq per CPU)."""
    for i, khz in enumerate(top_khz):
        cpu = root / f"cpu{i}"
        (cpu / "cpufreq").mkdir(parents=True)
        (cpu / "cpufreq/cpuinfo_max_freq").write_text(f"{khz}\n")
        if i:
            (cpu / "online").write_text("0\n" if i in offline else "1\n")
    (root / "cpufreq").mkdir(parents=True, exist_ok=True)  # siblings that are not CPUs
    (root / "online").write_text(f"0-{max(len(top_khz) - 1, 0)}\n")
    return root


@pytest.mark.parametrize("top_khz, offline, expected", [
    ([1_800_000] * 4 + [2_800_000] * 3 + [3_200_000], (), 4),  # 4 little, 3 big, 1 prime: the 4 not little
    ([1_700_000] * 6 + [2_200_000] * 2, (), 2),
    ([1_800_000] * 4 + [2_400_000] * 4, (5,), 3),  # an offline big core does not count
    ([2_000_000] * 8, (), 8),  # all alike: every core
])
def test_default_threads_are_the_big_cores(tmp_path, top_khz, offline, expected):
    assert _backend("--cpu-sysfs", _cpu_sysfs(tmp_path / "cpu", top_khz, offline))["default_threads"] == expected


def test_default_threads_without_cpufreq_are_every_core(tmp_path):
    (tmp_path / "cpu/cpu0").mkdir(parents=True)
    assert _backend("--cpu-sysfs", tmp_path / "cpu")["default_threads"] == os.cpu_count()


# -- the Kotlin API through the JNI glue, in a JVM -------------------------------------------------------

def _java(*args: str | Path) -> subprocess.CompletedProcess:
    java = shutil.which("java")
    if java is None:
        pytest.fail("java is missing: install a JDK (README: \"The phone side\")")
    return run(java, f"-Djava.library.path={NATIVE}", "-cp", JAR, "ClassifyPhotosKt", *args)


def test_kotlin_class_through_jni_answers_as_elemental_classify(demo_dir, png_photos, tmp_path):
    gguf = demo_dir / "gguf"
    ours, theirs = lines(_java(gguf, *png_photos)), python_classify(gguf, png_photos, tmp_path)
    assert [ours[k]["label"] for k in ours] == [theirs[k]["label"] for k in ours]
    delta = max_dp(ours, theirs)
    print(f"Kotlin/JNI vs elemental classify, {len(ours)} PNGs: max |Δp| {delta:.2e}")
    assert delta <= SAME_PIXELS


def test_kotlin_errors_are_exceptions_with_the_librarys_message(demo_dir):
    res = _java("--errors", demo_dir / "gguf")
    assert res.returncode == 0, res.stderr[-2000:]
    said = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    assert said["missing folder"].startswith("ElementalException: model folder not found")
    assert "lists no text GGUF of type Q2_K" in said["unknown quant"]
    assert said["bitmap too small"] == ("ElementalException: bitmap too small: 10 bytes for a 64x64 RGB image "
                                        "(needs 12288)")
    assert said["empty bitmap"].startswith("ElementalException: bitmap is empty")
    assert said["closed"] == "ElementalException: the classifier is closed"


def test_android_guide_quotes_only_compiled_code():
    """Every code line of docs/android.md's C++ and Kotlin blocks is in a file that `make native` compiles."""
    kotlin = sorted((ROOT / "android/src/main/kotlin/org/elemental").glob("*.kt"))  # not android/: no SDK here
    compiled = "\n".join(p.read_text() for p in [
        *sorted((ROOT / "native").rglob("*.cpp")), *sorted((ROOT / "native").rglob("*.h")),
        ROOT / "android/src/main/cpp/elemental_jni.cpp", *kotlin, ROOT / "tests/jvm/ClassifyPhotos.kt"])
    doc = (ROOT / "docs/android.md").read_text()
    blocks = [b.split("\n", 1) for b in doc.split("```")[1::2]]
    code = [body for lang, body in blocks if lang.strip() in ("cpp", "c++", "kotlin")]
    assert code, "docs/android.md has no C++ or Kotlin block"
    for body in code:
        for line in body.splitlines():
            if line.strip() and not line.strip().startswith(("//", "...")):
                assert line.strip() in compiled, f"docs/android.md quotes code that no test compiles: {line.strip()!r}"
