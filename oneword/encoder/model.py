"""The encoder network: frozen image tower + set mapper, and its slim safetensors file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor, nn

from oneword.encoder.unet_features import LAYOUTS, unet_features, unet_features_and_map
from oneword.errors import InputError
from oneword.trainstate import read_safetensors, write_safetensors

FORMAT = "oneword.encoder"


@dataclass
class EncoderConfig:
    """Architecture of a concept encoder and what it was built for."""

    clip: str = "toy"
    """Image tower: toy, an open_clip ARCH[:TAG] such as ViT-L-14, or random (tests)."""
    feature_dim: int = 128
    """Width of the tower's image features."""
    unet_dim: int = 0
    """Width of the E4T-style UNet features (:mod:`oneword.encoder.unet_features`) fed beside
    CLIP's; 0 leaves them out."""
    unet_layout: str = "blocks"
    """Which UNet activations those features pool: ``blocks`` or ``resnets``
    (:data:`oneword.encoder.unet_features.LAYOUTS`)."""
    map_channels: int = 0
    """Channels of the UNet's finest feature map (:func:`~oneword.encoder.unet_features.unet_features_and_map`)
    that a trained convolutional head (:class:`MapHead`) reads; 0 leaves the head out."""
    map_width: int = 64
    """Width of that head's convolutions."""
    widths: list[int] = field(default_factory=lambda: [128])
    """Token-embedding width of each text encoder of the target model (SDXL: [768, 1280])."""
    num_vectors: int = 1
    """Vectors per pseudo-word."""
    hidden: int = 512
    """Width of the mapper."""
    depth: int = 2
    """Residual blocks after pooling."""
    offset_scale: list[float] = field(default_factory=lambda: [1.0])
    """Per text encoder: scale of the predicted offset (the median norm of the model's token
    embeddings, so that the mapper works on unit scale whatever the model)."""
    family: str = "toy"
    """Model family the encoder was trained for (sd1, sd2, sdxl, toy)."""
    model: str = "toy"
    """The model it was trained with (for the record and as ``ti-encode``'s default)."""

    def __post_init__(self) -> None:
        if len(self.offset_scale) != len(self.widths):
            raise ValueError("offset_scale needs one value per text encoder width")
        if min(self.widths, default=0) < 1 or self.num_vectors < 1 or self.hidden < 1 or self.depth < 0:
            raise ValueError("widths, num_vectors and hidden must be positive, depth >= 0")
        if self.unet_dim < 0 or self.map_channels < 0 or self.map_width < 1:
            raise ValueError("unet_dim and map_channels must be >= 0, map_width >= 1")
        if self.unet_layout not in LAYOUTS:
            raise ValueError(f"unknown unet_layout {self.unet_layout!r}; expected one of {LAYOUTS}")


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class MapHead(nn.Module):
    """One UNet feature map per image ``[N, C, H, W]`` -> ``[N, hidden]``: normalized, two 3x3
    convolutions, mean and max over space, a linear layer started at a tenth of the default scale
    (as the pooled UNet features' projection). Trained with the mapper: it learns the local
    texture statistics (a pattern) that fixed pooling of the frozen maps averages away."""

    def __init__(self, channels: int, width: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(1, channels),
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
        )
        self.proj = nn.Linear(2 * width, hidden)
        with torch.no_grad():
            self.proj.weight.mul_(0.1)

    def forward(self, maps: Tensor) -> Tensor:
        h = self.net(maps)
        return self.proj(torch.cat([h.mean((2, 3)), h.amax((2, 3))], -1))


class SetFeatures(NamedTuple):
    """What the mapper reads of a batch of image sets (:meth:`ConceptEncoder.features`)."""

    features: Tensor
    """``[B, K, D]`` pooled features (the tower's, then the UNet's)."""
    mask: Tensor
    """``[B, K]``: which of the K slots hold an image."""
    maps: Tensor | None = None
    """``[B, K, C, H, W]`` UNet maps for a :class:`MapHead`, or None."""


class SetMapper(nn.Module):
    """Features of a set of images (``[B, K, D]`` with a ``[B, K]`` mask) and the initializer's
    vectors (one ``[B, n, w]`` per text encoder) -> the pseudo-word's vectors, same shapes.
    ``D`` is the tower's width plus ``unet_dim`` (UNet features).

    Per-image MLP, masked mean over the set (order-invariant, any K), the initializer folded in,
    residual blocks, and one zero-initialised head per text encoder: an untrained mapper returns
    the initializer exactly. UNet features enter through their own projection (layer norm, then a
    linear layer started at a tenth of the default scale), added to the tower's: hundreds of
    unit-scale UNet dims would otherwise drown the tower's 128 unit-norm ones from the first step.
    A :class:`MapHead` over each image's finest UNet map, when configured, is added the same way.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.per_image = nn.Sequential(nn.Linear(cfg.feature_dim, h), nn.GELU(), nn.Linear(h, h))
        self.unet_proj = None
        if cfg.unet_dim:
            self.unet_proj = nn.Sequential(nn.LayerNorm(cfg.unet_dim), nn.Linear(cfg.unet_dim, h))
            with torch.no_grad():
                self.unet_proj[1].weight.mul_(0.1)
        self.map_head = MapHead(cfg.map_channels, cfg.map_width, h) if cfg.map_channels else None
        self.init_proj = nn.Linear(sum(cfg.widths) * cfg.num_vectors, h)
        self.blocks = nn.Sequential(*[_Block(h) for _ in range(cfg.depth)], nn.LayerNorm(h))
        self.heads = nn.ModuleList(nn.Linear(h, cfg.num_vectors * w) for w in cfg.widths)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.register_buffer("scale", torch.tensor(cfg.offset_scale, dtype=torch.float32), persistent=False)

    def forward(
        self, features: Tensor, mask: Tensor, init: Sequence[Tensor], maps: Tensor | None = None
    ) -> list[Tensor]:
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(f"features must be [B, K, D] with a [B, K] mask, got {tuple(features.shape)}")
        if features.shape[-1] != self.cfg.feature_dim + self.cfg.unet_dim:
            raise ValueError(
                f"features must be {self.cfg.feature_dim + self.cfg.unet_dim}-d, got {features.shape[-1]}"
            )
        m = mask.to(features.dtype)[..., None]
        if bool((m.sum(1) == 0).any()):
            raise ValueError("every concept needs at least one image")
        d = self.cfg.feature_dim
        x = self.per_image[0](features[..., :d])
        if self.unet_proj is not None:
            x = x + self.unet_proj(features[..., d:])
        if self.map_head is not None:
            if maps is None or maps.shape[:3] != (*features.shape[:2], self.cfg.map_channels):
                raise ValueError(
                    f"this mapper reads [B, K, {self.cfg.map_channels}, H, W] UNet maps, got "
                    f"{None if maps is None else tuple(maps.shape)}"
                )
            x = x + self.map_head(maps.flatten(0, 1)).view(*features.shape[:2], -1)
        per = self.per_image[2](self.per_image[1](x))
        pooled = (per * m).sum(1) / m.sum(1)
        flat = torch.cat([(v / s).flatten(1) for v, s in zip(init, self.scale)], dim=-1)
        h = self.blocks(pooled + self.init_proj(flat.to(pooled.dtype)))
        b, n = features.shape[0], self.cfg.num_vectors
        return [
            v + s * head(h).view(b, n, -1).to(v.dtype) for v, s, head in zip(init, self.scale, self.heads)
        ]


class ConceptEncoder(nn.Module):
    """Image tower (frozen, not saved) + :class:`SetMapper` (trained, saved)."""

    def __init__(self, cfg: EncoderConfig, space=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.mapper = SetMapper(cfg)
        self._space = space  # a ClipSpace; plain attribute, so the tower never enters state_dict

    @property
    def space(self):
        if self._space is None:
            from oneword.eval.space import load_space

            self._space = load_space(self.cfg.clip)
        return self._space

    @torch.no_grad()
    def features(self, image_sets: Sequence[Sequence[Image.Image]], model=None) -> SetFeatures:
        """Features ``[B, K_max, D]`` of each concept's images and the ``[B, K_max]`` mask: the
        tower's, then (when the encoder uses them) ``model``'s UNet features and maps."""
        if not image_sets or any(len(s) == 0 for s in image_sets):
            raise InputError("every concept needs at least one reference image")
        images = [im for s in image_sets for im in s]
        flat = self.space.images(images)
        if flat.shape[1] != self.cfg.feature_dim:
            raise InputError(
                f"the image tower {self.cfg.clip!r} gives {flat.shape[1]}-d features, "
                f"the encoder expects {self.cfg.feature_dim}"
            )
        maps = None
        if self.cfg.unet_dim or self.cfg.map_channels:
            if model is None:
                raise ValueError("this encoder reads UNet features: pass the diffusion model")
            if self.cfg.map_channels:
                extra, maps = unet_features_and_map(model, images, self.cfg.unet_layout)
                if maps.shape[1] != self.cfg.map_channels:
                    raise InputError(
                        f"{model.source}'s UNet gives {maps.shape[1]}-channel maps, the encoder "
                        f"was trained on {self.cfg.map_channels} ({self.cfg.model})"
                    )
            else:
                extra = unet_features(model, images, self.cfg.unet_layout)
            if not self.cfg.unet_dim:
                extra = extra[:, :0]
            if extra.shape[1] != self.cfg.unet_dim:
                raise InputError(
                    f"{model.source}'s UNet gives {extra.shape[1]}-d features, the encoder "
                    f"was trained on {self.cfg.unet_dim}-d ones ({self.cfg.model})"
                )
            flat = torch.cat([flat, extra], dim=1)
        k = max(len(s) for s in image_sets)
        feats = torch.zeros(len(image_sets), k, flat.shape[1])
        mask = torch.zeros(len(image_sets), k, dtype=torch.bool)
        set_maps = None if maps is None else maps.new_zeros(len(image_sets), k, *maps.shape[1:])
        i = 0
        for b, s in enumerate(image_sets):
            feats[b, : len(s)] = flat[i : i + len(s)]
            mask[b, : len(s)] = True
            if set_maps is not None:
                set_maps[b, : len(s)] = maps[i : i + len(s)]
            i += len(s)
        device = next(self.mapper.parameters()).device
        return SetFeatures(
            feats.to(device), mask.to(device), None if set_maps is None else set_maps.to(device)
        )

    def forward(self, inputs: SetFeatures, init: Sequence[Tensor]) -> list[Tensor]:
        return self.mapper(inputs.features, inputs.mask, init, inputs.maps)

    @torch.no_grad()
    def predict(
        self, image_sets: Sequence[Sequence[Image.Image]], init: Sequence[Tensor], model=None
    ) -> list[list[Tensor]]:
        """One pass for several concepts: per concept, one ``[n, w]`` tensor per text encoder."""
        inputs = self.features(image_sets, model)
        out = self(inputs, [v.to(inputs.features.device, torch.float32) for v in init])
        return [[v[b].float().cpu() for v in out] for b in range(len(image_sets))]


def predict_embeddings(
    encoder: ConceptEncoder, model, image_sets: Sequence[Sequence[Image.Image]], init_words: Sequence[str]
) -> list[list[Tensor]]:
    """One batched pass for several concepts of ``model``: per concept, its vectors per text
    encoder, offsets from the initializer words' embeddings."""
    starts = [model.initializer_vectors(w, encoder.cfg.num_vectors) for w in init_words]
    init = [torch.stack([s[j] for s in starts]) for j in range(len(model.widths))]
    return encoder.predict(image_sets, init, model)


def save_encoder(
    encoder: ConceptEncoder,
    path: str | Path,
    extra: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """The slim encoder file: mapper weights (fp32, or ``dtype`` such as fp16 for a smaller file;
    loading casts back to fp32) with the config as JSON in the header."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in encoder.mapper.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(asdict(encoder.cfg)), **(extra or {})}
    return write_safetensors(path, tensors, meta)


def load_encoder(
    path: str | Path, space=None, missing: str = "train one (ti-train-encoder) or use --encoder toy"
) -> ConceptEncoder:
    """Inverse of :func:`save_encoder`; the image tower loads lazily from ``config.clip``.
    ``missing`` is the hint after a missing file's error."""
    tensors, meta = read_safetensors(path, fmt=FORMAT, missing=missing)
    try:
        cfg = EncoderConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path} has no valid encoder config in its header ({err})") from None
    enc = ConceptEncoder(cfg, space)
    try:
        enc.mapper.load_state_dict(tensors)
    except RuntimeError as err:
        raise InputError(f"{path} does not match its encoder config ({str(err).splitlines()[0]})") from None
    return enc.eval()


def check_fits(encoder: ConceptEncoder, model) -> None:
    """Raise :class:`InputError` unless ``encoder`` predicts words for ``model``'s text encoders."""
    if tuple(model.widths) != tuple(encoder.cfg.widths):
        raise InputError(
            f"the encoder was trained for text-encoder widths {encoder.cfg.widths} "
            f"({encoder.cfg.model}); the model has {model.widths}: {TRAIN_ONE}"
        )


TRAIN_ONE = (
    'pass --encoder with an encoder trained for this model (docs/encoder.md, "Train an encoder"); the '
    "shipped toy encoder fits only --model toy"
)


def token_scale(model) -> list[float]:
    """Median L2 norm of each text encoder's (base) token embeddings: the scale of real words."""
    out = []
    for emb in model.placeholder_embeddings():
        norms = emb.base.weight.detach().float().norm(dim=-1)
        out.append(float(norms[norms > 0].median()))  # the toy table stores unused rows as zeros
    return out
