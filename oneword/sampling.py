"""Sample images from prompts that use learned pseudo-words (``ti generate``, previews, evaluation).

Prompts are encoded by :meth:`FrozenLDM.encode_text` (placeholders expanded, vectors injected) and
handed to the diffusers pipeline as ``prompt_embeds``: generation conditions on exactly what the
training saw, whatever the pipeline's own prompt handling would do with added tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from oneword.imagegrid import auto_zoom, image_grid, save_png
from oneword.models import FrozenLDM, TextConditioning

logger = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    """How images are sampled."""

    steps: int = 50
    """Denoising steps."""
    scheduler: str | None = None
    """``ddim`` samples with DDIM (the paper's evaluation sampler) whatever the model's own
    scheduler is (PNDM for SD 1.5, Euler for SDXL); ``None`` keeps the model's."""
    guidance: float = 7.5
    """Classifier-free guidance scale."""
    negative_prompt: str = ""
    """What the guidance steers away from."""
    resolution: int | None = None
    """Image side in pixels; default: the model's native resolution."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One image per seed and prompt."""
    batch: int = 4
    """Images per pipeline call. Each image has its own seeded generator, so the batch sets the
    memory a call needs (SDXL at 1,024 px needs much more per image than SD 1.5), not the images."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.scheduler not in (None, "ddim"):
            raise ValueError(f"scheduler must be None or 'ddim', got {self.scheduler!r}")


def negative_conditioning(model: FrozenLDM, negative_prompt: str, n: int) -> TextConditioning:
    """The unconditional side of guidance, as the stock pipeline builds it: SDXL's config
    (``force_zeros_for_empty_prompt``) takes zeros for an empty negative prompt, not its encoding."""
    cond = model.encode_text([negative_prompt] * n)
    if negative_prompt or not model.pipeline.config.get("force_zeros_for_empty_prompt", False):
        return cond
    return TextConditioning(
        torch.zeros_like(cond.hidden_states), None if cond.pooled is None else torch.zeros_like(cond.pooled)
    )


@contextmanager
def sampler(model: FrozenLDM, name: str | None) -> Iterator[None]:
    """Sample with ``name``'s scheduler (``ddim``) inside, with the model's own outside."""
    from diffusers import DDIMScheduler

    pipe = model.pipeline
    if name is None or isinstance(pipe.scheduler, DDIMScheduler):
        yield
        return
    own = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(own.config)
    try:
        yield
    finally:
        pipe.scheduler = own


@torch.no_grad()
def generate_images(
    model: FrozenLDM,
    prompts: Sequence[str],
    settings: SampleSettings,
    progress: Callable[[int], object] | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major, ``settings.batch`` seeds per pipeline call. CPU
    generators make seeds portable across devices. ``progress`` is called with each prompt's image
    count when its images are drawn. Images the model's safety checker blacked out are counted in a
    warning (they would silently lower any score made from them)."""
    size = settings.resolution or model.resolution
    images: list[Image.Image] = []
    flagged = 0
    chunks = [settings.seeds[i : i + settings.batch] for i in range(0, len(settings.seeds), settings.batch)]
    sizes = {len(c) for c in chunks}  # at most two: the full batch and the remainder
    uncond = {n: negative_conditioning(model, settings.negative_prompt, n) for n in sizes}
    with sampler(model, settings.scheduler):
        for prompt in prompts:
            conds = {n: model.encode_text([prompt] * n) for n in sizes}
            for seeds in chunks:
                drawn, blacked = sample_conditioned(
                    model,
                    conds[len(seeds)],
                    uncond[len(seeds)],
                    seeds,
                    settings.steps,
                    settings.guidance,
                    size,
                )
                images.extend(drawn)
                flagged += blacked
            if progress is not None:
                progress(len(settings.seeds))
    if flagged:
        logger.warning(
            "%d of %d images were blacked out by the model's safety checker (scores made from them "
            "count them as drawn)",
            flagged,
            len(images),
        )
    return images


@torch.no_grad()
def sample_conditioned(
    model: FrozenLDM,
    cond: TextConditioning,
    negative: TextConditioning,
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    size: int,
) -> tuple[list[Image.Image], int]:
    """One pipeline call: an image per seed (its own CPU generator) from prompt embeddings already
    made (``len(seeds)`` rows each), with the model's current scheduler; returns the images and how
    many the safety checker blacked out."""
    kwargs = dict(prompt_embeds=cond.hidden_states, negative_prompt_embeds=negative.hidden_states)
    if cond.pooled is not None:
        kwargs.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=negative.pooled)
    out = model.pipeline(
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pil",
        **kwargs,
    )
    return list(out.images), sum(bool(f) for f in (getattr(out, "nsfw_content_detected", None) or []))


def render_grid(
    model: FrozenLDM,
    prompts: Sequence[str],
    settings: SampleSettings,
    out: str | Path,
    extra_metadata: dict[str, str] | None = None,
    images: Sequence[Image.Image] | None = None,
    zoom: int | None = None,
) -> Path:
    """Generate and save a grid (a row per prompt, a column per seed) with its settings in the PNG;
    ``images`` (prompt-major, one per seed) are saved instead of generating (curated samples).
    ``zoom`` enlarges each image (nearest neighbour); by default images under
    :data:`~oneword.imagegrid.MIN_TILE` px are enlarged to at least that, others kept."""
    images = list(images) if images is not None else generate_images(model, prompts, settings)
    zoom = zoom if zoom is not None else auto_zoom(min(images[0].size))
    grid = image_grid(images, cols=len(settings.seeds), zoom=zoom)
    meta = {
        "zoom": str(zoom),
        "prompts": json.dumps(list(prompts)),
        "seeds": json.dumps(settings.seeds),
        "steps": str(settings.steps),
        "guidance": str(settings.guidance),
        "negative_prompt": settings.negative_prompt,
        "model": model.source,
        **(extra_metadata or {}),
    }
    return save_png(grid, out, meta)
