"""The settings of one textual-inversion run, as a self-validating dataclass.

Defaults follow the paper and its official code (Gal et al. 2022): base learning rate 5e-3 scaled
by batch size x gradient accumulation, AdamW, the ``object`` template list, flips as the only
augmentation, 5,000 steps. The run folder keeps these settings in ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import yaml

from oneword.trainstate import warmup_cosine

MixedPrecision = Literal["no", "fp16", "bf16"]


def weights_dtype(mixed_precision: str) -> str:
    """The ``load_model`` dtype of a ``mixed_precision`` setting (``no`` keeps fp32)."""
    return {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[mixed_precision]


#: Fields that tools running many inversions (curves, ti-encode) set per run themselves.
PER_RUN_FIELDS = frozenset(
    {
        "token",
        "init",
        "steps",
        "save_every",
        "preview_every",
        "preview_prompts",
        "preview_seeds",
        "preview_steps",
    }
)


@dataclass
class InversionConfig:
    """Everything that determines a textual-inversion run (model and images aside)."""

    token: str = "<concept>"
    """The new pseudo-word, e.g. ``<my-cat>``; it must not already be a word of the vocabulary."""
    init: str = "object"
    """Initializer word(s) the vectors start from (e.g. ``cat`` or ``ceramic cat``)."""
    num_vectors: int = 1
    """Vectors per token (the paper uses 1; more capture more detail and edit worse)."""
    progressive_every: int = 0
    """Progressive extension (the paper's variant): train one vector first and add the next of
    ``num_vectors`` every N steps; 0 trains all from the start. Vectors not yet added hold the
    initializer in the word files written meanwhile."""
    per_image_tokens: bool = False
    """The paper's per-image-token ablation: a shared word plus one vector per reference image,
    trained on prompts such as "a photo of a {S*} with {S_i}"; only the shared word is written."""
    template: Literal["object", "style", "toy"] = "object"
    """Prompt templates to train with: the paper's object or style lists, or toy (for --model toy,
    whose text encoder knows only toy-caption words)."""
    steps: int = 5000
    """Optimization steps (the paper uses 5,000)."""
    batch_size: int = 4
    """Views per step."""
    grad_accum: int = 1
    """Steps of gradient accumulation per optimizer step."""
    base_lr: float = 5e-3
    """Base learning rate; the effective rate is ``base_lr * batch_size * grad_accum`` when ``scale_lr``."""
    scale_lr: bool = True
    """Scale the base rate by batch size x accumulation, as the official code does."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """``constant`` (the paper) or ``cosine``: decay from the rate to 0 over ``steps``, so a short
    refinement ends settled instead of at a noisy step."""
    weight_decay: float = 1e-2
    """AdamW weight decay on the learned vectors (the official code's default)."""
    reg_weight: float = 0.0
    """Weight of an L2 pull toward the initializer embedding (official ``embedding_reg_weight``)."""
    resolution: int | None = None
    """Training image side in pixels; default: the model's native resolution."""
    flip_p: float = 0.5
    """Probability of a horizontal flip per view."""
    random_crop: bool = False
    """Random square crops (70-100 % of the short side) instead of centre crops."""
    views_per_image: int = 8
    """Augmented views per reference image, each VAE-encoded once."""
    seed: int = 0
    """Seed of everything random: views, prompts, noise, timesteps."""
    mixed_precision: MixedPrecision = "no"
    """Frozen weights in fp16/bf16 (learned vectors stay fp32). ``no`` keeps fp32 everywhere."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: less memory, about 20-30 % slower."""
    save_every: int = 500
    """Checkpoint (and embedding files) every N steps; 0 saves only at the end."""
    preview_every: int = 500
    """Preview grid every N steps; 0 disables previews."""
    preview_prompts: list[str] = field(default_factory=list)
    """Prompts for the preview grids (``{}`` or the token mark the placeholder); default: two."""
    preview_seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Fixed seeds of the preview images, one column each."""
    preview_steps: int = 25
    """Sampling steps of preview images."""
    max_pixels: int = 64 * 1024 * 1024
    """Refuse reference images with more pixels than this (decompression-bomb guard)."""

    def __post_init__(self) -> None:
        positive = ("num_vectors", "steps", "batch_size", "grad_accum", "views_per_image", "preview_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "preview_every", "reg_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p is a probability (0 to 1), got {self.flip_p}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be positive, got {self.base_lr}")
        if self.template not in ("object", "style", "toy"):
            raise ValueError(f"template must be 'object', 'style' or 'toy', got {self.template!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not self.init.strip():
            raise ValueError("init must name at least one word")
        if self.progressive_every < 0:
            raise ValueError(f"progressive_every must be >= 0, got {self.progressive_every}")
        if self.progressive_every and self.num_vectors < 2:
            raise ValueError(
                "progressive_every adds vectors one at a time: it needs num_vectors of 2 or more"
            )
        if self.progressive_every and self.progressive_every * (self.num_vectors - 1) >= self.steps:
            raise ValueError(
                f"with progressive_every {self.progressive_every} the last of {self.num_vectors} vectors "
                f"would join at step {self.progressive_every * (self.num_vectors - 1)}, not before the "
                f"run's {self.steps} steps: lower progressive_every or raise steps"
            )
        if self.progressive_every and self.per_image_tokens:
            raise ValueError("progressive_every and per_image_tokens are separate variants: choose one")

    @property
    def lr(self) -> float:
        """The learning rate actually used."""
        return self.base_lr * (self.batch_size * self.grad_accum if self.scale_lr else 1)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) under :attr:`lr_schedule`."""
        if self.lr_schedule == "constant":
            return self.lr
        return warmup_cosine(min(step, self.steps), self.steps, self.lr, warmup=0)

    def vectors_at(self, step: int) -> int:
        """How many of the word's vectors train at optimizer step ``step`` (0-based)."""
        if not self.progressive_every:
            return self.num_vectors
        return min(self.num_vectors, 1 + step // self.progressive_every)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InversionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown inversion settings: {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, text: str) -> InversionConfig:
        return cls.from_dict(yaml.safe_load(text) or {})
