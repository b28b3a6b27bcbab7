"""The paper's findings as paired differences: variants of one concept learned as one group, then
scored on the same samples, and each claim judged by its bootstrap interval.

:func:`group_rows` learns every :class:`~oneword.eval.curves.Method` of one concept as a slot of one
:class:`~oneword.inversion.group.GroupEngine` (a slot's word does not depend on its neighbours, so
this is the curve harness's result at a fraction of its cost), keeps each method's word at each of
its budgets, and scores them with a :class:`~oneword.eval.protocol.Scorer`; the rows have
:func:`~oneword.eval.curves.run_curve`'s format, so :mod:`oneword.eval.report` tables and plots them.

:data:`FINDINGS` lists Gal et al.'s claims as checks ``(a, b, metric, sign)``: the mean over
concepts of ``a``'s score minus ``b``'s must have an interval on the side ``sign`` says (``0``:
reported, not judged). :func:`judge` measures them on the rows.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from oneword.eval.choice import candidate_name
from oneword.eval.curves import SELECT_SUFFIX, Method
from oneword.eval.protocol import ConceptRef, Scorer
from oneword.eval.report import format_gap, paired_gap
from oneword.inversion.config import InversionConfig
from oneword.inversion.group import GroupEngine
from oneword.models import FrozenLDM

logger = logging.getLogger(__name__)

#: Reconstruction as the findings read it: CLIP similarity to the reference images (the paper's).
RECON = "recon_clip"
#: Editability, two ways, both on the edits that contend with the concept
#: (:func:`~oneword.eval.protocol.toy_attribute_edits`): the paper's CLIP editability (each sample
#: against its prompt's text), and the oracle's share of samples showing the asked-for value while
#: keeping the rest of the concept (stricter: a word that does not reconstruct fails it too).
EDITS = ("attr_edit_clip", "attr_edit_oracle")
#: The findings' planes: reconstruction against each editability.
PLANES = (
    (RECON, EDITS[0], "CLIP, attribute edits"),
    (RECON, EDITS[1], "oracle, attribute edits"),
)

Point = tuple[str, int | None]
"""A row set: ``(method, steps)``; reference rows have ``steps`` None."""


@dataclass(frozen=True)
class Check:
    a: Point
    b: Point
    metric: str
    sign: int
    """+1: ``a`` above ``b``; -1: below; 0: reported only."""


@dataclass(frozen=True)
class Finding:
    claim: str
    checks: tuple[Check, ...]


def group_rows(
    model: FrozenLDM,
    concept: ConceptRef,
    base: InversionConfig,
    methods: Sequence[Method],
    scorer: Scorer,
    progress: bool = True,
    references: bool = True,
) -> list[dict]:
    """Learn ``methods`` on ``concept`` as one group and score each word at each of its budgets
    (default: ``base.steps``). ``seconds`` is a method's share of the work until its word was
    kept: its ``init_fn`` and its slot's setup (the latent bank), plus, of each group step, the
    share of the step's samples that were its own. The concept's reference rows come first (with
    ``references``); the model is left without placeholders, whatever happens."""
    from tqdm.auto import tqdm

    rows = list(scorer.reference_rows(concept)) if references else []
    model.clear_placeholders()
    bar = tqdm(total=0, disable=not progress, desc=concept.name, unit="step")
    try:
        words, seconds, plans, starts = _learn(model, concept, base, methods, bar)
        for i, method in enumerate(methods):
            rows += _score(model, concept, method, words[i], seconds[i], plans[i], starts[i], scorer, i)
    finally:
        bar.close()
        model.clear_placeholders()
    return rows


def _learn(model, concept, base, methods, bar):
    """Every method's words at its budgets, their seconds, the budgets and the starting words."""
    engine = GroupEngine(model, capacity=len(methods))
    plans, slots, starts, spent = [], [], [], []
    for method in methods:
        plan = sorted({int(b) for b in (method.budgets if method.budgets is not None else (base.steps,))})
        if not plan or plan[0] < 0:
            raise ValueError(f"{method.name}: budgets must be non-negative step counts")
        cfg = dataclasses.replace(
            base, init=concept.init, steps=max(1, plan[-1]), save_every=0, preview_every=0, **method.overrides
        )
        t0 = time.perf_counter()
        start = method.init_fn(model, concept) if method.init_fn else None
        slots.append(engine.add([im.image for im in concept.images], cfg, start=start, name=method.name))
        spent.append(time.perf_counter() - t0)
        starts.append(start)
        plans.append(plan)
    words: list[dict[int, list[torch.Tensor]]] = [{} for _ in methods]
    seconds: list[dict[int, float]] = [{} for _ in methods]
    for i, (sid, plan) in enumerate(zip(slots, plans)):
        if 0 in plan:
            words[i][0], seconds[i][0] = engine.slot(sid).vectors(), spent[i]
    bar.reset(total=max(p[-1] for p in plans))
    while engine.active:
        share = {s.id: s.cfg.batch_size * s.cfg.grad_accum for s in engine.active}
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        bar.update(1)
        for i, sid in enumerate(slots):
            slot = engine.slot(sid)
            if slot.error:
                raise RuntimeError(f"{concept.name}, {methods[i].name}: {slot.error}")
            spent[i] += dt * share.get(sid, 0) / sum(share.values())
            if slot.step in plans[i] and slot.step not in words[i]:
                words[i][slot.step], seconds[i][slot.step] = slot.vectors(), spent[i]
    return words, seconds, plans, starts


def _score(model, concept, method: Method, words, seconds, plan, start, scorer: Scorer, i: int) -> list[dict]:
    """The rows of one method's words, and the word its ``select_fn`` keeps."""
    token = f"<finding-{i}>"
    model.clear_placeholders()
    model.add_placeholder(token, words[plan[-1]])
    rows = []
    for budget in plan:
        model.set_vectors(token, words[budget])
        rows.append(_row(method.name, concept, budget, seconds[budget], scorer.score(token, concept)))
    if method.select_fn is not None and start is not None:
        model.set_vectors(token, words[plan[-1]])
        choice = method.select_fn(model, concept, token, words)
        kept = next(r for r in rows if r["steps"] == _budget(choice.kept, plan))
        rows.append(
            {
                **kept,
                "method": method.name + SELECT_SUFFIX,
                "steps": plan[-1],
                "seconds": round(seconds[plan[-1]] + sum(choice.seconds.values()), 3),
                "kept": choice.kept,
                "distances": choice.distances,
                "select_seconds": choice.seconds,
            }
        )
    return rows


def _budget(kept: str, plan: Sequence[int]) -> int:
    """The budget of a round trip's kept word (the inverse of :func:`candidate_name`)."""
    for budget in plan:
        if candidate_name(budget, plan[-1]) == kept:
            return budget
    raise ValueError(f"the round trip kept {kept!r}, which is none of the budgets {list(plan)}")


def _row(method: str, concept: ConceptRef, steps: int, seconds: float, scores) -> dict:
    return {
        "method": method,
        "concept": concept.name,
        "steps": steps,
        "seconds": round(seconds, 3),
        **scores.as_dict(),
    }


def paper_findings(
    steps: int, encoder: str | None = None, refine: int = 200, edit: str = EDITS[0]
) -> tuple[Finding, ...]:
    """The claims of Gal et al. (2022) this project measures, for variants learned ``steps`` steps
    (named as :func:`paper_methods` names them), with editability read as ``edit`` (one of
    :data:`EDITS`); ``encoder`` adds where the encoder's words lie."""
    EDIT = edit  # noqa: N806 (read as the constant it stands for)
    one = ("1 vector", steps)

    def trade(variant: str, recon_sign: int, edit_sign: int) -> tuple[Check, ...]:
        return (
            Check((variant, steps), one, RECON, recon_sign),
            Check((variant, steps), one, EDIT, edit_sign),
        )

    found = [
        Finding(
            "one word reconstructs the concept, close to the real images",
            (
                Check(one, ("initializer word", None), RECON, +1),
                Check(one, ("initializer word", None), "recon_oracle", +1),
                Check(one, ("real images", None), RECON, 0),
            ),
        ),
        Finding("more vectors: reconstruction up, editability down (2 vectors)", trade("2 vectors", +1, -1)),
        Finding("more vectors: reconstruction up, editability down (3 vectors)", trade("3 vectors", +1, -1)),
        Finding(
            "progressive extension (3 vectors): reconstruction up, editability down",
            trade("progressive 3 vectors", +1, -1),
        ),
        Finding("a higher learning rate moves along the same trade-off", trade("lr x4", +1, -1)),
        Finding(
            "regularization toward the initializer: more editable, less faithful",
            trade("reg to init", -1, +1),
        ),
        Finding(
            "per-image tokens do not beat a single word (they reconstruct worse)",
            (
                Check(("per-image tokens", steps), one, RECON, -1),
                Check(("per-image tokens", steps), one, EDIT, 0),
            ),
        ),
        Finding(
            "the human caption edits well but reconstructs worse than the word",
            (Check(("human caption", None), one, RECON, -1), Check(("human caption", None), one, EDIT, +1)),
        ),
    ]
    if encoder:
        checks = [
            c
            for point in ((encoder, 0), (encoder, refine), (encoder + SELECT_SUFFIX, refine))
            for c in (Check(point, one, RECON, 0), Check(point, one, EDIT, 0))
        ]
        found.append(Finding("where the encoder and its refinement lie on the plane", tuple(checks)))
    return tuple(found)


def paper_methods(steps: int, base_lr: float) -> list[Method]:
    """The variants of :func:`paper_findings`, all from the initializer word, ``steps`` steps each."""
    return [
        Method("1 vector"),
        Method("2 vectors", {"num_vectors": 2}),
        Method("3 vectors", {"num_vectors": 3}),
        Method("progressive 3 vectors", {"num_vectors": 3, "progressive_every": max(1, steps // 3)}),
        Method("lr x4", {"base_lr": 4 * base_lr}),
        Method("reg to init", {"reg_weight": REG_WEIGHT}),
        Method("per-image tokens", {"per_image_tokens": True}),
    ]


#: The regularizer's weight in "reg to init": a toy word's squared distance to its initializer reaches
#: about 10 in 300 steps while the loss is about 0.03, so 2e-3 weighs the pull like the loss.
REG_WEIGHT = 2e-3


def judge(rows: Sequence[dict], findings: Sequence[Finding], resamples: int = 10_000) -> list[dict]:
    """Each finding with its checks' paired gaps; ``reproduced`` when every judged check's interval
    lies on its side of zero; False when one does not; None when a judged check has no paired rows
    (and none failed), or none is judged (``judged`` False)."""
    out = []
    for finding in findings:
        checks, verdicts = [], []
        for c in finding.checks:
            gap = paired_gap(rows, c.a, c.b, c.metric, resamples=resamples)
            holds = None
            if gap is not None and c.sign:
                holds = gap["lo"] > 0 if c.sign > 0 else gap["hi"] < 0
            if c.sign:
                verdicts.append(holds)
            checks.append(
                {
                    "a": list(c.a),
                    "b": list(c.b),
                    "metric": c.metric,
                    "sign": c.sign,
                    "gap": gap,
                    "holds": holds,
                }
            )
        reproduced = False if False in verdicts else None if not verdicts or None in verdicts else True
        out.append(
            {"claim": finding.claim, "judged": bool(verdicts), "reproduced": reproduced, "checks": checks}
        )
    return out


def findings_markdown(judged: Sequence[dict]) -> str:
    """A table: claim, each check as ``a - b: metric gap [lo, hi]`` with the side it should be on."""
    lines = ["| finding | measured (paired, 95 % interval) | reproduced |", "|---|---|---|"]
    for f in judged:
        parts = []
        for c in f["checks"]:
            want = {1: " (want > 0)", -1: " (want < 0)", 0: ""}[c["sign"]]
            gap = format_gap(c["gap"], c["metric"]) if c["gap"] else f"{c['metric']} not measured"
            parts.append(f"{_point(c['a'])} − {_point(c['b'])}: {gap}{want}")
        verdict = (
            {True: "yes", False: "no", None: "not measured"}[f["reproduced"]] if f["judged"] else "reported"
        )

        lines.append(f"| {f['claim']} | {'<br>'.join(parts)} | {verdict} |")
    return "\n".join(lines) + "\n"


def _point(point: Sequence) -> str:
    method, steps = point
    return method if steps is None else f"{method} @ {steps}"
