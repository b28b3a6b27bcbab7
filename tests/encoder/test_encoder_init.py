"""Fine-tuning an encoder: training that starts from an exported encoder file's weights
(``--model.init_from``), its resume without the file, and its errors for a file that does not fit."""

from __future__ import annotations

import json

import pytest
import torch

from oneword.data.shards import write_shards
from oneword.encoder.model import FORMAT, save_encoder
from oneword.errors import InputError
from oneword.toy.concepts import toy_samples
from oneword.trainstate import read_safetensors, write_safetensors

KW = {"model": "tiny-sd1", "clip": "random", "hidden": 32, "depth": 1, "template": "toy", "warmup_steps": 1}


def _heads(module) -> list[torch.Tensor]:
    return [h.weight.detach().clone() for h in module.encoder.mapper.heads]


def _trained_file(tmp_path):
    """An exported encoder whose heads are not the fresh zeros."""
    from oneword.encoder.lit import EncoderModule

    trained = EncoderModule(**KW)
    torch.manual_seed(0)
    for head in trained.encoder.mapper.heads:
        torch.nn.init.normal_(head.weight, std=0.2)
    return trained, save_encoder(trained.encoder, tmp_path / "enc.safetensors")


def _edited(path, out, **changes):
    """A copy of the encoder file at ``path`` with its header's config changed."""
    tensors, meta = read_safetensors(path, fmt=FORMAT)
    cfg = {**json.loads(meta["config"]), **changes}
    return write_safetensors(out, tensors, {**meta, "config": json.dumps(cfg)})


@pytest.mark.slow
def test_a_fresh_fit_starts_from_an_exported_encoder(tiny_dirs, tmp_path):
    from oneword.encoder.lit import EncoderModule

    trained, path = _trained_file(tmp_path)
    warm = EncoderModule(**KW, init_from=str(path))
    assert warm.hparams.init_from == str(path)  # recorded in the checkpoint's hyperparameters
    warm.on_fit_start()
    want, got = trained.encoder.mapper.state_dict(), warm.encoder.mapper.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not any(torch.equal(a, b) for a, b in zip(_heads(EncoderModule(**KW)), _heads(warm)))

    # Settings of parts the encoder lacks, the model's name and offset scales within 2 % do not block ...
    scale = json.loads(read_safetensors(path, fmt=FORMAT)[1]["config"])["offset_scale"]
    loose = _edited(
        path,
        tmp_path / "loose.safetensors",
        map_width=64,
        unet_layout="multiscale",
        model="elsewhere/sd",
        offset_scale=[s * 1.01 for s in scale],
    )
    EncoderModule(**KW, init_from=str(loose)).on_fit_start()
    # ... a different architecture or target model does, naming each field.
    with pytest.raises(InputError, match="hidden: file 32, config 16"):
        EncoderModule(**{**KW, "hidden": 16}, init_from=str(path)).on_fit_start()
    with pytest.raises(InputError, match="family: file 'sd1', config 'sdxl'"):
        EncoderModule(**{**KW, "model": "tiny-sdxl"}, init_from=str(path)).on_fit_start()
    far = _edited(path, tmp_path / "far.safetensors", offset_scale=[s * 1.05 for s in scale])
    with pytest.raises(InputError, match="offset_scale"):
        EncoderModule(**KW, init_from=str(far)).on_fit_start()
    with pytest.raises(InputError, match="does not exist; --model.init_from"):
        EncoderModule(**KW, init_from=str(tmp_path / "missing.safetensors")).on_fit_start()


@pytest.mark.slow
def test_fit_resume_and_export_guard_with_a_start_file(tiny_dirs, tmp_path):
    import lightning as L

    from oneword.encoder.lit import ConceptShards, EncoderModule, ExportEncoder

    trained, path = _trained_file(tmp_path)
    write_shards(toy_samples(limit=4, images=3, size=32), tmp_path / "shards", per_shard=4)

    def fit(steps: int, export, ckpt=None):
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            default_root_dir=str(tmp_path / "run"),
            logger=False,
            limit_val_batches=0,
            enable_progress_bar=False,
            callbacks=[
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=1
                ),
                ExportEncoder(str(export)),
            ],
        )
        module = EncoderModule(**KW, init_from=str(path))
        trainer.fit(
            module,
            ConceptShards(
                str(tmp_path / "shards"), batch_size=2, max_refs=2, val_fraction=0.25, shuffle_buffer=4
            ),
            ckpt_path=ckpt,
        )
        return trainer, module

    with pytest.raises(InputError, match="overwrite"):  # exporting onto the start file would lose it
        fit(1, path)
    assert read_safetensors(path, fmt=FORMAT)[1].get("step") is None  # untouched
    _, module = fit(1, tmp_path / "out.safetensors")
    for got, want in zip(
        _heads(module), _heads(trained)
    ):  # one small step from the file's weights, not zeros
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    path.unlink()  # the start file is gone: a resume takes the checkpoint's weights and never reads it
    trainer, module = fit(2, tmp_path / "out.safetensors", ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 2


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["start file", "shards"])
def test_ti_train_encoder_reports_bad_input_in_one_line(tiny_dirs, tmp_path, capsys, monkeypatch, bad):
    from oneword.cli.train_encoder import cli_main

    monkeypatch.chdir(tmp_path)  # Lightning's default run folder
    write_shards(toy_samples(limit=4, images=3, size=32), tmp_path / "shards", per_shard=4)
    args = [
        "fit",
        "--model.model",
        "tiny-sd1",
        "--model.clip",
        "random",
        "--model.hidden",
        "32",
        "--data.shards",
        str(tmp_path / ("no-shards" if bad == "shards" else "shards")),
        "--trainer.max_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    if bad == "start file":
        args += ["--model.init_from", str(tmp_path / "missing.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert ("missing.safetensors" if bad == "start file" else "no-shards") in err[-1]
    assert not any("Traceback" in line for line in err)
