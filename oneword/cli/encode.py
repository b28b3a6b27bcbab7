"""``ti-encode``: predict pseudo-words for concept folders in one pass, optionally refine them.

The command line of :func:`oneword.encoder.pipeline.encode_concepts`.

    ti-encode images/ --refine 200                 # shipped toy model and toy encoder
    ti-encode cat/ dog/ --model sd15 --encoder enc.safetensors --init cat dog --refine 100

Each concept gets a run folder under ``--out`` laid out as ``ti invert``'s (``learned_embeds
.safetensors``, ``<token>.safetensors``; with refinement also ``config.yaml``, ``loss.csv``,
``loss.png``, ``checkpoints/``), plus ``preview.png`` and ``report.md``. After a refinement the
prediction is kept instead of the refined word when the encoder's round trip
(:mod:`oneword.encoder.select`, ``--select N`` samples of each word, 8 by default) finds it closer
to the references; ``--select-among`` adds words from inside the refinement to the candidates. An
interrupted refinement (Ctrl-C) keeps its word, skips the round trip and the remaining concepts,
and exits with 130.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from oneword.cli.options import (
    add_dataclass_options,
    new_parser,
    progress_option,
    run_reporting_errors,
)
from oneword.encoder.pipeline import DEFAULT_SELECT, REFINE_DEFAULTS, encoder_path, select_samples
from oneword.errors import OneWordError
from oneword.inversion.runfolder import safe_file_stem

logger = logging.getLogger("oneword")


HELP = "predict words for concept folders in one pass, optionally refine them (ti-encode)"


def build_parser(prog: str = "ti-encode"):
    from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig

    p = new_parser(prog, __doc__.split("\n\n")[0])
    p.add_argument(
        "images", nargs="+", metavar="IMAGES_DIR", help="one folder of reference images per concept"
    )
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="textual-inversion steps from the prediction (default: 0 = encoder only)",
    )
    p.add_argument("--model", default=None, help="diffusion model (default: the encoder's, e.g. toy)")
    p.add_argument(
        "--encoder",
        default=None,
        help="encoder file from ti-train-encoder (default: toy, the shipped toy encoder)",
    )
    p.add_argument(
        "--token", nargs="+", default=None, help="placeholder token per concept (default: <folder name>)"
    )
    p.add_argument(
        "--init",
        nargs="+",
        default=None,
        help="initializer word per concept, or one for all; auto (the default) chooses each concept's "
        "by zero-shot CLIP with the encoder's image tower among --init-vocab's words",
    )
    p.add_argument(
        "--init-vocab",
        default=None,
        metavar="FILE",
        help="candidate initializer words for --init auto, one per line (default: the toy shapes "
        "for the toy model, else the single-token ImageNet class names); only words that are one "
        "token of the model's tokenizers are used",
    )
    p.add_argument(
        "--out",
        default="runs/encode",
        help="parent of the per-concept run folders (default: runs/encode, so runs/encode/<name>/)",
    )
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument(
        "--select",
        type=int,
        default=None,
        metavar="N",
        help="after --refine, keep the prediction or the refined word, whichever the encoder reads back "
        f"closer to the references from N fresh samples of each (default: {DEFAULT_SELECT} with "
        "--refine; 0 always keeps the refined word)",
    )
    p.add_argument(
        "--select-among",
        type=int,
        nargs="+",
        default=None,
        metavar="STEPS",
        help="with the round trip (--select): also judge the refinement's words after these steps, "
        "e.g. 50 100 with --refine 200 (default: none). The prediction (0) and the refined word "
        "(--refine) are always judged; under --lr-schedule cosine a middle word is not a shorter "
        "run's word",
    )
    p.add_argument(
        "--preview-steps",
        type=int,
        default=25,
        help="sampling steps of preview.png (default: 25; 0: none)",
    )
    p.add_argument(
        "--sample-batch",
        type=int,
        default=4,
        metavar="N",
        help="images per pipeline call in the round trip and the preview (default: 4; lower it if "
        "the GPU runs out of memory: the images and the choice stay the same)",
    )
    progress_option(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_dataclass_options(
        p,
        InversionConfig,
        skip=PER_RUN_FIELDS | {"num_vectors", "progressive_every"},
        defaults=REFINE_DEFAULTS,
        helps={"reg_weight": "Weight of an L2 pull toward the encoder's prediction during --refine"},
    )
    return p


def _per_concept(values: list[str] | None, n: int, name: str) -> list[str | None]:
    if values is None:
        return [None] * n
    if len(values) == 1 and name == "--init":
        return values * n
    if len(values) != n:
        raise OneWordError(f"give one {name} per concept folder ({n}), got {len(values)}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_reporting_errors(run, args)


def run(args) -> int:
    from oneword.data.concepts import load_concept
    from oneword.encoder.autoinit import AUTO, read_vocab, resolve_inits
    from oneword.encoder.model import TRAIN_ONE, check_fits, load_encoder
    from oneword.encoder.pipeline import EncodeSettings, concept_folder, encode_concepts, encoder_identity
    from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig, weights_dtype
    from oneword.models import load_model

    if args.refine < 0:
        raise OneWordError("--refine must be 0 or more")
    if args.select is not None and args.select < 0:
        raise OneWordError("--select must be 0 or more")
    if args.sample_batch < 1:
        raise OneWordError("--sample-batch must be at least 1")
    if args.select and not args.refine:
        print(
            "--select chooses between the prediction and its refinement: without --refine it does nothing",
            file=sys.stderr,
        )
    args.select = select_samples(args.refine, args.select)
    if args.select_among and not args.select:
        raise OneWordError(
            "--select-among needs a refinement (--refine N) and its round trip (not --select 0)"
        )
    if any(not 0 <= b <= args.refine for b in args.select_among or ()):
        raise OneWordError(
            f"--select-among takes step counts from 0 to --refine ({args.refine}); "
            f"got {' '.join(map(str, args.select_among))}"
        )
    settings = EncodeSettings(
        refine=args.refine,
        select=args.select,
        select_among=list(args.select_among or ()),
        preview_steps=args.preview_steps,
        sample_batch=args.sample_batch,
        progress=not args.no_progress,
    )
    enc_path = encoder_path(args.encoder)
    encoder = load_encoder(enc_path)
    model_name = args.model or encoder.cfg.model
    if encoder.cfg.family == "toy" and model_name != "toy" and not Path(model_name).is_dir():
        # fail before loading a real model (minutes for SDXL) that the toy encoder cannot fit
        raise OneWordError(
            f"{enc_path} is an encoder for the toy world, not for --model {model_name}: {TRAIN_ONE}"
        )
    n = len(args.images)
    inits = _per_concept(args.init, n, "--init")
    tokens = _per_concept(args.token, n, "--token")
    vocab = read_vocab(args.init_vocab) if args.init_vocab else None
    concepts = [load_concept(d, init or AUTO) for d, init in zip(args.images, inits)]
    tokens = [t or f"<{safe_file_stem(Path(d).resolve().name)}>" for t, d in zip(tokens, args.images)]
    if len({safe_file_stem(t).lower() for t in tokens}) != n:  # tokens equal but for case share one too
        # CLIP ignores case, and so may the file system; each word gets its own run folder
        raise OneWordError(f"two concepts would get the same token or run folder ({tokens}); pass --token")
    folders = [concept_folder(args.out, t) for t in tokens]
    for folder in folders:  # before the model loads (minutes): each is locked again while it is written
        folder.check_free()
    taken = [str(f.path) for f in folders if f.holds_files()]
    if taken:  # and before any concept is written
        raise OneWordError(
            f"{', '.join(taken)} already hold{'s' if len(taken) == 1 else ''} files: ti-encode "
            "neither resumes nor overwrites a run folder; choose another --out or remove them"
        )
    model = load_model(model_name, device=args.device, dtype=weights_dtype(args.mixed_precision))
    check_fits(encoder, model)
    encoder.space.to(model.device)
    choices = resolve_inits(
        encoder.space,
        model,
        [[im.image for im in c.images] for c in concepts],
        [c.init for c in concepts],
        vocab,
    )
    concepts = [dataclasses.replace(c, init=choice.word) for c, choice in zip(concepts, choices)]
    for c, choice in zip(concepts, choices):
        if choice.how == AUTO:
            print(f"{c.name}: initializer {choice.describe()}", file=sys.stderr)
    names = (
        {f.name for f in dataclasses.fields(InversionConfig)}
        - PER_RUN_FIELDS
        - {"num_vectors", "progressive_every"}
    )
    base = {k: getattr(args, k) for k in names}
    if model.family == "toy" and base["template"] == "object":
        base["template"] = "toy"  # the toy text encoder knows only toy-caption words
    try:
        cfgs = [
            InversionConfig(
                **base,
                token=t,
                init=c.init,
                num_vectors=encoder.cfg.num_vectors,
                steps=max(1, args.refine),
                save_every=0,
                preview_every=0,
            )
            for t, c in zip(tokens, concepts)
        ]
    except ValueError as err:
        raise OneWordError(f"invalid setting: {err}") from None
    results = encode_concepts(
        encoder, model, concepts, cfgs, args.out, settings, encoder_identity(enc_path), model_name, choices
    )
    for i, res in enumerate(results):
        if res.interrupted:
            rest = " and the remaining concepts" if i + 1 < n else ""
            print(
                f"{res.name}: interrupted at step {res.kept_steps}/{args.refine}; kept that word, skipped the "
                f"round trip{rest}",
                file=sys.stderr,
            )
        else:
            print(f"{res.name}: {res.token} -> {res.folder}", file=sys.stderr)
        for f in res.files:
            print(f"  {f}")
    return 130 if results and results[-1].interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
