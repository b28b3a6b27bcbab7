"""Concept folders: a concept's reference images, its initializer word and, in the toy world, its
true attributes (``concept.json`` beside the images)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from oneword.data.images import LoadedImage, load_folder
from oneword.errors import InputError


@dataclass
class ConceptRef:
    """A concept to score against: its reference images, its initializer word and, in the toy
    world, its true attributes (``concept.json`` beside the images)."""

    name: str
    images: list[LoadedImage]
    init: str
    attributes: dict[str, str] | None = None


def load_concept(folder: str | Path, init: str | None = None) -> ConceptRef:
    """Images of ``folder`` and its ``concept.json`` if any; ``init`` defaults to the toy shape."""
    folder = Path(folder)
    images = load_folder(folder)
    attributes = None
    meta = folder / "concept.json"
    if meta.is_file():
        try:
            attributes = {str(k): str(v) for k, v in json.loads(meta.read_text()).items()}
        except (ValueError, AttributeError) as err:
            raise InputError(f"{meta} is not a JSON object of attributes ({err})") from None
    if init is None:
        if not attributes or "shape" not in attributes:
            raise InputError(f"{folder}: give the initializer word (--init), e.g. the object's class")
        init = attributes["shape"]
    return ConceptRef(folder.name, images, init, attributes)
