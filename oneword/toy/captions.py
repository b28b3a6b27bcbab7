"""Captions of toy-world images that name only part of the object.

A caption names a random subset of the attributes (shape, fill, pattern, outline, and sometimes the
background) in plain English, with varied templates: "a photo of a red star with stripes and a gold
outline on a navy background", "a photo of a star", "a red shape", "a striped star on a teal
background", "a picture of a thing with dots". :class:`CaptionSpec` records which attributes a
caption named, so training and evaluation know what the text said and what it left to the image.

Every attribute value is expressed by one of a few fixed words (:data:`SURFACE_FORMS`); the
vocabularies are disjoint and no template word is one of them, so :func:`named_attributes` can read
the named attributes back from any caption text.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from oneword.toy.render import ATTRIBUTES, VOCAB, Concept

#: What a caption says for an object whose shape it does not name.
GENERIC_NOUNS: tuple[str, ...] = ("object", "shape", "thing")
PREFIXES: tuple[str, ...] = (
    "a photo of",
    "a picture of",
    "an image of",
    "a rendering of",
    "a drawing of",
    "a close-up photo of",
    "a good photo of",
    "",
)
#: Probability that :func:`caption` names each attribute (independently).
DEFAULT_NAME_PROB: dict[str, float] = {
    "shape": 0.7,
    "fill": 0.5,
    "pattern": 0.5,
    "outline": 0.5,
    "background": 0.5,
}

_PATTERN_ADJ: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain"),
    "stripes": ("striped",),
    "dots": ("dotted",),
    "checks": ("checked",),
}
_PATTERN_NOUN: dict[str, str] = {"stripes": "stripes", "dots": "dots", "checks": "checks"}

#: The words that can express each attribute value in a caption.
SURFACE_FORMS: dict[str, dict[str, tuple[str, ...]]] = {
    name: {value: (value,) for value in VOCAB[name]} for name in ATTRIBUTES
}
for _value, _adjs in _PATTERN_ADJ.items():
    SURFACE_FORMS["pattern"][_value] = tuple(dict.fromkeys((_value, *_adjs)))

_WORD_TO_ATTR: dict[str, tuple[str, str]] = {
    word: (name, value)
    for name, values in SURFACE_FORMS.items()
    for value, words in values.items()
    for word in words
}


@dataclass(frozen=True)
class CaptionSpec:
    """A caption and the attributes it names (``{"shape": "star", "background": "teal"}``)."""

    text: str
    named: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def named_attributes(caption: str | CaptionSpec) -> dict[str, str]:
    """The attributes a caption names, read back from its words (``CaptionSpec.named`` as is)."""
    if isinstance(caption, CaptionSpec):
        return dict(caption.named)
    found: dict[str, str] = {}
    for word in _words(caption):
        hit = _WORD_TO_ATTR.get(word)
        if hit is not None:
            name, value = hit
            found.setdefault(name, value)
    return {name: found[name] for name in ATTRIBUTES if name in found}


def _check_named(named: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name, value in named.items():
        if name not in VOCAB:
            raise ValueError(f"unknown attribute {name!r}; expected one of {ATTRIBUTES}")
        if value not in VOCAB[name]:
            raise ValueError(f"unknown {name} {value!r}; expected one of {VOCAB[name]}")
        out[name] = value
    return {name: out[name] for name in ATTRIBUTES if name in out}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _rand(rng: random.Random | np.random.Generator) -> float:
    return float(rng.random())


def _pick(rng: random.Random | np.random.Generator, options: Sequence[str]) -> str:
    return options[min(int(_rand(rng) * len(options)), len(options) - 1)]


def _phrase(named: Mapping[str, str], rng: random.Random | np.random.Generator | None, prefix: str) -> str:
    """Compose the text. With ``rng=None`` the phrasing is canonical (fixed choices)."""

    def pick(options: Sequence[str]) -> str:
        return options[0] if rng is None else _pick(rng, options)

    def coin(p: float) -> bool:
        return False if rng is None else _rand(rng) < p

    noun = named.get("shape") or pick(GENERIC_NOUNS)
    before: list[str] = []  # adjectives, in order
    withs: list[str] = []  # "with ..." clauses
    after: list[str] = []  # other trailing phrases
    fill = named.get("fill")
    pattern = named.get("pattern")
    if fill is not None:
        before.append(fill)
    if pattern is not None:
        if pattern in _PATTERN_NOUN and not coin(0.5):
            withs.append(_PATTERN_NOUN[pattern])
        else:
            adj = pick(_PATTERN_ADJ[pattern])
            if fill is not None and pattern != "solid" and coin(0.5):
                before.append(adj)  # "a red striped star"
            else:
                before.insert(0, adj)  # "a striped red star", "a solid red star"
    outline = named.get("outline")
    if outline is not None:
        if coin(0.3):
            after.append(f"outlined in {outline}")
        else:
            withs.append(f"{_article(outline)} {outline} outline")
    if "background" in named:
        bg = named["background"]
        where = pick(("on", "against", "in front of"))
        after.append(f"{where} {_article(bg)} {bg} background")

    head = " ".join([*before, noun])
    text = f"{_article(head)} {head}"
    if withs:
        text += " with " + " and ".join(withs)
    if after:
        text += " " + " ".join(after)
    return f"{prefix} {text}" if prefix else text


def caption(
    concept: Concept,
    background: str,
    rng: random.Random | np.random.Generator,
    name_prob: Mapping[str, float] | None = None,
) -> CaptionSpec:
    """A random caption of ``concept`` on ``background`` naming a random subset of the attributes.

    Each attribute is named independently with probability ``name_prob[attribute]`` (default
    :data:`DEFAULT_NAME_PROB`: shape 0.7, the others 0.5); an object with nothing named is an
    "object", a "shape" or a "thing". ``rng`` is a :class:`random.Random` or a numpy
    ``Generator``; the same generator state gives the same caption.
    """
    probs = {**DEFAULT_NAME_PROB, **(name_prob or {})}
    values = {**concept.attributes(), "background": background}
    _check_named(values)
    named = {name: values[name] for name in ATTRIBUTES if _rand(rng) < probs[name]}
    prefix = _pick(rng, PREFIXES)
    return CaptionSpec(text=_phrase(named, rng, prefix), named=named)


def prompt_for(named: Mapping[str, str], prefix: str = "a photo of") -> str:
    """A canonical caption naming exactly the attributes in ``named`` and no others.

    ``{"shape": "star", "background": "teal"}`` -> ``"a photo of a star on a teal background"``;
    the general form is ``<prefix> a [solid] [fill] <shape|object> [with <stripes|dots|checks>]
    [and a <outline> outline] [on a <background> background]``.
    """
    return _phrase(_check_named(named), None, prefix)


def full_caption(concept: Concept, background: str, prefix: str = "a photo of") -> str:
    """The canonical caption naming every attribute of ``concept`` and the ``background``."""
    return prompt_for({**concept.attributes(), "background": background}, prefix=prefix)


def vocabulary_texts(n_captions: int = 2000) -> list[str]:
    """Texts that together contain every word a toy caption can use: many random captions (of
    every concept, so every template word appears), every surface word, prefix and generic noun.
    Tokenize them to find the rows of a token table that toy training ever touches."""
    from oneword.toy.render import BACKGROUNDS, all_concepts

    rng = random.Random("caption-vocabulary")
    concepts = all_concepts()
    texts = sorted(
        {caption(rng.choice(concepts), rng.choice(BACKGROUNDS), rng).text for _ in range(n_captions)}
    )
    texts += [w for forms in SURFACE_FORMS.values() for ws in forms.values() for w in ws]
    return texts + [p for p in PREFIXES if p] + list(GENERIC_NOUNS)
