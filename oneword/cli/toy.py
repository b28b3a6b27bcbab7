"""``ti toy render`` and ``ti toy train``: the toy world's example concepts and its models."""

from __future__ import annotations

from pathlib import Path

from oneword.cli.options import group_parser, new_parser
from oneword.errors import OneWordError

HELP = "the toy world: render example concepts, (re)train its models"


def _render_parser(prog: str):
    r = new_parser(prog, "Write toy concept folders (reference images and concept.json) and a contact sheet.")
    r.add_argument("--out", default="runs/toy-concepts", help="output folder")
    r.add_argument("--concepts", type=int, default=4, help="number of concepts")
    r.add_argument("--images", type=int, default=5, help="reference images per concept")
    r.add_argument("--seed", type=int, default=0, help="seed of poses and backgrounds")
    r.add_argument(
        "--train-split",
        action="store_true",
        help="draw concepts from the training split instead of the held-out one",
    )
    r.add_argument(
        "--tone",
        type=float,
        default=0.0,
        help="draw the fill and outline colours this far (0 to 0.5) toward a neighbouring colour: "
        "shades no caption word names (default: 0)",
    )
    return r


def _train_parser(prog: str):
    t = new_parser(
        prog,
        "Train the attribute oracle, the toy CLIP and the toy diffusion model "
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
    return t


def build_parser(prog: str = "ti toy", attach=None):
    return group_parser(
        prog,
        HELP[0].upper() + HELP[1:] + ".",
        {
            "render": ("write concept folders and a contact sheet", _render_parser),
            "train": ("rebuild the toy world's trained parts from scratch (resumable)", _train_parser),
        },
        attach,
    )


def run(args) -> int:
    return {"render": _render, "train": _train}[args.subcommand](args[args.subcommand])


def _render(args) -> int:
    from oneword.toy.concepts import write_concepts
    from oneword.toy.render import MAX_TONE

    if args.concepts < 1 or args.images < 1:
        raise OneWordError("--concepts and --images must be at least 1")
    if not 0.0 <= args.tone <= MAX_TONE:
        raise OneWordError(f"--tone must be in [0, {MAX_TONE}], got {args.tone}")
    folders, sheet = write_concepts(
        Path(args.out), args.concepts, args.images, args.seed, held_out=not args.train_split, tone=args.tone
    )
    for folder in folders:
        print(folder)
    print(sheet)
    return 0


def _train(args) -> int:
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
