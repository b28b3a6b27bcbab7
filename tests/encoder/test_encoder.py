"""The encoder: mapper shapes and scale per family, order invariance, UNet features, export/import,
and ti-encode end to end on the miniature models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import encoder_file as _encoder_file
from conftest import tiny_encoder
from PIL import Image

from oneword.encoder.model import (
    FORMAT,
    EncoderConfig,
    load_encoder,
    save_encoder,
    token_scale,
)
from oneword.encoder.unet_features import (
    unet_feature_dim,
    unet_features,
    unet_features_and_map,
    unet_map_channels,
)
from oneword.errors import InputError
from oneword.models import load_model
from oneword.trainstate import read_safetensors, write_safetensors


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def _init(model, n: int, num_vectors: int = 1, word: str = "dog"):
    return [v[None].expand(n, -1, -1) for v in model.initializer_vectors(word, num_vectors)]


@pytest.mark.parametrize(
    "family,unet,map_width",
    [
        ("sd1", False, 0),
        ("sd2", False, 0),
        ("sdxl", False, 0),
        ("sd1", True, 0),
        ("sdxl", True, 0),
        ("sdxl", True, 8),
    ],
)
@pytest.mark.slow
def test_mapper_shapes_and_scale(tiny_dirs, family, unet, map_width):
    enc, model = tiny_encoder(family, num_vectors=2, unet=unet, map_width=map_width)
    init = _init(model, 3, 2)
    out = enc.predict([_images(2), _images(4, 1), _images(1, 2)], init, model)
    assert len(out) == 3 and [tuple(v.shape) for v in out[0]] == [(2, w) for w in model.widths]
    for j, s in enumerate(token_scale(model)):
        offset = (out[0][j] - init[j][0]).norm(dim=-1)
        assert torch.all(offset > 0.05 * s) and torch.all(offset < 20 * s)  # on the scale of real words
    fresh, _ = tiny_encoder(
        family, num_vectors=2, randomize=False, unet=unet, map_width=map_width
    )  # untrained = the initializer
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


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["blocks", "resnets", "multiscale"])
def test_unet_features_see_the_image_and_need_the_model(tiny_dirs, layout, family):
    enc, model = tiny_encoder(family, unet=True, layout=layout)
    imgs = _images(3)
    f = unet_features(model, imgs, layout)
    assert f.shape == (3, unet_feature_dim(model.unet, layout)) and torch.isfinite(f).all()
    assert torch.allclose(
        unet_features(model, imgs[:1], layout), f[:1], rtol=1e-4, atol=1e-4
    )  # batch-independent
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

    assert (
        get_args(get_type_hints(EncoderModule.__init__)["unet_layout"]) == LAYOUTS
    )  # the CLI offers them all


def test_multiscale_layout_is_resnets_at_two_scales(tiny_dirs):
    """``multiscale`` = ``resnets`` at the model's resolution, then ``resnets`` of the 2x-upsampled view."""
    model = load_model("tiny-sd1")
    imgs = _images(2)
    ms, one = unet_features(model, imgs, "multiscale"), unet_features(model, imgs, "resnets")
    assert unet_feature_dim(model.unet, "multiscale") == 2 * one.shape[1] == ms.shape[1]
    assert torch.allclose(ms[:, : one.shape[1]], one, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(
        ms[:, one.shape[1] :], one, rtol=1e-2, atol=1e-2
    )  # the finer view reads differently


@pytest.mark.slow
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


@pytest.mark.slow
def test_export_import_round_trip(tiny_dirs, tmp_path):
    enc, model = tiny_encoder()
    path = save_encoder(enc, tmp_path / "enc.safetensors")
    back = load_encoder(path, space=enc.space)
    assert back.cfg == enc.cfg
    layered, _ = tiny_encoder(unet=True, layout="resnets")
    assert (
        load_encoder(save_encoder(layered, tmp_path / "l.safetensors"), space=enc.space).cfg.unet_layout
        == "resnets"
    )
    mapped, _ = tiny_encoder(unet=True, layout="multiscale", map_width=8)
    back_mapped = load_encoder(save_encoder(mapped, tmp_path / "m.safetensors"), space=enc.space)
    assert back_mapped.cfg == mapped.cfg and back_mapped.cfg.map_channels > 0
    torch.testing.assert_close(
        back_mapped.predict([_images(2)], _init(model, 1), model),
        mapped.predict([_images(2)], _init(model, 1), model),
    )
    tensors, meta = read_safetensors(path, fmt=FORMAT)  # a file from before unet_layout and the map head
    cfg = json.loads(meta["config"])
    for key in ("unet_layout", "map_channels", "map_width"):
        del cfg[key]
    old = write_safetensors(tmp_path / "old.safetensors", tensors, {**meta, "config": json.dumps(cfg)})
    assert load_encoder(old, space=enc.space).cfg.unet_layout == "blocks"
    assert load_encoder(old, space=enc.space).cfg.map_channels == 0
    imgs = _images(3)
    assert torch.equal(
        enc.predict([imgs], _init(model, 1))[0][0], back.predict([imgs], _init(model, 1))[0][0]
    )
    half = load_encoder(
        save_encoder(enc, tmp_path / "half.safetensors", dtype=torch.float16), space=enc.space
    )
    assert path.stat().st_size > 1.8 * (tmp_path / "half.safetensors").stat().st_size
    assert all(p.dtype == torch.float32 for p in half.mapper.parameters())  # loading casts back
    torch.testing.assert_close(
        half.predict([imgs], _init(model, 1))[0][0],
        enc.predict([imgs], _init(model, 1))[0][0],
        rtol=0,
        atol=1e-2,
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError):
        load_encoder(bad)


@pytest.mark.slow
@pytest.mark.parametrize("refine,select", [(0, 2), (2, 0), (2, 1), (2, None)])
def test_ti_encode_end_to_end(tiny_dirs, concept_dir, tmp_path, refine, select, capsys):
    from conftest import make_concept_images

    from oneword.cli.encode import main
    from oneword.encoder.pipeline import REFINE_DEFAULTS, select_samples
    from oneword.fileio import sha256_file
    from oneword.inversion.config import InversionConfig
    from oneword.inversion.embedding_io import load_embedding

    other = make_concept_images(tmp_path / "other", n=2)
    out, enc_file = tmp_path / "out", _encoder_file(tmp_path)
    code = main(
        [
            str(concept_dir),
            str(other),
            "--encoder",
            str(enc_file),
            "--init",
            "disc",
            "--refine",
            str(refine),
            "--out",
            str(out),
            "--batch_size",
            "1",
            "--resolution",
            "32",
            "--views_per_image",
            "1",
            "--preview-steps",
            "2",
            "--no-progress",
            "--sample-batch",
            "3",
            *(["--select", str(select)] if select is not None else []),
        ]
    )
    assert code == 0
    assert ("without --refine it does nothing" in capsys.readouterr().err) == (
        select is not None and not refine
    )
    select = select_samples(refine, select)  # omitted: the default round trip judges the refinement
    for name, token in (("concept", "<concept>"), ("other", "<other>")):
        run = out / name
        for f in (
            "learned_embeds.safetensors",
            f"{name}.safetensors",
            "preview.png",
            "report.md",
            "encode.json",
        ):
            assert (run / f).is_file(), f
        e = load_embedding(run / "learned_embeds.safetensors")
        report = json.loads((run / "encode.json").read_text())
        assert report["refinement"].startswith(f"{refine} steps")
        kept = report.get("kept", "refined" if refine else "prediction")
        assert ("kept" in report) == bool(select) and kept in ("prediction", "refined")
        assert e.token == token and e.metadata["oneword.steps"] == (
            "0" if kept == "prediction" else str(refine)
        )
        # the encoder is named by file name and hash: people share words, not where they keep encoders
        assert e.metadata["oneword.encoder"] == "enc.safetensors" and "/" not in e.metadata["oneword.encoder"]
        assert e.metadata["oneword.encoder_sha256"] == sha256_file(enc_file)
        if select:
            assert "round-trip distances" in report and "prediction" in report["round-trip distances"]
        assert ((run / "loss.csv").is_file()) == (refine > 0)
        if refine:  # refinement runs at ti-encode's own rate, not scratch inversion's
            cfg = InversionConfig.from_yaml((run / "config.yaml").read_text())
            assert cfg.base_lr == REFINE_DEFAULTS["base_lr"] != InversionConfig.base_lr


def test_ti_encode_refinement_defaults_show_in_help():
    from oneword.cli.encode import build_parser
    from oneword.encoder.pipeline import DEFAULT_SELECT, REFINE_DEFAULTS, select_samples

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


@pytest.mark.slow
def test_ti_encode_errors(tiny_dirs, concept_dir, tmp_path, capsys):
    from oneword.cli.encode import main

    enc = str(_encoder_file(tmp_path))
    assert main([str(concept_dir), "--encoder", enc, "--model", "tiny-sdxl", "--init", "disc"]) == 2
    assert "widths" in capsys.readouterr().err
    assert main([str(concept_dir), "--encoder", str(tmp_path / "missing.safetensors"), "--init", "x"]) == 2
    assert main([str(concept_dir), "--encoder", enc, "--init", "disc", "--refine", "-1"]) == 2
    assert (
        main(
            [
                str(concept_dir),
                "--encoder",
                enc,
                "--init",
                "disc",
                "--refine",
                "2",
                "--select",
                "-1",
                "--out",
                str(tmp_path / "neg"),
            ]
        )
        == 2
    )
    assert "--select" in capsys.readouterr().err and not (tmp_path / "neg").exists()  # nothing written
    assert (
        main(
            [
                str(concept_dir),
                "--encoder",
                enc,
                "--init",
                "disc",
                "--refine",
                "2",
                "--sample-batch",
                "0",
                "--out",
                str(tmp_path / "nob"),
            ]
        )
        == 2
    )
    assert "--sample-batch" in capsys.readouterr().err and not (tmp_path / "nob").exists()
    assert (
        main(
            [
                str(concept_dir),
                str(concept_dir),
                "--encoder",
                enc,
                "--init",
                "disc",
                "--token",
                "<a>",
                "<A>",
                "--out",
                str(tmp_path / "case"),
            ]
        )
        == 2
    )  # one token to CLIP (and to some file systems)
    assert "same token" in capsys.readouterr().err and not (tmp_path / "case").exists()


def test_ti_encode_with_the_toy_encoder_on_a_real_model_fails_before_loading_it(
    concept_dir, tmp_path, monkeypatch, capsys
):
    """`ti-encode photos/ --model sdxl` without --encoder used to load SDXL (minutes) only to
    report mismatched widths; now it says at once what to do."""
    import oneword.models
    from oneword.cli.encode import main

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
    from oneword.cli.encode import main

    other = tmp_path / "other"
    shutil.copytree(concept_dir, other)
    (tmp_path / "o" / "concept").mkdir(parents=True)
    (tmp_path / "o" / "concept" / "report.md").write_text("an earlier run")
    monkeypatch.setattr(oneword.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main([str(other), str(concept_dir), "--init", "disc", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "neither resumes nor overwrites" in err and "--resume" not in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["concept"]  # other/ was not written


def test_the_map_head_reads_texture_that_pooling_loses():
    """Stripes against checks with the same per-channel mean, max and spread: a linear probe on the
    pooled statistics (what the UNet features keep) is at chance, the trained MapHead is not."""
    import runpy
    from pathlib import Path

    probe = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "feature_probe.py"))
    g = torch.Generator().manual_seed(0)
    r = torch.arange(8)
    stripes, checks = (-1.0) ** r[:, None].expand(8, 8), (-1.0) ** (r[:, None] + r[None, :])

    def maps(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        base = torch.stack(
            [
                (stripes if c == 0 else checks).roll(int(s), 0)
                for c, s in zip(y, torch.randint(0, 2, (n,), generator=g))
            ]
        )
        return base[:, None].repeat(1, 4, 1, 1) + 0.3 * torch.randn(n, 4, 8, 8, generator=g), y

    (xtr, ytr), (xte, yte) = maps(256), maps(128)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3)), x.std((2, 3))], 1)

    _, linear = probe["probe_accuracy"](pooled(xtr), ytr, pooled(xte), yte, 2)
    _, head = probe["head_accuracy"](xtr, ytr, xte, yte, 2, steps=150, width=8)
    assert linear < 0.7 and head > 0.95, (linear, head)
