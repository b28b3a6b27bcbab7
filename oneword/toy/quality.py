"""Does the toy model draw what a prompt names? Text-to-image attribute accuracy by the oracle.

For each attribute, prompts name one value of it (and nothing else), the model draws several
samples per prompt from fixed seeds, and the oracle reads the attribute back. The share of samples
showing the named value is the attribute's score (chance: 1 / number of values).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from oneword.data.images import image_to_tensor
from oneword.models import FrozenLDM
from oneword.sampling import SampleSettings, generate_images
from oneword.toy.captions import prompt_for
from oneword.toy.oracle import AttributeOracle, attribute_accuracy
from oneword.toy.render import ATTRIBUTES, VOCAB, all_concepts, backgrounds_for, render, sample_pose


@dataclass
class QualitySettings:
    """How much to sample for the text-to-image check."""

    samples_per_value: int = 8
    """Images per (attribute, value) prompt."""
    steps: int = 30
    """DDIM steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale."""
    seed: int = 0
    """First seed; the i-th sample of a prompt uses ``seed + i``."""


def text_to_image_accuracy(
    model: FrozenLDM, oracle: AttributeOracle, settings: QualitySettings | None = None
) -> dict[str, float]:
    """Per attribute: share of samples in which the oracle finds the value the prompt named."""
    s = settings or QualitySettings()
    sample = SampleSettings(
        steps=s.steps, guidance=s.guidance, seeds=list(range(s.seed, s.seed + s.samples_per_value))
    )
    scores: dict[str, float] = {}
    for attr in ATTRIBUTES:
        prompts, expected = [], []
        for value in VOCAB[attr]:
            prompts.append(prompt_for({attr: value}))
            expected += [{attr: value}] * s.samples_per_value
        images = generate_images(model, prompts, sample)
        scores[attr] = attribute_accuracy(oracle.predict(images), expected)[attr]
    return scores


def random_full_prompts(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` random full attribute assignments (for spot checks of attribute binding)."""
    rng = random.Random(seed)
    return [{a: rng.choice(VOCAB[a]) for a in ATTRIBUTES} for _ in range(n)]


def text_separation(model: FrozenLDM, attr: str) -> float:
    """Mean distance between the text states (all token positions) of the prompts that name each
    value of ``attr`` alone: how far apart the text encoder puts, e.g., "with stripes" and "with
    dots". A UNet cannot draw a distinction its conditioning does not carry."""
    values = VOCAB[attr]
    with torch.no_grad():
        states = model.encode_text([prompt_for({attr: v}) for v in values]).hidden_states.float()
    d = torch.cdist(states.flatten(1)[None], states.flatten(1)[None])[0]
    n = len(values)
    return float(d.sum() / (n * (n - 1)))


def conditioning_gap(
    model: FrozenLDM,
    attr: str,
    n: int = 48,
    timesteps: Sequence[int] = (100, 300, 500, 700, 900),
    seed: int = 0,
) -> dict[int, float]:
    """How much the model's denoising loss relies on the word for ``attr``, per timestep.

    ``n`` renders whose ``attr`` cycles through its values are scored with the prompt naming their
    own value and with one naming the next value (same noise); the result is the relative loss
    increase ``(wrong - right) / right``. Near 0: the model ignores the word at that noise level.
    """
    from oneword.inversion.loss import denoising_loss

    values = VOCAB[attr]
    rng = random.Random(seed)
    concepts = all_concepts()
    images, right, wrong = [], [], []
    for i in range(n):
        value = values[i % len(values)]
        if attr == "background":
            concept = rng.choice([c for c in concepts if value in backgrounds_for(c)])
            background = value
        else:
            concept = rng.choice([c for c in concepts if c.attributes()[attr] == value])
            background = rng.choice(backgrounds_for(concept))
        images.append(image_to_tensor(render(concept, background, sample_pose(rng), size=model.resolution)))
        right.append(prompt_for({attr: value}))
        wrong.append(prompt_for({attr: values[(values.index(value) + 1) % len(values)]}))
    vae = model.vae
    x = torch.stack(images).to(model.device, model.dtype)
    out: dict[int, float] = {}
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        cond_right, cond_wrong = model.encode_text(right), model.encode_text(wrong)
        for t in timesteps:
            ts = torch.full((n,), int(t))
            lr = denoising_loss(
                model, latents, cond_right, torch.Generator().manual_seed(seed + t), ts
            ).mean()
            lw = denoising_loss(
                model, latents, cond_wrong, torch.Generator().manual_seed(seed + t), ts
            ).mean()
            out[int(t)] = float((lw - lr) / lr)
    return out
