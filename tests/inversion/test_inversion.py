"""Textual inversion end to end on the miniature models: learning, frozen weights, files that
diffusers loads, resume, divergence and interruption."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from oneword.data.images import load_folder
from oneword.errors import InputError, TrainingDivergedError
from oneword.inversion.config import InversionConfig
from oneword.inversion.loss import denoising_loss
from oneword.inversion.train import Inversion, run_inversion
from oneword.models import load_model


def _loss_interrupted_at(call: int, calls: list[int]):
    """The denoising loss, raising KeyboardInterrupt (as Ctrl-C would) at its ``call``-th use."""

    def loss(*args, **kw):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return denoising_loss(*args, **kw)

    return loss


def small_cfg(**kw) -> InversionConfig:
    base = dict(
        token="<red-disc>",
        init="disc",
        steps=4,
        batch_size=2,
        resolution=32,
        views_per_image=2,
        save_every=2,
        preview_every=0,
        preview_steps=2,
        seed=3,
    )
    base.update(kw)
    return InversionConfig(**base)


def fixed_eval_loss(inv: Inversion) -> float:
    """The objective on one fixed batch (same views, noise, timesteps every call)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        latents = inv.bank.sample(8, g)
        cond = inv.model.encode_text(["a photo of <red-disc>"] * 8)
        ts = torch.linspace(50, 950, 8).long()
        return denoising_loss(inv.model, latents, cond, g, timesteps=ts).mean().item()


@pytest.mark.slow
def test_loss_falls_and_frozen_weights_are_untouched(tiny_dirs, concept_dir):
    model = load_model("tiny-sd1")
    # A random miniature barely listens to its text; amplifying its cross-attention output makes
    # the text pathway, hence the concept's loss as a function of the vectors, measurable.
    with torch.no_grad():
        for name, mod in model.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                mod.weight.mul_(10)
    frozen = {
        name: {k: v.clone() for k, v in mod.state_dict().items()}
        for name, mod in [("unet", model.unet), ("vae", model.vae), ("te", model.text_encoders[0])]
    }
    inv = Inversion(model, load_folder(concept_dir), small_cfg(base_lr=5e-2, steps=40, weight_decay=0.0))
    start = inv.model.vectors_of("<red-disc>")[0].clone()
    before = fixed_eval_loss(inv)
    for _ in range(40):
        inv.train_step()
    after = fixed_eval_loss(inv)
    assert after < before * 0.997, (before, after)
    assert not torch.equal(inv.model.vectors_of("<red-disc>")[0], start)
    now = {"unet": model.unet, "vae": model.vae, "te": model.text_encoders[0]}
    for name, mod in now.items():
        state = mod.state_dict()
        for key, value in frozen[name].items():
            key2 = key.replace("token_embedding.weight", "token_embedding.base.weight")
            assert torch.equal(state[key2], value), f"{name}.{key} changed"
    # Only the new vectors are parameters of the optimizer.
    assert [p.shape for g in inv.optimizer.param_groups for p in g["params"]] == [torch.Size([1, 32])]


def _diffusers_prompt_embeds(folder: Path, run: Path, family: str, prompt: str, single_file: bool):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    token = "<red-disc>"
    if family == "sdxl":
        if single_file:
            sd = load_file(str(run / "red-disc.safetensors"))
            l_vecs, g_vecs = sd["clip_l"], sd["clip_g"]
        else:
            l_vecs = load_file(str(run / "learned_embeds.safetensors"))[token]
            g_vecs = load_file(str(run / "learned_embeds_2.safetensors"))[token]
        pipe.load_textual_inversion(
            l_vecs, token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            g_vecs, token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return pe, pooled
    path = run / ("red-disc.safetensors" if single_file else "learned_embeds.safetensors")
    pipe.load_textual_inversion(str(path), token=token)
    pe, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return pe, None


@pytest.mark.slow
@pytest.mark.parametrize("single_file", [False, True])
def test_files_load_in_diffusers_with_same_text_encoding(
    tiny_dirs, concept_dir, tmp_path, family, single_file
):
    model = load_model(f"tiny-{family}")
    run = tmp_path / "run"
    res = run_inversion(
        model, load_folder(concept_dir), small_cfg(steps=2, num_vectors=2), run, progress=False
    )
    names = {p.name for p in res.files}
    assert {"learned_embeds.safetensors", "red-disc.safetensors"} <= names
    assert ("learned_embeds_2.safetensors" in names) == (family == "sdxl")
    prompt = "a painting of <red-disc> on the beach"
    ours = model.encode_text([prompt])
    theirs, pooled = _diffusers_prompt_embeds(tiny_dirs[family], run, family, prompt, single_file)
    torch.testing.assert_close(theirs, ours.hidden_states, rtol=1e-5, atol=1e-5)
    if family == "sdxl":
        torch.testing.assert_close(pooled, ours.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_run_folder_and_resume_matches_uninterrupted(tiny_dirs, concept_dir, tmp_path):
    images = load_folder(concept_dir)
    full = run_inversion(load_model("tiny-sd2"), images, small_cfg(steps=6), tmp_path / "a", progress=False)
    half = run_inversion(load_model("tiny-sd2"), images, small_cfg(steps=3), tmp_path / "b", progress=False)
    assert half.step == 3
    with pytest.raises(InputError, match="already holds files"):
        run_inversion(load_model("tiny-sd2"), images, small_cfg(steps=6), tmp_path / "b", progress=False)
    resumed = run_inversion(
        load_model("tiny-sd2"), images, small_cfg(steps=6), tmp_path / "b", resume=True, progress=False
    )
    assert resumed.step == 6
    torch.testing.assert_close(resumed.embedding.vectors[0], full.embedding.vectors[0], rtol=0, atol=1e-6)
    rows_a = list(csv.reader((tmp_path / "a" / "loss.csv").read_text().splitlines()))
    rows_b = list(csv.reader((tmp_path / "b" / "loss.csv").read_text().splitlines()))
    assert [r[:2] for r in rows_a] == [r[:2] for r in rows_b] and len(rows_a) == 7
    for name in ("config.yaml", "loss.png", "checkpoints/last.safetensors"):
        assert (tmp_path / "b" / name).is_file()
    assert InversionConfig.from_yaml((tmp_path / "b" / "config.yaml").read_text()).steps == 6
    with pytest.raises(InputError, match="settings differ"):
        run_inversion(
            load_model("tiny-sd2"),
            images,
            small_cfg(steps=8, reg_weight=1.0),
            tmp_path / "b",
            resume=True,
            progress=False,
        )


@pytest.mark.slow
def test_resume_checks_its_inputs(tiny_dirs, concept_dir, tmp_path, caplog):
    """A checkpoint continues only on its images and its kind of model, up to --steps; a lower
    --base_lr (what a divergence message advises) may continue it."""
    from conftest import make_concept_images

    images = load_folder(concept_dir)
    run_inversion(load_model("tiny-sd1"), images, small_cfg(steps=2), tmp_path / "r", progress=False)
    other = load_folder(make_concept_images(tmp_path / "other", n=2))
    with pytest.raises(InputError, match="other images"):
        run_inversion(
            load_model("tiny-sd1"), other, small_cfg(steps=3), tmp_path / "r", resume=True, progress=False
        )
    with pytest.raises(InputError, match="sd2"):
        run_inversion(
            load_model("tiny-sd2"), images, small_cfg(steps=3), tmp_path / "r", resume=True, progress=False
        )
    with pytest.raises(InputError, match="at step 2, past --steps 1"):
        run_inversion(
            load_model("tiny-sd1"), images, small_cfg(steps=1), tmp_path / "r", resume=True, progress=False
        )
    with caplog.at_level("WARNING"):
        done = run_inversion(
            load_model("tiny-sd1"),
            images,
            small_cfg(steps=3, base_lr=1e-3),
            tmp_path / "r",
            resume=True,
            progress=False,
        )
    assert done.step == 3 and "at base_lr 0.001" in caplog.text
    cosine = small_cfg(steps=2, lr_schedule="cosine")
    run_inversion(load_model("tiny-sd1"), images, cosine, tmp_path / "c", progress=False)
    with pytest.raises(InputError, match="steps"):  # the schedule's length: every step's rate
        run_inversion(
            load_model("tiny-sd1"),
            images,
            dataclasses.replace(cosine, steps=4),
            tmp_path / "c",
            resume=True,
            progress=False,
        )
    (tmp_path / "c" / "config.yaml").write_text("steps: [unclosed")
    with pytest.raises(InputError, match="config.yaml is damaged"):
        run_inversion(load_model("tiny-sd1"), images, cosine, tmp_path / "c", resume=True, progress=False)
    with pytest.raises(ValueError, match="flip_p"):
        small_cfg(flip_p=3)


@pytest.mark.slow
def test_a_run_that_stopped_before_its_first_checkpoint_starts_over(
    tiny_dirs, concept_dir, tmp_path, monkeypatch
):
    """A divergence (or an out-of-memory crash) before the first checkpoint left a folder that was
    neither resumable nor reusable."""
    import oneword.inversion.group as group

    monkeypatch.setattr(group, "denoising_loss", lambda *a, **kw: denoising_loss(*a, **kw) * float("nan"))
    images = load_folder(concept_dir)
    with pytest.raises(TrainingDivergedError):
        run_inversion(load_model("tiny-sd1"), images, small_cfg(steps=3), tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "config.yaml").is_file() and not (tmp_path / "r" / "checkpoints").exists()
    monkeypatch.setattr(group, "denoising_loss", denoising_loss)
    with pytest.raises(InputError, match="nothing to resume"):
        run_inversion(
            load_model("tiny-sd1"), images, small_cfg(steps=3), tmp_path / "r", resume=True, progress=False
        )
    assert (
        run_inversion(load_model("tiny-sd1"), images, small_cfg(steps=3), tmp_path / "r", progress=False).step
        == 3
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not ours")
    with pytest.raises(InputError, match="already holds files"):  # someone else's files are never removed
        run_inversion(load_model("tiny-sd1"), images, small_cfg(steps=1), tmp_path / "mine", progress=False)


@pytest.mark.slow
def test_previews_are_written(tiny_dirs, concept_dir, tmp_path):
    from PIL import Image

    cfg = small_cfg(steps=2, preview_every=2, preview_prompts=["a photo of {}"], preview_seeds=[0, 1])
    run_inversion(load_model("tiny-sdxl"), load_folder(concept_dir), cfg, tmp_path / "r", progress=False)
    grid = Image.open(tmp_path / "r" / "previews" / "step_000002.png")
    assert grid.size[0] > 2 * 32 and "<red-disc>" in grid.text["prompts"]


def test_nan_loss_stops_and_keeps_finite_vectors(tiny_dirs, concept_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    import oneword.inversion.group as group

    def flaky(*args, **kw):
        calls["n"] += 1
        loss = denoising_loss(*args, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(group, "denoising_loss", flaky)
    with pytest.raises(TrainingDivergedError, match="step 3"):
        run_inversion(
            load_model("tiny-sd1"),
            load_folder(concept_dir),
            small_cfg(steps=5),
            tmp_path / "r",
            progress=False,
        )
    from oneword.inversion.embedding_io import load_embedding

    emb = load_embedding(tmp_path / "r" / "learned_embeds.safetensors")
    assert torch.isfinite(emb.vectors[0]).all() and emb.metadata["oneword.steps"] == "2"


@pytest.mark.slow
def test_interrupt_saves_a_checkpoint_that_resumes(tiny_dirs, concept_dir, tmp_path, monkeypatch):
    real = Inversion.train_step

    def interrupting(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Inversion, "train_step", interrupting)
    images = load_folder(concept_dir)
    res = run_inversion(load_model("tiny-sd1"), images, small_cfg(steps=4), tmp_path / "r", progress=False)
    assert res.interrupted and res.step == 2
    monkeypatch.setattr(Inversion, "train_step", real)
    res = run_inversion(
        load_model("tiny-sd1"), images, small_cfg(steps=4), tmp_path / "r", resume=True, progress=False
    )
    assert not res.interrupted and res.step == 4


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_steps(tiny_dirs, concept_dir):
    images = load_folder(concept_dir)
    results = []
    for ckpt in (False, True):
        inv = Inversion(load_model("tiny-sd1"), images, small_cfg(gradient_checkpointing=ckpt))
        losses = [inv.train_step() for _ in range(2)]
        results.append((losses, inv.model.vectors_of("<red-disc>")[0]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bf16_weights_train_fp32_vectors(tiny_dirs, concept_dir):
    model = load_model("tiny-sdxl", dtype="bf16")
    inv = Inversion(model, load_folder(concept_dir), small_cfg(mixed_precision="bf16"))
    loss = inv.train_step()
    assert math.isfinite(loss) and all(p.dtype == torch.float32 for p in inv.params)
    assert model.unet.dtype == torch.bfloat16


def test_cosine_schedule_decays_to_zero_and_constant_stays():
    cfg = InversionConfig(steps=10, base_lr=1e-3, batch_size=2, lr_schedule="cosine")
    rates = [cfg.lr_at(i) for i in range(cfg.steps)]
    assert (
        rates[0] == pytest.approx(2e-3)
        and rates == sorted(rates, reverse=True)
        and rates[-1] < 0.03 * rates[0]
    )
    assert all(
        r == pytest.approx(2e-3)
        for r in (InversionConfig(base_lr=1e-3, batch_size=2).lr_at(i) for i in (0, 9))
    )
    with pytest.raises(ValueError, match="lr_schedule"):
        InversionConfig(lr_schedule="linear")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_invert_many_with_one_concept_is_the_single_run(tiny_dirs, concept_dir, schedule):
    from oneword.inversion.multi import invert_many

    cfg = small_cfg(steps=3, reg_weight=0.01, base_lr=5e-2, lr_schedule=schedule)
    images = load_folder(concept_dir)
    single = Inversion(load_model("tiny-sd1"), images, cfg)
    for _ in range(cfg.steps):
        single.train_step()
    (batched,) = invert_many(load_model("tiny-sd1"), [[im.image for im in images]], [cfg.init], cfg)
    start = load_model("tiny-sd1").initializer_vectors(cfg.init, 1)[0]
    learned = single.model.vectors_of(cfg.token)[0]
    assert not torch.allclose(learned, start)
    torch.testing.assert_close(batched[0], learned, rtol=1e-4, atol=1e-6)
    assert single.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr_at(cfg.steps - 1))


@pytest.mark.slow
def test_invert_many_resumes_exactly_from_its_checkpoint(
    tiny_dirs, concept_dir, tmp_path, monkeypatch, caplog
):
    """``ti data targets`` spends most of an hour on one group: an interruption costs at most
    ``save_every`` steps, and the continued run ends where an uninterrupted one does."""
    import oneword.inversion.group as group
    import oneword.inversion.multi as multi

    images = [[im.image for im in load_folder(concept_dir)]]
    cfg = small_cfg(steps=4, base_lr=5e-2, lr_schedule="cosine")
    model = load_model("tiny-sd1")
    (whole,) = multi.invert_many(model, images, ["disc"], cfg)
    state = tmp_path / "part.safetensors"
    calls: list[int] = []
    monkeypatch.setattr(group, "denoising_loss", _loss_interrupted_at(3, calls))  # after step 2's state
    with pytest.raises(KeyboardInterrupt):
        multi.invert_many(model, images, ["disc"], cfg, checkpoint=state, save_every=2)
    monkeypatch.setattr(group, "denoising_loss", lambda *a, **kw: calls.append(1) or denoising_loss(*a, **kw))
    calls.clear()
    (resumed,) = multi.invert_many(model, images, ["disc"], cfg, checkpoint=state, save_every=2)
    assert len(calls) == 2  # steps 3 and 4 only
    torch.testing.assert_close(resumed[0], whole[0], rtol=1e-5, atol=1e-7)
    calls.clear()  # a finished state is the answer: no step runs again
    (again,) = multi.invert_many(model, images, ["disc"], cfg, checkpoint=state, save_every=2)
    assert calls == [] and torch.equal(again[0], resumed[0])
    with caplog.at_level("WARNING"):  # saved for another initializer word: ignored, not continued
        (other,) = multi.invert_many(model, images, ["bar"], cfg, checkpoint=state, save_every=2)
    assert len(calls) == 4 and "starting over" in caplog.text
    (fresh,) = multi.invert_many(model, images, ["bar"], cfg)
    torch.testing.assert_close(other[0], fresh[0], rtol=1e-5, atol=1e-7)
    start = [[v * 1.5 for v in model.initializer_vectors("bar", 1)]]
    multi.invert_many(model, images, ["bar"], cfg, checkpoint=state, starts=start)
    caplog.clear()
    with caplog.at_level("WARNING"):  # other starts (e.g. another encoder's predictions): not continued
        multi.invert_many(model, images, ["bar"], cfg, checkpoint=state, starts=[[v * 2 for v in start[0]]])
    assert "starting over" in caplog.text
    state.write_bytes(b"not a state")
    caplog.clear()
    with caplog.at_level("WARNING"):
        (again,) = multi.invert_many(model, images, ["bar"], cfg, checkpoint=state)
    assert "cannot be read" in caplog.text
    torch.testing.assert_close(again[0], fresh[0], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_invert_many_checkpoints_gradients_on_request_and_keys_states_by_dtype(tiny_dirs, concept_dir):
    """``ti data targets --gradient-checkpointing`` (memory grows with the group) gives the same
    words; a state saved from fp16 weights is not continued by an fp32 run, nor the reverse."""
    from oneword.inversion.multi import fingerprint, invert_many

    images = [[im.image for im in load_folder(concept_dir)]]
    cfg = small_cfg(steps=2, base_lr=5e-2)
    model = load_model("tiny-sd1")
    calls: list[int] = []
    # a pre-hook: a recomputation stops once it has what the backward needs, before any forward hook;
    # a layer after cross-attention: only those are on the path of the gradient to the word
    model.unet.up_blocks[-1].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    (plain,) = invert_many(model, images, ["disc"], cfg)
    plain_calls = len(calls)
    ckpt = dataclasses.replace(cfg, gradient_checkpointing=True)
    (checkpointed,) = invert_many(model, images, ["disc"], ckpt)
    assert len(calls) - plain_calls == 2 * plain_calls  # the backward pass ran each layer again
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-5, atol=1e-7)
    invert_many(model, images, ["disc"], cfg)  # a reused model follows each call's setting
    assert not model.unet.is_gradient_checkpointing
    key = fingerprint(model, images, ["disc"], cfg, False)
    assert fingerprint(model, images, ["disc"], ckpt, False) == key  # memory only: a state carries over
    assert fingerprint(load_model("tiny-sd1", dtype="fp16"), images, ["disc"], cfg, False) != key


@pytest.mark.parametrize("concepts", [1, 2])
def test_invert_many_with_a_gradient_scaler_resumes_exactly(
    tiny_dirs, concept_dir, tmp_path, monkeypatch, concepts
):
    """fp16 weights on CUDA get a gradient scaler (this machine has none: a CPU scaler takes its
    place); its scale is saved with the group's state and restored for the whole group, so an
    interrupted run still ends where an uninterrupted one does, and it matches the unscaled run up
    to rounding."""
    import oneword.inversion.group as group
    import oneword.inversion.multi as multi

    images = [[im.image for im in load_folder(concept_dir)]] * concepts
    words = ["disc", "bar"][:concepts]
    cfg = small_cfg(steps=4, base_lr=5e-2)
    model = load_model("tiny-sd1")
    unscaled = multi.invert_many(model, images, words, cfg)
    scalers: list[torch.amp.GradScaler] = []
    monkeypatch.setattr(
        group,
        "grad_scaler",
        lambda m: (
            scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)) or scalers[-1]
        ),
    )
    whole = multi.invert_many(model, images, words, cfg)
    for w, u in zip(whole, unscaled):
        torch.testing.assert_close(w[0], u[0], rtol=1e-4, atol=1e-6)
    assert scalers[-1].get_scale() == 2.0**14  # grew every step: the scaled path ran
    state = tmp_path / "part.safetensors"
    monkeypatch.setattr(group, "denoising_loss", _loss_interrupted_at(3, []))
    with pytest.raises(KeyboardInterrupt):
        multi.invert_many(model, images, words, cfg, checkpoint=state, save_every=2)
    monkeypatch.setattr(group, "denoising_loss", denoising_loss)
    resumed = multi.invert_many(model, images, words, cfg, checkpoint=state, save_every=2)
    assert scalers[-1].get_scale() == 2.0**14  # the saved scale (2 ** 12) grew twice more
    for r, w in zip(resumed, whole):
        torch.testing.assert_close(r[0], w[0], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_invert_many_learns_each_concept_on_its_own_token(tiny_dirs, concept_dir, tmp_path):
    from conftest import make_concept_images

    from oneword.inversion.multi import invert_many

    other = make_concept_images(tmp_path / "other", n=2, size=(32, 32))
    sets = [[im.image for im in load_folder(d)] for d in (concept_dir, other)]
    model = load_model("tiny-sdxl")
    out = invert_many(model, sets, ["disc", "bar"], small_cfg(steps=2, base_lr=5e-2))
    fresh = load_model("tiny-sdxl")
    for vecs, word in zip(out, ["disc", "bar"]):
        assert [tuple(v.shape) for v in vecs] == [(1, w) for w in fresh.widths]
        assert all(
            torch.isfinite(v).all() and not torch.allclose(v, s)
            for v, s in zip(vecs, fresh.initializer_vectors(word, 1))
        )
    assert not torch.allclose(out[0][0], out[1][0])
    assert list(model.placeholder_tokens) == ["<ow-group-1>"]  # one token, whatever the number of concepts
    (again,) = invert_many(
        model, sets[:1], ["disc"], small_cfg(steps=2, base_lr=5e-2)
    )  # the model is reusable
    assert all(torch.isfinite(v).all() for v in again)
    other_token = load_model("tiny-sdxl")
    other_token.add_placeholder("<mine>", other_token.initializer_vectors("disc", 1))
    with pytest.raises(ValueError, match="without placeholder"):
        invert_many(other_token, sets[:1], ["disc"], small_cfg(steps=1))


def test_small_reference_images_are_reported(tiny_dirs, caplog):
    """A 256 px photo trained at SD's 512 px is upscaled and the word learns the blur: say so."""
    from PIL import Image

    from oneword.inversion.bank import AugmentConfig, build_bank

    model = load_model("tiny-sd1")
    aug = AugmentConfig(resolution=32, views_per_image=1)
    with caplog.at_level("WARNING"):
        build_bank(model, [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (40, 40), "blue")], aug, 0)
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        bank = build_bank(
            model, [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (24, 16), "blue")], aug, 0
        )
    assert "1 of 2 reference images are smaller than the 32 px" in caplog.text and "16 px" in caplog.text
    assert bank.mean.shape[0] == 2  # still used
