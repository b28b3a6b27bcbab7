"""Quality versus optimization budget: the harness behind ``ti eval curve`` and ``make bench``.

For every method (a setting of the inversion, or later an encoder that supplies the starting
vectors) and every concept, one inversion runs to the largest budget and is scored each time it
passes a budget (0 = the starting vectors). Beside them the harness scores two reference points per
concept: the initializer word alone and the real images against each other (the paper's upper line).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from oneword.data.concepts import ConceptRef
from oneword.eval.protocol import Scorer
from oneword.inversion.config import InversionConfig
from oneword.inversion.train import Inversion
from oneword.models import FrozenLDM

if TYPE_CHECKING:
    from oneword.eval.choice import Choice

logger = logging.getLogger(__name__)

#: What the paper-scale curve scores (the issue's budgets).
DEFAULT_BUDGETS: tuple[int, ...] = (0, 50, 100, 200, 500, 1000, 2000, 3000)

InitFn = Callable[[FrozenLDM, ConceptRef], list[torch.Tensor]]
SelectFn = Callable[[FrozenLDM, ConceptRef, str, dict[int, list[torch.Tensor]]], "Choice"]
"""``(model, concept, token, {budget: vectors}) -> Choice``: given the word at each of the method's
budgets (0: the starting vectors, e.g. the encoder's prediction), leaves the chosen vectors on
``token`` and says which it kept and every candidate's round-trip distance and seconds."""

#: Appended to a method's name for its rows after a ``select_fn``.
SELECT_SUFFIX = " + select"


def reselect(rows: Sequence[dict], among: Sequence[int]) -> list[dict]:
    """``rows`` with every select row chosen again among the words at budgets ``among`` only, from
    the round-trip distances the row recorded (each candidate's round trip is independent of the
    others, so the choice is the one a run among ``among`` would make). The new row copies the
    kept budget's scores (the same word and seeds score the same), sits at ``max(among)`` steps, and
    its seconds are the refinement's to ``max(among)`` plus those candidates' round trips. With a
    constant learning rate the word at 50 steps of a 200-step run is a 50-step refinement's word;
    with a cosine schedule it is not (the curve's own rows share that caveat)."""
    from oneword.eval.choice import candidate_name

    among = sorted(set(among))
    if not among or among[0] < 0:
        raise ValueError("--select-among needs non-negative budgets")
    at = {(r["method"], r["concept"], r["steps"]): r for r in rows}
    if not any(r["method"].endswith(SELECT_SUFFIX) for r in rows):
        raise ValueError(
            "no round-trip selection rows to choose again (bench/amortization.py --refine-select)"
        )
    out = []
    for r in rows:
        base = r["method"].removesuffix(SELECT_SUFFIX)
        if base == r["method"]:
            out.append(r)
            continue
        names = {candidate_name(b, r["steps"]): b for b in among}
        measured = set(r.get("distances") or {}) & set(r.get("select_seconds") or {})
        missing = [n for n in names if n not in measured or (base, r["concept"], names[n]) not in at]
        if missing:
            raise ValueError(
                f"{r['concept']}: {base!r} has no round trip or scores of {', '.join(missing)}; "
                "measure them with bench/amortization.py --select-among"
            )
        kept = min(names, key=r["distances"].__getitem__)
        end = at[(base, r["concept"], among[-1])]
        out.append(
            {
                **at[(base, r["concept"], names[kept])],
                "method": r["method"],
                "steps": among[-1],
                "seconds": round(end["seconds"] + sum(r["select_seconds"][n] for n in names), 3),
                "kept": kept,
                "distances": {n: r["distances"][n] for n in names},
                "select_seconds": {n: r["select_seconds"][n] for n in names},
            }
        )
    return out


@dataclass
class Method:
    """One line of the curve: inversion settings (``InversionConfig`` field overrides) and,
    optionally, a function giving the starting vectors (an encoder); default: the initializer."""

    name: str
    overrides: dict[str, object] = field(default_factory=dict)
    init_fn: InitFn | None = None
    budgets: tuple[int, ...] | None = None
    """This method's own budgets (default: the harness's)."""
    select_fn: SelectFn | None = None
    """Run after the largest budget (methods with an ``init_fn`` only); scored as one more row,
    ``name + SELECT_SUFFIX`` at the largest budget, its seconds including the selection's, with
    the choice's ``kept``, ``distances`` and ``select_seconds`` (see :func:`reselect`)."""


def parse_variant(text: str) -> Method:
    """``"NAME:key=value,key=value"`` -> :class:`Method` (values parsed as int, float or str).

    ``"lr 1e-2:base_lr=0.01"``, ``"2 vectors:num_vectors=2"``, ``"reg:reg_weight=0.01"``.
    """
    name, _, spec = text.partition(":")
    if not name.strip():
        raise ValueError(f"variant {text!r} needs a name before ':'")
    known = {f.name for f in dataclasses.fields(InversionConfig)}
    overrides: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key.strip() not in known:
            raise ValueError(f"variant {text!r}: {item!r} is not key=value with an inversion setting")
        if key.strip() == "mixed_precision":  # the curve loads the model once, at --mixed_precision
            raise ValueError(
                f"variant {text!r}: mixed_precision is the whole curve's (--mixed-precision), not a variant's"
            )
        value: object = raw.strip()
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        overrides[key.strip()] = value
    return Method(name.strip(), overrides)


def run_curve(
    load_model: Callable[[], FrozenLDM],
    concepts: Sequence[ConceptRef],
    base: InversionConfig,
    methods: Sequence[Method],
    budgets: Sequence[int],
    make_scorer: Callable[[FrozenLDM], Scorer],
    progress: bool = True,
) -> list[dict]:
    """Rows ``{method, concept, steps, seconds, <scores>}``; reference rows have ``steps=None``
    and ``method`` ``"initializer word"`` or ``"real images"``. ``seconds`` is the optimization
    time to reach the budget (scoring excluded), plus the ``init_fn`` time for encoder methods.
    ``load_model`` is called once: each method starts from that model with its placeholders cleared."""

    def plan(m: Method) -> list[int]:
        steps = sorted({int(b) for b in (m.budgets if m.budgets is not None else budgets)})
        if not steps or steps[0] < 0:
            raise ValueError("budgets must be non-negative step counts")
        return steps

    if not concepts or not methods:
        raise ValueError("need at least one concept and one method")
    plans = [plan(m) for m in methods]
    rows: list[dict] = []
    total = len(concepts) * sum(p[-1] for p in plans)
    bar = tqdm(total=total, disable=not progress, desc="curve", unit="step", dynamic_ncols=True)
    model = load_model()
    scorer = make_scorer(model)
    for i, concept in enumerate(concepts):
        rows += scorer.reference_rows(concept)
        for j, method in enumerate(methods):
            model.clear_placeholders()  # every method starts from the model as loaded
            token = f"<eval-{i}-{j}>"
            cfg = dataclasses.replace(
                base,
                token=token,
                init=concept.init,
                steps=max(1, plans[j][-1]),
                save_every=0,
                preview_every=0,
                **method.overrides,
            )
            t0 = time.perf_counter()
            start = method.init_fn(model, concept) if method.init_fn else None
            inv = Inversion(model, concept.images, cfg, start)
            elapsed = time.perf_counter() - t0
            words: dict[int, list[torch.Tensor]] = {} if start is None else {0: list(start)}
            for budget in plans[j]:
                t0 = time.perf_counter()
                while inv.step < budget:
                    inv.train_step()
                    bar.update(1)
                elapsed += time.perf_counter() - t0
                if method.select_fn is not None and budget:
                    words[budget] = model.vectors_of(token)
                scores = scorer.score(token, concept)
                rows.append(
                    {
                        "method": method.name,
                        "concept": concept.name,
                        "steps": budget,
                        "seconds": round(elapsed, 3),
                        **scores.as_dict(),
                    }
                )
                logger.info("%s %s @%d: %s", method.name, concept.name, budget, scores.as_dict())
            if method.select_fn is not None and start is not None:
                t0 = time.perf_counter()
                choice = method.select_fn(model, concept, token, words)
                elapsed += time.perf_counter() - t0
                rows.append(
                    {
                        "method": method.name + SELECT_SUFFIX,
                        "concept": concept.name,
                        "steps": plans[j][-1],
                        "seconds": round(elapsed, 3),
                        "kept": choice.kept,
                        "distances": choice.distances,
                        "select_seconds": choice.seconds,
                        **scorer.score(token, concept).as_dict(),
                    }
                )
    bar.close()
    return rows
