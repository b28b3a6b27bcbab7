"""Per-step time and peak memory of oneword's inversion step versus the reference approach.

The reference is a faithful re-implementation of how diffusers'
``examples/textual_inversion/textual_inversion.py`` trains: the placeholder rows are added by
resizing the token-embedding matrix, the *whole* matrix is handed to AdamW, the original rows are
copied back after every step, and every step re-encodes the (randomly flipped) images with the VAE.
oneword's step: only the new vectors are parameters, the latents come from a bank encoded once.

Both run in separate subprocesses (so peak RSS is measured per method) on the same SD-1.x-shaped
model with a real-width text encoder (768, full 49,408-token vocabulary), same images, batch and
resolution. Usage: ``python bench/step_speed.py [--steps 30] [--resolution 128]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_bench_model(out: Path) -> Path:
    """An SD-1.x-shaped model: real-size CLIP-L token table (768 x 49,408), a slimmer UNet/VAE."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from oneword.tokenizer import clip_tokenizer_dir

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(64, 128, 256),
        layers_per_block=1,
        cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 128, 128),
        latent_channels=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=4,
            num_attention_heads=12,
            max_position_embeddings=77,
            eos_token_id=49407,
        )
    )
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        text_encoder=te,
        scheduler=sched,
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir())),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    return out


def _images(resolution: int):
    from PIL import Image, ImageDraw

    from oneword.data.images import LoadedImage

    out = []
    for i in range(4):
        img = Image.new("RGB", (resolution, resolution), (40 + 50 * i, 90, 160))
        d = ImageDraw.Draw(img)
        d.ellipse([10 + 4 * i, 12, resolution // 2 + 4 * i, resolution // 2 + 12], fill=(220, 30, 30))
        out.append(LoadedImage(Path(f"img{i}.png"), img, f"{i:064d}"))
    return out


def run_ours(model_dir: str, steps: int, resolution: int, batch: int, warmup: int) -> dict:
    from oneword.inversion.config import InversionConfig
    from oneword.inversion.train import Inversion
    from oneword.models import load_model

    model = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    cfg = InversionConfig(
        token="<bench-thing>",
        init="toy",
        steps=warmup + steps,
        batch_size=batch,
        resolution=resolution,
        views_per_image=8,
        seed=0,
    )
    t_setup = time.perf_counter()
    inv = Inversion(model, _images(resolution), cfg)
    setup = time.perf_counter() - t_setup
    losses, times = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        losses.append(inv.train_step())
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"setup_s": setup, "step_s": times, "loss": losses[warmup:]}


def run_reference(model_dir: str, steps: int, resolution: int, batch: int, warmup: int) -> dict:
    """diffusers' example script's step, re-implemented faithfully (see the module docstring)."""
    import random

    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from oneword.data.images import image_to_tensor, resize_and_crop
    from oneword.inversion.templates import OBJECT_TEMPLATES

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(dev)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(dev)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(dev)
    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    tok.add_tokens(["<bench-thing>"])
    init_id = tok.encode("toy", add_special_tokens=False)[0]
    new_id = tok.convert_tokens_to_ids("<bench-thing>")
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings()
    with torch.no_grad():
        emb.weight[new_id] = emb.weight[init_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    emb.weight.requires_grad_(True)
    te.train()  # as the script does; the UNet stays in eval mode
    opt = torch.optim.AdamW(emb.parameters(), lr=5e-3 * batch, weight_decay=1e-2)
    orig = emb.weight.detach().clone()
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[new_id] = False
    base = [resize_and_crop(im.image, resolution) for im in _images(resolution)]
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    losses, times = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        views = [rng.choice(base) for _ in range(batch)]
        x = torch.stack([image_to_tensor(v.transpose(0) if rng.random() < 0.5 else v) for v in views])
        prompts = [rng.choice(OBJECT_TEMPLATES).format("<bench-thing>") for _ in range(batch)]
        ids = tok(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        latents = vae.encode(x.to(dev)).latent_dist.sample(generator=None) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(dev)
        ts = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g).to(dev)
        noisy = sched.add_noise(latents, noise, ts)
        states = te(ids.to(dev))[0]
        pred = unet(noisy, ts, states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            emb.weight[keep] = orig[keep]
        losses.append(loss.item())
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"setup_s": 0.0, "step_s": times, "loss": losses[warmup:]}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(method: str, model_dir: str, steps: int, resolution: int, batch: int, warmup: int) -> None:
    torch.manual_seed(0)
    fn = run_ours if method == "oneword" else run_reference
    res = fn(model_dir, steps, resolution, batch, warmup)
    res["peak_mb"] = _peak_mb()
    res["memory_kind"] = "cuda allocated" if torch.cuda.is_available() else "process RSS"
    print("RESULT " + json.dumps(res))


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--child", choices=["oneword", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    if args.child:
        _child(args.child, args.model_dir, args.steps, args.resolution, args.batch, args.warmup)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_bench_model(Path(tmp) / "bench-model"))
        results = {}
        for method in ("reference", "oneword"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--model-dir",
                model_dir,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--resolution",
                str(args.resolution),
                "--batch",
                str(args.batch),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=True).stdout
            results[method] = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    ref, ours = results["reference"], results["oneword"]
    t_ref, t_ours = _median(ref["step_s"]), _median(ours["step_s"])
    n = max(1, len(ref["loss"]) // 3)
    print(
        f"step time, median of {args.steps} steps (batch {args.batch}, {args.resolution}px, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}):"
    )
    print(
        f"  reference (diffusers-style): {t_ref * 1000:8.1f} ms/step   peak {ref['peak_mb']:.0f} MB ({ref['memory_kind']})"
    )
    print(
        f"  oneword:                     {t_ours * 1000:8.1f} ms/step   peak {ours['peak_mb']:.0f} MB"
        f"   (+ {ours['setup_s']:.2f} s one-off latent bank)"
    )
    print(
        f"  speed-up per step: {t_ref / t_ours:.2f}x   memory ratio: {ref['peak_mb'] / ours['peak_mb']:.2f}x"
    )
    for name, r in (("reference", ref), ("oneword", ours)):
        first, last = sum(r["loss"][:n]) / n, sum(r["loss"][-n:]) / n
        print(f"  loss {name:9s}: mean of first {n} steps {first:.4f}, last {n} steps {last:.4f}")
    if args.json:
        from oneword.fileio import atomic_write_text
        from oneword.provenance import provenance

        settings = {k: getattr(args, k) for k in ("steps", "warmup", "resolution", "batch")}
        doc = {
            "provenance": provenance(),
            "settings": settings,
            "speedup": t_ref / t_ours,
            "memory_ratio": ref["peak_mb"] / ours["peak_mb"],
            "results": results,
        }
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
