"""Feature probe: which image features carry each toy attribute to concepts never seen in training?

Linear probes (multinomial logistic regression, features standardized on the training set) are fit
on single renders of training-split toy concepts and scored on renders of the held-out split
(new combinations of known attribute values), for each feature set the encoder can read: the toy
CLIP embedding and the toy model's UNet features in each layout
(:mod:`oneword.encoder.unet_features`). A feature set that reads an attribute well on the held-out
split gives the encoder a chance to get it right on new concepts.

    python bench/feature_probe.py            # 600 training concepts x 2 renders, 102 held out x 4 (1 min)
    python bench/feature_probe.py --map-head 400   # also a trained MapHead on the finest UNet map (+ ~10 min)

The last row (``--map-head STEPS``) is not linear: the encoder's own convolutional head
(:class:`oneword.encoder.model.MapHead`) with a linear classifier on top, trained for STEPS AdamW
steps (batch 64) on the finest map of the ``multiscale`` layout (the 2x view's first UNet map), as
the encoder's ``model.unet_map`` reads it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int, l2: float = 1e-2
) -> tuple[float, float]:
    """Train and held-out accuracy of an L2-regularized linear classifier fit with L-BFGS."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=200)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = lambda x, y: float(((x @ w + bias).argmax(1) == y).float().mean())  # noqa: E731
        return acc(a, train_y), acc(b, test_y)


def head_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    classes: int,
    steps: int,
    width: int = 64,
) -> tuple[float, float]:
    """Train and held-out accuracy of a MapHead + linear classifier on ``[N, C, H, W]`` maps."""
    from oneword.encoder.model import MapHead

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        MapHead(train_x.shape[1], width, 128), torch.nn.GELU(), torch.nn.Linear(128, classes)
    )
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    for _ in range(steps):
        b = torch.randint(0, len(train_y), (64,))
        loss = F.cross_entropy(net(train_x[b]), train_y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = lambda x, y: float(torch.cat([net(c) for c in x.split(256)]).argmax(1).eq(y).float().mean())  # noqa: E731
        return acc(train_x, train_y), acc(test_x, test_y)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-concepts", type=int, default=600, help="training-split concepts (default: 600)")
    p.add_argument("--train-views", type=int, default=2, help="renders per training concept (default: 2)")
    p.add_argument("--test-views", type=int, default=4, help="renders per held-out concept (default: 4)")
    p.add_argument(
        "--map-head",
        type=int,
        default=0,
        metavar="STEPS",
        help="also train the encoder's MapHead on the finest UNet map for STEPS steps (default: 0, off)",
    )
    args = p.parse_args(argv)
    torch.manual_seed(0)

    from oneword.encoder.unet_features import LAYOUTS, unet_features, unet_features_and_map
    from oneword.eval.space import load_space
    from oneword.models import load_model
    from oneword.toy.render import CONCEPT_ATTRIBUTES, render_concept_images, split_concepts

    started = time.perf_counter()
    model = load_model("toy")
    space = load_space("toy")
    train, test = split_concepts()
    random.Random(0).shuffle(train)
    train = train[: args.train_concepts]

    def renders(concepts, views: int, seed: int):
        images, labels = [], []
        for i, c in enumerate(concepts):
            for im, _ in render_concept_images(c, views, seed=seed + i, size=32):
                images.append(im)
                labels.append(c.attributes())
        return images, labels

    sets = {"train": renders(train, args.train_views, 100), "held-out": renders(test, args.test_views, 5000)}
    feats: dict[str, dict[str, Tensor]] = {}
    maps: dict[str, Tensor] = {}
    for split, (images, _) in sets.items():
        feats[split] = {"toy CLIP": space.images(images).float()}
        for layout in LAYOUTS:
            if args.map_head and layout == "multiscale":  # the head's map comes from the same UNet passes
                feats[split][f"UNet {layout}"], maps[split] = unet_features_and_map(model, images, layout)
            else:
                feats[split][f"UNet {layout}"] = unet_features(model, images, layout)
        for layout in LAYOUTS[1:]:  # what the toy encoders read
            feats[split][f"toy CLIP + UNet {layout}"] = torch.cat(
                [feats[split]["toy CLIP"], feats[split][f"UNet {layout}"]], 1
            )
    print(
        f"{len(train)} training concepts x {args.train_views} renders, {len(test)} held-out x "
        f"{args.test_views}; accuracy on the held-out renders (training fit in brackets)\n"
    )
    print("| features | dims | " + " | ".join(CONCEPT_ATTRIBUTES) + " |")
    print("|---|---|" + "---|" * len(CONCEPT_ATTRIBUTES))
    labels = {split: s[1] for split, s in sets.items()}
    targets = {}  # attribute -> ({split: class index per render}, number of classes)
    for attr in CONCEPT_ATTRIBUTES:
        values = sorted({lab[attr] for lab in labels["train"]})
        index = {v: i for i, v in enumerate(values)}
        targets[attr] = (
            {s: torch.tensor([index[lab[attr]] for lab in labels[s]]) for s in labels},
            len(values),
        )
    for name in feats["train"]:
        cells = []
        for attr in CONCEPT_ATTRIBUTES:
            y, classes = targets[attr]
            fit, held = probe_accuracy(
                feats["train"][name], y["train"], feats["held-out"][name], y["held-out"], classes
            )
            cells.append(f"{held:.2f} ({fit:.2f})")
        print(f"| {name} | {feats['train'][name].shape[1]} | " + " | ".join(cells) + " |", flush=True)
    if args.map_head:
        cells = []
        for attr in CONCEPT_ATTRIBUTES:
            y, classes = targets[attr]
            fit, held = head_accuracy(
                maps["train"], y["train"], maps["held-out"], y["held-out"], classes, args.map_head
            )
            cells.append(f"{held:.2f} ({fit:.2f})")
        shape = "x".join(str(d) for d in maps["train"].shape[1:])
        print(
            f"| trained MapHead, finest UNet map ({args.map_head} steps) | {shape} | "
            + " | ".join(cells)
            + " |",
            flush=True,
        )
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
