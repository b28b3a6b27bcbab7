"""Does the toy model draw what a prompt names? Text-to-image attribute accuracy by the oracle.

For each attribute, prompts name one value of it (and nothing else), the model draws several
samples per prompt from fixed seeds, and the oracle reads the attribute back. The share of samples
showing the named value is the attribute's score (chance: 1 / number of values).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from oneword.generate import SampleSettings, generate_images
from oneword.models import FrozenLDM
from oneword.toy.captions import prompt_for
from oneword.toy.oracle import AttributeOracle, attribute_accuracy
from oneword.toy.render import ATTRIBUTES, VOCAB


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


def text_to_image_accuracy(model: FrozenLDM, oracle: AttributeOracle,
                           settings: QualitySettings | None = None) -> dict[str, float]:
    """Per attribute: share of samples in which the oracle finds the value the prompt named."""
    s = settings or QualitySettings()
    sample = SampleSettings(steps=s.steps, guidance=s.guidance,
                            seeds=list(range(s.seed, s.seed + s.samples_per_value)))
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
