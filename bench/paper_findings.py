"""The paper's findings reproduced in the toy world: its variants on the reconstruction-editability
plane, each claim a paired difference over held-out concepts with a 95 % bootstrap interval.

Every held-out concept learns all variants (1, 2 and 3 vectors, progressive extension, a 4x
learning rate, regularization toward the initializer, per-image tokens) and the encoder's word and
its refinement as one group; the initializer word, the real images and the human caption are the
reference rows. The findings and their checks are :data:`oneword.eval.findings.paper_findings`.

    python bench/paper_findings.py --shard 0/2 &    # two one-thread processes share 2 cores best
    python bench/paper_findings.py --shard 1/2
    python bench/paper_findings.py --report         # merge the shards, judge, write docs/bench/paper_findings/

``--tone 0.5`` draws the references in shades no caption word names (fill and outline colours half
way to a neighbouring colour, white fills excepted; :func:`oneword.toy.render.toned_rgb`): concepts
with detail beyond the toy vocabulary, as real objects have, each on backgrounds its toned colours
stand out from. Its report goes to docs/bench/paper_findings_toned_contrast/.

Each shard saves its rows after every concept (``progress-<i>of<n>.json`` in ``--out``) with the
provenance of every session that added to it: rerunning a shard measures only what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBLISHED = ROOT / "docs" / "bench" / "paper_findings"
PUBLISHED_TONED = ROOT / "docs" / "bench" / "paper_findings_toned_contrast"


def progress_path(out: Path, shard: int, shards: int) -> Path:
    return out / f"progress-{shard}of{shards}.json"


def load_shard(path: Path, plan: dict) -> dict:
    """The shard's saved document (a fresh one when ``path`` is missing); ValueError when it was
    made with another plan."""
    if not path.is_file():
        return {"plan": plan, "rows": [], "seconds": 0.0, "runs": []}
    try:
        doc = json.loads(path.read_text())
        same = doc["plan"] == json.loads(json.dumps(plan))
        doc["rows"], doc["seconds"], doc["runs"]  # noqa: B018 (the keys must be there)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a progress file of this benchmark ({err})") from None
    if not same:
        raise ValueError(
            f"{path} was made with other concepts or settings; rerun its command or use another --out"
        )
    return doc


def save_shard(path: Path, doc: dict) -> None:
    from oneword.fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        p.error(f"--shard takes I/N with 0 <= I < N, got {args.shard!r}")
    torch.set_num_threads(args.threads)
    concepts, base, methods, encoder_name, plan = plan_of(args, p)
    out = Path(args.out)
    if args.report:
        publish = args.publish or (PUBLISHED_TONED if args.tone else PUBLISHED)
        return report(args, plan, out, Path(publish), encoder_name)

    from oneword.eval.findings import group_rows
    from oneword.eval.protocol import EvalSettings, Scorer
    from oneword.eval.space import load_space
    from oneword.models import load_model
    from oneword.provenance import provenance
    from oneword.toy.oracle import load_oracle

    if encoder_name:
        from oneword.encoder.model import load_encoder, predict_embeddings
        from oneword.encoder.pipeline import REFINE_DEFAULTS, SHIPPED
        from oneword.encoder.select import round_trip_selector, select_settings
        from oneword.eval.curves import Method

        encoder = load_encoder(SHIPPED)

        def predict(model, concept):
            return predict_embeddings(encoder, model, [[im.image for im in concept.images]], [concept.init])[
                0
            ]

        methods.append(
            Method(
                encoder_name,
                {"base_lr": REFINE_DEFAULTS["base_lr"]},
                init_fn=predict,
                budgets=(0, args.refine),
                select_fn=round_trip_selector(encoder, select_settings(8, args.sample_steps, 5.0)),
            )
        )
    if args.only:
        unknown = set(args.only) - {m.name for m in methods}
        if unknown:
            p.error(
                f"--only: no method named {', '.join(sorted(unknown))}; the methods: {[m.name for m in methods]}"
            )
        methods = [m for m in methods if m.name in args.only]
    path = progress_path(out, shard, shards)
    try:
        doc = load_shard(path, plan)
    except ValueError as err:
        p.error(str(err))
    doc["runs"].append(provenance())
    mine = concepts[shard::shards]
    done = {r["concept"] for r in doc["rows"]}
    print(
        f"shard {shard}/{shards}: {len(mine)} concepts, {len(done)} done; {len(methods)} methods",
        file=sys.stderr,
    )
    model = load_model("toy")
    settings = EvalSettings(samples=args.samples, steps=args.sample_steps, guidance=5.0)
    scorer = Scorer(model, settings, load_space("toy"), load_oracle())
    for concept in mine:
        if concept.name in done:
            continue
        t0 = time.perf_counter()
        doc["rows"] += group_rows(model, concept, base, methods, scorer, references=not args.only)
        doc["seconds"] += time.perf_counter() - t0
        save_shard(path, doc)
        print(f"{concept.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", type=int, default=24, help="held-out toy concepts (default: 24)")
    p.add_argument("--draw", type=int, default=0, help="which disjoint set of held-out concepts (default: 0)")
    p.add_argument(
        "--steps", type=int, default=1000, help="optimization steps of every variant (default: 1000)"
    )
    p.add_argument("--refine", type=int, default=200, help="refinement steps after the encoder (ti-encode's)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (default: 8)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the samples (default: 25)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="measure every N-th concept from the I-th")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--out", default="runs/bench/paper-findings", help="folder of the shards' progress files")
    p.add_argument(
        "--report", action="store_true", help="merge the shards in --out, judge and write --publish"
    )
    p.add_argument(
        "--tone",
        type=float,
        default=0.0,
        help="draw the references' fill and outline colours this far (0 to 0.5) toward a neighbouring "
        "colour, in shades no caption names (default: 0, the vocabulary's own)",
    )
    p.add_argument(
        "--publish",
        default=None,
        help="where --report writes (default: docs/bench/paper_findings, or "
        "docs/bench/paper_findings_toned_contrast with --tone)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="measure only these methods, without the reference rows (e.g. to measure one again)",
    )
    p.add_argument(
        "--also",
        nargs="+",
        default=[],
        metavar="DIR",
        help="with --report: folders of --only runs of the same concepts and settings; their rows "
        "replace the same methods' rows in --out",
    )
    return p


def plan_of(args, p: argparse.ArgumentParser):
    """The concepts, base settings, variants, encoder method's name and the plan (what a shard's
    progress file must match) of these arguments."""
    from oneword.encoder.pipeline import SHIPPED
    from oneword.fileio import sha256_file
    from oneword.inversion.config import InversionConfig
    from oneword.toy.concepts import load_bench_concepts

    try:
        concepts = load_bench_concepts(args.concepts, args.draw, args.tone)
    except ValueError as err:
        p.error(str(err))
    base = InversionConfig(template="toy", batch_size=4, views_per_image=8, steps=args.steps)
    from oneword.eval.findings import paper_methods

    methods = paper_methods(args.steps, base.base_lr)
    encoder_name = "encoder + refinement" if SHIPPED.is_file() else None
    plan = {
        "concepts": [c.name for c in concepts],
        "draw": args.draw,
        "steps": args.steps,
        "refine": args.refine,
        "samples": args.samples,
        "sample_steps": args.sample_steps,
        "methods": [[m.name, m.overrides] for m in methods],
        "encoder": sha256_file(SHIPPED) if encoder_name else None,
    }
    if args.tone:  # absent at 0, so that progress files made before the option still match
        plan["tone"] = args.tone
        # toned references keep to backgrounds their toned colours stand out from; the key keeps
        # progress files drawn on other backgrounds from matching this plan
        plan["backgrounds"] = "toned contrast"
    if args.only:
        plan["only"] = sorted(args.only)
    return concepts, base, methods, encoder_name, plan


def report(args, plan: dict, out: Path, publish: Path, encoder_name: str | None) -> int:
    from oneword.eval.findings import EDITS, PLANES, findings_markdown, judge, paper_findings
    from oneword.eval.report import write_report
    from oneword.fileio import atomic_write_text
    from oneword.provenance import provenance

    docs = []
    for path in sorted(out.glob("progress-*of*.json")):
        try:
            docs.append(load_shard(path, plan))
        except ValueError as err:
            print(f"skipping {path}: {err}", file=sys.stderr)
    rows = [r for d in docs for r in d["rows"]]
    for folder in map(Path, args.also):  # --only runs: their rows replace the same methods' rows
        for path in sorted(folder.glob("progress-*of*.json")):
            doc = json.loads(path.read_text())
            if {k: v for k, v in doc.get("plan", {}).items() if k != "only"} != json.loads(json.dumps(plan)):
                print(f"skipping {path}: made with other concepts or settings", file=sys.stderr)
                continue
            again = {(r["method"], r["concept"], r["steps"]) for r in doc["rows"]}
            rows = [r for r in rows if (r["method"], r["concept"], r["steps"]) not in again] + doc["rows"]
            docs.append(doc)
    if not rows:
        print(f"no rows for this plan in {out}: run the shards first", file=sys.stderr)
        return 1
    measured = sorted({r["concept"] for r in rows})
    settings = {**plan, "measured": measured, "seconds": round(sum(d["seconds"] for d in docs), 1)}
    made_by = provenance()
    made_by["measured_by"] = [run for d in docs for run in d["runs"]]
    files = write_report(rows, publish, settings, made_by, pairs=PLANES, curve=False)
    judged = {
        edit: judge(rows, paper_findings(args.steps, encoder_name, args.refine, edit)) for edit in EDITS
    }
    tables = [f"Editability as `{edit}`:\n\n{findings_markdown(found)}" for edit, found in judged.items()]
    atomic_write_text(
        publish / "findings.json", json.dumps({"settings": settings, "findings": judged}, indent=1) + "\n"
    )
    atomic_write_text(publish / "findings.md", "\n".join(tables))
    print(files["markdown"].read_text())
    print("\n".join(tables))
    for edit, found in judged.items():
        shown = sum(f["reproduced"] is True for f in found)
        print(f"editability as {edit}: {shown} of {sum(f['judged'] for f in found)} findings reproduced")
    print(f"{len(measured)} of {len(plan['concepts'])} concepts measured; wrote {publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
