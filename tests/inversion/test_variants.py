"""The paper's variants on the group engine: progressive extension and per-image tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_concept_images

from oneword.cli import main
from oneword.data.images import load_folder
from oneword.inversion.config import InversionConfig
from oneword.inversion.embedding_io import load_embedding
from oneword.inversion.group import GroupEngine, group_token, image_token
from oneword.models import load_model


def _cfg(**kw) -> InversionConfig:
    base = dict(
        init="red disc",
        steps=12,
        batch_size=2,
        resolution=32,
        views_per_image=2,
        base_lr=5e-2,
        save_every=0,
        preview_every=0,
        seed=5,
    )
    base.update(kw)
    return InversionConfig(**base)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    folder = make_concept_images(tmp_path_factory.mktemp("variants") / "c", n=3, size=(32, 32))
    return [im.image for im in load_folder(folder)]


def _prompts_seen(model, monkeypatch) -> list[list[str]]:
    """Record the prompts of every ``encode_text`` call."""
    seen: list[list[str]] = []
    encode = model.encode_text

    def spy(prompts, *args, **kw):
        seen.append(list(prompts))
        return encode(prompts, *args, **kw)

    monkeypatch.setattr(model, "encode_text", spy)
    return seen


def test_progressive_extension_adds_a_vector_every_k_steps(tiny_dirs, images, monkeypatch):
    model = load_model("tiny-sd1")
    cfg = _cfg(num_vectors=3, progressive_every=4)
    engine = GroupEngine(model, capacity=1)
    sid = engine.add(images, cfg)
    start = engine.slot(sid).vectors()[0]
    seen = _prompts_seen(model, monkeypatch)
    moved_at: dict[int, int] = {}
    slot = engine.slot(sid)
    for step in range(1, cfg.steps + 1):
        engine.step()
        if step == 5:  # a vector that joins starts AdamW afresh: its own step count and moments
            counts = [
                int(slot.optimizer.state[leaf]["step"]) if leaf in slot.optimizer.state else 0
                for leaf in slot.params
            ]
            assert counts == [5, 1, 0]
        now = engine.slot(sid).vectors()[0]
        for row in range(3):
            if row not in moved_at and not torch.equal(now[row], start[row]):
                moved_at[row] = step
    # steps 1-4 train one vector, 5-8 two, 9-12 three: each row first moves on its first step
    assert moved_at == {0: 1, 1: 5, 2: 9}
    tokens = [{p.split()[-1] for p in call} for call in seen]
    assert tokens == [{group_token(1)}] * 4 + [{group_token(2)}] * 4 + [{group_token(3)}] * 4
    result = engine.remove(sid)
    assert result.step == 12 and [tuple(v.shape) for v in result.vectors] == [(3, model.widths[0])]


def test_progressive_resumes_exactly(tiny_dirs, images):
    model = load_model("tiny-sd1")
    cfg = _cfg(num_vectors=2, progressive_every=5, reg_weight=0.01)
    straight = GroupEngine(model, capacity=1)
    sid = straight.add(images, cfg)
    while straight.active:
        straight.step()
    want = straight.remove(sid).vectors
    first = GroupEngine(model, capacity=1)
    sid = first.add(images, cfg)
    for _ in range(3):  # stopped while the second vector waits to join
        first.step()
    ts = first.state(sid)
    second = GroupEngine(model, capacity=1)
    again = second.add(images, cfg)
    second.load(again, ts)
    while second.active:
        second.step()
    got = second.remove(again)
    assert got.step == cfg.steps
    for a, b in zip(got.vectors, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_progressive_settings_are_checked():
    with pytest.raises(ValueError, match="num_vectors of 2"):
        _cfg(progressive_every=3)
    with pytest.raises(ValueError, match="join at step 12"):
        _cfg(num_vectors=3, progressive_every=6)
    with pytest.raises(ValueError, match="choose one"):
        _cfg(num_vectors=2, progressive_every=3, per_image_tokens=True)
    assert [_cfg(num_vectors=3, progressive_every=4).vectors_at(s) for s in (0, 3, 4, 8, 11)] == [
        1,
        1,
        2,
        3,
        3,
    ]


def test_per_image_tokens_name_each_views_image(tiny_dirs, images, monkeypatch):
    model = load_model("tiny-sd1")
    cfg = _cfg(per_image_tokens=True, steps=6, batch_size=4)
    engine = GroupEngine(model, capacity=2)
    sid = engine.add(images, cfg)
    plain = engine.add(images, _cfg(seed=9, steps=6))  # a plain neighbour is unaffected
    slot = engine.slot(sid)
    assert slot.images == 3 and slot.params[0].shape[0] == 4  # the word's row + one per image
    per_image = len(slot.bank) // 3
    views = torch.tensor([0, per_image, 2 * per_image + 1])
    assert [p.split()[-1] for p in slot.prompts(views)] == [image_token(i) for i in range(3)]
    assert all(" with " in p for p in slot.prompts(views))
    start = slot.params[0].detach().clone()
    seen = _prompts_seen(model, monkeypatch)
    while engine.active:
        engine.step()
    named = {p.split()[-1] for call in seen for p in call}
    assert {image_token(i) for i in range(3)} <= named and group_token(1) in named
    moved = (slot.params[0].detach() - start).abs().amax(-1)
    assert (moved > 1e-4).all()  # the word and every image's vector trained
    result = engine.remove(sid)
    assert [tuple(v.shape) for v in result.vectors] == [(1, model.widths[0])]
    torch.testing.assert_close(result.vectors[0], slot.params[0].detach()[:1].cpu())
    assert all(len(call) == 6 for call in seen)  # both slots' batches in one call
    assert engine.remove(plain).step == 6


@pytest.mark.slow
def test_invert_with_per_image_tokens_writes_the_shared_word_only(tiny_dirs, concept_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--model", "tiny-sd1", "--token", "<red-disc>", "--init", "disc", "--steps", "3"]
    args += ["--batch_size", "2", "--resolution", "32", "--views_per_image", "1", "--no-progress"]
    assert main(["invert", str(concept_dir), *args, "--per-image-tokens", "--out", str(out)]) == 0
    emb = load_embedding(out / "learned_embeds.safetensors")
    assert emb.token == "<red-disc>" and [tuple(v.shape) for v in emb.vectors] == [(1, 32)]
    assert "per_image_tokens: true" in (out / "config.yaml").read_text()
    progressive = tmp_path / "progressive"
    args += ["--vectors", "2", "--progressive-every", "2"]
    assert main(["invert", str(concept_dir), *args, "--out", str(progressive)]) == 0
    emb = load_embedding(progressive / "learned_embeds.safetensors")
    assert [tuple(v.shape) for v in emb.vectors] == [(2, 32)]
    bad = tmp_path / "bad"
    assert main(["invert", str(concept_dir), *args[:-1], "5", "--out", str(bad)]) == 2


def test_per_image_tokens_resume_only_on_the_images_in_their_order(tiny_dirs, tmp_path):
    from types import SimpleNamespace

    from oneword.errors import InputError
    from oneword.inversion.train import _check_resumed_inputs

    model = load_model("tiny-sd1")
    saved = SimpleNamespace(meta={"images": '["a", "b"]'})
    _check_resumed_inputs(saved, model, ["b", "a"], tmp_path)  # a plain word: any order
    _check_resumed_inputs(saved, model, ["a", "b"], tmp_path, in_order=True)
    with pytest.raises(InputError, match="another order"):
        _check_resumed_inputs(saved, model, ["b", "a"], tmp_path, in_order=True)
    with pytest.raises(InputError, match="other images"):
        _check_resumed_inputs(saved, model, ["a", "c"], tmp_path, in_order=True)
