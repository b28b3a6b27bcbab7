"""Bias reduction with a learned word in the toy world: the fill distribution of a class prompt
against a word learned from a set balanced over fills (oneword/eval/bias.py).

    python bench/bias.py                          # docs/bench/bias.json + bias.png (~9 min, 1 thread)
    python bench/bias.py --quick --out /tmp/b.json --plot ''   # a smoke run (seconds)

It first samples every shape's class prompt ("a photo of a cross") and reads the fills with the
attribute oracle, picks the most skewed shape (unless --shape), and then compares on fresh seeds:
the class prompt, a word learned from a balanced set (init: the shape word), a word learned from a
skewed set (the paper's biased class word, which the toy model lacks) and the balanced set's word
initialised from that skewed word. Entropy and KL to uniform in bits; the intervals are paired
bootstraps over sampling seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def table(result: dict) -> str:
    """The study as a markdown table, then the entropy gaps."""
    attr = result["settings"]["attribute"]
    lines = [
        f"| prompt | {attr} entropy (bits, max {next(iter(result['prompts'].values()))['max_entropy_bits']:.2f}) "
        "| KL to uniform (bits) | least / most drawn | shape kept | samples |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["prompts"].values():
        counts = sorted(r["counts"].items(), key=lambda kv: kv[1])
        lines.append(
            f"| `{r['prompt']}` | {r['entropy_bits']:.3f} | {r['kl_to_uniform_bits']:.3f} | "
            f"{counts[0][0]} {counts[0][1]} / {counts[-1][0]} {counts[-1][1]} | {r['shape_kept']:.2f} | "
            f"{r['samples']} |"
        )
    lines.append("")
    for name, g in result["gaps"].items():
        lines.append(
            f"entropy {name.replace('_minus_', ' - ')}: {g['gap']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] bits"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from oneword.eval.bias import BiasSettings

    d = BiasSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=d.shape, help="class word (default: the survey's most skewed shape)")
    p.add_argument("--attribute", default=d.attribute, choices=("fill", "pattern", "outline"))
    p.add_argument(
        "--per-value", type=int, default=d.per_value, help=f"renders per value (default {d.per_value})"
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"inversion steps per word (default {d.steps})")
    p.add_argument(
        "--words", type=int, default=d.words, help=f"words per arm, own renders and seed ({d.words})"
    )
    p.add_argument(
        "--samples", type=int, default=d.samples, help=f"samples per prompt and word ({d.samples})"
    )
    p.add_argument(
        "--survey-samples", type=int, default=d.survey_samples, help="per shape; 0 skips the survey"
    )
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--skewed-share", type=float, default=d.skewed_share, help="0 drops the skewed arm")
    p.add_argument("--skewed-value", default=d.skewed_value)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: at most 2 steps, 1 word, 4 samples, 2 per shape in the survey",
    )
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "bias.json"))
    p.add_argument(
        "--plot", default=str(ROOT / "docs" / "bench" / "bias.png"), help="bar chart ('' for none)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import logging

    from oneword.eval.bias import run_bias_study
    from oneword.fileio import atomic_write_text
    from oneword.models import load_model
    from oneword.provenance import provenance
    from oneword.toy.oracle import load_oracle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = BiasSettings(
        shape=args.shape,
        attribute=args.attribute,
        per_value=args.per_value,
        steps=min(args.steps, 2) if args.quick else args.steps,
        words=min(args.words, 1) if args.quick else args.words,
        samples=min(args.samples, 4) if args.quick else args.samples,
        survey_samples=min(args.survey_samples, 2) if args.quick else args.survey_samples,
        sample_steps=min(args.sample_steps, 2) if args.quick else args.sample_steps,
        guidance=args.guidance,
        skewed_share=args.skewed_share,
        skewed_value=args.skewed_value,
        seed=args.seed,
    )
    result = run_bias_study(load_model("toy", device="cpu"), load_oracle(), settings)
    print(table(result))
    print(f"({result['seconds']['total']:.0f} s)")
    doc = {"provenance": provenance(), **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    print(out)
    if args.plot:
        print(plot_distributions(result, Path(args.plot)))
    return 0


def plot_distributions(result: dict, path: Path) -> Path:
    """Bars of the studied attribute's distribution under each prompt of ``result``, with the
    uniform share as a line."""
    import matplotlib

    from oneword.fileio import atomic_path
    from oneword.toy.render import VOCAB

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attr = result["settings"]["attribute"]
    vocab, labels = VOCAB[attr], list(result["prompts"])
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        r = result["prompts"][label]
        ax.bar(
            [i + (j - (len(labels) - 1) / 2) * width for i in range(len(vocab))],
            [r["distribution"][v] for v in vocab],
            width,
            label=f"{r['prompt']} (H {r['entropy_bits']:.2f} bits)",
        )
    ax.axhline(1 / len(vocab), color="gray", linestyle=":", label="uniform")
    ax.set_xticks(range(len(vocab)), vocab)
    ax.set_ylabel(f"share of samples ({attr}, by the oracle)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
