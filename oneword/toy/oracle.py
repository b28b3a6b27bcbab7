"""The attribute oracle: a small CNN that reads shape, fill, pattern, outline and background back
from any toy-world image.

It is the ruler that scores generated images, so it is trained on fresh renders of *all* concepts
with augmentations that imitate a small diffusion model's output (blur, noise, colour jitter,
down-and-up scaling). Weights ship as ``oneword/toy/weights/oracle.safetensors`` (weights only,
config as JSON in the header); training checkpoints are safetensors too (no pickle anywhere).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from oneword.errors import InputError
from oneword.toy.render import ATTRIBUTES, BACKGROUNDS, VOCAB, all_concepts, render, sample_pose
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

DEFAULT_PATH = Path(__file__).with_name("weights") / "oracle.safetensors"
FORMAT = "oneword.toy.oracle"
CKPT_FORMAT = "oneword.toy.oracle.checkpoint"
_CHUNK = 256  # images per forward pass in predict/evaluate


@dataclass
class OracleConfig:
    """Architecture of the :class:`AttributeOracle`."""

    image_size: int = 64
    """Side of the (square) input the network sees; other sizes are resized to it."""
    channels: tuple[int, ...] = (32, 64, 96, 128)
    """Output channels of the conv stages, after a 2x pixel-unshuffle stem; every stage but the
    last halves the resolution."""
    convs_per_stage: tuple[int, ...] = (1, 1, 2, 2)
    """Number of 3x3 conv + BatchNorm + ReLU layers in each stage."""
    dropout: float = 0.1
    """Dropout before the linear heads (training only)."""

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.convs_per_stage = tuple(int(c) for c in self.convs_per_stage)
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        if len(self.convs_per_stage) != len(self.channels) or min(self.convs_per_stage) < 1:
            raise ValueError("convs_per_stage needs one positive count per entry of channels")
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(f"image_size must be a multiple of {2 ** len(self.channels)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class AttributeOracle(nn.Module):
    """Compact CNN with one linear head per attribute (in :data:`ATTRIBUTES` order).

    Input: float ``[B, 3, H, W]`` in ``[-1, 1]``; any size other than ``config.image_size`` is
    resized bilinearly (antialiased when shrinking). :meth:`forward` gives logits per attribute.
    """

    def __init__(self, config: OracleConfig | None = None) -> None:
        super().__init__()
        self.config = config or OracleConfig()
        layers: list[nn.Module] = [nn.PixelUnshuffle(2)]  # lossless 2x downsampling: 12 channels
        cin = 12
        last = len(self.config.channels) - 1
        for i, (cout, n) in enumerate(zip(self.config.channels, self.config.convs_per_stage)):
            for _ in range(n):
                layers += [
                    nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
                cin = cout
            if i < last:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(self.config.dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(cin, len(VOCAB[name])) for name in ATTRIBUTES})
        self.to(memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits ``{attribute: [B, n_values]}`` for images ``x`` in ``[-1, 1]``."""
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            shrink = x.shape[-1] > size or x.shape[-2] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        x = x.contiguous(memory_format=torch.channels_last)
        h = self.dropout(self.features(x).mean(dim=(2, 3)))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict_proba(self, images: Sequence[Image.Image] | Tensor) -> dict[str, Tensor]:
        """Class probabilities ``{attribute: [B, n_values]}`` (eval mode, no grad), in the order
        of :data:`VOCAB`. ``images`` are PIL images of any size or a tensor in ``[-1, 1]``."""
        was_training = self.training
        self.eval()
        try:
            x = _as_batch(images, self.config.image_size)
            device = next(self.parameters()).device
            parts = [self(x[i : i + _CHUNK].to(device)) for i in range(0, len(x), _CHUNK)]
        finally:
            self.train(was_training)
        if not parts:
            return {name: torch.empty(0, len(VOCAB[name])) for name in ATTRIBUTES}
        return {name: torch.cat([p[name] for p in parts]).softmax(-1).cpu() for name in ATTRIBUTES}

    def predict(self, images: Sequence[Image.Image] | Tensor) -> list[dict[str, str]]:
        """The most likely value of every attribute, one dict per image."""
        proba = self.predict_proba(images)
        idx = {name: p.argmax(-1).tolist() for name, p in proba.items()}
        n = len(next(iter(idx.values())))
        return [{name: VOCAB[name][idx[name][i]] for name in ATTRIBUTES} for i in range(n)]


def _as_batch(images: Sequence[Image.Image] | Tensor, size: int) -> Tensor:
    """A float ``[B, 3, H, W]`` tensor in ``[-1, 1]``; PIL images of another size than ``size``
    are resized to it (bilinear, which PIL antialiases when shrinking)."""
    if isinstance(images, Tensor):
        x = images.float().unsqueeze(0) if images.ndim == 3 else images.float()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        return x
    if not images:
        return torch.empty(0, 3, size, size)
    rgb = [img.convert("RGB") for img in images]
    return _pil_to_tensor(
        [im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BILINEAR) for im in rgb]
    )


def _pil_to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """Equally sized RGB images -> ``[B, 3, H, W]`` in ``[-1, 1]``."""
    arr = np.stack([np.asarray(img, dtype=np.uint8) for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def attribute_accuracy(
    predictions: Sequence[dict[str, str]], expected: Sequence[dict[str, str]]
) -> dict[str, float]:
    """Share of correct predictions per attribute, over the attributes each ``expected`` dict
    names (dicts may name a subset). Attributes no dict names are left out of the result."""
    if len(predictions) != len(expected):
        raise ValueError(f"{len(predictions)} predictions for {len(expected)} expected dicts")
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for pred, exp in zip(predictions, expected):
        for name, value in exp.items():
            counts[name] = counts.get(name, 0) + 1
            hits[name] = hits.get(name, 0) + int(pred.get(name) == value)
    order = [n for n in ATTRIBUTES if n in counts] + sorted(set(counts) - set(ATTRIBUTES))
    return {name: hits[name] / counts[name] for name in order}


def _render_batch(rng: random.Random, n: int, size: int = 64) -> tuple[Tensor, Tensor]:
    """``n`` fresh renders (random concept, background, pose) and their labels ``[n, 5]``."""
    concepts = all_concepts()
    images, labels = [], []
    for _ in range(n):
        concept, bg = rng.choice(concepts), rng.choice(BACKGROUNDS)
        images.append(render(concept, bg, sample_pose(rng), size=size))
        values = {**concept.attributes(), "background": bg}
        labels.append([VOCAB[name].index(values[name]) for name in ATTRIBUTES])
    return _pil_to_tensor(images), torch.tensor(labels, dtype=torch.long)


def _gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 3) -> Tensor:
    """Blur each image of ``x`` with its own ``sigma`` (px; 0 leaves it unchanged)."""
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [b*c, 2r+1]
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment_images(x: Tensor, gen: torch.Generator) -> Tensor:
    """The training augmentations, on ``[B, 3, H, W]`` in ``[-1, 1]``: horizontal flip (p 0.5),
    downscale to half size and back (p 0.2), gaussian blur sigma U(0, 1.2) px (p 0.5),
    brightness/contrast/saturation jitter of +-8%, additive noise std U(0, 0.08) in [0, 1] pixel
    units (p 0.5). All randomness comes from ``gen``."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> Tensor:
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    def chance(p: float) -> Tensor:
        return torch.rand(b, generator=gen) < p

    x = (x + 1) / 2
    x = torch.where(chance(0.5)[:, None, None, None], x.flip(-1), x)
    small = chance(0.2).nonzero().flatten()
    if len(small):
        h, w = x.shape[-2:]
        lo = F.interpolate(x[small], size=(h // 2, w // 2), mode="bilinear", antialias=True)
        x = x.clone()
        x[small] = F.interpolate(lo, size=(h, w), mode="bilinear", align_corners=False)
    x = _gaussian_blur(x, torch.where(chance(0.5), u(0.0, 1.2), torch.zeros(b)))
    view = (b, 1, 1, 1)
    gray = (x * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    x = gray + (x - gray) * u(0.92, 1.08).view(view)  # saturation
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * u(0.92, 1.08).view(view)  # contrast
    x = x * u(0.92, 1.08).view(view)  # brightness
    std = torch.where(chance(0.5), u(0.0, 0.08), torch.zeros(b)).view(view)
    x = x + std * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1) * 2 - 1


def _train_step(
    model: AttributeOracle, opt: torch.optim.Optimizer, rng: random.Random, batch_size: int, lr: float
) -> float:
    """One AdamW step on a fresh augmented batch; renders, augmentation and dropout all draw from
    ``rng``, so a step's outcome depends only on its seed and the state (exact resumes)."""
    seed = rng.getrandbits(63)
    x, y = _render_batch(rng, batch_size, model.config.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logits = model(augment_images(x, torch.Generator().manual_seed(seed)))
        loss = sum(F.cross_entropy(logits[n], y[:, i]) for i, n in enumerate(ATTRIBUTES))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def _save_checkpoint(
    path: Path, model: AttributeOracle, opt: torch.optim.Optimizer, step: int, hparams: dict
) -> None:
    optim, _ = optimizer_tensors(opt)
    meta = {
        "format": CKPT_FORMAT,
        "step": str(step),
        "hparams": json.dumps(hparams),
        "config": json.dumps(asdict(model.config)),
    }
    write_safetensors(path, {**module_tensors("model", model), **optim}, meta)


def _read(path: Path, fmt: str) -> tuple[dict[str, Tensor], dict[str, str], OracleConfig]:
    """Tensors, header and config of a safetensors file whose header says ``format == fmt``."""
    tensors, meta = read_safetensors(path, fmt=fmt, missing="train the oracle first")
    try:
        return tensors, meta, OracleConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path} has no valid oracle config in its header ({err})") from None


def train_oracle(
    out: Path,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    config: OracleConfig | None = None,
    checkpoint_every: int = 200,
) -> Path:
    """Train an oracle on fresh augmented renders and write it to ``out``; return ``out``.

    AdamW (weight decay 0.01) with warm-up and cosine decay. Every ``checkpoint_every`` steps the
    model and optimizer go to ``out.with_suffix('.ckpt.safetensors')``, which a later call with
    ``resume=True`` continues from (step ``k``'s batch depends only on ``seed`` and ``k``, so a
    resumed run sees the same data). The finished file holds weights only, the config in its header;
    it is written atomically and the checkpoint is then deleted.
    """
    if steps < 1 or batch_size < 1 or checkpoint_every < 1 or lr <= 0:
        raise ValueError("steps, batch_size, checkpoint_every and lr must be positive")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.with_suffix(".ckpt.safetensors")
    hparams = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = AttributeOracle(config)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    start = 0
    if resume and ckpt.exists():
        tensors, meta, old_config = _read(ckpt, CKPT_FORMAT)
        if old_config != model.config:
            raise InputError(f"{ckpt} was trained with another architecture; delete it or pass resume=False")
        old = json.loads(meta.get("hparams", "{}"))
        if old != hparams:
            logger.warning("resuming %s trained with %s using %s", ckpt, old, hparams)
        load_module("model", model, tensors)
        load_optimizer(opt, tensors)
        start = int(meta["step"])
        logger.info("resuming oracle training from %s at step %d", ckpt, start)
    model.train()
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="oracle", unit="step")
    for step in range(start, steps):
        rng = random.Random(f"oracle-train-{seed}-{step}")  # str seeds: disjoint from evaluation
        step_lr = warmup_cosine(step, steps, lr, warmup=max(1, min(100, steps // 20)))
        loss = _train_step(model, opt, rng, batch_size, step_lr)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, model, opt, step + 1, hparams)
    bar.close()
    meta = {
        "format": FORMAT,
        "config": json.dumps(asdict(model.config)),
        "vocab": json.dumps(VOCAB),
        "trained": json.dumps(hparams),
    }
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(out, weights, meta)
    ckpt.unlink(missing_ok=True)
    logger.info("wrote attribute oracle to %s", out)
    return out


def load_oracle(path: Path | None = None) -> AttributeOracle:
    """Load an oracle written by :func:`train_oracle` (default: the shipped weights), in eval
    mode. Files without the oracle header, or for another vocabulary, raise :class:`InputError`."""
    path = Path(path) if path is not None else DEFAULT_PATH
    tensors, meta, config = _read(path, FORMAT)
    if meta.get("vocab") != json.dumps(VOCAB):
        raise InputError(f"{path} was trained for another toy-world vocabulary; retrain the oracle")
    model = AttributeOracle(config)
    want = model.state_dict()
    bad = sorted(
        k
        for k in want.keys() | tensors.keys()
        if k not in want or k not in tensors or want[k].shape != tensors[k].shape
    )
    if bad:
        raise InputError(
            f"{path} does not match its oracle config ({len(bad)} tensors missing, "
            f"unexpected or misshapen, e.g. {bad[0]!r}); retrain the oracle"
        )
    model.load_state_dict(tensors)
    return model.eval()


def evaluate_oracle(
    oracle: AttributeOracle, n: int = 2000, seed: int = 12345, augment: bool = False
) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` fresh renders drawn from ``random.Random(seed)`` (integer
    seeds; training uses string seeds, so the images are never training images), clean or with
    the training augmentations (``augment=True``)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    preds: list[dict[str, str]] = []
    expected: list[dict[str, str]] = []
    for start in range(0, n, _CHUNK):
        x, y = _render_batch(rng, min(_CHUNK, n - start), oracle.config.image_size)
        if augment:
            x = augment_images(x, gen)
        preds += oracle.predict(x)
        expected += [{a: VOCAB[a][int(v)] for a, v in zip(ATTRIBUTES, row)} for row in y]
    return attribute_accuracy(preds, expected)
