"""The group engine: the one optimizer of textual inversion, for one concept or many at once.

A :class:`GroupEngine` holds up to ``capacity`` concepts ("slots") on one frozen model. Each slot
owns everything that makes its trajectory: its vectors (the only parameters), its latent bank, its
AdamW moments, learning-rate schedule, step count and budget (``cfg.steps``), and its random
generators (views, noise and timesteps from one CPU generator, prompts from one ``random.Random``,
both seeded from ``cfg.seed``). :meth:`GroupEngine.step` draws every active slot's batch from its
own generators, stacks the batches, and makes one call of the shared
:func:`~oneword.inversion.loss.denoising_loss` and one backward pass for all of them.

The objective is the *sum* of the slots' own objectives, so each slot's gradient is exactly its
single-run gradient, and each slot's AdamW steps it as a run alone would: a concept's trajectory
does not depend on who shares its group, up to the order of floating-point sums inside the batched
UNet (tested). Slots join (:meth:`~GroupEngine.add`) and leave (:meth:`~GroupEngine.remove`)
between steps with their own budgets and settings, so a finished concept frees its slot at once.

Prompts use one internal placeholder per vector count (:func:`group_token`); the text encoder reads
each sample's vectors from ``batch_vectors``, so the model's tokenizer does not grow with the
number of concepts, and the concepts' own tokens never meet in one vocabulary.

Two variants of the paper live in a slot's settings. With ``cfg.progressive_every`` every vector
is a parameter of its own and the prompts name only the first :meth:`~InversionConfig.vectors_at`:
the others have no gradient, so AdamW leaves them where they started (no decay, no step count)
and a vector that joins starts its moments and bias correction afresh, as a new word would. With
``cfg.per_image_tokens`` the slot also owns one vector per reference image (rows after the word's,
each starting at the mean of the word's start) and each sample's prompt ends "with {S_i}" for the
image its view came from (:func:`image_token`); only the word's rows are its result.

What slots of one group must share: the model, and the latent size (the training resolution).
With fp16 weights on CUDA one gradient scaler serves the group; its scale is the one group-wide
state (it only skips steps whose fp16 gradients overflowed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from oneword.errors import InputError, TokenError
from oneword.inversion.bank import LatentBank, bank_for_run
from oneword.inversion.checkpoint import TrainState, restore_prompt_rng
from oneword.inversion.config import InversionConfig
from oneword.inversion.loss import denoising_loss, draw_noise, grad_scaler
from oneword.inversion.templates import sample_prompts
from oneword.models import FrozenLDM
from oneword.trainstate import load_optimizer, optimizer_tensors

GROUP_PREFIX = "<ow-group-"


def group_token(num_vectors: int) -> str:
    """The internal placeholder the engine trains ``num_vectors``-vector words on."""
    return f"{GROUP_PREFIX}{num_vectors}>"


def image_token(index: int) -> str:
    """The internal one-vector placeholder of reference image ``index`` (per-image tokens)."""
    return f"{GROUP_PREFIX}img-{index}>"


@dataclass
class SlotResult:
    """What a slot leaves behind when it is removed."""

    slot: int
    vectors: list[torch.Tensor]
    """One ``[n, width]`` fp32 CPU tensor per text encoder."""
    step: int
    loss: float | None
    """The objective of its last step (``None`` before the first)."""
    error: str | None = None
    """Why it stopped early (its loss or vectors stopped being finite); the vectors are the last good ones."""


class Slot:
    """One concept in a group: its vectors, bank, optimizer, schedule, budget and generators."""

    def __init__(
        self,
        sid: int,
        cfg: InversionConfig,
        start: list[torch.Tensor],
        anchor: list[torch.Tensor],
        bank: LatentBank,
        device: torch.device,
        name: str,
        images: int = 0,
    ) -> None:
        self.id, self.cfg, self.bank, self.name = sid, cfg, bank, name
        self.images = images
        """Per-image vectors held after the word's rows (0 without ``cfg.per_image_tokens``)."""
        rows = [torch.cat([v, v.mean(0, keepdim=True).expand(images, -1)]) for v in start]
        pieces = [list(v.split(1)) if cfg.progressive_every else [v] for v in rows]
        self.leaves = [
            [r.detach().float().to(device).clone().requires_grad_(True) for r in encoder]
            for encoder in pieces
        ]
        """Per text encoder, the tensors the optimizer steps: one for all rows, or one per row
        (progressive extension)."""
        self.params = [p for encoder in self.leaves for p in encoder]
        self.anchor = [v.detach().float().to(device) for v in anchor]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)
        self.prompt_rng = random.Random(cfg.seed)
        self.step = 0
        self.loss: float | None = None
        self.error: str | None = None

    @property
    def num_vectors(self) -> int:
        """The word's vectors (what :meth:`vectors` returns)."""
        return self.cfg.num_vectors

    @property
    def training_vectors(self) -> int:
        """How many of the word's vectors this slot's next step trains (progressive extension)."""
        return self.cfg.vectors_at(self.step)

    @property
    def active(self) -> bool:
        """Still stepping: under its budget and not stopped by an error."""
        return self.error is None and self.step < self.cfg.steps

    def tables(self, rows: int | None = None) -> list[torch.Tensor]:
        """Per text encoder, the first ``rows`` (default: all) rows this slot learns (``[rows,
        width]``; gradients flow): the word's, then the per-image vectors. Rows past ``rows`` stay
        out of the graph, so a vector not yet added gets no gradient at all."""
        if all(len(encoder) == 1 for encoder in self.leaves):
            return [encoder[0][:rows] for encoder in self.leaves]
        return [torch.cat(encoder[:rows]) for encoder in self.leaves]

    def set_tables(self, tables: list[torch.Tensor]) -> None:
        """Overwrite every row (as :meth:`tables` lays them out)."""
        with torch.no_grad():
            for encoder, table in zip(self.leaves, tables):
                for leaf, rows in zip(encoder, table.split([p.shape[0] for p in encoder])):
                    leaf.copy_(rows.to(leaf.device))

    def vectors(self) -> list[torch.Tensor]:
        """The word: its ``num_vectors`` rows (vectors not yet added still at their start)."""
        return [t.detach()[: self.num_vectors].float().cpu().clone() for t in self.tables()]

    def prompt_words(self) -> dict[str, list[torch.Tensor]]:
        """The internal placeholders this slot's prompts name, with the rows they read (gradients flow)."""
        n = self.training_vectors
        tables = self.tables(None if self.images else n)
        words = {group_token(n): [t[:n] for t in tables]}
        for i in range(self.images):
            row = self.num_vectors + i
            words[image_token(i)] = [t[row : row + 1] for t in tables]
        return words

    def prompts(self, views: torch.Tensor) -> list[str]:
        """One training prompt per sampled view (indices into the bank), from the prompt generator."""
        texts = sample_prompts(
            self.cfg.template, group_token(self.training_vectors), len(views), self.prompt_rng
        )
        if not self.images:
            return texts
        per_image = len(self.bank) // self.images
        return [f"{t} with {image_token(int(v) // per_image)}" for t, v in zip(texts, views)]

    def regularizer(self) -> torch.Tensor:
        """Squared distance of the trained word vectors to the anchor, summed over the width, mean
        over the vectors, summed over encoders."""
        n = self.training_vectors
        return sum(((t[:n] - a[:n]) ** 2).sum(-1).mean() for t, a in zip(self.tables(n), self.anchor))


class GroupEngine:
    """Up to ``capacity`` concepts optimized together on ``model``; see the module docstring."""

    def __init__(self, model: FrozenLDM, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"a group holds at least one concept, got capacity {capacity}")
        self.model, self.capacity = model, capacity
        self.slots: dict[int, Slot] = {}
        self.scaler = grad_scaler(model)
        self._next_id = 0

    # ----------------------------------------------------------------- membership
    def __len__(self) -> int:
        return len(self.slots)

    @property
    def active(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.active]

    def add(
        self,
        images: Sequence[Image.Image],
        cfg: InversionConfig,
        start: list[torch.Tensor] | None = None,
        anchor: list[torch.Tensor] | None = None,
        name: str = "",
    ) -> int:
        """Add a concept; returns its slot id. ``start`` (one ``[n, width]`` tensor per text encoder)
        defaults to ``cfg.init``'s vectors; ``anchor``, the regularizer's target, to ``start``."""
        if len(self.slots) >= self.capacity:
            raise RuntimeError(f"the group is full ({self.capacity} concepts); remove one first")
        if not images:
            raise InputError(f"no reference images given{f' for {name}' if name else ''}")
        model = self.model
        if start is None or anchor is None:
            init = model.initializer_vectors(cfg.init, cfg.num_vectors)
            start = init if start is None else start
            anchor = start if anchor is None else anchor
        want = [(cfg.num_vectors, w) for w in model.widths]
        for what, vecs in (("start", start), ("anchor", anchor)):
            if [tuple(v.shape) for v in vecs] != want:
                raise ValueError(
                    f"a {what} has shapes {[tuple(v.shape) for v in vecs]}; this model and "
                    f"num_vectors need {want}"
                )
        bank = bank_for_run(model, list(images), cfg, cfg.seed)
        for other in self.slots.values():
            if other.bank.mean.shape[1:] != bank.mean.shape[1:]:
                raise ValueError(
                    f"the slots of a group share one resolution: {name or 'this concept'} has latents "
                    f"{tuple(bank.mean.shape[1:])}, the group {tuple(other.bank.mean.shape[1:])}"
                )
        images = len(images) if cfg.per_image_tokens else 0
        if cfg.per_image_tokens and len(bank) % images:
            raise ValueError(f"the bank's {len(bank)} views are not a whole number per image ({images})")
        sid = self._next_id
        self._next_id += 1
        slot = Slot(sid, cfg, list(start), list(anchor), bank, model.device, name, images)
        self._ensure_tokens(slot)
        self.slots[sid] = slot
        return sid

    def remove(self, sid: int) -> SlotResult:
        """Take a slot out of the group (finished or not) and return its word."""
        slot = self.slots.pop(sid)
        return SlotResult(sid, slot.vectors(), slot.step, slot.loss, slot.error)

    def slot(self, sid: int) -> Slot:
        return self.slots[sid]

    # ----------------------------------------------------------------- checkpoints
    def state(self, sid: int) -> TrainState:
        """Everything needed to continue slot ``sid`` exactly (with the group's gradient scale): copies,
        which later steps leave as they are."""
        slot = self.slots[sid]
        optim, groups = optimizer_tensors(slot.optimizer)
        return TrainState(
            step=slot.step,
            vectors=[t.detach().clone() for t in slot.tables()],
            optimizer={k: v.clone() for k, v in optim.items()},
            param_groups=groups,
            generator_state=slot.generator.get_state(),
            prompt_rng_state=slot.prompt_rng.getstate(),
            scaler=self.scaler.state_dict() if self.scaler else None,
        )

    def load(self, sid: int, ts: TrainState) -> None:
        """Continue slot ``sid`` from a :meth:`state`. The gradient scale is taken only when the slot
        is alone in its group; a group resumed whole calls :meth:`load_scaler`."""
        slot = self.slots[sid]
        if [tuple(v.shape) for v in ts.vectors] != [tuple(t.shape) for t in slot.tables()]:
            raise InputError("the checkpoint's vectors do not match this run's token/model settings")
        if ts.step > slot.cfg.steps:
            raise InputError(f"the checkpoint is at step {ts.step}, past this run's {slot.cfg.steps} steps")
        slot.set_tables(ts.vectors)
        load_optimizer(slot.optimizer, ts.optimizer, ts.param_groups)
        slot.generator.set_state(ts.generator_state)
        slot.prompt_rng = restore_prompt_rng(ts.prompt_rng_state)
        slot.step = ts.step
        if len(self.slots) == 1:
            self.load_scaler(ts)

    def load_scaler(self, ts: TrainState) -> None:
        """Take the group's gradient scale from a saved state (a group resumed whole; a slot that
        joins a running group keeps the group's scale)."""
        if self.scaler and ts.scaler:
            self.scaler.load_state_dict(ts.scaler)

    # ----------------------------------------------------------------- the step
    def step(self) -> dict[int, float]:
        """One optimizer step of every active slot; returns each stepped slot's objective.

        A slot whose loss or updated vectors stop being finite keeps its last good vectors, records
        why in ``error`` and stops; the others go on (check :attr:`Slot.error` after a step).
        """
        slots = self.active
        if not slots:
            return {}
        for s in slots:
            self._ensure_tokens(s)
        self._set_gradient_checkpointing(any(s.cfg.gradient_checkpointing for s in slots))
        for s in slots:  # what a step that raised (out of memory) left behind
            s.optimizer.zero_grad(set_to_none=True)
        befores = {s.id: [p.detach().clone() for p in s.params] for s in slots}
        totals = dict.fromkeys((s.id for s in slots), 0.0)
        for micro in range(max(s.cfg.grad_accum for s in slots)):
            members = [s for s in slots if s.error is None and s.cfg.grad_accum > micro]
            if members:
                self._accumulate(members, totals)
        stepped = [s for s in slots if s.error is None]
        for s in stepped:
            for group in s.optimizer.param_groups:
                group["lr"] = s.cfg.lr_at(s.step)
            if self.scaler:  # skips a step whose fp16 gradients overflowed
                self.scaler.step(s.optimizer)
            else:
                s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        if self.scaler and stepped:
            self.scaler.update()
        out = {}
        for s in stepped:
            if not all(torch.isfinite(p).all() for p in s.params):
                with torch.no_grad():
                    for p, b in zip(s.params, befores[s.id]):
                        p.copy_(b)
                s.error = (
                    f"the learned vectors became NaN/inf at step {s.step + 1} and were rolled back; "
                    "try a lower --base-lr"
                )
                continue
            s.step += 1
            s.loss = out[s.id] = totals[s.id]
        return out

    def _accumulate(self, members: list[Slot], totals: dict[int, float]) -> None:
        """One micro-batch of ``members``: a stacked forward, per-slot objectives, one backward."""
        model = self.model
        latents, noises, timesteps, prompts, sizes = [], [], [], [], []
        for s in members:  # each slot's own draws, in the order a run alone makes them
            lat, views = s.bank.sample_views(s.cfg.batch_size, s.generator)
            noise, t = draw_noise(model, lat, s.generator)
            latents.append(lat)
            noises.append(noise)
            timesteps.append(t)
            prompts += s.prompts(views)
            sizes.append(s.cfg.batch_size)
        cond = model.encode_text(prompts, batch_vectors=self._batch_vectors(members))
        per_sample = denoising_loss(
            model,
            torch.cat(latents).to(model.dtype),
            cond,
            None,
            timesteps=torch.cat(timesteps),
            noise=torch.cat(noises),
        )
        objective = None
        for s, losses in zip(members, per_sample.split(sizes)):
            loss = losses.mean()
            if s.cfg.reg_weight > 0:
                loss = loss + s.cfg.reg_weight * s.regularizer()
            if not torch.isfinite(loss):
                s.error = f"the loss became {loss.item()} at step {s.step + 1}; try a lower --base-lr" + (
                    " or fp32 weights (--mixed-precision no)" if model.dtype != torch.float32 else ""
                )
                s.optimizer.zero_grad(set_to_none=True)
                continue
            totals[s.id] += loss.item() / s.cfg.grad_accum
            term = loss / s.cfg.grad_accum
            objective = term if objective is None else objective + term
        if objective is not None:
            (self.scaler.scale(objective) if self.scaler else objective).backward()

    def _batch_vectors(self, members: list[Slot]) -> list[torch.Tensor]:
        """Per text encoder, ``[samples, new tokens, width]``: every sample's table of placeholder
        vectors, holding its slot's vectors at its group token's rows."""
        return self.model.placeholder_tables(
            [s.prompt_words() for s in members], [s.cfg.batch_size for s in members]
        )

    def _ensure_tokens(self, slot: Slot) -> None:
        """Add the internal placeholders ``slot``'s next prompts name (after the model's
        placeholders were cleared, too)."""
        for name, vectors in slot.prompt_words().items():
            n = int(vectors[0].shape[0])
            held = self.model.placeholder_tokens.get(name)
            if held is None:
                self.model.add_placeholder(name, [torch.zeros(n, w) for w in self.model.widths])
            elif held != n:
                raise TokenError(
                    f"{name} is reserved for the inversion engine; load that word under another token"
                )

    def _set_gradient_checkpointing(self, on: bool) -> None:
        unet = self.model.unet
        if on != bool(getattr(unet, "is_gradient_checkpointing", False)):
            unet.enable_gradient_checkpointing() if on else unet.disable_gradient_checkpointing()
