"""The round-trip check that keeps the prediction or its refinement (oneword.encoder.select)."""

import json
from pathlib import Path

import pytest
import torch

from oneword.encoder.select import SELECT_SEED, choose_word, relative_distance, select_settings
from oneword.models import load_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "toy" / "purple-triangle-solid-gold"


def test_relative_distance_is_scale_free_and_sums_encoders():
    a, b = [torch.ones(1, 4)], [torch.full((1, 4), 2.0)]
    assert relative_distance(b, b) == 0.0
    assert relative_distance(a, b) == pytest.approx(0.25)  # |1-2|^2 * 4 / (4 * 4)
    assert relative_distance([x * 10 for x in a], [x * 10 for x in b]) == pytest.approx(0.25)
    assert relative_distance(a * 2, b * 2) == pytest.approx(0.5)  # two text encoders (SDXL) add up
    with pytest.raises(ValueError):
        relative_distance(a, b * 2)


def test_select_settings_use_their_own_seeds():
    s = select_settings(3)
    assert s.seeds == [SELECT_SEED, SELECT_SEED + 1, SELECT_SEED + 2] and 0 not in s.seeds
    with pytest.raises(ValueError):
        select_settings(0)


def test_set_vectors_round_trips_and_checks_shapes():
    model = load_model("toy")
    model.add_placeholder("<s>", model.initializer_vectors("triangle", 1))
    new = [torch.randn(1, 128)]
    model.set_vectors("<s>", new)
    assert torch.equal(model.vectors_of("<s>")[0], new[0])
    with pytest.raises(ValueError, match="do not fit"):
        model.set_vectors("<s>", [torch.randn(2, 128)])


@pytest.mark.slow
def test_the_shipped_encoder_prefers_its_prediction_to_the_bare_initializer():
    from oneword.data.concepts import load_concept
    from oneword.encoder.model import load_encoder, predict_embeddings
    from oneword.encoder.pipeline import SHIPPED

    model, encoder = load_model("toy"), load_encoder(SHIPPED)
    concept = load_concept(EXAMPLE)
    prediction = predict_embeddings(encoder, model, [[im.image for im in concept.images]], [concept.init])[0]
    bare = model.initializer_vectors(concept.init, 1)  # "triangle": no colour, fill or pattern
    model.add_placeholder("<s>", bare)
    choice = choose_word(
        encoder,
        model,
        "<s>",
        concept.init,
        prediction,
        {"initializer": bare, "prediction": prediction},
        select_settings(2, steps=10),
    )
    assert choice.kept == "prediction"
    assert choice.distances["prediction"] < choice.distances["initializer"]
    assert torch.equal(model.vectors_of("<s>")[0], prediction[0])  # the kept word is left on the token
    with pytest.raises(ValueError):
        choose_word(encoder, model, "<s>", concept.init, prediction, {}, select_settings(1))


def _small_encode_args(concept_dir, tmp_path) -> list[str]:
    """ti-encode on a tiny encoder, fast: one view per image, no preview."""
    from conftest import encoder_file

    enc = str(encoder_file(tmp_path))
    return [str(concept_dir), "--encoder", enc, "--init", "disc", "--batch-size", "1", "--resolution", "32",
            "--views-per-image", "1", "--preview-steps", "0", "--no-progress", "--base-lr", "0.05"]  # fmt: skip


@pytest.mark.slow
def test_ti_encode_writes_the_kept_prediction(tiny_dirs, concept_dir, tmp_path, monkeypatch):

    import oneword.encoder.select as select
    from oneword.cli.encode import main
    from oneword.inversion.embedding_io import load_embedding

    def keep_prediction(encoder, model, token, init, target, candidates, settings):
        assert set(candidates) == {"prediction", "refined"} and settings.seeds[0] == SELECT_SEED
        model.set_vectors(token, list(candidates["prediction"]))
        return select.Choice("prediction", {"prediction": 0.1, "refined": 0.2})

    monkeypatch.setattr(select, "choose_word", keep_prediction)
    common = _small_encode_args(concept_dir, tmp_path)
    assert main([*common, "--refine", "0", "--out", str(tmp_path / "alone")]) == 0
    assert main([*common, "--refine", "3", "--select", "2", "--out", str(tmp_path / "sel")]) == 0
    alone = load_embedding(tmp_path / "alone" / "concept" / "learned_embeds.safetensors")
    kept = load_embedding(tmp_path / "sel" / "concept" / "learned_embeds.safetensors")
    assert torch.equal(kept.vectors[0], alone.vectors[0]) and kept.metadata["oneword.steps"] == "0"
    assert "kept by --select" in kept.metadata["oneword.refine"]
    assert (tmp_path / "sel" / "concept" / "loss.csv").is_file()  # the refinement's record stays
    assert "kept" in (tmp_path / "sel" / "concept" / "report.md").read_text()


@pytest.mark.slow
def test_ti_encode_can_keep_a_word_from_inside_the_refinement(tiny_dirs, concept_dir, tmp_path, monkeypatch):
    """--select-among 2 with --refine 3: the round trip also judges the word after 2 steps, and when
    it keeps that one the run's word files hold exactly a 2-step refinement's word."""

    import oneword.encoder.select as select
    from oneword.cli.encode import main
    from oneword.inversion.embedding_io import load_embedding

    judged = []

    def keep_middle(encoder, model, token, init, target, candidates, settings):
        judged.append(list(candidates))
        model.set_vectors(token, list(candidates["refined@2"]))
        return select.Choice("refined@2", {n: 0.1 for n in candidates})

    common = _small_encode_args(concept_dir, tmp_path)
    assert main([*common, "--refine", "2", "--select", "0", "--out", str(tmp_path / "two")]) == 0
    assert main([*common, "--refine", "3", "--select", "0", "--out", str(tmp_path / "three")]) == 0
    monkeypatch.setattr(select, "choose_word", keep_middle)
    assert (
        main(
            [
                *common,
                "--refine",
                "3",
                "--select",
                "2",
                "--select-among",
                "3",
                "2",
                "0",
                "2",
                "--out",
                str(tmp_path / "sel"),
            ]
        )
        == 0
    )
    assert judged == [["prediction", "refined@2", "refined"]]  # 0 and --refine are always there, once
    two, three, kept, single = (
        load_embedding(tmp_path / d / "concept" / f)
        for d, f in (
            ("two", "learned_embeds.safetensors"),
            ("three", "learned_embeds.safetensors"),
            ("sel", "learned_embeds.safetensors"),
            ("sel", "concept.safetensors"),
        )
    )
    assert torch.equal(kept.vectors[0], two.vectors[0]) and not torch.equal(kept.vectors[0], three.vectors[0])
    assert torch.equal(single.vectors[0], two.vectors[0])
    assert (
        kept.metadata["oneword.steps"] == "2"
        and "after 2 steps kept by --select" in kept.metadata["oneword.refine"]
    )
    report = json.loads((tmp_path / "sel" / "concept" / "encode.json").read_text())
    assert report["kept"] == "refined@2" and report["kept word's steps"] == "2"


@pytest.mark.slow
def test_an_interrupted_ti_encode_keeps_its_word_and_stops(
    tiny_dirs, concept_dir, tmp_path, monkeypatch, capsys
):
    from conftest import encoder_file as _encoder_file
    from conftest import make_concept_images

    import oneword.encoder.select as select
    from oneword.cli.encode import main
    from oneword.inversion.embedding_io import load_embedding
    from oneword.inversion.train import Inversion

    step = Inversion.train_step

    def ctrl_c_at_2(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self)

    def no_round_trip(*args, **kwargs):
        raise AssertionError("an interrupted refinement is not judged")

    monkeypatch.setattr(Inversion, "train_step", ctrl_c_at_2)
    monkeypatch.setattr(select, "choose_word", no_round_trip)
    other = make_concept_images(tmp_path / "other", n=2)
    out = tmp_path / "out"
    assert (
        main(
            [
                str(concept_dir),
                str(other),
                "--encoder",
                str(_encoder_file(tmp_path)),
                "--init",
                "disc",
                "--batch_size",
                "1",
                "--resolution",
                "32",
                "--views_per_image",
                "1",
                "--no-progress",
                "--refine",
                "5",
                "--select-among",
                "3",
                "--out",
                str(out),
            ]
        )
        == 130
    )
    assert "interrupted at step 2/5" in capsys.readouterr().err
    word = load_embedding(out / "concept" / "learned_embeds.safetensors")
    report = json.loads((out / "concept" / "encode.json").read_text())
    assert word.metadata["oneword.steps"] == "2" and report["refinement"].startswith("2 steps (interrupted)")
    assert "kept" not in report and not (out / "other").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--refine", "3", "--select-among", "4"],
        ["--refine", "3", "--select-among", "-1"],
        ["--refine", "3", "--select", "0", "--select-among", "2"],
        ["--refine", "0", "--select-among", "0"],
    ],
)
@pytest.mark.slow
def test_ti_encode_select_among_errors(tiny_dirs, concept_dir, tmp_path, extra, capsys):
    from conftest import encoder_file as _encoder_file

    from oneword.cli.encode import main

    out = tmp_path / "out"
    assert (
        main(
            [
                str(concept_dir),
                "--encoder",
                str(_encoder_file(tmp_path)),
                "--init",
                "disc",
                "--no-progress",
                "--out",
                str(out),
                *extra,
            ]
        )
        != 0
    )
    assert "--select-among" in capsys.readouterr().err and not out.exists()
