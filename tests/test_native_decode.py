"""The phone's JPEG decoder (native/src/photo_decode.cpp, libjpeg-turbo) against the desktop's, pixel for pixel.

`elemental.images.open_image(path, max_side)` decodes a JPEG with Pillow at a reduced DCT scale (draft mode) and
turns it upright by its EXIF orientation; `elemental-native-decode` (`make native`) runs the native library's
`decode_photo`, which the app calls on the phone. For every kind of JPEG made here (each chroma subsampling,
progressive, greyscale, CMYK and YCCK, restart markers, odd sizes, 12 and 50 MP, the eight orientations, EXIF and
XMP as Pillow reads them, corrupt data Pillow decodes around) both give the same array: np.array_equal, no tolerance.
Bad files end as one `error:` line and exit code 2: not a JPEG, truncated, over the pixel cap (checked at the
decoded size, before any pixel is decoded).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elemental.errors import ElementalError
from elemental.images import open_image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DECODE = ROOT / "build" / "native" / "elemental-native-decode"
# The phone's build (`make native-arm64`: libjpeg-turbo with its NEON code), run under qemu-aarch64.
ARM64_DECODE = ROOT / "build" / "native-arm64" / "bin" / "elemental-native-decode"
SIDES = (None, 1024, 512)
MIB = 1024 * 1024


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with sine stripes and a little noise (camera-like: compresses as photos do), built
    in strips so a 50-MP one costs no more than its own array."""
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 3), np.uint8)
    x = np.arange(width, dtype=np.float32)[None, :]
    for top in range(0, height, 512):
        y = np.arange(top, min(top + 512, height), dtype=np.float32)[:, None]
        channels = (120 + 90 * np.sin(x / 41 + y / 67), 230 * x / max(width - 1, 1), 230 * y / max(height - 1, 1))
        strip = np.stack(np.broadcast_arrays(*channels), axis=-1)
        strip += rng.normal(0, 4, strip.shape).astype(np.float32)
        out[top:top + len(y)] = np.clip(strip, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def jpeg_bytes(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **{"quality": 90, **options})
    return buf.getvalue()


def segments(data: bytes):
    """(marker, offset of its length field, length) of each segment before the first scan."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], struct.unpack(">H", data[at + 2:at + 4])[0]
        yield marker, at + 2, length
        if marker == 0xDA:
            return
        at += 2 + length


def patch_frame(data: bytes, size: tuple[int, int] | None = None, luma_sampling: int | None = None) -> bytes:
    """`data` with its SOF header claiming another size and/or another luma sampling byte (0xHV)."""
    out = bytearray(data)
    for marker, at, _ in segments(data):
        if marker in (0xC0, 0xC1, 0xC2):
            if size is not None:
                out[at + 3:at + 7] = struct.pack(">HH", size[1], size[0])
            if luma_sampling is not None:
                out[at + 9] = luma_sampling
            return bytes(out)
    raise AssertionError("no SOF segment")


def app_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def with_segments(data: bytes, *extra: bytes) -> bytes:
    """`data` with `extra` segments right after its SOI."""
    return data[:2] + b"".join(extra) + data[2:]


def tiff(entries: list[tuple[int, int, int, bytes]], little: bool = True, ifd: int = 8, tail: bytes = b"") -> bytes:
    """A TIFF header and one IFD of (tag, type, count, 4-byte value field) entries, then `tail`."""
    e = "<" if little else ">"
    head = (b"II*\x00" if little else b"MM\x00*") + struct.pack(e + "I", ifd) + b"\x00" * (ifd - 8)
    body = struct.pack(e + "H", len(entries)) + b"".join(
        struct.pack(e + "HHI", tag, typ, count) + value for tag, typ, count, value in entries)
    return head + body + struct.pack(e + "I", 0) + tail


def exif_segment(tiff_bytes: bytes) -> bytes:
    return app_segment(0xE1, b"Exif\x00\x00" + tiff_bytes)


def xmp_segment(orientation_markup: str) -> bytes:
    packet = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description {orientation_markup}/></x:xmpmeta>'
    return app_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet.encode())


def short(value: int, little: bool = True) -> bytes:
    return struct.pack("<HH" if little else ">HH", value, 0)


def run_decode(path: Path, max_side: int | None, *extra: str, arm64: bool = False) -> subprocess.CompletedProcess:
    tool, make, env = DECODE, "native", None
    if arm64:
        tool, make, env = ARM64_DECODE, "native-arm64", {**os.environ, "QEMU_LD_PREFIX": "/usr/aarch64-linux-gnu"}
        if shutil.which("qemu-aarch64") is None:
            pytest.fail("qemu-aarch64 is missing: apt-get install qemu-user (or run make test, which installs it)")
    if not tool.is_file():
        pytest.fail(f"{tool} is missing: run `make {make}` (tests/test_native_decode.py needs it built)")
    out = path.with_name(f"{path.name}.{max_side}.rgb")
    cmd = [*(["qemu-aarch64"] if arm64 else []), str(tool), *(["--max-side", str(max_side)] if max_side else []),
           *extra, str(path), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def native(path: Path, max_side: int | None = None, *extra: str, arm64: bool = False) -> tuple[np.ndarray, dict]:
    res = run_decode(path, max_side, *extra, arm64=arm64)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    out = path.with_name(f"{path.name}.{max_side}.rgb")
    pixels = np.fromfile(out, np.uint8).reshape(info["height"], info["width"], 3)
    out.unlink()
    return pixels, info


def native_error(path: Path, max_side: int | None = None) -> str:
    res = run_decode(path, max_side)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and res.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), res
    return lines[0]


def assert_same(path: Path, max_side: int | None, arm64: bool = False) -> None:
    mine, _ = native(path, max_side, arm64=arm64)
    pillow = np.asarray(open_image(path, max_side=max_side))
    assert mine.shape == pillow.shape, f"{path.name} at {max_side}: native {mine.shape}, Pillow {pillow.shape}"
    if not np.array_equal(mine, pillow):
        diff = np.abs(mine.astype(np.int16) - pillow.astype(np.int16))
        pytest.fail(f"{path.name} at max_side {max_side}: {np.count_nonzero(diff.max(axis=-1))} pixels differ, "
                    f"by up to {diff.max()}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jpegs")


def _kinds() -> dict[str, bytes]:
    """JPEGs of every kind the encoders here make, 2400x1800 (decoded at 1/2 for 1024, 1/4 for 512)."""
    img = photo(2400, 1800, seed=1)
    kinds = {
        "baseline-420": jpeg_bytes(img, subsampling="4:2:0"),
        "baseline-422": jpeg_bytes(img, subsampling="4:2:2"),
        "baseline-444": jpeg_bytes(img, subsampling="4:4:4"),
        "quality-100-optimized": jpeg_bytes(img, quality=100, optimize=True),
        "quality-40-web-low-tables": jpeg_bytes(img, quality=40, qtables="web_low"),
        "progressive-420": jpeg_bytes(img, progressive=True),
        "progressive-444-optimized": jpeg_bytes(img, progressive=True, subsampling="4:4:4", optimize=True),
        "restart-every-row": jpeg_bytes(img, restart_marker_rows=1),
        "restart-every-7-mcus": jpeg_bytes(img, restart_marker_blocks=7),
        "greyscale": jpeg_bytes(img.convert("L")),
        "greyscale-progressive": jpeg_bytes(img.convert("L"), progressive=True),
        "cmyk": jpeg_bytes(img.convert("CMYK")),
    }
    # Pillow writes neither 4:4:0 nor 4:1:1; the same entropy data re-labelled is one (blocks land elsewhere, both
    # decoders see the same file). 4:2:2 (MCU 16x8) with luma 1x2 and the sides swapped has as many 8x16 MCUs;
    # 4:2:0 (16x16) with luma 4x1, twice as wide and half as high, as many 32x8 ones.
    kinds["sampling-440"] = patch_frame(kinds["baseline-422"], size=(1800, 2400), luma_sampling=0x12)
    kinds["sampling-411"] = patch_frame(kinds["baseline-420"], size=(4800, 900), luma_sampling=0x41)
    # YCCK: the CMYK file with Adobe's transform flag set to 2 (libjpeg then converts YCC to CMYK first).
    cmyk = bytearray(kinds["cmyk"])
    adobe = next(at for marker, at, _ in segments(kinds["cmyk"]) if marker == 0xEE)
    assert cmyk[adobe + 2:adobe + 7] == b"Adobe"
    cmyk[adobe + 13] = 2
    kinds["ycck"] = bytes(cmyk)
    return kinds


KINDS = [
    "baseline-420", "baseline-422", "baseline-444", "quality-100-optimized", "quality-40-web-low-tables",
    "progressive-420", "progressive-444-optimized", "restart-every-row", "restart-every-7-mcus", "greyscale",
    "greyscale-progressive", "cmyk", "sampling-440", "sampling-411", "ycck",
]


@pytest.fixture(scope="module")
def kinds(folder) -> dict[str, Path]:
    out = {}
    for name, data in _kinds().items():
        out[name] = folder / f"{name}.jpg"
        out[name].write_bytes(data)
    assert sorted(out) == sorted(KINDS)
    return out


@pytest.mark.parametrize("max_side", SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_jpeg_decodes_to_pillows_pixels(kinds, kind, max_side):
    assert_same(kinds[kind], max_side)


@pytest.mark.parametrize("kind", ["baseline-420", "baseline-422", "sampling-440", "sampling-411", "progressive-420",
                                  "restart-every-7-mcus", "greyscale", "cmyk", "ycck"])
def test_the_phones_build_decodes_the_same(kinds, kind):
    """The ARM64 build runs libjpeg-turbo's NEON IDCT, upsampling and colour conversion (the x86 build its C code):
    the same pixels as Pillow's x86 SIMD build."""
    for max_side in SIDES:
        assert_same(kinds[kind], max_side, arm64=True)


def test_the_kinds_are_what_they_claim(kinds):
    """The files above really are progressive, 4:4:0, CMYK, ... (as Pillow reads their headers)."""
    def layers(name):
        with Image.open(kinds[name]) as img:
            return img.mode, img.info.get("progressive", 0), [layer[1:3] for layer in img.layer], img.size
    assert layers("sampling-440")[2][0] == (1, 2) and layers("sampling-411")[2][0] == (4, 1)
    assert layers("baseline-422")[2][0] == (2, 1) and layers("baseline-444")[2][0] == (1, 1)
    assert layers("progressive-420")[1] and layers("greyscale-progressive")[:2] == ("L", 1)
    assert layers("cmyk")[0] == layers("ycck")[0] == "CMYK"
    with Image.open(kinds["ycck"]) as img:
        assert img.info["adobe_transform"] == 2


ODD_SIZES = ((1, 300), (300, 1), (17, 9), (4097, 3), (3, 4097), (1, 1), (2049, 1537))


@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sampling", ["4:2:0", "4:4:4"])
def test_odd_sizes(folder, size, sampling):
    """Partial MCUs at the right and bottom edges, at every scale (max_side 2: the smallest target, 1/8 wherever
    both sides allow it), where SIMD code handles the row ends apart: the phone's build too."""
    path = folder / f"odd-{size[0]}x{size[1]}-{sampling.replace(':', '')}.jpg"
    path.write_bytes(jpeg_bytes(photo(*size, seed=2), subsampling=sampling))
    for max_side in (*SIDES, 5, 2):
        assert_same(path, max_side)
        assert_same(path, max_side, arm64=True)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations(folder, orientation):
    """All eight, as Pillow writes EXIF, at every scale: the photo comes out upright, as Pillow turns it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = folder / f"orientation-{orientation}.jpg"
    path.write_bytes(jpeg_bytes(photo(2400, 1800, seed=3), exif=exif.tobytes()))
    for max_side in SIDES:
        assert_same(path, max_side)
    path = folder / f"orientation-{orientation}-grey-odd.jpg"
    path.write_bytes(jpeg_bytes(photo(37, 21, seed=3).convert("L"), exif=exif.tobytes()))
    assert_same(path, None)


# EXIF and XMP blocks as cameras and editors write them, and malformed ones: the orientation Pillow's getexif()
# finds (the pixels say which) is the one the native decoder applies.
METADATA = {
    "big-endian": [exif_segment(tiff([(0x0112, 3, 1, short(6, little=False))], little=False))],
    "long-type": [exif_segment(tiff([(0x0112, 4, 1, struct.pack("<I", 8))]))],
    "two-values-first-counts": [exif_segment(tiff([(0x0112, 3, 2, struct.pack("<HH", 3, 6))]))],
    "out-of-line-values": [exif_segment(tiff([(0x0112, 3, 3, struct.pack("<I", 26))],
                                             tail=struct.pack("<HHH", 5, 1, 1)))],
    "first-of-duplicates": [exif_segment(tiff([(0x0112, 3, 1, short(3)), (0x0112, 3, 1, short(6))]))],
    "unknown-type-skipped": [exif_segment(tiff([(0x0112, 14, 1, short(3)), (0x0112, 3, 1, short(6))]))],
    "byte-type-is-not-a-number": [exif_segment(tiff([(0x0112, 1, 1, b"\x06\x00\x00\x00")])),
                                  xmp_segment('tiff:Orientation="8"')],
    "value-9": [exif_segment(tiff([(0x0112, 3, 1, short(9))]))],
    "ifd-after-padding": [exif_segment(tiff([(0x0112, 3, 1, short(5))], ifd=20))],
    "split-over-two-segments": [exif_segment(tiff([(0x0112, 3, 1, short(7))])[:12]),
                                exif_segment(tiff([(0x0112, 3, 1, short(7))])[12:])],
    "xmp-attribute": [xmp_segment('tiff:Orientation="6"')],
    "xmp-element": [xmp_segment('x="1"><tiff:Orientation>8</tiff:Orientation></rdf:Description><a')],
    "exif-without-orientation-then-xmp": [exif_segment(tiff([(0x0100, 3, 1, short(64))])),
                                          xmp_segment('tiff:Orientation="6"')],
    "ifd-past-the-end-then-xmp": [exif_segment(tiff([(0x0112, 3, 1, short(3))])[:4] + struct.pack("<I", 4000)),
                                  xmp_segment('tiff:Orientation="6"')],
    "entries-cut-short": [exif_segment(tiff([(0x0100, 3, 1, short(64)), (0x0112, 3, 1, short(6))])[:20])],
    "not-tiff": [exif_segment(b"JUNKJUNKJUNK"), xmp_segment('tiff:Orientation="6"')],
    "bigtiff-header": [exif_segment(b"II+\x00\x08\x00\x00\x00" + b"\x00" * 16)],
    "empty-exif": [exif_segment(b""), xmp_segment('tiff:Orientation="5"')],
}


@pytest.fixture(scope="module")
def metadata(folder) -> dict[str, Path]:
    base = jpeg_bytes(photo(64, 40, seed=4))
    out = {}
    for name, extra in METADATA.items():
        out[name] = folder / f"meta-{name}.jpg"
        out[name].write_bytes(with_segments(base, *extra))
    return out


@pytest.mark.parametrize("name", list(METADATA))
def test_orientation_metadata_as_pillow_reads_it(metadata, name):
    assert_same(metadata[name], None)


def test_most_metadata_cases_turn_the_photo(metadata):
    """Not every case above reads as "as stored" (which any decoder ignoring EXIF would pass)."""
    turned = []
    for name, path in metadata.items():
        with Image.open(path) as img:
            if img.getexif().get(0x0112, 1) in range(2, 9):
                turned.append(name)
    assert len(turned) == 13, turned


def test_corrupt_data_is_decoded_around_as_pillow_does(folder):
    """libjpeg's warnings are silent in Pillow: a scan cut short by an EOI marker decodes (grey below the cut), junk
    after the EOI changes nothing. The native decoder gives the same pixels."""
    data = jpeg_bytes(photo(1600, 1200, seed=5))
    cases = {
        "cut-then-eoi": data[: len(data) // 2] + b"\xff\xd9",
        "junk-after-eoi": data + b"\x00junk" * 100,
        "progressive-cut-then-eoi": (p := jpeg_bytes(photo(1600, 1200, seed=5), progressive=True))[: len(p) * 2 // 3]
        + b"\xff\xd9",
    }
    for name, blob in cases.items():
        path = folder / f"corrupt-{name}.jpg"
        path.write_bytes(blob)
        for max_side in SIDES:
            assert_same(path, max_side)


def test_bad_files_are_one_error_line(folder):
    data = jpeg_bytes(photo(800, 600, seed=6))
    # Cut anywhere, even only its EOI marker: libjpeg reads a little ahead of the last block, and Pillow raises
    # "image file is truncated" where the native decoder's source runs dry.
    for name, blob in (("truncated", data[: len(data) // 2]), ("no-eoi", data[:-2])):
        (folder / f"{name}.jpg").write_bytes(blob)
        for max_side in SIDES:
            assert "truncated" in native_error(folder / f"{name}.jpg", max_side)
            with pytest.raises(ElementalError, match="truncated"):
                open_image(folder / f"{name}.jpg", max_side=max_side)
    header_only = folder / "header-only.jpg"
    header_only.write_bytes(data[: next(at for marker, at, _ in segments(data) if marker == 0xDA) + 12])
    assert "truncated" in native_error(header_only)
    png = folder / "photo.png"
    photo(20, 10).save(png)
    assert "not a JPEG" in native_error(png)
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty file" in native_error(empty)
    # A 12-bit or 2-component JPEG: Pillow does not open them, and the native decoder says why.
    twelve = bytearray(data)
    sof = next(at for marker, at, _ in segments(data) if marker == 0xC0)
    twelve[sof + 2] = 12
    (folder / "12-bit.jpg").write_bytes(bytes(twelve))
    assert "12-bit JPEG" in native_error(folder / "12-bit.jpg")
    with pytest.raises(ElementalError):
        open_image(folder / "12-bit.jpg")


def test_the_pixel_cap_is_checked_at_the_decoded_size_before_decoding(folder):
    """A header claiming 30000x20000: 600 Mpx at full size, 150 Mpx at 1/2 (max_side 8000): both over the cap of
    100 Mpx, refused without the output being allocated (1.8 GB and 450 MB). At 1/8 (max_side 1024) it is 9 Mpx:
    decoding starts, and the tiny file's data runs out. 65000x65000 at 1/8 is 8125x8125 = 66 Mpx, under the cap
    (no JPEG is over it at 1/8: 65535 / 8 = 8192); it too fails cleanly when its data runs out. A progressive one
    is refused for libjpeg's working memory."""
    small = jpeg_bytes(photo(64, 48, seed=7))[:-2]  # no EOI: libjpeg reads on past the real data and stops
    big = folder / "claims-30000x20000.jpg"
    big.write_bytes(patch_frame(small, size=(30000, 20000)))
    for max_side, decoded in ((None, ""), (8000, " (decoded at 15000x10000)")):
        res = run_decode(big, max_side, "--peak")
        assert res.returncode == 2 and f"30000x20000 = 600 Mpx{decoded}, over the limit of 100 Mpx" in res.stderr
        peak_kib = json.loads(res.stdout)["peak_rss_kib"]
        assert peak_kib * 1024 < 32 * MIB, f"{peak_kib} KiB: the cap must come before the allocation"
        with pytest.raises(ElementalError, match=r"over the limit of 100 Mpx"):
            open_image(big, max_side=max_side)
    assert "truncated" in native_error(big, 1024)
    # Progressive, it would need its full size's DCT coefficients (1.8 GB at 4:2:0): libjpeg's memory is capped.
    progressive = folder / "claims-30000x20000-progressive.jpg"
    progressive.write_bytes(patch_frame(jpeg_bytes(photo(64, 48, seed=7), progressive=True)[:-2], size=(30000, 20000)))
    res = run_decode(progressive, 1024, "--peak")
    assert res.returncode == 2 and "too large to decode: libjpeg needs more than 1024 MiB" in res.stderr, res.stderr
    assert json.loads(res.stdout)["peak_rss_kib"] * 1024 < 64 * MIB
    huge = folder / "claims-65000x65000.jpg"
    huge.write_bytes(patch_frame(small, size=(65000, 65000)))
    assert "truncated" in native_error(huge, 1024)
    with pytest.raises(ElementalError, match="truncated"):
        open_image(huge, max_side=1024)
    assert not list(folder.glob("claims-*.rgb"))


@pytest.fixture(scope="module")
def camera(folder) -> dict[str, Path]:
    """A 12-MP and a 50-MP camera-sized photo (quality 90, 4:2:0, as phones save them) and a small one."""
    out = {}
    for name, size in (("12mp", (4032, 3024)), ("50mp", (8160, 6120)), ("small", (640, 480))):
        out[name] = folder / f"camera-{name}.jpg"
        photo(*size, seed=8).save(out[name], quality=90)
    return out


@pytest.mark.parametrize("max_side", SIDES)
@pytest.mark.parametrize("name", ["12mp", "50mp"])
def test_camera_photos(camera, name, max_side):
    assert_same(camera[name], max_side)


def test_peak_memory_of_a_50mp_photo(camera):
    """Decoding the 50-MP JPEG for the model (max_side 1024: 1/4 scale, 2040x1530; 512: 1/8, 1020x765) costs the
    file, the output and libjpeg's few rows, not the 150 MB of a full-size decode."""
    _, small = native(camera["small"], 1024, "--peak")
    file_mib = camera["50mp"].stat().st_size / MIB
    for max_side, size in ((1024, (2040, 1530)), (512, (1020, 765))):
        pixels, big = native(camera["50mp"], max_side, "--peak")
        assert pixels.shape == (size[1], size[0], 3)
        extra_mib = (big["peak_rss_kib"] - small["peak_rss_kib"]) / 1024
        print(f"50 MP at max_side {max_side}: peak RSS {big['peak_rss_kib'] / 1024:.1f} MiB, {extra_mib:.1f} MiB "
              f"over a 640x480 photo's (file {file_mib:.1f} MiB, output {pixels.nbytes / MIB:.1f} MiB)")
        assert extra_mib < file_mib + pixels.nbytes / MIB + 16


@pytest.fixture(scope="module")
def mpo(folder) -> Path:
    """A JPEG with a second picture after it (MPO: cameras' depth maps and previews), which Pillow opens as MPO."""
    path = folder / "two-frames.jpg"
    photo(2400, 1800, seed=9).save(path, format="MPO", save_all=True, append_images=[photo(320, 240, seed=10)],
                                   quality=90)
    with Image.open(path) as img:
        assert img.format == "MPO"
    return path


def test_mpo_first_frame(mpo):
    assert_same(mpo, None)


@pytest.mark.parametrize("max_side", [1024, 512])
def test_mpo_first_frame_at_draft_scale(mpo, max_side):
    assert_same(mpo, max_side)
