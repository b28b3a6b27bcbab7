"""Miniature, randomly initialised SD 1.x / 2.x / XL pipelines built from configs.

They use the very classes of the real models (``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel`` / ``CLIPTextModelWithProjection``, the real CLIP tokenizer) with a few thousand
times fewer weights, so every code path of the real families (v-prediction, two text encoders,
pooled embeddings, time ids) runs on a CPU in seconds. Their images are noise: they test plumbing,
not quality. The SDXL miniature gives its two encoders different widths (32 and 48) so that
mixing them up fails loudly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from oneword.fileio import atomic_dir
from oneword.tokenizer import EOS, clip_tokenizer_dir, default_cache_dir

logger = logging.getLogger(__name__)

TINY_FAMILIES = ("sd1", "sd2", "sdxl")
_TEXT_WIDTHS = {"sd1": [32], "sd2": [32], "sdxl": [32, 48]}


def _text_encoder(width: int, with_projection: bool, act: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_tiny_pipeline(family: str, seed: int = 0):
    """A fresh miniature pipeline of ``family`` (``sd1``, ``sd2`` or ``sdxl``), seeded."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny family must be one of {TINY_FAMILIES}, not {family!r}")
    torch.manual_seed(seed)
    widths = _TEXT_WIDTHS[family]
    xl = family == "sdxl"
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(widths),
        attention_head_dim=(2, 4) if xl else 8,
        use_linear_projection=family != "sd1",
        **(
            dict(
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,
            )
            if xl
            else {}
        ),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.13025 if xl else 0.18215,
    )
    sched_kwargs = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
    )
    act = "quick_gelu" if family == "sd1" else "gelu"
    if xl:
        return StableDiffusionXLPipeline(
            vae=vae,
            unet=unet,
            scheduler=EulerDiscreteScheduler(**sched_kwargs),
            text_encoder=_text_encoder(widths[0], False, "quick_gelu"),
            text_encoder_2=_text_encoder(widths[1], True, act),
            tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(EOS))),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir("!"))),
        )
    return StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **sched_kwargs),
        text_encoder=_text_encoder(widths[0], False, act),
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(EOS if family == "sd1" else "!"))),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a miniature pipeline as a diffusers folder (atomically: temp folder, then rename)."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        build_tiny_pipeline(family, seed).save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "oneword.json").write_text(json.dumps({"family": family, "tiny": True}))
    return out


def tiny_model_dir(family: str) -> Path:
    """The cached miniature model folder of ``family``, built on first use."""
    out = default_cache_dir() / f"tiny-{family}-v2"
    if not (out / "model_index.json").is_file():
        logger.info("building the miniature %s model in %s", family, out)
        save_tiny_model(family, out)
    return out


def preset_folder(name: str) -> Path:
    """The ``tiny-sd1`` / ``tiny-sd2`` / ``tiny-sdxl`` presets of :func:`oneword.models.load_model`
    (entry points in pyproject.toml): built on first use, then cached."""
    return tiny_model_dir(name.removeprefix("tiny-"))
