"""``ti eval score`` and ``ti eval curve``: the command-line side of :mod:`oneword.eval`."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from oneword.cli.options import (
    add_dataclass_options,
    group_parser,
    model_options,
    new_parser,
    progress_option,
)
from oneword.errors import OneWordError

logger = logging.getLogger("oneword")


HELP = "score embeddings the paper's way; quality-versus-steps curves"


def _scoring_options(p) -> None:
    p.add_argument(
        "--clip",
        default=None,
        help="CLIP space of the paper's metrics: toy, ViT-B-32, ViT-L-14, ARCH:TAG (open_clip), "
        "random (smoke tests only) or none (default: toy for the toy model, else ViT-B-32)",
    )
    p.add_argument("--no-oracle", action="store_true", help="skip the toy world's attribute oracle")
    p.add_argument(
        "--preset",
        choices=["paper", "cpu"],
        default=None,
        help="sampling set-up: paper = 64 samples x 50 steps, cpu = 8 x 25 "
        "(default: cpu for toy/tiny models, paper otherwise)",
    )
    p.add_argument("--samples", type=int, default=None, help="samples per prompt (overrides the preset)")
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps (overrides the preset)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (overrides the preset)")
    p.add_argument(
        "--sample-batch",
        type=int,
        default=None,
        metavar="N",
        help="samples per pipeline call (default: 4; lower it if the GPU runs out of memory: the "
        "samples and scores stay the same)",
    )
    p.add_argument(
        "--edit-prompt",
        nargs="+",
        default=None,
        metavar="PROMPT",
        help="edit prompts with {} for the pseudo-word (default: the paper's kinds, or toy backgrounds)",
    )
    p.add_argument("--out", default=None, help="folder for results.json/.md and the plots")


def _score_parser(prog: str):
    s = new_parser(
        prog,
        "Reconstruction and editability (Gal et al. 2022, section 5) of each "
        "embedding, with the initializer word and the real images as references.",
    )
    model_options(s)
    s.add_argument("embeddings", nargs="+", metavar="EMBEDDING", help="embedding files or run folders")
    s.add_argument(
        "--concept",
        nargs="+",
        required=True,
        metavar="DIR",
        help="reference-image folder: one for all embeddings, or one per embedding",
    )
    s.add_argument("--init", default=None, help="initializer word of the baseline (default: from the file)")
    progress_option(s)
    _scoring_options(s)
    return s


def _curve_parser(prog: str):
    from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig

    c = new_parser(
        prog,
        "Invert each concept to the largest budget, scoring at every budget; "
        "writes results.json, results.md and PNG plots.",
    )
    model_options(c)
    c.add_argument("concepts", nargs="+", metavar="CONCEPT_DIR", help="reference-image folders")
    c.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=[0, 50, 100, 200, 500, 1000, 2000, 3000],
        help="step counts to score at",
    )
    c.add_argument(
        "--variant",
        nargs="+",
        default=None,
        metavar="NAME:KEY=VALUE,...",
        help="settings to compare, e.g. 'lr 1e-2:base_lr=0.01' '2 vectors:num_vectors=2' "
        "(default: one line with the base settings)",
    )
    c.add_argument("--init", default=None, help="initializer word (default: the toy concept's shape)")
    progress_option(c)
    _scoring_options(c)
    add_dataclass_options(c, InversionConfig, skip=PER_RUN_FIELDS)
    return c


def build_parser(prog: str = "ti eval", attach=None):
    return group_parser(
        prog,
        "Score embeddings the paper's way; quality-versus-steps curves.",
        {
            "score": (
                "score embedding files against their concepts' reference images",
                _score_parser,
            ),
            "curve": ("quality versus optimization steps for one or more settings", _curve_parser),
        },
        attach,
    )


def _settings(args, model):
    from oneword.eval.protocol import PRESETS, default_preset

    base = PRESETS[args.preset or default_preset(model)]
    over = {
        "samples": args.samples,
        "steps": args.sample_steps,
        "guidance": args.guidance,
        "batch": args.sample_batch,
        "edit_prompts": args.edit_prompt,
    }
    try:
        return dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})
    except ValueError as err:
        raise OneWordError(str(err)) from None


def _scorer_factory(args, probe):
    """A function model -> Scorer, with the CLIP space and oracle loaded once."""
    from oneword.eval.protocol import Scorer
    from oneword.eval.space import default_space_name, load_space

    settings = _settings(args, probe)
    name = args.clip or default_space_name(probe.family)
    space = None if name == "none" else load_space(name, device=probe.device)
    oracle = None
    if probe.family == "toy" and not args.no_oracle:
        from oneword.toy.oracle import load_oracle

        oracle = load_oracle()
    if space is None and oracle is None:
        raise OneWordError("nothing to score with: --clip none needs the toy model's oracle")
    return settings, (lambda model: Scorer(model, settings, space, oracle)), name


def _finish(rows, args, settings, clip_name) -> int:
    from oneword.eval.report import markdown_table, summarize, write_report
    from oneword.provenance import provenance

    print(markdown_table(summarize(rows)), end="")
    if args.out:
        meta = {"model": args.model, "clip": clip_name, **dataclasses.asdict(settings)}
        files = [Path(e) for e in getattr(args, "embeddings", ()) if Path(e).is_file()]
        made_by = provenance({"embeddings": files} if files else None)
        for path in write_report(rows, Path(args.out), meta, made_by).values():
            print(path)
    return 0


def run(args) -> int:
    name = args.subcommand
    args = args[name]
    from oneword.data.concepts import load_concept
    from oneword.inversion.config import weights_dtype
    from oneword.models import load_model

    def load():  # a curve's inversions run at its --mixed_precision; score samples at the default
        mp = getattr(args, "mixed_precision", None)
        return load_model(args.model, device=args.device, dtype=weights_dtype(mp) if mp else None)

    if name == "score":
        return _score(args, load)
    from oneword.eval.curves import Method, parse_variant, run_curve
    from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig

    concepts = [load_concept(d, args.init) for d in args.concepts]
    fields = {f.name for f in dataclasses.fields(InversionConfig)} - PER_RUN_FIELDS
    base = InversionConfig(**{k: getattr(args, k) for k in fields}, token="<eval>", init=concepts[0].init)
    try:
        methods = [parse_variant(v) for v in args.variant] if args.variant else [Method("textual inversion")]
        for m in methods:
            dataclasses.replace(base, **m.overrides)  # bad values fail before any sampling
    except (TypeError, ValueError) as err:
        raise OneWordError(str(err)) from None
    model = load()
    settings, make_scorer, clip_name = _scorer_factory(args, model)
    rows = run_curve(
        lambda: model, concepts, base, methods, args.budgets, make_scorer, progress=not args.no_progress
    )
    return _finish(rows, args, settings, clip_name)


def _score(args, load) -> int:
    from tqdm.auto import tqdm

    from oneword.data.concepts import load_concept
    from oneword.inversion.embedding_io import add_embeddings

    if len(args.concept) not in (1, len(args.embeddings)):
        raise OneWordError(f"give one --concept folder or one per embedding ({len(args.embeddings)})")
    folders = args.concept * len(args.embeddings) if len(args.concept) == 1 else args.concept
    model = load()
    settings, make_scorer, clip_name = _scorer_factory(args, model)
    embs = add_embeddings(model, args.embeddings)
    scorer = make_scorer(model)
    references = 2 if model.family == "toy" else 1  # the initializer word; the toy caption baseline
    words = len(embs) + len(set(folders)) * references
    scorer.bar = tqdm(
        total=words * scorer.prompts_per_score * settings.samples,
        unit="image",
        desc="sampling",
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    rows, seen = [], set()
    names = [Path(str(p)).name for p in args.embeddings]
    if len(set(names)) < len(names):  # two runs' learned_embeds.safetensors are two rows, not one average
        names = [str(p) for p in args.embeddings]
    for path, name, emb, folder in zip(args.embeddings, names, embs, folders):
        init = args.init or emb.metadata.get("oneword.init") or None
        concept = load_concept(folder, init)
        if folder not in seen:  # references once per concept
            seen.add(folder)
            rows += scorer.reference_rows(concept)
        steps = emb.metadata.get("oneword.steps")
        rows.append(
            {
                "method": name,
                "concept": concept.name,
                "steps": int(steps) if steps and steps.isdigit() else None,
                "seconds": 0.0,
                **scorer.score(emb.token, concept).as_dict(),
            }
        )
        logger.info("%s: %s", path, json.dumps(rows[-1]))
    scorer.bar.close()
    return _finish(rows, args, settings, clip_name)
