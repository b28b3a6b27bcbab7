"""``ti-encode``: predict pseudo-words for concept folders in one pass, optionally refine them.

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

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from oneword.errors import OneWordError

logger = logging.getLogger("oneword")

# Refinement starts near the answer, so it runs at a fifth of scratch inversion's rate: on held-out
# toy concepts 0.885 of the attributes after 200 steps at base_lr 1e-3 against 0.87 at 5e-3
# (`python bench/amortization.py --concepts 6 --refine-base-lr 5e-3 1e-3`, session 11). An L2 pull
# toward the prediction (--reg_weight 0.03 / 0.3: 0.911 / 0.901 against 0.911) and a batch of 8 at
# the same effective rate (0.930 against 0.935) did not help (session 13), so both stay as scratch's.
REFINE_DEFAULTS: dict[str, float] = {"base_lr": 1e-3}

# The round trip judges the refinement by default: on 36 toy concepts held out from training it kept
# 0.938 of the oracle's attributes against 0.928 always refining (+0.010 [-0.004, +0.024]); chosen on
# draws 0 and 1, it held on draw 2 by the rule written down before that run (0.940 against 0.935,
# +0.005 [-0.021, +0.034]) and became the default (session 19).
DEFAULT_SELECT = 8

SHIPPED = Path(__file__).resolve().parents[1] / "toy" / "weights" / "encoder.safetensors"


def encoder_path(name: str | None) -> Path:
    """``--encoder``/``--from-encoder`` values: None or ``toy`` is the shipped toy encoder."""
    return SHIPPED if name in (None, "toy") else Path(name)


def build_parser() -> argparse.ArgumentParser:
    from oneword.cli import add_dataclass_options
    from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig

    p = argparse.ArgumentParser(prog="ti-encode", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGES_DIR", help="one folder of reference images per concept")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="textual-inversion steps from the prediction (default: 0 = encoder only)")
    p.add_argument("--model", default=None, help="diffusion model (default: the encoder's, e.g. toy)")
    p.add_argument("--encoder", default=None,
                   help="encoder file from ti-train-encoder (default: toy, the shipped toy encoder)")
    p.add_argument("--token", nargs="+", default=None,
                   help="placeholder token per concept (default: <folder name>)")
    p.add_argument("--init", nargs="+", default=None,
                   help="initializer word per concept, or one for all (default: a toy concept's shape)")
    p.add_argument("--out", default="runs/encode",
                   help="parent of the per-concept run folders (default: runs/encode, so runs/encode/<name>/)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--select", type=int, default=None, metavar="N",
                   help="after --refine, keep the prediction or the refined word, whichever the encoder reads back "
                        f"closer to the references from N fresh samples of each (default: {DEFAULT_SELECT} with "
                        "--refine; 0 always keeps the refined word)")
    p.add_argument("--select-among", type=int, nargs="+", default=None, metavar="STEPS",
                   help="with the round trip (--select): also judge the refinement's words after these steps, "
                        "e.g. 50 100 with --refine 200 (default: none). The prediction (0) and the refined word "
                        "(--refine) are always judged; under --lr_schedule cosine a middle word is not a shorter "
                        "run's word")
    p.add_argument("--preview-steps", type=int, default=25, help="sampling steps of preview.png (default: 25; 0: none)")
    p.add_argument("--sample-batch", type=int, default=4, metavar="N",
                   help="images per pipeline call in the round trip and the preview (default: 4; lower it if "
                        "the GPU runs out of memory: the images and the choice stay the same)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_dataclass_options(p, InversionConfig, skip=PER_RUN_FIELDS | {"num_vectors"}, defaults=REFINE_DEFAULTS,
                          helps={"reg_weight": "Weight of an L2 pull toward the encoder's prediction during --refine"})
    return p


def select_samples(refine: int, select: int | None) -> int:
    """The round trip's sample count: ``--select`` as given, else :data:`DEFAULT_SELECT` when there
    is a refinement to judge (none without one)."""
    if not refine:
        return 0
    return DEFAULT_SELECT if select is None else select


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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from oneword.cli import run_reporting_errors

    return run_reporting_errors(run, args)


def run(args: argparse.Namespace) -> int:
    from oneword.encoder.model import TRAIN_ONE, check_fits, load_encoder, predict_embeddings
    from oneword.encoder.select import REFINED, candidate_name
    from oneword.eval.protocol import load_concept
    from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig, weights_dtype
    from oneword.inversion.train import safe_file_stem
    from oneword.models import load_model

    if args.refine < 0:
        raise OneWordError("--refine must be 0 or more")
    if args.select is not None and args.select < 0:
        raise OneWordError("--select must be 0 or more")
    if args.sample_batch < 1:
        raise OneWordError("--sample-batch must be at least 1")
    if args.select and not args.refine:
        print("--select chooses between the prediction and its refinement: without --refine it does nothing",
              file=sys.stderr)
    args.select = select_samples(args.refine, args.select)
    among = sorted(set(args.select_among or ()) - {0, args.refine})
    if args.select_among and not args.select:
        raise OneWordError("--select-among needs a refinement (--refine N) and its round trip (not --select 0)")
    if any(not 0 <= b <= args.refine for b in args.select_among or ()):
        raise OneWordError(f"--select-among takes step counts from 0 to --refine ({args.refine}); "
                           f"got {' '.join(map(str, args.select_among))}")
    enc_path = encoder_path(args.encoder)
    encoder = load_encoder(enc_path)
    model_name = args.model or encoder.cfg.model
    if encoder.cfg.family == "toy" and model_name != "toy" and not Path(model_name).is_dir():
        # fail before loading a real model (minutes for SDXL) that the toy encoder cannot fit
        raise OneWordError(f"{enc_path} is an encoder for the toy world, not for --model {model_name}: {TRAIN_ONE}")
    n = len(args.images)
    inits = _per_concept(args.init, n, "--init")
    tokens = _per_concept(args.token, n, "--token")
    concepts = [load_concept(d, init) for d, init in zip(args.images, inits)]
    tokens = [t or f"<{safe_file_stem(Path(d).resolve().name)}>" for t, d in zip(tokens, args.images)]
    if len({safe_file_stem(t).lower() for t in tokens}) != n:  # tokens equal but for case share one too
        # CLIP ignores case, and so may the file system; each word gets its own run folder
        raise OneWordError(f"two concepts would get the same token or run folder ({tokens}); pass --token")
    out_root = Path(args.out)
    taken = [str(d) for t in tokens if (d := out_root / safe_file_stem(t)).is_dir() and any(d.iterdir())]
    if taken:  # before the model loads (minutes), and before any concept is written
        raise OneWordError(f"{', '.join(taken)} already hold{'s' if len(taken) == 1 else ''} files: ti-encode "
                           "neither resumes nor overwrites a run folder; choose another --out or remove them")
    model = load_model(model_name, device=args.device, dtype=weights_dtype(args.mixed_precision))
    check_fits(encoder, model)
    names = {f.name for f in dataclasses.fields(InversionConfig)} - PER_RUN_FIELDS - {"num_vectors"}
    base = {k: getattr(args, k) for k in names}
    if model.family == "toy" and base["template"] == "object":
        base["template"] = "toy"  # the toy text encoder knows only toy-caption words
    try:
        cfgs = [InversionConfig(**base, token=t, init=c.init, num_vectors=encoder.cfg.num_vectors,
                                steps=max(1, args.refine), save_every=0, preview_every=0)
                for t, c in zip(tokens, concepts)]
    except ValueError as err:
        raise OneWordError(f"invalid setting: {err}") from None

    encoder.to(model.device)
    encoder.space.to(model.device)
    t0 = time.perf_counter()
    predicted = predict_embeddings(encoder, model, [[im.image for im in c.images] for c in concepts],
                                   [c.init for c in concepts])
    encode_s = time.perf_counter() - t0
    print(f"encoded {n} concept(s) in {encode_s:.2f}s with {enc_path}", file=sys.stderr)
    for i, (concept, cfg, vectors) in enumerate(zip(concepts, cfgs, predicted)):
        out = out_root / safe_file_stem(cfg.token)
        choice, kept_steps = None, args.refine
        if args.refine == 0:
            files, refine_s, loss = _write_prediction(model, cfg, concept, vectors, out, str(enc_path)), 0.0, None
        else:
            from oneword.inversion.train import run_inversion

            model.clear_placeholders()  # one placeholder per model while optimizing: drop the last concept's
            t1 = time.perf_counter()
            res = run_inversion(model, concept.images, cfg, out, init_vectors=vectors,
                                progress=not args.no_progress, snapshot_steps=among,
                                extra_metadata={"oneword.encoder": str(enc_path), "oneword.refine": str(args.refine)})
            refine_s, loss, files = time.perf_counter() - t1, res.final_loss, res.files
            if res.interrupted:
                _report(out, concept, cfg, str(enc_path), model_name, encode_s / n, res.step, refine_s, loss,
                        interrupted=True)
                print(f"{concept.name}: interrupted at step {res.step}/{args.refine}; kept that word, skipped the "
                      f"round trip{' and the remaining concepts' if i + 1 < n else ''}", file=sys.stderr)
                for f in files:
                    print(f"  {f}")
                return 130
            if args.select:
                choice = _select(encoder, model, cfg, concept, vectors, args.select, args.sample_batch,
                                 res.snapshots, args.refine)
                if choice.kept != REFINED:  # the refined word stays in checkpoints/
                    steps = kept_steps = {candidate_name(b, args.refine): b for b in (0, *among)}[choice.kept]
                    kept = vectors if steps == 0 else res.snapshots[steps]
                    what = "the prediction" if steps == 0 else f"the word after {steps} steps"
                    saved = _save_word(model, cfg, concept, kept, out, str(enc_path),
                                       f"{args.refine} ({what} kept by --select)", steps)
                    files = list(dict.fromkeys([*files, *saved]))
        if args.preview_steps:
            files.append(_preview(model, cfg.token, out, args.preview_steps, args.sample_batch))
        files.append(_report(out, concept, cfg, str(enc_path), model_name, encode_s / n, args.refine, refine_s, loss,
                             choice, kept_steps))
        print(f"{concept.name}: {cfg.token} -> {out}", file=sys.stderr)
        for f in files:
            print(f"  {f}")
    return 0


def _write_prediction(model, cfg, concept, vectors, out: Path, encoder: str) -> list[Path]:
    if out.exists() and any(out.iterdir()):
        raise OneWordError(f"{out} already holds files; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model.add_placeholder(cfg.token, vectors)
    return _save_word(model, cfg, concept, vectors, out, encoder, "0", 0)


def _save_word(model, cfg, concept, vectors, out: Path, encoder: str, refine: str, steps: int) -> list[Path]:
    """The embedding files of a word other than the refinement's last (the prediction, or a word
    after ``steps`` of the refinement), as ``ti invert`` names them."""
    from oneword.inversion.embedding_io import Embedding, build_metadata, save_diffusers, save_single_file
    from oneword.inversion.train import safe_file_stem

    meta = build_metadata(family=model.family, token=cfg.token, init=cfg.init, steps=steps,
                          source_hashes=[im.sha256 for im in concept.images],
                          extra={"oneword.model": model.source, "oneword.encoder": encoder, "oneword.refine": refine})
    emb = Embedding(cfg.token, vectors, meta)
    return [*save_diffusers(emb, out), save_single_file(emb, out / f"{safe_file_stem(cfg.token)}.safetensors")]


def _select(encoder, model, cfg, concept, prediction, samples: int, batch: int, snapshots, top: int):
    """Keep the prediction, the refined word on ``cfg.token`` or a word from ``snapshots`` (earlier
    steps), whichever the encoder's round trip (:mod:`oneword.encoder.select`) finds closest to the
    references."""
    from oneword.encoder.select import REFINED, keep_prediction_or_refined, select_settings

    t0 = time.perf_counter()
    choice = keep_prediction_or_refined(encoder, model, cfg.token, concept.init, prediction,
                                        select_settings(samples, batch=batch), snapshots, top)
    kept = "refined word" if choice.kept == REFINED else choice.kept
    print(f"{concept.name}: kept the {kept} (--select {samples}: round-trip distances "
          f"{choice.describe_distances()}; {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return choice


def _preview(model, token: str, out: Path, steps: int, batch: int) -> Path:
    from oneword.generate import SampleSettings, render_grid

    second = "a photo of {} on a teal background" if model.family == "toy" else "a painting of {} on the beach"
    prompts = [p.format(token) for p in ("a photo of {}", second)]
    return render_grid(model, prompts, SampleSettings(steps=steps, seeds=[0, 1, 2, 3], batch=batch), out / "preview.png",
                       {"token": token})


def _report(out: Path, concept, cfg, encoder: str, model: str, encode_s: float, refine: int,
            refine_s: float, loss: float | None, choice=None, kept_steps: int | None = None,
            interrupted: bool = False) -> Path:
    from oneword.fileio import atomic_write_text

    rows = [("concept", f"{concept.name} ({len(concept.images)} images)"), ("token", cfg.token),
            ("initializer", cfg.init), ("model", model), ("encoder", encoder),
            ("encoder time", f"{encode_s:.2f} s"), ("refinement", f"{refine} steps{' (interrupted)' if interrupted else ''}, {refine_s:.1f} s"),
            ("final loss", "–" if loss is None else f"{loss:.4f}")]
    if choice is not None:
        rows += [("kept", choice.kept), ("kept word's steps", str(kept_steps)),
                 ("round-trip distances", choice.describe_distances())]
    text = "# ti-encode report\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    atomic_write_text(out / "encode.json", json.dumps(dict(rows), indent=1) + "\n")
    return atomic_write_text(out / "report.md", text + "\n![preview](preview.png)\n")


if __name__ == "__main__":
    sys.exit(main())
