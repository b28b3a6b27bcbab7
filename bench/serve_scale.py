"""Service scale-out: words per minute and p95 time to the refined word at 16 concurrent clients,
for one worker against two (two ``ti serve`` processes sharing the store, then Ray Serve with two
CPU worker replicas), on SQLite and on PostgreSQL, side by side in one run.

    python bench/serve_scale.py                                  # 16 clients, 32 words, refine 200
    python bench/serve_scale.py --words 8 --refine 20 --out runs/bench-scale-quick

The clients are those of ``bench/serve_load.py`` (POST photos, follow the event stream, draw one
image). ``one``: one ``ti serve`` at the machine's torch threads. ``two``: two ``ti serve`` at one
thread each, on one store (SQLite in one shared ``--data``, or one PostgreSQL database); client k
talks to server k mod 2. ``ray``: ``ti serve --ray --replicas 2`` on a local Ray instance (one CPU
per replica). PostgreSQL is a throwaway local server (:mod:`oneword.serve.localpg`), a new
database per cell. On 2 CPU cores two workers cannot be faster than one; the point is that
scale-out works and what it costs. Each cell is saved when measured (``progress.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import _cell, _start, open_run, spread, write_result  # noqa: E402

SETUPS = ("one", "two", "ray")
STORES = ("sqlite", "postgresql")


def _run_cell(setup: str, db: str | None, out: Path, key: str, args, folders) -> dict:
    data = out / key / "data"
    store = ("--db", db) if db else ()
    log = out / f"{key}.log"
    procs = []
    try:
        if setup == "one":
            procs.append(_start(data, args.group, args.refine, log, store))
        elif setup == "two":
            for _ in range(2):
                procs.append(_start(data, args.group, args.refine, log, store, threads=1))
        else:
            procs.append(_start(data, args.group, args.refine, log, ("--ray", "--replicas", "2", *store)))
        return _cell([url for _, url in procs], args.clients, args.words, folders)
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(180)
            except Exception:  # noqa: BLE001 - a process that does not stop in time is killed
                proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--refine", type=int, default=200)
    p.add_argument("--group", type=int, default=16, help="group size of every worker")
    p.add_argument("--out", default="runs/bench-serve-scale")
    p.add_argument("--json", default=str(ROOT / "docs" / "bench" / "serve_scale.json"))
    args = p.parse_args()

    from oneword.fileio import atomic_write_text
    from oneword.provenance import provenance
    from oneword.serve.localpg import LocalPostgres

    out = Path(args.out)
    plan = {"clients": args.clients, "words": args.words, "refine": args.refine, "group": args.group}
    done, progress_file, folders = open_run(out, plan)
    postgres = LocalPostgres()
    with postgres:
        for store in STORES:
            for setup in SETUPS:
                key = f"{setup}-{store}"
                if key in done["cells"]:
                    continue
                db = postgres.new_database() if store == "postgresql" else None
                cell = {"setup": setup, "store": store, **_run_cell(setup, db, out, key, args, folders)}
                done["cells"][key] = cell
                atomic_write_text(progress_file, json.dumps(done, indent=1))
                print(_line(cell), flush=True)
    _report(done, args, provenance())


def _line(c: dict) -> str:
    s = spread
    return (
        f"| {c['setup']} | {c['store']} | {c['succeeded']}/{c['words']} | {c['words_per_min']:.1f} | "
        f"{s(c['refined_s'])} | {s(c['provisional_s'])} | {s(c['generation_s'])} | "
        f"{sum(v for k, v in c['responses'].items() if k.startswith('5'))} |"
    )


def _report(done: dict, args, made_by: dict) -> None:
    cells = done["cells"]
    print("| workers | store | refined | words/min | refined s p50 / p95 | provisional s p50 / p95 | "
          "generation s p50 / p95 | 5xx |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in cells.values():
        print(_line(c))
    ratios = {}
    for store in STORES:
        base = cells.get(f"one-{store}")
        for setup in SETUPS[1:]:
            cell = cells.get(f"{setup}-{store}")
            if base and cell:
                ratios[f"{setup}/one {store}"] = cell["words_per_min"] / base["words_per_min"]
    base, pg = cells.get("one-sqlite"), cells.get("one-postgresql")
    if base and pg:
        ratios["postgresql/sqlite one"] = pg["words_per_min"] / base["words_per_min"]
    for name, r in ratios.items():
        print(f"words/min {name}: {r:.2f}x")
    write_result(Path(args.json), "serve_scale", done, {"words_per_min_ratios": ratios}, made_by)


if __name__ == "__main__":
    main()
