"""Draw examples/cat.png: a small synthetic cat picture for the README quick start (no downloads needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def draw_cat(size: int = 336) -> Image.Image:
    s = size / 336
    img = Image.new("RGB", (size, size), (170, 205, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, int(250 * s), size, size], fill=(120, 170, 90))  # grass
    d.ellipse([int(90 * s), int(170 * s), int(250 * s), int(310 * s)], fill=(235, 140, 50))  # body
    d.polygon(
        [(int(105 * s), int(70 * s)), (int(125 * s), int(10 * s)), (int(160 * s), int(60 * s))], fill=(235, 140, 50)
    )
    d.polygon(
        [(int(175 * s), int(60 * s)), (int(210 * s), int(10 * s)), (int(230 * s), int(70 * s))], fill=(235, 140, 50)
    )
    d.ellipse([int(95 * s), int(40 * s), int(240 * s), int(180 * s)], fill=(240, 150, 60))  # head
    for x in (135, 200):  # eyes
        d.ellipse([int((x - 14) * s), int(90 * s), int((x + 14) * s), int(118 * s)], fill=(90, 170, 60))
        d.ellipse([int((x - 4) * s), int(92 * s), int((x + 4) * s), int(116 * s)], fill=(20, 20, 20))
    d.polygon(
        [(int(160 * s), int(128 * s)), (int(176 * s), int(128 * s)), (int(168 * s), int(138 * s))], fill=(230, 110, 130)
    )
    for dy in (-8, 0, 8):  # whiskers
        d.line([(int(110 * s), int((140 + dy) * s)), (int(155 * s), int(138 * s))], fill=(40, 40, 40), width=2)
        d.line([(int(181 * s), int(138 * s)), (int(226 * s), int((140 + dy) * s))], fill=(40, 40, 40), width=2)
    d.arc(
        [int(230 * s), int(200 * s), int(320 * s), int(300 * s)], 180, 300, fill=(235, 140, 50), width=int(14 * s)
    )  # tail
    return img


if __name__ == "__main__":
    out = Path(__file__).with_name("cat.png")
    draw_cat().save(out, optimize=True)
    print(out)
