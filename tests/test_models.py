"""Model loading, family detection, the tokenizer, placeholder surgery and token validation."""

from __future__ import annotations

import json

import pytest
import torch

from oneword.errors import ModelLoadError, TokenError
from oneword.models import load_model, validate_token


def test_tokenizer_matches_open_clip():
    import open_clip

    from oneword.tokenizer import load_clip_tokenizer

    ours = load_clip_tokenizer()
    ref = open_clip.get_tokenizer("ViT-B-32")
    texts = ["a photo of a red star with stripes", "Émile's CAT, painted in 1890!!", "sks <x> ok"]
    for text in texts:
        ids = ours(text).input_ids
        assert ids == ref([text])[0][: len(ids)].tolist()
    assert len(ours) == 49408


@pytest.mark.parametrize(
    ("name", "family", "widths", "prediction"),
    [
        ("tiny-sd1", "sd1", [32], "epsilon"),
        ("tiny-sd2", "sd2", [32], "v_prediction"),
        ("tiny-sdxl", "sdxl", [32, 48], "epsilon"),
    ],
)
@pytest.mark.slow
def test_load_presets_report_family(tiny_dirs, name, family, widths, prediction):
    m = load_model(name)
    assert (m.family, m.widths, m.prediction_type) == (family, widths, prediction)
    assert m.device.type == "cpu" and m.dtype == torch.float32
    assert not any(p.requires_grad for p in m.unet.parameters())
    assert "family=" + family in m.describe()


def test_load_folder_and_family_marker(tiny_dirs, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_dirs["sd1"], copy)
    (copy / "oneword.json").write_text(json.dumps({"family": "toy"}))
    assert load_model(str(copy)).family == "toy"


def test_fp16_weights_keep_fp32_vectors(tiny_dirs):
    m = load_model("tiny-sd1", dtype="fp16")
    assert m.unet.dtype == torch.float16
    m.add_placeholder("<qq-thing>", m.initializer_vectors("dog", 1))
    (vec,) = m.trainable_vectors()
    assert vec.dtype == torch.float32
    assert m.text_encoders[0].dtype == torch.float16  # the wrapper must not change the reported dtype


@pytest.mark.parametrize("bad", ["sd15", "someone/not-cached-model"])
def test_uncached_model_gives_clear_error(bad):
    with pytest.raises(ModelLoadError, match="huggingface-cli download") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a preset"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(str(tmp_path))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(str(ckpt))


def test_token_validation():
    from oneword.tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer()
    validate_token("<my-cat>", tok)
    for bad, why in [
        ("cat", "already a word"),
        ("aintin", "inside the vocabulary"),
        ("my cat", "without spaces"),
        ("", "without spaces"),
    ]:
        with pytest.raises(TokenError, match=why):
            validate_token(bad, tok)
    with pytest.raises(TokenError, match="already in use"):
        validate_token("<a>", tok, existing={"<a>": 1})
    tok.add_tokens(["<my-cat>"])  # the remembered vocabulary follows the tokenizer's growth
    with pytest.raises(TokenError, match="already a word"):
        validate_token("<my-cat>", tok)
    with pytest.raises(TokenError, match="inside the vocabulary entry '<my-cat>'"):
        validate_token("my-ca", tok)


@pytest.mark.slow
def test_placeholder_surgery_multi_vector(tiny_dirs):
    m = load_model("tiny-sdxl")
    vocab_before = [e.get_input_embeddings().weight.clone() for e in m.text_encoders]
    init = m.initializer_vectors("sleeping cat", 3)
    assert [tuple(v.shape) for v in init] == [(3, 32), (3, 48)]
    m.add_placeholder("<kitty>", init)
    assert m.expand_prompt("a <kitty> toy") == "a <kitty> <kitty>_1 <kitty>_2 toy"
    ids = m.tokenizers[0](m.expand_prompt("a <kitty> toy")).input_ids
    assert ids[2:5] == [49408, 49409, 49410]
    for enc, before in zip(m.text_encoders, vocab_before):
        assert enc.get_input_embeddings().base.num_embeddings == 49408
        assert torch.equal(enc.get_input_embeddings().weight, before)
    # The token's own rows read back as given; other words are untouched.
    out = m.text_encoders[0].get_input_embeddings()(torch.tensor([[320, 49408, 49410]]))
    assert torch.equal(out[0, 1], init[0][0]) and torch.equal(out[0, 2], init[0][2])
    assert torch.equal(out[0, 0], vocab_before[0][320])


def test_prompt_expansion_matches_tokens_as_the_tokenizer_does(tiny_dirs):
    """CLIP lower-cases prompts and matches added tokens longest first: expansion does the same, so
    ``<CAT>`` gets all of ``<cat>``'s vectors and ``<cat>`` is not expanded inside ``<cat>-red``."""
    m = load_model("tiny-sd1")
    m.add_placeholder("<cat>", m.initializer_vectors("cat", 2))
    m.add_placeholder("<cat>-red", m.initializer_vectors("red", 1))
    assert m.expand_prompt("a <CAT> by a <cat>-red") == "a <cat> <cat>_1 by a <cat>-red"
    ids = m.tokenizers[0](m.expand_prompt("a <Cat>-Red")).input_ids
    assert ids[2] == m.token_ids("<cat>-red")[0][0] and len(ids) == 4
    assert torch.equal(
        m.encode_text(["a <CAT> toy"]).hidden_states, m.encode_text(["a <cat> toy"]).hidden_states
    )
    with pytest.raises(TokenError, match="already in use"):
        m.add_placeholder("<Cat>", m.initializer_vectors("cat", 1))


@pytest.mark.slow
def test_clear_placeholders_restores_the_loaded_model(tiny_dirs):
    """ti-encode refines one concept after another on one model: clearing leaves no trace of the last."""
    m = load_model("tiny-sdxl")
    fresh = load_model("tiny-sdxl")
    prompt = ["a <b> toy"]
    m.add_placeholder("<a>", m.initializer_vectors("cat", 2))
    m.trainable_vectors()
    m.unet.enable_gradient_checkpointing()  # an inversion setting (--gradient_checkpointing)
    m.clear_placeholders()
    assert not m.unet.is_gradient_checkpointing
    assert m.placeholder_tokens == {} and all(len(t) == 49408 for t in m.tokenizers)
    assert all(e.vectors.shape[0] == 0 and not e.vectors.requires_grad for e in m.placeholder_embeddings())
    assert m.tokenizers[0].tokenize("<a>") != ["<a>"]  # an ordinary string again
    init = fresh.initializer_vectors("dog", 1)
    for model in (m, fresh):
        model.add_placeholder("<b>", init)
    assert m.token_ids("<b>") == fresh.token_ids("<b>") == [[49408], [49408]]
    with torch.no_grad():
        a, b = m.encode_text(prompt), fresh.encode_text(prompt)
    assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.pooled, b.pooled)
    m.add_placeholder("<a>", m.initializer_vectors("cat", 2))  # the cleared name is free again
