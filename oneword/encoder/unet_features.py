"""E4T-style features: what the frozen diffusion model's own UNet sees in a reference image.

E4T (Gal et al. 2023) feeds its word encoder the features of the diffusion model's UNet encoder
beside CLIP's. They help most where CLIP is weak: the UNet must know an object's exact shape and
texture to draw it. Each image is resized to the model's resolution, encoded by the VAE (latent
mean, no noise), and run through the UNet once at timestep :data:`TIMESTEP` with the empty prompt;
the outputs of every down block and of the middle block are pooled over space (mean and max) and
concatenated. Nothing here is trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from oneword.data.images import image_to_tensor, resize_and_crop
from oneword.inversion.loss import unet_forward

TIMESTEP = 0
"""UNet timestep of the clean reference latents (t=0 and t=200 probe alike on the toy model)."""
BATCH = 8


def unet_feature_dim(unet) -> int:
    """Width of :func:`unet_features` for a UNet: mean + max of each down block and the middle."""
    channels = list(unet.config.block_out_channels)
    return 2 * (sum(channels) + channels[-1])


@torch.no_grad()
def unet_features(model, images: Sequence[Image.Image]) -> Tensor:
    """``[n, unet_feature_dim]`` fp32 features of ``images`` under ``model`` (a FrozenLDM)."""
    if not images:
        raise ValueError("no images to encode")
    unet, vae = model.unet, model.vae
    captured: list[Tensor] = []

    def keep(_mod, _inp, out) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out)

    hooks = [b.register_forward_hook(keep) for b in list(unet.down_blocks) + [unet.mid_block]]
    try:
        empty = model.encode_text([""])
        parts = []
        for i in range(0, len(images), BATCH):
            chunk = images[i:i + BATCH]
            x = torch.stack([image_to_tensor(resize_and_crop(im, model.resolution)) for im in chunk])
            latents = vae.encode(x.to(model.device, model.dtype)).latent_dist.mean * vae.config.scaling_factor
            cond = type(empty)(empty.hidden_states.expand(len(chunk), -1, -1),
                               None if empty.pooled is None else empty.pooled.expand(len(chunk), -1))
            captured.clear()
            unet_forward(model, latents, torch.full((len(chunk),), TIMESTEP, device=model.device), cond)
            parts.append(torch.cat([torch.cat([h.float().mean((2, 3)), h.float().amax((2, 3))], -1)
                                    for h in captured], -1).cpu())
        return torch.cat(parts)
    finally:
        for h in hooks:
            h.remove()
