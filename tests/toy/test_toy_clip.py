"""Tests of the toy CLIP (tiny configs only; the real one is never trained here)."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open

from oneword.errors import InputError
from oneword.tokenizer import build_vocab_and_merges
from oneword.toy import clip
from oneword.toy.captions import caption
from oneword.toy.render import all_concepts, render, sample_pose

TINY = clip.ToyCLIPConfig(
    image_size=16, embed_dim=16, vision_width=32, vision_layers=1, text_width=32, text_layers=1
)
TEXTS = ["a photo of a red star", "a thing with dots on a teal background", "a striped moon"]


def _images(n: int = 3, size: int = 24):
    rng = random.Random(1)
    return [render(c, "gray", sample_pose(rng), size=size) for c in all_concepts()[:n]]


def _train(tmp_path, name="clip.safetensors", **kw):
    kw = {"steps": 3, "batch_size": 4, "cfg": TINY, "progress": False, **kw}
    return clip.train_toy_clip(tmp_path / name, **kw)


def test_config_and_open_clip_cfg():
    d = clip.ToyCLIPConfig().to_open_clip_cfg()
    assert d["embed_dim"] == 128
    assert d["vision_cfg"] == {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32}
    assert d["text_cfg"]["context_length"] == 32 and d["text_cfg"]["vocab_size"] == 49408
    with pytest.raises(ValueError):
        clip.ToyCLIPConfig(image_size=30)
    with pytest.raises(ValueError):
        clip.ToyCLIPConfig(text_heads=3)


def test_build_and_encode_shapes():
    model = clip.build_toy_clip(TINY)
    img = clip.encode_images(model, _images())  # 24 px renders are resized to 16
    txt = clip.encode_texts(model, TEXTS)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert clip.encode_texts(model, "a star").shape == (1, 16)


def test_tokenize_is_real_clip():
    ids = clip.tokenize(["a red star"])
    assert ids.shape == (1, 77)
    vocab, _ = build_vocab_and_merges()  # the Hugging Face CLIP vocabulary
    words = [vocab[w] for w in ("<|startoftext|>", "a</w>", "red</w>", "star</w>", "<|endoftext|>")]
    assert ids[0, :5].tolist() == words and not ids[0, 5:].any()
    used = set(clip.toy_token_ids())
    rng = random.Random(99)
    texts = [caption(c, "navy", rng).text for c in all_concepts()[::7]]
    assert set(clip.tokenize(texts).flatten().tolist()) <= used


def test_train_writes_loadable_compact_file(tmp_path, monkeypatch):
    trained = {}
    save = clip.save_toy_clip

    def capture(model, path, extra=None, dtype=None):
        trained["model"] = model
        trained["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return save(model, path, extra, dtype=dtype)

    monkeypatch.setattr(clip, "save_toy_clip", capture)
    out = _train(tmp_path)
    assert out.exists() and not out.with_suffix(".ckpt.safetensors").exists()
    loaded, cfg = clip.load_toy_clip(out)
    assert cfg == TINY
    torch.testing.assert_close(clip.encode_texts(loaded, TEXTS), clip.encode_texts(trained["model"], TEXTS))
    torch.testing.assert_close(
        clip.encode_images(loaded, _images()), clip.encode_images(trained["model"], _images())
    )
    # Compact storage: only used rows are in the file, they round-trip exactly, the rest are 0.
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118
        ids = f.get_tensor("token_embedding.ids")
    assert "token_embedding.weight" not in keys and len(ids) < 200
    assert ids.tolist() == list(clip.toy_token_ids())
    full_table_bytes = TINY.vocab_size * TINY.text_width * 4
    assert out.stat().st_size < full_table_bytes / 4
    table = loaded.token_embedding.weight.detach()
    assert torch.equal(table[ids], trained["state"]["token_embedding.weight"][ids])
    mask = torch.ones(len(table), dtype=torch.bool)
    mask[ids] = False
    assert not table[mask].any()
    # fp16 storage: about half the bytes, loads as fp32, same features up to rounding.
    half = clip.save_toy_clip(trained["model"], tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * out.stat().st_size
    loaded16, _ = clip.load_toy_clip(half)
    assert loaded16.token_embedding.weight.dtype == torch.float32
    torch.testing.assert_close(
        clip.encode_images(loaded16, _images()),
        clip.encode_images(trained["model"], _images()),
        atol=2e-2,
        rtol=0,
    )
    with safe_open(str(half), framework="pt") as f:
        assert f.get_tensor("token_embedding.ids").dtype == torch.long  # integer tensors keep their type


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    ref, _ = clip.load_toy_clip(_train(tmp_path, "ref.safetensors"))
    calls = []
    step = clip._train_step

    def interrupted(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return step(*args, **kw)

    monkeypatch.setattr(clip, "_train_step", interrupted)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, out.name, checkpoint_every=2)
    ckpt = out.with_suffix(".ckpt.safetensors")
    assert not out.exists() and ckpt.exists()
    with safe_open(str(ckpt), framework="pt") as f:
        assert f.metadata()["step"] == "2"
    calls.clear()
    monkeypatch.setattr(clip, "_train_step", lambda *a, **k: (calls.append(1), step(*a, **k))[1])
    _train(tmp_path, out.name, checkpoint_every=2)
    assert len(calls) == 1  # only step 3 was run
    assert not ckpt.exists()
    resumed, _ = clip.load_toy_clip(out)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=k)


def test_malformed_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        clip.load_toy_clip(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError) as err:
        clip.load_toy_clip(junk)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something else"})
    with pytest.raises(InputError, match="not a oneword.toy.clip file"):
        clip.load_toy_clip(other)
    save_file(
        {"x": torch.zeros(2)}, str(other), metadata={"format": clip.FORMAT, "config": '{"image_size": 16}'}
    )
    with pytest.raises(InputError, match="compact token table"):
        clip.load_toy_clip(other)


def test_zero_shot_accuracy_bounds():
    acc = clip.zero_shot_accuracy(clip.build_toy_clip(TINY), n=10)
    assert set(acc) == {"shape", "fill", "pattern", "outline", "background"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
