"""Safe image opening and normalisation, so every stage sees a photo's pixels the same way.

Training, both classifiers and `prepare` all open photos here: the EXIF orientation a phone wrote is
applied (the model must see the photo upright, as the user does), only the first frame of an
animation is used, transparency is flattened onto white (not Pillow's default black, which would
change a photo's colour cues), an embedded colour profile (CMYK, Display P3, Adobe RGB) is converted
to sRGB, 16-bit greyscale is scaled to 8 bits (not clipped to white) and the result is always RGB.

Photos come from users' folders and from the internet, so every failure a file can cause (empty,
truncated, not an image at all, a decompression bomb, a HEIC photo without its plugin) becomes a
one-line ElementalError naming the file or URL; the callers decide whether that stops the run or is
recorded as a rejected photo.
"""

from __future__ import annotations

import functools
import io
import struct
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError, features

from .errors import ElementalError
from .fileio import broken_link


def _register_heif() -> bool:
    """Register pillow-heif's HEIC/HEIF opener when it is installed (iPhones save HEIC by default)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


HEIF_AVAILABLE = _register_heif()

# The suffixes the `folder:` source picks up (compared lower-case). HEIC/HEIF files are always
# picked up: without pillow-heif they fail with a message that says how to fix it, not silently.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif"}
    | ({".avif"} if features.check("avif") else set())
)

# ISO-BMFF brands of HEIF files (the `ftyp` box at byte 4), to recognise a HEIC photo by its content:
# downloaded photos have no suffix to go by.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"})
_HEIF_HINT = "a HEIC/HEIF photo needs the pillow-heif package (pip install pillow-heif)"

# What the first bytes of a photo file look like, for files without a telling suffix or Content-Type.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
SNIFF_BYTES = 32


def looks_like_image(head: bytes) -> bool:
    """Whether `head` (a file's first SNIFF_BYTES bytes) starts like a raster photo format prepare decodes."""
    if head.startswith(_IMAGE_MAGIC):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return _looks_like_heif(head) or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"))

# The most pixels a photo may have once decoded (after a JPEG's reduced-scale decode): about 300 MB of
# RGB, several of which may be decoded at once. Larger photos are skipped with this reason (a setting:
# `prepare.max_pixels`). JPEGs of any size pass when the caller shrinks them anyway (`max_side`), since
# they are then decoded at 1/2, 1/4 or 1/8 scale and never become a full-size array. This check replaces
# Pillow's decompression-bomb warning (a raw warning, or a traceback under -W error) and error.
DEFAULT_MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None

# Pillow's own decoders' failures for bad files are spread over these exception types.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError, KeyError)


def open_image(path: Path, max_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `path` as an upright RGB image, fully decoded, or raise ElementalError naming the file.

    `max_side` is a promise that the caller will shrink the result to that long side (as `prepare`
    does): JPEGs are then decoded at a reduced DCT scale, several times faster for camera photos.
    The result may still be larger than `max_side`; `bounded` finishes the job. A photo with more than
    `max_pixels` pixels to decode is refused with that reason before any pixel is decoded.
    """
    path = Path(path)
    if problem := broken_link(path):
        raise ElementalError(f"{path}: {problem}")
    if not path.is_file():
        raise ElementalError(f"image not found: {path}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ElementalError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise ElementalError(f"{path}: empty file (0 bytes), not an image")
    try:
        with open(path, "rb") as f:
            return _decode(f, str(path), max_side, max_pixels)
    except OSError as e:  # opening the file itself; Pillow's errors are handled in _decode
        raise ElementalError(f"{path}: cannot read ({e.strerror or e})") from None


def open_image_bytes(data: bytes, name: str, max_side: int | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Like `open_image` for bytes already in memory (a download); errors name `name` (its URL or id)."""
    if not data:
        raise ElementalError(f"{name}: empty file (0 bytes), not an image")
    return _decode(io.BytesIO(data), name, max_side, max_pixels)


def _decode(fp: IO[bytes], name: str, max_side: int | None, max_pixels: int) -> Image.Image:
    """Open, decode and normalise one image from `fp`; every failure is an ElementalError naming `name`."""
    try:
        with Image.open(fp) as img:
            img.seek(0)  # first frame of an animated GIF/WebP/TIFF
            full = img.size
            if max_side is not None:
                _draft(img, max_side)
            w, h = img.size
            if w * h > max_pixels:
                drafted = f" (decoded at {w}x{h})" if img.size != full else ""
                raise ElementalError(
                    f"{name}: {full[0]}x{full[1]} = {full[0] * full[1] / 1e6:.0f} Mpx{drafted}, over the limit "
                    f"of {max_pixels / 1e6:.0f} Mpx (max_pixels); skipped")
            img.load()
            return _exif_upright(img, _to_rgb(img))
    except UnidentifiedImageError:
        fp.seek(0)
        if _looks_like_heif(fp.read(16)) and not HEIF_AVAILABLE:
            raise ElementalError(f"{name}: {_HEIF_HINT}") from None
        raise ElementalError(f"{name}: not a readable image (content is not a known image format)") from None
    except _DECODE_ERRORS as e:
        why = "truncated or corrupt file" if "truncat" in str(e).lower() else "corrupt or unsupported file"
        raise ElementalError(f"{name}: not a readable image ({why}; {type(e).__name__}: {_one_line(e)})") from None
    except MemoryError:
        raise ElementalError(f"{name}: too large to decode in memory") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _looks_like_heif(head: bytes) -> bool:
    return len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _draft(img: Image.Image, max_side: int) -> None:
    """Ask the JPEG decoder for the smallest DCT scale (1/2, 1/4, 1/8) that keeps the long side >= max_side.

    The target keeps the photo's aspect ratio: a (max_side, max_side) box would stop a 4:3 photo one
    scale early because of its short side.
    """
    if img.format not in ("JPEG", "MPO") or max_side < 1:  # MPO: a JPEG with more pictures after it (phones)
        return
    w, h = img.size
    long_side = max(w, h)
    if long_side <= max_side:
        return
    target = (max(1, w * max_side // long_side), max(1, h * max_side // long_side))
    img.draft(img.mode, target)


def _exif_upright(original: Image.Image, pixels: Image.Image) -> Image.Image:
    """`pixels` turned upright by `original`'s EXIF orientation; a malformed EXIF block leaves it as is.

    A broken EXIF tag is no reason to lose a photo whose pixels decode fine.
    """
    try:
        orientation = original.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        return pixels
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation if isinstance(orientation, int) else 1)
    return pixels.transpose(method) if method is not None else pixels


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of the decoded `img`: transparency composited onto white, colour profile to sRGB,
    16-bit and float greyscale scaled to 8 bits."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_grey_to_rgb(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("RGB", "CMYK") and img.info.get("icc_profile"):
        converted = _to_srgb(img, img.info["icc_profile"])
        if converted is not None:
            return converted
    if img.mode == "RGB":
        return img  # already decoded (load() ran): a copy of a 12-MP photo would cost time for nothing
    return img.convert("RGB")


def _wide_grey_to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of a 16-bit/32-bit/float greyscale image, scaled by its nominal range.

    Pillow's own convert clips every value above 255 to white, which turns a normal 16-bit PNG into
    a white sheet. 16-bit data is scaled from 0..65535; 32-bit integer data from 0..65535 when it
    fits (PNG/TIFF 16-bit read as "I"), else from its own min..max; float from 0..1 when it fits.
    """
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    elif img.mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
        lo, hi = 0.0, 1.0
    elif img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:
        lo, hi = 0.0, (255.0 if a.max() <= 255 else 65535.0)
    else:
        lo = float(np.nanmin(a)) if a.size else 0.0
        hi = float(np.nanmax(a)) if a.size else 1.0
    scaled = np.clip(np.rint((np.nan_to_num(a, nan=lo) - lo) * 255.0 / max(hi - lo, 1e-12)), 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")


_SRGB = ImageCms.createProfile("sRGB")


def _to_srgb(img: Image.Image, icc: bytes) -> Image.Image | None:
    """`img` converted from its embedded ICC profile to sRGB; None when the profile is sRGB or unusable."""
    transform = _transform_to_srgb(icc, img.mode)
    if transform is None:
        return None
    try:
        return ImageCms.applyTransform(img, transform)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


@functools.lru_cache(maxsize=16)
def _transform_to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached profile→sRGB transform (phones embed the same few profiles in every photo)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = (ImageCms.getProfileDescription(profile) or "").strip()
        if mode == "RGB" and description.lower().startswith("srgb"):
            return None
        # NOCACHE: one transform is shared by decoding threads, and LittleCMS's pixel cache is not thread-safe.
        return ImageCms.buildTransform(
            profile, _SRGB, mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL, flags=ImageCms.Flags.NOCACHE
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


# The long side `prepare` stores photos at, so also the size every classifier brings a photo down to
# first: what the model sees at inference is made the way its training photos were made.
PHOTO_MAX_SIDE = 1024


def model_input(img: Image.Image) -> Image.Image:
    """The photo as the model gets it: at most PHOTO_MAX_SIDE long (the same `bounded` call as `prepare`)."""
    return img if max(img.size) <= PHOTO_MAX_SIDE else bounded(img, PHOTO_MAX_SIDE)


def bounded(img: Image.Image, max_side: int) -> Image.Image:
    """A copy of `img` whose long side is at most `max_side` (aspect kept; never upscaled).

    Pillow first averages a large photo down by an integer factor that keeps it at least the target
    size (what a JPEG decoded at reduced scale gives, too), then resizes it with Lanczos: about 3x
    faster than Lanczos over a whole 12-MP photo.
    """
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return img.copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=1.0)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image. Fixed settings, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


# -- near duplicates --------------------------------------------------------------------------------


def perceptual_hash(img: Image.Image) -> str:
    """64-bit difference hash (dHash) of `img` as 16 hex digits, for near-duplicate detection.

    The same photo re-encoded, resized, recompressed or lightly edited keeps (almost) the same hash,
    unlike its sha256. The algorithm and bit order are those of `imagehash.dhash` (greyscale, resize
    to 9x8 with Lanczos, one bit per "left pixel brighter than its right neighbour"), so hashes are
    comparable with that library's without depending on it (and on SciPy/PyWavelets through it).
    """
    grey = img.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    px = np.asarray(grey, dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


COLOUR_GRID = 4
# Mean absolute difference (0..255) of two photos' 4x4 colour grids within which near-identical
# structure counts as a near duplicate: a re-encoded or resized photo differs by 1-3 levels.
NEAR_DUPLICATE_COLOUR = 12.0


def colour_signature(img: Image.Image) -> str:
    """The mean colour of each cell of a 4x4 grid over `img`, as 96 hex digits.

    dHash sees only brightness gradients: every flat picture hashes the same (a clear blue sky and a
    night sky, a white and a black sheet). Colour is what this classifier learns (fire vs water), so
    near duplicates must also look alike in colour (`colour_distance`).
    """
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # decoded photos are RGB already: no copy
    return rgb.resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX).tobytes().hex()


def colour_distance(a: str, b: str) -> float:
    """Mean absolute difference of two `colour_signature`s, in levels 0..255."""
    x = np.frombuffer(bytes.fromhex(a), dtype=np.uint8).astype(np.int16)
    y = np.frombuffer(bytes.fromhex(b), dtype=np.uint8).astype(np.int16)
    return float(np.abs(x - y).mean())


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes from `perceptual_hash` (0 = same picture).

    Photos within about 6 of 64 bits are near duplicates; unrelated photos differ in ~32.
    """
    try:
        return (int(a, 16) ^ int(b, 16)).bit_count()
    except ValueError:
        raise ValueError(f"not hex perceptual hashes: {a!r}, {b!r}") from None
