"""Concept folders of the toy world: what ``ti toy render`` writes and ``make demo`` inverts."""

from __future__ import annotations

import json
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from oneword.data.shards import ConceptSample
from oneword.fileio import atomic_path, atomic_write_text
from oneword.imagegrid import image_grid, save_png
from oneword.toy.render import Concept, render_concept_images, split_concepts


def pick_concepts(n: int, held_out: bool = True, seed: int = 0) -> list[Concept]:
    """``n`` concepts from the held-out split (never seen by the toy model) or the training split,
    spread evenly over it (every ``len(split) // n``-th): a different set for each ``n``, not a
    prefix of a larger pick."""
    train, test = split_concepts()
    pool = test if held_out else train
    step = _spacing(len(pool), n)
    return pool[seed % step :: step][:n]


def _spacing(pool_size: int, n: int) -> int:
    """The stride :func:`pick_concepts` takes through a split of ``pool_size`` to pick ``n``."""
    return max(1, pool_size // max(1, n))


def write_concept_folder(
    concept: Concept, out: Path, n_images: int = 5, seed: int = 0, size: int = 64, tone: float = 0.0
) -> tuple[Path, list[tuple[Image.Image, str]]]:
    """``out/<slug>/`` with ``n_images`` reference PNGs and ``concept.json`` (its attributes);
    returns the folder and the rendered ``(image, background)`` pairs. ``tone`` draws the
    concept's colours off the vocabulary (:func:`~oneword.toy.render.toned_rgb`); its
    ``concept.json`` still names the vocabulary's words, the nearest a caption can say."""
    renders = render_concept_images(concept, n_images, seed=seed, size=size, tone=tone)
    folder = out / concept.slug  # made once the renders exist: a refused tone leaves nothing
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, _bg) in enumerate(renders):
        with atomic_path(folder / f"{concept.slug}-{i}.png") as tmp:
            img.save(tmp, format="PNG")
    atomic_write_text(folder / "concept.json", json.dumps(concept.attributes(), indent=1) + "\n")
    return folder, list(renders)


def write_bench_concepts(n: int, out: Path, draw: int = 0, tone: float = 0.0) -> list[Path]:
    """The benchmarks' held-out concepts: :func:`pick_concepts` ``(n, seed=1 + draw)``, 5
    references of 64 px each (seed 7), written under ``out``; the same folders for every bench
    script. Draws ``0 .. len(held_out) // n - 2`` are disjoint sets of ``n`` (e.g. to choose a
    setting on one draw and report it on draw 0). ``tone``: see :func:`write_concept_folder`."""
    step = _spacing(len(split_concepts()[1]), n)
    if draw < 0 or (draw and draw + 1 >= step):
        raise ValueError(f"draw must be in 0..{max(0, step - 2)} for {n} held-out concepts, got {draw}")
    return [
        write_concept_folder(c, out, n_images=5, seed=7, size=64, tone=tone)[0]
        for c in pick_concepts(n, held_out=True, seed=1 + draw)
    ]


def load_bench_concepts(n: int, draw: int = 0, tone: float = 0.0) -> list:
    """:func:`write_bench_concepts` into a temporary folder, loaded into memory (one
    :class:`~oneword.eval.protocol.ConceptRef` each); the folder is removed afterwards."""
    from oneword.data.concepts import load_concept

    with tempfile.TemporaryDirectory(prefix="oneword-bench-") as tmp:
        return [load_concept(f) for f in write_bench_concepts(n, Path(tmp), draw, tone)]


def write_concepts(
    out: Path,
    n_concepts: int,
    n_images: int = 5,
    seed: int = 0,
    held_out: bool = True,
    size: int = 64,
    tone: float = 0.0,
) -> tuple[list[Path], Path]:
    """Concept folders plus ``contact_sheet.png`` (one row per concept); ``tone``: see
    :func:`write_concept_folder`."""
    concepts = pick_concepts(n_concepts, held_out=held_out, seed=seed)
    folders, images, labels = [], [], []
    for c in concepts:
        folder, renders = write_concept_folder(c, out, n_images, seed, size, tone)
        folders.append(folder)
        for i, (img, bg) in enumerate(renders):
            images.append(img)
            labels.append(c.slug if i == 0 else bg)
    sheet = save_png(image_grid(images, cols=n_images, labels=labels, zoom=2), out / "contact_sheet.png")
    return folders, sheet


def toy_samples(
    split: str = "train", images: int = 8, seed: int = 0, size: int = 64, limit: int | None = None
) -> Iterator[ConceptSample]:
    """Every concept of the toy ``split`` (train or held-out), ``images`` renders each on varied
    backgrounds; the initializer is the shape, as a user would name the object's class."""
    train, held = split_concepts()
    concepts = {"train": train, "held-out": held}.get(split)
    if concepts is None:
        raise ValueError("split must be 'train' or 'held-out'")
    for c in concepts[:limit]:
        pairs = render_concept_images(c, images, seed=zlib.crc32(f"{seed}-{c.slug}".encode()), size=size)
        yield ConceptSample(c.slug, [im for im, _ in pairs], c.shape, c.attributes(), [bg for _, bg in pairs])
