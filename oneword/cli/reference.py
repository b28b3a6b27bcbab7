"""The command-line reference (``docs/cli.md``), generated from the commands' own ``--help``.

    python -m oneword.cli.reference > docs/cli.md

A test regenerates it and fails when the file is stale, so the reference is always what ``--help``
prints (at a fixed width of :data:`WIDTH` columns).
"""

from __future__ import annotations

import argparse
import sys

WIDTH = 100

HEADER = """# Command-line reference

Generated from `--help` by `python -m oneword.cli.reference > docs/cli.md` (a test fails when this
file is stale). `ti encode` is `ti-encode`; `ti train-encoder` (`ti-train-encoder`) is Lightning's
CLI over the encoder: `ti train-encoder fit --help` lists its options, and
[encoder.md](encoder.md#train-an-encoder) explains them.
"""


def _fixed_width(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH)  # type: ignore[assignment]


def _walk(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(name, parser)]
    for action in parser._actions:  # argparse keeps its subcommands here
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                if sub.add_help:  # delegated commands are documented under their own name
                    out += _walk(sub, f"{name} {sub_name}")
    return out


def render() -> str:
    """The whole reference as Markdown."""
    from oneword.cli import build_parser
    from oneword.cli.encode import build_parser as encode_parser

    sections = [HEADER]
    for name, parser in [*_walk(build_parser(), "ti"), ("ti encode", encode_parser())]:
        _fixed_width(parser)
        sections.append(f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(sections)


if __name__ == "__main__":
    sys.stdout.write(render())
