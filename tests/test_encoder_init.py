"""Fine-tuning an encoder: training that starts from an exported encoder file's weights
(``--model.init_from``), and its errors for a file that does not fit."""

from __future__ import annotations

import pytest
import torch

from oneword.encoder.model import save_encoder
from oneword.errors import InputError

KW = {"model": "tiny-sd1", "clip": "random", "hidden": 32, "depth": 1, "template": "toy"}


def _heads(module) -> list[torch.Tensor]:
    return [h.weight.detach().clone() for h in module.encoder.mapper.heads]


def test_training_starts_from_an_exported_encoder(tiny_dirs, tmp_path):
    from oneword.encoder.lit import EncoderModule

    trained = EncoderModule(**KW)
    torch.manual_seed(0)
    for head in trained.encoder.mapper.heads:  # fresh heads start at zero; these have learned something
        torch.nn.init.normal_(head.weight, std=0.2)
    path = save_encoder(trained.encoder, tmp_path / "enc.safetensors")
    warm = EncoderModule(**KW, init_from=str(path))
    want = trained.encoder.mapper.state_dict()
    got = warm.encoder.mapper.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not any(torch.equal(a, b) for a, b in zip(_heads(EncoderModule(**KW)), _heads(warm)))
    assert warm.hparams.init_from == str(path)  # recorded in the checkpoint's hyperparameters

    with pytest.raises(InputError, match="hidden: file 32, config 16"):
        EncoderModule(**{**KW, "hidden": 16}, init_from=str(path))
    with pytest.raises(InputError, match="family: file 'sd1', config 'sdxl'"):
        EncoderModule(**{**KW, "model": "tiny-sdxl"}, init_from=str(path))


@pytest.mark.parametrize("bad", ["start file", "shards"])
def test_ti_train_encoder_reports_bad_input_in_one_line(tiny_dirs, tmp_path, capsys, monkeypatch, bad):
    from oneword.encoder.lit import cli_main

    monkeypatch.chdir(tmp_path)  # Lightning's default run folder
    args = ["fit", "--model.model", "tiny-sd1", "--model.clip", "random", "--model.hidden", "32",
            "--data.shards", str(tmp_path / "no-shards"), "--trainer.max_steps", "1"]
    if bad == "start file":
        args += ["--model.init_from", str(tmp_path / "missing.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert ("missing.safetensors" if bad == "start file" else "no-shards") in err[-1]
    assert not any("Traceback" in line for line in err)
