"""The Kotlin API as an app uses it (issue 20), on the desktop JVM through the real JNI library and the demo model.

- it never blocks the caller and never crashes the app: photos from many coroutines are computed one at a time
  with the answers each gets alone, a cancelled caller's photo is not computed, close() returns at once while a
  photo is in flight and frees the model after it, a classifier nobody closed is freed by the garbage collector;
- every C++ exception becomes ElementalException (the guard every JNI entry point runs in, thrown through in a
  real JVM), and every entry point uses it;
- a JPEG's bytes go to the library's own decoder (classifyJpeg: the answers of `elemental classify` exactly, and a
  50-MP photo within 64 MB); other photos' pixels, as an app builds them from its platform decoder (UprightRgb: EXIF
  orientation and transparency, row by row), are the desktop's (Pillow's transpose and compositing).
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_native import JAR, ROOT, SAME_PIXELS, _java, lines, max_dp, python_classify, run

from elemental.images import _to_rgb

pytestmark = pytest.mark.slow

JNI = ROOT / "android/src/main/cpp/elemental_jni.cpp"


def said(res: subprocess.CompletedProcess) -> dict[str, str]:
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)


def test_calls_queue_cancel_close_and_free_without_blocking_the_caller(demo_dir, png_photos):
    out = said(_java("--lifecycle", demo_dir / "gguf", png_photos[-1]))  # the 3000x2000 photo: the slowest
    assert int(out["threads"]) >= 1
    assert out["concurrent"] == "true"  # 4 callers at once, each the answer it gets alone
    assert out["cancel"] == "cancelled; others: true"
    m = re.fullmatch(r"returned in ([\d.]+) ms; photo took ([\d.]+) ms; answer true; "
                     r"queued ElementalException: the classifier is closed; attempts \d+", out["close in flight"])
    assert m, out["close in flight"]
    close_ms, photo_ms = map(float, m.groups())
    print(f"close() during a photo: {close_ms:.3f} ms; the photo in flight: {photo_ms:.1f} ms")
    assert close_ms < photo_ms / 10  # it did not wait for the photo
    assert out["freed after close"] == "true"
    assert out["cleaner"].endswith("freed true"), out["cleaner"]


def test_the_guides_app_flow_downloads_once_and_answers_as_elemental_classify(demo_dir, png_photos, tmp_path):
    """docs/android.md's integration on the desktop: ModelStore fetches the export over HTTP, the coroutine API
    classifies; a second start finds the model installed and needs no server."""
    gguf = demo_dir / "gguf"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(gguf))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    photos = png_photos[:3]
    try:
        first = lines(_java("--app", url, tmp_path / "models", *photos))
    finally:
        server.shutdown()
        server.server_close()
    second = lines(_java("--app", url, tmp_path / "models", *photos))  # the server is gone: installed() found it
    theirs = python_classify(gguf, photos, tmp_path)
    assert max_dp(first, theirs) <= SAME_PIXELS and max_dp(second, theirs) <= SAME_PIXELS
    installed = tmp_path / "models/elements"
    manifest = json.loads((gguf / "manifest.json").read_text())
    for name in manifest["files"]:
        assert (installed / name).read_bytes() == (gguf / name).read_bytes()
    stamp = json.loads((installed / "verified.json").read_text())
    assert stamp["format"] == 1 and stamp["files"].keys() == manifest["files"].keys()


def test_jpegs_classified_by_the_librarys_decoder_answer_as_elemental_classify(demo_dir, val_photos, tmp_path):
    """classifyJpeg: the phone hands the file's bytes to the library, which decodes them as Pillow does."""
    gguf = demo_dir / "gguf"
    ours, theirs = lines(_java("--jpeg", gguf, *val_photos)), python_classify(gguf, val_photos, tmp_path)
    assert len(ours) == len(val_photos) and [ours[k]["label"] for k in ours] == [theirs[k]["label"] for k in ours]
    assert max_dp(ours, theirs) <= SAME_PIXELS


def test_a_50_megapixel_jpeg_costs_the_app_little_memory(demo_dir, tmp_path):
    """Through the app's path (bytes read, classifyJpeg), in a JVM: the peak above the loaded model, measured by the
    process itself (Linux's VmHWM, reset before the photo). Decoded whole, the RGB alone would be 150 MB."""
    from test_native_decode import photo

    small, big = tmp_path / "small.jpg", tmp_path / "50mp.jpg"
    photo(640, 480, seed=3).save(small, quality=90)
    photo(8160, 6120, seed=8).save(big, quality=90)  # a 50-MP camera photo, 4:2:0
    res = _java("--peak-jpeg", demo_dir / "gguf", small, big)
    assert res.returncode == 0, res.stderr[-2000:]
    peak = int(re.search(r"peak above the loaded model: (\d+) bytes", res.stdout).group(1))
    print(f"50-MP JPEG ({big.stat().st_size / 2**20:.1f} MiB) through classifyJpeg: peak {peak / 2**20:.1f} MiB "
          "above the loaded model")
    assert 0 < peak <= 64 * 2**20


def test_threads_are_checked_where_they_enter(demo_dir):
    out = said(_java("--errors", demo_dir / "gguf"))
    for case, value in (("too many threads", 100000), ("negative threads", -1)):
        assert out[case] == f"ElementalException: threads must be 0 (the big cores) or 1..512, not {value}"


# -- C++ exceptions across JNI ---------------------------------------------------------------------------

def _java_home() -> Path:
    res = subprocess.run(["java", "-XshowSettings:properties", "-version"], capture_output=True, text=True)
    return Path(re.search(r"java\.home = (.+)", res.stderr).group(1).strip())


def test_a_cpp_exception_reaches_kotlin_as_elemental_exception(tmp_path):
    """jni_guard.h in a real JVM: bad_alloc, a JSON parse error, a runtime_error and a non-exception throw."""
    home, gxx = _java_home(), shutil.which("g++")
    assert gxx, "g++ is missing"
    server = home / "lib/server"
    exe = tmp_path / "jni_guard_test"
    build = subprocess.run(
        [gxx, "-std=c++17", "-O1", f"-I{JNI.parent}", f"-I{ROOT / '.venv/share/elemental/llama.cpp-src/vendor'}",
         f"-I{home / 'include'}", f"-I{home / 'include/linux'}", str(ROOT / "tests/jvm/jni_guard_test.cpp"),
         f"-L{server}", "-ljvm", f"-Wl,-rpath,{server}", "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    out = said(run(exe, JAR))
    assert out["no exception"] == "returned 42; none"
    assert out["bad_alloc"] == "returned -1; org.elemental.ElementalException: out of native memory"
    assert out["json"].startswith("returned -1; org.elemental.ElementalException: [json.exception.parse_error")
    assert out["runtime_error"] == "returned -1; org.elemental.ElementalException: out of range: 7"
    assert out["not an exception"] == "returned -1; org.elemental.ElementalException: unknown native error"


def test_every_jni_entry_point_runs_in_the_guard_and_kotlin_declares_each():
    source = JNI.read_text()
    entry = r"JNIEXPORT \w+ JNICALL Java_org_elemental_NativeLib_(\w+)\(.*?\) \{\n(.*?)\n\}\n"
    entries = re.findall(entry, source, re.S)
    assert len(entries) == source.count("JNIEXPORT") >= 6
    for name, body in entries:
        assert body.lstrip().startswith(("return guarded(env,", "guarded(env,")), f"{name} does not run in guarded()"
    kotlin = (ROOT / "android/src/main/kotlin/org/elemental/NativeLib.kt").read_text()
    assert sorted(re.findall(r"external fun (\w+)\(", kotlin)) == sorted(name for name, _ in entries)
    # C++ throws nothing of its own here: the one throw is with_bytes' rethrow after releasing the array, in guarded()
    assert re.findall(r"\bthrow\b[^;]*;", source) == ["throw;"]


# -- the pixels an app builds -----------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_rgb_turns_and_flattens_as_the_desktop(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    rgba = rng.integers(0, 256, (23, 37, 4), dtype=np.uint8)
    rgba[:11, :, 3] = 255  # opaque rows must come out exact; the rest is composited onto white
    path = tmp_path / "photo.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = tmp_path / "rgb.bin"
    res = run("java", "-cp", JAR, "ClassifyPhotosKt", "--upright", path, str(orientation), out)
    assert res.returncode == 0, res.stderr[-2000:]
    width, height = map(int, res.stdout.split())
    ours = np.frombuffer(out.read_bytes(), np.uint8).reshape(height, width, 3)
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    turn = (lambda im: im.transpose(method)) if method is not None else (lambda im: im)  # FLIP_LEFT_RIGHT is 0
    with Image.open(path) as img:
        theirs = np.asarray(turn(_to_rgb(img)))
    assert ours.shape == theirs.shape
    opaque = np.zeros((23, 37), np.uint8)
    opaque[:11] = 255
    opaque = np.asarray(turn(Image.fromarray(opaque))) == 255
    assert (ours[opaque] == theirs[opaque]).all()  # opaque pixels exactly
    assert np.abs(ours.astype(int) - theirs).max() <= 1  # compositing onto white rounds by at most 1 level
