"""The textual-inversion optimizer (:class:`Inversion`) and the run that wraps it (:func:`run_inversion`).

``Inversion`` is the algorithm: the placeholder's vectors are the only parameters, the reference
latents come from a bank encoded once, and each step calls the shared :func:`denoising_loss`.
``run_inversion`` adds what a long job needs: a run folder with the config, a loss CSV and plot,
preview grids, checkpoints every N steps, ``resume``, Ctrl-C/SIGTERM handling and a stop with the
last good vectors kept when the loss or the vectors stop being finite.
"""

from __future__ import annotations

import logging
import random
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
from oneword.errors import InputError, TrainingDivergedError
from oneword.fileio import atomic_write_text
from oneword.inversion.bank import bank_for_run
from oneword.inversion.checkpoint import TrainState, load_state, restore_prompt_rng, save_state
from oneword.inversion.config import InversionConfig
from oneword.inversion.embedding_io import (
    Embedding,
    build_metadata,
    save_diffusers,
    save_single_file,
)
from oneword.inversion.loss import denoising_loss, grad_scaler
from oneword.inversion.runlog import LossLog, plot_losses
from oneword.inversion.templates import sample_prompts
from oneword.models import FrozenLDM
from oneword.trainstate import load_optimizer, optimizer_tensors

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.safetensors"
DEFAULT_PREVIEW_PROMPTS = ("a photo of {}", "a painting of {} on the beach")


class Inversion:
    """Optimizes one placeholder token's vectors on a frozen model.

    ``init_vectors`` (one ``[n, width]`` tensor per text encoder) starts from a given embedding, e.g.
    an encoder's prediction; by default the vectors start from the initializer word(s). The L2
    regularizer (``cfg.reg_weight``) pulls toward the starting vectors.
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
        start = init_vectors or model.initializer_vectors(cfg.init, cfg.num_vectors)
        model.add_placeholder(cfg.token, [v.float() for v in start])
        self.anchor = [v.detach().float().to(model.device) for v in start]
        self.bank = bank_for_run(model, [im.image for im in self.images], cfg, cfg.seed)
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        self.params = model.trainable_vectors()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = grad_scaler(model)
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)
        self.prompt_rng = random.Random(cfg.seed)
        self.step = 0

    def loss_on_batch(self) -> torch.Tensor:
        """The objective on one freshly drawn batch (shared loss + optional L2 regularizer)."""
        cfg = self.cfg
        latents = self.bank.sample(cfg.batch_size, self.generator).to(self.model.dtype)
        prompts = sample_prompts(cfg.template, cfg.token, cfg.batch_size, self.prompt_rng)
        cond = self.model.encode_text(prompts)
        loss = denoising_loss(self.model, latents, cond, self.generator).mean()
        if cfg.reg_weight > 0:
            reg = sum(((p - a) ** 2).sum(-1).mean() for p, a in zip(self.params, self.anchor))
            loss = loss + cfg.reg_weight * reg
        return loss

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` batches). Raises :class:`TrainingDivergedError`
        with the vectors rolled back if the loss or the updated vectors are not finite."""
        before = [p.detach().clone() for p in self.params]
        total = 0.0
        for _ in range(self.cfg.grad_accum):
            loss = self.loss_on_batch()
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingDivergedError(
                    f"the loss became {loss.item()} at step {self.step + 1}; "
                    "try a lower --base_lr or --mixed_precision no"
                )
            scaled = loss / self.cfg.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.item() / self.cfg.grad_accum
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(self.step)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not all(torch.isfinite(p).all() for p in self.params):
            with torch.no_grad():
                for p, b in zip(self.params, before):
                    p.copy_(b)
            raise TrainingDivergedError(
                f"the learned vectors became NaN/inf at step {self.step + 1} and were rolled back; "
                "try a lower --base_lr"
            )
        self.step += 1
        return total

    def embedding(self, metadata: dict[str, str] | None = None) -> Embedding:
        return Embedding(self.cfg.token, self.model.vectors_of(self.cfg.token), metadata or {})

    def state(self) -> TrainState:
        optim, groups = optimizer_tensors(self.optimizer)
        return TrainState(
            step=self.step, vectors=[p.detach() for p in self.params], optimizer=optim,
            param_groups=groups, generator_state=self.generator.get_state(),
            prompt_rng_state=self.prompt_rng.getstate(),
            scaler=self.scaler.state_dict() if self.scaler else None,
        )

    def load(self, ts: TrainState) -> None:
        if [tuple(v.shape) for v in ts.vectors] != [tuple(p.shape) for p in self.params]:
            raise InputError("the checkpoint's vectors do not match this run's token/model settings")
        with torch.no_grad():
            for p, v in zip(self.params, ts.vectors):
                p.copy_(v.to(p.device))
        load_optimizer(self.optimizer, ts.optimizer, ts.param_groups)
        self.generator.set_state(ts.generator_state)
        self.prompt_rng = restore_prompt_rng(ts.prompt_rng_state)
        if self.scaler and ts.scaler:
            self.scaler.load_state_dict(ts.scaler)
        self.step = ts.step


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


def safe_file_stem(token: str) -> str:
    """File name for the single-file layout: A1111 and ComfyUI use the name as the prompt word."""
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in token.strip("<>")).strip("-.")
    return stem or "embedding"


def _prepare_out_dir(out_dir: Path, cfg: InversionConfig, resume: bool) -> TrainState | None:
    cfg_path = out_dir / "config.yaml"
    if resume:
        if not (out_dir / CHECKPOINT).is_file():
            raise InputError(f"nothing to resume: {out_dir / CHECKPOINT} does not exist; drop --resume")
        saved = InversionConfig.from_yaml(cfg_path.read_text())
        ignore = {"steps", "save_every", "preview_every", "preview_prompts", "preview_seeds", "preview_steps"}
        diff = [k for k, v in saved.to_dict().items() if k not in ignore and getattr(cfg, k) != v]
        if diff:
            raise InputError(
                f"cannot resume {out_dir}: settings differ from the saved run ({', '.join(diff)}); "
                "use the same settings or another --out"
            )
        return load_state(out_dir / CHECKPOINT)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already holds files; pass --resume to continue that run or choose another --out")
    return None


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
    """Invert ``images`` into ``cfg.token`` and write the run folder ``out_dir``.

    Writes ``learned_embeds.safetensors`` (diffusers layout; plus ``learned_embeds_2`` for SDXL),
    ``<token>.safetensors`` (the single-file layout of A1111/ComfyUI/kohya), ``config.yaml``,
    ``loss.csv``, ``loss.png``, ``previews/`` and ``checkpoints/``. The vectors at
    ``snapshot_steps`` come back in the result's ``snapshots`` (e.g. to judge a shorter
    refinement's word against the final one).
    """
    out = Path(out_dir)
    if not images:
        raise InputError("no reference images given")
    ts = _prepare_out_dir(out, cfg, resume)
    inv = Inversion(model, images, cfg, init_vectors)  # bad tokens etc. fail before any file exists
    out.mkdir(parents=True, exist_ok=True)
    if ts is not None:
        inv.load(ts)
        logger.info("resumed %s at step %d", out, inv.step)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    log = LossLog(out / "loss.csv", keep_until=inv.step)
    hashes = [im.sha256 for im in images]

    def save_outputs() -> list[Path]:
        meta = build_metadata(
            family=model.family, token=cfg.token, init=cfg.init, steps=inv.step,
            source_hashes=hashes, extra={"oneword.model": model.source, **(extra_metadata or {})},
        )
        emb = inv.embedding(meta)
        files = save_diffusers(emb, out)
        files.append(save_single_file(emb, out / f"{safe_file_stem(cfg.token)}.safetensors"))
        plot_losses(log.path, out / "loss.png")
        return files

    def checkpoint() -> list[Path]:
        save_state(out / CHECKPOINT, inv.state())
        return save_outputs()

    def preview() -> None:
        from oneword.generate import SampleSettings, render_grid

        prompts = [p.replace("{}", cfg.token) for p in (cfg.preview_prompts or DEFAULT_PREVIEW_PROMPTS)]
        settings = SampleSettings(steps=cfg.preview_steps, seeds=list(cfg.preview_seeds),
                                  resolution=cfg.resolution)
        render_grid(model, prompts, settings, out / "previews" / f"step_{inv.step:06d}.png",
                    {"token": cfg.token, "step": str(inv.step)})

    last_loss: float | None = None
    interrupted = False
    snapshots: dict[int, list[torch.Tensor]] = {}
    bar = tqdm(total=cfg.steps, initial=inv.step, disable=not progress, desc=f"inverting {cfg.token}",
               unit="step", dynamic_ncols=True)
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
