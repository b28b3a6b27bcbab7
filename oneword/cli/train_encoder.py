"""``ti train-encoder`` (also ``ti-train-encoder``): LightningCLI over the encoder's
:class:`~oneword.encoder.lit.EncoderModule` and :class:`~oneword.encoder.lit.ConceptShards`.

    ti train-encoder fit --config configs/encoder/toy.yaml
    ti train-encoder fit --config configs/encoder/toy.yaml --ckpt_path last   # resume
"""

from __future__ import annotations

from oneword.cli.options import run_reporting_errors


def cli_main(args: list[str] | None = None) -> None:
    """Run the encoder's LightningCLI on ``args`` (default: the process's arguments)."""
    from lightning.pytorch.cli import LightningCLI

    from oneword.encoder.lit import ConceptShards, EncoderModule, refuse_replacing_an_export

    class CLI(LightningCLI):
        def before_fit(self) -> None:
            refuse_replacing_an_export(self.trainer, getattr(self.config[self.subcommand], "ckpt_path", None))

    def run(_args) -> int:
        CLI(
            EncoderModule,
            ConceptShards,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
        )
        return 0

    code = run_reporting_errors(run, None)  # bad shards or --model.init_from: one line, not a traceback
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    cli_main()
