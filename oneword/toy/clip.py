"""A toy CLIP: a small open_clip model trained contrastively on toy-world renders and captions.

Images are renders of *training-split* concepts (:func:`~oneword.toy.render.split_concepts`) on
random backgrounds; texts are partial captions (:func:`~oneword.toy.captions.caption`) tokenized
with open_clip's own CLIP BPE tokenizer (real CLIP ids, context length 77). Weights ship as
``oneword/toy/weights/clip.safetensors`` (config as JSON in the header). The token-embedding table
is stored compactly: only the rows of ids that toy captions use (``token_embedding.rows`` and
``token_embedding.ids``); the other rows are zeros after loading.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from oneword.errors import InputError
from oneword.toy.captions import caption, vocabulary_texts
from oneword.toy.render import backgrounds_for, render, sample_pose, split_concepts
from oneword.trainstate import (
    load_module,
    load_optimizer,
    module_tensors,
    optimizer_tensors,
    read_safetensors,
    warmup_cosine,
    write_safetensors,
)

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).with_name("weights") / "clip.safetensors"
FORMAT = "oneword.toy.clip"
CKPT_FORMAT = "oneword.toy.clip.checkpoint"
_ROWS, _IDS, _TABLE = "token_embedding.rows", "token_embedding.ids", "token_embedding.weight"


@dataclass
class ToyCLIPConfig:
    """Architecture of the toy CLIP (an ``open_clip.CLIP`` with a small ViT and text transformer)."""

    image_size: int = 32
    """Side of the square input image; other sizes are resized to it."""
    embed_dim: int = 128
    """Dimension of the joint image-text embedding."""
    patch_size: int = 8
    """ViT patch side in pixels; must divide ``image_size`` (8: 16 patches, 3.5x cheaper than 4 on a CPU)."""
    vision_width: int = 128
    """Width of the vision transformer."""
    vision_layers: int = 4
    """Number of vision transformer blocks."""
    vision_heads: int = 4
    """Attention heads of the vision transformer; must divide ``vision_width``."""
    context_length: int = 32
    """Tokens per text (toy captions need at most 23; real CLIP uses 77)."""
    vocab_size: int = 49408
    """Size of the CLIP BPE vocabulary."""
    text_width: int = 128
    """Width of the text transformer."""
    text_layers: int = 4
    """Number of text transformer blocks."""
    text_heads: int = 4
    """Attention heads of the text transformer; must divide ``text_width``."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("vision_heads and text_heads must divide their widths")

    def to_open_clip_cfg(self) -> dict:
        """Keyword arguments of ``open_clip.CLIP``: ``embed_dim``, ``vision_cfg``, ``text_cfg``."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_width // self.vision_heads,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "layers": self.text_layers,
                "heads": self.text_heads,
            },
        }


def build_toy_clip(cfg: ToyCLIPConfig | None = None) -> open_clip.CLIP:
    """A freshly initialised ``open_clip.CLIP`` for ``cfg``; ``model.toy_config`` holds ``cfg``."""
    cfg = cfg or ToyCLIPConfig()
    model = open_clip.CLIP(**cfg.to_open_clip_cfg())
    model.toy_config = cfg
    return model


@lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> Tensor:
    """CLIP token ids ``[n, context_length]`` (start, BPE ids, end, zero padding)."""
    return _tokenizer(context_length)([texts] if isinstance(texts, str) else list(texts))


@lru_cache(maxsize=1)
def toy_token_ids() -> tuple[int, ...]:
    """Sorted ids of every token toy captions can use, plus the start/end/padding ids."""
    return tuple(sorted(set(tokenize(vocabulary_texts()).flatten().tolist()) | {0}))


def _to_tensor(images: Sequence[Image.Image], size: int) -> Tensor:
    """RGB images -> ``[B, 3, size, size]`` in ``[-1, 1]`` (bilinear resize where needed)."""
    rgb = [im.convert("RGB") for im in images]
    rgb = [
        im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BILINEAR) for im in rgb
    ]
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in rgb])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def encode_images(model: open_clip.CLIP, images: Sequence[Image.Image]) -> Tensor:
    """L2-normalised image embeddings ``[B, embed_dim]`` (eval mode, no grad, on the CPU)."""
    cfg = model.toy_config
    if not images:
        return torch.empty(0, cfg.embed_dim)
    x = _to_tensor(images, cfg.image_size).to(next(model.parameters()).device)
    return model.eval().encode_image(x, normalize=True).float().cpu()


@torch.no_grad()
def encode_texts(model: open_clip.CLIP, texts: str | Sequence[str]) -> Tensor:
    """L2-normalised text embeddings ``[n, embed_dim]`` (eval mode, no grad, on the CPU)."""
    ids = tokenize(texts, model.toy_config.context_length).to(next(model.parameters()).device)
    return model.eval().encode_text(ids, normalize=True).float().cpu()


def _batch(step_rng: random.Random, n: int, cfg: ToyCLIPConfig) -> tuple[Tensor, Tensor]:
    """``n`` (render of a training concept, partial caption) pairs as tensors."""
    train = split_concepts()[0]
    images, texts = [], []
    for _ in range(n):
        concept = step_rng.choice(train)
        bg = step_rng.choice(backgrounds_for(concept))
        images.append(render(concept, bg, sample_pose(step_rng), size=cfg.image_size))
        texts.append(caption(concept, bg, step_rng).text)
    return _to_tensor(images, cfg.image_size), tokenize(texts, cfg.context_length)


def _train_step(
    model: open_clip.CLIP, opt: torch.optim.Optimizer, rng: random.Random, batch_size: int, lr: float
) -> float:
    """One AdamW step of symmetric InfoNCE on a fresh batch drawn from ``rng``."""
    x, ids = _batch(rng, batch_size, model.toy_config)
    logits = (
        model.logit_scale.exp()
        * model.encode_image(x, normalize=True)
        @ model.encode_text(ids, normalize=True).T
    )
    labels = torch.arange(len(x))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    model.logit_scale.data.clamp_(0, math.log(100))  # as open_clip does
    return float(loss.detach())


def _read(path: Path, fmt: str) -> tuple[dict[str, Tensor], dict[str, str], ToyCLIPConfig]:
    """Tensors, header and config of a safetensors file whose header says ``format == fmt``."""
    tensors, meta = read_safetensors(path, fmt=fmt, missing="train the toy CLIP first")
    try:
        return tensors, meta, ToyCLIPConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path} has no valid toy CLIP config in its header ({err})") from None


def save_toy_clip(
    model: open_clip.CLIP, path: Path, extra: dict[str, str] | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write slim inference weights (compact token table, config JSON in the header) atomically.
    ``dtype`` (e.g. ``torch.float16``) stores floating tensors smaller; :func:`load_toy_clip`
    always returns an fp32 model."""
    cfg = model.toy_config
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    ids = torch.tensor(toy_token_ids(), dtype=torch.long)
    tensors[_ROWS] = tensors.pop(_TABLE)[ids].contiguous()
    tensors[_IDS] = ids
    meta = {"format": FORMAT, "config": json.dumps(asdict(cfg)), **(extra or {})}
    return write_safetensors(path, tensors, meta)


def load_toy_clip(path: Path | None = None) -> tuple[open_clip.CLIP, ToyCLIPConfig]:
    """Load weights written by :func:`train_toy_clip` (default: the shipped ones), in eval mode."""
    path = Path(path) if path is not None else DEFAULT_PATH
    tensors, _, cfg = _read(path, FORMAT)
    model = build_toy_clip(cfg)
    want = model.state_dict()
    rows, ids = tensors.pop(_ROWS, None), tensors.pop(_IDS, None)
    table = want[_TABLE]
    if (
        rows is None
        or ids is None
        or ids.ndim != 1
        or ids.dtype != torch.long
        or not len(ids)
        or rows.shape != (len(ids), table.shape[1])
        or int(ids.min()) < 0
        or int(ids.max()) >= len(table)
    ):
        raise InputError(f"{path} has no valid compact token table; retrain the toy CLIP")
    full = torch.zeros_like(table)
    full[ids] = rows.to(full.dtype)
    tensors[_TABLE] = full
    bad = sorted(
        k
        for k in want.keys() | tensors.keys()
        if k not in want or k not in tensors or want[k].shape != tensors[k].shape
    )
    if bad:
        raise InputError(
            f"{path} does not match its toy CLIP config ({len(bad)} tensors missing, "
            f"unexpected or misshapen, e.g. {bad[0]!r}); retrain the toy CLIP"
        )
    model.load_state_dict(tensors)
    return model.eval(), cfg


def _save_checkpoint(
    path: Path, model: open_clip.CLIP, opt: torch.optim.Optimizer, step: int, hparams: dict
) -> None:
    optim, _ = optimizer_tensors(opt)
    meta = {
        "format": CKPT_FORMAT,
        "step": str(step),
        "hparams": json.dumps(hparams),
        "config": json.dumps(asdict(model.toy_config)),
    }
    write_safetensors(path, {**module_tensors("model", model), **optim}, meta)


def train_toy_clip(
    out: Path,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 5e-4,
    seed: int = 0,
    cfg: ToyCLIPConfig | None = None,
    checkpoint_every: int = 200,
    progress: bool = True,
    resume: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Train a toy CLIP contrastively and write slim weights to ``out``; return ``out``.

    Step ``k``'s batch comes from ``random.Random(f"clip-{seed}-{k}")``, so a run resumed from the
    checkpoint ``out.with_suffix('.ckpt.safetensors')`` (written every ``checkpoint_every`` steps,
    model + AdamW state) equals an uninterrupted one. AdamW (weight decay 0.1 on matrices) with
    warm-up and cosine decay. The checkpoint is deleted once ``out`` is written.
    """
    if steps < 1 or batch_size < 2 or checkpoint_every < 1 or lr <= 0:
        raise ValueError("steps, checkpoint_every and lr must be positive and batch_size >= 2")
    cfg = cfg or ToyCLIPConfig()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.with_suffix(".ckpt.safetensors")
    hparams = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = build_toy_clip(cfg)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim > 1 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim > 1 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    start = 0
    if resume and ckpt.exists():
        tensors, meta, old_cfg = _read(ckpt, CKPT_FORMAT)
        if old_cfg != cfg:
            raise InputError(f"{ckpt} was trained with another architecture; delete it or pass resume=False")
        old = json.loads(meta.get("hparams", "{}"))
        if old != hparams:
            logger.warning("resuming %s trained with %s using %s", ckpt, old, hparams)
        load_module("model", model, tensors)
        load_optimizer(opt, tensors)
        start = int(meta["step"])
        logger.info("resuming toy CLIP training from %s at step %d", ckpt, start)
    model.train()
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="toy clip", unit="step")
    for step in range(start, steps):
        loss = _train_step(
            model,
            opt,
            random.Random(f"clip-{seed}-{step}"),
            batch_size,
            warmup_cosine(step, steps, lr, warmup=max(1, min(100, steps // 20))),
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, model, opt, step + 1, hparams)
    bar.close()
    save_toy_clip(model.eval(), out, {"trained": json.dumps(hparams)}, dtype=dtype)
    ckpt.unlink(missing_ok=True)
    logger.info("wrote toy CLIP to %s", out)
    return out


@torch.no_grad()
def zero_shot_accuracy(model: open_clip.CLIP, n: int = 400, seed: int = 0) -> dict[str, float]:
    """Per attribute: share of ``n`` renders of *held-out* concepts whose value the model picks
    among the prompts naming one value each ("a photo of a star", "a photo of a object on a teal
    background", ...), CLIP's zero-shot classification."""
    from oneword.toy.captions import prompt_for
    from oneword.toy.render import ATTRIBUTES, VOCAB

    rng = random.Random(f"clip-eval-{seed}")
    held = split_concepts()[1]
    images, truth = [], []
    for _ in range(n):
        c = rng.choice(held)
        bg = rng.choice(backgrounds_for(c))
        images.append(render(c, bg, sample_pose(rng), size=model.toy_config.image_size))
        truth.append({**c.attributes(), "background": bg})
    feats = encode_images(model, images)
    out = {}
    for attr in ATTRIBUTES:
        texts = encode_texts(model, [prompt_for({attr: v}) for v in VOCAB[attr]])
        pred = (feats @ texts.T).argmax(-1).tolist()
        out[attr] = sum(VOCAB[attr][p] == t[attr] for p, t in zip(pred, truth)) / n
    return out
