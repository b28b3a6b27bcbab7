"""Encoder misses: which attributes of held-out toy concepts the encoder alone gets wrong.

For each held-out concept (the same ones and reference images as ``bench/amortization.py``), the
encoder predicts the word from the references, the toy model draws "a photo of <word>" with the
evaluation's 8 fixed samples, and the attribute oracle reads them back. Prints each concept's
recon_oracle and its wrong attributes (expected -> drawn, times), then the misses per attribute.

    python bench/encoder_misses.py --concepts 24                  # the shipped encoder (~3 min)
    python bench/encoder_misses.py --concepts 24 --encoder runs/round3/runs/encoder/toy/encoder.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", type=int, default=24, help="held-out toy concepts (default: 24)")
    p.add_argument("--encoder", default=None, help="encoder file (default: the shipped toy encoder)")
    p.add_argument(
        "--samples", type=int, default=8, help="samples per concept (default: 8, as the evaluation)"
    )
    args = p.parse_args(argv)

    from oneword.encoder.model import load_encoder, predict_embeddings
    from oneword.encoder.pipeline import SHIPPED
    from oneword.eval.protocol import RECONSTRUCTION_PROMPT, EvalSettings
    from oneword.models import load_model
    from oneword.sampling import generate_images
    from oneword.toy.concepts import load_bench_concepts
    from oneword.toy.oracle import load_oracle

    started = time.perf_counter()
    encoder = load_encoder(Path(args.encoder) if args.encoder else SHIPPED)
    concepts = load_bench_concepts(args.concepts)
    model = load_model("toy")
    oracle = load_oracle()
    sampling = EvalSettings(samples=args.samples, steps=25, guidance=5.0).sampling()
    per_attribute: Counter[str] = Counter()
    scores = []
    for i, concept in enumerate(concepts):
        vectors = predict_embeddings(encoder, model, [[im.image for im in concept.images]], [concept.init])[0]
        token = f"<miss-{i}>"
        model.add_placeholder(token, vectors)
        preds = oracle.predict(generate_images(model, [RECONSTRUCTION_PROMPT.format(token)], sampling))
        wrong = Counter(
            (k, v, pred[k]) for pred in preds for k, v in concept.attributes.items() if pred[k] != v
        )
        for (k, _, _), n in wrong.items():
            per_attribute[k] += n
        score = 1 - sum(wrong.values()) / (len(preds) * len(concept.attributes))
        scores.append(score)
        print(
            f"{concept.name:34s} {score:.3f}  "
            + ", ".join(f"{k} {v}->{w} x{n}" for (k, v, w), n in wrong.most_common()),
            flush=True,
        )
    total = len(concepts) * args.samples
    print(
        f"\nmean recon_oracle {sum(scores) / len(scores):.3f}; missed attributes over {total} images: "
        f"{sum(per_attribute.values())} ("
        + ", ".join(f"{k} {n}" for k, n in per_attribute.most_common())
        + f"); {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
