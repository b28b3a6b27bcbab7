"""E4T-style features: what the frozen diffusion model's own UNet sees in a reference image.

E4T (Gal et al. 2023) feeds its word encoder the features of the diffusion model's UNet encoder
beside CLIP's. They help most where CLIP is weak: the UNet must know an object's exact shape and
texture to draw it. Each image is resized to the model's resolution, encoded by the VAE (latent
mean, no noise), and run through the UNet once at timestep :data:`TIMESTEP` with the empty prompt;
what is kept depends on the layout:

- ``blocks`` (the first toy encoders): each down block's final output and the middle block's,
  pooled over space by mean and max;
- ``resnets``: every layer's output on the down path (each resnet or resnet + attention, before
  each downsampling as well as after it), and the middle block's, pooled by mean, max and standard deviation. The full-resolution
  maps and the spread keep texture: on the toy world a linear probe reads an unseen concept's
  pattern from them 66 % of the time against 48 % from ``blocks`` (docs/experiments);
- ``multiscale``: ``resnets`` twice, of the image at the model's resolution and of the same view
  bicubic-upsampled 2x, so the UNet's maps resolve finer texture (twice the features; the second
  pass costs 4x the pixels of the first, i.e. a 2,048 px pass for SDXL). With toy CLIP it lifts
  the held-out pattern probe from 0.75 to 0.81 (``bench/feature_probe.py``).

Pooling over space keeps only first- and second-order statistics of each channel, and a pattern
(checks against stripes) lives in how neighbouring positions relate. So an encoder may also read
the finest *map* itself (:func:`unet_features_and_map`: the first down block's first output, at the
layout's largest scale) through a trained convolutional head
(:class:`oneword.encoder.model.MapHead`): on the toy world such a head reads an unseen concept's
pattern from the 2x view's map 98 % of the time, against 73-81 % for linear probes on the pooled
features (docs/experiments).

Nothing here is trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from oneword.data.images import image_to_tensor, resize_and_crop
from oneword.inversion.bank import vae_encode, vae_in_safe_dtype
from oneword.inversion.loss import unet_forward

TIMESTEP = 0
"""UNet timestep of the clean reference latents (t=0 and t=200 probe alike on the toy model)."""
BATCH = 8
"""Images per UNet pass at 512 px and above; smaller models take more per pass (up to
:data:`MAX_BATCH`), since a pass of a few small images is mostly fixed cost."""
MAX_BATCH = 64
MAP_SIDE = 64
"""The finest map is average-pooled down to at most this many positions a side (the toy's is 16;
SD 1.5's 2x view would give 128), which bounds the trained head's memory and compute."""


LAYOUTS = ("blocks", "resnets", "multiscale")
"""Which UNet activations :func:`unet_features` pools (module docstring)."""
_SCALES = {"blocks": (1,), "resnets": (1,), "multiscale": (1, 2)}
"""Input upsampling factors per layout; ``multiscale`` reads every map as ``resnets`` does."""


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown UNet feature layout {layout!r}; expected one of {LAYOUTS}")


def unet_feature_dim(unet, layout: str = "blocks") -> int:
    """Width of :func:`unet_features` for a UNet and a layout."""
    _check_layout(layout)
    channels = list(unet.config.block_out_channels)
    if layout == "blocks":
        return 2 * (sum(channels) + channels[-1])
    per_block = unet.config.layers_per_block
    if isinstance(per_block, int):
        per_block = [per_block] * len(channels)
    last = len(channels) - 1  # every down block but the last one ends with a downsampler
    maps = sum(c * (n + (i < last)) for i, (c, n) in enumerate(zip(channels, per_block)))
    return 3 * (maps + channels[-1]) * len(_SCALES[layout])


def unet_map_channels(unet) -> int:
    """Channels of the map :func:`unet_features_and_map` returns (the first down block's width)."""
    return int(unet.config.block_out_channels[0])


def pass_size(resolution: int) -> int:
    """Images per UNet pass for a model of this resolution: :data:`BATCH` at 512 px, as many
    more as the pixels allow below it, at most :data:`MAX_BATCH`."""
    return max(BATCH, min(MAX_BATCH, BATCH * (512 // max(1, resolution)) ** 2))


def _pool(h: Tensor, layout: str) -> Tensor:
    h = h.float()
    parts = [h.mean((2, 3)), h.amax((2, 3))]
    if layout != "blocks":
        parts.append(h.std((2, 3), correction=0))
    return torch.cat(parts, -1)


def unet_features(model, images: Sequence[Image.Image], layout: str = "blocks") -> Tensor:
    """``[n, unet_feature_dim]`` fp32 features of ``images`` under ``model`` (a FrozenLDM)."""
    return _run(model, images, layout, keep_map=False)[0]


def unet_features_and_map(
    model, images: Sequence[Image.Image], layout: str = "blocks"
) -> tuple[Tensor, Tensor]:
    """:func:`unet_features` and, from the same passes, each image's finest map ``[n, C, H, W]``
    (fp32; ``C`` = :func:`unet_map_channels`): the first down block's first output at the layout's
    largest input scale, average-pooled to at most :data:`MAP_SIDE` a side."""
    feats, maps = _run(model, images, layout, keep_map=True)
    assert maps is not None
    return feats, maps


@torch.no_grad()
def _run(model, images: Sequence[Image.Image], layout: str, keep_map: bool) -> tuple[Tensor, Tensor | None]:
    if not images:
        raise ValueError("no images to encode")
    _check_layout(layout)
    unet, vae = model.unet, model.vae
    captured: list[Tensor] = []
    finest: list[Tensor] = []

    def keep(mod, _inp, out) -> None:
        if not isinstance(out, tuple):  # the middle block
            captured.append(out)
            return
        if mod is unet.down_blocks[0]:
            finest[:] = [out[1][0]]
        if layout == "blocks":
            captured.append(out[0])
        else:  # a down block's (hidden, res_samples): every resnet's and the downsampler's output
            captured.extend(out[1])

    hooks = [b.register_forward_hook(keep) for b in list(unet.down_blocks) + [unet.mid_block]]
    try:
        with vae_in_safe_dtype(vae) as vae_dtype:  # SDXL's VAE overflows in fp16
            empty = model.encode_text([""])
            parts, maps = [], []
            batch = pass_size(model.resolution)
            for i in range(0, len(images), batch):
                chunk = images[i : i + batch]
                x = torch.stack([image_to_tensor(resize_and_crop(im, model.resolution)) for im in chunk])
                cond = type(empty)(
                    empty.hidden_states.expand(len(chunk), -1, -1),
                    None if empty.pooled is None else empty.pooled.expand(len(chunk), -1),
                )
                per_scale = []
                for scale in _SCALES[layout]:  # >1: the same view, larger, so the UNet's maps get finer
                    xs = (
                        x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="bicubic").clamp(-1, 1)
                    )
                    latents = vae_encode(vae, xs.to(model.device, vae_dtype)).mean * vae.config.scaling_factor
                    latents = latents.to(model.dtype)
                    captured.clear()
                    unet_forward(
                        model, latents, torch.full((len(chunk),), TIMESTEP, device=model.device), cond
                    )
                    per_scale.append(torch.cat([_pool(h, layout) for h in captured], -1))
                parts.append(torch.cat(per_scale, -1).cpu())
                if keep_map:  # the last scale's pass is the largest one
                    m = finest[0].float()
                    if max(m.shape[-2:]) > MAP_SIDE:
                        m = F.adaptive_avg_pool2d(m, (min(m.shape[-2], MAP_SIDE), min(m.shape[-1], MAP_SIDE)))
                    maps.append(m.cpu())
            return torch.cat(parts), (torch.cat(maps) if keep_map else None)
    finally:
        for h in hooks:
            h.remove()
