"""The toy latent diffusion model: Stable Diffusion 1.x in miniature, trained on the shapes world.

Same classes as SD 1.x (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel`` with the real
CLIP tokenizer, DDPM training / DDIM sampling), so the toy model runs through exactly the code
paths real checkpoints do. 32 px images, a 4x VAE (8 latent channels, 8x8 latents) and a small
UNet keep training within reach of two CPU cores.

Training has two resumable stages, each checkpointed as safetensors (no pickle):

1. ``vae``: reconstruction (L1 + MSE) with a small KL term on random renders of training concepts;
2. ``ldm``: the text encoder (from scratch) and UNet jointly on partial captions, with
   classifier-free-guidance dropout and an EMA of the weights. The loss is the shared
   :func:`oneword.inversion.loss.denoising_loss`.

``export`` writes the EMA weights as a diffusers pipeline folder (fp16 storage; unused rows of the
49,408-token table are zeroed so the package stays small) with a ``oneword.json`` family marker.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from oneword.data.images import image_to_tensor
from oneword.fileio import atomic_path, atomic_write_text
from oneword.toy.captions import caption
from oneword.toy.render import backgrounds_for, render, sample_pose, split_concepts

logger = logging.getLogger(__name__)


@dataclass
class ToyLDMConfig:
    """Architecture and training settings of the toy model."""

    image_size: int = 32
    """Side of the rendered images in pixels."""
    latent_channels: int = 8
    """VAE latent channels (SD uses 4; 8 keeps patterns at 8x8 latents)."""
    vae_channels: tuple[int, ...] = (32, 64, 64)
    """VAE block widths; 3 blocks = 4x downsampling (SD: 4 blocks, 8x, on 8x larger images)."""
    text_width: int = 128
    """Text encoder width (the width of learned word embeddings)."""
    text_layers: int = 4
    """Text encoder transformer layers."""
    unet_channels: tuple[int, ...] = (64, 128, 128)
    """UNet block widths (cross-attention in the two lower-resolution levels)."""
    vae_steps: int = 1500
    """Optimizer steps of stage 1."""
    vae_batch: int = 32
    """Images per VAE step."""
    ldm_steps: int = 12000
    """Optimizer steps of stage 2."""
    ldm_batch: int = 32
    """Images per diffusion step."""
    lr: float = 4e-4
    """Peak learning rate of stage 2 (stage 1 uses 1e-3); linear warm-up, cosine decay."""
    uncond_p: float = 0.1
    """Probability that a caption is dropped (classifier-free guidance)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of stage-2 weights, exported as the model."""
    save_every: int = 250
    """Checkpoint interval in steps."""
    seed: int = 0
    """Seed of the data stream and the initial weights."""
    split_seed: int = 0
    """Seed of the train / held-out concept split (held-out concepts are never rendered)."""

    def __post_init__(self) -> None:
        if self.image_size % 2 ** (len(self.vae_channels) - 1):
            raise ValueError("image_size must be divisible by the VAE's downsampling factor")
        for name in ("vae_steps", "ldm_steps", "vae_batch", "ldm_batch", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.uncond_p < 1:
            raise ValueError("uncond_p must be in [0, 1)")


def build_pipeline(cfg: ToyLDMConfig):
    """A freshly initialised toy pipeline (seeded)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from oneword.tokenizer import clip_tokenizer_dir

    torch.manual_seed(cfg.seed)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=cfg.image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (n - 1), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, layers_per_block=1, block_out_channels=cfg.unet_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cfg.text_width, attention_head_dim=4, norm_num_groups=32,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text, scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir())),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


class DataStream:
    """Endless (image, caption) batches of *training* concepts, deterministic from a seed."""

    def __init__(self, cfg: ToyLDMConfig, seed: int) -> None:
        self.cfg = cfg
        self.train, _ = split_concepts(seed=cfg.split_seed)
        self.rng = random.Random(seed)

    def batch(self, n: int, with_captions: bool = True) -> tuple[torch.Tensor, list[str]]:
        images, texts = [], []
        for _ in range(n):
            concept = self.rng.choice(self.train)
            background = self.rng.choice(backgrounds_for(concept))
            img = render(concept, background, sample_pose(self.rng), size=self.cfg.image_size)
            images.append(image_to_tensor(img))
            if with_captions:
                drop = self.rng.random() < self.cfg.uncond_p
                texts.append("" if drop else caption(concept, background, self.rng).text)
        return torch.stack(images), texts


def _lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


def _save_ckpt(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               step: int, stream: DataStream, extra: dict[str, str] | None = None) -> None:
    tensors = {}
    for prefix, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    opt_state = opt.state_dict()
    for pid, entries in opt_state["state"].items():
        for k, v in entries.items():
            tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    version, internal, gauss = stream.rng.getstate()
    meta = {"step": str(step), "param_groups": json.dumps(opt_state["param_groups"]),
            "data_rng": json.dumps([version, list(internal), gauss]), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_ckpt(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               stream: DataStream) -> int:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for prefix, mod in modules.items():
        sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        mod.load_state_dict(sd)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    version, internal, gauss = json.loads(meta["data_rng"])
    stream.rng.setstate((version, tuple(internal), gauss))
    return int(meta["step"])


def train_vae(pipe, cfg: ToyLDMConfig, work: Path, progress: bool = True) -> None:
    """Stage 1: the autoencoder. Resumes from ``work/vae.ckpt.safetensors``."""
    vae = pipe.vae
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    stream = DataStream(cfg, cfg.seed + 1)
    ckpt = work / "vae.ckpt.safetensors"
    step = _load_ckpt(ckpt, {"vae": vae}, opt, stream) if ckpt.is_file() else 0
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="toy vae", disable=not progress)
    while step < cfg.vae_steps:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.vae_steps, 1e-3)
        x, _ = stream.batch(cfg.vae_batch, with_captions=False)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.save_every == 0 or step == cfg.vae_steps:
            _save_ckpt(ckpt, {"vae": vae}, opt, step, stream)
    bar.close()
    vae.eval()
    # SD normalizes latents to unit variance with a fixed scaling factor; measure ours.
    with torch.no_grad():
        x, _ = stream.batch(256, with_captions=False)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    logger.info("toy VAE latent std %.4f -> scaling factor %.4f", std, 1.0 / std)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_ldm(pipe, cfg: ToyLDMConfig, work: Path, progress: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Stage 2: text encoder + UNet on partial captions. Returns the EMA copies."""
    import copy

    from oneword.inversion.loss import denoising_loss
    from oneword.models import FrozenLDM

    unet, text = pipe.unet, pipe.text_encoder
    pipe.vae.requires_grad_(False).eval()
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    stream = DataStream(cfg, cfg.seed + 2)
    modules = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text}
    ckpt = work / "ldm.ckpt.safetensors"
    step = _load_ckpt(ckpt, modules, opt, stream) if ckpt.is_file() else 0
    gen = torch.Generator().manual_seed(cfg.seed + 3 + step)  # reseeded per resume: stream stays exact
    ldm = FrozenLDM("toy", pipe, "toy-training", torch.device("cpu"), torch.float32)
    scale = float(pipe.vae.config.scaling_factor)
    log_path = work / "ldm_loss.csv"
    bar = tqdm(total=cfg.ldm_steps, initial=step, desc="toy ldm", disable=not progress)
    t0, losses = time.perf_counter(), []
    while step < cfg.ldm_steps:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.ldm_steps, cfg.lr)
        x, texts = stream.batch(cfg.ldm_batch)
        with torch.no_grad():
            latents = pipe.vae.encode(x).latent_dist.sample(generator=gen) * scale
        loss = denoising_loss(ldm, latents, ldm.encode_text(texts), gen).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ema_update(ema_unet, unet, cfg.ema_decay if step > 500 else 0.0)
        _ema_update(ema_text, text, cfg.ema_decay if step > 500 else 0.0)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % cfg.save_every == 0 or step == cfg.ldm_steps:
            _save_ckpt(ckpt, modules, opt, step, stream)
            with open(log_path, "a") as fh:
                fh.write(f"{step},{sum(losses) / len(losses):.5f},{time.perf_counter() - t0:.1f}\n")
            losses = []
    bar.close()
    return ema_unet, ema_text


def caption_token_ids(tokenizer) -> set[int]:
    """Every token id that a toy caption can contain (all words of all templates and values)."""
    from oneword.toy import captions as cap
    from oneword.toy.render import VOCAB

    words = set(" ".join(cap.PREFIXES).split()) | set(cap.GENERIC_NOUNS)
    words |= {w for values in cap.SURFACE_FORMS.values() for forms in values.values() for w in forms}
    words |= {w for vals in VOCAB.values() for w in vals}
    words |= {"a", "an", "the", "with", "and", "on", "in", "of", "front", "against", "background",
              "outline", "outlined", "stripes", "dots", "checks", "shape", "object", "thing"}
    rng = random.Random(0)
    train, _ = split_concepts()
    for _ in range(3000):  # and whatever the templates add
        c = rng.choice(train)
        words |= set(caption(c, rng.choice(backgrounds_for(c)), rng).text.split())
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    for w in words:
        ids |= set(tokenizer(w, add_special_tokens=False).input_ids)
    return ids


def export(pipe, ema_unet, ema_text, cfg: ToyLDMConfig, out: Path) -> Path:
    """Write the EMA model as a diffusers folder (fp16 storage) with the toy family marker."""
    pipe.unet.load_state_dict(ema_unet.state_dict())
    pipe.text_encoder.load_state_dict(ema_text.state_dict())
    keep = torch.tensor(sorted(caption_token_ids(pipe.tokenizer)))
    with torch.no_grad():
        table = pipe.text_encoder.get_input_embeddings().weight
        mask = torch.ones(table.shape[0], dtype=torch.bool)
        mask[keep] = False
        table[mask] = 0.0  # never trained; zero rows compress to almost nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
        pipe.to(torch.float32)
        (tmp / "oneword.json").write_text(json.dumps({"family": "toy", "config": asdict(cfg)}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def train_toy_ldm(work: Path, out: Path, cfg: ToyLDMConfig | None = None, progress: bool = True) -> Path:
    """Both stages, resumable (re-run with the same ``work`` folder), then export to ``out``."""
    cfg = cfg or ToyLDMConfig()
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "toy_ldm_config.json"
    now = json.loads(json.dumps(asdict(cfg)))
    if cfg_path.is_file():  # step counts may grow (train longer); everything else must match
        saved = json.loads(cfg_path.read_text())
        free = {"vae_steps", "ldm_steps", "save_every"}
        diff = sorted(k for k in now if k not in free and saved.get(k) != now[k])
        if diff:
            raise ValueError(f"{work} was started with other settings ({', '.join(diff)}); use another folder")
    atomic_write_text(cfg_path, json.dumps(now, indent=1))
    pipe = build_pipeline(cfg)
    pipe.set_progress_bar_config(disable=True)
    vae_done = work / "vae.safetensors"
    if vae_done.is_file():
        with safe_open(str(vae_done), framework="pt") as f:
            pipe.vae.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
            pipe.vae.register_to_config(scaling_factor=float(f.metadata()["scaling_factor"]))
    else:
        train_vae(pipe, cfg, work, progress)
        with atomic_path(vae_done) as tmp:
            save_file({k: v.contiguous() for k, v in pipe.vae.state_dict().items()}, str(tmp),
                      metadata={"scaling_factor": str(pipe.vae.config.scaling_factor)})
    ema_unet, ema_text = train_ldm(pipe, cfg, work, progress)
    return export(pipe, ema_unet, ema_text, cfg, out)
