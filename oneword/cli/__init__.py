"""ti: learn, encode, use and evaluate pseudo-words for text-to-image diffusion models.

The command line: one jsonargparse parser with a subcommand per module of this package, each
module a ``build_parser(prog)`` and a ``run(args)``. Thin: it parses arguments, calls library
functions and prints progress. Every command takes ``--config FILE`` (see :mod:`.options`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys

from oneword.cli.options import HelpFormatter, run_reporting_errors

#: Subcommands and their modules, in the order ``ti --help`` lists them.
COMMANDS = {
    "encode": "oneword.cli.encode",
    "invert": "oneword.cli.invert",
    "batch": "oneword.cli.batch",
    "serve": "oneword.cli.serve",
    "generate": "oneword.cli.generate",
    "info": "oneword.cli.info",
    "toy": "oneword.cli.toy",
    "data": "oneword.cli.data",
    "eval": "oneword.cli.eval",
}

#: ``ti train-encoder ARGS`` is ``ti-train-encoder ARGS``: Lightning's own CLI, run before parsing.
DELEGATED = {
    "train-encoder": (
        "train an encoder: LightningCLI fit/validate (ti-train-encoder)",
        "oneword.cli.train_encoder",
        "cli_main",
    ),
}


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="ti", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subcommands(required=True, dest="subcommand")
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)

        def attach(p, name=name, text=mod.HELP):
            sub.add_subcommand(name, p, help=text)
            p.prog = f"ti {name}"

        if "attach" in inspect.signature(mod.build_parser).parameters:  # a group of subcommands
            mod.build_parser(f"ti {name}", attach)
        else:
            attach(mod.build_parser(f"ti {name}"))
    for name, (text, module, _) in DELEGATED.items():  # listed in --help; run before parsing (see main)
        delegated = ArgumentParser(
            prog=f"ti {name}", description=f"{text}; `ti {name} --help` shows its options ({module})"
        )
        sub.add_subcommand(name, delegated, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        _, module, function = DELEGATED[argv[0]]
        code = getattr(importlib.import_module(module), function)(argv[1:])
        return code or 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose or args.get(f"{args.subcommand}.verbose") else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    command = importlib.import_module(COMMANDS[args.subcommand]).run
    return run_reporting_errors(command, args[args.subcommand])


if __name__ == "__main__":
    sys.exit(main())
