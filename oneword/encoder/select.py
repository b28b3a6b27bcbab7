"""Keep the better of the encoder's prediction and its refinement: a round-trip check.

The refinement minimizes the denoising loss, and on some concepts that loss favours a word whose
samples lose an attribute the prediction had (in the toy world purple-circle-dots-black: 0.906 of
the oracle's attributes alone, 0.781 after 200 steps; docs/benchmarks.md). The encoder itself reads
attributes from images, so it can judge: draw a few samples of "a photo of <word>" with each
candidate word, let the encoder predict a word from those samples, and keep the candidate whose round
trip lands closest to its prediction from the reference images. The samples use their own seeds
(from :data:`SELECT_SEED`), not the evaluation's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from PIL import Image

from oneword.eval.choice import PREDICTION, REFINED, Choice, candidate_name  # noqa: F401 (used here and by callers)
from oneword.sampling import SampleSettings, generate_images

ROUND_TRIP_PROMPT = "a photo of {}"
SELECT_SEED = 1000


def select_settings(samples: int, steps: int = 25, guidance: float = 5.0, batch: int = 4) -> SampleSettings:
    """``samples`` fresh samples (seeds from :data:`SELECT_SEED`) for the round trip, ``batch`` per
    pipeline call."""
    if samples < 1:
        raise ValueError(f"the round trip needs at least one sample, got {samples}")
    return SampleSettings(
        steps=steps, guidance=guidance, seeds=list(range(SELECT_SEED, SELECT_SEED + samples)), batch=batch
    )


def relative_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Squared distance of two words in units of ``b``'s squared norm, summed over text encoders
    (so SDXL's two encoders weigh alike)."""
    total = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.float().cpu(), y.float().cpu()
        total += float(((x - y) ** 2).sum() / (y**2).sum().clamp_min(1e-12))
    return total


@torch.no_grad()
def round_trip_distance(
    encoder, model, token: str, init: str, target: Sequence[torch.Tensor], settings: SampleSettings
) -> float:
    """Sample ``token`` as it is now, predict a word from the samples, and return its
    :func:`relative_distance` to ``target`` (the prediction from the reference images)."""
    from oneword.encoder.model import predict_embeddings

    images: list[Image.Image] = generate_images(model, [ROUND_TRIP_PROMPT.format(token)], settings)
    return relative_distance(predict_embeddings(encoder, model, [images], [init])[0], target)


def choose_word(
    encoder,
    model,
    token: str,
    init: str,
    target: Sequence[torch.Tensor],
    candidates: Mapping[str, Sequence[torch.Tensor]],
    settings: SampleSettings,
) -> Choice:
    """Try each candidate's vectors on ``token`` and leave the one with the smallest round-trip
    distance there (the first on ties)."""
    if not candidates:
        raise ValueError("no candidate words to choose from")
    distances, seconds = {}, {}
    for name, vectors in candidates.items():
        t0 = time.perf_counter()
        model.set_vectors(token, list(vectors))
        distances[name] = round_trip_distance(encoder, model, token, init, target, settings)
        seconds[name] = round(time.perf_counter() - t0, 3)
    kept = min(distances, key=distances.__getitem__)
    model.set_vectors(token, list(candidates[kept]))
    return Choice(kept, distances, seconds)


def keep_prediction_or_refined(
    encoder,
    model,
    token: str,
    init: str,
    prediction: Sequence[torch.Tensor],
    settings: SampleSettings,
    snapshots: Mapping[int, Sequence[torch.Tensor]] | None = None,
    top: int | None = None,
) -> Choice:
    """After a refinement from ``prediction`` to ``top`` steps: :func:`choose_word` among it, the
    refined word now on ``token`` and, when given, the words at earlier steps (``snapshots``, named
    by :func:`candidate_name`). The prediction is also the round trip's target."""
    earlier = {b: v for b, v in (snapshots or {}).items() if 0 < b and (top is None or b < top)}
    candidates = {
        PREDICTION: prediction,
        **{candidate_name(b, top): earlier[b] for b in sorted(earlier)},
        REFINED: model.vectors_of(token),
    }
    return choose_word(encoder, model, token, init, prediction, candidates, settings)


def round_trip_selector(encoder, settings: SampleSettings, among: Sequence[int] | None = None):
    """A ``select_fn`` for the curve harnesses (:class:`oneword.eval.curves.Method`): the round
    trip of :func:`choose_word` among a refinement's words at the budgets ``among`` (default: the
    prediction and the largest), aimed at the prediction, as ``ti-encode --select`` does."""

    def select(model, concept, token: str, words: Mapping[int, Sequence[torch.Tensor]]) -> Choice:
        top = max(words)
        budgets = (0, top) if among is None else among
        candidates = {candidate_name(b, top): words[b] for b in budgets}
        return choose_word(encoder, model, token, concept.init, words[0], candidates, settings)

    return select
