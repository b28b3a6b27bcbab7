"""The zero-shot initializer's cost against its choices, by rerank setting, on held-out toy concepts.

    python bench/rerank_settings.py                  # draws 0-6 (84 concepts), docs/bench/rerank_settings.json
    python bench/rerank_settings.py --draws 0        # 12 concepts

Each setting is a CLIP shortlist, the rerank's noise draws per shortlisted word, and its
survivors (the words that get the second half of the draws; ``all``: every word gets every draw).
A setting chooses the initializer of every concept once, ``--wave`` concepts per call as the
service's encode waves do (the candidates' text features and prompts cached across calls, as
there), and is timed over the whole set. Right is the share of concepts whose chosen word is their true shape
(concept.json). The settings run in turn in one process, so their seconds compare.
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

SETTINGS = ("8x16", "8x16/3", "8x8", "8x8/3", "8x6/3", "6x8/3", "8x4")
"""``SHORTLISTxDRAWS[/SURVIVORS]``."""


def parse(setting: str) -> tuple[int, int, int | None]:
    """``"8x8/3"`` -> (8, 8, 3); no ``/`` means every word gets every draw."""
    try:
        head, _, tail = setting.partition("/")
        shortlist, draws = (int(x) for x in head.split("x"))
        return shortlist, draws, int(tail) if tail else None
    except ValueError:
        raise SystemExit(
            f"a setting is SHORTLISTxDRAWS[/SURVIVORS], such as 8x8/3; got {setting!r}"
        ) from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, nargs="+", default=list(range(7)), help="12-concept held-out draws")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--wave", type=int, default=8, help="concepts per call (the service's encode wave)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the service uses all cores)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "rerank_settings.json"))
    args = p.parse_args()
    plans = {s: parse(s) for s in args.settings}
    torch.set_num_threads(args.threads)

    from oneword.encoder.autoinit import candidate_words, choose_inits
    from oneword.encoder.model import load_encoder
    from oneword.encoder.pipeline import SHIPPED
    from oneword.fileio import atomic_write_text
    from oneword.models import load_model
    from oneword.provenance import provenance
    from oneword.toy.concepts import load_bench_concepts

    encoder, model = load_encoder(SHIPPED), load_model("toy", device="cpu")
    words = candidate_words(model)
    concepts = [c for d in args.draws for c in load_bench_concepts(12, d)]
    image_sets = [[im.image for im in c.images] for c in concepts]
    truth = [c.attributes["shape"] for c in concepts]
    cache: dict = {}
    choose_inits(encoder.space, model, image_sets[:1], words, cache=cache)  # warm: caches and kernels
    results = []
    print("| setting | right | low confidence | s per concept |")
    print("| --- | --- | --- | --- |")
    for name, (shortlist, draws, survivors) in plans.items():
        t0 = time.perf_counter()
        choices = [
            choice
            for i in range(0, len(image_sets), args.wave)
            for choice in choose_inits(
                encoder.space, model, image_sets[i : i + args.wave], words, shortlist, draws, cache, survivors
            )
        ]
        seconds = (time.perf_counter() - t0) / len(concepts)
        row = {
            "setting": name,
            "shortlist": shortlist,
            "draws": draws,
            "survivors": survivors,
            "right": sum(c.word == t for c, t in zip(choices, truth)),
            "concepts": len(concepts),
            "low_confidence": sum(c.low_confidence for c in choices),
            "seconds_per_concept": seconds,
            "chosen": [c.word for c in choices],
        }
        results.append(row)
        print(
            f"| {name} | {row['right']}/{len(concepts)} | {row['low_confidence']} | {seconds:.3f} |",
            flush=True,
        )
    doc = {
        "bench": "rerank_settings",
        "command": "python bench/rerank_settings.py " + " ".join(sys.argv[1:]),
        "candidates": len(words),
        "threads": args.threads,
        "wave": args.wave,
        "results": results,
        "provenance": provenance(encoder=SHIPPED),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(doc, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
