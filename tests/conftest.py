"""Shared fixtures: miniature models (built from configs, never downloaded) and concept folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


def pytest_configure(config: pytest.Config) -> None:
    """Keep the tests' tokenizer and miniature models out of the user's cache, and never touch the
    hub (set before any test module imports oneword)."""
    os.environ["ONEWORD_CACHE"] = os.environ.get("ONEWORD_TEST_CACHE", "/tmp/oneword-test-cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_concept_images(folder: Path, n: int = 3, size: tuple[int, int] = (48, 40)) -> Path:
    """``n`` small pictures of "one object" (a red disc with a yellow bar) in varied positions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, (30 + 40 * i, 90, 160))
        d = ImageDraw.Draw(img)
        x, y = 6 + 5 * i, 5 + 3 * i
        d.ellipse([x, y, x + 22, y + 22], fill=(220, 30, 30))
        d.rectangle([x + 4, y + 9, x + 18, y + 13], fill=(250, 220, 0))
        img.save(folder / f"img_{i}.png")
    return folder


@pytest.fixture
def concept_dir(tmp_path: Path) -> Path:
    return make_concept_images(tmp_path / "concept")


@pytest.fixture(scope="session")
def tiny_dirs() -> dict[str, Path]:
    """Folders of the three miniature families (built once per cache)."""
    from oneword.tiny import tiny_model_dir

    return {fam: tiny_model_dir(fam) for fam in ("sd1", "sd2", "sdxl")}


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def family(request) -> str:
    return request.param


def tiny_encoder(
    family: str = "sd1",
    num_vectors: int = 1,
    randomize: bool = True,
    unet: bool = False,
    layout: str = "blocks",
    map_width: int = 0,
):
    """A small encoder (random CLIP space) for a miniature model, and the model: ``(encoder, model)``."""
    import torch

    from oneword.encoder.model import ConceptEncoder, EncoderConfig, token_scale
    from oneword.encoder.unet_features import unet_feature_dim, unet_map_channels
    from oneword.eval.space import load_space
    from oneword.models import load_model

    model = load_model(f"tiny-{family}")
    space = load_space("random")
    unet_dim = unet_feature_dim(model.unet, layout) if unet else 0
    map_channels = unet_map_channels(model.unet) if map_width else 0
    cfg = EncoderConfig(
        clip="random",
        feature_dim=32,
        unet_dim=unet_dim,
        unet_layout=layout,
        widths=model.widths,
        map_channels=map_channels,
        map_width=max(map_width, 1),
        num_vectors=num_vectors,
        hidden=32,
        depth=1,
        offset_scale=token_scale(model),
        family=model.family,
        model=f"tiny-{family}",
    )
    enc = ConceptEncoder(cfg, space)
    if randomize:  # heads start at zero; give them weights so the tests see real offsets
        torch.manual_seed(0)
        for head in enc.mapper.heads:
            torch.nn.init.normal_(head.weight, std=0.2)
    return enc, model


def encoder_file(folder: Path) -> Path:
    """A small encoder with UNet features for ``tiny-sd1``, exported to ``folder/enc.safetensors``."""
    from oneword.encoder.model import save_encoder

    enc, _ = tiny_encoder(unet=True)
    return save_encoder(enc, folder / "enc.safetensors")
