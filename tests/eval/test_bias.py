"""Bias reduction with a learned word: entropy and KL on known distributions, the balanced and
skewed reference sets (by their concepts and by the oracle), the paired entropy gap, and the study
end to end on the shipped toy model at a tiny budget."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from oneword.eval.bias import (
    BiasSettings,
    balanced_set,
    distribution,
    entropy,
    entropy_gap,
    kl_to_uniform,
    reading,
    reference_set,
    skewed_values,
)
from oneword.toy.render import FILLS, OUTLINES, PATTERNS, VOCAB


def test_entropy_and_kl_on_known_distributions():
    uniform = [1 / 8] * 8
    assert entropy(uniform) == pytest.approx(3.0)
    assert kl_to_uniform(uniform) == pytest.approx(0.0, abs=1e-12)
    one_hot = [0.0] * 7 + [1.0]
    assert entropy(one_hot) == 0.0
    assert kl_to_uniform(one_hot) == pytest.approx(3.0)
    half = [0.5, 0.5, 0.0, 0.0]
    assert entropy(half) == pytest.approx(1.0)
    assert entropy(half, base=math.e) == pytest.approx(math.log(2))
    assert kl_to_uniform(half) == pytest.approx(1.0)
    skew = [0.7, 0.1, 0.1, 0.1]
    assert entropy(skew) + kl_to_uniform(skew) == pytest.approx(2.0)
    assert 0 < entropy(skew) < 2
    for bad in ([], [0.5, 0.4], [1.2, -0.2]):
        with pytest.raises(ValueError):
            entropy(bad)


def test_distribution_counts_in_vocab_order():
    assert distribution(["b", "a", "b", "b"], ["a", "b", "c"]) == [0.25, 0.75, 0.0]
    with pytest.raises(ValueError, match="not one of"):
        distribution(["d"], ["a", "b"])
    with pytest.raises(ValueError):
        distribution([], ["a"])


def test_reading_of_predictions():
    preds = [
        {"shape": "cross", "fill": f, "pattern": "solid", "outline": "gold", "background": "navy"}
        for f in FILLS
    ]
    preds[0] = {**preds[0], "shape": "star"}
    r = reading(preds, "fill", "cross")
    assert r["entropy_bits"] == pytest.approx(3.0)
    assert r["kl_to_uniform_bits"] == pytest.approx(0.0, abs=1e-12)
    assert r["counts"] == {f: 1 for f in FILLS}
    assert r["shape_kept"] == pytest.approx(7 / 8)
    assert r["other_entropy_bits"] == {"pattern": 0.0, "outline": 0.0, "background": 0.0}


def test_balanced_set_is_balanced_over_fills_and_varies_the_rest():
    refs = balanced_set("cross", "fill", per_value=2, seed=3)
    assert len(refs) == 16
    assert Counter(r.concept.fill for r in refs) == {f: 2 for f in FILLS}
    assert {r.concept.shape for r in refs} == {"cross"}
    # the other concept attributes are balanced too, and not all tied to one fill
    assert Counter(r.concept.pattern for r in refs) == {p: 4 for p in PATTERNS}
    assert Counter(r.concept.outline for r in refs) == {o: 4 for o in OUTLINES}
    assert len({r.background for r in refs}) >= 5
    # the same seed gives the same pixels; another seed other poses
    again = balanced_set("cross", "fill", per_value=2, seed=3)
    assert [r.image.tobytes() for r in refs] == [r.image.tobytes() for r in again]
    assert refs[0].image.tobytes() != balanced_set("cross", "fill", per_value=2, seed=4)[0].image.tobytes()


def test_the_oracle_reads_the_balanced_set_as_balanced():
    from oneword.toy.oracle import load_oracle

    refs = balanced_set("cross", "fill", per_value=1, seed=0) + balanced_set("moon", "pattern", 2, seed=1)
    preds = load_oracle().predict([r.image for r in refs])
    fills = [p["fill"] for p in preds[:8]]
    assert fills == [r.concept.fill for r in refs[:8]]
    assert entropy(distribution(fills, FILLS)) == pytest.approx(3.0)
    assert Counter(p["pattern"] for p in preds[8:]) == {p: 2 for p in PATTERNS}
    assert {p["shape"] for p in preds} == {"cross", "moon"}


def test_skewed_set():
    values = skewed_values("fill", 16, "red", 0.75)
    assert Counter(values)["red"] == 12 and len(values) == 16
    assert entropy(distribution(values, FILLS)) < 2.0
    refs = reference_set("heart", "fill", values, seed=0)
    assert [r.concept.fill for r in refs] == values
    with pytest.raises(ValueError):
        skewed_values("fill", 16, "gold", 0.5)
    with pytest.raises(ValueError):
        reference_set("heart", "shape", ["star"])


def test_entropy_gap_and_its_interval():
    same = [FILLS[i % 8] for i in range(64)]
    g = entropy_gap(same, same, FILLS)
    assert g["gap"] == 0.0 and g["lo"] == 0.0 and g["hi"] == 0.0 and g["samples"] == 64
    g = entropy_gap(same, ["red"] * 64, FILLS, resamples=500)
    assert g["gap"] == pytest.approx(3.0)
    # a resample's plug-in entropy is lower than the full sample's, so at the maximum the
    # percentile interval lies just below the estimate (for two alike prompts the shifts cancel)
    assert 2.5 < g["lo"] <= g["hi"] <= g["gap"]
    # half red, half spread: a real but smaller gap, whose interval excludes 0
    mixed = ["red"] * 32 + [FILLS[i % 8] for i in range(32)]
    g = entropy_gap(same, mixed, FILLS, resamples=500)
    assert 0 < g["lo"] < g["gap"] < g["hi"]
    with pytest.raises(ValueError, match="paired"):
        entropy_gap(same, same[:10], FILLS)


def test_settings_validate():
    with pytest.raises(ValueError):
        BiasSettings(attribute="shape")
    with pytest.raises(ValueError):
        BiasSettings(shape="hexagon")
    with pytest.raises(ValueError, match="name the shape"):
        BiasSettings(survey_samples=0)
    with pytest.raises(ValueError):
        BiasSettings(shape="cross", skewed_value="gold")
    assert BiasSettings(shape="cross", attribute="outline", skewed_value="gold").attribute == "outline"


@pytest.mark.slow
def test_study_end_to_end_on_a_tiny_budget():
    from oneword.eval.bias import run_bias_study
    from oneword.models import load_model
    from oneword.toy.oracle import load_oracle

    model = load_model("toy", device="cpu")
    settings = BiasSettings(
        per_value=1, steps=2, samples=4, words=2, survey_samples=2, sample_steps=2, resamples=50
    )
    result = run_bias_study(model, load_oracle(), settings)

    survey = result["survey"]
    assert set(survey) == set(VOCAB["shape"])
    assert result["shape"] == max(survey, key=lambda k: survey[k]["kl_to_uniform_bits"])
    assert all(v["samples"] == 2 for v in survey.values())
    prompts = result["prompts"]
    assert set(prompts) == {"class", "balanced", "skewed", "balanced_from_skewed"}
    assert prompts["class"]["prompt"] == f"a photo of a {result['shape']}"
    assert prompts["balanced"]["prompt"] == f"a photo of a <balanced-{result['shape']}>"
    for r in prompts.values():
        assert r["samples"] == 8  # 2 words x 4 samples, pooled (the class prompt on the same seeds)
        assert sum(r["counts"].values()) == 8
        assert sum(r["distribution"].values()) == pytest.approx(1.0)
        assert 0 <= r["entropy_bits"] <= 3.0
        assert r["entropy_bits"] + r["kl_to_uniform_bits"] == pytest.approx(3.0)
        assert 0 <= r["shape_kept"] <= 1
    assert [w["word"] for w in result["per_word"]] == [0, 1]
    assert set(result["gaps"]) == {"balanced_minus_class", "balanced_from_skewed_minus_skewed"}
    for g in result["gaps"].values():
        assert g["lo"] <= g["hi"] and g["samples"] == 8
    gap = result["gaps"]["balanced_minus_class"]["gap"]
    assert gap == pytest.approx(prompts["balanced"]["entropy_bits"] - prompts["class"]["entropy_bits"])
    assert model.placeholder_tokens == {}  # the learned words are gone from the model again


@pytest.mark.slow
def test_bench_runner_writes_the_results_with_provenance(tmp_path, capsys):
    import json
    import runpy
    from pathlib import Path

    main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "bias.py"))["main"]
    out, plot = tmp_path / "bias.json", tmp_path / "bias.png"
    args = ["--quick", "--shape", "heart", "--survey-samples", "0", "--skewed-share", "0"]
    assert main([*args, "--out", str(out), "--plot", str(plot)]) == 0
    doc = json.loads(out.read_text())
    assert doc["provenance"]["commit"] and "versions" in doc["provenance"]
    assert doc["shape"] == "heart" and doc["survey"] is None
    assert set(doc["prompts"]) == {"class", "balanced"}
    assert set(doc["gaps"]) == {"balanced_minus_class"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| `a photo of a heart` |" in printed and "entropy balanced - class:" in printed
