"""``ti data shards`` and ``ti data targets``: the encoder's training data."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from oneword.cli.options import group_parser, model_options, new_parser
from oneword.errors import OneWordError

HELP = "training data for the encoder"


def _shards_parser(prog: str):
    sh = new_parser(
        prog,
        "Write webdataset shards (one sample per concept) from concept folders "
        "(ti data shards DIR... --out OUT) or from the toy renderer (ti data shards --toy --out OUT).",
    )
    sh.add_argument("folders", nargs="*", metavar="CONCEPT_DIR", help="one folder of images per concept")
    sh.add_argument("--toy", action="store_true", help="render toy concepts instead of reading folders")
    sh.add_argument("--split", choices=["train", "held-out"], default="train", help="toy split")
    sh.add_argument("--images", type=int, default=8, help="toy renders per concept")
    sh.add_argument("--size", type=int, default=64, help="toy render side in pixels")
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
    sh.add_argument("--per-shard", type=int, default=256, help="concepts per shard")
    sh.add_argument(
        "--prefix",
        default="concepts",
        help="shard file names, PREFIX-000000.tar ... (default: concepts); give each data set its "
        "own when several are used together",
    )
    sh.add_argument("--out", required=True, help="folder for the .tar shards")
    return sh


def _targets_parser(prog: str):
    tg = new_parser(
        prog,
        "Reads every shard of SHARDS, inverts its concepts in groups (one UNet pass per step for "
        "the whole group) and writes the samples with their learned embedding to OUT/<same name>. "
        "Shards already in OUT are skipped: rerun the same command to resume.",
    )
    tg.add_argument("shards", help="input shards: a folder, a glob or a brace pattern")
    model_options(tg)
    tg.add_argument("--steps", type=int, default=100, help="inversion steps per concept")
    tg.add_argument("--group", type=int, default=32, help="concepts inverted together")
    tg.add_argument("--batch-size", type=int, default=4, help="views per concept per step")
    tg.add_argument(
        "--base-lr",
        type=float,
        default=5e-3,
        help="base learning rate, scaled by --batch-size as in ti invert",
    )
    tg.add_argument(
        "--template",
        choices=["object", "style", "toy"],
        default="object",
        help="prompt templates (toy for the toy model)",
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
    return tg


def build_parser(prog: str = "ti data", attach=None):
    return group_parser(
        prog,
        "Training data for the encoder.",
        {
            "shards": ("write webdataset shards (one sample per concept)", _shards_parser),
            "targets": (
                "add distillation targets to shards: a short textual inversion of every concept",
                _targets_parser,
            ),
        },
        attach,
    )


def run(args) -> int:
    return {"shards": _shards, "targets": _targets}[args.subcommand](args[args.subcommand])


def _shards(args) -> int:
    from oneword.data.shards import folder_samples, write_shards
    from oneword.toy.concepts import toy_samples

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


def _targets(args) -> int:
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
