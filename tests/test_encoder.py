"""The encoder: mapper shapes and scale per family, order invariance, shards, a two-step Lightning
fit and its resume, export/import, and ti-encode end to end on the miniature models."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from oneword.encoder.model import (
    FORMAT,
    ConceptEncoder,
    EncoderConfig,
    load_encoder,
    save_encoder,
    token_scale,
)
from oneword.encoder.shards import decode_sample, encode_sample, expand_shards, toy_samples, write_shards
from oneword.encoder.unet_features import (
    unet_feature_dim,
    unet_features,
    unet_features_and_map,
    unet_map_channels,
)
from oneword.errors import InputError
from oneword.eval.space import load_space
from oneword.models import load_model
from oneword.trainstate import read_safetensors, write_safetensors


def tiny_encoder(family: str = "sd1", num_vectors: int = 1, randomize: bool = True,
                 unet: bool = False, layout: str = "blocks", map_width: int = 0) -> tuple[ConceptEncoder, object]:
    model = load_model(f"tiny-{family}")
    space = load_space("random")
    unet_dim = unet_feature_dim(model.unet, layout) if unet else 0
    map_channels = unet_map_channels(model.unet) if map_width else 0
    cfg = EncoderConfig(clip="random", feature_dim=32, unet_dim=unet_dim, unet_layout=layout, widths=model.widths,
                        map_channels=map_channels, map_width=max(map_width, 1),
                        num_vectors=num_vectors, hidden=32,
                        depth=1, offset_scale=token_scale(model), family=model.family, model=f"tiny-{family}")
    enc = ConceptEncoder(cfg, space)
    if randomize:  # heads start at zero; give them weights so the tests see real offsets
        torch.manual_seed(0)
        for head in enc.mapper.heads:
            torch.nn.init.normal_(head.weight, std=0.2)
    return enc, model


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def _init(model, n: int, num_vectors: int = 1, word: str = "dog"):
    return [v[None].expand(n, -1, -1) for v in model.initializer_vectors(word, num_vectors)]


@pytest.mark.parametrize("family,unet,map_width", [("sd1", False, 0), ("sd2", False, 0), ("sdxl", False, 0),
                                                   ("sd1", True, 0), ("sdxl", True, 0), ("sdxl", True, 8)])
def test_mapper_shapes_and_scale(tiny_dirs, family, unet, map_width):
    enc, model = tiny_encoder(family, num_vectors=2, unet=unet, map_width=map_width)
    init = _init(model, 3, 2)
    out = enc.predict([_images(2), _images(4, 1), _images(1, 2)], init, model)
    assert len(out) == 3 and [tuple(v.shape) for v in out[0]] == [(2, w) for w in model.widths]
    for j, s in enumerate(token_scale(model)):
        offset = (out[0][j] - init[j][0]).norm(dim=-1)
        assert torch.all(offset > 0.05 * s) and torch.all(offset < 20 * s)  # on the scale of real words
    fresh, _ = tiny_encoder(family, num_vectors=2, randomize=False, unet=unet, map_width=map_width)  # untrained = the initializer
    same = fresh.predict([_images(2)], [v[:1] for v in init], model)[0]
    assert all(torch.allclose(a, b[0]) for a, b in zip(same, init))


@pytest.mark.parametrize("map_width", [0, 8])
def test_order_invariance_and_set_size(tiny_dirs, map_width):
    enc, model = tiny_encoder(unet=True, map_width=map_width)
    imgs = _images(4)
    a = enc.predict([imgs], _init(model, 1), model)[0][0]
    b = enc.predict([imgs[::-1]], _init(model, 1), model)[0][0]
    assert torch.allclose(a, b, atol=1e-5)
    batched = enc.predict([imgs, imgs[:1]], _init(model, 2), model)  # padding of the shorter set is masked
    alone = enc.predict([imgs[:1]], _init(model, 1), model)[0][0]
    assert torch.allclose(batched[0][0], a, atol=1e-5) and torch.allclose(batched[1][0], alone, atol=1e-5)
    with pytest.raises(InputError):
        enc.predict([imgs, []], _init(model, 2), model)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["blocks", "resnets", "multiscale"])
def test_unet_features_see_the_image_and_need_the_model(tiny_dirs, layout, family):
    enc, model = tiny_encoder(family, unet=True, layout=layout)
    imgs = _images(3)
    f = unet_features(model, imgs, layout)
    assert f.shape == (3, unet_feature_dim(model.unet, layout)) and torch.isfinite(f).all()
    assert torch.allclose(unet_features(model, imgs[:1], layout), f[:1], rtol=1e-4, atol=1e-4)  # batch-independent
    assert not torch.allclose(f[0], f[1])  # different images, different features
    assert enc.predict([imgs], _init(model, 1), model)[0][0].shape == (1, model.widths[0])
    with pytest.raises(ValueError, match="UNet features"):
        enc.predict([imgs], _init(model, 1))


def test_unet_features_of_an_fp16_model_encode_with_an_fp32_vae(tiny_dirs):
    """SDXL's VAE overflows in fp16 (NaN features, NaN prediction): the reference images are encoded
    as the latent bank encodes them, in fp32, and the VAE is left as it was."""
    model = load_model("tiny-sd1", dtype="fp16")
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    encode = model.vae.encode

    def spy(x, *args, **kwargs):
        seen.append((x.dtype, model.vae.dtype))
        return encode(x, *args, **kwargs)

    model.vae.encode = spy
    f = unet_features(model, _images(2), "multiscale")
    assert seen and all(s == (torch.float32, torch.float32) for s in seen)
    assert model.vae.dtype == torch.float16 and torch.isfinite(f).all()
    full = load_model("tiny-sd1")
    assert torch.allclose(f, unet_features(full, _images(2), "multiscale"), rtol=0.05, atol=0.05)


def test_resnets_layout_extends_blocks(tiny_dirs):
    """The ``resnets`` layout keeps every down-path map (the blocks' outputs among them) and their spread."""
    model = load_model("tiny-sd1")
    assert unet_feature_dim(model.unet, "resnets") > unet_feature_dim(model.unet, "blocks")
    with pytest.raises(ValueError, match="layout"):
        unet_features(model, _images(1), "pixels")
    with pytest.raises(ValueError, match="unet_layout"):
        EncoderConfig(unet_layout="pixels")
    from typing import get_args, get_type_hints

    from oneword.encoder.lit import EncoderModule
    from oneword.encoder.unet_features import LAYOUTS
    assert get_args(get_type_hints(EncoderModule.__init__)["unet_layout"]) == LAYOUTS  # the CLI offers them all


def test_multiscale_layout_is_resnets_at_two_scales(tiny_dirs):
    """``multiscale`` = ``resnets`` at the model's resolution, then ``resnets`` of the 2x-upsampled view."""
    model = load_model("tiny-sd1")
    imgs = _images(2)
    ms, one = unet_features(model, imgs, "multiscale"), unet_features(model, imgs, "resnets")
    assert unet_feature_dim(model.unet, "multiscale") == 2 * one.shape[1] == ms.shape[1]
    assert torch.allclose(ms[:, :one.shape[1]], one, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ms[:, one.shape[1]:], one, rtol=1e-2, atol=1e-2)  # the finer view reads differently


@pytest.mark.parametrize("layout", ["blocks", "multiscale"])
def test_the_map_head_reads_the_finest_unet_map(tiny_dirs, layout, monkeypatch):
    """The finest map comes from the same passes as the pooled features, at the largest scale, capped
    at MAP_SIDE a side; the trained head makes the prediction depend on it."""
    import oneword.encoder.unet_features as uf

    enc, model = tiny_encoder(unet=True, layout=layout, map_width=8)
    imgs = _images(3)
    feats, maps = unet_features_and_map(model, imgs, layout)
    assert torch.equal(feats, unet_features(model, imgs, layout))
    latent = model.resolution // 2 ** (len(model.vae.config.block_out_channels) - 1)
    side = latent * (2 if layout == "multiscale" else 1)
    assert maps.shape == (3, unet_map_channels(model.unet), side, side) and torch.isfinite(maps).all()
    monkeypatch.setattr(uf, "MAP_SIDE", 2)
    assert unet_features_and_map(model, imgs, layout)[1].shape[-2:] == (2, 2)
    monkeypatch.undo()
    torch.manual_seed(1)
    for p in enc.mapper.map_head.parameters():  # make the head matter at test scale
        torch.nn.init.normal_(p, std=0.5)
    inputs = enc.features([imgs], model)
    assert inputs.maps is not None and inputs.maps.shape[:3] == (1, 3, unet_map_channels(model.unet))
    init = _init(model, 1)
    base = enc(inputs, init)[0]
    other = enc(inputs._replace(maps=inputs.maps.flip(-1).roll(1, -2)), init)[0]
    assert not torch.allclose(base, other)  # same pooled features, different map: different word
    with pytest.raises(ValueError, match="maps"):
        enc(inputs._replace(maps=None), init)
    with pytest.raises(ValueError, match="UNet features"):
        enc.predict([imgs], init)


def test_export_import_round_trip(tiny_dirs, tmp_path):
    enc, model = tiny_encoder()
    path = save_encoder(enc, tmp_path / "enc.safetensors")
    back = load_encoder(path, space=enc.space)
    assert back.cfg == enc.cfg
    layered, _ = tiny_encoder(unet=True, layout="resnets")
    assert load_encoder(save_encoder(layered, tmp_path / "l.safetensors"), space=enc.space).cfg.unet_layout == "resnets"
    mapped, _ = tiny_encoder(unet=True, layout="multiscale", map_width=8)
    back_mapped = load_encoder(save_encoder(mapped, tmp_path / "m.safetensors"), space=enc.space)
    assert back_mapped.cfg == mapped.cfg and back_mapped.cfg.map_channels > 0
    torch.testing.assert_close(back_mapped.predict([_images(2)], _init(model, 1), model),
                               mapped.predict([_images(2)], _init(model, 1), model))
    tensors, meta = read_safetensors(path, fmt=FORMAT)  # a file from before unet_layout and the map head
    cfg = json.loads(meta["config"])
    for key in ("unet_layout", "map_channels", "map_width"):
        del cfg[key]
    old = write_safetensors(tmp_path / "old.safetensors", tensors, {**meta, "config": json.dumps(cfg)})
    assert load_encoder(old, space=enc.space).cfg.unet_layout == "blocks"
    assert load_encoder(old, space=enc.space).cfg.map_channels == 0
    imgs = _images(3)
    assert torch.equal(enc.predict([imgs], _init(model, 1))[0][0], back.predict([imgs], _init(model, 1))[0][0])
    half = load_encoder(save_encoder(enc, tmp_path / "half.safetensors", dtype=torch.float16), space=enc.space)
    assert path.stat().st_size > 1.8 * (tmp_path / "half.safetensors").stat().st_size
    assert all(p.dtype == torch.float32 for p in half.mapper.parameters())  # loading casts back
    torch.testing.assert_close(half.predict([imgs], _init(model, 1))[0][0], enc.predict([imgs], _init(model, 1))[0][0],
                               rtol=0, atol=1e-2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError):
        load_encoder(bad)


def test_shard_round_trip_and_expand(tmp_path):
    samples = list(toy_samples(limit=3, images=3, size=32))
    assert samples[0].backgrounds != samples[1].backgrounds or samples[0].images != samples[1].images
    raw = encode_sample(samples[0])
    back = decode_sample(raw)
    assert back.key == samples[0].key and back.init == samples[0].init and len(back.images) == 3
    assert back.images[0].tobytes() == samples[0].images[0].tobytes()
    samples[0].target = [torch.ones(1, 32)]
    assert torch.equal(decode_sample(encode_sample(samples[0])).target[0], torch.ones(1, 32))
    paths = write_shards(samples, tmp_path / "s", per_shard=2)
    assert len(paths) == 2 and expand_shards(str(tmp_path / "s")) == [str(p) for p in paths]
    with pytest.raises(InputError):
        expand_shards(str(tmp_path / "none-*.tar"))
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: len(whole) // 2])  # a copy cut short: one line now, not a traceback later
    with pytest.raises(InputError, match="concepts-000001.tar is damaged or truncated"):
        expand_shards(str(tmp_path / "s"))
    paths[1].write_bytes(b"not a tar at all")
    with pytest.raises(InputError, match="damaged or truncated"):
        expand_shards(str(paths[1]))


def test_lightning_fit_and_resume(tiny_dirs, tmp_path):
    import lightning as L

    from oneword.encoder.lit import ConceptShards, EncoderModule, ExportEncoder

    write_shards(toy_samples(limit=8, images=3, size=32), tmp_path / "shards", per_shard=4)

    def fit(steps: int, ckpt=None):
        module = EncoderModule(model="tiny-sd1", clip="random", hidden=32, depth=1, warmup_steps=1, template="toy")
        data = ConceptShards(str(tmp_path / "shards"), batch_size=2, max_refs=2, val_fraction=0.25,
                             shuffle_buffer=4)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"),
                            logger=L.pytorch.loggers.CSVLogger(str(tmp_path / "run")), limit_val_batches=1,
                            val_check_interval=2, check_val_every_n_epoch=None, enable_progress_bar=False,
                            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"),
                                                                           save_last=True, every_n_train_steps=1),
                                       ExportEncoder(str(tmp_path / "enc.safetensors"))])
        trainer.fit(module, data, ckpt_path=ckpt)
        return trainer, module

    trainer, module = fit(2)
    assert trainer.global_step == 2
    assert not any("ldm" in k or "unet" in k for k in module.state_dict())  # frozen model stays out
    first = {k: v.clone() for k, v in module.encoder.mapper.state_dict().items()}
    assert any(v.abs().sum() > 0 for k, v in first.items() if k.startswith("heads"))  # the heads learned
    trainer, module = fit(3, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 3
    enc = load_encoder(tmp_path / "enc.safetensors", space=module.encoder.space)
    assert enc.cfg.model == "tiny-sd1" and enc.cfg.widths == module.encoder.cfg.widths


def test_ranks_and_accumulated_batches_draw_their_own_noise(tiny_dirs):
    """Under DDP or gradient accumulation every micro-batch of a step used the same noise and
    timesteps; rank 0's first micro-batch keeps the single-device seed."""
    from types import SimpleNamespace

    from oneword.encoder.lit import EncoderModule

    module = EncoderModule(model="tiny-sd1", clip="random", hidden=32, depth=1, template="toy", seed=3)
    alone = module.noise_seed(0)
    assert alone == 3 * 1_000_003
    seeds = set()
    for rank in (0, 1):
        module._trainer = SimpleNamespace(accumulate_grad_batches=4, global_rank=rank, global_step=0)
        seeds |= {module.noise_seed(i) for i in range(8)}  # batch_idx runs on; the step holds 4
        if rank == 0:
            assert module.noise_seed(0) == alone
    module._trainer = None
    assert len(seeds) == 8


def test_encoder_training_can_checkpoint_the_unet(tiny_dirs):
    from oneword.encoder.lit import EncoderModule

    for on in (False, True):
        module = EncoderModule(model="tiny-sd1", clip="random", hidden=32, depth=1, template="toy",
                               gradient_checkpointing=on)
        assert module.ldm.unet.is_gradient_checkpointing is on


def test_targets_from_another_model_are_refused(tiny_dirs):
    """SDXL targets fed to an SD 1.x encoder were distilled toward silently (the first encoder's
    vectors); the other way round crashed with an IndexError."""
    from oneword.encoder.lit import EncoderModule

    module = EncoderModule(model="tiny-sd1", clip="random", hidden=32, depth=1, template="toy", distill_weight=0.1)
    image = Image.new("RGB", (32, 32), "red")
    batch = {"key": ["a", "b"], "refs": [[image], [image]], "target": [image, image], "init": ["disc", "disc"],
             "background": [None, None], "target_vectors": [None, [torch.zeros(1, 32)]]}
    assert torch.isfinite(module.losses(batch, torch.Generator().manual_seed(0))["loss"])
    batch["target_vectors"][1] = [torch.zeros(1, 32), torch.zeros(1, 48)]  # an SDXL-shaped target
    with pytest.raises(InputError, match="target of concept 'b'.*ti data targets"):
        module.losses(batch, torch.Generator().manual_seed(0))


def test_fewer_shards_than_readers_is_an_error(tmp_path):
    """Shards are handed out whole per rank and per worker: a reader with none would hang the run."""
    from types import SimpleNamespace

    from oneword.encoder.lit import ConceptShards

    write_shards(toy_samples(limit=4, images=1, size=16), tmp_path / "shards", per_shard=2)
    data = ConceptShards(str(tmp_path / "shards"), num_workers=3)
    with pytest.raises(InputError, match="2 shard.* for 3 readers"):
        data.train_dataloader()
    data = ConceptShards(str(tmp_path / "shards"))
    data.trainer = SimpleNamespace(world_size=4, global_rank=0)
    with pytest.raises(InputError, match="for 4 readers"):
        data.val_dataloader()
    data.trainer = SimpleNamespace(world_size=2, global_rank=0)
    assert data.train_dataloader() is not None


def test_each_rank_picks_its_own_references(tmp_path):
    """Ranks used to draw the same reference subsets and target views in the same order."""
    from types import SimpleNamespace

    from oneword.encoder.lit import ConceptShards

    write_shards(toy_samples(limit=8, images=4, size=16), tmp_path / "shards", per_shard=4)

    def picks(rank: int) -> list[tuple[int, bytes]]:
        data = ConceptShards(str(tmp_path / "shards"), batch_size=1, min_refs=1, max_refs=3, val_fraction=0.1,
                             shuffle_buffer=1)
        data.trainer = SimpleNamespace(world_size=1, global_rank=rank)
        out = []
        for batch, _ in zip(data.train_dataloader(), range(6)):
            out.append((len(batch["refs"][0]), batch["target"][0].tobytes()))
        return out

    assert picks(0) == picks(0)
    assert picks(1) != picks(0)


def test_export_keeps_the_best_validated_encoder(tiny_dirs, tmp_path):
    """With ``monitor``, the exported file changes only when the metric improves (NaN never does),
    and the best value survives a resume through the callback's state."""
    from types import SimpleNamespace

    from oneword.encoder.lit import ExportEncoder
    from oneword.trainstate import read_safetensors

    enc, _ = tiny_encoder()
    module = SimpleNamespace(encoder=enc)
    path = tmp_path / "best.safetensors"
    cb = ExportEncoder(str(path), monitor="val/distill")
    exported = []
    for step, value in [(1, 5.0), (2, 3.0), (3, 4.0), (4, float("nan")), (5, 2.5), (6, 2.6)]:
        trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, global_step=step,
                                  callback_metrics={"val/distill": torch.tensor(value)})
        cb.on_validation_end(trainer, module)
        exported.append(int(read_safetensors(path)[1]["step"]))
        cb.on_train_end(trainer, module)  # a monitored export is not overwritten at the end
    assert exported == [1, 2, 2, 2, 5, 5]
    assert float(read_safetensors(path)[1]["best"]) == 2.5
    resumed = ExportEncoder(str(path), monitor="val/distill")
    resumed.load_state_dict(cb.state_dict())
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, global_step=7,
                              callback_metrics={"val/distill": torch.tensor(2.7)})
    resumed.on_validation_end(trainer, module)
    assert read_safetensors(path)[1]["step"] == "5"
    with pytest.raises(KeyError, match="val/missing"):
        ExportEncoder(str(path), monitor="val/missing").on_validation_end(trainer, module)


def _encoder_file(tmp_path):
    enc, _ = tiny_encoder(unet=True)
    return save_encoder(enc, tmp_path / "enc.safetensors")


@pytest.mark.parametrize("refine,select", [(0, 2), (2, 0), (2, 1), (2, None)])
def test_ti_encode_end_to_end(tiny_dirs, concept_dir, tmp_path, refine, select, capsys):
    from oneword.encoder.encode import REFINE_DEFAULTS, main, select_samples
    from oneword.inversion.config import InversionConfig
    from oneword.inversion.embedding_io import load_embedding
    from tests.conftest import make_concept_images

    other = make_concept_images(tmp_path / "other", n=2)
    out = tmp_path / "out"
    code = main([str(concept_dir), str(other), "--encoder", str(_encoder_file(tmp_path)), "--init", "disc",
                 "--refine", str(refine), "--out", str(out), "--batch_size", "1", "--resolution", "32",
                 "--views_per_image", "1", "--preview-steps", "2", "--no-progress",
                 "--sample-batch", "3", *(["--select", str(select)] if select is not None else [])])
    assert code == 0
    assert ("without --refine it does nothing" in capsys.readouterr().err) == (select is not None and not refine)
    select = select_samples(refine, select)  # omitted: the default round trip judges the refinement
    for name, token in (("concept", "<concept>"), ("other", "<other>")):
        run = out / name
        for f in ("learned_embeds.safetensors", f"{name}.safetensors", "preview.png", "report.md", "encode.json"):
            assert (run / f).is_file(), f
        e = load_embedding(run / "learned_embeds.safetensors")
        report = json.loads((run / "encode.json").read_text())
        assert report["refinement"].startswith(f"{refine} steps")
        kept = report.get("kept", "refined" if refine else "prediction")
        assert ("kept" in report) == bool(select) and kept in ("prediction", "refined")
        assert e.token == token and e.metadata["oneword.steps"] == ("0" if kept == "prediction" else str(refine))
        if select:
            assert "round-trip distances" in report and "prediction" in report["round-trip distances"]
        assert ((run / "loss.csv").is_file()) == (refine > 0)
        if refine:  # refinement runs at ti-encode's own rate, not scratch inversion's
            cfg = InversionConfig.from_yaml((run / "config.yaml").read_text())
            assert cfg.base_lr == REFINE_DEFAULTS["base_lr"] != InversionConfig.base_lr


def test_ti_encode_refinement_defaults_show_in_help():
    from oneword.encoder.encode import DEFAULT_SELECT, REFINE_DEFAULTS, build_parser, select_samples

    p = build_parser()
    # the round trip judges every refinement unless told otherwise; without one there is nothing to judge
    assert select_samples(200, p.parse_args(["x"]).select) == DEFAULT_SELECT > 0
    assert select_samples(200, p.parse_args(["x", "--select", "0"]).select) == 0
    assert select_samples(200, 3) == 3 and select_samples(0, None) == 0 and select_samples(0, 3) == 0
    assert f"default: {DEFAULT_SELECT} with --refine" in " ".join(p.format_help().split())
    assert p.parse_args(["x"]).base_lr == REFINE_DEFAULTS["base_lr"]
    assert p.parse_args(["x", "--base_lr", "0.02"]).base_lr == 0.02
    assert f"(default: {REFINE_DEFAULTS['base_lr']})" in " ".join(p.format_help().split())
    # in a refinement the regularizer's anchor is the prediction, not the initializer word
    assert "toward the encoder's prediction" in " ".join(p.format_help().split())


def test_ti_encode_errors(tiny_dirs, concept_dir, tmp_path, capsys):
    from oneword.encoder.encode import main

    enc = str(_encoder_file(tmp_path))
    assert main([str(concept_dir), "--encoder", enc, "--out", str(tmp_path / "o")]) == 2
    assert "--init" in capsys.readouterr().err  # not a toy concept: the initializer must be given
    assert main([str(concept_dir), "--encoder", enc, "--model", "tiny-sdxl", "--init", "disc"]) == 2
    assert "widths" in capsys.readouterr().err
    assert main([str(concept_dir), "--encoder", str(tmp_path / "missing.safetensors"), "--init", "x"]) == 2
    assert main([str(concept_dir), "--encoder", enc, "--init", "disc", "--refine", "-1"]) == 2
    assert main([str(concept_dir), "--encoder", enc, "--init", "disc", "--refine", "2", "--select", "-1",
                 "--out", str(tmp_path / "neg")]) == 2
    assert "--select" in capsys.readouterr().err and not (tmp_path / "neg").exists()  # nothing written
    assert main([str(concept_dir), "--encoder", enc, "--init", "disc", "--refine", "2", "--sample-batch", "0",
                 "--out", str(tmp_path / "nob")]) == 2
    assert "--sample-batch" in capsys.readouterr().err and not (tmp_path / "nob").exists()
    assert main([str(concept_dir), str(concept_dir), "--encoder", enc, "--init", "disc", "--token", "<a>", "<A>",
                 "--out", str(tmp_path / "case")]) == 2  # one token to CLIP (and to some file systems)
    assert "same token" in capsys.readouterr().err and not (tmp_path / "case").exists()


def test_ti_encode_with_the_toy_encoder_on_a_real_model_fails_before_loading_it(concept_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    """`ti-encode photos/ --model sdxl` without --encoder used to load SDXL (minutes) only to
    report mismatched widths; now it says at once what to do."""
    import oneword.models
    from oneword.encoder.encode import main

    monkeypatch.setattr(oneword.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for model in ("sdxl", "tiny-sd1", str(tmp_path / "ckpt.safetensors")):
        assert main([str(concept_dir), "--model", model, "--init", "cat", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "encoder for the toy world" in err and "Train an encoder" in err
    assert not (tmp_path / "o").exists()


def test_ti_encode_checks_every_run_folder_before_loading(concept_dir, tmp_path, monkeypatch, capsys):
    """`ti-encode c2 c1` wrote c2, then failed on an existing c1 with advice to pass --resume, an
    option ti-encode does not have; and only after loading the model."""
    import shutil

    import oneword.models
    from oneword.encoder.encode import main

    other = tmp_path / "other"
    shutil.copytree(concept_dir, other)
    (tmp_path / "o" / "concept").mkdir(parents=True)
    (tmp_path / "o" / "concept" / "report.md").write_text("an earlier run")
    monkeypatch.setattr(oneword.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main([str(other), str(concept_dir), "--init", "disc", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "neither resumes nor overwrites" in err and "--resume" not in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["concept"]  # other/ was not written


def test_ti_data_shards(tmp_path, capsys):
    from oneword.cli import main

    assert main(["data", "shards", "--toy", "--limit", "3", "--images", "2", "--size", "32",
                 "--per-shard", "2", "--out", str(tmp_path / "s")]) == 0
    assert len(capsys.readouterr().out.split()) == 2
    assert main(["data", "shards", "--out", str(tmp_path / "s")]) == 2
    capsys.readouterr()
    toy = ["data", "shards", "--toy", "--limit", "1", "--images", "2", "--size", "32", "--out", str(tmp_path / "s")]
    assert main(toy) == 2  # a rerun into the same folder would leave the old shards beside the new ones
    assert "already holds concepts-*.tar" in capsys.readouterr().err
    assert main([*toy, "--prefix", "more"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "concepts-000000.tar", "concepts-000001.tar", "more-000000.tar"]


def test_ti_data_refuses_what_would_lose_concepts(tmp_path, capsys):
    """Two concept folders of one name made an unreadable shard; two shard folders written with
    one prefix fed to ti data targets kept only the first folder's concepts."""
    from conftest import make_concept_images

    from oneword.cli import main

    for sub in ("a", "b"):
        make_concept_images(tmp_path / sub / "cat")
    assert main(["data", "shards", str(tmp_path / "a" / "cat"), str(tmp_path / "b" / "cat"), "--init", "cat",
                 "--out", str(tmp_path / "s")]) == 2
    assert "distinct names" in capsys.readouterr().err and not (tmp_path / "s").exists()
    for sub in ("a", "b"):
        assert main(["data", "shards", str(tmp_path / sub / "cat"), "--init", "cat", "--out", str(tmp_path / f"s{sub}")]) == 0
    capsys.readouterr()
    assert main(["data", "targets", str(tmp_path / "s*" / "*.tar"), "--model", "tiny-sd1", "--steps", "1",
                 "--out", str(tmp_path / "t")]) == 2
    assert "share file names (concepts-000000.tar)" in capsys.readouterr().err
    make_concept_images(tmp_path / "b" / "dog")  # classes in one data set: a word per folder
    both = [str(tmp_path / "a" / "cat"), str(tmp_path / "b" / "dog")]
    assert main(["data", "shards", *both, "--init", "cat", "dog", "mug", "--out", str(tmp_path / "m")]) == 2
    assert "one per folder (2), got 3" in capsys.readouterr().err
    assert main(["data", "shards", *both, "--init", "cat", "dog", "--out", str(tmp_path / "m")]) == 0
    from oneword.encoder.shards import read_shard

    assert [(x.key, x.init) for x in read_shard(tmp_path / "m" / "concepts-000000.tar")] == [("cat", "cat"),
                                                                                          ("dog", "dog")]


def test_shards_from_folders_with_targets(tiny_dirs, concept_dir, tmp_path):
    from oneword.cli import main

    run = tmp_path / "run"
    assert main(["invert", str(concept_dir), "--model", "tiny-sd1", "--token", "<t>", "--init", "disc", "--steps", "1",
                 "--batch_size", "1", "--resolution", "32", "--views_per_image", "1", "--no-progress",
                 "--out", str(run)]) == 0
    assert main(["data", "shards", str(concept_dir), "--init", "disc", "--targets", str(run),
                 "--out", str(tmp_path / "s")]) == 0
    import webdataset as wds

    (raw,) = list(wds.WebDataset(expand_shards(str(tmp_path / "s")), shardshuffle=False))
    sample = decode_sample(raw)
    assert sample.init == "disc" and len(sample.images) == 3 and sample.target[0].shape == (1, 32)


def test_lightning_cli_with_the_toy_config(tiny_dirs, tmp_path, monkeypatch):
    from pathlib import Path

    from oneword.encoder.lit import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "encoder" / "toy.yaml"
    write_shards(toy_samples(limit=6, images=3, size=32), tmp_path / "shards", per_shard=6)
    monkeypatch.chdir(tmp_path)  # the config's run folders are relative
    args = ["fit", "--config", str(config), "--model.model", "tiny-sd1", "--model.clip", "random",
            "--model.hidden", "32", "--model.depth", "1", "--model.unet_features", "true",
            "--model.unet_map", "8", "--data.shards", str(tmp_path / "shards"),
            "--data.batch_size", "2", "--data.val_fraction", "0.3", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false"]
    cli_main(args + ["--trainer.max_steps", "2"])
    run = tmp_path / "runs" / "encoder" / "toy"
    assert (run / "encoder.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    first_log = (run / "logs" / "version_0" / "metrics.csv").read_text()
    cli_main(args + ["--trainer.max_steps", "3", "--ckpt_path", "last"])  # the resume a user types
    assert (run / "logs" / "version_0" / "metrics.csv").read_text() == first_log  # the first run's log is kept
    assert (run / "logs" / "version_1" / "metrics.csv").is_file()
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    cfg = load_encoder(run / "encoder.safetensors").cfg
    assert cfg.unet_dim > 0 and cfg.unet_layout == "multiscale"  # the config's UNet features were wired in
    assert cfg.map_channels > 0 and cfg.map_width == 8


@pytest.mark.parametrize("name", ["toy", "sd15", "sd21", "sdxl"])
def test_every_shipped_config_parses(name, capsys):
    """The real-model configs cannot be fitted here (no weights), but a misspelt or removed option
    in one fails the parse: LightningCLI checks every key against the classes' signatures."""
    from pathlib import Path

    from oneword.encoder.lit import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "encoder" / f"{name}.yaml"
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert f"  model: {name}\n" in printed
    if name == "sdxl":
        assert "gradient_checkpointing: true" in printed


def test_training_interrupted_by_ctrl_c_resumes_where_it_stopped(tiny_dirs, tmp_path, monkeypatch, capsys):
    """Ctrl-C lost every step since the last periodic checkpoint (up to 999 with sd15.yaml), and a
    rerun without --ckpt_path replaced the exported encoder with an untrained one's."""
    from pathlib import Path

    from oneword.encoder.lit import EncoderModule, cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "encoder" / "toy.yaml"
    write_shards(toy_samples(limit=12, images=3, size=32), tmp_path / "shards", per_shard=12)
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config), "--model.model", "tiny-sd1", "--model.clip", "random",
            "--model.hidden", "32", "--model.depth", "1", "--model.unet_features", "false", "--model.unet_map", "0",
            "--data.shards", str(tmp_path / "shards"), "--data.batch_size", "2", "--data.val_fraction", "0.5",
            "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "1"]
    real = EncoderModule.training_step
    steps = []

    def ctrl_c_at_step_3(self, batch, batch_idx):
        steps.append(self.global_step)
        if self.global_step == 2:
            raise KeyboardInterrupt
        return real(self, batch, batch_idx)

    monkeypatch.setattr(EncoderModule, "training_step", ctrl_c_at_step_3)
    with pytest.raises(SystemExit):
        cli_main(args + ["--trainer.max_steps", "5"])
    ckpts = tmp_path / "runs" / "encoder" / "toy" / "checkpoints"
    assert (ckpts / "on_exception.ckpt").is_file() and not (ckpts / "last.ckpt").exists()
    monkeypatch.setattr(EncoderModule, "training_step", real)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # a fresh fit would replace the exported encoder
        cli_main(args + ["--trainer.max_steps", "5"])
    assert refused.value.code == 2 and "--ckpt_path last" in capsys.readouterr().err
    steps.clear()
    monkeypatch.setattr(EncoderModule, "training_step", lambda self, b, i: steps.append(self.global_step)
                        or real(self, b, i))
    cli_main(args + ["--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert steps == [2, 3]  # continued at the step Ctrl-C stopped, not from the start


def test_data_options_are_explained_in_help(capsys):
    from oneword.encoder.lit import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "--data.shards SHARDS the training shards" in printed and "every worker of every rank" in printed


def test_a_bad_concept_folder_leaves_no_shards(tmp_path, concept_dir):
    from oneword.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "s"
    assert main(["data", "shards", str(concept_dir), str(empty), "--init", "disc", "--per-shard", "1",
                 "--out", str(out)]) == 2
    assert list(out.iterdir()) == []  # the first concept's finished shard was removed too


def test_ti_data_targets_adds_embeddings_and_resumes(tiny_dirs, tmp_path, capsys):
    from oneword.cli import main
    from oneword.encoder.shards import read_shard

    write_shards(toy_samples(limit=3, images=2, size=32), tmp_path / "s", per_shard=2)
    args = ["data", "targets", str(tmp_path / "s"), "--model", "tiny-sd1", "--steps", "2", "--group", "2",
            "--out", str(tmp_path / "t")]
    assert main(args) == 0
    assert "inverting 2 concepts" in capsys.readouterr().err  # the step bar inside a shard's group
    out = sorted((tmp_path / "t").glob("*.tar"))
    assert [p.name for p in out] == ["concepts-000000.tar", "concepts-000001.tar"]
    before, after = read_shard(tmp_path / "s" / out[0].name), read_shard(out[0])
    assert [s.key for s in after] == [s.key for s in before] and [s.init for s in after] == [s.init for s in before]
    init = load_model("tiny-sd1").initializer_vectors(after[0].init, 1)[0]
    assert all(s.target[0].shape == (1, 32) and not torch.allclose(s.target[0], init) for s in after)
    assert not any((tmp_path / "t" / ".partial").iterdir())  # the groups' saved states go with their shard
    stamp = out[0].stat().st_mtime_ns
    out[1].unlink()  # as if interrupted during the second shard
    assert main(args) == 0
    assert out[0].stat().st_mtime_ns == stamp and out[1].is_file()
    assert main(["data", "targets", str(tmp_path / "s"), "--model", "tiny-sd1", "--out", str(tmp_path / "s")]) == 2
    capsys.readouterr()  # other settings into the same OUT skipped every shard and reported success
    assert main([*args[:-2], "--steps", "5", "--out", str(tmp_path / "t")]) == 2
    assert "steps: 2 there, 5 now" in capsys.readouterr().err and out[0].stat().st_mtime_ns == stamp
    assert main([*args[:4], "tiny-sd2", *args[5:]]) == 2
    assert "'tiny-sd1' there, 'tiny-sd2' now" in capsys.readouterr().err
    # --continue starts from the existing targets: at a negligible rate they come back unchanged.
    more = ["data", "targets", str(tmp_path / "t"), "--model", "tiny-sd1", "--steps", "1", "--continue",
            "--base-lr", "1e-12", "--out", str(tmp_path / "t2")]
    assert main(more) == 0
    for old, new in zip(after, read_shard(tmp_path / "t2" / out[0].name)):
        torch.testing.assert_close(new.target[0], old.target[0], atol=1e-6, rtol=0)
    assert main(["data", "targets", str(tmp_path / "s"), "--model", "tiny-sd1", "--continue",
                 "--out", str(tmp_path / "t3")]) == 2  # nothing to continue from


def test_ti_data_targets_continues_a_group_after_an_interruption(tiny_dirs, tmp_path, monkeypatch, capsys):
    import oneword.encoder.targets as targets
    import oneword.inversion.multi as multi
    from oneword.cli import main
    from oneword.inversion.checkpoint import load_state
    from oneword.inversion.loss import denoising_loss

    write_shards(toy_samples(limit=2, images=2, size=32), tmp_path / "s", per_shard=2)
    args = ["data", "targets", str(tmp_path / "s"), "--model", "tiny-sd1", "--steps", "3", "--out", str(tmp_path / "t")]
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return denoising_loss(*a, **kw)

    monkeypatch.setattr(targets, "SAVE_EVERY", 1)
    monkeypatch.setattr(multi, "denoising_loss", interrupted)
    assert main(args) == 130
    assert "the same command continues" in capsys.readouterr().err
    (state,) = (tmp_path / "t" / ".partial").iterdir()
    assert load_state(state).step == 2 and not list((tmp_path / "t").glob("*.tar"))
    stale = state.with_name("concepts-000000-000064.safetensors")  # as if from a run with another --group
    stale.write_bytes(b"")
    calls.clear()
    monkeypatch.setattr(multi, "denoising_loss", lambda *a, **kw: calls.append(1) or denoising_loss(*a, **kw))
    assert main(args) == 0
    assert len(calls) == 1 and len(list((tmp_path / "t").glob("*.tar"))) == 1  # only the third step ran
    assert not any((tmp_path / "t" / ".partial").iterdir())


def test_ti_data_targets_from_an_encoder(tiny_dirs, tmp_path):
    """--from-encoder starts each inversion at the encoder's prediction for the sample's images: at a
    negligible rate the targets are that prediction."""
    from oneword.cli import main
    from oneword.encoder.model import predict_embeddings
    from oneword.encoder.shards import read_shard

    enc, model = tiny_encoder()
    path = save_encoder(enc, tmp_path / "enc.safetensors")
    write_shards(toy_samples(limit=3, images=2, size=32), tmp_path / "s", per_shard=4)
    args = ["data", "targets", str(tmp_path / "s"), "--model", "tiny-sd1", "--steps", "1", "--base-lr", "1e-12",
            "--from-encoder", str(path), "--out", str(tmp_path / "t")]
    assert main(args) == 0
    samples = read_shard(next((tmp_path / "t").glob("*.tar")))
    expected = predict_embeddings(load_encoder(path), model, [s.images for s in samples], [s.init for s in samples])
    init = model.initializer_vectors(samples[0].init, 1)[0]
    for s, e in zip(samples, expected):
        torch.testing.assert_close(s.target[0], e[0], atol=1e-5, rtol=0)
        assert not torch.allclose(s.target[0], init, atol=1e-3)  # the encoder moved it off the initializer
    assert main(args[:-2] + ["--continue", "--out", str(tmp_path / "t2")]) == 2  # one start, not two
    other, _ = tiny_encoder("sdxl")  # two text encoders: not for tiny-sd1
    save_encoder(other, tmp_path / "sdxl.safetensors")
    assert main(args[:7] + ["--from-encoder", str(tmp_path / "sdxl.safetensors"), "--out", str(tmp_path / "t3")]) == 2


def test_the_map_head_reads_texture_that_pooling_loses():
    """Stripes against checks with the same per-channel mean, max and spread: a linear probe on the
    pooled statistics (what the UNet features keep) is at chance, the trained MapHead is not."""
    import runpy
    from pathlib import Path

    probe = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "feature_probe.py"))
    g = torch.Generator().manual_seed(0)
    r = torch.arange(8)
    stripes, checks = (-1.0) ** r[:, None].expand(8, 8), (-1.0) ** (r[:, None] + r[None, :])

    def maps(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        base = torch.stack([(stripes if c == 0 else checks).roll(int(s), 0)
                            for c, s in zip(y, torch.randint(0, 2, (n,), generator=g))])
        return base[:, None].repeat(1, 4, 1, 1) + 0.3 * torch.randn(n, 4, 8, 8, generator=g), y

    (xtr, ytr), (xte, yte) = maps(256), maps(128)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3)), x.std((2, 3))], 1)

    _, linear = probe["probe_accuracy"](pooled(xtr), ytr, pooled(xte), yte, 2)
    _, head = probe["head_accuracy"](xtr, ytr, xte, yte, 2, steps=150, width=8)
    assert linear < 0.7 and head > 0.95, (linear, head)
