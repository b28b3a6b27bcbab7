"""The paper's two scores in a CLIP space, and their oracle counterparts in the toy world.

- reconstruction: mean cosine similarity between generated images and the concept's reference
  images (every pair);
- editability: mean cosine similarity between each image generated from an edit prompt and that
  prompt's text with the pseudo-word removed;
- the upper line of reconstruction: reference images against each other (distinct pairs).

Inputs are feature matrices ``[n, d]``; they are L2-normalised here, so any encoder output works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """``[n, m]`` cosine similarities between the rows of ``a`` and of ``b``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [n, d] and [m, d] features, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_similarity(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity over every (row of ``a``, row of ``b``) pair."""
    return float(cosine_matrix(a, b).mean())


def mean_pairwise_similarity(a: Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows (needs at least two rows)."""
    n = a.shape[0]
    if n < 2:
        raise ValueError("need at least two feature rows for pairwise similarity")
    sims = cosine_matrix(a, a)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def paired_similarity(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of row ``i`` of ``a`` with row ``i`` of ``b``."""
    if a.shape != b.shape:
        raise ValueError(
            f"paired features must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def attribute_share(predictions: Sequence[Mapping[str, str]], expected: Mapping[str, str]) -> float:
    """Mean over images of the share of ``expected`` attributes the oracle found (reconstruction)."""
    if not predictions or not expected:
        raise ValueError("need predictions and at least one expected attribute")
    hits = [sum(p.get(k) == v for k, v in expected.items()) / len(expected) for p in predictions]
    return sum(hits) / len(hits)


def honoured_share(predictions: Sequence[Mapping[str, str]], expected: Sequence[Mapping[str, str]]) -> float:
    """Share of images whose predicted attributes include everything their prompt asked for."""
    if len(predictions) != len(expected) or not predictions:
        raise ValueError("need one expectation per prediction")
    ok = [all(p.get(k) == v for k, v in e.items()) for p, e in zip(predictions, expected)]
    return sum(ok) / len(ok)
