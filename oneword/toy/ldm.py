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
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from oneword.data.images import image_to_tensor
from oneword.fileio import atomic_dir, atomic_write_text
from oneword.toy.captions import DEFAULT_NAME_PROB, caption, vocabulary_texts
from oneword.toy.render import ATTRIBUTES, VOCAB, backgrounds_for, render, sample_pose, split_concepts
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
    """UNet block widths, highest resolution first."""
    cross_attention_levels: tuple[int, ...] = (1, 2)
    """UNet levels (0 = the 8x8 latent resolution) whose down and up blocks cross-attend to the
    text. With ``init_from``, levels the loaded UNet lacks are added as identity blocks (see
    :func:`grow_unet`). Adding level 0 to the shipped model did not help patterns (docs/experiments)."""
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
    name_background: float = 0.8
    """Probability that a training caption names the background (the other attributes keep
    :data:`oneword.toy.captions.DEFAULT_NAME_PROB`)."""
    min_snr_gamma: float = 0.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023: min(SNR, gamma) / SNR); 0 (the default)
    turns it off. Weighting down the low-noise steps, where texture forms, kept the toy model from
    drawing patterns (gamma 5 gave 0.59 pattern accuracy; docs/experiments)."""
    text_aux_weight: float | None = None
    """Weight of an auxiliary loss on the text encoder: a linear head reads, from the mean of the
    caption's token states, which value of each attribute the caption names (or that it names
    none). The denoising loss alone barely separates the pattern words (the three gave nearly equal
    text states in the shipped model; docs/experiments); this makes every named attribute visible to the
    UNet's cross-attention. Training-only: the head is not exported. 0 turns it off; None (the
    default) means 0.05 when the text encoder trains and 0 when ``train_text`` is False."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of stage-2 weights, exported as the model."""
    train_text: bool = True
    """Whether stage 2 trains the text encoder. False keeps every word embedding and text feature
    of an ``init_from`` model, so embeddings learned on it stay meaningful."""
    decoder_steps: int = 600
    """Steps of stage 3, which fine-tunes the VAE *decoder* alone (the encoder stays frozen, so the
    UNet's latents keep their meaning; cf. SD's ft-MSE VAE). 0 skips it (also with
    ``init_from``)."""
    init_from: str = ""
    """A toy pipeline folder whose VAE, text encoder and UNet start this run (continued training:
    stage 1 is skipped, the EMA starts from the loaded weights). Empty: train from scratch."""
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
        if self.decoder_steps < 0:
            raise ValueError("decoder_steps must be >= 0")
        if not 0 <= self.uncond_p < 1:
            raise ValueError("uncond_p must be in [0, 1)")
        if not 0 <= self.name_background <= 1:
            raise ValueError("name_background must be in [0, 1]")
        if self.min_snr_gamma < 0:
            raise ValueError("min_snr_gamma must be >= 0")
        if self.text_aux_weight is None:
            self.text_aux_weight = 0.05 if self.train_text else 0.0
        if self.text_aux_weight < 0:
            raise ValueError("text_aux_weight must be >= 0")
        if self.text_aux_weight and not self.train_text:
            raise ValueError("text_aux_weight needs a trained text encoder (not train_text=False)")
        levels = tuple(self.cross_attention_levels)
        if any(not 0 <= lv < len(self.unet_channels) for lv in levels) or len(set(levels)) != len(levels):
            raise ValueError(
                f"cross_attention_levels must be distinct UNet levels 0..{len(self.unet_channels) - 1}"
            )
        if not self.train_text and not self.init_from:
            raise ValueError(
                "train_text=False needs init_from (a text encoder trained from scratch must train)"
            )

    def block_types(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """diffusers ``down_block_types`` and ``up_block_types`` for :attr:`cross_attention_levels`."""
        n = len(self.unet_channels)
        down = tuple(
            "CrossAttnDownBlock2D" if lv in self.cross_attention_levels else "DownBlock2D" for lv in range(n)
        )
        up = tuple(
            "CrossAttnUpBlock2D" if lv in self.cross_attention_levels else "UpBlock2D"
            for lv in reversed(range(n))
        )
        return down, up


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
    down_types, up_types = cfg.block_types()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.latent_channels,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=cfg.image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (n - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=1,
        block_out_channels=cfg.unet_channels,
        down_block_types=down_types,
        up_block_types=up_types,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        text_encoder=text,
        scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir())),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class DataStream:
    """Endless (image, caption) batches of *training* concepts, deterministic from a seed."""

    def __init__(self, cfg: ToyLDMConfig, seed: int) -> None:
        self.cfg = cfg
        self.train, _ = split_concepts(seed=cfg.split_seed)
        self.rng = random.Random(seed)
        self.name_prob = {**DEFAULT_NAME_PROB, "background": cfg.name_background}
        self.named: list[dict[str, str]] = []
        """What each caption of the last batch names (empty for dropped captions)."""

    def batch(self, n: int, with_captions: bool = True) -> tuple[torch.Tensor, list[str]]:
        images, texts = [], []
        self.named = []
        for _ in range(n):
            concept = self.rng.choice(self.train)
            background = self.rng.choice(backgrounds_for(concept))
            img = render(concept, background, sample_pose(self.rng), size=self.cfg.image_size)
            images.append(image_to_tensor(img))
            if with_captions:
                drop = self.rng.random() < self.cfg.uncond_p
                spec = None if drop else caption(concept, background, self.rng, self.name_prob)
                texts.append(spec.text if spec else "")
                self.named.append(dict(spec.named) if spec else {})
        return torch.stack(images), texts


def _save_ckpt(
    path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, step: int, stream: DataStream
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in modules.items():
        tensors |= module_tensors(prefix, mod)
    opt_tensors, groups = optimizer_tensors(opt, prefix="opt")
    version, internal, gauss = stream.rng.getstate()
    meta = {
        "step": str(step),
        "param_groups": groups,
        "data_rng": json.dumps([version, list(internal), gauss]),
    }
    write_safetensors(path, tensors | opt_tensors, meta)


def _load_ckpt(
    path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, stream: DataStream
) -> int:
    tensors, meta = read_safetensors(path)
    for prefix, mod in modules.items():
        load_module(prefix, mod, tensors)
    load_optimizer(opt, tensors, meta["param_groups"], prefix="opt")
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
            group["lr"] = warmup_cosine(step, cfg.vae_steps, 1e-3, warmup=200, floor=0.1)
        x, _ = stream.batch(cfg.vae_batch, with_captions=False)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        _clipped_step(loss, list(vae.parameters()), opt)
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


class TextAttributeHead(torch.nn.Module):
    """Training-only probe of :attr:`ToyLDMConfig.text_aux_weight`: per attribute, logits over
    "not named" and each of its values, from the mean of a caption's token states."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.sizes = [len(VOCAB[a]) + 1 for a in ATTRIBUTES]
        self.linear = torch.nn.Linear(width, sum(self.sizes))

    @staticmethod
    def targets(named: list[dict[str, str]]) -> torch.Tensor:
        """``[batch, attributes]`` class ids: 0 = not named, 1 + the value's index otherwise."""
        return torch.tensor(
            [[VOCAB[a].index(d[a]) + 1 if a in d else 0 for a in ATTRIBUTES] for d in named], dtype=torch.long
        )

    def loss(
        self, states: torch.Tensor, ids: torch.Tensor, eos_id: int, named: list[dict[str, str]]
    ) -> torch.Tensor:
        """Mean cross-entropy over attributes; ``states`` ``[batch, tokens, width]``, ``ids`` the
        token ids (positions after the first ``eos_id`` are padding and left out)."""
        last = (ids == eos_id).int().argmax(1)
        mask = (torch.arange(ids.shape[1])[None] <= last[:, None]).to(states.dtype)
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        logits = self.linear(pooled).split(self.sizes, dim=1)
        target = self.targets(named)
        return torch.stack([F.cross_entropy(lg, target[:, i]) for i, lg in enumerate(logits)]).mean()


def _clipped_step(loss: torch.Tensor, params: list, opt: torch.optim.Optimizer) -> None:
    """Backward, clip the gradient norm to 1, step, clear: every stage's optimizer step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_ldm(
    pipe, cfg: ToyLDMConfig, work: Path, progress: bool = True
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Stage 2: text encoder + UNet on partial captions. Returns the EMA copies."""
    import copy

    from oneword.inversion.loss import denoising_loss
    from oneword.models import FrozenLDM

    unet, text = pipe.unet, pipe.text_encoder
    pipe.vae.requires_grad_(False).eval()
    unet.train().requires_grad_(True)
    text.train(cfg.train_text).requires_grad_(cfg.train_text)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = list(unet.parameters()) + (list(text.parameters()) if cfg.train_text else [])
    modules = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text}
    head = None
    if cfg.text_aux_weight > 0:
        torch.manual_seed(cfg.seed + 6)
        head = TextAttributeHead(text.config.hidden_size)
        params += list(head.parameters())
        modules["text_head"] = head
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    stream = DataStream(cfg, cfg.seed + 2)
    ckpt = work / "ldm.ckpt.safetensors"
    step = _load_ckpt(ckpt, modules, opt, stream) if ckpt.is_file() else 0
    gen = torch.Generator().manual_seed(cfg.seed + 3 + step)  # reseeded per resume: stream stays exact
    ldm = FrozenLDM("toy", pipe, "toy-training", torch.device("cpu"), torch.float32)
    scale = float(pipe.vae.config.scaling_factor)
    log_path = work / "ldm_loss.csv"
    bar = tqdm(total=cfg.ldm_steps, initial=step, desc="toy ldm", disable=not progress)
    t0, losses = time.perf_counter(), []
    ema_start = -1 if cfg.init_from else 500  # a continued run's EMA starts at the loaded weights
    while step < cfg.ldm_steps:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.ldm_steps, cfg.lr, warmup=200, floor=0.1)
        x, texts = stream.batch(cfg.ldm_batch)
        with torch.no_grad():
            latents = pipe.vae.encode(x).latent_dist.sample(generator=gen) * scale
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(x),), generator=gen)
        cond = ldm.encode_text(texts)
        per_sample = denoising_loss(ldm, latents, cond, gen, timesteps=t)
        loss = (per_sample * min_snr_weights(pipe.scheduler, t, cfg.min_snr_gamma)).mean()
        if head is not None:
            tok = pipe.tokenizer
            ids = tok(
                texts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            aux = head.loss(cond.hidden_states, ids, tok.eos_token_id, stream.named)
            loss = loss + cfg.text_aux_weight * aux
        _clipped_step(loss, params, opt)
        decay = cfg.ema_decay if step > ema_start else 0.0
        _ema_update(ema_unet, unet, decay)
        if cfg.train_text:
            _ema_update(ema_text, text, decay)
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


def finetune_decoder(pipe, cfg: ToyLDMConfig, work: Path, progress: bool = True) -> None:
    """Stage 3: the VAE decoder alone on reconstructions of sampled latents (encoder frozen).
    Resumes from ``work/decoder.ckpt.safetensors``."""
    vae = pipe.vae
    vae.requires_grad_(False).eval()
    vae.decoder.requires_grad_(True).train()
    vae.post_quant_conv.requires_grad_(True).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    stream = DataStream(cfg, cfg.seed + 4)
    ckpt = work / "decoder.ckpt.safetensors"
    step = _load_ckpt(ckpt, {"vae": vae}, opt, stream) if ckpt.is_file() else 0
    gen = torch.Generator().manual_seed(cfg.seed + 5 + step)
    bar = tqdm(total=cfg.decoder_steps, initial=step, desc="toy decoder", disable=not progress)
    while step < cfg.decoder_steps:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.decoder_steps, 3e-4, warmup=50, floor=0.1)
        x, _ = stream.batch(cfg.vae_batch, with_captions=False)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        _clipped_step(loss, params, opt)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.save_every == 0 or step == cfg.decoder_steps:
            _save_ckpt(ckpt, {"vae": vae}, opt, step, stream)
    bar.close()
    vae.requires_grad_(False).eval()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR for epsilon targets (all ones if gamma is 0)."""
    if gamma <= 0:
        return torch.ones(len(timesteps))
    acp = scheduler.alphas_cumprod.float()[timesteps]
    snr = acp / (1 - acp)
    return snr.clamp(max=gamma) / snr


def caption_token_ids(tokenizer) -> set[int]:
    """Every token id that a toy caption can contain (all words of all templates and values)."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    for text in vocabulary_texts():
        ids |= set(tokenizer(text, add_special_tokens=False).input_ids)
    return ids


def export(pipe, ema_unet, ema_text, cfg: ToyLDMConfig, out: Path, lineage: dict | None = None) -> Path:
    """Write the EMA model as a diffusers folder (fp16 storage) with the toy family marker."""
    pipe.unet.load_state_dict(ema_unet.state_dict())
    pipe.text_encoder.load_state_dict(ema_text.state_dict())
    keep = torch.tensor(sorted(caption_token_ids(pipe.tokenizer)))
    with torch.no_grad():
        table = pipe.text_encoder.get_input_embeddings().weight
        mask = torch.ones(table.shape[0], dtype=torch.bool)
        mask[keep] = False
        table[mask] = 0.0  # never trained; zero rows compress to almost nothing
    with atomic_dir(out) as tmp:
        pipe.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
        pipe.to(torch.float32)
        marker = {"family": "toy", "config": asdict(cfg)}
        if lineage:  # continued training: the markers of the weights it started from
            marker["continued_from"] = lineage
        (tmp / "oneword.json").write_text(json.dumps(marker, indent=1))
    return out


def _marker(folder: Path) -> dict:
    path = folder / "oneword.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_init(pipe, folder: Path) -> None:
    """Copy a saved toy pipeline's VAE, text encoder and UNet (and latent scale) into ``pipe``."""
    from diffusers import StableDiffusionPipeline

    if _marker(folder).get("family") != "toy":
        raise ValueError(f"{folder} is not a toy pipeline folder (no oneword.json with family 'toy')")
    src = StableDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    for name in ("vae", "text_encoder"):
        try:
            getattr(pipe, name).load_state_dict(getattr(src, name).state_dict())
        except RuntimeError as err:
            raise ValueError(f"{folder}: its {name} does not match this config's architecture") from err
    grow_unet(pipe.unet, src.unet.state_dict(), str(folder))
    pipe.vae.register_to_config(scaling_factor=float(src.vae.config.scaling_factor))


def grow_unet(
    unet: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "the loaded UNet"
) -> list[str]:
    """Load ``state`` into ``unet``, which may have cross-attention at levels the source lacks.

    Every tensor of the source must fit; the only tensors allowed to be missing are whole
    cross-attention blocks (``...attentions.*``). Their output projections are zeroed, so each new
    block starts as the identity (its residual path) and the grown UNet computes exactly what the
    source did. Returns the names of the new attention blocks."""
    try:
        result = unet.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise ValueError(f"{source}: its unet does not match this config's architecture") from err
    missing, unexpected = result.missing_keys, result.unexpected_keys
    blocks = [re.match(r"(.*\.attentions\.\d+)\.", k) for k in missing]
    new_blocks = sorted({m.group(1) for m in blocks if m})
    others = [k for k, m in zip(missing, blocks) if not m]
    if unexpected or others:
        raise ValueError(
            f"{source}: its unet does not match this config's architecture "
            f"(unexpected: {unexpected[:3]}, missing: {others[:3]})"
        )
    with torch.no_grad():
        for name in new_blocks:
            proj = unet.get_submodule(name).proj_out
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
    if new_blocks:
        logger.info(
            "grew %d cross-attention blocks (zero-initialised): %s", len(new_blocks), ", ".join(new_blocks)
        )
    return new_blocks


def train_toy_ldm(work: Path, out: Path, cfg: ToyLDMConfig | None = None, progress: bool = True) -> Path:
    """Both stages, resumable (re-run with the same ``work`` folder), then export to ``out``."""
    cfg = cfg or ToyLDMConfig()
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "toy_ldm_config.json"
    now = json.loads(json.dumps(asdict(cfg)))
    if cfg_path.is_file():  # step counts may grow (train longer); everything else must match
        saved = json.loads(cfg_path.read_text())
        free = {"vae_steps", "ldm_steps", "decoder_steps", "save_every"}
        diff = sorted(k for k in now if k not in free and saved.get(k) != now[k])
        if diff:
            raise ValueError(
                f"{work} was started with other settings ({', '.join(diff)}); use another folder"
            )
    atomic_write_text(cfg_path, json.dumps(now, indent=1))
    pipe = build_pipeline(cfg)
    pipe.set_progress_bar_config(disable=True)
    vae_done = work / "vae.safetensors"
    lineage_path = work / "init_oneword.json"
    if cfg.init_from and not (work / "ldm.ckpt.safetensors").is_file():
        load_init(pipe, Path(cfg.init_from))
        atomic_write_text(lineage_path, json.dumps(_marker(Path(cfg.init_from)), indent=1))
        write_safetensors(
            vae_done, module_tensors("vae", pipe.vae), {"scaling_factor": str(pipe.vae.config.scaling_factor)}
        )
    elif vae_done.is_file():
        tensors, meta = read_safetensors(vae_done)
        load_module("vae", pipe.vae, tensors)
        pipe.vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    else:
        train_vae(pipe, cfg, work, progress)
        write_safetensors(
            vae_done, module_tensors("vae", pipe.vae), {"scaling_factor": str(pipe.vae.config.scaling_factor)}
        )
    ema_unet, ema_text = train_ldm(pipe, cfg, work, progress)
    if cfg.decoder_steps:
        finetune_decoder(pipe, cfg, work, progress)
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else None
    return export(pipe, ema_unet, ema_text, cfg, out, lineage)
