"""Reducing a prompt's bias with a learned word (the bias-reduction application of Gal et al. 2022),
measured in the toy world.

The paper learns a word from a small curated set that is balanced over an attribute (e.g. skin
tone) and prompts with it instead of the class word, whose samples were skewed. Here the attribute
is a toy concept's fill colour (or pattern or outline), the class word a shape ("a photo of a
cross"), and the attribute oracle reads the attribute of every sample; a prompt's bias is the
entropy of that distribution and its KL divergence to the uniform one (both in bits; KL is
``log2(K) - entropy``, 0 when every value is drawn equally often).

:func:`run_bias_study` compares, on the same sampling seeds:

- ``class``: the plain class prompt ``"a photo of a <shape>"``;
- ``balanced``: a word learned from :func:`balanced_set` (``per_value`` renders of each value),
  initialised from the shape word;
- and, unless ``skewed_share`` is 0, the paper's situation, which the toy model lacks (its class
  words were trained on data balanced over fills): ``skewed``, a word learned from a set in which
  one value makes up ``skewed_share`` of the renders, stands in for a class word whose training
  data were biased, and ``balanced_from_skewed`` is the balanced set's word initialised from it.

The reference sets vary the concept's other attributes, balanced and shuffled independently of the
studied one (so that no other attribute is tied to a value), and cycle the background: a
curated set should differ in the studied attribute, not fix everything else. The entropy is the
plug-in estimate, biased low by about ``(K - 1) / (2 n ln 2)`` bits (0.04 bits for 8 values and
128 samples) alike for every prompt; :func:`entropy_gap`'s paired bootstrap over seeds covers
sampling noise, not the spread between words learned with other seeds (``words`` > 1 shows that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oneword.data.images import LoadedImage
from oneword.inversion.config import InversionConfig
from oneword.inversion.train import Inversion
from oneword.models import FrozenLDM
from oneword.sampling import SampleSettings, generate_images
from oneword.toy.oracle import AttributeOracle
from oneword.toy.render import (
    BACKGROUNDS,
    SHAPES,
    VOCAB,
    Concept,
    backgrounds_for,
    render,
    sample_pose,
)

logger = logging.getLogger(__name__)

#: One of the toy templates' openings, so the class word and the learned word share the prompt.
CLASS_PROMPT = "a photo of a {}"
#: The concept attributes a study can balance (the shape is the class word).
STUDY_ATTRIBUTES: tuple[str, ...] = ("fill", "pattern", "outline")
#: The survey's sampling seeds start here, apart from the study's (which start at 0), so the shape
#: the survey picks as the most skewed is measured again on fresh samples.
SURVEY_SEED = 100_000


# --------------------------------------------------------------------------------------------------
# Distributions


def distribution(values: Sequence[str], vocab: Sequence[str]) -> list[float]:
    """The share of each of ``vocab``'s values among ``values``, in ``vocab``'s order."""
    if not values:
        raise ValueError("no values to count")
    index = {v: i for i, v in enumerate(vocab)}
    counts = [0] * len(vocab)
    for v in values:
        if v not in index:
            raise ValueError(f"{v!r} is not one of {tuple(vocab)}")
        counts[index[v]] += 1
    return [c / len(values) for c in counts]


def _check_probs(probs: Sequence[float]) -> None:
    if not probs or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"not a probability distribution: {list(probs)}")


def entropy(probs: Sequence[float], base: float = 2.0) -> float:
    """Shannon entropy (0 log 0 = 0): ``log(K)`` for the uniform distribution, 0 for one value."""
    _check_probs(probs)
    return -sum(p * math.log(p, base) for p in probs if p > 0)


def kl_to_uniform(probs: Sequence[float], base: float = 2.0) -> float:
    """KL divergence from the uniform distribution over ``len(probs)`` values: ``log(K) - H``."""
    _check_probs(probs)
    return sum(p * math.log(p * len(probs), base) for p in probs if p > 0)


def reading(predictions: Sequence[Mapping[str, str]], attribute: str, shape: str) -> dict:
    """What the oracle read in one prompt's samples: the studied attribute's counts, distribution,
    entropy and KL to uniform (bits), the share of samples that still show ``shape``, and the
    entropy of the other attributes (a word that balances fills could narrow patterns)."""
    vocab = VOCAB[attribute]
    read = [p[attribute] for p in predictions]
    probs = distribution(read, vocab)
    others = [a for a in VOCAB if a not in ("shape", attribute)]
    return {
        "samples": len(predictions),
        "counts": {v: read.count(v) for v in vocab},
        "distribution": dict(zip(vocab, probs)),
        "entropy_bits": entropy(probs),
        "kl_to_uniform_bits": kl_to_uniform(probs),
        "max_entropy_bits": math.log2(len(vocab)),
        "shape_kept": sum(p["shape"] == shape for p in predictions) / len(predictions),
        "other_entropy_bits": {
            a: entropy(distribution([p[a] for p in predictions], VOCAB[a])) for a in others
        },
    }


def entropy_gap(
    a: Sequence[str],
    b: Sequence[str],
    vocab: Sequence[str],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Entropy of ``a`` minus that of ``b`` (bits), where ``a[i]`` and ``b[i]`` were drawn from the
    same seed, with a percentile bootstrap interval that resamples seeds (both readings of a seed
    move together). A resample's plug-in entropy runs low, by about as much for two prompts alike
    in entropy, so the shift mostly cancels in the gap (not where one side is near-uniform and the
    other near one value). ``{"gap", "lo", "hi", "samples"}``."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples needed: {len(a)} and {len(b)}")
    index = {v: i for i, v in enumerate(vocab)}
    n, k = len(a), len(vocab)
    ia = np.array([index[v] for v in a])
    ib = np.array([index[v] for v in b])
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    rows = np.arange(resamples)[:, None] * k

    def entropies(idx: np.ndarray) -> np.ndarray:
        counts = np.bincount((rows + idx[picks]).ravel(), minlength=resamples * k).reshape(resamples, k)
        p = counts / n
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log2(p), 0.0).sum(1)

    gaps = entropies(ia) - entropies(ib)
    tail = (1 - level) / 2
    lo, hi = np.quantile(gaps, [tail, 1 - tail])
    gap = entropy(distribution(a, vocab)) - entropy(distribution(b, vocab))
    return {"gap": gap, "lo": float(lo), "hi": float(hi), "samples": n}


# --------------------------------------------------------------------------------------------------
# Reference sets


@dataclass(frozen=True)
class Reference:
    """One rendered reference image and what it shows."""

    concept: Concept
    background: str
    image: Image.Image


def _balanced_cycle(vocab: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """``n`` values cycling through ``vocab`` (each ``n / len(vocab)`` times when that divides),
    shuffled."""
    values = [vocab[i % len(vocab)] for i in range(n)]
    rng.shuffle(values)
    return values


def reference_set(
    shape: str, attribute: str, values: Sequence[str], seed: int = 0, size: int = 64
) -> list[Reference]:
    """One render of ``shape`` per entry of ``values`` (the value of ``attribute`` it shows). The
    other concept attributes and the background each cycle through their vocabulary in an order
    shuffled independently of ``values``; poses are random. The same ``seed`` gives the same set."""
    if attribute not in STUDY_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {STUDY_ATTRIBUTES}, got {attribute!r}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    rng = random.Random(f"bias-set-{seed}")
    others = {a: _balanced_cycle(VOCAB[a], len(values), rng) for a in STUDY_ATTRIBUTES if a != attribute}
    backgrounds = _balanced_cycle(BACKGROUNDS, len(values), rng)
    refs = []
    for i, value in enumerate(values):
        concept = Concept(shape=shape, **{attribute: value}, **{a: v[i] for a, v in others.items()})
        allowed = backgrounds_for(concept)
        bg = backgrounds[i] if backgrounds[i] in allowed else allowed[i % len(allowed)]
        refs.append(Reference(concept, bg, render(concept, bg, sample_pose(rng), size=size)))
    return refs


def balanced_set(
    shape: str, attribute: str = "fill", per_value: int = 2, seed: int = 0, size: int = 64
) -> list[Reference]:
    """``per_value`` renders of ``shape`` for every value of ``attribute`` (:func:`reference_set`)."""
    if per_value < 1:
        raise ValueError(f"per_value must be at least 1, got {per_value}")
    return reference_set(
        shape, attribute, [v for v in VOCAB[attribute] for _ in range(per_value)], seed, size
    )


def skewed_values(attribute: str, n: int, favoured: str, share: float) -> list[str]:
    """``n`` values of ``attribute``: ``round(share * n)`` of ``favoured``, the rest cycling through
    the other values."""
    if favoured not in VOCAB[attribute]:
        raise ValueError(f"unknown {attribute} {favoured!r}; expected one of {VOCAB[attribute]}")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    rest = [v for v in VOCAB[attribute] if v != favoured]
    k = round(share * n)
    return [favoured] * k + [rest[i % len(rest)] for i in range(n - k)]


def as_loaded(refs: Sequence[Reference]) -> list[LoadedImage]:
    """The references as the inversion takes them (named and hashed as PNG files would be)."""
    loaded = []
    for i, ref in enumerate(refs):
        buf = io.BytesIO()
        ref.image.save(buf, format="PNG")
        name = f"{i:02d}-{ref.concept.slug}-{ref.background}.png"
        loaded.append(LoadedImage(Path(name), ref.image, hashlib.sha256(buf.getvalue()).hexdigest()))
    return loaded


# --------------------------------------------------------------------------------------------------
# Learning and reading


def learn_word(
    model: FrozenLDM,
    refs: Sequence[Reference],
    token: str,
    init: str,
    steps: int,
    seed: int = 0,
    init_vectors: list[torch.Tensor] | None = None,
    **config,
) -> list[torch.Tensor]:
    """Invert ``refs`` into ``token`` (toy templates unless ``config`` says otherwise; no files) and
    return its vectors; ``token`` stays in ``model`` for prompting."""
    settings = {"template": "toy", "save_every": 0, "preview_every": 0, **config}
    cfg = InversionConfig(token=token, init=init, steps=steps, seed=seed, **settings)
    inv = Inversion(model, as_loaded(refs), cfg, init_vectors)
    while inv.step < cfg.steps:
        inv.train_step()
    return model.vectors_of(token)


def read_prompt(
    model: FrozenLDM, oracle: AttributeOracle, prompt: str, sample: SampleSettings
) -> list[dict[str, str]]:
    """The oracle's reading of every attribute in one sample per ``sample.seeds`` entry."""
    return oracle.predict(generate_images(model, [prompt], sample))


# --------------------------------------------------------------------------------------------------
# The study


@dataclass
class BiasSettings:
    """What :func:`run_bias_study` measures and how much it spends."""

    shape: str | None = None
    """The class word; None: the shape whose class prompt the survey finds most skewed."""
    attribute: str = "fill"
    """The attribute to balance: fill, pattern or outline."""
    per_value: int = 2
    """Renders of each value in the balanced set (and the skewed set's size / number of values)."""
    steps: int = 600
    """Inversion steps per learned word."""
    words: int = 3
    """Words learned per arm, each from its own renders and seed (samples are pooled)."""
    samples: int = 128
    """Samples per prompt and word; the class prompt gets ``words * samples`` on the same seeds."""
    survey_samples: int = 128
    """Samples per shape in the survey of every class prompt; 0 skips it (then give ``shape``)."""
    sample_steps: int = 25
    """DDIM steps per sample."""
    guidance: float = 5.0
    """Classifier-free guidance scale."""
    skewed_share: float = 0.75
    """Share of the skewed set showing ``skewed_value``; 0 drops the skewed arm."""
    skewed_value: str = "red"
    """The value the skewed set favours."""
    resamples: int = 2000
    """Bootstrap resamples of the entropy gaps."""
    seed: int = 0
    """Seed of the renders, the inversions and the bootstrap (sampling seeds are fixed)."""

    def __post_init__(self) -> None:
        if self.attribute not in STUDY_ATTRIBUTES:
            raise ValueError(f"attribute must be one of {STUDY_ATTRIBUTES}, got {self.attribute!r}")
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.shape is None and self.survey_samples < 1:
            raise ValueError("without a survey (survey_samples 0) name the shape")
        for name in ("per_value", "steps", "words", "samples", "sample_steps", "resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.survey_samples < 0:
            raise ValueError(f"survey_samples must be >= 0, got {self.survey_samples}")
        if not 0 <= self.skewed_share <= 1:
            raise ValueError(f"skewed_share must be in [0, 1], got {self.skewed_share}")
        if self.skewed_share and self.skewed_value not in VOCAB[self.attribute]:
            raise ValueError(f"skewed_value {self.skewed_value!r} is not a {self.attribute}")

    def sampling(self, seeds: Sequence[int]) -> SampleSettings:
        return SampleSettings(
            steps=self.sample_steps, scheduler="ddim", guidance=self.guidance, seeds=list(seeds), batch=16
        )


def survey(model: FrozenLDM, oracle: AttributeOracle, settings: BiasSettings) -> dict[str, dict]:
    """:func:`reading` of every shape's class prompt, on seeds apart from the study's."""
    sample = settings.sampling(range(SURVEY_SEED, SURVEY_SEED + settings.survey_samples))
    return {
        shape: reading(
            read_prompt(model, oracle, CLASS_PROMPT.format(shape), sample), settings.attribute, shape
        )
        for shape in SHAPES
    }


def run_bias_study(model: FrozenLDM, oracle: AttributeOracle, settings: BiasSettings) -> dict:
    """The class prompt against words learned from a balanced set (module docstring). Returns a
    JSON-ready dict: ``settings``, ``shape``, ``survey`` (None when skipped), ``prompts`` (label ->
    prompt and :func:`reading`, pooled over words), ``per_word`` (entropy and KL of each learned
    word), ``gaps`` (paired entropy differences with bootstrap intervals) and ``seconds``. The
    learned words are removed again (with any other placeholder of ``model``) after each round."""
    s, attr = settings, settings.attribute
    t0 = time.perf_counter()
    found = survey(model, oracle, s) if s.survey_samples else None
    shape = s.shape or max(found, key=lambda k: found[k]["kl_to_uniform_bits"])
    t_survey = time.perf_counter() - t0
    logger.info("class word %s (%s)", shape, "given" if s.shape else "most skewed in the survey")

    n_set = s.per_value * len(VOCAB[attr])
    all_seeds = range(s.words * s.samples)
    prompts = {"class": CLASS_PROMPT.format(shape)}
    preds = {}
    preds["class"] = read_prompt(model, oracle, prompts["class"], s.sampling(all_seeds))
    per_word = []
    for r in range(s.words):
        seeds = s.sampling(range(r * s.samples, (r + 1) * s.samples))
        balanced = balanced_set(shape, attr, s.per_value, seed=s.seed * 1000 + r)
        arms: list[tuple[str, list[Reference], str | None]] = [("balanced", balanced, None)]
        if s.skewed_share:
            skew = reference_set(
                shape,
                attr,
                skewed_values(attr, n_set, s.skewed_value, s.skewed_share),
                s.seed * 1000 + 500 + r,
            )
            arms += [("skewed", skew, None), ("balanced_from_skewed", balanced, "skewed")]
        vectors: dict[str, list[torch.Tensor]] = {}
        row: dict[str, object] = {"word": r}
        for label, refs, start in arms:
            token = f"<{label.replace('_', '-')}-{shape}>"
            vectors[label] = learn_word(
                model,
                refs,
                token,
                shape,
                s.steps,
                seed=s.seed + r,
                init_vectors=vectors[start] if start else None,
            )
            prompts[label] = CLASS_PROMPT.format(token)
            got = read_prompt(model, oracle, prompts[label], seeds)
            preds.setdefault(label, []).extend(got)
            one = reading(got, attr, shape)
            row[label] = {k: one[k] for k in ("entropy_bits", "kl_to_uniform_bits", "shape_kept")}
            logger.info("word %d %s: entropy %.3f bits", r, label, one["entropy_bits"])
        model.clear_placeholders()
        per_word.append(row)

    values = {k: [p[attr] for p in v] for k, v in preds.items()}
    pairs = [("balanced", "class")] + ([("balanced_from_skewed", "skewed")] if s.skewed_share else [])
    gaps = {
        f"{a}_minus_{b}": entropy_gap(values[a], values[b], VOCAB[attr], s.resamples, s.seed)
        for a, b in pairs
    }
    return {
        "settings": dataclasses.asdict(s),
        "shape": shape,
        "survey": found,
        "prompts": {k: {"prompt": prompts[k], **reading(v, attr, shape)} for k, v in preds.items()},
        "per_word": per_word,
        "gaps": gaps,
        "seconds": {"survey": t_survey, "total": time.perf_counter() - t0},
    }
