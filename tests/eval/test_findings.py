"""The paper-findings harness: variants learned as one group score as the curve harness's words, and
each claim is judged by its paired interval."""

from __future__ import annotations

import pytest
import torch

from oneword.data.concepts import load_concept
from oneword.encoder.select import Choice
from oneword.eval.curves import SELECT_SUFFIX, Method, run_curve
from oneword.eval.findings import (
    EDITS,
    Check,
    Finding,
    findings_markdown,
    group_rows,
    judge,
    paper_findings,
    paper_methods,
)
from oneword.eval.protocol import EvalSettings, Scorer
from oneword.eval.space import load_space
from oneword.inversion.config import InversionConfig
from oneword.models import load_model


def _rows(gaps: dict[str, float], concepts: int = 6) -> list[dict]:
    """Rows where method ``m`` scores ``0.5 + gaps[m]`` (plus a per-concept offset shared by all
    methods, and a little noise) on recon_clip."""
    rows = []
    for c in range(concepts):
        for m, gap in gaps.items():
            noise = 0.001 * ((c * 7 + len(m)) % 3 - 1)
            rows.append(
                {"method": m, "concept": f"c{c}", "steps": 10, "recon_clip": 0.5 + 0.1 * c + gap + noise}
            )
    return rows


def test_judge_reads_each_claim_from_its_interval():
    rows = _rows({"base": 0.0, "up": 0.05, "same": 0.0})
    findings = [
        Finding("up is above", (Check(("up", 10), ("base", 10), "recon_clip", +1),)),
        Finding("up is below", (Check(("up", 10), ("base", 10), "recon_clip", -1),)),
        Finding("same is above", (Check(("same", 10), ("base", 10), "recon_clip", +1),)),
        Finding("reported only", (Check(("up", 10), ("base", 10), "recon_clip", 0),)),
        Finding("not measured", (Check(("up", 10), ("base", 10), "attr_edit_oracle", -1),)),
        Finding(
            "one check fails, one unmeasured",
            (
                Check(("up", 10), ("base", 10), "recon_clip", -1),
                Check(("up", 10), ("base", 10), "attr_edit_oracle", -1),
            ),
        ),
    ]
    judged = judge(rows, findings, resamples=2000)
    assert [f["reproduced"] for f in judged] == [True, False, False, None, None, False]
    assert [f["judged"] for f in judged] == [True, True, True, False, True, True]
    gap = judged[0]["checks"][0]["gap"]
    assert gap["gap"] == pytest.approx(0.05, abs=0.002) and gap["lo"] > 0.04 and gap["concepts"] == 6
    table = findings_markdown(judged)
    assert "| up is above |" in table and "(want > 0) | yes |" in table
    assert "| reported only |" in table and "| reported |" in table and "not measured" in table


def test_the_paper_findings_name_the_variants_measured():
    names = {m.name for m in paper_methods(300, 5e-3)}
    points = {
        p for f in paper_findings(300, "enc", 20) for c in f.checks for p in (c.a, c.b) if p[1] is not None
    }
    refs = {p[0] for f in paper_findings(300) for c in f.checks for p in (c.a, c.b) if p[1] is None}
    assert {m for m, _ in points} - {"enc", "enc" + SELECT_SUFFIX} <= names
    assert {s for _, s in points} == {0, 20, 300}
    assert refs == {"initializer word", "real images", "human caption"}
    assert len(paper_findings(300)) >= 7
    for edit in EDITS:  # editability read either way; reconstruction always as the paper's CLIP score
        metrics = {c.metric for f in paper_findings(300, edit=edit) for c in f.checks}
        assert metrics == {"recon_clip", "recon_oracle", edit}


@pytest.mark.slow
def test_group_rows_score_the_words_the_curve_harness_learns(tiny_dirs, concept_dir):
    concept = load_concept(concept_dir, init="disc")
    base = InversionConfig(
        token="<x>", init="disc", steps=3, batch_size=1, resolution=32, views_per_image=1, base_lr=0.05
    )
    settings = EvalSettings(samples=2, steps=2, edit_prompts=["a sketch of {}"])
    seen = {}

    def keep_refined(model, concept, token, words):
        seen.update(words)
        return Choice("refined", {"prediction": 0.3, "refined": 0.2}, {"prediction": 1.0, "refined": 1.0})

    methods = [
        Method("one", budgets=(0, 3)),
        Method("two", {"num_vectors": 2, "seed": 4}),
        Method(
            "enc",
            init_fn=lambda m, c: m.initializer_vectors("bar", 1),
            budgets=(0, 2),
            select_fn=keep_refined,
        ),
    ]
    model = load_model("tiny-sd1")
    rows = group_rows(
        model, concept, base, methods, Scorer(model, settings, load_space("random")), progress=False
    )
    by = {(r["method"], r["steps"]): r for r in rows}
    assert set(by) == {
        ("initializer word", None),
        ("real images", None),
        ("one", 0),
        ("one", 3),
        ("two", 3),
        ("enc", 0),
        ("enc", 2),
        ("enc" + SELECT_SUFFIX, 2),
    }
    assert sorted(seen) == [0, 2] and not torch.equal(seen[0][0], seen[2][0])
    kept = by[("enc" + SELECT_SUFFIX, 2)]
    assert kept["kept"] == "refined" and kept["recon_clip"] == by[("enc", 2)]["recon_clip"]
    assert kept["select_seconds"] == {"prediction": 1.0, "refined": 1.0} and kept["seconds"] >= 2.0
    assert 0 < by[("one", 0)]["seconds"] < by[("one", 3)]["seconds"]  # its setup, then its share of steps
    assert by[("one", 0)]["recon_clip"] != by[("one", 3)]["recon_clip"]
    assert not model.placeholder_tokens  # the model is left as loaded
    # the curve harness, one method at a time, learns the same words: the same scores
    alone = run_curve(
        lambda: load_model("tiny-sd1"),
        [concept],
        base,
        methods[:2],
        [3],
        lambda m: Scorer(m, settings, load_space("random")),
        progress=False,
    )
    for r in alone:
        if r["steps"] is not None:
            assert r["recon_clip"] == pytest.approx(by[(r["method"], r["steps"])]["recon_clip"], abs=1e-4)


def test_group_rows_leave_the_model_clean_when_scoring_fails(tiny_dirs, concept_dir):
    concept = load_concept(concept_dir, init="disc")
    base = InversionConfig(token="<x>", init="disc", steps=1, batch_size=1, resolution=32, views_per_image=1)
    model = load_model("tiny-sd1")
    scorer = Scorer(
        model, EvalSettings(samples=1, steps=1, edit_prompts=["a sketch of {}"]), load_space("random")
    )
    scorer.reference_rows = lambda c: []

    def broken(token, concept):
        raise RuntimeError("scoring failed")

    scorer.score = broken
    with pytest.raises(RuntimeError, match="scoring failed"):
        group_rows(model, concept, base, [Method("one")], scorer, progress=False)
    assert not model.placeholder_tokens


def test_paper_findings_report_takes_rows_measured_again(tmp_path):
    """`--report --also DIR`: an `--only` run's rows replace the same methods' rows of the main run."""
    import json
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "paper_findings.py"))
    main_dir, again_dir, publish = tmp_path / "main", tmp_path / "again", tmp_path / "pub"
    argv = ["--steps", "9", "--publish", str(publish), "--report"]
    p = bench["parser"]()
    plan = bench["plan_of"](p.parse_args(argv), p)[-1]
    names = plan["concepts"][:3]

    def rows(method, value):
        return [{"method": method, "concept": c, "steps": 9, "recon_clip": value} for c in names]

    assert bench["main"]([*argv, "--out", str(main_dir)]) == 1  # nothing measured yet
    base = [*rows("1 vector", 0.5), *rows("progressive 3 vectors", 0.1)]
    bench["save_shard"](
        main_dir / "progress-0of1.json", {"plan": plan, "rows": base, "seconds": 1.0, "runs": []}
    )
    again = {"plan": {**plan, "only": ["progressive 3 vectors"]}, "rows": rows("progressive 3 vectors", 0.9)}
    bench["save_shard"](again_dir / "progress-0of1.json", {**again, "seconds": 2.0, "runs": []})
    other = {
        "plan": {**plan, "steps": 10},
        "rows": rows("progressive 3 vectors", 0.3),
        "seconds": 4.0,
        "runs": [],
    }
    bench["save_shard"](again_dir / "progress-1of2.json", other)  # other settings: left out
    assert bench["main"]([*argv, "--out", str(main_dir), "--also", str(again_dir)]) == 0
    doc = json.loads((publish / "results.json").read_text())
    progressive = [r["recon_clip"] for r in doc["rows"] if r["method"] == "progressive 3 vectors"]
    assert progressive == [0.9, 0.9, 0.9] and doc["settings"]["seconds"] == 3.0
    assert [r["recon_clip"] for r in doc["rows"] if r["method"] == "1 vector"] == [0.5, 0.5, 0.5]


def test_paper_findings_tone_is_part_of_the_plan_and_publishes_apart(tmp_path):
    """`--tone`: the toned concepts' progress files never mix with the plain ones', and their
    report goes to its own folder unless --publish says otherwise."""
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "paper_findings.py"))
    p = bench["parser"]()
    plain = bench["plan_of"](p.parse_args(["--steps", "9"]), p)[-1]
    toned = bench["plan_of"](p.parse_args(["--steps", "9", "--tone", "0.5"]), p)[-1]
    assert "tone" not in plain and toned == {**plain, "tone": 0.5, "backgrounds": "toned contrast"}
    out = tmp_path / "out"
    rows = [
        {"method": "1 vector", "concept": c, "steps": 9, "recon_clip": 0.5} for c in plain["concepts"][:2]
    ]
    bench["save_shard"](out / "progress-0of1.json", {"plan": plain, "rows": rows, "seconds": 1.0, "runs": []})
    with pytest.raises(ValueError, match="other concepts or settings"):
        bench["load_shard"](out / "progress-0of1.json", toned)
    bench["save_shard"](out / "progress-0of1.json", {"plan": toned, "rows": rows, "seconds": 1.0, "runs": []})
    bench["main"].__globals__["PUBLISHED_TONED"] = tmp_path / "toned"
    assert bench["main"](["--steps", "9", "--tone", "0.5", "--report", "--out", str(out)]) == 0
    assert (tmp_path / "toned" / "findings.json").is_file()
