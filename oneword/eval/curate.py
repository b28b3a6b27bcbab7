"""Curation (paper, section 4.7): draw several candidates per sample and keep the one closest, in
CLIP space, to the concept's reference images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from oneword.eval.space import ClipSpace
from oneword.models import FrozenLDM
from oneword.sampling import SampleSettings, generate_images


@dataclass
class Curated:
    """The kept images (prompt-major, one per requested seed), their candidate seeds and scores."""

    images: list[Image.Image]
    seeds: list[int]
    scores: list[float]


def curate(
    model: FrozenLDM,
    prompts: Sequence[str],
    settings: SampleSettings,
    candidates: int,
    space: ClipSpace,
    references: Sequence[Image.Image],
) -> Curated:
    """For every prompt and every seed ``s`` of ``settings``, sample the candidates with seeds
    ``s * candidates + k`` (``k < candidates``) and keep the one whose CLIP image feature is most
    similar to the mean feature of ``references``."""
    if candidates < 1:
        raise ValueError("candidates must be at least 1")
    if not references:
        raise ValueError("curation needs reference images")
    target = torch.nn.functional.normalize(space.images(list(references)).mean(0), dim=0)
    cand_seeds = [s * candidates + k for s in settings.seeds for k in range(candidates)]
    draws = replace(settings, seeds=cand_seeds)
    kept, seeds, scores = [], [], []
    for prompt in prompts:
        images = generate_images(model, [prompt], draws)
        sims = space.images(images) @ target
        for slot in range(len(settings.seeds)):
            block = sims[slot * candidates : (slot + 1) * candidates]
            best = slot * candidates + int(block.argmax())
            kept.append(images[best])
            seeds.append(cand_seeds[best])
            scores.append(float(sims[best]))
    return Curated(kept, seeds, scores)
