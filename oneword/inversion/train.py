"""The textual-inversion optimizer (:class:`Inversion`) and the run that wraps it (:func:`run_inversion`).

``Inversion`` is one concept on the group engine (G = 1): the placeholder's vectors are the only
parameters, the reference latents come from a bank encoded once, and each step calls the shared
:func:`~oneword.inversion.loss.denoising_loss`.
``run_inversion`` adds what a long job needs: a run folder with the config, a loss CSV and plot,
preview grids, checkpoints every N steps, ``resume``, Ctrl-C/SIGTERM handling and a stop with the
last good vectors kept when the loss or the vectors stop being finite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from oneword.data.images import LoadedImage
from oneword.errors import InputError, TokenError, TrainingDivergedError
from oneword.fileio import atomic_write_text
from oneword.inversion.bank import LatentBank
from oneword.inversion.checkpoint import TrainState, save_state
from oneword.inversion.config import InversionConfig
from oneword.inversion.embedding_io import Embedding
from oneword.inversion.group import GROUP_PREFIX, GroupEngine, Slot
from oneword.inversion.runfolder import RunFolder, word_metadata
from oneword.inversion.runlog import LossLog, plot_losses
from oneword.models import FrozenLDM

logger = logging.getLogger(__name__)

DEFAULT_PREVIEW_PROMPTS = ("a photo of {}", "a painting of {} on the beach")


class Inversion:
    """One concept's inversion: the group engine (:mod:`oneword.inversion.group`) with G = 1.

    ``init_vectors`` (one ``[n, width]`` tensor per text encoder) starts from a given embedding, e.g.
    an encoder's prediction; by default the vectors start from the initializer word(s). The L2
    regularizer (``cfg.reg_weight``) pulls toward the starting vectors. ``cfg.token`` is added to
    the model and follows the learned vectors after every step, so previews and ``encode_text``
    prompts that name it see the current word.
    """

    def __init__(
        self,
        model: FrozenLDM,
        images: Sequence[LoadedImage],
        cfg: InversionConfig,
        init_vectors: list[torch.Tensor] | None = None,
    ) -> None:
        self.model, self.cfg = model, cfg
        self.images = list(images)
        start = [v.float() for v in (init_vectors or model.initializer_vectors(cfg.init, cfg.num_vectors))]
        if cfg.token.lower().startswith(GROUP_PREFIX):
            raise TokenError(
                f"tokens starting with {GROUP_PREFIX} are the inversion engine's; choose another --token"
            )
        model.add_placeholder(cfg.token, start)  # refuses a bad or taken token before any work
        self.engine = GroupEngine(model, capacity=1)
        self.slot = self.engine.add([im.image for im in self.images], cfg, start=start, name=cfg.token)

    @property
    def _slot(self) -> Slot:
        return self.engine.slot(self.slot)

    @property
    def bank(self) -> LatentBank:
        return self._slot.bank

    @property
    def params(self) -> list[torch.Tensor]:
        return self._slot.params

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._slot.optimizer

    @property
    def step(self) -> int:
        return self._slot.step

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` batches). Raises :class:`TrainingDivergedError`
        with the vectors rolled back if the loss or the updated vectors are not finite."""
        if self.step >= self.cfg.steps:
            raise RuntimeError(f"the inversion has taken its {self.cfg.steps} steps (cfg.steps)")
        losses = self.engine.step()
        self.model.set_vectors(self.cfg.token, self._slot.vectors())
        if self._slot.error:
            raise TrainingDivergedError(self._slot.error)
        return losses[self.slot]

    def embedding(self, metadata: dict[str, str] | None = None) -> Embedding:
        return Embedding(self.cfg.token, self._slot.vectors(), metadata or {})

    def state(self) -> TrainState:
        return self.engine.state(self.slot)

    def load(self, ts: TrainState) -> None:
        self.engine.load(self.slot, ts)
        self.model.set_vectors(self.cfg.token, self._slot.vectors())


@dataclass
class InversionResult:
    out_dir: Path
    embedding: Embedding
    step: int
    final_loss: float | None
    interrupted: bool = False
    files: list[Path] = field(default_factory=list)
    snapshots: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    """The vectors at each of ``run_inversion``'s ``snapshot_steps`` this run passed (CPU copies)."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so a killed job still saves its state."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _model_kind(model: FrozenLDM) -> str:
    """What a checkpoint's vectors fit: the family and the text encoders' widths."""
    return f"{model.family} {list(model.widths)}"


def _check_resumed_inputs(
    ts: TrainState, model: FrozenLDM, hashes: list[str], out_dir: Path, in_order: bool = False
) -> None:
    """A checkpoint continues only on the images and the kind of model it was made with (in the
    same order with ``in_order``: per-image tokens are bound to their images' places)."""
    saved_hashes = json.loads(ts.meta.get("images", "null") or "null")
    if (
        in_order
        and saved_hashes is not None
        and saved_hashes != hashes
        and sorted(saved_hashes) == sorted(hashes)
    ):
        raise InputError(
            f"cannot resume {out_dir}: its per-image tokens were learned on these images in another "
            "order; give them in the order they had (their file names sort the same)"
        )
    if saved_hashes is not None and sorted(saved_hashes) != sorted(hashes):
        differ = len(set(hashes) ^ set(saved_hashes))
        raise InputError(
            f"cannot resume {out_dir}: it was trained on other images ({len(saved_hashes)} then, "
            f"{len(hashes)} now, {differ} not in both); use the same folder or another --out"
        )
    kind = _model_kind(model)
    if ts.meta.get("model_kind", kind) != kind:
        raise InputError(
            f"cannot resume {out_dir}: it was trained on a {ts.meta['model_kind']} model "
            f"({ts.meta.get('model')}), this is {kind} ({model.source})"
        )
    if ts.meta.get("model", model.source) != model.source:
        logger.warning(
            "resuming %s, made with --model %s, on --model %s", out_dir, ts.meta["model"], model.source
        )


def run_inversion(
    model: FrozenLDM,
    images: Sequence[LoadedImage],
    cfg: InversionConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    init_vectors: list[torch.Tensor] | None = None,
    progress: bool = True,
    extra_metadata: dict[str, str] | None = None,
    snapshot_steps: Collection[int] = (),
) -> InversionResult:
    """Invert ``images`` into ``cfg.token`` and write the run folder ``out_dir``, holding its lock.

    Writes ``learned_embeds.safetensors`` (diffusers layout; plus ``learned_embeds_2`` for SDXL),
    ``<token>.safetensors`` (the single-file layout of A1111/ComfyUI/kohya), ``config.yaml``,
    ``loss.csv``, ``loss.png``, ``previews/`` and ``checkpoints/`` (see
    :mod:`oneword.inversion.runfolder`). The vectors at ``snapshot_steps`` come back in the
    result's ``snapshots`` (e.g. to judge a shorter refinement's word against the final one).
    """
    if not images:
        raise InputError("no reference images given")
    with RunFolder(out_dir) as folder:
        return _run(
            model, images, cfg, folder, resume, init_vectors, progress, extra_metadata, snapshot_steps
        )


def _run(
    model: FrozenLDM,
    images: Sequence[LoadedImage],
    cfg: InversionConfig,
    folder: RunFolder,
    resume: bool,
    init_vectors: list[torch.Tensor] | None,
    progress: bool,
    extra_metadata: dict[str, str] | None,
    snapshot_steps: Collection[int],
) -> InversionResult:
    out = folder.path
    ts = folder.prepare(cfg, resume)
    hashes = [im.sha256 for im in images]
    if ts is not None:
        _check_resumed_inputs(ts, model, hashes, out, in_order=cfg.per_image_tokens)
    inv = Inversion(model, images, cfg, init_vectors)  # bad tokens etc. fail before any file exists
    if ts is not None:
        inv.load(ts)
        logger.info("resumed %s at step %d", out, inv.step)
    atomic_write_text(folder.config, cfg.to_yaml())
    log = LossLog(folder.loss_csv, keep_until=inv.step)

    def save_outputs() -> list[Path]:
        meta = word_metadata(model, cfg.token, cfg.init, inv.step, hashes, extra_metadata)
        files = folder.write_word(inv.embedding(meta))
        plot_losses(log.path, folder.loss_png)
        return files

    inputs = {"images": json.dumps(hashes), "model": model.source, "model_kind": _model_kind(model)}

    def checkpoint() -> list[Path]:
        save_state(folder.checkpoint, dataclasses.replace(inv.state(), meta=inputs))
        return save_outputs()

    def preview() -> None:
        from oneword.sampling import SampleSettings, render_grid

        prompts = [p.replace("{}", cfg.token) for p in (cfg.preview_prompts or DEFAULT_PREVIEW_PROMPTS)]
        settings = SampleSettings(
            steps=cfg.preview_steps, seeds=list(cfg.preview_seeds), resolution=cfg.resolution
        )
        render_grid(
            model, prompts, settings, folder.preview(inv.step), {"token": cfg.token, "step": str(inv.step)}
        )

    last_loss: float | None = None
    interrupted = False
    snapshots: dict[int, list[torch.Tensor]] = {}
    bar = tqdm(
        total=cfg.steps,
        initial=inv.step,
        disable=not progress,
        desc=f"inverting {cfg.token}",
        unit="step",
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            while inv.step < cfg.steps:
                try:
                    last_loss = inv.train_step()
                except TrainingDivergedError:
                    save_outputs()  # the rolled-back, finite vectors; the checkpoint stays the last good one
                    raise
                log.append(inv.step, last_loss, cfg.lr_at(inv.step - 1), time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{log.smoothed:.4f}")
                if inv.step in snapshot_steps:
                    snapshots[inv.step] = model.vectors_of(cfg.token)
                if cfg.save_every and inv.step % cfg.save_every == 0 and inv.step < cfg.steps:
                    checkpoint()
                if cfg.preview_every and inv.step % cfg.preview_every == 0:
                    preview()
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted at step %d: saving a checkpoint to resume from", inv.step)
    finally:
        bar.close()
        log.close()
    files = checkpoint()
    return InversionResult(out, inv.embedding(), inv.step, last_loss, interrupted, files, snapshots)
