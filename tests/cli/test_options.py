"""The command line's parser: one spelling shown, the other accepted, and ``--config FILE`` on
every command (jsonargparse), without loading a model."""

from __future__ import annotations

import argparse

import pytest
import yaml
from jsonargparse import ActionYesNo

from oneword.cli import DELEGATED, build_parser
from oneword.cli.reference import _walk
from oneword.inversion.config import InversionConfig


def _leaves():
    return [(name, p) for name, p in _walk(build_parser(), "ti") if not p._subcommands_action]


def test_every_command_takes_a_config_file_and_lists_dashes_only():
    leaves = _leaves()
    assert {name for name, _ in leaves} >= {"ti invert", "ti encode", "ti generate", "ti data targets"}
    for name, parser in leaves:
        assert "--config" in parser._option_string_actions, name
        shown = parser.format_help()
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and "-" in option[2:] and option != "--print_config":
                    underscore = "--" + option[2:].replace("-", "_")
                    if isinstance(action, ActionYesNo) and option.startswith("--no-"):
                        underscore = "--no-" + option[5:].replace("-", "_")  # as argparse spelled it
                    if underscore == option:  # --no-paste: a one-word option has no other spelling
                        continue
                    # the underscore spelling is accepted by the same option, and not listed
                    assert parser._option_string_actions[underscore] is action, (name, option)
                    assert underscore not in shown, (name, underscore)
    assert not set(DELEGATED) & {name.split()[1] for name, _ in leaves}


def test_a_run_folders_config_is_a_config_file_for_ti_invert(tmp_path):
    run = tmp_path / "config.yaml"
    run.write_text(
        InversionConfig(token="<q>", init="ball", steps=7, num_vectors=2, preview_seeds=[5]).to_yaml()
    )
    base = ["invert", "imgs", "--model", "toy"]
    args = build_parser().parse_args([*base, "--config", str(run), "--steps", "9", "--no-scale-lr"]).invert
    # the file's settings, and what follows it on the command line over them
    assert (args.token, args.init, args.num_vectors, args.preview_seeds) == ("<q>", "ball", 2, [5])
    assert args.steps == 9 and args.scale_lr is False
    # given before the file, an option loses to it
    assert build_parser().parse_args([*base, "--steps", "9", "--config", str(run)]).invert.steps == 7


def test_config_files_of_other_commands(tmp_path, capsys):
    enc = tmp_path / "encode.yaml"
    enc.write_text(yaml.safe_dump({"refine": 3, "init": ["disc"], "base_lr": 0.02, "select_among": [1, 2]}))
    args = build_parser().parse_args(["encode", "a", "b", "--config", str(enc)]).encode
    assert (args.images, args.refine, args.init, args.base_lr, args.select_among) == (
        ["a", "b"],
        3,
        ["disc"],
        0.02,
        [1, 2],
    )
    gen = tmp_path / "generate.yaml"
    gen.write_text(yaml.safe_dump({"model": "toy", "prompt": ["a", "b c"], "num_images": 2, "out": "g.png"}))
    args = build_parser().parse_args(["generate", "--config", str(gen)]).generate
    assert (args.model, args.prompt, args.num_images, args.out) == ("toy", ["a", "b c"], 2, "g.png")
    # an unknown key or a value of the wrong type is refused, naming it
    gen.write_text(yaml.safe_dump({"model": "toy", "prompt": ["a"], "out": "g.png", "stpes": 3}))
    with pytest.raises(SystemExit) as bad:
        build_parser().parse_args(["generate", "--config", str(gen)])
    assert bad.value.code == 2 and "stpes" in capsys.readouterr().err
    gen.write_text(yaml.safe_dump({"model": "toy", "prompt": ["a"], "out": "g.png", "steps": "many"}))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--config", str(gen)])
    assert "steps" in capsys.readouterr().err


def test_print_config_writes_a_file_that_reads_back(tmp_path, capsys):
    argv = ["invert", "imgs", "--model", "toy", "--token", "<t>", "--init", "disc", "--base-lr", "0.1"]
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*argv, "--print_config"])
    assert done.value.code == 0
    written = tmp_path / "c.yaml"
    written.write_text(capsys.readouterr().out)
    args = build_parser().parse_args(["invert", "--config", str(written)]).invert
    assert (args.images, args.token, args.base_lr, args.batch_size) == ("imgs", "<t>", 0.1, 4)


def test_list_and_boolean_options_keep_their_command_line_syntax():
    args = (
        build_parser()
        .parse_args(
            [
                "eval",
                "curve",
                "c1",
                "c2",
                "--model",
                "toy",
                "--budgets",
                "0",
                "5",
                "--no-scale_lr",
                "--random_crop",
            ]
        )
        .eval.curve
    )
    assert (args.concepts, args.budgets, args.scale_lr, args.random_crop) == (
        ["c1", "c2"],
        [0, 5],
        False,
        True,
    )
    assert isinstance(build_parser(), argparse.ArgumentParser)
