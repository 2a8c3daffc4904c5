"""Open, validate and normalise images before they reach the vision encoder.

Everything Pillow can read is accepted (JPEG, PNG, GIF, WebP, TIFF, BMP...). The result is always an upright
8-bit RGB image (EXIF orientation applied; CMYK, palette, alpha and 16-bit samples converted), which
`llava_cli.preprocess` turns into the vision encoder's input; the hash is of the source bytes (the image cache key).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from llava_cli import reading
from llava_cli.errors import ImageError
from llava_cli.reading import display_name

# Pillow logs decoder complaints ("More samples per pixel than can be decoded") through `logging`; with no handler
# configured, Python prints them to stderr as extra lines. A corrupt image is reported once, as an ImageError.
logging.getLogger("PIL").addHandler(logging.NullHandler())

# Images above this many pixels are refused before any pixel is decoded (decompression-bomb guard). 100 MP is a
# 10000×10000 picture: far beyond what a 336×336 encoder needs, and ~300 MB of RGB once decoded.
DEFAULT_MAX_PIXELS = 100_000_000

# A truncated file must be an error, not a silently grey-padded picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

STDIN = reading.STDIN


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for the encoder: RGB, upright, plus where it came from and the hash of its bytes."""

    image: Image.Image
    sha256: str
    name: str
    notes: tuple[str, ...] = field(default=())

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def rgb_bytes(self) -> bytes:
        """The pixels as packed RGBRGB... bytes, row by row (how Ray tasks ship decoded images)."""
        return self.image.tobytes()


def _read_source(source: str | os.PathLike[str] | bytes, max_bytes: int | None) -> tuple[bytes, str]:
    """The image's bytes, bounded by the image limit (`reading.IMAGE`), and the name messages use for it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    if os.fspath(source) == STDIN:
        name, path = "<stdin>", STDIN
    else:
        path = os.path.expanduser(os.fspath(source))
        name = display_name(source)
    data = reading.read_file(
        path,
        reading.IMAGE,
        limit=max_bytes,
        what="an image file",
        error=ImageError,
        missing=f"image not found: {name}",
        hint="give the path of one image file",
    )
    return data, name


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: transparency over white, 16-bit and float samples rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples: Pillow's convert("L") clips at 255 (a white picture); scale the range down instead.
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr8 = np.clip(arr * 255 // top, 0, 255).astype(np.uint8)
        notes.append("16-bit image: converted to 8-bit RGB")
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels often carry black RGB: composite over white so the picture looks as it does on screen.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """Decode `data` into an upright RGB image; raise `ImageError` naming `name` if it cannot be used."""
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)", hint="the file was not written completely; use another")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; we decide with our own limit below. Its
            # other warnings ("Corrupt EXIF data", ...) would be extra stderr lines: the outcome is what counts.
            warnings.simplefilter("ignore")
            img: Image.Image = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name} is {width}×{height} pixels, more than the {max_pixels:,}-pixel limit "
                    "(decompression-bomb guard)",
                    hint="downscale it first; the model sees 336×336 anyway",
                )
            if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
                notes.append(f"{name} is animated ({getattr(img, 'n_frames', '?')} frames): using the first frame")
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            if img.width == 0 or img.height == 0:
                raise ImageError(f"{name} has no pixels ({img.width}×{img.height})")
            rgb = _to_rgb(img, notes)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses before we see the size when it is over twice its own limit (~179 MP).
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageError(
            f"{name} has {size}, more than the {max_pixels:,}-pixel limit (decompression-bomb guard)",
            hint="downscale it first; the model sees 336×336 anyway",
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{name} is not an image (Pillow cannot identify it)", hint="give a JPEG, PNG, WebP, GIF or TIFF file"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated or corrupt pixel data as OSError ("image file is truncated", "broken data
        # stream"), SyntaxError (bad PNG chunk) or ValueError depending on the plugin.
        raise ImageError(f"{name} is truncated or corrupt ({exc})", hint="re-export or re-download it") from exc
    except Exception as exc:
        # Pillow's plugins raise whatever their parser hits on a corrupt file (TypeError('Missing dimensions')
        # from a TIFF directory, struct.error, IndexError...): still a corrupt image, not a bug of ours.
        raise ImageError(
            f"{name} is corrupt ({type(exc).__name__}: {exc})", hint="re-export or re-download it"
        ) from exc
    return rgb, notes


def load_image(
    source: str | os.PathLike[str] | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None
) -> LoadedImage:
    """Read an image from a path, ``"-"`` (stdin) or bytes; return it upright, RGB, validated, with its SHA-256.

    A path must be a regular file and, like stdin, hold at most `max_bytes` (default: `reading.IMAGE`, i.e.
    ``--max-image-mb`` / ``LLAVA_MAX_IMAGE_MB``). `LoadedImage.name` is the path as people read it (undecodable
    bytes as ``\\xNN``). The hash is of the source bytes, so the same file always maps to the same cached encoding.
    """
    data, name = _read_source(source, max_bytes)
    image, notes = decode_image(data, name, max_pixels=max_pixels)
    return LoadedImage(image=image, sha256=hashlib.sha256(data).hexdigest(), name=name, notes=tuple(notes))
