"""Auto-init (``--init auto``) on held-out toy concepts: how often the right shape is chosen, by CLIP
alone and by CLIP + the diffusion rerank, and what the choice costs in the encoder's word.

    python bench/auto_init.py                     # draws 0-6 (84 concepts), docs/bench/auto_init.json
    python bench/auto_init.py --draws 0 --quick   # a minute

The true initializer of a toy concept is its shape (concept.json). Quality is the attribute oracle's
score of the encoder's prediction (no refinement) made from the chosen word against the one made
from the true word, paired per concept: where the two words are the same, the predictions, samples
and scores are identical, so the difference there is exactly 0 and only the other concepts are
sampled.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, nargs="+", default=list(range(7)), help="12-concept held-out draws")
    p.add_argument("--quick", action="store_true", help="fewer oracle samples (smoke run)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "auto_init.json"))
    args = p.parse_args()
    torch.set_num_threads(1)

    from oneword.encoder.autoinit import DRAWS, SHORTLIST, candidate_words, choose_inits, clip_probabilities
    from oneword.encoder.model import load_encoder, predict_embeddings
    from oneword.encoder.pipeline import SHIPPED
    from oneword.eval.protocol import PRESETS, Scorer
    from oneword.eval.report import paired_gap
    from oneword.models import load_model
    from oneword.provenance import provenance
    from oneword.toy.concepts import load_bench_concepts
    from oneword.toy.oracle import load_oracle

    encoder, model = load_encoder(SHIPPED), load_model("toy", device="cpu")
    words = candidate_words(model)
    concepts = [c for d in args.draws for c in load_bench_concepts(12, d)]
    image_sets = [[im.image for im in c.images] for c in concepts]
    truth = [c.attributes["shape"] for c in concepts]
    t0 = time.perf_counter()
    clip_only = [words[int(p.argmax())] for p in clip_probabilities(encoder.space, image_sets, words, "toy")]
    t1 = time.perf_counter()
    choices = choose_inits(encoder.space, model, image_sets, words)
    t2 = time.perf_counter()
    rows = [
        {
            "concept": c.name,
            "true": t,
            "clip": w,
            "chosen": ch.word,
            "win_rate": ch.win_rate,
            "clip_probability": ch.clip_probability,
        }
        for c, t, w, ch in zip(concepts, truth, clip_only, choices)
    ]
    wrong = [i for i, r in enumerate(rows) if r["chosen"] != r["true"]]
    settings = PRESETS["cpu"]
    if args.quick:
        import dataclasses

        settings = dataclasses.replace(settings, samples=2, steps=10)
    diffs = [0.0] * len(concepts)
    if wrong:
        scorer = Scorer(model, settings, None, load_oracle())
        for i in wrong:
            for word, key in ((truth[i], "oracle_true"), (choices[i].word, "oracle_chosen")):
                vectors = predict_embeddings(encoder, model, [image_sets[i]], [word])[0]
                model.clear_placeholders()
                model.add_placeholder("<auto>", vectors)
                rows[i][key] = scorer.score("<auto>", concepts[i]).as_dict()["recon_oracle"]
            diffs[i] = rows[i]["oracle_chosen"] - rows[i]["oracle_true"]
    paired = [
        {"method": m, "steps": 0, "concept": c.name, "d": d if m == "auto" else 0.0}
        for c, d in zip(concepts, diffs)
        for m in ("auto", "true")
    ]
    gap = paired_gap(paired, ("auto", 0), ("true", 0), "d")
    n = len(concepts)
    summary = {
        "concepts": n,
        "candidates": len(words),
        "shortlist": SHORTLIST,
        "draws_per_candidate": DRAWS,
        "clip_only_correct": sum(r["clip"] == r["true"] for r in rows),
        "chosen_correct": n - len(wrong),
        "low_confidence": sum(ch.low_confidence for ch in choices),
        "clip_seconds_per_concept": (t1 - t0) / n,
        "auto_init_seconds_per_concept": (t2 - t1) / n,
        "oracle_chosen_minus_true": {
            "mean": gap["gap"],
            "ci95": [gap["lo"], gap["hi"]],
            "sampled": len(wrong),
        },
        "eval_settings": {"samples": settings.samples, "steps": settings.steps},
    }
    print(json.dumps(summary, indent=1))
    doc = {"provenance": provenance(encoder=SHIPPED), "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
