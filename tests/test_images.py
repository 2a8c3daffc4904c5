"""Image loading: every bad input is one ImageError naming the file; unusual valid images become upright RGB."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_cli.errors import ImageError, InputNotFoundError
from llava_cli.images import load_image


def _picture(w: int = 64, h: int = 48) -> Image.Image:
    """Left half red, right half blue: orientation and colour are checkable."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr, "RGB")


def _save(img: Image.Image, path: Path, fmt: str, **kw: object) -> Path:
    img.save(path, fmt, **kw)
    return path


def test_png_roundtrip_and_hash(tmp_path: Path) -> None:
    p = _save(_picture(), tmp_path / "a.png", "PNG")
    li = load_image(p)
    assert li.image.mode == "RGB" and li.image.size == (64, 48)
    assert li.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert li.rgb_bytes()[:3] == b"\xff\x00\x00"
    assert len(li.rgb_bytes()) == 64 * 48 * 3
    assert li.notes == ()
    # Bytes give the same hash as the file: the cache key is the content, not the name.
    assert load_image(p.read_bytes()).sha256 == li.sha256


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_zero_byte(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.jpg is empty \(0 bytes\)"):
        load_image(p)


def test_non_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n" * 10)
    with pytest.raises(ImageError, match="notes.jpg is not an image"):
        load_image(p)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    noisy.save(buf, fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()} is truncated or corrupt"):
        load_image(p)


def test_corrupt_header(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _picture().save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[40:80] = b"\x00" * 40  # clobber the IDAT chunk header / data
    p = tmp_path / "corrupt.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt.png"):
        load_image(p)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height, with a tiny IDAT: what a decompression bomb looks like."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(ImageError, match=r"bomb.png has 400,000,000 pixels.*decompression-bomb"):
        load_image(p)


def test_bomb_under_pillow_limit(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    p.write_bytes(_png_header_only(12000, 12000))  # 144 MP: Pillow only warns, our limit refuses
    with pytest.raises(ImageError, match=r"big.png is 12000×12000 pixels.*decompression-bomb"):
        load_image(p)


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    p = _save(_picture(), tmp_path / "a.png", "PNG")
    with pytest.raises(ImageError, match="64×48"):
        load_image(p, max_pixels=1000)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    li = load_image(p)
    assert li.image.mode == "RGB"
    r, g, b = li.image.getpixel((5, 5))
    assert r > 200 and g < 50 and b < 50
    assert any("3 frames" in n and "first frame" in n for n in li.notes)


def test_cmyk(tmp_path: Path) -> None:
    p = _save(_picture().convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG", quality=95)
    li = load_image(p)
    assert li.image.mode == "RGB"
    r, g, b = li.image.getpixel((2, 2))
    assert r > 200 and b < 60


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    arr[:, 5:] = (0, 0, 255, 255)  # opaque blue on the right
    p = _save(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png", "PNG")
    li = load_image(p)
    assert li.image.mode == "RGB"
    assert li.image.getpixel((1, 1)) == (255, 255, 255)
    assert li.image.getpixel((8, 1)) == (0, 0, 255)


def test_la_and_palette(tmp_path: Path) -> None:
    pal = _save(_picture().convert("P", palette=Image.Palette.ADAPTIVE), tmp_path / "p.png", "PNG")
    assert load_image(pal).image.getpixel((1, 1))[0] > 200
    pal_t = _picture().convert("P", palette=Image.Palette.ADAPTIVE)
    pal_t.info["transparency"] = 0
    pt = _save(pal_t, tmp_path / "pt.png", "PNG", transparency=0)
    assert load_image(pt).image.mode == "RGB"
    la = _save(Image.new("LA", (8, 8), (10, 255)), tmp_path / "la.png", "PNG")
    assert load_image(la).image.getpixel((0, 0)) == (10, 10, 10)


def test_16bit_png(tmp_path: Path) -> None:
    arr = np.full((8, 8), 40000, np.uint16)
    img = Image.fromarray(arr)
    p = _save(img, tmp_path / "deep.png", "PNG")
    assert Image.open(p).mode.startswith("I")
    li = load_image(p)
    assert li.image.mode == "RGB"
    # 40000/65535*255 ≈ 155: rescaled, not clipped to white.
    assert abs(li.image.getpixel((0, 0))[0] - 155) <= 1
    assert any("16-bit" in n for n in li.notes)


def test_exif_rotation(tmp_path: Path) -> None:
    img = _picture(64, 48)  # red left, blue right, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    p = tmp_path / "rot.jpg"
    img.save(p, "JPEG", exif=exif, quality=95)
    li = load_image(p)
    assert li.image.size == (48, 64)  # upright: portrait
    top = li.image.getpixel((24, 2))
    bottom = li.image.getpixel((24, 61))
    assert top[0] > 200 and top[2] < 60  # red now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("TIFF", "tiff"), ("BMP", "bmp")])
def test_other_formats(tmp_path: Path, fmt: str, ext: str) -> None:
    p = _save(_picture(), tmp_path / f"a.{ext}", fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    li = load_image(p)
    assert li.image.mode == "RGB" and li.image.size == (64, 48)
    assert li.image.getpixel((1, 1)) == (255, 0, 0)


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    _picture().save(buf, "PNG")

    class FakeStdin:
        buffer = io.BytesIO(buf.getvalue())

    monkeypatch.setattr("sys.stdin", FakeStdin())
    li = load_image("-")
    assert li.name == "<stdin>" and li.image.size == (64, 48)
