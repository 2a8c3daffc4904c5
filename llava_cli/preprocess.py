"""Image -> the normalised pixel tensor the CLIP vision tower takes, the two ways LLaVA-1.5 users meet.

* ``pad`` (default): how LLaVA-1.5 was trained (``image_aspect_ratio: pad`` in the original LLaVA repository):
  ``expand2square`` — paste the image centred on a square canvas filled with the CLIP mean colour
  (``tuple(int(x * 255) for x in mean)``, i.e. (122, 116, 104)) — then the CLIP image processor. On a square
  image that processor's "resize the shortest edge to 336 + centre crop 336" is a plain bicubic resize to
  336×336, so nothing of the picture is cut off.
* ``crop``: transformers' ``CLIPImageProcessor`` as llava-hf's ``preprocessor_config.json`` configures it: resize
  the shortest edge to 336 (bicubic, the long edge ``int(336 * long / short)``), centre crop 336×336. Matches what
  ``LlavaProcessor`` feeds the model, but cuts the sides off a non-square picture.

Both then rescale by 1/255 (in float64, then float32, as transformers does) and normalise with the mean/std in
float32. The arithmetic follows transformers' PIL backend step by step, so the pixels are bit-identical
(tests/test_vision_graph.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

from llava_cli.errors import UsageError

ImageFit = Literal["pad", "crop"]
IMAGE_FITS: tuple[ImageFit, ...] = ("pad", "crop")


def parse_image_fit(value: str) -> ImageFit:
    """``--image-fit`` as given by a person (any case) → ``"pad"`` or ``"crop"``; anything else is a UsageError."""
    fit = str(value).strip().lower()
    if fit not in IMAGE_FITS:
        raise UsageError(f"--image-fit {value!r} is not one of {', '.join(IMAGE_FITS)}", hint="e.g. --image-fit crop")
    return fit


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's expand2square: the image centred on a square canvas of its longer side (offsets floor-halved)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is `size` (transformers' get_resize_output_image_size rounding)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        # transformers calls resize anyway, but PIL returns an unchanged copy when the size is the same.
        return image
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """HWC crop at the floor-halved offset (transformers' center_crop; our inputs are never smaller than size)."""
    h, w = pixels.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return pixels[top : top + size, left : left + size]


def preprocess(
    image: Image.Image, *, fit: ImageFit, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """An RGB PIL image -> float32 (3, size, size), normalised, as LLaVA-1.5 expects it (module docstring)."""
    if fit not in IMAGE_FITS:
        raise ValueError(f"image fit {fit!r} is not one of {', '.join(IMAGE_FITS)}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if fit == "pad":
        image = expand2square(image, tuple(int(x * 255) for x in mean))
    image = resize_shortest_edge(image, size)
    pixels = center_crop(np.asarray(image, dtype=np.uint8), size)
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    normed: np.ndarray = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(normed.transpose(2, 0, 1))


__all__ = ["IMAGE_FITS", "ImageFit", "expand2square", "parse_image_fit", "preprocess"]
