"""Textual inversion of a fixed set of concepts at once: one group of the group engine.

``invert_many`` is the driver ``ti data targets`` uses: every concept joins one
:class:`~oneword.inversion.group.GroupEngine` group, all run the same number of steps, and each
step is one UNet pass of ``concepts x batch_size`` samples (what batching buys is throughput; each
concept moves as a run alone would, see :mod:`oneword.inversion.group`).

A run of many concepts can take an hour on a CPU, so with ``checkpoint`` it saves every slot's
state (the vectors, AdamW's moments, the step and both random generators) every ``save_every``
steps and at the end, and a later call with the same inputs continues from there (step for step as
an uninterrupted run on the same device and thread count); a file written for other inputs,
settings, model weights or starts is ignored with a warning and overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from oneword.errors import InputError, TrainingDivergedError
from oneword.inversion.checkpoint import TrainState, load_states, save_states
from oneword.inversion.config import InversionConfig
from oneword.inversion.group import GROUP_PREFIX, GroupEngine
from oneword.models import FrozenLDM

logger = logging.getLogger(__name__)


def fingerprint(
    model: FrozenLDM,
    image_sets: Sequence[Sequence[Image.Image]],
    init_words: Sequence[str],
    cfg: InversionConfig,
    has_starts: bool,
) -> str:
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


def _resume(path: Path | None, key: str, sums: dict[str, float], count: int) -> list[TrainState] | None:
    if path is None or not path.is_file():
        return None
    try:
        states, meta = load_states(path)
        saved = json.loads(meta.get("sums", "{}"))
    except (InputError, ValueError) as err:
        logger.warning("%s cannot be read (%s): starting over", path, err)
        return None
    same = (
        meta.get("fingerprint") == key
        and len(states) == count
        and all(math.isclose(saved[k], v, rel_tol=1e-4) for k, v in sums.items() if k in saved)
    )
    if not same:
        logger.warning(
            "%s was saved for other concepts, settings, model weights or starts: starting over", path
        )
        return None
    return states


def invert_many(
    model: FrozenLDM,
    image_sets: Sequence[Sequence[Image.Image]],
    init_words: Sequence[str],
    cfg: InversionConfig,
    progress: bool = False,
    starts: Sequence[Sequence[torch.Tensor]] | None = None,
    checkpoint: str | Path | None = None,
    save_every: int = 50,
) -> list[list[torch.Tensor]]:
    """Invert every concept of ``image_sets`` jointly for ``cfg.steps`` steps, as one group of the
    group engine.

    Uses ``cfg``'s batch size (per concept), learning rate, template, views and regularizer;
    concept ``i`` is seeded with ``cfg.seed + i``; ``cfg.token`` and ``cfg.init`` are ignored (each
    concept has its own initializer word). ``starts`` (per concept, one ``[n, width]`` tensor per
    text encoder) continues earlier inversions instead of starting at the initializer words, which
    stay the regularizer's anchors. ``model`` may be reused across calls but must hold no
    placeholder other than the engine's own. Returns, per concept, one ``[n, width]`` tensor per
    text encoder. Raises :class:`TrainingDivergedError` when a concept's loss stops being finite.
    ``checkpoint`` (a ``.safetensors`` path) saves the group's state every ``save_every`` steps and
    at the end, and continues from it when it matches these inputs.
    """
    if len(image_sets) != len(init_words) or not image_sets:
        raise ValueError("need one initializer word per concept, and at least one concept")
    if {t for t in model.placeholder_tokens if not t.startswith(GROUP_PREFIX)}:
        raise ValueError(
            "invert_many needs a model without placeholder tokens other than its own (load a fresh one)"
        )
    if starts is not None and len(starts) != len(image_sets):
        raise ValueError("need one start per concept")
    engine = GroupEngine(model, capacity=len(image_sets))
    sids = []
    for i, (images, word) in enumerate(zip(image_sets, init_words)):
        init = model.initializer_vectors(word, cfg.num_vectors)
        start = init if starts is None else [v.float() for v in starts[i]]
        concept_cfg = dataclasses.replace(cfg, init=word, seed=cfg.seed + i)
        sids.append(engine.add(list(images), concept_cfg, start=start, anchor=init, name=f"concept {i}"))
    path = Path(checkpoint) if checkpoint is not None else None
    key = fingerprint(model, image_sets, init_words, cfg, starts is not None) if path is not None else ""
    sums = _sums(model, starts) if path is not None else {}
    if (states := _resume(path, key, sums, len(sids))) is not None:
        for sid, ts in zip(sids, states):
            engine.load(sid, ts)
        engine.load_scaler(states[0])  # one scale for the group, saved with every slot
        logger.info(
            "continuing %d concepts from step %d of %d (%s)", len(sids), states[0].step, cfg.steps, path
        )
    first = engine.slot(sids[0]).step

    def save() -> None:
        if path is not None:
            save_states(
                path, [engine.state(sid) for sid in sids], {"fingerprint": key, "sums": json.dumps(sums)}
            )

    for step in tqdm(
        range(first, cfg.steps),
        desc=f"inverting {len(sids)} concepts",
        disable=not progress,
        leave=False,
        initial=first,
        total=cfg.steps,
    ):
        engine.step()
        failed = next((s for s in engine.slots.values() if s.error), None)
        if failed is not None:
            raise TrainingDivergedError(f"{failed.name}: {failed.error}")
        if save_every > 0 and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
            save()
    if first < cfg.steps:
        save()  # a finished group is not inverted again when a later one is interrupted
    return [engine.remove(sid).vectors for sid in sids]
