"""Pool the per-concept rows of several amortization runs (disjoint draws) and test the goals.

Each ``results.json`` of ``bench/amortization.py`` holds one row per (method, concept, budget); the
``progress.json`` of an unfinished run holds the concepts it has finished and pools the same way.
Runs on disjoint draws of held-out concepts pool into one table over all their concepts, and the
project's two goals are checked with paired bootstrap intervals over those concepts: the encoder
alone against scratch at ``--compare-at`` steps, and the encoder at its largest budget against
scratch at its largest.

    python bench/pool_results.py docs/bench/results.json docs/bench/draw1/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from oneword.eval.report import GOAL_METRICS, REFERENCES, goal_gaps, goal_pairs, markdown_table, summarize

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json (or progress.json) files of bench/amortization.py")
    p.add_argument("--compare-at", type=int, default=500, help="scratch budget the encoder alone must beat")
    args = p.parse_args(argv)
    rows: list[dict] = []
    seen: set[str] = set()
    for path in args.results:
        try:
            doc = json.loads(Path(path).read_text())
            part = doc["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            p.error(f"{path} is not a results.json of bench/amortization.py ({err})")
        names = {r["concept"] for r in part}
        if names & seen:
            p.error(f"{path} repeats concepts of an earlier file ({', '.join(sorted(names & seen))}); "
                    "pool disjoint draws only")
        seen |= names
        rows += part
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
