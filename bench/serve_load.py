"""Service load: words per minute and latencies of ``ti serve`` with group refinement on and off,
at 1, 4 and 16 concurrent clients, side by side in one run.

    python bench/serve_load.py                                   # refine 200, group 16 vs 1 (long)
    python bench/serve_load.py --clients 1 4 --words 2 4 --refine 20 --out runs/bench-serve-quick

Each cell starts its own ``ti serve`` (the toy world, a fresh ``--data``, on 127.0.0.1) and runs
C client threads. A client loops until the cell's words are all asked for: POST 3 photos of a
held-out toy concept to /v1/words, follow the job's event stream (time to the ``provisional``
event, time to the final one), then draw one image with the word (POST /v1/images, 25 steps).
Words per minute is words refined over the cell's wall time; latencies are p50/p95 over the
cell's words. ``off`` is ``--group 1``: one word refined at a time (the service without the group
engine); ``on`` is ``--group G``. Each cell is saved when measured (``progress.json`` in ``--out``):
rerun the same command to finish an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    data: Path, group: int, refine: int, log: Path, extra: tuple[str, ...] = (), threads: int | None = None
) -> tuple[subprocess.Popen, str]:
    """``ti serve`` on a free loopback port with these settings (``extra``: more options;
    ``threads``: its torch threads); returns the process and its URL once ready."""
    import httpx

    port = _port()
    cmd = [sys.executable, "-m", "oneword.cli", "serve", "--port", str(port), "--data", str(data)]
    cmd += ["--group", str(group), "--refine", str(refine), "--max-queue", "1000", "--max-per-key", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "ab") as out:
        proc = subprocess.Popen([*cmd, *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ti serve exited; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"ti serve was not ready in 300 s; see {log}")


def _follow(c, job_id: str, t0: float) -> tuple[float | None, float, str]:
    """Seconds from ``t0`` to the provisional and to the final event, and the final state."""
    provisional = None
    with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as s:
        kind = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                if kind == "provisional" and provisional is None:
                    provisional = time.perf_counter() - t0
                if kind in ("succeeded", "failed", "canceled"):
                    return provisional, time.perf_counter() - t0, kind
    raise RuntimeError(f"the event stream of {job_id} ended before the job")


def _cell(urls: str | list[str], clients: int, words: int, folders: list[Path]) -> dict:
    """Run the clients (client k talks to ``urls[k % len(urls)]``) until ``words`` are asked for."""
    import httpx
    import numpy as np

    lock, counter = threading.Lock(), [0]
    rows: list[dict] = []
    codes: dict[int, int] = {}

    def count(code: int) -> None:
        with lock:
            codes[code] = codes.get(code, 0) + 1

    servers = [urls] if isinstance(urls, str) else list(urls)

    def client(k: int) -> None:
        with httpx.Client(base_url=servers[k % len(servers)], timeout=600) as c:
            while True:
                with lock:
                    if counter[0] >= words:
                        return
                    i = counter[0]
                    counter[0] += 1
                folder = folders[i % len(folders)]
                files = [
                    ("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(folder.glob("*.png"))
                ]
                t0 = time.perf_counter()
                r = c.post("/v1/words", files=files, data={"token": f"<c{i}>"})
                while r.status_code == 429:
                    count(429)
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    r = c.post("/v1/words", files=files, data={"token": f"<c{i}>"})
                count(r.status_code)
                r.raise_for_status()
                provisional, final, state = _follow(c, r.json()["id"], t0)
                g0 = time.perf_counter()
                g = c.post("/v1/images", json={"prompt": f"a photo of <c{i}>", "steps": 25, "seed": i})
                count(g.status_code)
                with lock:
                    rows.append({"provisional_s": provisional, "refined_s": final, "state": state,
                                 "generation_s": time.perf_counter() - g0 if g.status_code == 200 else None,
                                 "done_at": time.perf_counter()})  # fmt: skip

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refined = [r for r in rows if r["state"] == "succeeded"]
    wall = max(r["done_at"] for r in rows) - t0 if rows else float("nan")

    def pct(key: str) -> dict[str, float | None]:
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            return {"p50": None, "p95": None}
        return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}

    return {
        "clients": clients,
        "words": len(rows),
        "succeeded": len(refined),
        "wall_s": wall,
        "words_per_min": len(refined) / wall * 60,
        "provisional_s": pct("provisional_s"),
        "refined_s": pct("refined_s"),
        "generation_s": pct("generation_s"),
        "responses": {str(k): v for k, v in sorted(codes.items())},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument(
        "--words", type=int, nargs="+", default=[3, 8, 32], help="words per cell, one per --clients"
    )
    p.add_argument("--refine", type=int, default=200)
    p.add_argument("--group", type=int, default=16, help="the group size of 'on'")
    p.add_argument("--out", default="runs/bench-serve")
    p.add_argument("--json", default=str(ROOT / "docs" / "bench" / "serve_load.json"))
    args = p.parse_args()
    if len(args.words) != len(args.clients):
        raise SystemExit("give one --words value per --clients value")

    from oneword.fileio import atomic_write_text
    from oneword.provenance import provenance

    out = Path(args.out)
    plan = {"clients": args.clients, "words": args.words, "refine": args.refine, "group": args.group}
    done, progress_file, folders = open_run(out, plan)
    for mode, group in (("off", 1), ("on", args.group)):
        for clients, words in zip(args.clients, args.words):
            key = f"{mode}-{clients}"
            if key in done["cells"]:
                continue
            data = out / key
            proc, url = _start(data / "data", group, args.refine, out / f"{key}.log")
            try:
                cell = {"mode": mode, "group": group, **_cell(url, clients, words, folders)}
            finally:
                proc.terminate()
                proc.wait(60)
            done["cells"][key] = cell
            atomic_write_text(progress_file, json.dumps(done, indent=1))
            print(_line(cell), flush=True)
    _report(done, args, provenance())


def spread(d: dict) -> str:
    """``p50 / p95`` of a latency, for the tables."""
    return "-" if d["p50"] is None else f"{d['p50']:.2f} / {d['p95']:.2f}"


def _line(c: dict) -> str:
    ms = spread
    return (
        f"| {c['mode']} (G={c['group']}) | {c['clients']} | {c['succeeded']}/{c['words']} | {c['words_per_min']:.1f} | "
        f"{ms(c['provisional_s'])} | {ms(c['refined_s'])} | {ms(c['generation_s'])} | {c['responses'].get('429', 0)} |"
    )


def open_run(out: Path, plan: dict) -> tuple[dict, Path, list[Path]]:
    """The cells measured so far under ``out`` (for ``plan``; another plan there is an error),
    the progress file, and the concept folders the clients post (made once)."""
    from oneword.toy.concepts import write_bench_concepts

    progress_file = out / "progress.json"
    done = json.loads(progress_file.read_text()) if progress_file.is_file() else {"plan": plan, "cells": {}}
    if done["plan"] != plan:
        raise SystemExit(f"{progress_file} belongs to another plan ({done['plan']}); choose another --out")
    src = out / "src"
    folders = sorted(src.iterdir()) if src.is_dir() else write_bench_concepts(12, src, 0)
    return done, progress_file, folders


def write_result(path: Path, bench: str, done: dict, extra: dict, made_by: dict) -> None:
    """The results JSON: command, plan, cells, ``extra`` (the ratios), threads and provenance."""
    from oneword.fileio import atomic_write_text

    result = {
        "bench": bench,
        "command": f"python bench/{bench}.py " + " ".join(sys.argv[1:]),
        "plan": done["plan"],
        "cells": done["cells"],
        **extra,
        "threads": os.cpu_count(),
        "provenance": made_by,
    }
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def _report(done: dict, args, made_by: dict) -> None:
    cells = done["cells"]
    ratios = {}
    for clients in args.clients:
        on, off = cells.get(f"on-{clients}"), cells.get(f"off-{clients}")
        if on and off:
            ratios[str(clients)] = on["words_per_min"] / off["words_per_min"]
    print("| service | clients | refined | words/min | provisional s p50 / p95 | refined s p50 / p95 | "
          "generation s p50 / p95 | 429s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in cells.values():
        print(_line(c))
    for clients, r in ratios.items():
        print(f"words/min, group on / off at {clients} clients: {r:.2f}x")
    write_result(Path(args.json), "serve_load", done, {"words_per_min_ratio_on_off": ratios}, made_by)


if __name__ == "__main__":
    main()
