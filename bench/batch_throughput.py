"""Batch throughput: concepts per hour of ``ti batch`` against a shell loop of ``ti-encode``, at the
same quality, side by side in one run.

    python bench/batch_throughput.py                      # 24 held-out toy concepts (long)
    python bench/batch_throughput.py --concepts 4 --refine 20 --groups 2 --out runs/bench-batch-quick

Methods, each on the same held-out toy concepts (draws of 12, never seen in training), each
encoder + ``--refine`` steps with ``--init auto``:

- ``loop``: one ``ti-encode FOLDER --refine N --select 0 --preview-steps 0`` process per concept
  (what a user without ``ti batch`` runs; the round trip and the preview are off so that it does
  the same work as the batch);
- ``batch G=1``: ``ti batch SRC --refine N --group 1 --preview-steps 0`` (no previews either);
- ``batch G=g`` for each ``--groups`` value.

Each method runs as its own child process: wall-clock seconds and the peak resident memory of the
largest single process among the child and its descendants (``wait4``; with ``--ray-workers``,
Ray runs several actors and daemons at once, so their sum is larger). Quality is the attribute oracle's ``recon_oracle`` of every
word (the evaluation protocol's CPU preset), paired per concept with the loop's. Each method's
result is saved as soon as it is measured (``progress.json`` in ``--out``): rerun the same command
to finish an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """Run ``cmd``; its wall seconds, the peak RSS in MB of it and its descendants, its exit code."""
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, proc.returncode


def _loop(folders: list[Path], out: Path, refine: int) -> None:
    """The shell loop (run inside a child, so that its memory is measured as one method's)."""
    for folder in folders:
        cmd = [sys.executable, "-m", "oneword.cli.encode", str(folder), "--refine", str(refine)]
        cmd += ["--select", "0", "--preview-steps", "0", "--no-progress", "--out", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _words(out: Path, method: str, names: list[str]) -> dict[str, Path]:
    base = out / method / ("concepts" if not method.startswith("loop") else "")
    return {n: base / n / "learned_embeds.safetensors" for n in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concepts", type=int, default=24, help="held-out toy concepts (draws of 12)")
    p.add_argument("--refine", type=int, default=200)
    p.add_argument("--groups", type=int, nargs="+", default=[8, 16])
    p.add_argument(
        "--no-loop", action="store_true", help="only the batch groups (and Ray); the first is the baseline"
    )
    p.add_argument(
        "--ray-workers", type=int, default=0, help="also ti batch --ray with N one-thread CPU actors"
    )
    p.add_argument("--out", default="runs/bench-batch")
    p.add_argument("--json", default=str(ROOT / "docs" / "bench" / "batch_throughput.json"))
    p.add_argument("--loop-child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.loop_child:
        _loop([Path(f) for f in args.loop_child], out / "loop", args.refine)
        return

    from oneword.fileio import atomic_write_text
    from oneword.provenance import provenance
    from oneword.toy.concepts import write_bench_concepts

    plan = {"concepts": args.concepts, "refine": args.refine, "groups": args.groups}
    if args.no_loop or args.ray_workers:
        plan.update(no_loop=args.no_loop, ray_workers=args.ray_workers)
    progress_file = out / "progress.json"
    done = json.loads(progress_file.read_text()) if progress_file.is_file() else {"plan": plan, "methods": {}}
    if done["plan"] != plan:
        raise SystemExit(f"{progress_file} belongs to another plan ({done['plan']}); choose another --out")
    src = out / "src"
    if not src.is_dir():
        folders = []
        for draw in range((args.concepts + 11) // 12):
            folders += write_bench_concepts(12, src / f"draw{draw}", draw)
        for f in folders[args.concepts :]:
            import shutil

            shutil.rmtree(f)
    folders = sorted(p for p in src.glob("draw*/*") if p.is_dir())[: args.concepts]
    flat = out / "flat"  # ti batch reads one folder of concept folders
    flat.mkdir(parents=True, exist_ok=True)
    for f in folders:
        if not (flat / f.name).exists():
            (flat / f.name).symlink_to(f.resolve())
    names = [f.name for f in folders]
    log = out / "log.txt"
    methods = (
        {}
        if args.no_loop
        else {
            "loop": [
                sys.executable,
                __file__,
                "--out",
                str(out),
                "--refine",
                str(args.refine),
                "--loop-child",
                *map(str, folders),
            ]
        }
    )
    for g in ([] if args.no_loop else [1]) + args.groups:
        methods[f"batch G={g}"] = [
            sys.executable, "-m", "oneword.cli", "batch", str(flat), "--out", str(out / f"batch G={g}"),
            "--refine", str(args.refine), "--group", str(g), "--no-progress", "--preview-steps", "0",
        ]  # fmt: skip
    if args.ray_workers:
        g, name = max(args.groups), f"ray G={max(args.groups)} x{args.ray_workers}"
        methods[name] = [
            sys.executable, "-m", "oneword.cli", "batch", str(flat), "--out", str(out / name),
            "--refine", str(args.refine), "--group", str(g), "--no-progress", "--preview-steps", "0",
            "--ray", "--ray-workers", str(args.ray_workers), "--ray-cpus", "1",
        ]  # fmt: skip
    for name, cmd in methods.items():
        if name in done["methods"]:
            continue
        print(f"{name} ...", flush=True)
        seconds, peak_mb, code = _child(cmd, log)
        if code:
            raise SystemExit(f"{name} failed (exit {code}); see {log}")
        done["methods"][name] = {
            "seconds": seconds,
            "peak_mb": peak_mb,
            "per_hour": len(names) / seconds * 3600,
        }
        atomic_write_text(progress_file, json.dumps(done, indent=1) + "\n")
        print(
            f"  {seconds:.0f} s, {done['methods'][name]['per_hour']:.0f} concepts/h, peak {peak_mb:.0f} MB",
            flush=True,
        )

    if "quality" not in done:
        done["quality"] = _score(out, names, list(methods), folders)
        atomic_write_text(progress_file, json.dumps(done, indent=1) + "\n")
    _report(done, names, args, provenance())


def _score(
    out: Path, names: list[str], methods: list[str], folders: list[Path]
) -> dict[str, dict[str, float]]:
    from oneword.data.concepts import load_concept
    from oneword.eval.protocol import PRESETS, Scorer
    from oneword.inversion.embedding_io import add_embeddings
    from oneword.models import load_model
    from oneword.toy.oracle import load_oracle

    model = load_model("toy", device="cpu")
    scorer = Scorer(model, PRESETS["cpu"], None, load_oracle())
    concepts = {f.name: load_concept(f) for f in folders}
    scores: dict[str, dict[str, float]] = {}
    for method in methods:
        scores[method] = {}
        for name, path in _words(out, method, names).items():
            model.clear_placeholders()
            emb = add_embeddings(model, [f"{path}=<bench>"])[0]
            scores[method][name] = scorer.score(emb.token, concepts[name]).as_dict()["recon_oracle"]
        print(f"{method}: recon_oracle {sum(scores[method].values()) / len(names):.3f}", flush=True)
    return scores


def _report(done: dict, names: list[str], args, made_by: dict) -> None:
    from oneword.eval.report import paired_gap

    rows = [
        {"method": m, "steps": 0, "concept": c, "q": q}
        for m, by_concept in done["quality"].items()
        for c, q in by_concept.items()
    ]
    first = next(iter(done["methods"]))  # the baseline: the loop, or the first group
    loop = done["methods"][first]
    table = []
    for m, r in done["methods"].items():
        gap = None if m == first else paired_gap(rows, (m, 0), (first, 0), "q")
        q = done["quality"][m]
        table.append(
            {
                "method": m,
                "seconds": round(r["seconds"], 1),
                "concepts_per_hour": round(r["per_hour"], 1),
                "baseline": first,
                "speedup_vs_baseline": round(r["per_hour"] / loop["per_hour"], 2),
                "peak_mb": round(r["peak_mb"]),
                "recon_oracle": round(sum(q.values()) / len(q), 4),
                "minus_baseline": None if gap is None else {k: round(v, 4) for k, v in gap.items()},
            }
        )
    for t in table:
        gap = t["minus_baseline"]
        paired = "" if gap is None else f"  {gap['gap']:+.3f} [{gap['lo']:+.3f}, {gap['hi']:+.3f}]"
        print(f"{t['method']:>12}: {t['concepts_per_hour']:7.0f}/h  x{t['speedup_vs_baseline']:.2f}  "
              f"{t['peak_mb']:5d} MB  recon_oracle {t['recon_oracle']:.3f}{paired}")  # fmt: skip
    doc = {
        "provenance": made_by,
        "settings": {**done["plan"], "concepts_names": names, "eval": "PRESETS['cpu'], attribute oracle"},
        "table": table,
    }
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(args.json)


if __name__ == "__main__":
    main()
