"""``ti info``: load a model and print what oneword sees in it."""

from __future__ import annotations

from oneword.cli.options import model_options, new_parser

HELP = "load a model and print what oneword sees in it"


def build_parser(prog: str = "ti info"):
    p = new_parser(prog, HELP[0].upper() + HELP[1:] + ".")
    model_options(p)
    return p


def run(args) -> int:
    from oneword.models import load_model

    print(load_model(args.model, device=args.device).describe())
    return 0
