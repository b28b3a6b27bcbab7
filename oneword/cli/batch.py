"""``ti batch SOURCE --out OUT``: a word for every concept of a dataset, resumable; ``ti batch
status OUT``: how far it is.

    ti batch concepts/ --out runs/batch                            # toy encoder + 200 refinement steps
    ti batch manifest.jsonl --out runs/b --model sd15 --encoder enc.safetensors --group 16
    ti batch concepts/ --out runs/b --method invert --steps 1000 --model sd15
    ti batch status runs/b

Rerun the same command after a crash or Ctrl-C: what is done is skipped, what was running
continues from its checkpoint. The library side is :mod:`oneword.batch`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from oneword.cli.options import add_dataclass_options, new_parser, progress_option
from oneword.errors import OneWordError

HELP = "a word for every concept of a dataset (folder or manifest), resumable; ti batch status OUT"


def build_parser(prog: str = "ti batch"):
    from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig

    p = new_parser(
        prog,
        "Turn every concept of SOURCE into a word, several concepts per UNet pass (--group), with a "
        "ledger in OUT that makes a rerun of the same command continue where it stopped. SOURCE is "
        "a folder of concept folders or a manifest (.jsonl, .csv: id, images, optional init and "
        "token). `ti batch status OUT` prints counts, throughput and ETA.",
    )
    p.add_argument("source", metavar="SOURCE", help="folder of concept folders, or a manifest; or: status")
    p.add_argument("target", metavar="OUT", nargs="?", default=None, help="with status: the batch's folder")
    p.add_argument(
        "--out", default=None, help="the batch's folder: ledger.sqlite and concepts/<id>/ (required)"
    )
    p.add_argument(
        "--method",
        choices=["encode", "invert"],
        default="encode",
        help="encode: the encoder's prediction refined for --refine steps; invert: textual inversion "
        "from the initializer word for --steps steps",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=200,
        metavar="N",
        help="with encode: refinement steps (0: the encoder alone)",
    )
    p.add_argument("--steps", type=int, default=1000, help="with invert: optimization steps per concept")
    p.add_argument(
        "--group", type=int, default=8, help="concepts optimized together (one UNet pass per step)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="diffusion model (default: the encoder's with encode; required with invert)",
    )
    p.add_argument("--encoder", default=None, help="encoder file (default: toy, the shipped toy encoder)")
    p.add_argument(
        "--init",
        default="auto",
        help="initializer word of concepts whose manifest gives none, or auto: chosen per concept by "
        "zero-shot classification (see ti encode)",
    )
    p.add_argument(
        "--init-vocab", default=None, metavar="FILE", help="candidate words of --init auto, one per line"
    )
    p.add_argument("--retry-failed", action="store_true", help="try the concepts that failed before again")
    p.add_argument(
        "--save-every", type=int, default=50, help="checkpoint every concept in work every N steps"
    )
    p.add_argument(
        "--preview-steps",
        type=int,
        default=25,
        help="sampling steps of each word's preview.png, rendered when all concepts are done (0: none)",
    )
    p.add_argument(
        "--format",
        choices=["folders", "shards"],
        default="folders",
        help="folders: a run folder per concept; shards: also OUT/shards/words-*.tar (webdataset: "
        "<key>.safetensors, .json, .png) with index.parquet, written when all concepts are done",
    )
    p.add_argument("--per-shard", type=int, default=1000, help="with --format shards: concepts per shard")
    p.add_argument("--log-json", action="store_true", help="one JSON line per finished concept on stdout")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the work in Ray actors (one per GPU, else CPU actors): alone, a local Ray instance; "
        "with an address (auto, ray://host:10001), that cluster (pip install 'oneword[ray]')",
    )
    p.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per GPU, else 2)")
    p.add_argument("--ray-cpus", type=int, default=1, help="CPU threads of each CPU actor")
    progress_option(p)
    add_dataclass_options(
        p,
        InversionConfig,
        skip=PER_RUN_FIELDS | {"num_vectors", "progressive_every", "base_lr"},
    )
    p.add_argument(
        "--base-lr",
        type=float,
        default=None,
        help="base learning rate (default: 1e-3 with encode, a refinement; 5e-3 with invert)",
    )
    return p


def run(args) -> int:
    if args.source == "status":
        return _status(args)
    if args.target is not None:
        raise OneWordError(f"unexpected argument {args.target!r}: the folder of a batch goes in --out")
    if not args.out:
        raise OneWordError("give the batch's folder: --out OUT")
    return _run(args)


def _status(args) -> int:
    from oneword.batch.report import status

    target = args.target or args.out
    if not target:
        raise OneWordError("ti batch status needs the batch's folder: ti batch status OUT")
    print(status(target))
    return 0


def _run(args) -> int:
    import dataclasses

    from oneword.batch.ledger import Ledger
    from oneword.batch.runner import BatchSettings, check_names, identity, print_summary, run_batch
    from oneword.batch.sources import read_source
    from oneword.encoder.autoinit import AUTO, candidate_words, read_vocab
    from oneword.encoder.pipeline import REFINE_DEFAULTS, encoder_identity, encoder_path
    from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig, weights_dtype
    from oneword.inversion.runfolder import RunFolder
    from oneword.models import load_model

    encode = args.method == "encode"
    try:
        settings = BatchSettings(
            method=args.method,
            steps=args.refine if encode else args.steps,
            group=args.group,
            init=args.init,
            init_vocab=read_vocab(args.init_vocab) if args.init_vocab else None,
            save_every=args.save_every,
            preview_steps=args.preview_steps,
            format=args.format,
            per_shard=args.per_shard,
            retry_failed=args.retry_failed,
            progress=not args.no_progress,
            log_json=args.log_json,
        )
    except ValueError as err:
        raise OneWordError(f"invalid setting: {err}") from None
    if settings.format == "shards":
        from oneword.batch.pack import require_pyarrow

        require_pyarrow()
    specs = read_source(args.source)  # and its ids checked, before a model loads
    encoder = enc_meta = enc_path = None
    model_name = args.model
    if encode:
        from oneword.encoder.model import TRAIN_ONE, check_fits, load_encoder

        enc_path = encoder_path(args.encoder)
        encoder, enc_meta = load_encoder(enc_path), encoder_identity(enc_path)
        model_name = model_name or encoder.cfg.model
        if encoder.cfg.family == "toy" and model_name != "toy" and not Path(model_name).is_dir():
            raise OneWordError(
                f"{enc_path} is an encoder for the toy world, not for --model {model_name}: {TRAIN_ONE}"
            )
    elif not model_name:
        raise OneWordError("--method invert needs --model")
    names = (
        {f.name for f in dataclasses.fields(InversionConfig)}
        - PER_RUN_FIELDS
        - {"base_lr", "num_vectors", "progressive_every"}
    )
    base = {k: getattr(args, k) for k in names}
    base["base_lr"] = (
        args.base_lr if args.base_lr is not None else (REFINE_DEFAULTS["base_lr"] if encode else 5e-3)
    )
    if encoder is not None:
        base["num_vectors"] = encoder.cfg.num_vectors
    out = Path(args.out)
    with RunFolder(out):  # one batch process per OUT
        # with --ray the actors load the model where they run; this process needs its tokenizers only
        device = "cpu" if args.ray else args.device
        model = load_model(model_name, device=device, dtype=weights_dtype(args.mixed_precision))
        if model.family == "toy" and base.get("template") == "object":
            base["template"] = "toy"  # the toy text encoder knows only toy-caption words
        try:
            cfg = InversionConfig(**base)
        except ValueError as err:
            raise OneWordError(f"invalid setting: {err}") from None
        if encoder is not None:
            check_fits(encoder, model)
            encoder.to(model.device)
            encoder.space.to(model.device)
        check_names(specs, model)
        space = None
        if any((spec.init or settings.init) == AUTO for spec in specs):
            candidate_words(model, settings.init_vocab)  # fewer than two usable words: refused now
            if encoder is None:  # invert: the model family's CLIP (ViT-B-32 for real models)
                from oneword.eval.space import default_space_name, load_space

                space = load_space(default_space_name(model.family), device=model.device)
        remote = None
        if args.ray:
            import functools

            from oneword.batch.distributed import RayPlan, WorkerSpec, work_on_ray

            plan = RayPlan(None if args.ray == "local" else args.ray, args.ray_workers, args.ray_cpus)
            worker = WorkerSpec(
                str(out.resolve()),
                str(Path(model_name).resolve()) if Path(model_name).exists() else model_name,
                weights_dtype(args.mixed_precision),
                cfg.to_dict(),
                dataclasses.asdict(settings),
                str(enc_path.resolve()) if encoder is not None else None,
                enc_meta,
                use_gpu=False,
                threads=args.ray_cpus,
            )
            remote = functools.partial(
                work_on_ray, worker=worker, plan=plan, group=settings.group, progress=settings.progress
            )
        with Ledger.open(out, identity(settings, cfg, model_name, enc_meta)) as ledger:
            result = run_batch(specs, out, model, cfg, settings, ledger, encoder, enc_meta, space, remote)
    print_summary(result, out)
    if result.interrupted:
        print("rerun the same command to continue", file=sys.stderr)
        return 130
    return 0
