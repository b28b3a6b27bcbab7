"""Initializer words without asking (``--init auto``): zero-shot classification of a concept's
reference images against a candidate vocabulary, in two stages.

1. **CLIP shortlist.** The encoder's own image tower and its text tower score every candidate:
   each candidate is read through a few prompt templates (their mean text feature, as CLIP's
   zero-shot classifiers do), a concept's feature is the mean of its images' features, and the
   probabilities are a softmax of 100 x the cosine similarities (CLIP's logit scale). The
   :data:`SHORTLIST` most probable candidates go on.
2. **Diffusion rerank** (Li et al. 2023, "Your diffusion model is secretly a zero-shot
   classifier"): the frozen model itself denoises the reference images' latents under "a photo
   of a <candidate>" with the same :data:`DRAWS` noise draws and timesteps for every candidate;
   the candidate with the lowest denoising loss explains the images best *for this model*, which
   is what an initializer of textual inversion is for. Its ``win_rate`` is the share of draws in
   which it beats the runner-up (paired): the confidence of the choice. A faster variant
   (``survivors``, the service's) scores every word on half of the draws and only the best few on
   the rest.

The candidates are the toy world's shape words for the toy model; for real models the ImageNet
class names that open_clip ships (``open_clip.IMAGENET_CLASSNAMES``) that are one word and one
token in every tokenizer of the model, or a user's word list (``--init-vocab FILE``, one word per
line).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from oneword.errors import InputError

logger = logging.getLogger("oneword")

AUTO = "auto"
#: Candidates the CLIP stage passes to the diffusion rerank.
SHORTLIST = 8
#: Noise draws (each with its own timestep, spread over the schedule) of the diffusion rerank.
DRAWS = 16
#: Below this win rate over the runner-up the choice is reported as a warning (10 of 16 draws;
#: on 84 held-out toy concepts every right choice won at least 11).
LOW_CONFIDENCE = 0.625
#: CLIP's logit scale (its learned temperature is 100 for OpenAI's models).
LOGIT_SCALE = 100.0
_TEMPLATES = ("a photo of a {}.", "a close-up photo of a {}.", "a photo of the {}.", "a good photo of a {}.")


@dataclass(frozen=True)
class InitChoice:
    """The initializer word of a concept and how it was chosen."""

    word: str
    how: str
    """``given`` (``--init``, a manifest or concept.json) or ``auto`` (zero-shot)."""
    win_rate: float | None = None
    """``auto``: the share of the rerank's noise draws in which ``word`` denoised the images
    better than the runner-up."""
    clip_probability: float | None = None
    """``auto``: CLIP's zero-shot probability of ``word`` among all candidates."""
    runner_up: str | None = None
    candidates: int = 0

    @property
    def low_confidence(self) -> bool:
        return self.win_rate is not None and self.win_rate < LOW_CONFIDENCE

    def metadata(self) -> dict[str, str]:
        """Header entries for the word's files (``oneword.init`` itself is written with the word)."""
        meta = {"oneword.init_how": self.how}
        if self.how == AUTO:
            meta.update(
                {
                    "oneword.init_win_rate": f"{self.win_rate:.4f}",
                    "oneword.init_clip_probability": f"{self.clip_probability:.4f}",
                    "oneword.init_runner_up": str(self.runner_up),
                }
            )
        return meta

    def describe(self) -> str:
        if self.how != AUTO:
            return f"{self.word!r} (given)"
        return (
            f"{self.word!r} (auto among {self.candidates}: beat {self.runner_up!r} in "
            f"{self.win_rate:.0%} of draws; CLIP p = {self.clip_probability:.2f})"
        )


def read_vocab(path: str | Path) -> list[str]:
    """Words of a ``--init-vocab`` file: one per line; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the word list {path}: {err}") from None
    words = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    words = list(dict.fromkeys(w for w in words if w))
    if not words:
        raise InputError(f"the word list {path} holds no words")
    return words


def single_token_words(model, words: Sequence[str]) -> list[str]:
    """The ``words`` that are one word and one token in every tokenizer of ``model``."""
    keep = []
    for word in words:
        if " " in word.strip() or not word.strip():
            continue
        if all(len(tok(word, add_special_tokens=False).input_ids) == 1 for tok in model.tokenizers):
            keep.append(word.strip())
    return keep


def candidate_words(model, vocab: Sequence[str] | None = None) -> list[str]:
    """The candidates for ``model``: ``vocab`` if given, else the toy shapes (toy family) or the
    ImageNet class names; only words that are a single token of every tokenizer."""
    if vocab is None:
        if model.family == "toy":
            from oneword.toy.render import SHAPES

            vocab = list(SHAPES)
        else:
            import open_clip

            vocab = [name.lower() for name in open_clip.IMAGENET_CLASSNAMES]
    words = single_token_words(model, list(dict.fromkeys(vocab)))
    if len(words) < 2:
        raise InputError(
            f"--init auto needs at least two candidate words that are single tokens of {model.source}; "
            f"{len(words)} of {len(vocab)} are: give another --init-vocab, or --init WORD"
        )
    return words


def _prompts(word: str, family: str) -> list[str]:
    if family == "toy":  # the toy CLIP reads toy captions only
        from oneword.toy.captions import prompt_for

        return [prompt_for({"shape": word})]
    return [t.format(word) for t in _TEMPLATES]


@torch.no_grad()
def text_features(space, words: Sequence[str], family: str) -> torch.Tensor:
    """``[len(words), D]`` unit features: per word, the mean over its prompt templates."""
    per_word = len(_prompts(words[0], family))
    texts = [p for w in words for p in _prompts(w, family)]
    feats = F.normalize(space.texts(texts).float(), dim=-1).view(len(words), per_word, -1).mean(1)
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def clip_probabilities(
    space,
    image_sets: Sequence[Sequence[Image.Image]],
    words: Sequence[str],
    family: str,
    cache: dict | None = None,
):
    """``[concepts, words]`` zero-shot probabilities (one pass over all images). ``cache`` keeps
    the words' text features between calls with the same space and words (``ti batch``'s waves)."""
    key = ("text_features", id(space), tuple(words), family)
    classes = cache.get(key) if cache is not None else None
    if classes is None:
        classes = text_features(space, words, family)
        if cache is not None:
            cache[key] = classes
    flat = F.normalize(space.images([im for s in image_sets for im in s]).float(), dim=-1)
    rows, i = [], 0
    for images in image_sets:
        concept = F.normalize(flat[i : i + len(images)].mean(0), dim=-1)
        i += len(images)
        rows.append(torch.softmax(LOGIT_SCALE * concept @ classes.T, dim=-1))
    return torch.stack(rows)


def _conditioning(model, prompts: Sequence[str], cache: dict | None):
    """The prompts' text conditioning; ``cache`` keeps each prompt's row between calls (in CPU
    memory). A cache belongs to one model, and its prompts name no placeholder token of it (the
    candidates' prompts are plain words)."""
    from oneword.models import TextConditioning

    if cache is None:
        return model.encode_text(list(prompts))
    known = cache.setdefault(("rerank_text", id(model)), {})
    todo = [p for p in dict.fromkeys(prompts) if p not in known]
    if todo:
        text = model.encode_text(todo)
        for i, prompt in enumerate(todo):
            pooled = None if text.pooled is None else text.pooled[i].cpu()
            known[prompt] = (text.hidden_states[i].cpu(), pooled)
    rows = [known[p] for p in prompts]
    pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows]).to(model.device)
    return TextConditioning(torch.stack([r[0] for r in rows]).to(model.device), pooled)


@torch.no_grad()
def denoising_losses(
    model,
    images: Sequence[Image.Image],
    words: Sequence[str],
    draws: int = DRAWS,
    chunk: int | None = None,
    survivors: int | None = None,
    cache: dict | None = None,
) -> Tensor:
    """``[words, draws]``: the model's denoising loss on ``images`` under each word's prompt, with
    the same latents, noise and timesteps for every word (seeded: the same call gives the same
    losses). One concept of :func:`rerank_losses`, which explains the other arguments."""
    return rerank_losses(model, [images], [words], draws, chunk, survivors, cache)[0]


def samples_per_call(resolution: int) -> int:
    """Rerank samples per UNet call: 8 images' worth of the encoder's passes (64 at 512 px and
    above, up to 512 below, where a call is mostly fixed cost)."""
    from oneword.encoder.unet_features import pass_size

    return 8 * pass_size(resolution)


@torch.no_grad()
def rerank_losses(
    model,
    image_sets: Sequence[Sequence[Image.Image]],
    word_lists: Sequence[Sequence[str]],
    draws: int = DRAWS,
    chunk: int | None = None,
    survivors: int | None = None,
    cache: dict | None = None,
) -> list[Tensor]:
    """Per concept, ``[words, draws]`` denoising losses of its images under each of its words'
    prompts. A concept's draws (latents, noise, timesteps) are seeded and the same for each of
    its words, so its losses do not depend on the other concepts, which only share the UNet calls
    (up to ``chunk`` samples each; default :func:`samples_per_call`): exactly so on a CPU, to the
    last bits of a batched kernel elsewhere.

    With ``survivors`` (at least 2), the draws run in two halves, each spread over the schedule
    (the even draws, then the odd ones): every word gets the first half, and only each concept's
    ``survivors`` words with the lowest mean loss there get the second; the others'
    second-half losses are ``inf``. A survivor's row is the one the full run gives (as above). ``cache``
    keeps the prompts' text conditioning between calls."""
    from oneword.encoder.unet_features import pass_size
    from oneword.inversion.bank import AugmentConfig, build_bank
    from oneword.inversion.loss import denoising_loss
    from oneword.models import TextConditioning

    if survivors is not None and survivors < 2:
        raise ValueError("the rerank needs at least 2 survivors to compare")
    chunk = chunk or samples_per_call(model.resolution)
    steps = model.pipeline.scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0.05 * steps, 0.95 * steps, draws).long()  # spread over the schedule
    # one VAE pass for every concept: without augmentation an image's view is its centre crop
    aug = AugmentConfig(resolution=model.resolution, flip_p=0.0)
    flat = [im for images in image_sets for im in images]
    bank = build_bank(model, flat, aug, seed=0, chunk=pass_size(model.resolution))
    every = (bank.mean - bank.shift_factor) * bank.scaling_factor
    draw_sets, texts, start = [], [], 0
    for images, words in zip(image_sets, word_lists, strict=True):
        latents, start = every[start : start + len(images)], start + len(images)
        latents = latents[torch.arange(draws) % len(latents)].to(model.device, model.dtype)
        noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(0))
        draw_sets.append((latents, noise))
        texts.append(_conditioning(model, [_prompts(w, model.family)[0] for w in words], cache))

    def run(pairs: list[tuple[int, int]], cols: Tensor) -> list[Tensor]:
        """The losses of each (concept, word) pair on draws ``cols``."""
        n, out = len(cols), []
        per_call = max(1, chunk // n)  # pairs per UNet call
        for i in range(0, len(pairs), per_call):
            part = pairs[i : i + per_call]
            latents = torch.cat([draw_sets[c][0][cols] for c, _ in part])
            noise = torch.cat([draw_sets[c][1][cols] for c, _ in part])
            hidden = torch.cat([texts[c].hidden_states[w : w + 1].expand(n, -1, -1) for c, w in part])
            pooled = None
            if texts[0].pooled is not None:
                pooled = torch.cat([texts[c].pooled[w : w + 1].expand(n, -1) for c, w in part])
            losses = denoising_loss(
                model,
                latents,
                TextConditioning(hidden, pooled),
                None,
                timesteps[cols].repeat(len(part)),
                noise,
            )
            out += list(losses.float().cpu().view(len(part), n))
        return out

    out = [torch.full((len(words), draws), float("inf")) for words in word_lists]
    pairs = [(c, w) for c, words in enumerate(word_lists) for w in range(len(words))]
    halve = survivors is not None and draws >= 2 and any(survivors < len(ws) for ws in word_lists)
    first = torch.arange(0, draws, 2) if halve else torch.arange(draws)
    for (c, w), row in zip(pairs, run(pairs, first)):
        out[c][w, first] = row
    if halve:
        second = torch.arange(1, draws, 2)
        kept = [(c, int(w)) for c in range(len(out)) for w in out[c][:, first].mean(1).argsort()[:survivors]]
        kept.sort()
        for (c, w), row in zip(kept, run(kept, second)):
            out[c][w, second] = row
    return out


def choose_inits(
    space,
    model,
    image_sets: Sequence[Sequence[Image.Image]],
    words: Sequence[str],
    shortlist: int = SHORTLIST,
    draws: int = DRAWS,
    cache: dict | None = None,
    survivors: int | None = None,
) -> list[InitChoice]:
    """The initializer of each concept among ``words``: CLIP's ``shortlist``, reranked by ``model``
    (``survivors``: see :func:`rerank_losses`)."""
    if len(words) < 2:
        raise ValueError("zero-shot needs at least two candidate words")
    probs = clip_probabilities(space, image_sets, words, model.family, cache)
    shorts = [torch.topk(p, min(max(2, shortlist), len(words))).indices.tolist() for p in probs]
    per_concept = rerank_losses(
        model, image_sets, [[words[k] for k in short] for short in shorts], draws, None, survivors, cache
    )
    choices = []
    for p, short, losses in zip(probs, shorts, per_concept):
        order = losses.mean(1).argsort().tolist()
        best, second = order[0], order[1]
        win = float((losses[best] < losses[second]).float().mean())
        word = words[short[best]]
        choices.append(InitChoice(word, AUTO, win, float(p[short[best]]), words[short[second]], len(words)))
    return choices


def resolve_inits(
    space,
    model,
    image_sets: Sequence[Sequence[Image.Image]],
    given: Sequence[str | None],
    vocab=None,
    names: Sequence[str] | None = None,
    cache: dict | None = None,
    draws: int = DRAWS,
    survivors: int | None = None,
) -> list[InitChoice]:
    """Each concept's initializer: its ``given`` word, or (where ``None`` or ``auto``) the
    zero-shot choice (``draws`` noise draws per shortlisted word, the second half of them for
    ``survivors`` words only when given); a low-confidence choice is logged as a warning."""
    todo = [i for i, w in enumerate(given) if w is None or w == AUTO]
    out: list[InitChoice | None] = [
        None if i in todo else InitChoice(str(given[i]), "given") for i in range(len(given))
    ]
    if todo:
        key = ("candidates", id(model), tuple(vocab) if vocab is not None else None)
        words = cache.get(key) if cache is not None else None
        if words is None:
            words = candidate_words(model, vocab)
            if cache is not None:
                cache[key] = words
        chosen = choose_inits(
            space, model, [image_sets[i] for i in todo], words, draws=draws, cache=cache, survivors=survivors
        )
        for i, choice in zip(todo, chosen):
            out[i] = choice
            if choice.low_confidence:
                logger.warning(
                    "%s: initializer %s is a low-confidence guess; pass --init to choose",
                    names[i] if names else f"concept {i + 1}",
                    choice.describe(),
                )
    return [c for c in out if c is not None]
