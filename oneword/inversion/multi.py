"""Textual inversion of many concepts at once, on one frozen model.

Each concept has its own vectors and its own latent bank; every step draws ``batch_size`` views of
every concept and calls the shared :func:`~oneword.inversion.loss.denoising_loss` once on the whole
stack. The prompts all use one placeholder, :data:`TOKEN`, whose vectors are swapped per sample
through the text encoder's ``batch_vectors`` (the mechanism the encoder's training step uses), so
the model gains a single token however many concepts pass through it. The objective is the *sum*
of the per-concept mean losses, so a concept's gradient is exactly its single-run gradient, and
AdamW (elementwise, no clipping here) moves each concept as an independent run with the same
settings would. What batching buys is throughput: one UNet pass of ``concepts x batch_size``
samples instead of many small ones. This is how the encoder's distillation targets are made
(``ti data targets``).

A run of many concepts can take an hour on a CPU, so with ``checkpoint`` it saves its state (the
vectors, AdamW's moments, the step and both random generators) every ``save_every`` steps and at
the end, and a later call with the same inputs continues from there (step for step as an
uninterrupted run on the same device and thread count); a file written for other inputs, settings,
model weights or starts is ignored with a warning and overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from oneword.errors import InputError, TrainingDivergedError
from oneword.inversion.bank import bank_for_run
from oneword.inversion.checkpoint import TrainState, load_state, restore_prompt_rng, save_state
from oneword.inversion.config import InversionConfig
from oneword.inversion.loss import denoising_loss, grad_scaler
from oneword.inversion.templates import sample_prompts
from oneword.models import FrozenLDM
from oneword.trainstate import load_optimizer, optimizer_tensors

logger = logging.getLogger(__name__)

TOKEN = "<multi>"


def fingerprint(model: FrozenLDM, image_sets: Sequence[Sequence[Image.Image]], init_words: Sequence[str],
                cfg: InversionConfig, has_starts: bool) -> str:
    """What a saved state must match exactly to be continued: the model's name, dtype and widths, the
    images, words and settings, and whether the run has its own starts (their values and the
    model's weights are compared by :func:`_sums`, within a tolerance)."""
    h = hashlib.sha256()
    same_result = ("token", "init", "gradient_checkpointing")  # not the inversion's, or only its memory
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in same_result}
    what = [model.source, str(model.dtype), model.widths, list(init_words), settings, has_starts]
    h.update(json.dumps(what, sort_keys=True, default=str).encode())
    for images in image_sets:
        for im in images:
            h.update(f"{im.mode}{im.size}".encode())
            h.update(im.tobytes())
    return h.hexdigest()


def _sums(model: FrozenLDM, starts: Sequence[Sequence[torch.Tensor]] | None) -> dict[str, float]:
    """Sums of absolute values of the weights that a retrained model changes (the UNet's input
    convolution, each token table) and of the starts. Compared within a tolerance: an encoder's
    prediction differs in its last bits between runs (thread counts change the order of sums), and
    fp16 and fp32 copies of one model are one model."""
    weights = [model.unet.conv_in.weight, *(e.base.weight for e in model.placeholder_embeddings())]
    out = {"weights": sum(_abs_sum(w) for w in weights)}
    if starts is not None:
        out["starts"] = sum(_abs_sum(t) for start in starts for t in start)
    return out


def _abs_sum(t: torch.Tensor) -> float:
    # in slices: a float64 copy of SDXL's second token table whole would take 0.5 GB of GPU memory
    return sum(float(part.detach().abs().double().sum()) for part in t.reshape(-1).split(1 << 20))


def _resume(path: Path | None, key: str, sums: dict[str, float]) -> TrainState | None:
    if path is None or not path.is_file():
        return None
    try:
        ts = load_state(path)
        saved = json.loads(ts.meta.get("sums", "{}"))
    except (InputError, ValueError) as err:
        logger.warning("%s cannot be read (%s): starting over", path, err)
        return None
    # a state saved before the sums were (the first version of this file) is judged by its fingerprint alone
    same = ts.meta.get("fingerprint") == key and all(
        math.isclose(saved[k], v, rel_tol=1e-4) for k, v in sums.items() if k in saved)
    if not same:
        logger.warning("%s was saved for other concepts, settings, model weights or starts: starting over", path)
        return None
    return ts


def invert_many(model: FrozenLDM, image_sets: Sequence[Sequence[Image.Image]], init_words: Sequence[str],
                cfg: InversionConfig, progress: bool = False,
                starts: Sequence[Sequence[torch.Tensor]] | None = None, checkpoint: str | Path | None = None,
                save_every: int = 50) -> list[list[torch.Tensor]]:
    """Invert every concept of ``image_sets`` jointly for ``cfg.steps`` steps.

    Uses ``cfg``'s batch size (per concept), learning rate, template, views, regularizer and seed;
    its ``token`` and ``init`` are ignored (each concept has its own). ``starts`` (per concept, one
    ``[n, width]`` tensor per text encoder) continues earlier inversions instead of starting at the
    initializer words, which stay the regularizer's anchors. ``model`` may be reused
    across calls but must hold no placeholder other than :data:`TOKEN`. Returns, per concept, one
    ``[n, width]`` tensor per text encoder. Raises :class:`TrainingDivergedError` when the loss
    stops being finite. ``checkpoint`` (a ``.safetensors`` path) saves the state every
    ``save_every`` steps and at the end, and continues from it when it matches these inputs.
    """
    if len(image_sets) != len(init_words) or not image_sets:
        raise ValueError("need one initializer word per concept, and at least one concept")
    others = set(model.placeholder_tokens) - {TOKEN}
    if others or model.placeholder_tokens.get(TOKEN, cfg.num_vectors) != cfg.num_vectors:
        raise ValueError("invert_many needs a model without placeholder tokens other than its own (load a fresh one)")
    inits = [model.initializer_vectors(w, cfg.num_vectors) for w in init_words]
    if starts is not None:
        if len(starts) != len(inits):
            raise ValueError("need one start per concept")
        for start, init in zip(starts, inits):
            if len(start) != len(init) or any(tuple(s.shape) != tuple(i.shape) for s, i in zip(start, init)):
                raise ValueError(f"a start has shapes {[tuple(s.shape) for s in start]}; this model needs "
                                 f"{[tuple(i.shape) for i in init]}")
    if TOKEN not in model.placeholder_tokens:
        model.add_placeholder(TOKEN, inits[0])  # its stored vectors are never read: batch_vectors replace them
    banks = [bank_for_run(model, list(images), cfg, cfg.seed + i) for i, images in enumerate(image_sets)]
    anchors = [torch.stack([s[j] for s in inits]).to(model.device) for j in range(len(model.widths))]
    firsts = anchors if starts is None else [
        torch.stack([s[j].float() for s in starts]).to(model.device, anchors[j].dtype) for j in range(len(model.widths))]
    params = [f.clone().requires_grad_(True) for f in firsts]  # [concepts, n, width] per text encoder
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(model)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    else:  # a reused model keeps what an earlier call set
        model.unet.disable_gradient_checkpointing()
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    prompt_rng = random.Random(cfg.seed)
    path = Path(checkpoint) if checkpoint is not None else None
    key = fingerprint(model, image_sets, init_words, cfg, starts is not None) if path is not None else ""
    sums = _sums(model, starts) if path is not None else {}
    first = 0
    if (ts := _resume(path, key, sums)) is not None:
        with torch.no_grad():
            for p, v in zip(params, ts.vectors, strict=True):
                p.copy_(v)
        load_optimizer(optimizer, ts.optimizer, ts.param_groups)
        if scaler and ts.scaler:
            scaler.load_state_dict(ts.scaler)
        generator.set_state(ts.generator_state)
        prompt_rng = restore_prompt_rng(ts.prompt_rng_state)
        first = ts.step
        logger.info("continuing %d concepts from step %d of %d (%s)", len(image_sets), first, cfg.steps, path)

    def save(step: int) -> None:
        if path is not None:
            tensors, groups = optimizer_tensors(optimizer)
            save_state(path, TrainState(step, params, tensors, groups, generator.get_state(), prompt_rng.getstate(),
                                        scaler=scaler.state_dict() if scaler else None,
                                        meta={"fingerprint": key, "sums": json.dumps(sums)}))

    b, g = cfg.batch_size, len(image_sets)
    for step in tqdm(range(first, cfg.steps), desc=f"inverting {g} concepts", disable=not progress, leave=False,
                     initial=first, total=cfg.steps):
        latents = torch.cat([bank.sample(b, generator) for bank in banks]).to(model.dtype)
        prompts = sample_prompts(cfg.template, TOKEN, g * b, prompt_rng)
        cond = model.encode_text(prompts, batch_vectors=[p.repeat_interleave(b, 0) for p in params])
        loss = denoising_loss(model, latents, cond, generator).view(g, b).mean(1).sum()
        if cfg.reg_weight > 0:
            # per concept as in a single run: squared distance summed over width, mean over its vectors
            loss = loss + cfg.reg_weight * sum(((p - a) ** 2).sum(-1).mean(-1).sum() for p, a in zip(params, anchors))
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"the loss became {loss.item()} at step {step + 1}; try a lower --base_lr"
                                        + (" or --dtype bf16 / fp32" if model.dtype == torch.float16 else ""))
        (scaler.scale(loss) if scaler else loss).backward()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        if scaler:  # skips a step whose fp16 gradients overflowed, and adapts the scale
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if save_every > 0 and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    if first < cfg.steps:
        save(cfg.steps)  # a finished group is not inverted again when a later one is interrupted
    return [[p[i].detach().float().cpu().clone() for p in params] for i in range(g)]
