"""Bad and unusual photos: every kind in the issue's list fails with a clear one-line message naming the
file, or decodes to the right upright 8-bit RGB pixels. All test images are made here."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from elemental.errors import ElementalError
from elemental.images import (
    HEIF_AVAILABLE,
    IMAGE_SUFFIXES,
    bounded,
    encode_jpeg,
    hamming,
    open_image,
    open_image_bytes,
    perceptual_hash,
)

# -- helpers ----------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _raw_png(width: int, height: int, depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG written byte by byte, for what Pillow cannot save (16-bit RGB) or must not allocate (a bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A smooth random 'photo': coarse random colours upscaled, so it survives resizing like a real one."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return coarse.resize(size, Image.Resampling.BICUBIC)


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# -- files that are not (whole) images ----------------------------------------------------------------


def test_truncated_jpeg_names_the_file(tmp_path: Path):
    data = _jpeg(_scene(1, (400, 300)), quality=95)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ElementalError, match=r"cut\.jpg: not a readable image \(truncated or corrupt file") as e:
        open_image(tmp_path / "cut.jpg")
    assert "\n" not in str(e.value)


def test_corrupt_jpeg_header(tmp_path: Path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    with pytest.raises(ElementalError, match=r"bad\.jpg: not a readable image"):
        open_image(tmp_path / "bad.jpg")


def test_zero_byte_file(tmp_path: Path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ElementalError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        open_image(tmp_path / "empty.jpg")
    with pytest.raises(ElementalError, match=r"^https://x/y\.jpg: empty file"):
        open_image_bytes(b"", "https://x/y.jpg")


def test_broken_symlink_says_where_it_points(tmp_path: Path):
    (tmp_path / "photo.jpg").symlink_to(tmp_path / "moved" / "IMG_1.jpg")
    with pytest.raises(ElementalError, match=r"photo\.jpg: broken symbolic link \(points to .*moved/IMG_1\.jpg, "
                                             r"which does not exist\)"):
        open_image(tmp_path / "photo.jpg")
    with pytest.raises(ElementalError, match=r"image not found: .*absent\.jpg$"):  # a plain missing file stays one
        open_image(tmp_path / "absent.jpg")


def test_text_file_named_jpg(tmp_path: Path):
    (tmp_path / "notes.jpg").write_text("just some notes, not a photo\n")
    with pytest.raises(ElementalError, match=r"notes\.jpg: not a readable image \(content is not a known image format"):
        open_image(tmp_path / "notes.jpg")


def test_html_bytes_name_the_url():
    with pytest.raises(ElementalError, match=r"^http://h/p\.jpg: not a readable image"):
        open_image_bytes(b"<!doctype html><html><body>404</body></html>", "http://h/p.jpg")


def test_decompression_bomb_is_refused_without_allocating(tmp_path: Path):
    # 30000 x 30000 claimed in the header (900 MP, over Pillow's 179 MP hard limit); the file is tiny.
    bomb = _raw_png(30000, 30000, 1, 0, [b"\x00" * 10])
    assert len(bomb) < 200
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(ElementalError, match=r"bomb\.png: 30000x30000 = 900 Mpx, over the limit of 100 Mpx"):
        open_image(tmp_path / "bomb.png")
    with pytest.raises(ElementalError, match=r"^dl:7: 30000x30000 = 900 Mpx, over the limit of 100 Mpx"):
        open_image_bytes(bomb, "dl:7")


# -- unusual but valid photos decode correctly --------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 16))  # right half: black ink
    (tmp_path / "cmyk.jpg").write_bytes(_jpeg(cmyk, quality=95))
    out = open_image(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB" and out.size == (16, 16)
    assert _close(out.getpixel((2, 8)), (0, 255, 255))
    assert _close(out.getpixel((13, 8)), (0, 0, 0))


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 1000, 16384, 32768, 49152, 65535]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16"  # what makes a plain convert("RGB") clip everything to white
    out = open_image(tmp_path / "deep.png")
    assert out.mode == "RGB"
    greys = [out.getpixel((x, 0))[0] for x in range(6)]
    assert greys == [0, 4, 64, 128, 191, 255]
    assert all(out.getpixel((x, 1)) == (g, g, g) for x, g in enumerate(greys))


def test_16_bit_rgb_png(tmp_path: Path):
    px = np.zeros((2, 3, 3), dtype=">u2")
    px[..., 0], px[..., 1], px[..., 2] = 40000, 1000, 65535
    (tmp_path / "rgb16.png").write_bytes(_raw_png(3, 2, 16, 2, [row.tobytes() for row in px]))
    assert open_image(tmp_path / "rgb16.png").getpixel((1, 1)) == (156, 3, 255)


def test_32_bit_and_float_greyscale_tiff(tmp_path: Path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I").save(tmp_path / "i32.tif")
    assert [open_image(tmp_path / "i32.tif").getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert [open_image(tmp_path / "f.tif").getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_palette_with_transparency_goes_onto_white(tmp_path: Path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 4, 8))  # left half red, right half index 0 (transparent)
    img.save(tmp_path / "pal.png", transparency=0)
    img.save(tmp_path / "pal.gif", transparency=0)
    for name in ("pal.png", "pal.gif"):
        out = open_image(tmp_path / name)
        assert out.mode == "RGB"
        assert out.getpixel((1, 1)) == (255, 0, 0), name
        assert out.getpixel((6, 6)) == (255, 255, 255), name  # not black


def test_animated_gif_first_frame_from_bytes():
    frames = [Image.new("RGB", (10, 10), c) for c in [(0, 200, 0), (200, 0, 0), (0, 0, 200)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    r, g, b = open_image_bytes(buf.getvalue(), "anim.gif").getpixel((5, 5))
    assert g > 150 and r < 60 and b < 60


@pytest.mark.parametrize("max_side", [None, 16])
def test_exif_rotated_photo_is_upright(tmp_path: Path, max_side: int | None):
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (40, 0, 80, 40))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left of the stored image becomes the top
    (tmp_path / "phone.jpg").write_bytes(_jpeg(img, quality=95, exif=exif.tobytes()))
    out = open_image(tmp_path / "phone.jpg", max_side=max_side)
    w, h = out.size
    assert h > w  # portrait, as the user saw it
    assert _close(out.getpixel((w // 2, 2)), (255, 0, 0), 40)
    assert _close(out.getpixel((w // 2, h - 3)), (0, 0, 255), 40)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's warning is expected here
def test_broken_exif_does_not_lose_the_photo(tmp_path: Path):
    data = _jpeg(Image.new("RGB", (20, 10), (10, 200, 10)), exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    (tmp_path / "oddexif.jpg").write_bytes(data)
    out = open_image(tmp_path / "oddexif.jpg")
    assert out.size == (20, 10) and _close(out.getpixel((5, 5)), (10, 200, 10))


def test_panorama_20000_by_200_decodes_and_is_bounded(tmp_path: Path):
    pano = Image.linear_gradient("L").resize((20000, 200)).convert("RGB")
    (tmp_path / "pano.jpg").write_bytes(_jpeg(pano, quality=80))
    full = open_image(tmp_path / "pano.jpg")
    assert full.size == (20000, 200)
    fast = open_image(tmp_path / "pano.jpg", max_side=1024)
    assert 1024 <= fast.width < 20000  # decoded at a reduced DCT scale, never below the bound
    stored = bounded(fast, 1024)
    assert stored.size == (1024, 10)
    assert Image.open(io.BytesIO(encode_jpeg(stored))).size == (1024, 10)


def test_max_side_draft_keeps_the_picture(tmp_path: Path):
    photo = _scene(3, (4000, 3000))
    (tmp_path / "big.jpg").write_bytes(_jpeg(photo, quality=90))
    fast = open_image(tmp_path / "big.jpg", max_side=1024)
    assert fast.size == (2000, 1500)  # 1/4 would give 1000 < 1024 on the long side
    slow = bounded(open_image(tmp_path / "big.jpg"), 1024)
    small = bounded(fast, 1024)
    assert small.size == slow.size == (1024, 768)
    diff = np.abs(np.asarray(small, dtype=np.int16) - np.asarray(slow, dtype=np.int16))
    assert diff.mean() < 2.0
    # A photo already small is not touched by the draft.
    (tmp_path / "small.jpg").write_bytes(_jpeg(_scene(4, (800, 600))))
    assert open_image(tmp_path / "small.jpg", max_side=1024).size == (800, 600)


def _swapped_rb_profile() -> bytes:
    """A minimal ICC v2 RGB display profile whose red and blue primaries are sRGB's blue and red.

    Written byte by byte (no ICC files on a test machine): a photo tagged with it must come out with
    red and blue exchanged, which proves the embedded profile is honoured, not ignored.
    """
    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    curv = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    name = b"Swapped RB test\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(name)) + name + b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    red, green, blue = (0.4360, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    tags = [(b"desc", desc), (b"cprt", b"text" + b"\0" * 4 + b"none\0"), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(*blue)), (b"gXYZ", xyz(*green)), (b"bXYZ", xyz(*red)),
            (b"rTRC", curv), (b"gTRC", curv), (b"bTRC", curv)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body + b"\0" * (-len(body) % 4)
    body = struct.pack(">I", len(tags)) + table + data
    header = (struct.pack(">I", 128 + len(body)) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + body


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_embedded_colour_profile_is_converted_to_srgb(fmt: str):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format=fmt, icc_profile=_swapped_rb_profile())
    assert _close(open_image_bytes(buf.getvalue(), f"tagged.{fmt}").getpixel((3, 3)), (0, 0, 255), 4)


def test_embedded_srgb_or_broken_profile_keeps_the_colours(tmp_path: Path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = Image.new("RGB", (8, 8), (200, 120, 30))
    img.save(tmp_path / "srgb.png", icc_profile=srgb)
    img.save(tmp_path / "junk.png", icc_profile=b"not an icc profile")
    assert open_image(tmp_path / "srgb.png").getpixel((3, 3)) == (200, 120, 30)
    assert open_image(tmp_path / "junk.png").getpixel((3, 3)) == (200, 120, 30)


@pytest.mark.parametrize("fmt,suffix", [("WEBP", ".webp"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("PNG", ".png")])
def test_common_formats(tmp_path: Path, fmt: str, suffix: str):
    assert suffix in IMAGE_SUFFIXES
    path = tmp_path / f"x{suffix}"
    Image.new("RGB", (12, 9), (20, 140, 220)).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = open_image(path)
    assert out.size == (12, 9) and _close(out.getpixel((4, 4)), (20, 140, 220), 3)


def test_heic_decodes_when_pillow_heif_is_installed(tmp_path: Path):
    assert {".heic", ".heif"} <= IMAGE_SUFFIXES
    if not HEIF_AVAILABLE:
        pytest.skip("pillow-heif is not installed")
    path = tmp_path / "iphone.heic"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, format="HEIF")
    out = open_image(path)
    assert out.size == (64, 48) and _close(out.getpixel((10, 10)), (200, 30, 30), 20)


def test_heic_without_pillow_heif_says_what_to_install(tmp_path: Path):
    # A HEIC file's start (ISO-BMFF `ftyp` box, brand heic); pillow-heif is hidden from a fresh interpreter.
    path = tmp_path / "iphone.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    code = (
        "import sys; sys.modules['pillow_heif'] = None\n"
        "from elemental.images import open_image, HEIF_AVAILABLE\n"
        "from elemental.errors import ElementalError\n"
        "assert not HEIF_AVAILABLE\n"
        "try:\n    open_image(sys.argv[1])\nexcept ElementalError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{path}: a HEIC/HEIF photo needs the pillow-heif package (pip install pillow-heif)"


# -- near duplicates ----------------------------------------------------------------------------------


def test_perceptual_hash_finds_near_duplicates():
    photo = _scene(7, (640, 480))
    h = perceptual_hash(photo)
    assert len(h) == 16 and int(h, 16) >= 0
    recompressed = Image.open(io.BytesIO(_jpeg(photo.resize((320, 240)), quality=40)))
    brighter = photo.point(lambda v: min(255, v + 12))
    assert hamming(h, perceptual_hash(recompressed)) <= 4
    assert hamming(h, perceptual_hash(brighter)) <= 4
    others = [hamming(h, perceptual_hash(_scene(seed, (640, 480)))) for seed in range(20, 30)]
    assert min(others) >= 12, others


def test_perceptual_hash_matches_imagehash_dhash():
    imagehash = pytest.importorskip("imagehash")
    for seed in range(5):
        img = _scene(seed, (300, 200))
        assert perceptual_hash(img) == str(imagehash.dhash(img))


def test_hamming():
    assert hamming("0" * 16, "f" * 16) == 64
    assert hamming("00000000000000ff", "000000000000000f") == 4
    with pytest.raises(ValueError, match="not hex"):
        hamming("xyz", "00")
