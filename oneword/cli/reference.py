"""The command-line reference (``docs/cli.md``), generated from the commands' own ``--help``.

    python -m oneword.cli.reference > docs/cli.md

A test regenerates it and fails when the file is stale, so the reference is always what ``--help``
prints (at a fixed width of :data:`WIDTH` columns).
"""

from __future__ import annotations

import argparse
import os
import sys

WIDTH = 100

HEADER = """# Command-line reference

Generated from `--help` by `python -m oneword.cli.reference > docs/cli.md` (a test fails when this
file is stale). Every command takes `--config FILE`: a YAML file of its options, keyed by their
names with underscores (`--print_config` writes one; a run folder's `config.yaml` is one for
`ti invert`); options after it on the command line override it. Each option is listed with dashes;
its underscore spelling is accepted too. `ti encode` is `ti-encode`; `ti train-encoder` (`ti-train-encoder`) is Lightning's
CLI over the encoder: `ti train-encoder fit --help` lists its options, and
[encoder.md](encoder.md#train-an-encoder) explains them.
"""


def _walk(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, argparse.ArgumentParser]]:
    from oneword.cli import DELEGATED

    out = [(name, parser)]
    for action in parser._actions:  # argparse (and jsonargparse) keep subcommands here
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                if sub_name not in DELEGATED:  # documented under their own name
                    out += _walk(sub, f"{name} {sub_name}")
    return out


def render() -> str:
    """The whole reference as Markdown."""
    from oneword.cli import build_parser

    sections = [HEADER]
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH + 2)  # argparse wraps at the terminal's width less 2
    try:
        for name, parser in _walk(build_parser(), "ti"):
            sections.append(f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(sections)


if __name__ == "__main__":
    sys.stdout.write(render())
