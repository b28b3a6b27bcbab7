"""Image grids and PNG files with their generation settings in the metadata."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from oneword.fileio import atomic_path

#: Grids of images smaller than this (the toy world's 32 px) are enlarged to at least this side.
MIN_TILE = 128


def auto_zoom(side: int) -> int:
    """The nearest-neighbour enlargement that makes a ``side`` px image at least :data:`MIN_TILE` px."""
    return max(1, -(-MIN_TILE // max(1, side)))


def image_grid(
    images: Sequence[Image.Image],
    cols: int,
    labels: Sequence[str] | None = None,
    pad: int = 2,
    zoom: int = 1,
) -> Image.Image:
    """Tile equally sized images row-major into a grid (enlarged ``zoom`` times, nearest
    neighbour), with an optional label under each; long labels wrap at ``-`` or spaces."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if cols < 1 or zoom < 1:
        raise ValueError("cols and zoom must be positive")
    w, h = images[0].size
    w, h = w * zoom, h * zoom
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    chars = max(4, w // 6)
    wrapped = [_wrap(str(t), chars) for t in labels] if labels is not None else None
    line_h = 11
    label_h = line_h * max(len(lines) for lines in wrapped) if wrapped else 0
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x = pad + (i % cols) * (w + pad)
        y = pad + (i // cols) * (h + label_h + pad)
        tile = img.convert("RGB")
        if tile.size != (w, h):
            tile = tile.resize((w, h), Image.Resampling.NEAREST)
        sheet.paste(tile, (x, y))
        if wrapped:
            for k, line in enumerate(wrapped[i]):
                draw.text((x + 1, y + h + k * line_h), line, fill="black")
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    """Greedy wrap at ``-`` and spaces (kept at line ends); over-long pieces are cut."""
    lines: list[str] = []
    current = ""
    for piece in re.findall(r"[^- ]+[- ]*|[- ]+", text):
        if current and len((current + piece).rstrip()) > width:
            lines.append(current.rstrip())
            current = ""
        current += piece
    if current.strip() or not lines:
        lines.append(current.rstrip())
    return [line[:width] for line in lines]


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save ``image`` as PNG atomically, with ``metadata`` as text chunks (prompt, seeds, model...)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return target
