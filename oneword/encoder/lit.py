"""Training the encoder with PyTorch Lightning: the LightningModule, the shard DataModule, and the
callback that exports the slim encoder file.

The loss is the core :func:`~oneword.inversion.loss.denoising_loss` on a *different* image of the
concept than the ones the encoder saw (so the word must carry the object, not one photo of it),
with the predicted vectors substituted for the placeholder in the prompt, plus an L2 pull toward
the initializer's embedding and, for samples whose shard carries one, a distillation term toward a
target embedding. The frozen diffusion model and image tower are kept out of the module tree, so
checkpoints hold only the mapper and its optimizer.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from PIL import Image
from torch.utils.data import DataLoader

from oneword.data.images import image_to_tensor, resize_and_crop
from oneword.data.shards import ConceptSample, decode_sample, expand_shards, is_validation
from oneword.encoder.model import ConceptEncoder, EncoderConfig, load_encoder, save_encoder, token_scale
from oneword.encoder.unet_features import unet_feature_dim, unet_map_channels
from oneword.errors import InputError
from oneword.inversion.bank import vae_encode, vae_in_safe_dtype
from oneword.inversion.loss import denoising_loss
from oneword.inversion.templates import sample_prompts
from oneword.trainstate import warmup_cosine

logger = logging.getLogger(__name__)

TOKEN = "<concept>"


def _item(sample: ConceptSample, rng: random.Random, min_refs: int, max_refs: int, train: bool) -> dict:
    """Pick the encoder's reference images and a separate target image of one concept."""
    n = len(sample.images)
    order = list(range(n))
    if train:
        rng.shuffle(order)
    target = order[-1] if n > 1 else order[0]
    pool = order[:-1] if n > 1 else order
    k = min(len(pool), rng.randint(min_refs, max_refs) if train else max_refs)
    bg = sample.backgrounds[target] if sample.backgrounds else None
    return {
        "key": sample.key,
        "refs": [sample.images[i] for i in pool[:k]],
        "target": sample.images[target],
        "init": sample.init,
        "background": bg,
        "target_vectors": sample.target,
    }


def collate(items: Sequence[dict]) -> dict[str, list]:
    """Batches stay lists (PIL images, strings, optional tensors)."""
    return {k: [it[k] for it in items] for k in items[0]}


class ConceptShards(L.LightningDataModule):
    """Streams concept samples from webdataset shards, shuffled, split into train and validation
    by a stable hash of the concept key."""

    def __init__(
        self,
        shards: str = "runs/shards/toy-train",
        batch_size: int = 16,
        min_refs: int = 1,
        max_refs: int = 4,
        val_fraction: float = 0.05,
        shuffle_buffer: int = 512,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            shards: the training shards: a folder of .tar files, a glob or a brace pattern (the
                output of ti data targets, for distillation).
            batch_size: concepts per training step (per device).
            min_refs: fewest reference images drawn per concept and step.
            max_refs: most reference images drawn per concept and step (the rest of its images
                supply the target view).
            val_fraction: share of concepts held out for validation, chosen by a hash of their
                keys (stable across runs).
            shuffle_buffer: samples shuffled together while streaming.
            num_workers: dataloader worker processes per device; every worker of every rank needs
                at least one shard.
            seed: seed of the shuffle and of the reference draws.
        """
        super().__init__()
        if not 1 <= min_refs <= max_refs:
            raise ValueError("need 1 <= min_refs <= max_refs")
        if not 0 < val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        self.save_hyperparameters()

    def _dataset(self, val: bool):
        import webdataset as wds

        h = self.hparams
        urls = expand_shards(h.shards)
        readers = (self.trainer.world_size if self.trainer is not None else 1) * max(1, h.num_workers)
        if len(urls) < readers:  # whole shards go to each rank and worker: one without any waits forever
            raise InputError(
                f"{len(urls)} shard(s) for {readers} readers (ranks x data.num_workers): each needs at "
                "least one; write smaller shards (ti data shards --per-shard) or lower "
                "data.num_workers"
            )
        ds = wds.WebDataset(
            urls,
            shardshuffle=False if val else len(urls),
            seed=h.seed,
            empty_check=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
        )
        ds = ds.select(lambda raw: is_validation(raw["__key__"], h.val_fraction) == val).map(decode_sample)
        if not val:
            ds = ds.repeat().shuffle(h.shuffle_buffer, seed=h.seed)  # endless: training counts steps
        rank = self.trainer.global_rank if self.trainer is not None else 0
        base = h.seed + (1 if val else 0) + 7_919 * rank
        rngs: dict[int, random.Random] = {}

        def item(sample: ConceptSample) -> dict:  # each rank and worker picks references on its own
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            rng = rngs.setdefault(worker, random.Random(base + 104_729 * worker))
            return _item(sample, rng, h.min_refs, h.max_refs, not val)

        return ds.map(item)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(
            self._dataset(False), batch_size=h.batch_size, collate_fn=collate, num_workers=h.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(
            self._dataset(True), batch_size=h.batch_size, collate_fn=collate, num_workers=h.num_workers
        )


class EncoderModule(L.LightningModule):
    """The mapper being trained, with the frozen diffusion model and image tower beside it."""

    def __init__(
        self,
        model: str = "toy",
        clip: str = "toy",
        num_vectors: int = 1,
        hidden: int = 512,
        depth: int = 2,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        reg_weight: float = 1e-3,
        distill_weight: float = 0.0,
        template: str = "object",
        background_prompt_p: float = 0.5,
        flip_p: float = 0.5,
        dtype: str = "fp32",
        unet_features: bool = False,
        unet_layout: Literal["blocks", "resnets", "multiscale"] = "blocks",
        unet_map: int = 0,
        init_from: str | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        """
        Args:
            model: diffusion model to train for (preset, folder or checkpoint, as ``--model``).
            clip: image tower (toy, an open_clip ARCH[:TAG], random for tests).
            num_vectors: vectors per pseudo-word.
            hidden: mapper width.
            depth: mapper residual blocks.
            lr: peak AdamW learning rate (linear warm-up, cosine decay to 10% at max_steps).
            weight_decay: AdamW weight decay.
            warmup_steps: learning-rate warm-up steps.
            reg_weight: weight of the squared distance to the initializer (in units of a word's norm).
            distill_weight: weight of the squared distance to shard target embeddings, where present.
            template: training prompt templates (object, style, toy).
            background_prompt_p: probability that a prompt names the target image's background
                when the shard records it ("... on a teal background"), which teaches the word to
                leave the background out.
            flip_p: probability of a horizontal flip of the target image.
            dtype: weights of the frozen model (fp32, bf16, fp16); mixed precision comes from the
                trainer's ``precision``.
            unet_features: also feed the mapper the frozen model's own UNet features of the
                reference images (E4T-style; :mod:`oneword.encoder.unet_features`).
            unet_layout: which UNet activations those features pool: ``blocks`` (each down
                block's output), ``resnets`` (every layer's, with their spread: more texture) or
                ``multiscale`` (``resnets`` at 1x and 2x).
            unet_map: width of a trained convolutional head over each reference's finest UNet map
                (at the layout's largest scale; :class:`~oneword.encoder.model.MapHead`), which reads
                texture that pooling loses; 0 leaves it out.
            init_from: an exported encoder file (``encoder.safetensors``) whose mapper weights the
                training starts from instead of fresh ones: fine-tune an earlier or shipped encoder
                on new shards (e.g. a self-distillation round). Its architecture and target model
                must match the options above. Read when a fit starts from scratch; a ``--ckpt_path``
                resume (or an export of a checkpoint) takes the checkpoint's weights and never
                reads it, so the file may have moved since.
            gradient_checkpointing: recompute the frozen UNet's activations in the backward pass
                (the loss backpropagates through it to the mapper): much less memory at SDXL's
                1,024 px, at some cost in time per step.
            seed: seed of noise, timesteps and prompts.
        """
        super().__init__()
        self.save_hyperparameters()
        from oneword.eval.space import load_space
        from oneword.models import load_model

        ldm = load_model(model, device="cpu", dtype=dtype)
        ldm.add_placeholder(TOKEN, ldm.initializer_vectors("object", num_vectors))
        if gradient_checkpointing:
            ldm.unet.enable_gradient_checkpointing()
        space = load_space(clip)
        probe = space.images([_blank()])
        unet_dim = unet_feature_dim(ldm.unet, unet_layout) if unet_features else 0
        cfg = EncoderConfig(
            clip=clip,
            feature_dim=int(probe.shape[1]),
            unet_dim=unet_dim,
            unet_layout=unet_layout,
            widths=ldm.widths,
            map_channels=unet_map_channels(ldm.unet) if unet_map else 0,
            map_width=max(unet_map, 1),
            num_vectors=num_vectors,
            hidden=hidden,
            depth=depth,
            offset_scale=token_scale(ldm),
            family=ldm.family,
            model=model,
        )
        self.encoder = ConceptEncoder(cfg, space)
        self._frozen = {"ldm": ldm}  # a dict: not a submodule, never in state_dict or checkpoints
        self._init_cache: dict[str, list[torch.Tensor]] = {}
        self._rng = random.Random(seed)

    def on_fit_start(self) -> None:
        """A fit from scratch loads ``init_from``; a resume has restored its checkpoint by now
        (``trainer.ckpt_path`` is set) and never reads the file."""
        trainer = self._trainer
        if self.global_rank:  # each rank draws its own flips and prompts
            self._rng = random.Random(self.hparams.seed + 7_919 * self.global_rank)
        if not self.hparams.init_from or (trainer is not None and trainer.ckpt_path):
            return
        exports = [
            cb.target(trainer)
            for cb in (trainer.callbacks if trainer is not None else [])
            if isinstance(cb, ExportEncoder)
        ]
        if any(e.resolve() == Path(self.hparams.init_from).resolve() for e in exports):
            raise InputError(
                f"--model.init_from {self.hparams.init_from} is also the file this run exports "
                "to, which would overwrite it: copy it elsewhere first"
            )
        start_from(self.encoder, self.hparams.init_from)

    @property
    def ldm(self):
        ldm = self._frozen["ldm"]
        if ldm.device != self.device:
            ldm.pipeline.to(self.device)
            ldm.device = self.device
            self.encoder.space.to(self.device)
        return ldm

    def _init_vectors(self, words: Sequence[str]) -> list[torch.Tensor]:
        for w in set(words) - self._init_cache.keys():
            self._init_cache[w] = self.ldm.initializer_vectors(w, self.hparams.num_vectors)
        return [
            torch.stack([self._init_cache[w][j] for w in words]).to(self.device)
            for j in range(len(self.ldm.widths))
        ]

    def _targets(self, images) -> torch.Tensor:
        res = self.ldm.resolution
        flips = [self._rng.random() < self.hparams.flip_p for _ in images]
        views = [resize_and_crop(im, res) for im in images]
        views = [v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else v for v, f in zip(views, flips)]
        return torch.stack([image_to_tensor(v) for v in views])

    def _prompts(self, backgrounds: Sequence[str | None]) -> list[str]:
        h = self.hparams
        out = sample_prompts(h.template, TOKEN, len(backgrounds), self._rng)
        return [
            f"{p} on a {bg} background" if bg and self._rng.random() < h.background_prompt_p else p
            for p, bg in zip(out, backgrounds)
        ]

    def losses(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Denoising, regularizer and distillation terms (and their weighted sum, ``loss``)."""
        h, ldm = self.hparams, self.ldm
        inputs = self.encoder.features(batch["refs"], ldm)
        init = self._init_vectors(batch["init"])
        pred = self.encoder(inputs, init)
        with torch.no_grad(), vae_in_safe_dtype(ldm.vae) as vae_dtype:  # SDXL's VAE overflows in fp16
            x = self._targets(batch["target"]).to(self.device, vae_dtype)
            latents = vae_encode(ldm.vae, x).sample(generator=generator) * ldm.vae.config.scaling_factor
            latents = latents.to(ldm.dtype)
        cond = ldm.encode_text(
            self._prompts(batch["background"]), batch_vectors=[p.to(ldm.dtype) for p in pred]
        )
        out = {"denoise": denoising_loss(ldm, latents, cond, generator).mean()}
        scale = self.encoder.mapper.scale
        out["reg"] = sum((((p - i) / s) ** 2).sum(-1).mean() for p, i, s in zip(pred, init, scale))
        have = [b for b, t in enumerate(batch["target_vectors"]) if t is not None]
        for b in have:  # targets made with another model would be distilled toward silently (or crash)
            got = [tuple(t.shape) for t in batch["target_vectors"][b]]
            want = [tuple(p.shape[1:]) for p in pred]
            if got != want:
                raise InputError(
                    f"the target of concept {batch['key'][b]!r} has shape(s) {got}; this model's words "
                    f"are {want}: make the targets with this model (ti data targets --model ...)"
                )
        out["distill"] = torch.zeros((), device=self.device)
        if have and h.distill_weight > 0:
            for j, s in enumerate(scale):
                tgt = torch.stack([batch["target_vectors"][b][j] for b in have]).to(self.device)
                out["distill"] = out["distill"] + (((pred[j][have] - tgt) / s) ** 2).sum(-1).mean()
        out["loss"] = out["denoise"] + h.reg_weight * out["reg"] + h.distill_weight * out["distill"]
        return out

    def noise_seed(self, batch_idx: int) -> int:
        """Seed of a training micro-batch's noise and timesteps: its own per step, per rank and per
        accumulated micro-batch (rank 0's first micro-batch keeps the single-device seed)."""
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        stream = self.global_rank * accumulate + batch_idx % accumulate
        return self.hparams.seed * 1_000_003 + self.global_step + 1_000_000_007 * stream

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.noise_seed(batch_idx))
        out = self.losses(batch, gen)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(
                f"encoder loss became {out['loss'].item()} at step {self.global_step}; "
                "lower model.lr or use precision 32"
            )
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=False, batch_size=len(batch["refs"])
        )
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=len(batch["refs"]))
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        gen = torch.Generator().manual_seed(10_000 + batch_idx)  # the same noise at every validation
        state = self._rng.getstate()
        self._rng = random.Random(batch_idx)
        out = self.losses(batch, gen)
        self._rng.setstate(state)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=len(batch["refs"]))

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.encoder.mapper.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 10_000
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, total, 1.0, warmup=h.warmup_steps, floor=0.1)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def start_from(encoder: ConceptEncoder, path: str | Path) -> None:
    """Load the mapper weights of the exported encoder at ``path`` into ``encoder``, whose
    config must describe the same architecture for the same text encoders."""
    src = load_encoder(
        path,
        space=encoder.space,
        missing="--model.init_from takes an encoder.safetensors that ti-train-encoder exported",
    )
    mine, theirs = _architecture(encoder.cfg), _architecture(src.cfg)
    differ = [k for k in mine if not _same(mine[k], theirs[k])]
    if differ:
        detail = ", ".join(f"{k}: file {theirs[k]!r}, config {mine[k]!r}" for k in differ)
        raise InputError(
            f"{path} does not fit this encoder config ({detail}); set the model options "
            "to the file's (its header has them) or train from fresh weights"
        )
    encoder.mapper.load_state_dict(src.mapper.state_dict())
    logger.info("encoder weights start from %s", path)


def _architecture(cfg: EncoderConfig) -> dict:
    """The config's fields that decide the mapper's weights and what they mean: not the model's
    name, nor settings of parts the encoder does not have."""
    out = asdict(cfg)
    del out["model"]
    if not cfg.map_channels:
        del out["map_width"]
    if not cfg.unet_dim:
        del out["unet_layout"]
    if cfg.clip not in ("toy", "random") and not cfg.clip.startswith("toy:"):
        arch, _, tag = cfg.clip.partition(":")
        out["clip"] = f"{arch}:{tag or 'openai'}"  # load_space's default tag
    return out


def _same(a, b) -> bool:
    """Equal, with floats (the offset scales, medians of the model's word norms) within 2 %: the
    same model loaded in bf16 and in fp32 gives slightly different ones."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0.02)
    return a == b


def _blank() -> Image.Image:
    return Image.new("RGB", (32, 32), (128, 128, 128))


class ExportEncoder(L.Callback):
    """Write the slim encoder file (``<log dir>/encoder.safetensors`` unless ``path`` is given).

    Without ``monitor`` it is written after every validation and at the end of training, so it holds
    the latest weights. With ``monitor`` (a logged metric such as ``val/distill``) it is written only
    when that metric reaches a new best (lowest for ``mode="min"``), so it holds the best validated
    weights: model selection against the overfitting a long run brings. The best value survives
    ``--ckpt_path last`` resumes (it is kept in the checkpoint), and the file's header records the
    step and the value.
    """

    def __init__(self, path: str | None = None, monitor: str | None = None, mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.path = path
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None

    def _export(self, trainer: L.Trainer, module: EncoderModule, extra: dict[str, str] | None = None) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        save_encoder(
            module.encoder, self.target(trainer), {"step": str(trainer.global_step), **(extra or {})}
        )

    def target(self, trainer: L.Trainer) -> Path:
        """The file this callback writes for ``trainer``'s run."""
        return (
            Path(self.path)
            if self.path
            else Path(trainer.log_dir or trainer.default_root_dir) / "encoder.safetensors"
        )

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_validation_end(self, trainer: L.Trainer, module: EncoderModule) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor is None:
            self._export(trainer, module)
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            raise KeyError(
                f"ExportEncoder monitors {self.monitor!r}, which validation did not log "
                f"(an empty validation split logs nothing: too few concepts for "
                f"data.val_fraction?); logged: {sorted(trainer.callback_metrics)}"
            )
        value = float(metric)
        if not math.isnan(value) and self._improved(value):  # NaN never counts as best
            self.best = value
            self._export(trainer, module, {"monitor": self.monitor, "best": repr(value)})
            logger.info(
                "exported the encoder at step %d: %s = %.4g (best so far)",
                trainer.global_step,
                self.monitor,
                value,
            )

    def on_train_end(self, trainer: L.Trainer, module: EncoderModule) -> None:
        if self.monitor is None or self.best is None:
            self._export(trainer, module)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")


class CheckpointOnInterrupt(OnExceptionCheckpoint):
    """Save the training state when Ctrl-C stops a fit after at least one step (``--ckpt_path
    last`` takes the newer of it and ``last.ckpt``). Other exceptions save nothing: a fit that
    fails before its first step would otherwise leave a fresh model's state that looks newer than
    an earlier run's ``last.ckpt``."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > 0:
            super().on_exception(trainer, pl_module, exception)


def refuse_replacing_an_export(trainer: L.Trainer, ckpt_path: str | None) -> None:
    """A fresh fit in a folder whose encoder was exported would replace that encoder at its first
    validation (a rerun of the same command without ``--ckpt_path last``)."""
    for cb in trainer.callbacks:
        if isinstance(cb, ExportEncoder) and ckpt_path is None and cb.target(trainer).is_file():
            raise InputError(
                f"{cb.target(trainer)} exists: continue its run with --ckpt_path last, or move the "
                "file (or run in another folder) to train a new encoder"
            )
