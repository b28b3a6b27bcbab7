"""The attribute oracle: the shipped weights, accuracy bookkeeping, file checks, training/resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import oneword.toy.oracle as oracle_mod
from oneword.errors import InputError
from oneword.toy.oracle import (
    DEFAULT_PATH,
    AttributeOracle,
    OracleConfig,
    attribute_accuracy,
    augment_images,
    load_oracle,
    train_oracle,
)
from oneword.toy.render import ATTRIBUTES, BACKGROUNDS, VOCAB, all_concepts, render, sample_pose


@pytest.fixture(scope="module")
def oracle() -> AttributeOracle:
    return load_oracle()


def _renders(n: int, seed: int, size: int = 64):
    rng = random.Random(seed)
    concepts = all_concepts()
    images, expected = [], []
    for _ in range(n):
        concept, bg = rng.choice(concepts), rng.choice(BACKGROUNDS)
        images.append(render(concept, bg, sample_pose(rng), size=size))
        expected.append({**concept.attributes(), "background": bg})
    return images, expected


def test_shipped_oracle_loads(oracle: AttributeOracle) -> None:
    assert DEFAULT_PATH.is_file() and DEFAULT_PATH.stat().st_size < 4 * 2**20
    assert not oracle.training
    assert sum(p.numel() for p in oracle.parameters()) < 1_000_000
    assert oracle.config == OracleConfig()


def test_shipped_oracle_reads_fresh_renders(oracle: AttributeOracle) -> None:
    images, expected = _renders(64, seed=20240601)
    preds = oracle.predict(images)
    assert len(preds) == 64
    assert all(set(p) == set(ATTRIBUTES) and all(p[a] in VOCAB[a] for a in p) for p in preds)
    acc = attribute_accuracy(preds, expected)
    assert list(acc) == list(ATTRIBUTES)
    assert all(v >= 0.95 for v in acc.values()), acc


def test_predict_proba_and_tensor_input(oracle: AttributeOracle) -> None:
    images, _ = _renders(4, seed=7)
    x = oracle_mod._pil_to_tensor(images)
    proba = oracle.predict_proba(x)
    for name in ATTRIBUTES:
        assert proba[name].shape == (4, len(VOCAB[name]))
        assert torch.allclose(proba[name].sum(-1), torch.ones(4), atol=1e-5)
    assert oracle.predict(x) == oracle.predict(images)
    assert oracle.predict(x[0]) == oracle.predict(images[:1])  # a single [3, H, W] image
    assert oracle.predict([]) == []
    with pytest.raises(ValueError, match="shape"):
        oracle.predict(torch.zeros(2, 1, 64, 64))


def test_32px_and_other_sizes(oracle: AttributeOracle) -> None:
    images, expected = _renders(32, seed=99, size=32)
    preds = oracle.predict(images)
    x = oracle_mod._pil_to_tensor(images)
    assert x.shape[-1] == 32
    assert len(oracle.predict(x)) == 32
    acc = attribute_accuracy(preds, expected)
    assert all(v >= 0.9 for v in acc.values()), acc
    big, expected = _renders(8, seed=98, size=128)  # larger inputs are shrunk (antialiased)
    acc = attribute_accuracy(oracle.predict(oracle_mod._pil_to_tensor(big)), expected)
    assert all(v >= 0.85 for v in acc.values()), acc


def test_attribute_accuracy_known_numbers() -> None:
    preds = [
        {"shape": "star", "fill": "red", "pattern": "dots", "outline": "gold", "background": "teal"},
        {"shape": "moon", "fill": "red", "pattern": "solid", "outline": "black", "background": "navy"},
        {"shape": "star", "fill": "blue", "pattern": "dots", "outline": "gold", "background": "gray"},
        {"shape": "heart", "fill": "pink", "pattern": "checks", "outline": "silver", "background": "olive"},
    ]
    expected = [
        {"shape": "star", "background": "teal"},  # both right
        {"shape": "circle", "fill": "red"},  # shape wrong, fill right
        {"fill": "white"},  # wrong
        {"shape": "heart", "fill": "pink", "background": "maroon"},  # background wrong
    ]
    acc = attribute_accuracy(preds, expected)
    assert acc == {"shape": pytest.approx(2 / 3), "fill": pytest.approx(2 / 3), "background": 0.5}
    assert attribute_accuracy([], []) == {}
    with pytest.raises(ValueError):
        attribute_accuracy(preds, expected[:2])


def test_augment_keeps_range_and_is_seeded() -> None:
    images, _ = _renders(8, seed=3)
    x = oracle_mod._pil_to_tensor(images)
    a = augment_images(x, torch.Generator().manual_seed(5))
    b = augment_images(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        OracleConfig(channels=(32, 64), convs_per_stage=(1,))
    with pytest.raises(ValueError):
        OracleConfig(image_size=60)
    with pytest.raises(ValueError):
        OracleConfig(dropout=1.0)


def test_bad_files_raise_input_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 20)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    bare = tmp_path / "bare.safetensors"
    save_file({"weight": torch.zeros(3)}, str(bare))
    no_config = tmp_path / "no_config.safetensors"
    save_file({"weight": torch.zeros(3)}, str(no_config), metadata={"format": "oneword.toy.oracle"})
    wrong = tmp_path / "wrong_tensors.safetensors"
    header = {
        "format": "oneword.toy.oracle",
        "config": json.dumps({"image_size": 64}),
        "vocab": json.dumps(VOCAB),
    }
    save_file({"weight": torch.zeros(3)}, str(wrong), metadata=header)
    paths = (corrupt, foreign, bare, no_config, wrong, tmp_path / "missing.safetensors")
    for path in paths:
        with pytest.raises(InputError) as info:
            load_oracle(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_train_writes_a_loadable_file(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    assert train_oracle(out, steps=3, batch_size=4, progress=False) == out
    assert not out.with_suffix(".ckpt.safetensors").exists()
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["format"] == "oneword.toy.oracle"
        keys = list(f.keys())
    assert not any(k.startswith("optim.") for k in keys)
    model = load_oracle(out)
    assert len(model.predict(_renders(2, seed=1)[0])) == 2


def test_resume_continues_from_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = {"steps": 4, "batch_size": 4, "progress": False, "checkpoint_every": 2}
    straight = load_oracle(train_oracle(tmp_path / "straight.safetensors", **kwargs))

    out = tmp_path / "resumed.safetensors"
    ckpt = out.with_suffix(".ckpt.safetensors")
    real = oracle_mod._render_batch
    calls: list[int] = []

    def crash_on_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(oracle_mod, "_render_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train_oracle(out, **kwargs)
    assert not out.exists() and ckpt.exists()
    with safe_open(str(ckpt), framework="pt") as f:
        assert f.metadata()["step"] == "2"
        keys = list(f.keys())
    assert any(k.startswith("optim.") for k in keys)

    calls.clear()

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(oracle_mod, "_render_batch", counting)
    train_oracle(out, **kwargs)
    assert len(calls) == 2  # steps 3 and 4 only
    assert out.exists() and not ckpt.exists()
    resumed = load_oracle(out)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
