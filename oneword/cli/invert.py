"""``ti invert``: textual inversion of one concept's images into a new pseudo-word.

Its options are :class:`~oneword.inversion.config.InversionConfig`'s fields, so the dataclass's
field docstrings are the ``--help`` text, and a run folder's ``config.yaml`` is a ``--config``
file: ``ti invert IMAGES --model toy --config runs/<token>/config.yaml --out runs/again``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from oneword.cli.options import add_dataclass_options, model_options, new_parser, progress_option
from oneword.errors import OneWordError

HELP = "learn a pseudo-word from 3-5 images of a concept"


def build_parser(prog: str = "ti invert"):
    from oneword.inversion.config import InversionConfig

    p = new_parser(prog, "Textual inversion (Gal et al. 2022) of the images in IMAGES_DIR.")
    p.add_argument("images", metavar="IMAGES_DIR", help="folder with the concept's reference images")
    model_options(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/<token>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    progress_option(p)
    add_dataclass_options(p, InversionConfig, required=frozenset({"token", "init"}))
    return p


def run(args) -> int:
    import dataclasses

    from oneword.data.images import load_folder
    from oneword.inversion.config import InversionConfig, weights_dtype
    from oneword.inversion.runfolder import RunFolder, safe_file_stem
    from oneword.inversion.train import run_inversion
    from oneword.models import load_model

    try:
        cfg = InversionConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(InversionConfig)})
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
