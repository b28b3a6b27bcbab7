"""Training the encoder with Lightning on the miniature models: a fit and its resume, the shipped
configs, DDP and accumulation seeds, Ctrl-C, exports, refused targets and shard counts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_encoder
from PIL import Image

from oneword.data.shards import write_shards
from oneword.encoder.model import load_encoder
from oneword.errors import InputError
from oneword.toy.concepts import toy_samples
from oneword.trainstate import read_safetensors


@pytest.mark.slow
def test_lightning_fit_and_resume(tiny_dirs, tmp_path):
    import lightning as L

    from oneword.encoder.lit import ConceptShards, EncoderModule, ExportEncoder

    write_shards(toy_samples(limit=8, images=3, size=32), tmp_path / "shards", per_shard=4)

    def fit(steps: int, ckpt=None):
        module = EncoderModule(
            model="tiny-sd1", clip="random", hidden=32, depth=1, warmup_steps=1, template="toy"
        )
        data = ConceptShards(
            str(tmp_path / "shards"), batch_size=2, max_refs=2, val_fraction=0.25, shuffle_buffer=4
        )
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            default_root_dir=str(tmp_path / "run"),
            logger=L.pytorch.loggers.CSVLogger(str(tmp_path / "run")),
            limit_val_batches=1,
            val_check_interval=2,
            check_val_every_n_epoch=None,
            enable_progress_bar=False,
            callbacks=[
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=1
                ),
                ExportEncoder(str(tmp_path / "enc.safetensors")),
            ],
        )
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


@pytest.mark.slow
def test_encoder_training_can_checkpoint_the_unet(tiny_dirs):
    from oneword.encoder.lit import EncoderModule

    for on in (False, True):
        module = EncoderModule(
            model="tiny-sd1", clip="random", hidden=32, depth=1, template="toy", gradient_checkpointing=on
        )
        assert module.ldm.unet.is_gradient_checkpointing is on


def test_targets_from_another_model_are_refused(tiny_dirs):
    """SDXL targets fed to an SD 1.x encoder were distilled toward silently (the first encoder's
    vectors); the other way round crashed with an IndexError."""
    from oneword.encoder.lit import EncoderModule

    module = EncoderModule(
        model="tiny-sd1", clip="random", hidden=32, depth=1, template="toy", distill_weight=0.1
    )
    image = Image.new("RGB", (32, 32), "red")
    batch = {
        "key": ["a", "b"],
        "refs": [[image], [image]],
        "target": [image, image],
        "init": ["disc", "disc"],
        "background": [None, None],
        "target_vectors": [None, [torch.zeros(1, 32)]],
    }
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
        data = ConceptShards(
            str(tmp_path / "shards"), batch_size=1, min_refs=1, max_refs=3, val_fraction=0.1, shuffle_buffer=1
        )
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

    enc, _ = tiny_encoder()
    module = SimpleNamespace(encoder=enc)
    path = tmp_path / "best.safetensors"
    cb = ExportEncoder(str(path), monitor="val/distill")
    exported = []
    for step, value in [(1, 5.0), (2, 3.0), (3, 4.0), (4, float("nan")), (5, 2.5), (6, 2.6)]:
        trainer = SimpleNamespace(
            is_global_zero=True,
            sanity_checking=False,
            global_step=step,
            callback_metrics={"val/distill": torch.tensor(value)},
        )
        cb.on_validation_end(trainer, module)
        exported.append(int(read_safetensors(path)[1]["step"]))
        cb.on_train_end(trainer, module)  # a monitored export is not overwritten at the end
    assert exported == [1, 2, 2, 2, 5, 5]
    assert float(read_safetensors(path)[1]["best"]) == 2.5
    resumed = ExportEncoder(str(path), monitor="val/distill")
    resumed.load_state_dict(cb.state_dict())
    trainer = SimpleNamespace(
        is_global_zero=True,
        sanity_checking=False,
        global_step=7,
        callback_metrics={"val/distill": torch.tensor(2.7)},
    )
    resumed.on_validation_end(trainer, module)
    assert read_safetensors(path)[1]["step"] == "5"
    with pytest.raises(KeyError, match="val/missing"):
        ExportEncoder(str(path), monitor="val/missing").on_validation_end(trainer, module)


@pytest.mark.slow
def test_lightning_cli_with_the_toy_config(tiny_dirs, tmp_path, monkeypatch):
    from pathlib import Path

    from oneword.cli.train_encoder import cli_main

    config = Path(__file__).resolve().parents[2] / "configs" / "encoder" / "toy.yaml"
    write_shards(toy_samples(limit=6, images=3, size=32), tmp_path / "shards", per_shard=6)
    monkeypatch.chdir(tmp_path)  # the config's run folders are relative
    args = [
        "fit",
        "--config",
        str(config),
        "--model.model",
        "tiny-sd1",
        "--model.clip",
        "random",
        "--model.hidden",
        "32",
        "--model.depth",
        "1",
        "--model.unet_features",
        "true",
        "--model.unet_map",
        "8",
        "--data.shards",
        str(tmp_path / "shards"),
        "--data.batch_size",
        "2",
        "--data.val_fraction",
        "0.3",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    cli_main(args + ["--trainer.max_steps", "2"])
    run = tmp_path / "runs" / "encoder" / "toy"
    assert (run / "encoder.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    first_log = (run / "logs" / "version_0" / "metrics.csv").read_text()
    cli_main(args + ["--trainer.max_steps", "3", "--ckpt_path", "last"])  # the resume a user types
    assert (
        run / "logs" / "version_0" / "metrics.csv"
    ).read_text() == first_log  # the first run's log is kept
    assert (run / "logs" / "version_1" / "metrics.csv").is_file()
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    cfg = load_encoder(run / "encoder.safetensors").cfg
    assert cfg.unet_dim > 0 and cfg.unet_layout == "multiscale"  # the config's UNet features were wired in
    assert cfg.map_channels > 0 and cfg.map_width == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy", "sd15", "sd21", "sdxl"])
def test_every_shipped_config_parses(name, capsys):
    """The real-model configs cannot be fitted here (no weights), but a misspelt or removed option
    in one fails the parse: LightningCLI checks every key against the classes' signatures."""
    from pathlib import Path

    from oneword.cli.train_encoder import cli_main

    config = Path(__file__).resolve().parents[2] / "configs" / "encoder" / f"{name}.yaml"
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert f"  model: {name}\n" in printed
    if name == "sdxl":
        assert "gradient_checkpointing: true" in printed


@pytest.mark.slow
def test_training_interrupted_by_ctrl_c_resumes_where_it_stopped(tiny_dirs, tmp_path, monkeypatch, capsys):
    """Ctrl-C lost every step since the last periodic checkpoint (up to 999 with sd15.yaml), and a
    rerun without --ckpt_path replaced the exported encoder with an untrained one's."""
    from pathlib import Path

    from oneword.cli.train_encoder import cli_main
    from oneword.encoder.lit import EncoderModule

    config = Path(__file__).resolve().parents[2] / "configs" / "encoder" / "toy.yaml"
    write_shards(toy_samples(limit=12, images=3, size=32), tmp_path / "shards", per_shard=12)
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(config),
        "--model.model",
        "tiny-sd1",
        "--model.clip",
        "random",
        "--model.hidden",
        "32",
        "--model.depth",
        "1",
        "--model.unet_features",
        "false",
        "--model.unet_map",
        "0",
        "--data.shards",
        str(tmp_path / "shards"),
        "--data.batch_size",
        "2",
        "--data.val_fraction",
        "0.5",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.val_check_interval",
        "1",
    ]
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
    monkeypatch.setattr(
        EncoderModule, "training_step", lambda self, b, i: steps.append(self.global_step) or real(self, b, i)
    )
    cli_main(args + ["--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert steps == [2, 3]  # continued at the step Ctrl-C stopped, not from the start


def test_data_options_are_explained_in_help(capsys):
    from oneword.cli.train_encoder import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "--data.shards SHARDS the training shards" in printed and "every worker of every rank" in printed
