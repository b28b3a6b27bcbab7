"""The denoising objective: the one loss every optimizer of oneword calls.

Textual inversion from scratch, refinement from an encoder prediction, batched multi-concept
inversion and the encoder's training step all compute ``denoising_loss``; none re-implements noise
sampling, v-targets or SDXL's extra conditioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oneword.models import FrozenLDM, TextConditioning


def sdxl_time_ids(resolution: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size/crop conditioning: original size, crop top-left (0, 0), target size.

    The reference views are square and already at ``resolution``; (0, 0) crops ask for centred,
    uncropped objects, which is also what generation asks for.
    """
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype)
    return ids.to(device).expand(batch, 6)


def denoising_loss(
    model: FrozenLDM,
    latents: torch.Tensor,
    cond: TextConditioning,
    generator: torch.Generator | None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MSE between the UNet's prediction and its target (``[batch]``, fp32).

    Noise and timesteps come from ``generator`` (a CPU generator, so a run is reproducible on any
    device and resumable) unless given: the group engine draws them per concept with
    :func:`draw_noise` and passes the stacked batch. The target is the noise for epsilon models
    and the velocity for v-prediction models (SD 2.x 768). Take ``.mean()`` for the usual scalar loss.
    """
    scheduler = model.pipeline.scheduler
    if noise is None:
        if generator is None:
            raise ValueError("denoising_loss needs a generator or the noise and timesteps")
        noise, drawn = draw_noise(model, latents, generator, timesteps is None)
        timesteps = drawn if timesteps is None else timesteps
    noise = noise.to(latents.device, latents.dtype)
    timesteps = timesteps.to(latents.device)
    noisy = _add_noise(scheduler, latents, noise, timesteps)
    if model.prediction_type == "v_prediction":
        target = _velocity(scheduler, latents, noise, timesteps)
    elif model.prediction_type == "epsilon":
        target = noise
    else:
        raise ValueError(f"unsupported prediction type {model.prediction_type!r}")
    pred = unet_forward(model, noisy, timesteps, cond)
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def draw_noise(
    model: FrozenLDM, latents: torch.Tensor, generator: torch.Generator, with_timesteps: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The noise (CPU, fp32, ``latents``' shape) and, with ``with_timesteps``, the training
    timesteps of one batch, drawn from ``generator`` in that order."""
    noise = torch.randn(latents.shape, generator=generator)
    if not with_timesteps:
        return noise, None
    steps = model.pipeline.scheduler.config.num_train_timesteps
    return noise, torch.randint(0, steps, (latents.shape[0],), generator=generator)


def unet_forward(
    model: FrozenLDM, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning
) -> torch.Tensor:
    """The UNet's prediction for ``noisy`` latents, with SDXL's extra conditioning where needed."""
    extra = {}
    if cond.pooled is not None:
        pixels = noisy.shape[-1] * model.vae_scale_factor
        time_ids = sdxl_time_ids(pixels, noisy.shape[0], noisy.device, cond.pooled.dtype)
        extra["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": time_ids}
    return model.unet(
        noisy.to(model.dtype), timesteps, encoder_hidden_states=cond.hidden_states, **extra
    ).sample


def _alphas(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acp = scheduler.alphas_cumprod.to(like.device, torch.float32)[timesteps]
    shape = (-1,) + (1,) * (like.dim() - 1)
    return acp.sqrt().view(shape), (1 - acp).sqrt().view(shape)


def _add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) of the DDPM forward process (the training schedule of every SD scheduler)."""
    a, s = _alphas(scheduler, t, x0)
    return a * x0 + s * noise


def _velocity(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s = _alphas(scheduler, t, x0)
    return a * noise - s * x0


def grad_scaler(model: FrozenLDM) -> torch.amp.GradScaler | None:
    """A gradient scaler when the frozen weights are fp16 on CUDA (the gradients reaching the
    fp32 vectors through an fp16 UNet underflow otherwise); ``None`` where none is needed."""
    return (
        torch.amp.GradScaler("cuda") if model.dtype == torch.float16 and model.device.type == "cuda" else None
    )
