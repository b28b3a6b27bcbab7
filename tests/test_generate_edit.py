"""Local editing (Blended Latent Diffusion) and img2img: ``oneword.generate`` and ``ti generate``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from oneword.cli import main
from oneword.errors import ImageError, InputError, OneWordError
from oneword.generate import (
    IMG2IMG_STRENGTH,
    MASKED_STRENGTH,
    decode_latents,
    denoise_from,
    edit_images,
    encode_image,
    latent_mask,
    load_init,
    resolve_strength,
    steps_to_run,
)
from oneword.sampling import SampleSettings, negative_conditioning

PROMPT = "a photo of a disc"


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    """``tiny(family)``: the miniature model of ``family``, loaded once per module."""
    from oneword.models import load_model

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(f"tiny-{family}")
        return cache[family]

    return get


def _scene(folder: Path, size: tuple[int, int] = (64, 48)) -> Path:
    """A non-square picture: a red disc and a yellow bar on blue, with texture everywhere."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arr = (rng.random((size[1], size[0], 3)) * 60 + np.array([20, 60, 140])).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    d.ellipse([20, 10, 44, 34], fill=(220, 30, 30))
    d.rectangle([8, 36, 56, 42], fill=(250, 220, 0))
    img.save(folder / "scene.png")
    return folder / "scene.png"


def _mask(folder: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (64, 48)) -> Path:
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    m.save(folder / "mask.png")
    return folder / "mask.png"


def _diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean(-1)


def _pipe_kwargs(cond, neg) -> dict:
    kw = dict(prompt_embeds=cond.hidden_states, negative_prompt_embeds=neg.hidden_states)
    if cond.pooled is not None:
        kw.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=neg.pooled)
    return kw


def test_img2img_is_diffusers_img2img(tiny, family, tmp_path):
    """Noising to strength's timestep, guidance, SDXL's conditioning, v-prediction (sd2) and Euler
    (sdxl): the same latents as diffusers' img2img pipelines, to the bit."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    model = tiny(family)
    image, _ = load_init(_scene(tmp_path)).at(model.resolution)
    z = encode_image(model, image)
    seeds, settings = [3, 4], SampleSettings(steps=10, seeds=[3, 4], guidance=5.0)
    cond, neg = model.encode_text([PROMPT] * 2), negative_conditioning(model, "", 2)
    ours = denoise_from(model, cond, neg, seeds, settings, z, 0.6)
    cls = StableDiffusionXLImg2ImgPipeline if model.is_sdxl else StableDiffusionImg2ImgPipeline
    theirs = cls.from_pipe(model.pipeline)(
        image=z.expand(2, -1, -1, -1).clone(),  # 4 channels: taken as latents, not encoded
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="latent",
        **_pipe_kwargs(cond, neg),
    ).images
    assert torch.equal(theirs.float(), ours)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_masked_edit_is_diffusers_latent_blending(tiny, family, strength, tmp_path):
    """The blend is diffusers' inpainting pipeline with a plain (4-channel) UNet, to the bit, and
    the latents outside the mask end as the init image's exactly."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    model = tiny(family)
    size = model.resolution
    image, _ = load_init(_scene(tmp_path)).at(size)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 4, size // 4, 3 * size // 4 - 1, 5 * size // 8 - 1], fill=255)
    z = encode_image(model, image)
    cell = latent_mask(mask, z.shape[-1])
    assert 0 < cell.float().mean() < 0.5
    seeds, settings = [3, 4], SampleSettings(steps=10, seeds=[3, 4], guidance=5.0)
    cond, neg = model.encode_text([PROMPT] * 2), negative_conditioning(model, "", 2)
    ours = denoise_from(model, cond, neg, seeds, settings, z, strength, cell)
    outside = ~cell[0, 0]
    assert torch.equal(ours[..., outside], z.expand(2, -1, -1, -1)[..., outside])
    assert (ours - z).abs()[..., ~outside].mean() > 0.1
    cls = StableDiffusionXLInpaintPipeline if model.is_sdxl else StableDiffusionInpaintPipeline
    pipe = cls.from_pipe(model.pipeline)
    pipe._encode_vae_image = lambda image, generator: z.expand(image.shape[0], -1, -1, -1).clone()
    theirs = pipe(
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=10,
        guidance_scale=5.0,
        height=size,
        width=size,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="latent",
        **_pipe_kwargs(cond, neg),
    ).images
    assert torch.equal(theirs.float(), ours)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_masked_edit_with_a_word_keeps_the_outside(tiny, family, tmp_path):
    model = tiny(family)
    init = load_init(_scene(tmp_path), _mask(tmp_path, (16, 4, 47, 35)))
    image, mask = init.at(model.resolution)
    inside = np.asarray(mask) >= 128
    model.add_placeholder("<thing>", [torch.randn(1, w) for w in model.widths])
    try:
        settings = SampleSettings(steps=6, seeds=[0, 1], batch=2)
        word, plain = (edit_images(model, [p], settings, init) for p in ["a photo of <thing>", PROMPT])
        unpasted = edit_images(model, ["a photo of <thing>"], settings, init, paste=False)
    finally:
        model.clear_placeholders()
    for edited in [*word, *plain]:
        d = _diff(edited, image)
        assert d[~inside].max() == 0 and d[inside].mean() > 10
    assert _diff(word[0], plain[0])[inside].mean() > 1  # the word is in the prompt
    assert word[1].tobytes() != word[0].tobytes()  # one image per seed
    # without pasting, the outside is what the VAE decodes from the original's latents
    recon = decode_latents(model, encode_image(model, image))[0][0]
    assert _diff(unpasted[0], recon)[~inside].mean() < _diff(unpasted[0], recon)[inside].mean()
    assert _diff(unpasted[0], word[0])[inside].max() == 0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_img2img_strength_sets_how_far_from_the_init(tiny, family, tmp_path):
    """In latents (the tiny models' VAE is random, so pixels say little): low strength stays near
    the init image's latents, strength 1 ignores them; a seed gives the same image in any batch."""
    model = tiny(family)
    init = load_init(_scene(tmp_path))
    image, _ = init.at(model.resolution)
    z = encode_image(model, image)
    cond, neg = model.encode_text([PROMPT]), negative_conditioning(model, "", 1)
    far = {}
    for s in (0.1, 1.0):
        out = denoise_from(model, cond, neg, [0], SampleSettings(steps=20), z, s)
        far[s] = (out - z).abs().mean().item()
    assert far[0.1] < 0.5 * far[1.0], far
    settings = SampleSettings(steps=4, seeds=[5, 6, 7], batch=3)
    whole = edit_images(model, [PROMPT], settings, init, 0.5)
    split = edit_images(model, [PROMPT], SampleSettings(steps=4, seeds=[5, 6, 7], batch=2), init, 0.5)
    again = edit_images(model, [PROMPT], SampleSettings(steps=4, seeds=[6]), init, 0.5)
    for a, b in zip(whole, split, strict=True):
        assert _diff(a, b).max() <= 1
    assert _diff(again[0], whole[1]).max() <= 1 and _diff(whole[0], whole[1]).mean() > 1


def test_strength_rules():
    assert resolve_strength(None, masked=True) == MASKED_STRENGTH == 1.0
    assert resolve_strength(None, masked=False) == IMG2IMG_STRENGTH == 0.8
    assert resolve_strength(0.3, masked=True) == 0.3
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(OneWordError, match=r"\(0, 1\]"):
            resolve_strength(bad, masked=False)
    assert steps_to_run(50, 0.8) == 40 and steps_to_run(10, 1.0) == 10 and steps_to_run(10, 0.1) == 1
    with pytest.raises(OneWordError, match="runs no denoising step"):
        steps_to_run(10, 0.05)


def test_bad_init_images_and_masks(tiny, tmp_path):
    scene = _scene(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputError, match="does not exist"):
        load_init(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="broken.png"):
        load_init(tmp_path / "broken.png")
    with pytest.raises(ImageError, match="broken.png"):
        load_init(scene, tmp_path / "broken.png")
    with pytest.raises(InputError, match="does not exist"):
        load_init(scene, tmp_path / "nomask.png")
    with pytest.raises(InputError, match="shape"):
        load_init(scene, _mask(tmp_path, (0, 0, 9, 9), size=(48, 48)))
    with pytest.raises(InputError, match="no white pixel"):
        load_init(scene, _dark(tmp_path))
    model = tiny("sd1")
    dot = load_init(scene, _mask(tmp_path, (30, 20, 30, 20)))  # 1 px of 64: under half a latent cell
    with pytest.raises(InputError, match="covers no latent cell"):
        edit_images(model, [PROMPT], SampleSettings(steps=2), dot)
    with pytest.raises(OneWordError, match="runs no denoising step"):
        edit_images(model, [PROMPT], SampleSettings(steps=4), load_init(scene), strength=0.2)


def _dark(folder: Path) -> Path:
    """A mask with no pixel >= 128: nothing to edit."""
    Image.new("L", (64, 48), 100).save(folder / "dark.png")
    return folder / "dark.png"


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--mask", "{mask}"], "--mask needs --init-image"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--init-image", "{scene}", "--strength", "0"], "(0, 1]"),
        (["--init-image", "{scene}", "--strength", "1.2"], "(0, 1]"),
        (["--init-image", "{scene}", "--strength", "0.01"], "runs no denoising step"),
        (["--init-image", "{missing}"], "does not exist"),
        (["--init-image", "{scene}", "--mask", "{missing}"], "does not exist"),
        (["--init-image", "{broken}"], "cannot use image"),
        (["--init-image", "{scene}", "--curate", "2", "--reference", "{scene}"], "--curate does not work"),
    ],
)
def test_cli_refuses_bad_edit_input_before_loading(tmp_path, capsys, monkeypatch, extra, expect):
    import oneword.models

    monkeypatch.setattr(oneword.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    names = {
        "scene": _scene(tmp_path),
        "mask": _mask(tmp_path, (10, 10, 30, 30)),
        "missing": tmp_path / "missing.png",
        "broken": tmp_path / "broken.png",
    }
    names["broken"].write_bytes(b"not an image at all")
    args = [a.format(**names) for a in extra]
    out = tmp_path / "out.png"
    assert main(["generate", "--model", "tiny-sd1", "--prompt", PROMPT, *args, "--out", str(out)]) == 2
    assert expect in _error(capsys) and not out.exists()


def test_cli_edits_and_records_what_it_started_from(tiny_dirs, tmp_path):
    import hashlib

    scene, mask = _scene(tmp_path), _mask(tmp_path, (16, 4, 47, 35))
    base = ["generate", "--model", "tiny-sdxl", "--prompt", PROMPT, "-n", "2", "--steps", "3", "--zoom", "1"]
    assert (
        main([*base, "--init-image", str(scene), "--mask", str(mask), "--out", str(tmp_path / "e.png")]) == 0
    )
    grid = Image.open(tmp_path / "e.png")
    meta = grid.text
    assert meta["init_image_sha256"] == hashlib.sha256(scene.read_bytes()).hexdigest()
    assert meta["mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    assert meta["strength"] == "1.0" and meta["paste"] == "True" and meta["seeds"] == "[0, 1]"
    pad = 2
    assert grid.size == (2 * 32 + 3 * pad, 32 + 2 * pad)
    tile = grid.convert("RGB").crop((pad, pad, pad + 32, pad + 32))
    image, m = load_init(scene, mask).at(32)
    d = _diff(tile, image)
    inside = np.asarray(m) >= 128
    assert d[~inside].max() == 0 and d[inside].mean() > 10
    assert (
        main([*base, "--init-image", str(scene), "--strength", "0.5", "--out", str(tmp_path / "i.png")]) == 0
    )
    meta = Image.open(tmp_path / "i.png").text
    assert meta["strength"] == "0.5" and "mask" not in meta and meta["init_image"] == str(scene)


@pytest.mark.slow
def test_toy_edit_and_img2img_in_pixels(tmp_path):
    """On the trained toy model (its VAE reconstructs images), in pixels (0-255, mean over RGB)."""
    from oneword.models import load_model

    model = load_model("toy")
    scene = (
        Path(__file__).parents[1] / "examples/toy/purple-triangle-solid-gold/purple-triangle-solid-gold-0.png"
    )
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle([8, 0, 63, 47], fill=255)
    m.save(tmp_path / "mask.png")
    init = load_init(scene, tmp_path / "mask.png")
    image, mask = init.at(model.resolution)
    inside = np.asarray(mask) >= 128
    settings = SampleSettings(steps=20, seeds=[0, 1], guidance=5.0)
    for paste, limit in ((False, 8.0), (True, 0.0)):
        for edited in edit_images(model, ["a photo of a yellow star"], settings, init, paste=paste):
            d = _diff(edited, image)
            assert d[~inside].mean() <= limit and d[inside].mean() > 30, (
                paste,
                d[~inside].mean(),
                d[inside].mean(),
            )
    plain = load_init(scene)
    far = {
        s: _diff(edit_images(model, ["a photo of a purple triangle"], settings, plain, s)[0], image).mean()
        for s in (0.1, 1.0)
    }
    assert far[0.1] < 8 and far[1.0] > 30, far
