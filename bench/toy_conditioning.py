"""Does a toy model use each attribute word? Text-state separation and the denoising-loss gap.

For each attribute: the mean distance between the text states of prompts naming each of its values
alone (``text_separation``), and the relative denoising-loss increase when a render is scored with a
prompt naming a wrong value instead of its own, per timestep (``conditioning_gap``; 0 = the word is
ignored). It showed that an earlier toy model ignored pattern words (docs/experiments).

    python bench/toy_conditioning.py                       # the shipped toy model
    python bench/toy_conditioning.py --model runs/x/ldm    # a model from ti toy train --out runs/x
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy", help="toy model: 'toy' or a pipeline folder (default: toy)")
    p.add_argument("--n", type=int, default=48, help="renders per attribute (default: 48)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    args = p.parse_args(argv)

    from oneword.models import load_model
    from oneword.toy.quality import conditioning_gap, text_separation
    from oneword.toy.render import ATTRIBUTES

    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"model: {args.model}")
    print("| attribute | text separation | " + " | ".join(f"gap t={t}" for t in args.timesteps) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.timesteps) + " |")
    for attr in ATTRIBUTES:
        gap = conditioning_gap(model, attr, n=args.n, timesteps=args.timesteps)
        print(
            f"| {attr} | {text_separation(model, attr):.1f} | "
            + " | ".join(f"{gap[t]:+.3f}" for t in args.timesteps)
            + " |",
            flush=True,
        )
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
