"""The toy-model trainer on a miniature configuration: both stages, export, resume."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from oneword.models import load_model
from oneword.toy.ldm import ToyLDMConfig, caption_token_ids, train_toy_ldm


def tiny_cfg(**kw) -> ToyLDMConfig:
    base = {
        "image_size": 32,
        "latent_channels": 4,
        "vae_channels": (16, 16),
        "text_width": 32,
        "text_layers": 1,
        "unet_channels": (32, 32, 32),
        "vae_steps": 2,
        "vae_batch": 2,
        "ldm_steps": 1,
        "ldm_batch": 2,
        "save_every": 1,
        "decoder_steps": 0,
    }
    base.update(kw)
    return ToyLDMConfig(**base)


@pytest.mark.slow
def test_train_export_and_resume(tmp_path):
    work, out = tmp_path / "work", tmp_path / "ldm"
    train_toy_ldm(work, out, tiny_cfg(), progress=False)
    model = load_model(str(out))
    assert model.family == "toy" and model.widths == [32] and model.resolution == 32
    assert json.loads((out / "oneword.json").read_text())["family"] == "toy"
    # Longer training resumes from the checkpoint instead of starting over.
    train_toy_ldm(work, out, tiny_cfg(ldm_steps=2), progress=False)
    with safe_open(str(work / "ldm.ckpt.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == "2"
    assert len((work / "ldm_loss.csv").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="text_width"):
        train_toy_ldm(work, out, tiny_cfg(text_width=64), progress=False)


@pytest.mark.slow
def test_continue_from_a_pipeline_folder_then_fine_tune_the_decoder(tmp_path):
    import torch

    first = tmp_path / "ldm"
    train_toy_ldm(tmp_path / "work", first, tiny_cfg(), progress=False)
    base = load_model(str(first))
    second = tmp_path / "ldm2"
    train_toy_ldm(tmp_path / "work2", second, tiny_cfg(init_from=str(first), decoder_steps=2), progress=False)
    cont = load_model(str(second))
    assert not (tmp_path / "work2" / "vae.ckpt.safetensors").exists()  # stage 1 skipped: the VAE came along
    with safe_open(str(tmp_path / "work2" / "decoder.ckpt.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == "2"
    enc = lambda m: dict(m.vae.encoder.named_parameters())  # noqa: E731
    dec = lambda m: dict(m.vae.decoder.named_parameters())  # noqa: E731
    assert all(torch.equal(v, enc(cont)[k]) for k, v in enc(base).items())  # the latents keep their meaning
    assert any(not torch.equal(v, dec(cont)[k]) for k, v in dec(base).items())  # the decoder trained
    marker = json.loads((second / "oneword.json").read_text())
    assert marker["config"]["init_from"] == str(first) and marker["continued_from"]["family"] == "toy"
    with pytest.raises(ValueError, match="does not match"):
        train_toy_ldm(
            tmp_path / "work3",
            tmp_path / "x",
            tiny_cfg(init_from=str(first), unet_channels=(32, 64, 64)),
            progress=False,
        )


@pytest.mark.slow
def test_text_attribute_head_targets_and_training(tmp_path):
    """The auxiliary text loss: its classes (0 = not named), padding left out of the pooled state,
    a loss that falls when the states say what a caption names, and a resumable run with it."""
    import torch

    from oneword.toy.ldm import TextAttributeHead
    from oneword.toy.render import ATTRIBUTES, VOCAB

    named = [{}, {"pattern": "dots", "shape": VOCAB["shape"][0]}]
    target = TextAttributeHead.targets(named)
    assert target.shape == (2, len(ATTRIBUTES)) and target[0].tolist() == [0] * len(ATTRIBUTES)
    assert target[1, ATTRIBUTES.index("pattern")] == VOCAB["pattern"].index("dots") + 1
    assert target[1, ATTRIBUTES.index("shape")] == 1 and target[1, ATTRIBUTES.index("fill")] == 0
    head = TextAttributeHead(8)
    ids = torch.tensor([[0, 5, 9, 9], [0, 6, 7, 9]])  # 9 = eos (and pad): row 0 has one pad position
    states = torch.randn(2, 4, 8)
    padded = states.clone()
    padded[0, 3] += 100.0  # a padding state must not matter
    assert torch.allclose(head.loss(states, ids, 9, named), head.loss(padded, ids, 9, named))
    states.requires_grad_(True)
    opt = torch.optim.SGD([states, *head.parameters()], lr=1.0)
    first = head.loss(states, ids, 9, named).item()
    for _ in range(20):
        opt.zero_grad()
        head.loss(states, ids, 9, named).backward()
        opt.step()
    assert head.loss(states, ids, 9, named).item() < 0.5 * first
    with pytest.raises(ValueError, match="text_aux_weight"):
        tiny_cfg(text_aux_weight=-1)
    work = tmp_path / "work"
    train_toy_ldm(work, tmp_path / "ldm", tiny_cfg(text_aux_weight=0.1), progress=False)
    train_toy_ldm(work, tmp_path / "ldm", tiny_cfg(text_aux_weight=0.1, ldm_steps=2), progress=False)
    with safe_open(str(work / "ldm.ckpt.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == "2" and any(k.startswith("text_head") for k in f.keys())
    assert not any(
        "head" in k
        for k in safe_open(
            str(tmp_path / "ldm" / "text_encoder" / "model.safetensors"), framework="pt"
        ).keys()
    )  # training-only


@pytest.mark.slow
def test_grow_cross_attention_preserves_the_model_then_trains_it(tmp_path):
    import torch

    from oneword.toy.ldm import build_pipeline, grow_unet

    first = tmp_path / "ldm"
    train_toy_ldm(tmp_path / "work", first, tiny_cfg(), progress=False)
    base = load_model(str(first))
    assert base.unet.config.down_block_types[0] == "DownBlock2D"
    # Growing alone: the new level-0 blocks start as the identity, so the output is unchanged.
    pipe = build_pipeline(tiny_cfg(cross_attention_levels=(0, 1, 2)))
    new = grow_unet(pipe.unet, base.unet.float().state_dict())
    assert new == ["down_blocks.0.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"]
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([5, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, c).sample, base.unet.float()(x, t, c).sample, atol=1e-5)
    # Continued training with a frozen text encoder: the UNet learns, the words stay.
    second = tmp_path / "ldm2"
    train_toy_ldm(
        tmp_path / "work2",
        second,
        tiny_cfg(init_from=str(first), train_text=False, ldm_steps=2, cross_attention_levels=(0, 1, 2)),
        progress=False,
    )
    grown = load_model(str(second))
    assert grown.unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert grown.unet.config.up_block_types[-1] == "CrossAttnUpBlock2D"
    same = zip(base.text_encoders[0].state_dict().values(), grown.text_encoders[0].state_dict().values())
    assert all(torch.equal(a, b) for a, b in same)
    with safe_open(str(tmp_path / "work2" / "ldm.ckpt.safetensors"), framework="pt") as f:
        proj = f.get_tensor(
            "unet.down_blocks.0.attentions.0.proj_out.weight"
        )  # the trained (not EMA) weights
    assert proj.abs().sum() > 0  # the new block trained away from zero
    # A UNet with a block the config lacks is refused, and so is a frozen text encoder from scratch.
    with pytest.raises(ValueError, match="does not match"):
        grow_unet(build_pipeline(tiny_cfg()).unet, grown.unet.float().state_dict())
    with pytest.raises(ValueError, match="train_text"):
        tiny_cfg(train_text=False)
    # the auxiliary text loss defaults to on, and to off where the text encoder is frozen
    assert tiny_cfg().text_aux_weight == 0.05
    assert tiny_cfg(init_from=str(first), train_text=False).text_aux_weight == 0.0
    with pytest.raises(ValueError, match="text_aux_weight needs"):
        tiny_cfg(init_from=str(first), train_text=False, text_aux_weight=0.1)
    with pytest.raises(ValueError, match="cross_attention_levels"):
        tiny_cfg(cross_attention_levels=(0, 3))


@pytest.mark.slow
def test_export_keeps_caption_rows_and_zeroes_the_rest(tmp_path):
    out = tmp_path / "ldm"
    train_toy_ldm(tmp_path / "work", out, tiny_cfg(), progress=False)
    model = load_model(str(out))
    table = model.text_encoders[0].get_input_embeddings().weight
    keep = caption_token_ids(model.tokenizers[0])
    star = model.tokenizers[0]("star", add_special_tokens=False).input_ids[0]
    assert star in keep and table[star].abs().sum() > 0
    unused = model.tokenizers[0]("volcano", add_special_tokens=False).input_ids[0]
    assert unused not in keep and table[unused].abs().sum() == 0


@pytest.mark.slow
def test_text_to_image_accuracy_runs_on_a_toy_model(tmp_path):
    from oneword.toy.oracle import load_oracle
    from oneword.toy.quality import QualitySettings, text_to_image_accuracy
    from oneword.toy.render import ATTRIBUTES

    out = tmp_path / "ldm"
    train_toy_ldm(tmp_path / "work", out, tiny_cfg(), progress=False)
    acc = text_to_image_accuracy(
        load_model(str(out)), load_oracle(), QualitySettings(samples_per_value=1, steps=2)
    )
    assert set(acc) == set(ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in acc.values())


@pytest.mark.slow
def test_build_toy_world_trains_every_part_then_skips_them(tmp_path, monkeypatch):
    import oneword.toy.oracle as oracle_mod
    from oneword.toy.build import ToyBuildConfig, build_toy_world
    from oneword.toy.clip import ToyCLIPConfig, load_toy_clip
    from oneword.toy.oracle import OracleConfig, load_oracle

    small_oracle = OracleConfig(image_size=32, channels=[8, 8, 8, 8])
    real_train = oracle_mod.train_oracle
    monkeypatch.setattr(
        oracle_mod, "train_oracle", lambda out, **kw: real_train(out, batch_size=4, config=small_oracle, **kw)
    )
    import oneword.toy.clip as clip_mod

    real_clip = clip_mod.train_toy_clip
    small_clip = ToyCLIPConfig(embed_dim=16, vision_width=16, vision_layers=1, text_width=16, text_layers=1)
    monkeypatch.setattr(
        clip_mod, "train_toy_clip", lambda out, **kw: real_clip(out, batch_size=4, cfg=small_clip, **kw)
    )
    work, out = tmp_path / "work", tmp_path / "weights"
    cfg = ToyBuildConfig(oracle_steps=1, clip_steps=1, ldm=tiny_cfg())
    written = build_toy_world(work, out, cfg=cfg, progress=False)
    assert set(written) == {"oracle", "clip", "ldm"}
    load_oracle(out / "oracle.safetensors")
    load_toy_clip(out / "clip.safetensors")
    assert load_model(str(out / "ldm")).family == "toy"
    assert set(json.loads((work / "timings.json").read_text())) == {"oracle", "clip", "ldm"}
    stamp = (work / "oracle.safetensors").stat().st_mtime_ns
    build_toy_world(work, out, parts=["oracle"], cfg=cfg, progress=False)  # finished: not retrained
    assert (work / "oracle.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown toy part"):
        build_toy_world(work, out, parts=["vae"], cfg=cfg, progress=False)
