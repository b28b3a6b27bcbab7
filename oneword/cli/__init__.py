"""ti: learn, encode, use and evaluate pseudo-words for text-to-image diffusion models.

The command line. Thin: it parses arguments, calls library functions, prints progress.

Options of ``ti invert`` are generated from :class:`InversionConfig`'s fields, so the dataclass's
field docstrings *are* the ``--help`` text and the two never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from oneword.cli.options import add_dataclass_options, run_reporting_errors
from oneword.cli.options import model_options as _model_options
from oneword.errors import OneWordError
from oneword.imagegrid import MIN_TILE

logger = logging.getLogger("oneword")

#: Subcommands with a command line of their own: ``ti encode ARGS`` is ``ti-encode ARGS``.
DELEGATED = {
    "encode": (
        "predict words for concept folders in one pass, optionally refine them (ti-encode)",
        "oneword.cli.encode",
        "main",
    ),
    "train-encoder": (
        "train an encoder: LightningCLI fit/validate (ti-train-encoder)",
        "oneword.cli.train_encoder",
        "cli_main",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from oneword.inversion.config import InversionConfig

    parser = argparse.ArgumentParser(prog="ti", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, module, _) in DELEGATED.items():  # listed in --help; run before parsing (see main)
        sub.add_parser(
            name,
            help=text,
            add_help=False,
            description=f"{text}; `ti {name} --help` shows its options ({module})",
        )

    p = sub.add_parser(
        "invert",
        help="learn a pseudo-word from 3-5 images of a concept",
        description="Textual inversion (Gal et al. 2022) of the images in IMAGES_DIR.",
    )
    p.add_argument("images", metavar="IMAGES_DIR", help="folder with the concept's reference images")
    _model_options(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<token>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_options(p, InversionConfig, required=frozenset({"token", "init"}))

    g = sub.add_parser("generate", help="render prompts that use learned pseudo-words")
    _model_options(g)
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
    g.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default: 4)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; the others use seed+1, ...")
    g.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default: 7.5)")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    g.add_argument(
        "--batch",
        type=int,
        default=4,
        help="images per pipeline call (default: 4; lower it if the GPU runs out of memory: the images "
        "stay the same)",
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
        "(paper, section 4.7; default: 1 = no curation)",
    )
    g.add_argument("--reference", default=None, metavar="DIR", help="the concept's images, for --curate")
    g.add_argument(
        "--clip",
        default=None,
        help="CLIP space for --curate: toy, ViT-B-32, ARCH:TAG, random (tests) "
        "(default: toy for the toy model, else ViT-B-32)",
    )

    i = sub.add_parser("info", help="load a model and print what oneword sees in it")
    _model_options(i)

    toy = sub.add_parser("toy", help="the toy world: render example concepts, (re)train its models")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    r = toy_sub.add_parser("render", help="write concept folders and a contact sheet")
    r.add_argument("--out", default="runs/toy-concepts", help="output folder")
    r.add_argument("--concepts", type=int, default=4, help="number of concepts (default: 4)")
    r.add_argument("--images", type=int, default=5, help="reference images per concept (default: 5)")
    r.add_argument("--seed", type=int, default=0, help="seed of poses and backgrounds")
    r.add_argument(
        "--train-split",
        action="store_true",
        help="draw concepts from the training split instead of the held-out one",
    )
    t = toy_sub.add_parser(
        "train",
        help="rebuild the toy world's trained parts from scratch (resumable)",
        description="Train the attribute oracle, the toy CLIP and the toy diffusion model "
        "(in that order; finished parts are skipped, interrupted ones resume).",
    )
    t.add_argument(
        "--parts",
        nargs="+",
        choices=["oracle", "clip", "ldm"],
        default=["oracle", "clip", "ldm"],
        help="what to train (default: all three)",
    )
    t.add_argument("--work", default="runs/toy-train", help="checkpoints and logs; re-run to resume")
    t.add_argument("--out", default=None, help="weights folder (default: the package's oneword/toy/weights)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    t.add_argument("--oracle-steps", type=int, default=None, help="oracle steps (default: 1500)")
    t.add_argument("--clip-steps", type=int, default=None, help="toy CLIP steps (default: 2000)")
    t.add_argument(
        "--vae-steps",
        type=int,
        default=None,
        help="autoencoder steps (default: ToyLDMConfig.vae_steps, 1500)",
    )
    t.add_argument(
        "--ldm-steps",
        type=int,
        default=None,
        help="diffusion steps (default: ToyLDMConfig.ldm_steps); may grow on resume",
    )
    t.add_argument(
        "--lr", type=float, default=None, help="peak learning rate of the diffusion stage (default: 4e-4)"
    )
    t.add_argument(
        "--decoder-steps",
        type=int,
        default=None,
        help="then fine-tune the VAE decoder alone this many steps (default: 600; 0 skips)",
    )
    t.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="continue training from a toy pipeline folder (e.g. the shipped oneword/toy/weights/ldm) "
        "instead of from scratch; use a new --work folder and an --out folder",
    )
    t.add_argument(
        "--cross-attention-levels",
        type=int,
        nargs="+",
        default=None,
        metavar="LEVEL",
        help="UNet levels with cross-attention, 0 = highest resolution (default: 1 2); with --init-from, "
        "levels the loaded UNet lacks are added as identity blocks and trained",
    )
    t.add_argument(
        "--min-snr-gamma",
        type=float,
        default=None,
        help="min-SNR-gamma loss weighting of the diffusion stage, 0 = off (default: 0)",
    )
    t.add_argument(
        "--text-aux-weight",
        type=float,
        default=None,
        help="weight of an auxiliary loss that makes the text encoder tell apart every attribute "
        "value a caption names (default: 0.05, 0 with --freeze-text; 0 = off; see ToyLDMConfig.text_aux_weight)",
    )
    t.add_argument(
        "--freeze-text",
        action="store_true",
        help="with --init-from: keep the text encoder (and every word embedding) as loaded",
    )
    d = sub.add_parser("data", help="training data for the encoder")
    d_sub = d.add_subparsers(dest="data_command", required=True)
    sh = d_sub.add_parser(
        "shards",
        help="write webdataset shards (one sample per concept)",
        description="From concept folders (ti data shards DIR... --out OUT) or from the toy "
        "renderer (ti data shards --toy --out OUT).",
    )
    sh.add_argument("folders", nargs="*", metavar="CONCEPT_DIR", help="one folder of images per concept")
    sh.add_argument("--toy", action="store_true", help="render toy concepts instead of reading folders")
    sh.add_argument(
        "--split", choices=["train", "held-out"], default="train", help="toy split (default: train)"
    )
    sh.add_argument("--images", type=int, default=8, help="toy renders per concept (default: 8)")
    sh.add_argument("--size", type=int, default=64, help="toy render side in pixels (default: 64)")
    sh.add_argument("--limit", type=int, default=None, help="at most this many toy concepts")
    sh.add_argument("--seed", type=int, default=0, help="seed of the toy renders")
    sh.add_argument(
        "--init",
        nargs="+",
        default=None,
        metavar="WORD",
        help="initializer word of the folder concepts: one for all, or one per folder (default: "
        "concept.json's shape)",
    )
    sh.add_argument(
        "--targets",
        nargs="+",
        default=None,
        metavar="RUN_OR_FILE",
        help="one ti invert run folder or embedding file per concept folder: distillation targets",
    )
    sh.add_argument("--per-shard", type=int, default=256, help="concepts per shard (default: 256)")
    sh.add_argument(
        "--prefix",
        default="concepts",
        help="shard file names, PREFIX-000000.tar ... (default: concepts); give each data set its "
        "own when several are used together",
    )
    sh.add_argument("--out", required=True, help="folder for the .tar shards")
    tg = d_sub.add_parser(
        "targets",
        help="add distillation targets to shards: a short textual inversion of every concept",
        description="Reads every shard of SHARDS, inverts its concepts in groups (one UNet pass per step for "
        "the whole group) and writes the samples with their learned embedding to OUT/<same name>. "
        "Shards already in OUT are skipped: rerun the same command to resume.",
    )
    tg.add_argument("shards", help="input shards: a folder, a glob or a brace pattern")
    _model_options(tg)
    tg.add_argument("--steps", type=int, default=100, help="inversion steps per concept (default: 100)")
    tg.add_argument("--group", type=int, default=32, help="concepts inverted together (default: 32)")
    tg.add_argument("--batch-size", type=int, default=4, help="views per concept per step (default: 4)")
    tg.add_argument(
        "--base-lr",
        type=float,
        default=5e-3,
        help="base learning rate, scaled by --batch-size as in ti invert (default: 5e-3)",
    )
    tg.add_argument(
        "--template",
        choices=["object", "style", "toy"],
        default="object",
        help="prompt templates (default: object; toy for the toy model)",
    )
    tg.add_argument("--seed", type=int, default=0, help="seed of views, prompts and noise")
    tg.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="frozen weights' precision (default: fp16 on CUDA, with gradient scaling, else fp32)",
    )
    tg.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet activations in the backward pass: memory grows with --group x "
        "--batch-size, and on a real model this is the first thing to try",
    )
    tg.add_argument(
        "--continue",
        dest="continue_targets",
        action="store_true",
        help="SHARDS already carry targets: run --steps more steps from them (e.g. on a "
        "fine-tuned model) instead of from the initializer words",
    )
    tg.add_argument(
        "--from-encoder",
        default=None,
        metavar="ENCODER",
        help="start each inversion from this encoder's prediction for the concept's images "
        "(an encoder file, or toy for the shipped one): a self-distillation round whose "
        "targets are the encoder's refined words (then train the next encoder on OUT)",
    )
    tg.add_argument("--out", required=True, help="folder for the shards with targets")

    from oneword.cli.eval import add_eval_parser

    add_eval_parser(sub, _model_options)
    return parser


def _cmd_invert(args: argparse.Namespace) -> int:
    from oneword.data.images import load_folder
    from oneword.inversion.config import InversionConfig, weights_dtype
    from oneword.inversion.runfolder import RunFolder, safe_file_stem
    from oneword.inversion.train import run_inversion
    from oneword.models import load_model

    names = {f.name for f in dataclasses.fields(InversionConfig)}
    try:
        cfg = InversionConfig(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as err:
        raise OneWordError(f"invalid setting: {err}") from err
    out = Path(args.out or f"runs/{safe_file_stem(cfg.token)}")
    images = load_folder(args.images, max_pixels=cfg.max_pixels)
    with RunFolder(out) as folder:  # held from the check to the last file: a second run on --out is refused
        folder.prepare(cfg, args.resume)  # before a model load that takes minutes
        model = load_model(args.model, device=args.device, dtype=weights_dtype(cfg.mixed_precision))
        print(f"{model.describe()}\n{len(images)} images from {args.images}; lr {cfg.lr:g}", file=sys.stderr)
        t0 = time.perf_counter()
        res = run_inversion(model, images, cfg, out, resume=args.resume, progress=not args.no_progress)
    took = time.perf_counter() - t0
    state = "interrupted at" if res.interrupted else "finished"
    print(f"{state} step {res.step}/{cfg.steps} in {took:.0f}s; wrote:", file=sys.stderr)
    for f in res.files:
        print(f"  {f}")
    if res.interrupted:
        print(f"resume with the same command plus --resume (--out {out})", file=sys.stderr)
        return 130
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from oneword.inversion.embedding_io import add_embeddings
    from oneword.models import load_model
    from oneword.sampling import SampleSettings, render_grid

    if not args.out.lower().endswith(".png"):
        raise OneWordError(f"--out must be a .png file, got {args.out}")
    if args.num_images < 1:
        raise OneWordError("-n must be at least 1")
    if args.batch < 1:
        raise OneWordError("--batch must be at least 1")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    embs = add_embeddings(model, args.embedding)
    tokens = [e.token for e in embs]
    for prompt in args.prompt if tokens else ():
        if not any(t.lower() in prompt.lower() for t in tokens):  # CLIP ignores case
            logger.warning("prompt %r uses none of the loaded tokens (%s)", prompt, ", ".join(tokens))
    if args.zoom is not None and args.zoom < 1:
        raise OneWordError("--zoom must be at least 1")
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
    if args.curate < 1:
        raise OneWordError("--curate must be at least 1")
    if args.curate > 1:
        from oneword.data.images import load_folder
        from oneword.eval.curate import curate
        from oneword.eval.space import default_space_name, load_space

        if not args.reference:
            raise OneWordError("--curate needs --reference DIR (the concept's images)")
        refs = [im.image for im in load_folder(args.reference)]
        clip = args.clip or default_space_name(model.family)
        picked = curate(model, args.prompt, settings, args.curate, load_space(clip, model.device), refs)
        images = picked.images
        meta.update(curate=str(args.curate), clip=clip, curated_seeds=",".join(map(str, picked.seeds)))
    path = render_grid(model, args.prompt, settings, args.out, meta, images=images, zoom=args.zoom)
    print(path)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from oneword.models import load_model

    print(load_model(args.model, device=args.device).describe())
    return 0


def _cmd_toy(args: argparse.Namespace) -> int:
    if args.toy_command == "render":
        from oneword.toy.concepts import write_concepts

        if args.concepts < 1 or args.images < 1:
            raise OneWordError("--concepts and --images must be at least 1")
        folders, sheet = write_concepts(
            Path(args.out), args.concepts, args.images, args.seed, held_out=not args.train_split
        )
        for folder in folders:
            print(folder)
        print(sheet)
        return 0
    import torch

    from oneword.toy import WEIGHTS
    from oneword.toy.build import ToyBuildConfig, build_toy_world
    from oneword.toy.ldm import ToyLDMConfig

    if args.init_from and not args.out:
        # the default --out is the package's weights: the run would replace the model it starts from,
        # which the shipped encoder was trained on
        raise OneWordError(
            "--init-from needs --out: without it the new model replaces the shipped one in "
            f"{WEIGHTS} (pass --out {WEIGHTS} to do that on purpose)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {
        "vae_steps": args.vae_steps,
        "ldm_steps": args.ldm_steps,
        "lr": args.lr,
        "decoder_steps": args.decoder_steps,
        "init_from": args.init_from,
        "train_text": False if args.freeze_text else None,
        "min_snr_gamma": args.min_snr_gamma,
        "text_aux_weight": args.text_aux_weight,
        "cross_attention_levels": tuple(args.cross_attention_levels) if args.cross_attention_levels else None,
    }
    try:
        cfg = ToyBuildConfig(ldm=ToyLDMConfig(**{k: v for k, v in steps.items() if v is not None}))
    except ValueError as err:
        raise OneWordError(f"invalid setting: {err}") from err
    cfg.oracle_steps = args.oracle_steps or cfg.oracle_steps
    cfg.clip_steps = args.clip_steps or cfg.clip_steps
    written = build_toy_world(Path(args.work), Path(args.out) if args.out else WEIGHTS, args.parts, cfg)
    for path in written.values():
        print(path)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from oneword.data.shards import folder_samples, write_shards
    from oneword.toy.concepts import toy_samples

    if args.data_command == "targets":
        return _cmd_data_targets(args)
    if args.toy == bool(args.folders):
        raise OneWordError("give concept folders or --toy (not both)")
    out = Path(args.out)
    if out.is_dir() and any(out.glob(f"{args.prefix}-*.tar")):  # old shards would stay beside the new ones
        raise OneWordError(
            f"{out} already holds {args.prefix}-*.tar shards: give another --out or --prefix, or remove them"
        )
    if args.toy:
        samples = toy_samples(args.split, args.images, args.seed, args.size, args.limit)
    else:
        targets = None
        if args.targets is not None:  # one embedding file or run folder per concept
            from oneword.inversion.embedding_io import load_embedding

            paths = [
                Path(t) / "learned_embeds.safetensors" if Path(t).is_dir() else Path(t) for t in args.targets
            ]
            targets = [load_embedding(p).vectors for p in paths]
        samples = folder_samples(args.folders, args.init, targets)
    for path in write_shards(samples, out, args.per_shard, prefix=args.prefix):
        print(path)
    return 0


def _cmd_data_targets(args: argparse.Namespace) -> int:
    from oneword.encoder.targets import PARTIAL, SAVE_EVERY, add_targets
    from oneword.inversion.config import InversionConfig
    from oneword.inversion.train import sigterm_as_interrupt
    from oneword.models import load_model

    try:
        cfg = InversionConfig(
            token="<target>",
            init="object",
            steps=args.steps,
            batch_size=args.batch_size,
            base_lr=args.base_lr,
            template=args.template,
            seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    except ValueError as err:
        raise OneWordError(f"invalid setting: {err}") from err
    encoder = None
    if args.from_encoder:
        from oneword.encoder.model import load_encoder
        from oneword.encoder.pipeline import encoder_path

        encoder = load_encoder(encoder_path(args.from_encoder))
    t0 = time.perf_counter()
    try:
        with sigterm_as_interrupt():  # a preempted job says how to continue, as Ctrl-C does
            model = load_model(args.model, device=args.device, dtype=args.dtype)
            paths = add_targets(
                args.shards,
                Path(args.out),
                cfg,
                model,
                group=args.group,
                continue_targets=args.continue_targets,
                encoder=encoder,
            )
    except KeyboardInterrupt:
        print(
            f"the same command continues: finished shards are kept and the shard in progress resumes from "
            f"its last saved step (every {SAVE_EVERY}, in {Path(args.out) / PARTIAL})",
            file=sys.stderr,
        )
        raise
    print(
        f"{len(paths)} shards with targets ({args.steps} steps, lr {cfg.lr:g}) in {time.perf_counter() - t0:.0f} s:",
        file=sys.stderr,
    )
    for p in paths:
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        _, module, function = DELEGATED[argv[0]]
        code = getattr(importlib.import_module(module), function)(argv[1:])
        return code or 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from oneword.cli.eval import cmd_eval

    commands = {
        "invert": _cmd_invert,
        "generate": _cmd_generate,
        "info": _cmd_info,
        "toy": _cmd_toy,
        "eval": cmd_eval,
        "data": _cmd_data,
    }
    return run_reporting_errors(commands[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
