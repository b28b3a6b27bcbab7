"""The shipped toy model: it loads through oneword's loader and through plain diffusers, its files
are readable by everyone, and it draws what a prompt names (checked by the oracle on a few samples)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from oneword.models import load_model
from oneword.sampling import SampleSettings, generate_images
from oneword.toy import weights_dir


@pytest.mark.slow
def test_loads_through_the_project_loader():
    model = load_model("toy")
    assert model.family == "toy" and model.widths == [128] and model.resolution == 32
    assert model.prediction_type == "epsilon"


@pytest.mark.slow
def test_loads_through_plain_diffusers_and_samples():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(weights_dir()), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo of a red star on a teal background",
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_files_are_world_readable():
    for dirpath, _, files in os.walk(weights_dir()):
        for f in files:
            assert os.stat(os.path.join(dirpath, f)).st_mode & stat.S_IROTH, f


@pytest.mark.slow
def test_background_and_fill_prompts_are_honoured():
    from oneword.toy.oracle import load_oracle

    model = load_model("toy")
    oracle = load_oracle()
    settings = SampleSettings(steps=20, guidance=5.0, seeds=[0, 1, 2, 3])
    images = generate_images(
        model, ["a photo of a object on a teal background", "a photo of a yellow object"], settings
    )
    preds = oracle.predict(images)
    assert sum(p["background"] == "teal" for p in preds[:4]) >= 3
    assert sum(p["fill"] == "yellow" for p in preds[4:]) >= 3


@pytest.mark.slow
def test_ti_encode_with_the_shipped_toy_encoder(tmp_path):
    from pathlib import Path

    from oneword.cli.encode import main
    from oneword.inversion.embedding_io import load_embedding

    concept = Path(__file__).resolve().parents[2] / "examples" / "toy" / "purple-triangle-solid-gold"
    assert main([str(concept), "--refine", "0", "--out", str(tmp_path), "--preview-steps", "2"]) == 0
    emb = load_embedding(tmp_path / "purple-triangle-solid-gold" / "learned_embeds.safetensors")
    init = load_model("toy").initializer_vectors("triangle", 1)[0]
    assert emb.token == "<purple-triangle-solid-gold>" and emb.vectors[0].shape == (1, 128)
    assert not torch.allclose(emb.vectors[0], init)  # the trained encoder moves off the initializer


@pytest.mark.slow
def test_conditioning_probe_sees_the_fill_word():
    """The shipped model leans on fill words: a wrong fill in the prompt raises the denoising loss
    at mid noise, and the fill prompts' text states lie apart."""
    from oneword.toy.quality import conditioning_gap, text_separation

    model = load_model("toy")
    gap = conditioning_gap(model, "fill", n=16, timesteps=(300,))
    assert gap[300] > 0.05
    assert text_separation(model, "fill") > 1.0
