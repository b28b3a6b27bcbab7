"""A caller's words inside prompts, applied per request as prompt embeddings.

The model's tokenizer never learns a caller's token. Each prompt is rewritten so that the k-th
distinct word it uses reads the internal placeholder ``<ow-use-k-n>`` (n: the word's vector
count; added to the model once, by the worker that owns it), and every image's row of
``batch_vectors`` holds that word's vectors at those rows. Two callers' words with the same token
never meet: they live in different rows of the batch, and nothing is loaded or unloaded per
request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from oneword.models import FrozenLDM, TextConditioning

INTERNAL_PREFIX = "<ow-"


def use_token(k: int, num_vectors: int) -> str:
    return f"{INTERNAL_PREFIX}use-{k}-{num_vectors}>"


def words_in(text: str, tokens: Sequence[str]) -> list[str]:
    """The ``tokens`` that occur in ``text``, matched as a tokenizer matches added tokens: ignoring
    case, longest first, anywhere in the text."""
    if not tokens:
        return []
    names = sorted(set(tokens), key=len, reverse=True)
    by_lower = {t.lower(): t for t in names}
    found = re.findall("|".join(map(re.escape, names)), text, flags=re.IGNORECASE)
    return list(dict.fromkeys(by_lower[f.lower()] for f in found))


def bind(text: str, words: Mapping[str, Sequence[torch.Tensor]]) -> tuple[str, dict[str, list[torch.Tensor]]]:
    """``text`` with each of ``words`` (token -> vectors per text encoder) that it uses replaced by
    an internal placeholder, and those placeholders' vectors."""
    used = words_in(text, list(words))
    if not used:
        return text, {}
    internal = {t: use_token(k, int(words[t][0].shape[0])) for k, t in enumerate(used)}
    by_lower = {t.lower(): t for t in used}
    pattern = "|".join(map(re.escape, sorted(used, key=len, reverse=True)))
    rewritten = re.sub(pattern, lambda m: internal[by_lower[m.group(0).lower()]], text, flags=re.IGNORECASE)
    return rewritten, {internal[t]: list(words[t]) for t in used}


def _ensure(model: FrozenLDM, tokens: Sequence[str]) -> None:
    for token in tokens:
        if token not in model.placeholder_tokens:
            n = int(token.rstrip(">").rsplit("-", 1)[1])
            model.add_placeholder(token, [torch.zeros(n, w) for w in model.widths])


def condition(
    model: FrozenLDM, texts: Sequence[str], words: Sequence[Mapping[str, Sequence[torch.Tensor]]]
) -> TextConditioning:
    """Encode ``texts[i]`` with ``words[i]`` (its caller's words) applied to it alone."""
    bound = [bind(t, w) for t, w in zip(texts, words, strict=True)]
    _ensure(model, sorted({tok for _, table in bound for tok in table}))
    prompts = [p for p, _ in bound]
    if not any(table for _, table in bound):
        return model.encode_text(prompts)
    return model.encode_text(prompts, batch_vectors=model.placeholder_tables([table for _, table in bound]))


def condition_negative(
    model: FrozenLDM, texts: Sequence[str], words: Sequence[Mapping[str, Sequence[torch.Tensor]]]
) -> TextConditioning:
    """The unconditional side of guidance per image, as the stock pipeline makes it: SDXL's
    config (``force_zeros_for_empty_prompt``) takes zeros for an empty negative prompt."""
    cond = condition(model, texts, words)
    if not model.pipeline.config.get("force_zeros_for_empty_prompt", False):
        return cond
    empty = torch.tensor([not t for t in texts], device=cond.hidden_states.device)
    states = cond.hidden_states.masked_fill(empty[:, None, None], 0)
    pooled = None if cond.pooled is None else cond.pooled.masked_fill(empty[:, None], 0)
    return TextConditioning(states, pooled)
