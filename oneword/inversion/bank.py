"""A bank of VAE latent distributions of the augmented reference images, encoded once.

The VAE is frozen, so the latent distribution of a given augmented view never changes during an
inversion. Instead of re-encoding every step (as diffusers' script and the official code do), we
draw a fixed set of augmented views per image (flips, random crops), encode each once, keep the
diagonal Gaussian's mean and std, and each step sample ``mean + std * eps`` from a random view:
the same distribution over latents as re-encoding that view, at no VAE cost per step.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from oneword.data.images import image_to_tensor, resize_and_crop
from oneword.models import FrozenLDM

logger = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    """How reference images become training views."""

    resolution: int
    """Side of the square views, in pixels."""
    flip_p: float = 0.5
    """Probability that a view is mirrored left-right (the paper's only augmentation)."""
    random_crop: bool = False
    """Crop a random square covering ``crop_scale`` of the shorter side instead of the centre."""
    crop_scale: tuple[float, float] = (0.7, 1.0)
    """Range of the crop side relative to the image's shorter side when ``random_crop``."""
    views_per_image: int = 8
    """Augmented views per image kept in the bank (1 when there is nothing to augment)."""

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.views_per_image < 1:
            raise ValueError("views_per_image must be at least 1")


def augmented_views(images: Sequence[Image.Image], aug: AugmentConfig, seed: int) -> list[Image.Image]:
    """The bank's views, deterministic in ``seed``: per image, view 0 is the plain centre crop."""
    augmenting = aug.flip_p > 0 or aug.random_crop
    per_image = aug.views_per_image if augmenting else 1
    rng = random.Random(seed)
    views = []
    for image in images:
        for k in range(per_image):
            if aug.random_crop and k > 0:
                view = resize_and_crop(image, aug.resolution, center=False, rng=rng, scale=aug.crop_scale)
            else:
                view = resize_and_crop(image, aug.resolution, center=True)
            if k > 0 and rng.random() < aug.flip_p:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(view)
    return views


@dataclass
class LatentBank:
    """Per-view latent distributions (``[views, c, h, w]`` mean and std, fp32 on the model device)."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    shift_factor: float = 0.0

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of ``batch_size`` random views, freshly sampled from their Gaussians."""
        return self.sample_views(batch_size, generator)[0]

    def sample_views(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample`'s latents and the (CPU) indices of the views they were drawn from."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        eps = torch.randn((batch_size, *self.mean.shape[1:]), generator=generator).to(self.mean.device)
        on = idx.to(self.mean.device)
        z = self.mean[on] + self.std[on] * eps
        return (z - self.shift_factor) * self.scaling_factor, idx


@contextmanager
def vae_in_safe_dtype(vae) -> Iterator[torch.dtype]:
    """Run ``vae`` in fp32 while inside when its weights are fp16 (SD's VAE, SDXL's above all,
    overflows in fp16); yields the dtype its inputs must have, and restores the weights after."""
    orig = vae.dtype
    run = torch.float32 if orig == torch.float16 else orig
    vae.to(run)
    try:
        yield run
    finally:
        vae.to(orig)


def vae_encode(vae, x: torch.Tensor):
    """``vae.encode(x).latent_dist`` outside any autocast: under fp16 autocast (a trainer's
    ``16-mixed``) SD's VAE overflows just as with fp16 weights."""
    with torch.autocast(x.device.type, enabled=False):
        return vae.encode(x).latent_dist


@torch.no_grad()
def build_bank(
    model: FrozenLDM, images: Sequence[Image.Image], aug: AugmentConfig, seed: int, chunk: int = 8
) -> LatentBank:
    """Encode every augmented view once. The VAE runs in fp32 when the model is in fp16 (SD's VAE
    overflows in fp16, and this pass is one-off)."""
    small = [min(im.size) for im in images if min(im.size) < aug.resolution]
    if small:
        logger.warning(
            "%d of %d reference images are smaller than the %d px training resolution (smallest "
            "%d px): they are upscaled, and the word learns their blur",
            len(small),
            len(images),
            aug.resolution,
            min(small),
        )
    vae = model.vae
    views = augmented_views(images, aug, seed)
    means, stds = [], []
    with vae_in_safe_dtype(vae) as run_dtype:
        for i in range(0, len(views), chunk):
            x = torch.stack([image_to_tensor(v) for v in views[i : i + chunk]])
            dist = vae_encode(vae, x.to(model.device, run_dtype))
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    cfg = vae.config
    shift = cfg.get("shift_factor", None) or 0.0
    return LatentBank(torch.cat(means), torch.cat(stds), float(cfg.scaling_factor), float(shift))


def bank_for_run(model: FrozenLDM, images: Sequence[Image.Image], cfg, seed: int) -> LatentBank:
    """The bank of one inversion run: views as ``cfg`` (an :class:`InversionConfig`) asks, at its
    resolution or the model's."""
    aug = AugmentConfig(
        resolution=cfg.resolution or model.resolution,
        flip_p=cfg.flip_p,
        random_crop=cfg.random_crop,
        views_per_image=cfg.views_per_image,
    )
    return build_bank(model, images, aug, seed)
