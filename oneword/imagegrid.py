"""Image grids and PNG files with their generation settings in the metadata."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from oneword.fileio import atomic_path


def image_grid(
    images: Sequence[Image.Image], cols: int, labels: Sequence[str] | None = None, pad: int = 2
) -> Image.Image:
    """Tile equally sized images row-major into a grid, optionally with a caption strip under each."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    label_h = 12 if labels else 0
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x = pad + (i % cols) * (w + pad)
        y = pad + (i // cols) * (h + label_h + pad)
        sheet.paste(img.convert("RGB").resize((w, h)), (x, y))
        if labels:
            draw.text((x + 1, y + h), str(labels[i])[: max(4, w // 6)], fill="black")
    return sheet


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
