"""Safe image opening and normalisation, so every stage sees a photo's pixels the same way.

Training, both classifiers and `prepare` all open photos here: the EXIF orientation a phone wrote is
applied (the model must see the photo upright, as the user does), only the first frame of an
animation is used, transparency is flattened onto white (not Pillow's default black, which would
change a photo's colour cues) and the result is always RGB. Any failure becomes a one-line
ElementalError naming the file, including Pillow's decompression-bomb guard.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

from .errors import ElementalError
from .fileio import sha256_file, write_bytes_atomic

# The suffixes the `folder:` source picks up (compared lower-case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def open_image(path: Path) -> Image.Image:
    """Open `path` as an upright RGB image, fully decoded, or raise ElementalError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ElementalError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.seek(0)  # first frame of an animated GIF/WebP/TIFF
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except Image.DecompressionBombError as e:
        raise ElementalError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # Pillow reports truncated or corrupt files through all of these.
        raise ElementalError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of `img` (decoding it), with any transparency composited onto white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def bounded(img: Image.Image, max_side: int) -> Image.Image:
    """A copy of `img` whose long side is at most `max_side` (aspect kept; never upscaled)."""
    out = img.copy()
    out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return out


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image. Fixed settings, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def save_jpeg(img: Image.Image, path: Path, max_side: int = 1024, quality: int = 90) -> tuple[int, int]:
    """Save `img` as a JPEG with its long side bounded by `max_side`, atomically; returns (width, height)."""
    small = bounded(img, max_side)
    write_bytes_atomic(path, encode_jpeg(small, quality))
    return small.size


def sha256_of_image_file(path: Path) -> str:
    """sha256 of the photo file's bytes: the photo's identity (dataset ids, duplicate checks, label cache)."""
    path = Path(path)
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise ElementalError(f"image not found: {path}") from None
    except OSError as e:
        raise ElementalError(f"{path}: cannot read ({e.strerror or e})") from None
