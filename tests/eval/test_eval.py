"""Evaluation: metric functions on known inputs, the oracle metrics on renders, the scorer, the
curve harness and its report, curation, and `ti eval` / `ti generate --curate` end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from oneword.cli import main
from oneword.eval.curate import curate
from oneword.eval.curves import Method, parse_variant, run_curve
from oneword.eval.metrics import (
    attribute_share,
    cosine_matrix,
    honoured_share,
    mean_pairwise_similarity,
    mean_similarity,
    paired_similarity,
)
from oneword.eval.protocol import EvalSettings, Scorer, load_concept, without_word
from oneword.eval.report import (
    goal_gaps,
    goal_pairs,
    markdown_table,
    paired_gap,
    row_at,
    select_pairs,
    steps_to_match,
    summarize,
    write_report,
)
from oneword.eval.space import ClipSpace, load_space
from oneword.inversion.config import InversionConfig
from oneword.models import load_model
from oneword.sampling import SampleSettings

TINY_EVAL = ["--samples", "2", "--sample-steps", "2", "--clip", "random"]


def test_identical_features_score_one_and_orthogonal_zero():
    a = torch.randn(5, 16)
    assert mean_similarity(a[:1], a[:1] * 3) == pytest.approx(1.0)
    assert paired_similarity(a, 2 * a) == pytest.approx(1.0)
    eye = torch.eye(4)
    assert mean_similarity(eye[:2], eye[2:]) == pytest.approx(0.0)
    assert mean_pairwise_similarity(eye) == pytest.approx(0.0)
    same = torch.ones(3, 4)
    assert mean_pairwise_similarity(same) == pytest.approx(1.0)
    assert cosine_matrix(eye, eye).diagonal().tolist() == [1.0] * 4


def test_metric_shape_errors():
    with pytest.raises(ValueError):
        cosine_matrix(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        paired_similarity(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError):
        mean_pairwise_similarity(torch.zeros(1, 3))


def test_oracle_metrics_on_renders():
    import random

    from oneword.toy.oracle import load_oracle
    from oneword.toy.render import Concept, render, sample_pose

    concept = Concept("star", "red", "stripes", "black")
    rng = random.Random(0)
    images = [render(concept, bg, sample_pose(rng), size=64) for bg in ("teal", "navy", "gray")]
    preds = load_oracle().predict(images)
    attrs = concept.attributes()
    assert attribute_share(preds, attrs) == 1.0
    assert attribute_share(preds, {**attrs, "fill": "blue"}) == pytest.approx(0.75)
    assert honoured_share(preds, [{"background": b} for b in ("teal", "navy", "gray")]) == 1.0
    assert honoured_share(preds, [{"background": "teal"}] * 3) == pytest.approx(1 / 3)


def test_attribute_edits_contend_with_the_concept_and_score_on_renders():
    import random

    from oneword.eval.protocol import ATTRIBUTE_EDITS, toy_attribute_edits
    from oneword.toy.captions import named_attributes
    from oneword.toy.oracle import load_oracle
    from oneword.toy.render import Concept, render, sample_pose

    oracle, rng = load_oracle(), random.Random(0)
    for concept in (
        Concept("star", "red", "stripes", "black"),
        Concept("heart", "white", "checks", "turquoise"),
    ):
        attrs = concept.attributes()
        edits = toy_attribute_edits(attrs)
        assert len(edits) == ATTRIBUTE_EDITS
        originals = [render(concept, bg, sample_pose(rng), size=64) for bg in ("teal", "navy", "gray")]
        for prompt, want in edits:
            changed = {k: v for k, v in want.items() if attrs[k] != v}
            assert len(changed) == 1 and prompt.count("{}") == 1 and want.keys() == attrs.keys()
            assert named_attributes(prompt.format("")) == changed  # the toy text model reads the edit
            edited = [
                render(Concept(**want), bg, sample_pose(rng), size=64) for bg in ("teal", "navy", "gray")
            ]
            assert honoured_share(oracle.predict(edited), [want] * 3) == 1.0
            assert honoured_share(oracle.predict(originals), [want] * 3) == 0.0  # the word alone fails it


def test_the_human_caption_baseline_is_a_toy_reference_row(tmp_path):
    from oneword.eval.protocol import toy_caption
    from oneword.toy.captions import named_attributes
    from oneword.toy.concepts import write_concepts
    from oneword.toy.oracle import load_oracle

    folders, _ = write_concepts(tmp_path, 1, 3, seed=3, held_out=True)
    concept = load_concept(folders[0])
    caption = toy_caption(concept.attributes)
    assert named_attributes(f"a photo of {caption}") == concept.attributes  # every attribute, in words
    scorer = Scorer(load_model("toy"), EvalSettings(samples=1, steps=2), oracle=load_oracle())
    rows = {r["method"]: r for r in scorer.reference_rows(concept)}
    assert list(rows) == ["initializer word", "real images", "human caption"]
    assert (
        rows["human caption"]["recon_oracle"] is not None
        and rows["human caption"]["attr_edit_oracle"] is not None
    )
    assert rows["real images"]["attr_edit_oracle"] is None


def test_without_word():
    assert without_word("a photo of {} on the beach") == "a photo of on the beach"


def test_scorer_is_deterministic_and_bounded(tiny_dirs, concept_dir):
    model = load_model("tiny-sd1")
    settings = EvalSettings(samples=2, steps=2, edit_prompts=["a photo of {} on the beach", "a sketch of {}"])
    scorer = Scorer(model, settings, load_space("random"))
    concept = load_concept(concept_dir, init="disc")
    a, b = scorer.score("disc", concept), scorer.score("disc", concept)
    assert a == b
    # one sample per pipeline call draws the same images (each has its own seeded generator)
    one = Scorer(model, dataclasses.replace(settings, batch=1), load_space("random")).score("disc", concept)
    assert one.recon_clip == pytest.approx(a.recon_clip, abs=1e-3)
    assert one.edit_clip == pytest.approx(a.edit_clip, abs=1e-3)
    assert -1 <= a.recon_clip <= 1 and -1 <= a.edit_clip <= 1 and a.recon_oracle is None
    real = scorer.real_images(concept)
    assert -1 <= real.recon_clip <= 1 and real.edit_clip is None


def test_parse_variant():
    m = parse_variant("lr 1e-2:base_lr=0.01,num_vectors=2,template=style")
    assert m.name == "lr 1e-2" and m.overrides == {"base_lr": 0.01, "num_vectors": 2, "template": "style"}
    assert parse_variant("plain").overrides == {}
    for bad in (":base_lr=1", "x:nonsense=1", "x:base_lr"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    with pytest.raises(ValueError, match="whole curve"):  # the model is loaded once, at --mixed_precision
        parse_variant("half:mixed_precision=fp16")


@pytest.mark.slow
def test_curve_harness_and_report(tiny_dirs, concept_dir, tmp_path):
    concept = load_concept(concept_dir, init="disc")
    base = InversionConfig(token="<x>", init="disc", batch_size=1, resolution=32, views_per_image=1)
    settings = EvalSettings(samples=2, steps=2, edit_prompts=["a sketch of {}"])
    space = load_space("random")
    methods = [Method("base"), Method("big lr", {"base_lr": 0.05}, budgets=(0, 1, 2)), Method("base again")]
    loads = []
    rows = run_curve(
        lambda: loads.append(1) or load_model("tiny-sd1"),
        [concept],
        base,
        methods,
        [0, 2],
        lambda m: Scorer(m, settings, space),
        progress=False,
    )
    assert [(r["method"], r["steps"]) for r in rows] == [
        ("initializer word", None),
        ("real images", None),
        ("base", 0),
        ("base", 2),
        ("big lr", 0),
        ("big lr", 1),
        ("big lr", 2),
        ("base again", 0),
        ("base again", 2),
    ]
    # one model for all methods, each starting from it as loaded: the same method scores the same
    assert len(loads) == 1
    assert [rows[i]["recon_clip"] for i in (2, 3)] == [rows[i]["recon_clip"] for i in (7, 8)]
    rows = rows[:7]
    assert rows[2]["recon_clip"] == rows[4]["recon_clip"]  # budget 0: both start from the initializer
    assert rows[5]["recon_clip"] != rows[6]["recon_clip"]
    assert rows[3]["recon_clip"] != rows[2]["recon_clip"]  # two steps moved the word
    assert rows[3]["seconds"] > 0
    files = write_report(rows, tmp_path / "report", {"note": "test"})
    doc = json.loads(files["json"].read_text())
    assert len(doc["rows"]) == 7 and doc["settings"] == {"note": "test"}
    table = files["markdown"].read_text()
    assert "| big lr | 2 |" in table and "recon_oracle" not in table
    for key in ("curve", "plane"):
        assert Image.open(files[key]).size[0] > 100


def test_steps_to_match_and_row_at():
    summary = [
        {"method": "s", "steps": 100, "a": 0.5, "b": 0.5},
        {"method": "e", "steps": 0, "a": 0.6, "b": 0.4},
        {"method": "e", "steps": 20, "a": 0.55, "b": 0.52},
        {"method": "e", "steps": 50, "a": 0.7, "b": 0.7},
    ]
    ref = row_at(summary, "s", 100)
    assert steps_to_match(summary, "e", ref, ["a", "b"])["steps"] == 20
    assert steps_to_match(summary, "e", ref, ["a"])["steps"] == 0
    assert steps_to_match(summary, "e", {"a": 0.9, "b": 0.0}, ["a", "b"]) is None
    assert row_at(summary, "s", 7) is None


def _gap_rows(diffs):
    rows = []
    for i, d in enumerate(diffs):
        rows += [
            {"method": "s", "concept": f"c{i}", "steps": 500, "x": 0.5},
            {"method": "e", "concept": f"c{i}", "steps": 0, "x": 0.5 + d},
        ]
    return rows


def test_paired_gap_bootstraps_concepts():
    same = paired_gap(_gap_rows([0.1] * 5), ("e", 0), ("s", 500), "x")
    assert (
        same["gap"] == pytest.approx(0.1)
        and same["lo"] == pytest.approx(0.1)
        and same["hi"] == pytest.approx(0.1)
    )
    assert same["concepts"] == 5
    mixed = paired_gap(_gap_rows([-0.3, 0.2, 0.0, 0.1, -0.1, 0.05]), ("e", 0), ("s", 500), "x")
    assert mixed["gap"] == pytest.approx(-0.05 / 6)
    assert -0.3 < mixed["lo"] < mixed["gap"] < mixed["hi"] < 0.2  # straddles 0: these concepts cannot tell
    assert paired_gap(_gap_rows([0.1]), ("e", 0), ("s", 3000), "x") is None  # budget never measured
    (line,) = goal_gaps(_gap_rows([0.1, 0.2]), [(("e", 0), ("s", 500))], ["x", "missing"])
    assert line.startswith("e @ 0 minus s @ 500 (2 concepts") and "x +0.150 [+0.100, +0.200]" in line
    assert "missing" not in line
    rows = _gap_rows([0.1, 0.2])
    assert goal_pairs(rows, "e", 500) == [(("e", 0), ("scratch", 500))]  # no scratch rows: no goal 2
    for r in rows:
        r["method"] = {"s": "scratch", "e": "e"}[r["method"]]
    assert goal_pairs(rows, "e", 500) == [(("e", 0), ("scratch", 500)), (("e", 0), ("scratch", 500))]
    only_zero = [{**r, "steps": 0} for r in rows]  # scratch at 0 steps is the initializer word
    assert goal_pairs(only_zero, "e", 500) == [(("e", 0), ("scratch", 500))]


def test_select_pairs_compare_the_kept_word_with_always_refining():
    from oneword.eval.curves import SELECT_SUFFIX

    rows = [
        {"method": m, "concept": c, "steps": s}
        for c in ("a", "b")
        for m, s in (
            ("scratch", 500),
            ("e", 0),
            ("e", 200),
            ("e" + SELECT_SUFFIX, 200),
            ("f" + SELECT_SUFFIX, 100),
        )
    ]
    # f was never measured without the selection: nothing to pair it with
    assert select_pairs(rows) == [(("e" + SELECT_SUFFIX, 200), ("e", 200))]
    assert select_pairs([r for r in rows if SELECT_SUFFIX not in r["method"]]) == []


def _select_run(kept_scores):
    """Rows of an encoder run to 200 steps with a round trip that measured 0, 50 and 200."""
    from oneword.eval.curves import SELECT_SUFFIX

    rows = []
    for c, (at0, at50, at200) in kept_scores.items():
        rows += [{"method": "scratch", "concept": c, "steps": 500, "recon_oracle": 0.5}]
        rows += [
            {"method": "e", "concept": c, "steps": b, "seconds": b / 10, "recon_oracle": x}
            for b, x in ((0, at0), (50, at50), (200, at200))
        ]
        # c0's round trip prefers the 50-step word, then the prediction; c1's the 200-step word
        d = (
            {"prediction": 0.2, "refined@50": 0.1, "refined": 0.3}
            if c == "c0"
            else {"prediction": 0.3, "refined@50": 0.2, "refined": 0.1}
        )
        rows.append(
            {
                "method": "e" + SELECT_SUFFIX,
                "concept": c,
                "steps": 200,
                "seconds": 21.5,
                "kept": min(d, key=d.get),
                "distances": d,
                "select_seconds": {"prediction": 0.5, "refined@50": 0.5, "refined": 0.5},
                "recon_oracle": {"c0": at50, "c1": at200}[c],
            }
        )
    return rows


def test_reselect_scores_a_smaller_candidate_set_from_recorded_distances():
    from oneword.encoder.select import candidate_name
    from oneword.eval.curves import SELECT_SUFFIX, reselect

    assert [candidate_name(b, 200) for b in (0, 50, 200)] == ["prediction", "refined@50", "refined"]
    rows = _select_run({"c0": (0.6, 0.7, 0.8), "c1": (0.6, 0.65, 0.9)})
    assert reselect(rows, [0, 50, 200]) == rows  # the set it was measured with: the same choice and row
    two = {r["concept"]: r for r in reselect(rows, [0, 200]) if r["method"] == "e" + SELECT_SUFFIX}
    assert two["c0"]["kept"] == "prediction" and two["c0"]["recon_oracle"] == 0.6  # the 50-step word is out
    assert two["c1"]["kept"] == "refined" and two["c1"]["recon_oracle"] == 0.9
    assert two["c0"]["steps"] == 200 and two["c0"]["seconds"] == 21.0  # 20 s refining + 2 round trips
    short = {r["concept"]: r for r in reselect(rows, [50, 0]) if r["method"] == "e" + SELECT_SUFFIX}
    assert (
        short["c1"]["kept"] == "refined@50" and short["c1"]["steps"] == 50 and short["c1"]["seconds"] == 6.0
    )
    with pytest.raises(ValueError, match="refined@100"):
        reselect(rows, [0, 100])  # never measured
    with pytest.raises(ValueError, match="no round trip"):
        reselect([{**r, "distances": None} for r in rows], [0, 200])  # a run from before --select-among
    with pytest.raises(ValueError, match="no round trip"):
        reselect([{k: v for k, v in r.items() if k != "select_seconds"} for r in rows], [0, 200])
    with pytest.raises(ValueError, match="no round-trip selection rows"):
        reselect([r for r in rows if r["method"] == "e"], [0, 200])


def test_pool_results_pools_disjoint_draws(tmp_path, capsys):
    import runpy

    pool = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "pool_results.py"))["main"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    rows = _gap_rows([0.1, 0.3])
    for r in rows:
        r["recon_oracle"] = r.pop("x")
        r["method"] = {"s": "scratch", "e": "enc"}[r["method"]]
    a.write_text(json.dumps({"rows": rows[:2]}))
    b.write_text(json.dumps({"rows": rows[2:]}))
    assert pool([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "2 concepts from 2 run(s)" in out and "| enc | 0 |" in out
    assert (
        "enc @ 0 minus scratch @ 500 (2 concepts, 95% interval): recon_oracle +0.200 [+0.100, +0.300]" in out
    )
    with pytest.raises(SystemExit):
        pool([str(a), str(a)])  # the same concepts twice would count them twice
    assert "repeats concepts" in capsys.readouterr().err


def test_pool_results_pairs_a_new_encoder_with_saved_runs(tmp_path, capsys):
    import runpy

    pool = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "pool_results.py"))["main"]
    saved, new = tmp_path / "saved.json", tmp_path / "new.json"
    old_rows, new_rows = [], []
    for i, (old, now) in enumerate([(0.4, 0.6), (0.5, 0.6)]):
        c = f"c{i}"
        old_rows += [
            {"method": "scratch", "concept": c, "steps": 500, "recon_oracle": 0.5},
            {"method": "enc", "concept": c, "steps": 0, "recon_oracle": old},
            {"method": "enc", "concept": c, "steps": 200, "recon_oracle": 0.9},
        ]
        new_rows += [{"method": "enc", "concept": c, "steps": 0, "recon_oracle": now}]
    saved.write_text(json.dumps({"settings": {"samples": 8, "sample_steps": 25}, "rows": old_rows}))
    new.write_text(json.dumps({"plan": {"samples": 8, "sample_steps": 25}, "rows": new_rows}))
    assert pool([str(new), "--baseline", str(saved)]) == 0
    out = capsys.readouterr().out
    assert (
        "enc @ 0 minus scratch @ 500 (2 concepts, 95% interval): recon_oracle +0.100 [+0.100, +0.100]" in out
    )
    assert "enc @ 0 minus enc (saved) @ 0 (2 concepts, 95% interval): recon_oracle +0.150" in out
    assert (
        "| enc (saved) | 200 |" in out and "| enc | 200 |" not in out
    )  # saved budgets stay the saved encoder's
    kept = [{"method": "enc", "concept": c, "steps": 200, "recon_oracle": 0.8} for c in ("c0", "c1")]
    kept += [
        {"method": "enc + select", "concept": c, "steps": 200, "recon_oracle": 0.85} for c in ("c0", "c1")
    ]
    new.write_text(json.dumps({"rows": new_rows + kept}))
    assert pool([str(new), "--baseline", str(saved)]) == 0  # the kept word against always refining
    assert (
        "enc + select @ 200 minus enc @ 200 (2 concepts, 95% interval): recon_oracle +0.050"
        in capsys.readouterr().out
    )
    new.write_text(json.dumps({"plan": {"samples": 4, "sample_steps": 25}, "rows": new_rows}))
    with pytest.raises(SystemExit):
        pool([str(new), "--baseline", str(saved)])  # other samples: scores are not comparable
    assert "sampled otherwise" in capsys.readouterr().err
    new.write_text(json.dumps({"rows": new_rows + [{**new_rows[0], "concept": "c9"}]}))
    with pytest.raises(SystemExit):
        pool([str(new), "--baseline", str(saved)])
    assert "lacks concepts" in capsys.readouterr().err
    fresh = tmp_path / "fresh.json"  # a new draw that measured scratch itself pools beside the baseline
    fresh.write_text(
        json.dumps(
            {
                "rows": [
                    {"method": "scratch", "concept": "c9", "steps": 500, "recon_oracle": 0.5},
                    {"method": "enc", "concept": "c9", "steps": 0, "recon_oracle": 0.7},
                ]
            }
        )
    )
    new.write_text(json.dumps({"rows": new_rows}))
    assert pool([str(new), str(fresh), "--baseline", str(saved)]) == 0
    assert "enc @ 0 minus scratch @ 500 (3 concepts" in capsys.readouterr().out


def test_pool_results_select_among(tmp_path, capsys):
    import runpy

    pool = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "pool_results.py"))["main"]
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"rows": _select_run({"c0": (0.6, 0.7, 0.8), "c1": (0.6, 0.65, 0.9)})}))
    assert pool([str(run)]) == 0
    assert (
        "e + select @ 200 minus e @ 200 (2 concepts, 95% interval): recon_oracle -0.050"
        in capsys.readouterr().out
    )
    assert pool([str(run), "--select-among", "0", "200"]) == 0  # c0 keeps its prediction instead
    assert (
        "e + select @ 200 minus e @ 200 (2 concepts, 95% interval): recon_oracle -0.100"
        in capsys.readouterr().out
    )
    with pytest.raises(SystemExit):
        pool([str(run), "--select-among", "0", "100"])
    assert "refined@100" in capsys.readouterr().err


def test_summarize_means_over_concepts():
    rows = [
        {"method": "m", "steps": 5, "seconds": 1.0, "recon_clip": 0.2},
        {"method": "m", "steps": 5, "seconds": 3.0, "recon_clip": 0.4},
    ]
    (s,) = summarize(rows)
    assert s["recon_clip"] == pytest.approx(0.3) and s["seconds"] == 2.0 and s["edit_clip"] is None
    assert "0.300" in markdown_table([s])


def test_curate_keeps_the_closest_candidate(tiny_dirs):
    model = load_model("tiny-sd1")

    def mean_colour(images):
        return torch.stack(
            [
                torch.tensor(im.convert("RGB").resize((1, 1)).getpixel((0, 0)), dtype=torch.float32) - 127.5
                for im in images
            ]
        )

    space = ClipSpace("colour", mean_colour, lambda t: torch.zeros(len(t), 3))
    refs = [Image.new("RGB", (8, 8), (255, 0, 0))]
    settings = SampleSettings(steps=2, seeds=[0, 1])
    picked = curate(model, ["a photo"], settings, 3, space, refs)
    assert len(picked.images) == 2 and picked.seeds[0] in (0, 1, 2) and picked.seeds[1] in (3, 4, 5)
    target = torch.nn.functional.normalize(mean_colour(refs)[0], dim=0)
    from oneword.sampling import generate_images

    for slot in range(2):
        cands = generate_images(
            model, ["a photo"], SampleSettings(steps=2, seeds=[3 * slot + k for k in range(3)])
        )
        sims = torch.nn.functional.normalize(mean_colour(cands), dim=-1) @ target
        assert picked.scores[slot] == pytest.approx(float(sims.max()), abs=1e-5)


@pytest.mark.slow
def test_ti_eval_curve_and_score(tiny_dirs, concept_dir, tmp_path, capsys):
    out = tmp_path / "curve"
    code = main(
        [
            "eval",
            "curve",
            str(concept_dir),
            "--model",
            "tiny-sd1",
            "--init",
            "disc",
            "--budgets",
            "0",
            "1",
            "--variant",
            "a",
            "b:base_lr=0.02",
            "--batch_size",
            "1",
            "--resolution",
            "32",
            "--views_per_image",
            "1",
            "--no-progress",
            *TINY_EVAL,
            "--edit-prompt",
            "a sketch of {}",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| b | 1 |" in printed and "initializer word" in printed
    assert (out / "quality_vs_steps.png").is_file() and (out / "recon_edit_plane.png").is_file()

    run = tmp_path / "run"
    assert (
        main(
            [
                "invert",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                "--token",
                "<red-disc>",
                "--init",
                "disc",
                "--steps",
                "1",
                "--batch_size",
                "1",
                "--resolution",
                "32",
                "--views_per_image",
                "1",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "score",
                str(run / "red-disc.safetensors"),
                "--concept",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                *TINY_EVAL,
                "--edit-prompt",
                "a sketch of {}",
                "--sample-batch",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| red-disc.safetensors | 1 |" in printed and "real images" in printed
    other = tmp_path / "other"  # another run: its files have the same names
    assert (
        main(
            [
                "invert",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                "--token",
                "<blue-box>",
                "--init",
                "box",
                "--steps",
                "1",
                "--batch_size",
                "1",
                "--resolution",
                "32",
                "--views_per_image",
                "1",
                "--no-progress",
                "--out",
                str(other),
            ]
        )
        == 0
    )
    capsys.readouterr()
    pair = [str(run / "learned_embeds.safetensors"), str(other / "learned_embeds.safetensors")]
    assert (
        main(
            [
                "eval",
                "score",
                *pair,
                "--concept",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                *TINY_EVAL,
                "--edit-prompt",
                "a sketch of {}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert all(f"| {p} | 1 |" in printed for p in pair)  # two rows, not one average of both runs


def test_ti_eval_errors(tiny_dirs, concept_dir, capsys):
    assert main(["eval", "curve", str(concept_dir), "--model", "tiny-sd1", *TINY_EVAL]) == 2
    assert "--init" in capsys.readouterr().err  # no concept.json: the initializer must be given
    assert (
        main(
            [
                "eval",
                "curve",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                "--init",
                "disc",
                "--variant",
                "x:bogus=1",
                *TINY_EVAL,
            ]
        )
        == 2
    )
    assert "bogus" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "score",
                str(concept_dir),
                "--concept",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                *TINY_EVAL,
                "--sample-batch",
                "0",
            ]
        )
        == 2
    )
    assert "batch must be at least 1" in capsys.readouterr().err  # one line, before any sampling


@pytest.mark.slow
def test_generate_curate(tiny_dirs, concept_dir, tmp_path):
    png = tmp_path / "curated.png"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-sd1",
                "--embedding",
                str(_embedding(tmp_path)),
                "--prompt",
                "a photo of <e>",
                "-n",
                "2",
                "--steps",
                "2",
                "--curate",
                "3",
                "--reference",
                str(concept_dir),
                "--clip",
                "random",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    meta = Image.open(png).text
    assert meta["curate"] == "3" and len(meta["curated_seeds"].split(",")) == 2
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-sd1",
                "--embedding",
                str(_embedding(tmp_path)),
                "--prompt",
                "a photo of <e>",
                "--curate",
                "2",
                "--out",
                str(png),
            ]
        )
        == 2
    )


def _embedding(tmp_path):
    from oneword.inversion.embedding_io import Embedding, save_single_file

    path = tmp_path / "e.safetensors"
    if not path.exists():
        model = load_model("tiny-sd1")
        save_single_file(Embedding("<e>", model.initializer_vectors("disc", 1)), path)
    return path


def test_amortization_progress_resumes_only_the_same_plan(tmp_path):
    import runpy

    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "amortization.py"))
    load, save, path = bench["load_progress"], bench["save_progress"], tmp_path / "out" / "progress.json"
    plan = {"concepts": ["a", "b"], "methods": [["scratch", [0, 5], {}]]}
    assert load(path, plan) == ([], 0.0)  # a fresh run
    save(path, plan, [{"method": "scratch", "concept": "a", "steps": 5, "recon_oracle": 0.5}], 12.5)
    rows, took = load(
        path, {"concepts": ["a", "b"], "methods": [("scratch", [0, 5], {})]}
    )  # tuples as JSON lists
    assert [r["concept"] for r in rows] == ["a"] and took == 12.5
    with pytest.raises(ValueError, match="other concepts, methods or settings"):
        load(path, {**plan, "concepts": ["a", "c"]})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a progress file"):
        load(path, plan)


def test_amortization_select_among_takes_encoder_budgets(capsys):
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "amortization.py"))["main"]
    for among in (["0", "100"], ["50", "200"]):  # not an encoder budget; no prediction to aim at
        with pytest.raises(SystemExit):
            main(["--encoder-budgets", "0", "50", "200", "--refine-select", "8", "--select-among", *among])
        assert "--select-among takes encoder budgets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--encoder-budgets", "0", "50", "--select-among", "0", "50"])  # nothing would judge them
    assert "needs --refine-select" in capsys.readouterr().err


@pytest.mark.slow
def test_curve_harness_scores_a_selected_word(tiny_dirs, concept_dir):
    from oneword.encoder.select import Choice
    from oneword.eval.curves import SELECT_SUFFIX

    concept = load_concept(concept_dir, init="disc")
    base = InversionConfig(
        token="<x>", init="disc", batch_size=1, resolution=32, views_per_image=1, base_lr=0.05
    )
    settings = EvalSettings(samples=2, steps=2, edit_prompts=["a sketch of {}"])

    seen = {}

    def keep_start(model, concept, token, words):
        seen.update(words)
        model.set_vectors(token, words[0])
        return Choice("prediction", {"prediction": 0.1, "refined": 0.2}, {"prediction": 1.0, "refined": 1.0})

    start = Method(
        "enc", init_fn=lambda m, c: m.initializer_vectors("disc", 1), budgets=(0, 1, 2), select_fn=keep_start
    )
    rows = run_curve(
        lambda: load_model("tiny-sd1"),
        [concept],
        base,
        [Method("scratch", budgets=(0,)), start],
        [0],
        lambda m: Scorer(m, settings, load_space("random")),
        progress=False,
    )
    by = {(r["method"], r["steps"]): r for r in rows}
    chosen = by[("enc" + SELECT_SUFFIX, 2)]
    assert chosen["kept"] == "prediction" and chosen["distances"] == {"prediction": 0.1, "refined": 0.2}
    assert sorted(seen) == [0, 1, 2]  # the word at each budget, copied when it was reached
    assert not torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[1][0], seen[2][0])
    assert chosen["recon_clip"] == by[("enc", 0)]["recon_clip"] != by[("enc", 2)]["recon_clip"]
    assert chosen["seconds"] >= by[("enc", 2)]["seconds"]
    assert ("scratch" + SELECT_SUFFIX, 0) not in by  # no starting word to go back to


@pytest.mark.parametrize(
    "spec, quick", [("ViT-L-14", True), ("ViT-B-32:openai", True), ("ViT-H-14:laion2b_s32b_b79k", False)]
)
def test_openai_clip_towers_are_built_with_quick_gelu(spec, quick, monkeypatch):
    """open_clip 3 builds OpenAI's towers with plain GELU unless asked (it only warns): the encoder's
    and the metrics' features would silently differ from the weights' training."""
    import open_clip

    from oneword.errors import ModelLoadError

    seen = {}

    def record(arch, pretrained=None, **kwargs):
        seen.update(arch=arch, tag=pretrained, **kwargs)
        raise RuntimeError("no download in tests")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", record)
    with pytest.raises(ModelLoadError, match="cannot load CLIP"):
        load_space(spec)
    assert seen["force_quick_gelu"] is quick and seen["arch"] == spec.partition(":")[0]


def test_evaluation_samples_with_ddim_whatever_the_model_uses(tiny_dirs):
    """The paper scores 50 DDIM steps; SD 1.5 ships PNDM and SDXL Euler (as tiny-sdxl does)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from oneword.sampling import SampleSettings, generate_images

    model = load_model("tiny-sdxl")
    assert isinstance(model.pipeline.scheduler, EulerDiscreteScheduler)
    settings = EvalSettings(samples=2, steps=3, batch=2).sampling()
    assert settings.scheduler == "ddim"
    evaluated = generate_images(model, ["a photo"], settings)
    assert isinstance(model.pipeline.scheduler, EulerDiscreteScheduler)  # the model's own again
    own = generate_images(model, ["a photo"], dataclasses.replace(settings, scheduler=None))
    euler = model.pipeline.scheduler
    model.pipeline.scheduler = DDIMScheduler.from_config(euler.config)
    by_hand = generate_images(model, ["a photo"], dataclasses.replace(settings, scheduler=None))
    model.pipeline.scheduler = euler
    assert [im.tobytes() for im in evaluated] == [im.tobytes() for im in by_hand]
    assert [im.tobytes() for im in evaluated] != [im.tobytes() for im in own]
    with pytest.raises(ValueError, match="scheduler"):
        SampleSettings(scheduler="pndm")


def test_safety_checker_blackouts_are_reported(tiny_dirs, monkeypatch, caplog):
    """SD 1.5's safety checker turns flagged samples black; scores made from them drop silently."""
    from types import SimpleNamespace

    from oneword.sampling import SampleSettings, generate_images

    model = load_model("tiny-sd1")

    def checked(self, *args, generator, **kwargs):
        return SimpleNamespace(
            images=[Image.new("RGB", (32, 32))] * len(generator),
            nsfw_content_detected=[True] + [False] * (len(generator) - 1),
        )

    monkeypatch.setattr(type(model.pipeline), "__call__", checked)
    with caplog.at_level("WARNING"):
        images = generate_images(
            model, ["a photo", "a sketch"], SampleSettings(steps=1, seeds=[0, 1, 2], batch=2)
        )
    assert len(images) == 6 and "4 of 6 images were blacked out" in caplog.text


def test_sampling_reports_progress_per_prompt_and_draws_the_same_images(tiny_dirs):
    """`ti eval score` shows a bar that advances as each prompt's samples are drawn; the images
    (and so every saved score) are those drawn without it."""
    from types import SimpleNamespace

    from oneword.sampling import generate_images

    model = load_model("tiny-sd1")
    settings = EvalSettings(
        samples=3, steps=2, batch=2, edit_prompts=["a sketch of {}", "a photo of {} at night"]
    )
    scorer = Scorer(model, settings, load_space("random"))
    ticks = []
    scorer.bar = SimpleNamespace(update=ticks.append)
    prompts = ["a photo of disc", "a sketch of disc", "a photo of disc at night"]
    one_by_one = generate_images(model, prompts, settings.sampling(), scorer._advance)
    together = generate_images(model, prompts, settings.sampling())
    assert [im.tobytes() for im in one_by_one] == [im.tobytes() for im in together] and ticks == [3, 3, 3]
