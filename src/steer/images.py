"""Image grids of samples that keep values beyond the data range visible, written as PNG.

``colorize`` maps the data range [−1, 1] to grey (black −1, white 1) and colours what lies beyond it: red above 1,
blue below −1, in proportion to the excess up to ``EXCESS_FULL`` (full red, full blue), so the over-saturation that
high guidance scales cause (and APG removes) shows in the picture instead of being clipped away. ``write_grid``
lays samples out one row per label and writes the PNG: with a title, legend and row labels through Pillow when it
is installed, else as a bare image through a small zlib PNG encoder.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["EXCESS_FULL", "LEGEND", "colorize", "grid", "write_grid", "write_png"]

EXCESS_FULL = 0.5
LEGEND = (f"grey: [-1, 1] (black -1, white 1); red: above 1, blue: below -1, deeper with the excess "
          f"(full at {EXCESS_FULL:g} beyond)")
SCALE = 8  # screen pixels per sample pixel
GAP = 2
MARGIN = 6
LINE = 14  # pixels per text line (Pillow's default font is 11 high)
LABEL_W = 24  # the column of row labels left of the grid


def colorize(x: np.ndarray) -> np.ndarray:
    """``x [H, W]`` (any real values) as an RGB ``uint8 [H, W, 3]`` image; see the module docstring."""
    x = np.asarray(x, dtype=np.float64)
    grey = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    tint = np.clip((np.abs(x) - 1.0) / EXCESS_FULL, 0.0, 1.0)
    above, below = x > 1.0, x < -1.0
    rgb[above] = np.stack([np.ones_like(tint[above]), 1.0 - tint[above], 1.0 - tint[above]], axis=-1)
    rgb[below] = np.stack([np.zeros_like(tint[below]), np.zeros_like(tint[below]), tint[below]], axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def grid(images: np.ndarray, labels: np.ndarray, scale: int = SCALE, gap: int = GAP) -> tuple[np.ndarray, list]:
    """Tile ``images [N, H, W]`` into an RGB array with one row per distinct label (ascending) and that label's
    samples left to right, each pixel ``scale``×``scale``, ``gap`` white pixels between tiles. Returns the array and
    the row labels."""
    images, labels = np.asarray(images), np.asarray(labels)
    rows = sorted(set(labels.tolist()))
    cols = max(int((labels == r).sum()) for r in rows)
    h, w = images.shape[1] * scale, images.shape[2] * scale
    out = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(images[labels == r]):
            tile = colorize(img).repeat(scale, axis=0).repeat(scale, axis=1)
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    return out, rows


def write_grid(path, images: np.ndarray, labels: np.ndarray, title: str = "") -> tuple[int, int]:
    """Write ``grid(images, labels)`` to the PNG file ``path`` (atomically) and return its ``(width, height)``.

    With Pillow: a white margin holding ``title`` and ``LEGEND`` above the grid, and each row's label on its left.
    Without it: the bare grid."""
    tiles, rows = grid(images, labels)
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        write_png(path, tiles)
        return tiles.shape[1], tiles.shape[0]
    font = ImageFont.load_default()
    lines = [title, LEGEND] if title else [LEGEND]
    pitch = np.asarray(images).shape[1] * SCALE + GAP
    text_w = max(int(font.getlength(s)) for s in lines) + 2 * MARGIN
    top = MARGIN + len(lines) * LINE + MARGIN
    width, height = max(LABEL_W + tiles.shape[1] + MARGIN, text_w), top + tiles.shape[0] + MARGIN
    img = Image.new("RGB", (width, height), "white")
    img.paste(Image.fromarray(tiles), (LABEL_W, top))
    draw = ImageDraw.Draw(img)
    for k, s in enumerate(lines):
        draw.text((MARGIN, MARGIN + k * LINE), s, fill="black", font=font)
    for i, r in enumerate(rows):
        draw.text((MARGIN, top + i * pitch + (pitch - GAP) // 2), str(r), fill="black", font=font, anchor="lm")
    _atomic(path, lambda f: img.save(f, format="PNG"))
    return width, height


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB ``uint8 [H, W, 3]`` array as the bytes of an 8-bit truecolour PNG (no filtering, zlib level 9)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_png(path, rgb: np.ndarray) -> None:
    """Write an RGB ``uint8 [H, W, 3]`` array to ``path`` as PNG, atomically, without Pillow."""
    _atomic(path, lambda f: f.write(png_bytes(rgb)))


def _atomic(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
