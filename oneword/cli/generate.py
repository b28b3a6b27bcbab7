"""``ti generate``: render prompts that use learned pseudo-words (or none: the base model)."""

from __future__ import annotations

import logging

from oneword.cli.options import model_options, new_parser
from oneword.errors import OneWordError
from oneword.imagegrid import MIN_TILE

logger = logging.getLogger("oneword")

HELP = "render prompts that use learned pseudo-words"


def build_parser(prog: str = "ti generate"):
    g = new_parser(prog, "Render a grid of images, one row per prompt, with learned pseudo-words.")
    model_options(g)
    g.add_argument(
        "--embedding",
        nargs="+",
        default=[],
        metavar="FILE[=TOKEN]",
        help="embedding files (diffusers, A1111/ComfyUI/kohya .safetensors or .pt) or run folders; "
        "FILE=<name> loads one under another token (two files with one token). Without it the base "
        "model renders the prompts: a baseline to compare a word with",
    )
    g.add_argument("--prompt", nargs="+", required=True, help="prompts; each becomes a row of the grid")
    g.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; the others use seed+1, ...")
    g.add_argument("--steps", type=int, default=50, help="sampling steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    g.add_argument(
        "--batch",
        type=int,
        default=4,
        help="images per pipeline call (lower it if the GPU runs out of memory: the images stay the same)",
    )
    g.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="weights' precision (default: fp16 on CUDA, else fp32)",
    )
    g.add_argument("--out", required=True, help="PNG file for the grid")
    g.add_argument(
        "--zoom",
        type=int,
        default=None,
        help="enlarge each image N times, nearest neighbour (default: small images such as the toy "
        f"world's 32 px are enlarged to at least {MIN_TILE} px; 1 keeps the native size)",
    )
    g.add_argument(
        "--curate",
        type=int,
        default=1,
        metavar="N",
        help="draw N candidates per image and keep the one closest in CLIP space to --reference "
        "(paper, section 4.7; 1 = no curation)",
    )
    g.add_argument("--reference", default=None, metavar="DIR", help="the concept's images, for --curate")
    g.add_argument(
        "--clip",
        default=None,
        help="CLIP space for --curate: toy, ViT-B-32, ARCH:TAG, random (tests) "
        "(default: toy for the toy model, else ViT-B-32)",
    )
    g.add_argument(
        "--init-image",
        default=None,
        metavar="IMG",
        help="img2img: start from this image (centre-cropped to a square and resized to the "
        "resolution, as reference images are) noised to --strength's step, then denoise",
    )
    g.add_argument(
        "--mask",
        default=None,
        metavar="MASK",
        help="local editing of --init-image (Blended Latent Diffusion, no inpainting model needed): "
        "white (>= 128) is the region the prompt redraws, the rest is kept; an image of the init "
        "image's shape, cropped like it",
    )
    g.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --init-image, how much of the denoising runs, in (0, 1]: 1 starts from pure noise, "
        "near 0 keeps the image (at least one of --steps must run) (default: 0.8; 1.0 with --mask, "
        "as Blended Latent Diffusion starts the edit from pure noise)",
    )
    g.add_argument(
        "--paste",
        type=bool,
        default=True,
        help="with --mask, put the init image's pixels back outside the mask after decoding (BLD's "
        "last step: the VAE does not reconstruct them exactly)",
    )
    return g


def run(args) -> int:
    from oneword.inversion.embedding_io import add_embeddings
    from oneword.models import load_model
    from oneword.sampling import SampleSettings, render_grid

    if not args.out.lower().endswith(".png"):
        raise OneWordError(f"--out must be a .png file, got {args.out}")
    if args.num_images < 1:
        raise OneWordError("-n must be at least 1")
    if args.batch < 1:
        raise OneWordError("--batch must be at least 1")
    if args.zoom is not None and args.zoom < 1:
        raise OneWordError("--zoom must be at least 1")
    if args.curate < 1:
        raise OneWordError("--curate must be at least 1")
    if args.curate > 1 and not args.reference:
        raise OneWordError("--curate needs --reference DIR (the concept's images)")
    init, strength = _init_image(args)  # checked before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    embs = add_embeddings(model, args.embedding)
    tokens = [e.token for e in embs]
    for prompt in args.prompt if tokens else ():
        if not any(t.lower() in prompt.lower() for t in tokens):  # CLIP ignores case
            logger.warning("prompt %r uses none of the loaded tokens (%s)", prompt, ", ".join(tokens))
    settings = SampleSettings(
        steps=args.steps,
        guidance=args.guidance,
        negative_prompt=args.negative,
        resolution=args.resolution,
        batch=args.batch,
        seeds=list(range(args.seed, args.seed + args.num_images)),
    )
    meta = {"embeddings": ",".join(str(e) for e in args.embedding), "tokens": ",".join(tokens)}
    images = None
    if args.curate > 1:
        from oneword.data.images import load_folder
        from oneword.eval.curate import curate
        from oneword.eval.space import default_space_name, load_space

        refs = [im.image for im in load_folder(args.reference)]
        clip = args.clip or default_space_name(model.family)
        picked = curate(model, args.prompt, settings, args.curate, load_space(clip, model.device), refs)
        images = picked.images
        meta.update(curate=str(args.curate), clip=clip, curated_seeds=",".join(map(str, picked.seeds)))
    if init is not None:
        from oneword.generate import edit_images, edit_metadata

        images = edit_images(model, args.prompt, settings, init, strength, args.paste)
        meta.update(edit_metadata(init, strength, args.paste))
    path = render_grid(model, args.prompt, settings, args.out, meta, images=images, zoom=args.zoom)
    print(path)
    return 0


def _init_image(args):
    """The loaded init image and mask and the strength, or ``(None, None)``; one clear error for
    any problem with them."""
    from oneword.generate import load_init, resolve_strength, steps_to_run

    if args.init_image is None:
        for name, value in (("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                raise OneWordError(f"{name} needs --init-image IMG (the image to start from)")
        return None, None
    if args.curate > 1:
        raise OneWordError("--curate does not work with --init-image")
    if args.steps < 1:
        raise OneWordError("--steps must be at least 1")
    strength = resolve_strength(args.strength, args.mask is not None)
    steps_to_run(args.steps, strength)
    return load_init(args.init_image, args.mask), strength
