"""Textual inversion of many concepts at once, on one frozen model.

Each concept gets its own placeholder token and its own latent bank; every step draws
``batch_size`` views of every concept, prompts them with that concept's token, and calls the shared
:func:`~oneword.inversion.loss.denoising_loss` once on the whole stack. The objective is the *sum*
of the per-concept mean losses, so a token's gradient is exactly its single-concept gradient, and
AdamW (elementwise, no clipping here) moves each row as an independent run with the same settings
would. What batching buys is throughput: one UNet pass of ``concepts x batch_size`` samples instead
of many small ones. This is how the encoder's distillation targets are made (``ti data targets``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from oneword.errors import TrainingDivergedError
from oneword.inversion.bank import AugmentConfig, build_bank
from oneword.inversion.config import InversionConfig
from oneword.inversion.loss import denoising_loss
from oneword.inversion.templates import sample_prompts
from oneword.models import FrozenLDM


def invert_many(model: FrozenLDM, image_sets: Sequence[Sequence[Image.Image]], init_words: Sequence[str],
                cfg: InversionConfig, token_prefix: str = "<multi-", progress: bool = False
                ) -> list[list[torch.Tensor]]:
    """Invert every concept of ``image_sets`` jointly for ``cfg.steps`` steps.

    Uses ``cfg``'s batch size (per concept), learning rate, template, views, regularizer and seed;
    its ``token`` and ``init`` are ignored (each concept has its own). Adds one placeholder per
    concept to ``model``, which must have none yet (load a fresh one per call). Returns, per concept, one ``[n, width]``
    tensor per text encoder. Raises :class:`TrainingDivergedError` when the loss stops being finite.
    """
    if len(image_sets) != len(init_words) or not image_sets:
        raise ValueError("need one initializer word per concept, and at least one concept")
    if model.placeholder_tokens:
        raise ValueError("invert_many needs a model without placeholder tokens (load a fresh one)")
    aug = AugmentConfig(resolution=cfg.resolution or model.resolution, flip_p=cfg.flip_p,
                        random_crop=cfg.random_crop, views_per_image=cfg.views_per_image)
    tokens, banks, anchors = [], [], []
    for i, (images, word) in enumerate(zip(image_sets, init_words)):
        token = f"{token_prefix}{i}>"
        start = model.initializer_vectors(word, cfg.num_vectors)
        model.add_placeholder(token, start)
        tokens.append(token)
        anchors.append(start)
        banks.append(build_bank(model, list(images), aug, cfg.seed + i))
    params = model.trainable_vectors()
    anchor = [torch.cat([a[j] for a in anchors]).to(p.device) for j, p in enumerate(params)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    prompt_rng = random.Random(cfg.seed)
    b, g, n = cfg.batch_size, len(tokens), cfg.num_vectors
    for step in tqdm(range(cfg.steps), desc=f"inverting {g} concepts", disable=not progress, leave=False):
        latents = torch.cat([bank.sample(b, generator) for bank in banks]).to(model.dtype)
        prompts = [p for t in tokens for p in sample_prompts(cfg.template, t, b, prompt_rng)]
        per_sample = denoising_loss(model, latents, model.encode_text(prompts), generator)
        loss = per_sample.view(g, b).mean(1).sum()
        if cfg.reg_weight > 0:
            # per concept as in a single run: squared distance summed over width, mean over its vectors
            loss = loss + cfg.reg_weight * sum(((p - a) ** 2).sum(-1).view(g, n).mean(1).sum()
                                               for p, a in zip(params, anchor))
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"the loss became {loss.item()} at step {step + 1}; try a lower --base_lr")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [model.vectors_of(t) for t in tokens]
