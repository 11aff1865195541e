"""Light photo augmentation for training (`--augment`, off by default).

Random resized crop (keeping most of the photo), horizontal flip, and brightness / contrast /
saturation jitter. Never hue, and never a vertical flip or rotation: the colour of a flame or of
the sea is part of what the label means, and "up" matters for horizons and flames. Random draws
come from torch's global generator, which the Trainer seeds and saves in each checkpoint, so a
resumed run augments exactly as an uninterrupted one (with `dataloader_num_workers=0`).
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image


def make_augment(scale: tuple[float, float] = (0.7, 1.0)) -> Callable[[Image.Image], Image.Image]:
    """A PIL → PIL transform; output keeps the photo's size so the processor's geometry is unchanged."""
    from torchvision.transforms import v2

    jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)
    flip = v2.RandomHorizontalFlip(p=0.5)

    def augment(image: Image.Image) -> Image.Image:
        aspect = image.width / image.height  # crops keep the photo's own shape (±10%), so nothing is squashed
        crop = v2.RandomResizedCrop(size=(image.height, image.width), scale=scale,
                                    ratio=(aspect * 0.9, aspect * 1.1), antialias=True)
        return jitter(flip(crop(image)))

    return augment
