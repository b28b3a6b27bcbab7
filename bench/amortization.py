"""Amortization: textual inversion from scratch versus encoder + refinement, side by side.

On held-out toy concepts (never seen by the toy model, its CLIP or the encoder), the evaluation
harness scores both methods at several optimization budgets with the same samples, then prints how
many steps (and seconds) encoder + refinement needs to match scratch inversion at its largest
budget, and whether the encoder alone beats scratch at ``--compare-at`` steps. Without a shipped
encoder it runs the scratch curve only (the baseline of the evaluation issue).

    python bench/amortization.py                        # the numbers in docs/benchmarks.md (long)
    python bench/amortization.py --quick                # what `make bench` runs (minutes)

The rows are saved after every concept (``progress.json`` in ``--out``): rerunning the same command
after an interruption measures only the concepts still missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: Written after every concept, so an interrupted run loses at most the concept it was on.
PROGRESS = "progress.json"


def load_progress(path: Path, plan: dict) -> tuple[list[dict], float]:
    """Rows and optimization seconds measured so far by a run with the same ``plan`` (none if
    ``path`` is missing); ValueError if the run there was started with another plan."""
    if not path.is_file():
        return [], 0.0
    try:
        doc = json.loads(path.read_text())
        same = doc["plan"] == json.loads(json.dumps(plan))
        rows, took = list(doc["rows"]), float(doc["seconds"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a progress file of this benchmark ({err}); delete it or choose another --out"
        ) from None
    if not same:
        raise ValueError(
            f"{path} belongs to a run with other concepts, methods or settings; "
            "rerun that command to finish it, or choose another --out"
        )
    return rows, took


def save_progress(path: Path, plan: dict, rows: list[dict], took: float) -> None:
    from oneword.fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"plan": plan, "seconds": took, "rows": rows}) + "\n")


def main(argv: list[str] | None = None) -> int:
    from oneword.encoder.pipeline import REFINE_DEFAULTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", type=int, default=6, help="held-out toy concepts (default: 6)")
    p.add_argument(
        "--draw",
        type=int,
        default=0,
        help="which disjoint set of held-out concepts (default: 0, the published one; e.g. 1 to choose a "
        "setting on concepts the published numbers do not use)",
    )
    p.add_argument("--scratch-budgets", type=int, nargs="+", default=[0, 50, 100, 200, 500, 1000, 2000, 3000])
    p.add_argument("--encoder-budgets", type=int, nargs="+", default=[0, 25, 50, 100, 200])
    p.add_argument("--compare-at", type=int, default=500, help="scratch budget the encoder alone must beat")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (default: 8)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the samples (default: 25)")
    p.add_argument("--encoder", default=None, help="encoder file (default: the shipped toy encoder, if any)")
    p.add_argument(
        "--refine-base-lr",
        type=float,
        nargs="+",
        default=[REFINE_DEFAULTS["base_lr"]],
        metavar="LR",
        help="base learning rates of the refinement, one encoder line each (default: ti-encode's, "
        f"{REFINE_DEFAULTS['base_lr']:g})",
    )
    p.add_argument(
        "--refine-schedule",
        choices=["constant", "cosine"],
        nargs="+",
        default=["constant"],
        help="learning-rate schedules of the refinement, one encoder line per (schedule, rate) "
        "(default: constant, as scratch; cosine decays to 0 at the largest encoder budget)",
    )
    p.add_argument(
        "--refine-reg-weight",
        type=float,
        nargs="+",
        default=[0.0],
        metavar="W",
        help="weights of the refinement's L2 pull toward the encoder's prediction, one encoder line "
        "per (schedule, rate, weight) (default: 0, as ti-encode)",
    )
    p.add_argument(
        "--refine-batch-size",
        type=int,
        nargs="+",
        default=[4],
        metavar="B",
        help="batch sizes of the refinement, one encoder line per (schedule, rate, weight, batch) "
        "(default: 4, as scratch; the rate is scaled by the batch size)",
    )
    p.add_argument(
        "--refine-select",
        type=int,
        default=0,
        metavar="N",
        help="also score, at the largest encoder budget, the word kept by ti-encode's --select N round "
        "trip (the prediction or its refinement, by N fresh samples; default: 0, off)",
    )
    p.add_argument(
        "--select-among",
        type=int,
        nargs="+",
        default=None,
        metavar="STEPS",
        help="with --refine-select: the encoder budgets whose words the round trip judges (default: 0 "
        "and the largest, as ti-encode); the row records every one's distance, so "
        "bench/pool_results.py --select-among can score any subset afterwards",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="bounded run for make bench: 2 concepts, budgets 0/100/300/1000 vs 0/50, 4 samples",
    )
    p.add_argument("--out", default="runs/bench/amortization", help="results folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.quick:
        args.concepts, args.samples = 2, 4
        args.scratch_budgets, args.encoder_budgets, args.compare_at = [0, 100, 300, 1000], [0, 50], 300
    if args.threads:
        torch.set_num_threads(args.threads)
    enc_top = max(args.encoder_budgets)
    default_among = sorted({0, enc_top})
    among = sorted(set(args.select_among or default_among))
    if args.select_among and not args.refine_select:
        p.error("--select-among needs --refine-select N (the round trip's samples)")
    if args.refine_select and (not set(among) <= set(args.encoder_budgets) | {0} or among[0] != 0):
        p.error(
            "--select-among takes encoder budgets (--encoder-budgets), 0 among them: the prediction is the "
            "round trip's target"
        )

    from oneword.encoder.model import load_encoder, predict_embeddings
    from oneword.encoder.pipeline import SHIPPED
    from oneword.eval.curves import Method, run_curve
    from oneword.eval.protocol import EvalSettings, Scorer
    from oneword.eval.report import GOAL_METRICS, goal_gaps, select_pairs, summarize, write_report
    from oneword.eval.space import load_space
    from oneword.fileio import sha256_file
    from oneword.inversion.config import InversionConfig
    from oneword.models import load_model
    from oneword.provenance import provenance
    from oneword.toy.clip import DEFAULT_PATH as CLIP_PATH
    from oneword.toy.concepts import load_bench_concepts
    from oneword.toy.oracle import load_oracle

    try:
        concepts = load_bench_concepts(args.concepts, args.draw)
    except ValueError as err:
        p.error(str(err))
    settings = EvalSettings(samples=args.samples, steps=args.sample_steps, guidance=5.0)
    space = load_space("toy") if CLIP_PATH.is_file() else None
    oracle = load_oracle()
    base = InversionConfig(template="toy", batch_size=4, views_per_image=8)
    scratch_top = max(args.scratch_budgets)
    methods = [Method("scratch", budgets=tuple(args.scratch_budgets))]
    enc_path = Path(args.encoder) if args.encoder else SHIPPED
    if enc_path.is_file():
        encoder = load_encoder(enc_path)

        def predict(model, concept):
            return predict_embeddings(encoder, model, [[im.image for im in concept.images]], [concept.init])[
                0
            ]

        select = None
        if args.refine_select > 0:
            from oneword.encoder.select import round_trip_selector, select_settings

            select = round_trip_selector(
                encoder, select_settings(args.refine_select, settings.steps, settings.guidance), among
            )

        for sched, lr, reg, batch in itertools.product(
            args.refine_schedule, args.refine_base_lr, args.refine_reg_weight, args.refine_batch_size
        ):
            notes = (
                ([] if lr == base.base_lr else [f"base_lr {lr:g}"])
                + ([] if sched == "constant" else [sched])
                + ([] if reg == base.reg_weight else [f"reg {reg:g}"])
                + ([] if batch == base.batch_size else [f"batch {batch}"])
            )
            name = "encoder + refinement" + (f" ({', '.join(notes)})" if notes else "")
            overrides = {"base_lr": lr, "lr_schedule": sched, "reg_weight": reg, "batch_size": batch}
            methods.append(
                Method(
                    name,
                    overrides=overrides,
                    init_fn=predict,
                    budgets=tuple(args.encoder_budgets),
                    select_fn=select,
                )
            )
    else:
        print(f"no encoder at {enc_path}: scratch curve only", file=sys.stderr)
    print(
        f"{len(concepts)} held-out concepts, {args.samples} samples x {args.sample_steps} steps, "
        f"CLIP: {'toy' if space else 'none'}, oracle: yes",
        file=sys.stderr,
    )
    out = Path(args.out)
    plan = {
        "concepts": [c.name for c in concepts],
        "draw": args.draw,
        "samples": args.samples,
        "sample_steps": args.sample_steps,
        "encoder": sha256_file(enc_path) if len(methods) > 1 else None,
        "methods": [[m.name, list(m.budgets or ()), m.overrides] for m in methods],
    }
    if args.refine_select:  # only then, so that earlier runs' progress files still match their plans
        plan["select"] = args.refine_select
        if among != default_among:
            plan["select_among"] = among
    try:
        rows, took = load_progress(out / PROGRESS, plan)
    except ValueError as err:
        p.error(str(err))
    done = {r["concept"] for r in rows}
    if done:
        print(
            f"resuming: {len(done)} of {len(concepts)} concepts already measured in {out / PROGRESS}",
            file=sys.stderr,
        )
    for concept in concepts:
        if concept.name in done:
            continue
        t0 = time.perf_counter()
        rows += run_curve(
            lambda: load_model("toy"),
            [concept],
            base,
            methods,
            [0],
            lambda m: Scorer(m, settings, space, oracle),
        )
        took += time.perf_counter() - t0
        save_progress(out / PROGRESS, plan, rows, took)
    files = write_report(
        rows,
        out,
        {**{k: plan[k] for k in ("concepts", "draw", "samples", "sample_steps")}, "seconds": round(took, 1)},
        provenance(encoder=enc_path if enc_path.is_file() else None),
    )
    summary = summarize(rows)
    print(files["markdown"].read_text())
    metrics = [m for m in GOAL_METRICS if any(r.get(m) is not None for r in summary)]
    if scratch_top == 0:  # an encoder measured alone: its rows pair with a saved run's scratch rows
        print(
            "no scratch inversion was measured (--scratch-budgets 0); to compare, pair these rows with a "
            f"saved run of the same draw: python bench/pool_results.py {out / 'results.json'} --baseline SAVED.json"
        )
    else:
        _compare(args, rows, summary, methods, metrics, scratch_top)
    for line in goal_gaps(rows, select_pairs(rows), metrics):  # the kept word against always refining
        print(line)
    print(f"took {took / 60:.1f} min; wrote {', '.join(str(f) for f in files.values())}")
    return 0


def _compare(
    args, rows: list[dict], summary: list[dict], methods: list, metrics: list[str], scratch_top: int
) -> None:
    """Each encoder method against scratch at its largest budget, and the goals' paired gaps."""
    from oneword.eval.curves import SELECT_SUFFIX
    from oneword.eval.report import goal_gaps, goal_pairs, row_at, steps_to_match

    top = row_at(summary, "scratch", scratch_top)
    print(
        f"scratch @ {scratch_top}: "
        + ", ".join(f"{m} {top[m]:.3f}" for m in metrics)
        + f" ({top['seconds']:.0f} s)"
    )
    for method in methods[1:]:
        name = method.name
        hit = steps_to_match(summary, name, top, metrics)
        if hit is None:
            print(f"{name} does not reach scratch @ {scratch_top} within {max(args.encoder_budgets)} steps")
        else:
            ratio = "inf" if hit["steps"] == 0 else f"{scratch_top / hit['steps']:.1f}x"
            wall = top["seconds"] / max(hit["seconds"], 1e-9)
            print(
                f"{name} matches it at {hit['steps']} steps: {ratio} fewer steps, "
                f"{wall:.1f}x less optimization time ({hit['seconds']:.1f} s vs {top['seconds']:.0f} s)"
            )
        alone, mid = row_at(summary, name, 0), row_at(summary, "scratch", args.compare_at)
        if alone and mid and method is methods[1]:  # the prediction is the same for every refinement lr
            wins = all(alone[m] >= mid[m] for m in metrics)
            print(
                f"encoder alone vs scratch @ {args.compare_at}: "
                + ", ".join(f"{m} {alone[m]:.3f} vs {mid[m]:.3f}" for m in metrics)
                + (" -> beats it" if wins else " -> does not")
            )
    if len(methods) > 1:
        for line in goal_gaps(rows, goal_pairs(rows, methods[1].name, args.compare_at), metrics):
            print(line)
    for method in methods[1:]:
        if method.select_fn is not None:  # the kept word against scratch (no rows at 0: only goal 2 prints)
            for line in goal_gaps(
                rows, goal_pairs(rows, method.name + SELECT_SUFFIX, args.compare_at), metrics
            ):
                print(line)


if __name__ == "__main__":
    sys.exit(main())
