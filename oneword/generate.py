"""Local editing with a learned word (Blended Latent Diffusion) and img2img, for every model family.

Neither needs an inpainting model: both run the model's own UNet and scheduler in a short denoising
loop of their own (classifier-free guidance, SDXL's added conditioning through
:func:`~oneword.inversion.loss.unet_forward`, prompts with learned words through
:meth:`FrozenLDM.encode_text`).

- **img2img** (SDEdit, as diffusers' img2img pipelines do it): the init image's latents are noised
  to the timestep ``strength`` selects (the last ``int(steps * strength)`` of ``steps``), then
  denoised. ``strength`` 1 starts from pure noise (the image is ignored), a small one keeps it.
- **local editing** (Avrahami et al., *Blended Latent Diffusion*, 2023): as img2img, and after every
  step the latents outside the mask are replaced by the init image's latents noised to the next
  step's timestep (the same noise as the start, as diffusers' inpainting pipelines do), so that the
  edit is drawn in the context of the untouched surroundings; after the last step the outside is
  the init image's latents themselves. By default the decoded result is then pasted over the
  original inside the mask only (BLD's pixel blending): the VAE does not reconstruct an image
  exactly, and this keeps every pixel outside the mask as it was.

The mask is white (>= 128) where the prompt may change the image. At the latent grid (one cell per
8 x 8 pixels for Stable Diffusion) a cell is edited when at least half of its pixels are white
(area average, then a hard threshold at 0.5, as BLD thresholds its mask): a soft latent mask would
mix noisy latents of two noise levels, which the UNet has never seen.

Each image has its own CPU generator seeded with its seed (its start noise and any noise the
scheduler's step draws), so images do not depend on the batch they are drawn in, nor the device.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from oneword.data.images import DEFAULT_MAX_PIXELS, image_to_tensor, load_image, resize_and_crop
from oneword.errors import InputError, OneWordError
from oneword.fileio import sha256_file
from oneword.inversion.bank import vae_encode, vae_in_safe_dtype
from oneword.inversion.loss import unet_forward
from oneword.models import FrozenLDM, TextConditioning
from oneword.sampling import SampleSettings, negative_conditioning, sampler

logger = logging.getLogger(__name__)

IMG2IMG_STRENGTH = 0.8
"""Default strength without a mask (diffusers' img2img default): the layout and colours of the init
image survive, the details are redrawn."""
MASKED_STRENGTH = 1.0
"""Default strength with a mask. BLD's code starts from pure noise (it skips the first 25 % of the
steps, but its starting latents hold nothing of the image), so nothing of what was inside the mask
constrains the edit; strength 1 does the same over all steps. A lower strength starts the inside
from the noised original instead (the paper's Algorithm 1 with k < T)."""


@dataclass(frozen=True)
class InitImage:
    """An init image and an optional mask, as loaded (any size, not yet cropped)."""

    image: Image.Image
    """RGB pixels."""
    name: str
    """The file it came from (for the grid's metadata)."""
    sha256: str
    """SHA-256 of the file's bytes."""
    mask: Image.Image | None = None
    """``L`` pixels; white (>= 128) is the region to edit."""
    mask_name: str | None = None
    mask_sha256: str | None = None

    def at(self, size: int) -> tuple[Image.Image, Image.Image | None]:
        """The image centre-cropped to a square and resized to ``size`` (as reference images are),
        and the mask cropped the same way and thresholded to 0 / 255."""
        image = resize_and_crop(self.image, size)
        if self.mask is None:
            return image, None
        mask = resize_and_crop(self.mask.convert("RGB"), size).convert("L")
        return image, mask.point(lambda v: 255 if v >= 128 else 0)


def load_init(
    image: str | Path, mask: str | Path | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> InitImage:
    """Load an init image and an optional mask (any image file; its gray level is used).

    Raises :class:`InputError` (or its :class:`~oneword.errors.ImageError`) for a missing or
    unusable file, a mask whose aspect ratio is not the image's, or a mask with no white pixel.
    """
    path = Path(image)
    pixels = load_image(path, max_pixels=max_pixels)
    if mask is None:
        return InitImage(pixels, str(path), sha256_file(path))
    mpath = Path(mask)
    gray = load_image(mpath, max_pixels=max_pixels).convert("L")
    (w, h), (mw, mh) = pixels.size, gray.size
    if abs(mw * h - w * mh) > 0.01 * w * mh:
        raise InputError(
            f"mask {mpath} is {mw}x{mh} and init image {path} is {w}x{h}: give a mask of the "
            "image's shape (white = the region to edit)"
        )
    if max(gray.getextrema()) < 128:
        raise InputError(
            f"mask {mpath} has no white pixel: nothing to edit (white, >= 128, = the region to edit)"
        )
    return InitImage(pixels, str(path), sha256_file(path), gray, str(mpath), sha256_file(mpath))


def resolve_strength(strength: float | None, masked: bool) -> float:
    """``strength``, or its default (:data:`MASKED_STRENGTH` with a mask, else
    :data:`IMG2IMG_STRENGTH`); one outside (0, 1] raises :class:`OneWordError`."""
    if strength is None:
        return MASKED_STRENGTH if masked else IMG2IMG_STRENGTH
    if not 0.0 < strength <= 1.0:
        raise OneWordError(f"--strength must be in (0, 1] (1 = start from pure noise), got {strength}")
    return float(strength)


def steps_to_run(steps: int, strength: float) -> int:
    """How many of ``steps`` denoising steps ``strength`` runs (diffusers' img2img rule:
    ``int(steps * strength)``); none raises :class:`OneWordError`."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise OneWordError(
            f"--strength {strength} with {steps} steps runs no denoising step: raise --strength to at "
            f"least {1 / steps:.3g} or --steps to at least {int(np.ceil(1 / strength))}"
        )
    return run


def edit_metadata(init: InitImage, strength: float, paste: bool) -> dict[str, str]:
    """What a grid's PNG records about its init image, mask and strength."""
    meta = {"init_image": init.name, "init_image_sha256": init.sha256, "strength": str(strength)}
    if init.mask is not None:
        meta.update(mask=init.mask_name or "", mask_sha256=init.mask_sha256 or "", paste=str(paste))
    return meta


@torch.no_grad()
def edit_images(
    model: FrozenLDM,
    prompts: Sequence[str],
    settings: SampleSettings,
    init: InitImage,
    strength: float | None = None,
    paste: bool = True,
    progress: Callable[[int], object] | None = None,
) -> list[Image.Image]:
    """img2img (no mask) or local editing (a mask) of ``init``: one image per (prompt, seed),
    prompt-major, ``settings.batch`` seeds per denoising loop, like
    :func:`~oneword.sampling.generate_images` (same scheduler choice, guidance and negative prompt).

    ``strength`` defaults to :data:`MASKED_STRENGTH` with a mask and :data:`IMG2IMG_STRENGTH`
    without. ``paste`` puts the original's pixels back outside the mask after decoding.
    """
    strength = resolve_strength(strength, init.mask is not None)
    steps_to_run(settings.steps, strength)
    size = settings.resolution or model.resolution
    if size % model.vae_scale_factor:
        raise OneWordError(f"the resolution must be a multiple of {model.vae_scale_factor}, got {size}")
    if min(init.image.size) < size:
        logger.warning(
            "the init image (%dx%d) is smaller than the %d px resolution: it is upscaled",
            *init.image.size,
            size,
        )
    image, mask = init.at(size)
    latents = encode_image(model, image)
    cell = None
    if mask is not None:
        cell = latent_mask(mask, latents.shape[-1])
        if not cell.any():
            raise InputError(
                f"the mask's white region covers no latent cell of {model.vae_scale_factor}x"
                f"{model.vae_scale_factor} px by half at {size} px: enlarge it"
            )
    chunks = [settings.seeds[i : i + settings.batch] for i in range(0, len(settings.seeds), settings.batch)]
    sizes = {len(c) for c in chunks}
    uncond = {n: negative_conditioning(model, settings.negative_prompt, n) for n in sizes}
    images: list[Image.Image] = []
    flagged = 0
    with sampler(model, settings.scheduler):
        for prompt in prompts:
            conds = {n: model.encode_text([prompt] * n) for n in sizes}
            for seeds in chunks:
                z = denoise_from(
                    model, conds[len(seeds)], uncond[len(seeds)], seeds, settings, latents, strength, cell
                )
                drawn, blacked = decode_latents(model, z)
                if mask is not None and paste:
                    drawn = [Image.composite(im, image, mask) for im in drawn]
                images.extend(drawn)
                flagged += blacked
            if progress is not None:
                progress(len(settings.seeds))
    if flagged:
        logger.warning("%d of %d images were blacked out by the model's safety checker", flagged, len(images))
    return images


def latent_mask(mask: Image.Image, side: int) -> torch.Tensor:
    """``[1, 1, side, side]`` bool: the latent cells at least half white in ``mask`` (area average)."""
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(m, size=(side, side), mode="area") >= 0.5


def _scale_shift(model: FrozenLDM) -> tuple[float, float]:
    cfg = model.vae.config
    return float(cfg.scaling_factor), float(cfg.get("shift_factor", None) or 0.0)


@torch.no_grad()
def encode_image(model: FrozenLDM, image: Image.Image) -> torch.Tensor:
    """The image's latents (``[1, c, h, w]``, fp32, scaled and shifted as the UNet sees them): the
    mean of the VAE's latent distribution, not a sample, so that the kept region does not change
    with the seed."""
    scale, shift = _scale_shift(model)
    with vae_in_safe_dtype(model.vae) as dtype:
        dist = vae_encode(model.vae, image_to_tensor(image)[None].to(model.device, dtype))
    return (dist.mean.float() - shift) * scale


@torch.no_grad()
def decode_latents(model: FrozenLDM, latents: torch.Tensor) -> tuple[list[Image.Image], int]:
    """Images from UNet latents (the VAE in fp32 when its weights are fp16), through the model's
    safety checker where it has one; and how many that checker blacked out."""
    scale, shift = _scale_shift(model)
    with vae_in_safe_dtype(model.vae) as dtype:
        x = model.vae.decode((latents / scale + shift).to(model.device, dtype)).sample.float()
    flagged = 0
    pipe = model.pipeline
    if getattr(pipe, "safety_checker", None) is not None:  # as the stock pipeline: flagged -> black
        x, nsfw = pipe.run_safety_checker(x, model.device, model.dtype)
        for i, bad in enumerate(nsfw or []):
            if bad:
                x[i] = -1.0
                flagged += 1
    x = (x / 2 + 0.5).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr], flagged


@torch.no_grad()
def denoise_from(
    model: FrozenLDM,
    cond: TextConditioning,
    negative: TextConditioning,
    seeds: Sequence[int],
    settings: SampleSettings,
    init: torch.Tensor,
    strength: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One denoising loop with the model's current scheduler: clean latents (``[len(seeds), c, h,
    w]``, fp32) from ``init`` (``[1, c, h, w]``) noised to ``strength``'s timestep, blended with the
    noised ``init`` outside ``mask`` (``[1, 1, h, w]`` bool) after every step when given.

    ``cond`` and ``negative`` have ``len(seeds)`` rows. Guidance above 1 runs the negative and the
    prompt as one UNet batch (as diffusers does); at 1 or below only the prompt.
    """
    sched = model.pipeline.scheduler
    steps = settings.steps
    run = steps_to_run(steps, strength)
    sched.set_timesteps(steps, device=model.device)  # also resets a stateful scheduler's step index
    start = (steps - run) * sched.order
    timesteps = sched.timesteps[start:]
    if hasattr(sched, "set_begin_index"):  # index-based schedulers (Euler) find their sigma from it
        sched.set_begin_index(start)
    n = len(seeds)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(init.shape[1:], generator=g) for g in gens]).to(model.device)
    init = init.to(model.device).expand(n, -1, -1, -1)
    if strength >= 1.0:  # pure noise, as text-to-image starts (diffusers' inpainting does the same)
        latents = noise * sched.init_noise_sigma
    else:
        latents = sched.add_noise(init, noise, timesteps[:1].repeat(n))
    keep = None if mask is None else mask.to(model.device)
    guided = settings.guidance > 1.0
    both = (
        TextConditioning(
            torch.cat([negative.hidden_states, cond.hidden_states]),
            None if cond.pooled is None else torch.cat([negative.pooled, cond.pooled]),
        )
        if guided
        else cond
    )
    extra = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
    for i, t in enumerate(timesteps):
        x = torch.cat([latents, latents]) if guided else latents
        pred = unet_forward(model, sched.scale_model_input(x, t), t, both).float()
        if guided:
            uncond, text = pred.chunk(2)
            pred = uncond + settings.guidance * (text - uncond)
        latents = sched.step(pred, t, latents, **extra).prev_sample.float()
        if keep is not None:
            if i < len(timesteps) - 1:
                outside = sched.add_noise(init, noise, timesteps[i + 1 : i + 2].repeat(n))
            else:
                outside = init
            latents = torch.where(keep, latents, outside)
    return latents
