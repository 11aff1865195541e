"""The desktop tools (native/tools/) against crafted files, and wide/tall photos in both paths (issue 20, item 8).

- the EXIF reader reads nothing out of bounds for IFD offsets near 0xFFFFFFFF (the shrink tool, and photo.cpp
  compiled with AddressSanitizer and UBSan);
- a header that declares more than elemental.images.DEFAULT_MAX_PIXELS is refused before any pixel is
  decoded, and a file over INT_MAX bytes before it is read;
- `--threads` is a whole number from 0 to 512 or one `error:` line and exit 2;
- in a folder, a photo that fails (empty, truncated, WebP/TIFF that stb_image cannot decode, over the pixel cap,
  too wide or tall) gets its own JSON line, the others are classified, and the exit code is 2; the folder yields
  the files `elemental classify` takes;
- a photo too wide or tall for libmtmd is refused before libmtmd sees it, by the same rule and in the same words
  in the native CLI and `elemental classify`, and the rule is exactly where libmtmd fails.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_process import elemental
from PIL import Image

from elemental.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, bounded, open_image
from elemental.synthetic import synthetic_photo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "build" / "native"
CLI = NATIVE / "elemental-native-classify"
SHRINK = NATIVE / "elemental-native-shrink"
SAME_PIXELS = 1e-6


def run(*cmd: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    for tool in (CLI, SHRINK):
        if not tool.is_file():
            pytest.fail(f"{tool} is missing: run `make native` (tests/test_native_tools.py needs it built)")
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def json_lines(res: subprocess.CompletedProcess) -> dict[str, dict]:
    out = [json.loads(line) for line in res.stdout.splitlines()]
    return {Path(o["path"]).name: o for o in out}


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


# -- crafted files ---------------------------------------------------------------------------------------

def small_jpeg(w: int = 40, h: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), (200, 90, 40), np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def with_exif(jpeg: bytes, tiff: bytes) -> bytes:
    """`jpeg` with an APP1 Exif block holding `tiff` right after its start-of-image marker."""
    body = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def tiff_with_ifd_at(offset: int, entries: int = 1) -> bytes:
    """A little-endian TIFF header whose first IFD is at `offset`; a small IFD follows at 8 either way."""
    ifd = struct.pack("<H", entries) + struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", offset) + ifd


def jpeg_header(w: int, h: int) -> bytes:
    """Start-of-image and a baseline frame header declaring w x h, three components; no pixels at all."""
    components = b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    return b"\xff\xd8\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + components


def jpeg_declaring(w: int, h: int) -> bytes:
    """A whole 16x16 JPEG (tables, scan, end marker) whose frame header says w x h: decoders read every header and
    pick their scale as for a real w x h photo, then run out of scan data."""
    data = bytearray(small_jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


# -- EXIF: offsets near the 32-bit wrap ------------------------------------------------------------------

EXIF_CASES = {  # name: (TIFF block, the orientation it must give)
    "ifd at 0xFFFFFFF0": (tiff_with_ifd_at(0xFFFFFFF0), 1),
    "ifd at 0xFFFFFFFE (offset + 2 wraps to 0)": (tiff_with_ifd_at(0xFFFFFFFE), 1),
    "ifd at 0xFFFFFFFF (offset + 2 wraps to 1)": (tiff_with_ifd_at(0xFFFFFFFF), 1),
    "ifd one byte before the end": (tiff_with_ifd_at(len(tiff_with_ifd_at(8)) - 1), 1),
    "entry count running past the end": (tiff_with_ifd_at(8, entries=0xFFFF), 6),
    "valid: orientation 6": (tiff_with_ifd_at(8), 6),
}


@pytest.mark.parametrize("case", list(EXIF_CASES))
def test_exif_offsets_near_the_wrap_read_nothing_out_of_bounds(tmp_path, case):
    tiff, orientation = EXIF_CASES[case]
    (tmp_path / "p.jpg").write_bytes(with_exif(small_jpeg(40, 20), tiff))
    res = run(SHRINK, tmp_path / "p.jpg", tmp_path / "out.ppm", "1024")
    assert res.returncode == 0, (res.returncode, res.stderr)  # the old reader died of SIGSEGV on the wrapping ones
    size = Image.open(tmp_path / "out.ppm").size
    assert size == ((20, 40) if orientation == 6 else (40, 20))  # 6 turns it; a broken block leaves it as is


DRIVER = r"""
#include "elemental/photo.h"
#include "photo.h"
#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>
// Each file: the EXIF orientation of its raw bytes, and what load_photo says.
int main(int argc, char ** argv) {
    for (int i = 1; i < argc; i++) {
        std::ifstream in(argv[i], std::ios::binary);
        const std::vector<unsigned char> d((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        elemental::RgbImage photo;
        std::string error;
        const bool ok = elemental::tools::load_photo(argv[i], 0, photo, error);
        std::printf("%d %s\n", elemental::jpeg_orientation(d.data(), d.size()),
                    ok ? (std::to_string(photo.width) + "x" + std::to_string(photo.height)).c_str() : "refused");
    }
    return 0;
}
"""


def cmake_cache(key: str) -> Path:
    cache = (NATIVE / "CMakeCache.txt").read_text()
    line = next(ln for ln in cache.splitlines() if ln.startswith(f"{key}:"))
    return Path(line.split("=", 1)[1])


def test_photo_reader_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """photo.cpp and a small driver built with -fsanitize=address,undefined, fed every crafted file."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.fail("g++ is missing (scripts/system-deps installs it)")
    (tmp_path / "driver.cpp").write_text(DRIVER)
    exe = tmp_path / "photo-asan"
    jpeg = NATIVE / "libjpeg-turbo"  # the libjpeg-turbo `make native` built (native/cmake/libjpeg-turbo.cmake)
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-Wall", "-Wextra", "-Wno-unused-function", "-Werror",  # stb_image's unused static API aside
         f"-I{ROOT / 'native/tools'}", f"-I{ROOT / 'native/include'}",
         f"-I{cmake_cache('ELEMENTAL_LLAMA_CPP_SOURCE') / 'vendor'}", f"-I{jpeg / 'include'}",
         str(ROOT / "native/tools/photo.cpp"), str(ROOT / "native/src/photo_decode.cpp"), str(tmp_path / "driver.cpp"),
         str(jpeg / "lib/libjpeg.a"), "-o", str(exe)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    files = []
    for i, (tiff, _) in enumerate(EXIF_CASES.values()):
        files.append(tmp_path / f"exif{i}.jpg")
        files[-1].write_bytes(with_exif(small_jpeg(40, 20), tiff))
    for name, data in [("empty.jpg", b""), ("cut.jpg", small_jpeg()[:150]), ("header.jpg", jpeg_header(12000, 10000)),
                       ("header.png", png_header(12000, 10000)), ("text.jpg", b"not a photo")]:
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    res = subprocess.run([str(exe), *map(str, files)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0"})
    assert res.returncode == 0 and "Sanitizer" not in res.stderr and "runtime error" not in res.stderr, res.stderr
    said = res.stdout.splitlines()
    expected = [f"{o} {'20x40' if o == 6 else '40x20'}" for _, o in EXIF_CASES.values()] + ["1 refused"] * 5
    assert said == expected


# -- size limits: pixels declared in a header, bytes of a file -------------------------------------------

@pytest.mark.parametrize("name, header", [("big.jpg", jpeg_declaring(12000, 10000)),
                                          ("big.png", png_header(12000, 10000))], ids=["jpeg", "png"])
def test_a_header_over_the_pixel_cap_is_refused_before_decoding(tmp_path, name, header):
    """At the size it would be decoded at: a JPEG brought to 20000 px has no reduced scale to use; Python refuses
    the same header in the same terms."""
    assert 12000 * 10000 > DEFAULT_MAX_PIXELS
    (tmp_path / name).write_bytes(header)
    res = run(SHRINK, tmp_path / name, tmp_path / "out.ppm", "20000")
    assert res.returncode == 2 and len(error_lines(res)) == 1, res.stderr
    assert f"{tmp_path / name}: 12000x10000 = 120 Mpx, over the limit of 100 Mpx" in res.stderr
    with pytest.raises(Exception, match="12000x10000 = 120 Mpx, over the limit of 100 Mpx"):
        open_image(tmp_path / name, max_side=20000)


def test_a_big_jpeg_header_is_decoded_at_reduced_scale_as_python_does(tmp_path):
    """Brought to 1024 px, a JPEG declaring 12000x10000 is decoded at 1/8 (1500x1250, under the cap) by both; its
    scan data runs out early, and both fill the rest alike (libjpeg's warning, ignored as Pillow ignores it)."""
    (tmp_path / "big.jpg").write_bytes(jpeg_declaring(12000, 10000))
    res = run(SHRINK, tmp_path / "big.jpg", tmp_path / "out.ppm", "1024")
    assert res.returncode == 0, res.stderr
    theirs = bounded(open_image(tmp_path / "big.jpg", max_side=1024), 1024)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.ppm")), np.asarray(theirs))


def test_a_file_over_int_max_bytes_is_refused_without_reading_it(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:  # sparse: 2 GiB on paper, a few bytes on disk
        f.write(small_jpeg())
        f.truncate(2**31 + 10)
    t0 = time.perf_counter()
    res = run(SHRINK, huge, tmp_path / "out.ppm")
    assert res.returncode == 2 and len(error_lines(res)) == 1, res.stderr
    assert f"{huge}: 2147483658 bytes, over the 2147483647 bytes this tool reads" in res.stderr
    assert time.perf_counter() - t0 < 5  # refused from its size, not read


def test_shrink_max_side_is_a_number(tmp_path):
    (tmp_path / "p.jpg").write_bytes(small_jpeg())
    res = run(SHRINK, tmp_path / "p.jpg", tmp_path / "out.ppm", "abc")
    assert res.returncode == 2 and "MAX_SIDE must be a whole number of pixels from 1, not 'abc'" in res.stderr


# -- --threads -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["100000", "513", "-1", "abc", "4x", ""])
def test_threads_out_of_range_or_not_a_number_is_one_line_and_exit_2(demo_dir, tmp_path, value):
    (tmp_path / "p.jpg").write_bytes(small_jpeg())
    res = run(CLI, "--threads", value, demo_dir / "gguf", tmp_path / "p.jpg")
    assert res.returncode == 2 and res.stdout == "", (res.returncode, res.stderr[-2000:])
    assert error_lines(res) == [f"error: --threads takes a whole number from 0 (the big cores) to 512, "
                                f"not '{value}'"]


def test_threads_in_range_are_taken(demo_dir, tmp_path):
    (tmp_path / "p.jpg").write_bytes(small_jpeg())
    res = run(CLI, "--threads", "2", demo_dir / "gguf", tmp_path / "p.jpg")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json_lines(res)["p.jpg"]["label"]


# -- a folder of good and bad photos ---------------------------------------------------------------------

@pytest.fixture
def mixed_folder(demo_dir, tmp_path) -> tuple[Path, dict[str, str], list[str]]:
    """(folder, bad photo name -> the words its error line must hold, good photo names)."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    val = json.loads((demo_dir / "dataset/val.json").read_text())
    source = demo_dir / "dataset" / val[0]["image_path"]
    shutil.copy(source, folder / "a-good.jpg")
    open_image(demo_dir / "dataset" / val[1]["image_path"]).save(folder / "sub" / "b-good.PNG")
    (folder / "c-exif-wrap.jpg").write_bytes(with_exif(source.read_bytes(), tiff_with_ifd_at(0xFFFFFFFF)))
    photo = open_image(source)
    photo.save(folder / "d.webp")
    photo.save(folder / "e.tif")
    (folder / "f-empty.jpg").write_bytes(b"")
    (folder / "g-truncated.jpg").write_bytes(source.read_bytes()[:-400])
    (folder / "h-over-cap.png").write_bytes(png_header(12000, 10000))
    Image.new("RGB", (4000, 1), (30, 90, 200)).save(folder / "i-wide.png")
    (folder / "notes.txt").write_text("not a photo, not listed")
    bad = {"d.webp": "WebP is not a format this tool decodes", "e.tif": "TIFF is not a format this tool decodes",
           "f-empty.jpg": "empty file (0 bytes)", "g-truncated.jpg": "truncated",
           "h-over-cap.png": "120 Mpx, over the limit of 100 Mpx", "i-wide.png": "photo is too wide or tall"}
    return folder, bad, ["a-good.jpg", "b-good.PNG", "c-exif-wrap.jpg"]


def test_a_folder_with_bad_photos_is_classified_to_the_end(demo_dir, mixed_folder):
    folder, bad, good = mixed_folder
    res = run(CLI, demo_dir / "gguf", folder)
    out = json_lines(res)
    assert res.returncode == 2, res.stderr[-3000:]  # something failed: as `elemental classify` says it, exit 2
    assert sorted(out) == sorted([*bad, *good])
    for name, words in bad.items():
        assert set(out[name]) == {"path", "error"} and words in out[name]["error"], out[name]
        assert out[name]["error"].startswith(out[name]["path"] + ": ")
    assert sorted(error_lines(res)) == sorted(f"error: {out[name]['error']}" for name in bad)
    for name in good:
        assert set(out[name]) == {"path", "label", "top_k", "probabilities", "ms"}, out[name]
    alone = run(CLI, demo_dir / "gguf", *(str(Path(out[n]["path"])) for n in good))
    assert alone.returncode == 0, alone.stderr[-2000:]
    for name, line in json_lines(alone).items():  # the failures beside them changed nothing
        assert line["label"] == out[name]["label"]
        assert max(abs(p - out[name]["probabilities"][k]) for k, p in line["probabilities"].items()) <= SAME_PIXELS


def test_a_folder_yields_the_files_elemental_classify_takes(demo_dir, tmp_path):
    from elemental.cli import _photo_paths

    folder = tmp_path / "all"
    (folder / "deep" / "er").mkdir(parents=True)
    for i, suffix in enumerate(sorted(IMAGE_SUFFIXES)):
        where = ("deep/er", "deep", ".")[i % 3]
        (folder / where / f"x{i}{suffix.upper()}").write_bytes(b"")
    for name in ("notes.txt", "IMG_0042", "x.jpg.bak", "y.pdf"):
        (folder / name).write_bytes(b"")
    res = run(CLI, demo_dir / "gguf", folder)
    native = [json.loads(line)["path"] for line in res.stdout.splitlines()]
    python = [str(p) for p in _photo_paths([str(folder)])]
    assert len(python) == len(IMAGE_SUFFIXES) and native == python
    assert res.returncode == 2 and len(error_lines(res)) == len(python)  # all empty: each its own line


# -- photos too wide or tall for libmtmd -----------------------------------------------------------------

REFUSED = [(1, 4000), (4000, 1), (3, 4000), (4000, 3), (1, 600)]
TAKEN = [(2048, 4), (2, 600), (1024, 2)]  # just inside the rule: libmtmd's short side comes out at 1 px


def strip(w: int, h: int) -> Image.Image:
    return synthetic_photo("fire", np.random.default_rng(w * 31 + h), size=(max(w, 16), max(h, 16))).resize((w, h))


def test_wide_and_tall_photos_get_the_same_outcome_from_both_clis(demo_dir, tmp_path):
    """One run of each CLI over refused and taken photos mixed: the same error line per refused photo, the same
    answers for the others, exit code 2 from both once all are done."""
    paths = []
    for w, h in REFUSED + TAKEN:
        paths.append(tmp_path / f"{w}x{h}.png")
        strip(w, h).save(paths[-1])
    res = run(CLI, demo_dir / "gguf", *paths)
    python = elemental("classify", "--model_path", str(demo_dir / "gguf"), *map(str, paths), cwd=tmp_path)
    native, theirs = json_lines(res), json_lines(python)
    for out in (res, python):
        assert out.returncode == 2 and len(error_lines(out)) == len(REFUSED), out.stderr[-3000:]
        assert "libmtmd" not in out.stderr  # refused before libmtmd ran
    assert list(native) == list(theirs) == [p.name for p in paths]  # every photo has its line, in order
    for w, h in REFUSED:
        path = tmp_path / f"{w}x{h}.png"
        message = (f"{w}x{h} photo is too wide or tall for the model: brought to 512 px on its long side, "
                   "its short side is under 1 px")
        assert native[path.name] == theirs[path.name] == {"path": str(path), "error": f"{path}: {message}"}
    for w, h in TAKEN:
        name = f"{w}x{h}.png"
        assert native[name]["label"] == theirs[name]["label"]
        ours = native[name]["probabilities"]
        assert max(abs(p - ours[k]) for k, p in theirs[name]["probabilities"].items()) <= SAME_PIXELS


def test_the_rule_refuses_exactly_the_photos_libmtmd_fails_on(demo_dir):
    """libmtmd itself (mtmd_tokenize, no rule in front of it) around the boundary, against the rule."""
    from llama_cpp import mtmd_cpp

    from elemental.classify.gguf import GGUFClassifier, check_libmtmd_shape
    from elemental.errors import ElementalError

    with GGUFClassifier(demo_dir / "gguf", n_threads=1) as clf:
        def libmtmd_takes(w: int, h: int) -> bool:
            data = bytes(w * h * 3)
            pixels = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
            bitmap = mtmd_cpp.mtmd_bitmap_init(w, h, pixels)
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
            rc = mtmd_cpp.mtmd_tokenize(clf._mctx, chunks, ctypes.byref(text),
                                        (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)
            return rc == 0

        def rule_takes(w: int, h: int) -> bool:
            try:
                check_libmtmd_shape((w, h), (w, h), clf.longest_edge)
            except ElementalError:
                return False
            return True

        sides = [(long, short) for short in (1, 2, 3) for long in [*range(505, 520), 1023, 1024, 1535, 1536, 1537]]
        sizes = sides + [(h, w) for w, h in sides]
        refused = [s for s in sizes if not libmtmd_takes(*s)]
        assert [s for s in sizes if not rule_takes(*s)] == refused
        assert (513, 1) in refused and (512, 1) not in refused and (1024, 2) not in refused  # the boundary is in range
