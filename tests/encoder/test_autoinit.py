"""``--init auto``: the candidate words, the two-stage zero-shot choice, and ti-encode on a plain
folder of photos without an initializer word."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import encoder_file, tiny_encoder

from oneword.encoder.autoinit import (
    AUTO,
    InitChoice,
    candidate_words,
    choose_inits,
    denoising_losses,
    read_vocab,
    rerank_losses,
    resolve_inits,
    single_token_words,
)
from oneword.errors import InputError


def test_read_vocab(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("# animals\ncat\n\ndog  # a comment\ncat\n")
    assert read_vocab(f) == ["cat", "dog"]
    f.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="holds no words"):
        read_vocab(f)
    with pytest.raises(InputError, match="cannot read"):
        read_vocab(tmp_path / "missing.txt")
    f.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(InputError, match="cannot read"):
        read_vocab(f)


def test_candidates_are_single_tokens_of_every_tokenizer(tiny_dirs):
    _, model = tiny_encoder("sdxl")
    words = single_token_words(model, ["dog", "great white shark", "goldfish", "qzxjvkw", "", "cat"])
    assert "great white shark" not in words and "" not in words and "qzxjvkw" not in words
    assert {"dog", "cat"} <= set(words)
    for w in words:
        assert all(len(t(w, add_special_tokens=False).input_ids) == 1 for t in model.tokenizers)
    imagenet = candidate_words(model)  # open_clip's class names, filtered
    assert len(imagenet) > 50 and "great white shark" not in imagenet
    with pytest.raises(InputError, match="at least two candidate words"):
        candidate_words(model, ["great white shark", "dog"])


def test_the_rerank_uses_the_same_draws_for_every_word(tiny_dirs, concept_dir):
    from oneword.data.images import load_folder

    _, model = tiny_encoder("sd1")
    images = [im.image for im in load_folder(concept_dir)]
    a = denoising_losses(model, images, ["dog", "cat", "dog"], draws=6)
    assert a.shape == (3, 6) and torch.isfinite(a).all()
    assert torch.equal(a[0], a[2])  # same word, same draws: same losses
    alone = denoising_losses(model, images, ["cat"], draws=6)[0]  # seeded; another batch size
    torch.testing.assert_close(alone, a[1], rtol=1e-5, atol=1e-6)


def test_survivors_get_the_full_draws_and_the_others_half(tiny_dirs, concept_dir):
    """The halved rerank: every word's first-half losses and each survivor's whole row are the
    full run's; the rest sit out the second half (inf), so they cannot be chosen."""
    from oneword.data.images import load_folder

    _, model = tiny_encoder("sd1")
    images = [im.image for im in load_folder(concept_dir)]
    words = ["dog", "cat", "car", "disc"]
    full = denoising_losses(model, images, words, draws=6)
    cache: dict = {}
    half = denoising_losses(model, images, words, draws=6, survivors=2, cache=cache)
    first = full[:, ::2]
    torch.testing.assert_close(half[:, ::2], first)
    kept = first.mean(1).argsort()[:2].tolist()
    for i in range(4):
        if i in kept:
            torch.testing.assert_close(half[i], full[i])
        else:
            assert torch.isinf(half[i, 1::2]).all()
    again = denoising_losses(model, images, words, draws=6, survivors=2, cache=cache)  # cached text
    torch.testing.assert_close(again, half, rtol=1e-5, atol=1e-6)
    assert len(cache[("rerank_text", id(model))]) == 4
    with pytest.raises(ValueError, match="at least 2 survivors"):
        denoising_losses(model, images, words, draws=6, survivors=1)
    encoder, _ = tiny_encoder("sd1")
    choice = choose_inits(encoder.space, model, [images], words, draws=6, survivors=2)[0]
    assert choice.word in [words[k] for k in kept] and choice.runner_up in [words[k] for k in kept]


def test_concepts_reranked_together_score_as_alone(tiny_dirs, concept_dir):
    """Several concepts share the UNet calls (a small chunk forces calls that mix them), and each
    concept's losses are the ones it gets alone, halved or not."""
    from oneword.data.images import load_folder

    _, model = tiny_encoder("sd1")
    images = [im.image for im in load_folder(concept_dir)]
    sets, lists = [images, images[:2]], [["dog", "cat", "car"], ["car", "disc"]]
    for survivors in (None, 2):
        together = rerank_losses(model, sets, lists, draws=4, chunk=6, survivors=survivors)
        for imgs, words, got in zip(sets, lists, together):
            alone = denoising_losses(model, imgs, words, draws=4, survivors=survivors)
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together[0][2], together[1][0])  # "car" on other images: other losses


def test_resolve_keeps_given_words_and_warns_when_unsure(tiny_dirs, concept_dir, caplog, monkeypatch):
    from oneword.data.images import load_folder
    from oneword.encoder import autoinit

    encoder, model = tiny_encoder("sd1")
    images = [im.image for im in load_folder(concept_dir)]
    with caplog.at_level(logging.WARNING):
        out = resolve_inits(encoder.space, model, [images, images], ["disc", None], ["dog", "cat", "car"])
    assert out[0] == InitChoice("disc", "given")
    auto = out[1]
    assert auto.how == AUTO and auto.word in {"dog", "cat", "car"} and auto.runner_up in {"dog", "cat", "car"}
    assert 0.0 <= auto.win_rate <= 1.0 and 0.0 < auto.clip_probability < 1.0 and auto.candidates == 3
    assert auto.metadata()["oneword.init_how"] == "auto" and "oneword.init_win_rate" in auto.metadata()
    assert ("low-confidence" in caplog.text) == auto.low_confidence
    monkeypatch.setattr(autoinit, "LOW_CONFIDENCE", 1.01)  # every choice is now unsure
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_inits(encoder.space, model, [images], [AUTO], ["dog", "cat"])
    assert "low-confidence" in caplog.text and "pass --init" in caplog.text


@pytest.mark.slow
def test_toy_shapes_are_found_without_asking():
    """Held-out toy concepts (never seen in training): the shape is the initializer the toy world's
    concepts are defined by; CLIP alone finds it for fewer than half (bench/auto_init.py)."""
    from oneword.encoder.model import load_encoder
    from oneword.encoder.pipeline import SHIPPED
    from oneword.models import load_model
    from oneword.toy.concepts import load_bench_concepts

    encoder, model = load_encoder(SHIPPED), load_model("toy", device="cpu")
    concepts = load_bench_concepts(12, 4)[:6]
    choices = choose_inits(
        encoder.space, model, [[im.image for im in c.images] for c in concepts], candidate_words(model)
    )
    assert [c.word for c in choices] == [c.attributes["shape"] for c in concepts]


@pytest.mark.slow
def test_ti_encode_on_a_plain_folder_needs_no_init(tiny_dirs, concept_dir, tmp_path, capsys):
    """The card's usage line, `ti-encode images/ --refine N`, on photos without concept.json."""
    from oneword.cli.encode import main
    from oneword.inversion.embedding_io import load_embedding

    enc = str(encoder_file(tmp_path))
    vocab = tmp_path / "words.txt"
    vocab.write_text("disc\ncar\ndog\ngreat white shark\n")
    out = tmp_path / "o"
    common = [str(concept_dir), "--encoder", enc, "--preview-steps", "0", "--no-progress"]
    assert main([*common, "--refine", "2", "--batch-size", "1", "--resolution", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "initializer" in err and "auto among" in err
    meta = load_embedding(out / "concept" / "learned_embeds.safetensors").metadata
    assert meta["oneword.init_how"] == "auto" and float(meta["oneword.init_win_rate"]) >= 0
    assert "zero-shot" in (out / "concept" / "report.md").read_text()
    assert main([*common, "--init-vocab", str(vocab), "--out", str(tmp_path / "v")]) == 0
    meta = load_embedding(tmp_path / "v" / "concept" / "learned_embeds.safetensors").metadata
    assert meta["oneword.init"] in {"disc", "car", "dog"} and meta["oneword.init_how"] == "auto"
    assert main([*common, "--init", "disc", "--out", str(tmp_path / "g")]) == 0
    meta = load_embedding(tmp_path / "g" / "concept" / "learned_embeds.safetensors").metadata
    assert meta["oneword.init"] == "disc" and meta["oneword.init_how"] == "given"
    vocab.write_text("great white shark\nqzxjvkw\n")
    assert main([*common, "--init-vocab", str(vocab), "--out", str(tmp_path / "bad")]) == 2
    assert "at least two candidate words" in capsys.readouterr().err


def test_a_cache_keeps_the_candidates_text_features_between_waves(tiny_dirs, concept_dir, monkeypatch):
    from oneword.data.images import load_folder
    from oneword.encoder import autoinit

    encoder, model = tiny_encoder("sd1")
    images = [im.image for im in load_folder(concept_dir)]
    calls = []
    real = autoinit.text_features
    monkeypatch.setattr(autoinit, "text_features", lambda *a: calls.append(a) or real(*a))
    cache: dict = {}
    first = resolve_inits(encoder.space, model, [images], [AUTO], ["dog", "cat", "car"], cache=cache)
    again = resolve_inits(encoder.space, model, [images], [AUTO], ["dog", "cat", "car"], cache=cache)
    assert len(calls) == 1 and first == again
    resolve_inits(encoder.space, model, [images], [AUTO], ["dog", "cat", "car"])  # no cache: computed
    assert len(calls) == 2
