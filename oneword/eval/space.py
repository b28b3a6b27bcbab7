"""CLIP feature spaces in which generated images are compared with reference images and prompts.

The paper (Gal et al. 2022, section 5) scores in the space of CLIP ViT-B/32; the toy world scores in
the toy CLIP's. :func:`load_space` turns a short name into a :class:`ClipSpace`:

- ``toy``: the toy CLIP shipped with the package (``toy:PATH`` for another file);
- ``ViT-B-32``, ``ViT-L-14``, ...: an open_clip architecture with OpenAI's weights;
- ``ARCH:TAG``: any open_clip pretrained tag, e.g. ``ViT-H-14:laion2b_s32b_b79k``;
- ``random``: a seeded, untrained toy-sized CLIP, only for smoke tests (its scores mean nothing).

Real CLIP weights come from open_clip's usual download/cache (the Hugging Face cache); without
network access they must already be there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from oneword.errors import ModelLoadError

BATCH = 32


@dataclass
class ClipSpace:
    """Image and text encoders into one L2-normalised space."""

    name: str
    image_fn: Callable[[Sequence[Image.Image]], Tensor]
    text_fn: Callable[[Sequence[str]], Tensor]
    module: torch.nn.Module | None = None
    """The network behind the functions (frozen), so that :meth:`to` can move it."""

    def to(self, device: str | torch.device) -> ClipSpace:
        if self.module is not None:
            self.module.to(device)
        return self

    def images(self, images: Sequence[Image.Image]) -> Tensor:
        """``[n, d]`` unit vectors, encoded in batches of 32."""
        if not images:
            raise ValueError("no images to encode")
        parts = [self.image_fn(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
        return F.normalize(torch.cat(parts).float(), dim=-1)

    def texts(self, texts: Sequence[str]) -> Tensor:
        """``[n, d]`` unit vectors."""
        if not texts:
            raise ValueError("no texts to encode")
        parts = [self.text_fn(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
        return F.normalize(torch.cat(parts).float(), dim=-1)


def toy_space(model, name: str = "toy") -> ClipSpace:
    """A space from a toy-CLIP model (:func:`oneword.toy.clip.build_toy_clip` or a loaded one)."""
    from oneword.toy.clip import encode_images, encode_texts

    model.requires_grad_(False)
    return ClipSpace(
        name, lambda ims: encode_images(model, ims), lambda ts: encode_texts(model, list(ts)), model
    )


def open_clip_space(model, preprocess, tokenizer, name: str, device: torch.device) -> ClipSpace:
    """A space from an open_clip model, its image preprocessing and its tokenizer."""
    model = model.eval().requires_grad_(False).to(device)

    def where() -> torch.device:
        return next(model.parameters()).device

    @torch.no_grad()
    def image_fn(images: Sequence[Image.Image]) -> Tensor:
        x = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(where())
        return model.encode_image(x).float().cpu()

    @torch.no_grad()
    def text_fn(texts: Sequence[str]) -> Tensor:
        return model.encode_text(tokenizer(list(texts)).to(where())).float().cpu()

    return ClipSpace(name, image_fn, text_fn, model)


def load_space(spec: str, device: str | torch.device | None = None) -> ClipSpace:
    """The feature space named ``spec`` (see the module docstring)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if spec == "toy" or spec.startswith("toy:"):
        from oneword.toy.clip import load_toy_clip

        path = Path(spec[4:]) if spec.startswith("toy:") else None
        model, _ = load_toy_clip(path)
        return toy_space(model.to(dev), spec)
    if spec == "random":
        from oneword.toy.clip import ToyCLIPConfig, build_toy_clip

        cfg = ToyCLIPConfig(embed_dim=32, vision_width=32, vision_layers=1, text_width=32, text_layers=1)
        with torch.random.fork_rng(devices=[]):  # seeded weights, caller's RNG untouched
            torch.manual_seed(0)
            model = build_toy_clip(cfg)
        return toy_space(model.to(dev), "random")
    import open_clip

    arch, _, tag = spec.partition(":")
    tag = tag or "openai"
    # OpenAI's towers were trained with QuickGELU; open_clip 3 builds the plain GELU architecture for
    # them unless told (only warning), which silently changes every feature.
    quick_gelu = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=tag, force_quick_gelu=quick_gelu
        )
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as err:  # noqa: BLE001 - open_clip raises many kinds; the user needs one line
        detail = " ".join(str(err).split())[:200]
        raise ModelLoadError(
            f"cannot load CLIP {arch} ({tag}): {detail}. open_clip downloads it on first use; "
            "without network access it must already be in the Hugging Face cache (or use --clip toy "
            "with the toy model)"
        ) from None
    return open_clip_space(model, preprocess, tokenizer, f"{arch}:{tag}", dev)


def default_space_name(family: str) -> str:
    """The paper's ViT-B/32 for real checkpoints, the toy CLIP for the toy world."""
    return "toy" if family == "toy" else "ViT-B-32"
