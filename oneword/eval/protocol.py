"""The evaluation protocol: which prompts are sampled, how, and how the samples are scored.

Gal et al. (2022, section 5) generate 64 samples with 50 DDIM steps from "a photo of S*" for
reconstruction, and 64 samples per edit prompt (new backgrounds, styles, compositions) for
editability. :data:`PRESETS` holds that set-up (``paper``, the default for real checkpoints) and a
smaller one for CPU runs (``cpu``: 8 samples, 25 steps; the default for the toy world and the
miniature test models). Seeds are fixed, so every method is scored on the same noise.

In the toy world the attribute oracle adds exact scores: ``recon_oracle`` is the share of the
concept's four attributes (shape, fill, pattern, outline) found in "a photo of S*" samples,
``edit_oracle`` the share of "a photo of S* on a <colour> background" samples showing that
background, and ``identity_oracle`` the share of the concept's attributes kept in those edits.
Background edits never contend with the word, so the toy world also edits the concept itself
(:func:`toy_attribute_edits`: "a photo of a dotted S*", "a photo of a blue S*", "a photo of S*
with a gold outline", each naming a value other than the concept's own): ``attr_edit_oracle`` is
the share of those samples showing the asked-for value while keeping the rest of the concept, and
``attr_edit_clip`` their CLIP editability (as ``edit_clip``: each sample against its prompt's text
without the word). A word that reconstructs the concept by overriding what the prompt says scores
low here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from oneword.data.concepts import ConceptRef, load_concept  # noqa: F401 (the protocol's concepts)
from oneword.eval.metrics import (
    attribute_share,
    honoured_share,
    mean_pairwise_similarity,
    mean_similarity,
    paired_similarity,
)
from oneword.eval.space import ClipSpace
from oneword.models import FrozenLDM
from oneword.sampling import SampleSettings, generate_images

RECONSTRUCTION_PROMPT = "a photo of {}"

#: Edit prompts for real checkpoints, in the paper's three kinds.
EDIT_PROMPTS: tuple[str, ...] = (
    # new backgrounds
    "a photo of {} on the beach",
    "a photo of {} in the jungle",
    "a photo of {} in the snow",
    "a photo of {} with the Eiffel Tower in the background",
    # styles
    "an oil painting of {}",
    "a watercolor painting of {}",
    "a pencil sketch of {}",
    "a painting of {} in the style of Van Gogh",
    # compositions
    "a photo of {} next to a cup of coffee",
    "a photo of {} on a wooden table with a plant",
    "a photo of two {} side by side",
    "a photo of a cat playing with {}",
)


def toy_edit_prompts() -> list[tuple[str, dict[str, str]]]:
    """The toy world's edits: the concept on each background, with the attribute that must show."""
    from oneword.toy.render import BACKGROUNDS

    return [(f"a photo of {{}} on a {bg} background", {"background": bg}) for bg in BACKGROUNDS]


def toy_attribute_edits(attributes: Mapping[str, str]) -> list[tuple[str, dict[str, str]]]:
    """Edits that contend with a toy concept itself: another pattern, another fill and another
    outline than its own (the next value of each vocabulary), each with the rest of the concept
    expected unchanged."""
    from oneword.toy.render import CONCEPT_ATTRIBUTES, VOCAB

    def other(name: str) -> str:
        values = VOCAB[name]
        return values[(values.index(attributes[name]) + 1) % len(values)]

    keep = {k: attributes[k] for k in CONCEPT_ATTRIBUTES if k in attributes}
    pattern, fill, outline = other("pattern"), other("fill"), other("outline")
    return [
        (f"a photo of a {_PATTERN_WORD[pattern]} {{}}", {**keep, "pattern": pattern}),
        (f"a photo of {'an' if fill[0] in 'aeiou' else 'a'} {fill} {{}}", {**keep, "fill": fill}),
        (f"a photo of {{}} with a {outline} outline", {**keep, "outline": outline}),
    ]


def toy_caption(attributes: Mapping[str, str]) -> str:
    """The paper's human-caption baseline in the toy world: the concept's full description, in the
    words the toy text model learned, without its article so that it takes the word's place in
    every prompt ("a photo of a dotted {}" -> "a photo of a dotted red star with stripes and a
    black outline")."""
    from oneword.toy.captions import prompt_for
    from oneword.toy.render import CONCEPT_ATTRIBUTES

    text = prompt_for({k: attributes[k] for k in CONCEPT_ATTRIBUTES}, prefix="")
    return text.split(" ", 1)[1]  # "a red star ..." -> "red star ..."


#: Prompts of :func:`toy_attribute_edits` per concept.
ATTRIBUTE_EDITS = 3

#: The caption word of each toy pattern as an adjective.
_PATTERN_WORD = {"solid": "plain", "stripes": "striped", "dots": "dotted", "checks": "checked"}


@dataclass
class EvalSettings:
    """How samples are drawn for scoring."""

    samples: int = 64
    """Samples per prompt (the paper: 64)."""
    steps: int = 50
    """Denoising steps (the paper: 50 DDIM steps)."""
    guidance: float = 7.5
    """Classifier-free guidance scale."""
    seed: int = 0
    """Sample ``i`` of every prompt uses seed ``seed + i``."""
    batch: int = 4
    """Samples per pipeline call; the samples do not depend on it (each has its own seeded
    generator), only the memory does."""
    edit_prompts: list[str] = field(default_factory=list)
    """Edit prompts with ``{}`` for the pseudo-word; default: :data:`EDIT_PROMPTS` (real models)
    or the toy backgrounds (toy model)."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError("samples, steps and batch must be at least 1")
        bad = [p for p in self.edit_prompts if "{}" not in p]
        if bad:
            raise ValueError(f"edit prompts need {{}} where the pseudo-word goes: {bad[0]!r}")

    def sampling(self) -> SampleSettings:
        return SampleSettings(
            steps=self.steps,
            guidance=self.guidance,
            scheduler="ddim",
            seeds=list(range(self.seed, self.seed + self.samples)),
            batch=self.batch,
        )


PRESETS: dict[str, EvalSettings] = {
    "paper": EvalSettings(samples=64, steps=50, guidance=7.5),
    "cpu": EvalSettings(samples=8, steps=25, guidance=5.0),
}


def default_preset(model: FrozenLDM) -> str:
    """``cpu`` for the toy world and the miniature models, ``paper`` for real checkpoints."""
    return "cpu" if model.family == "toy" or model.source.startswith("tiny-") else "paper"


@dataclass
class Scores:
    """Scores of one pseudo-word (or reference point) on one concept; None where not measured."""

    recon_clip: float | None = None
    edit_clip: float | None = None
    recon_oracle: float | None = None
    edit_oracle: float | None = None
    identity_oracle: float | None = None
    attr_edit_clip: float | None = None
    attr_edit_oracle: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(Scores)]


def edit_specs(model: FrozenLDM, settings: EvalSettings) -> list[tuple[str, dict[str, str]]]:
    """``(prompt, expected attributes)`` per edit prompt (expectations only in the toy world)."""
    if settings.edit_prompts:
        return [(p, {}) for p in settings.edit_prompts]
    if model.family == "toy":
        return toy_edit_prompts()
    return [(p, {}) for p in EDIT_PROMPTS]


def without_word(prompt: str) -> str:
    """The edit prompt's text with the pseudo-word removed (what editability compares against)."""
    return " ".join(prompt.replace("{}", "").split())


class Scorer:
    """Scores words on concepts with fixed samples; caches the reference images' features."""

    def __init__(
        self, model: FrozenLDM, settings: EvalSettings, space: ClipSpace | None = None, oracle=None
    ) -> None:
        if space is None and oracle is None:
            raise ValueError("give a CLIP space, an oracle, or both")
        self.model, self.settings, self.space, self.oracle = model, settings, space, oracle
        self.edits = edit_specs(model, settings)
        self._ref_cache: dict[tuple[str, ...], object] = {}
        self._text_cache = None
        self._attr_texts: dict[tuple[str, ...], object] = {}
        self.attribute_edits = model.family == "toy" and not settings.edit_prompts
        """Score the toy world's attribute edits too (:func:`toy_attribute_edits`)."""
        self.bar = None
        """A progress bar (tqdm) to advance by each prompt's samples, or ``None``."""

    @property
    def prompts_per_score(self) -> int:
        """Prompts sampled by one :meth:`score` of a concept with attributes (for progress bars)."""
        return 1 + len(self.edits) + (ATTRIBUTE_EDITS if self.attribute_edits else 0)

    def _advance(self, images: int) -> None:
        if self.bar is not None:
            self.bar.update(images)

    def _ref_features(self, concept: ConceptRef):
        key = tuple(im.sha256 for im in concept.images)  # by content: an id() may be reused
        if key not in self._ref_cache:
            self._ref_cache[key] = self.space.images([im.image for im in concept.images])
        return self._ref_cache[key]

    def score(self, word: str, concept: ConceptRef) -> Scores:
        """Sample "a photo of <word>" and every edit prompt with ``word``, and score them."""
        sampling = self.settings.sampling()
        n = len(sampling.seeds)
        recon = generate_images(self.model, [RECONSTRUCTION_PROMPT.format(word)], sampling, self._advance)
        edits = generate_images(self.model, [p.format(word) for p, _ in self.edits], sampling, self._advance)
        s = Scores()
        if self.space is not None:
            s.recon_clip = mean_similarity(self.space.images(recon), self._ref_features(concept))
            if self._text_cache is None:
                texts = self.space.texts([without_word(p) for p, _ in self.edits])
                self._text_cache = texts.repeat_interleave(n, dim=0)
            s.edit_clip = paired_similarity(self.space.images(edits), self._text_cache)
        if self.oracle is not None and concept.attributes:
            s.recon_oracle = attribute_share(self.oracle.predict(recon), concept.attributes)
            expected = [want for _, want in self.edits for _ in range(n)]
            if all(expected):
                preds = self.oracle.predict(edits)
                s.edit_oracle = honoured_share(preds, expected)
                s.identity_oracle = attribute_share(preds, concept.attributes)
        if self.attribute_edits and concept.attributes:
            self._score_attribute_edits(word, concept, s)
        return s

    def _score_attribute_edits(self, word: str, concept: ConceptRef, s: Scores) -> None:
        specs = toy_attribute_edits(concept.attributes)
        sampling = self.settings.sampling()
        n = len(sampling.seeds)
        images = generate_images(self.model, [p.format(word) for p, _ in specs], sampling, self._advance)
        if self.oracle is not None:
            preds = self.oracle.predict(images)
            s.attr_edit_oracle = honoured_share(preds, [want for _, want in specs for _ in range(n)])
        if self.space is not None:
            key = tuple(p for p, _ in specs)
            if key not in self._attr_texts:
                texts = self.space.texts([without_word(p) for p in key])
                self._attr_texts[key] = texts.repeat_interleave(n, dim=0)
            s.attr_edit_clip = paired_similarity(self.space.images(images), self._attr_texts[key])

    def reference_rows(self, concept: ConceptRef) -> list[dict]:
        """The reference points of a concept as result rows (``steps`` None): the initializer
        word alone, the real images against each other and, in the toy world, the human-caption
        baseline (:func:`toy_caption`: the concept described in words, scored as if it were the
        word)."""
        pairs = [
            ("initializer word", self.score(concept.init, concept)),
            ("real images", self.real_images(concept)),
        ]
        if self.model.family == "toy" and concept.attributes:
            pairs.append(("human caption", self.score(toy_caption(concept.attributes), concept)))
        return [
            {"method": name, "concept": concept.name, "steps": None, "seconds": 0.0, **s.as_dict()}
            for name, s in pairs
        ]

    def real_images(self, concept: ConceptRef) -> Scores:
        """The upper line: the reference images scored as if they were samples."""
        s = Scores()
        if self.space is not None and len(concept.images) > 1:
            s.recon_clip = mean_pairwise_similarity(self._ref_features(concept))
        if self.oracle is not None and concept.attributes:
            s.recon_oracle = attribute_share(
                self.oracle.predict([im.image for im in concept.images]), concept.attributes
            )
        return s
