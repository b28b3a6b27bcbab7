"""Pool the per-concept rows of several amortization runs (disjoint draws) and test the goals.

Each ``results.json`` of ``bench/amortization.py`` holds one row per (method, concept, budget); the
``progress.json`` of an unfinished run holds the concepts it has finished and pools the same way.
Runs on disjoint draws of held-out concepts pool into one table over all their concepts, and the
project's two goals are checked with paired bootstrap intervals over those concepts: the encoder
alone against scratch at ``--compare-at`` steps, and the encoder at its largest budget against
scratch at its largest.

    python bench/pool_results.py docs/bench/results.json docs/bench/draw1/results.json

``--baseline`` pairs a new run with saved runs of the same concepts: a new encoder measured alone
(``--scratch-budgets 0``) borrows their scratch rows (same concepts, seeds and samples, so the same
scores), and every method both runs measured is compared concept by concept, new minus saved. A new
run that measured scratch itself (a fresh draw pooled with the others) needs no baseline:

    python bench/pool_results.py runs/bench/new-draw0/results.json \
        --baseline docs/bench/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from oneword.eval.report import (
        GOAL_METRICS,
        REFERENCES,
        goal_gaps,
        goal_pairs,
        markdown_table,
        select_pairs,
        summarize,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "results", nargs="+", help="results.json (or progress.json) files of bench/amortization.py"
    )
    p.add_argument("--compare-at", type=int, default=500, help="scratch budget the encoder alone must beat")
    p.add_argument(
        "--baseline",
        nargs="+",
        default=[],
        metavar="RESULTS",
        help="saved runs of the same concepts (disjoint draws among themselves): rows the new runs "
        "lack are taken from them, and methods both measured are compared, new minus saved",
    )
    p.add_argument(
        "--select-among",
        type=int,
        nargs="+",
        default=None,
        metavar="STEPS",
        help="score the round-trip selection as if it had judged only the words at these encoder budgets "
        "(runs measured with bench/amortization.py --select-among; e.g. 0 50 200)",
    )
    args = p.parse_args(argv)
    rows, seen, sampling = _pool(p, args.results)
    if args.select_among:
        from oneword.eval.curves import reselect

        try:
            rows = reselect(rows, args.select_among)
        except ValueError as err:
            p.error(str(err))
    if args.baseline:
        saved, saved_names, saved_sampling = _pool(p, args.baseline)
        own = {
            r["concept"] for r in rows if r["method"] == "scratch" and r["steps"]
        }  # measured scratch itself
        if seen - own - saved_names:
            p.error(
                f"the baseline lacks concepts of the new runs: {', '.join(sorted(seen - own - saved_names))}"
            )
        if sampling and saved_sampling and sampling != saved_sampling:
            p.error(
                f"the baseline sampled otherwise (samples, sample steps: {sorted(saved_sampling)} "
                f"against {sorted(sampling)}); its scores cannot be paired"
            )
        rows, pairs = _with_baseline(rows, [r for r in saved if r["concept"] in seen])
    else:
        pairs = []
    summary = summarize(rows)
    print(f"{len(seen)} concepts from {len(args.results)} run(s)\n")
    print(markdown_table(summary))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in REFERENCES))
    if "scratch" not in methods:
        p.error("no scratch rows to compare with")
    metrics = [m for m in GOAL_METRICS if any(r.get(m) is not None for r in summary)]
    for m in methods:
        if m != "scratch":
            for line in goal_gaps(rows, goal_pairs(rows, m, args.compare_at), metrics):
                print(line)
    for line in goal_gaps(rows, select_pairs(rows) + pairs, metrics):
        print(line)
    return 0


def _pool(p: argparse.ArgumentParser, paths: list[str]) -> tuple[list[dict], set[str], set[tuple]]:
    """The rows of runs on disjoint draws, their concepts (an error if two runs share one) and the
    (samples, sample steps) they were scored with, where recorded."""
    rows: list[dict] = []
    seen: set[str] = set()
    sampling: set[tuple] = set()
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
            part = doc["rows"]
            names = {r["concept"] for r in part}
            plan = doc.get("settings") or doc.get("plan") or {}
        except (OSError, ValueError, KeyError, TypeError) as err:
            p.error(f"{path} is not a results.json of bench/amortization.py ({err})")
        if names & seen:
            p.error(
                f"{path} repeats concepts of an earlier file ({', '.join(sorted(names & seen))}); "
                "pool disjoint draws only"
            )
        seen |= names
        rows += part
        if "samples" in plan:
            sampling.add((plan["samples"], plan.get("sample_steps")))
    return rows, seen, sampling


#: Appended to the name of a method the saved runs measured too, for their rows.
SAVED = " (saved)"


def _with_baseline(
    rows: list[dict], saved: list[dict]
) -> tuple[list[dict], list[tuple[tuple[str, int], tuple[str, int]]]]:
    """``rows`` plus the saved rows: references and scratch only where the new runs lack them (the
    same seeds give the same scores), a method the new runs measured too under ``method + SAVED``,
    any other method as it is. Returns the rows and the (new, saved) pairs at budgets both measured."""
    from oneword.eval.report import REFERENCES

    new = {(r["method"], r["steps"]) for r in rows}
    have = {(r["method"], r["concept"], r["steps"]) for r in rows}
    methods = {r["method"] for r in rows}
    out, pairs = list(rows), []
    for r in saved:
        m, steps = r["method"], r["steps"]
        if m in REFERENCES or m == "scratch":
            if (m, r["concept"], steps) not in have:
                out.append(r)
        elif m in methods:
            out.append({**r, "method": m + SAVED})
            pair = ((m, steps), (m + SAVED, steps))
            if (m, steps) in new and pair not in pairs:
                pairs.append(pair)
        else:
            out.append(r)
    return out, pairs


if __name__ == "__main__":
    sys.exit(main())
