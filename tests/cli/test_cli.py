"""`ti` end to end on the miniature models, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oneword.cli import main

INVERT = [
    "--model",
    "tiny-sd1",
    "--token",
    "<red-disc>",
    "--init",
    "disc",
    "--steps",
    "2",
    "--batch_size",
    "1",
    "--resolution",
    "32",
    "--views_per_image",
    "1",
    "--no-progress",
]


@pytest.mark.slow
def test_invert_then_generate(tiny_dirs, concept_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["invert", str(concept_dir), *INVERT, "--out", str(out)]) == 0
    for name in ("learned_embeds.safetensors", "red-disc.safetensors", "config.yaml", "loss.csv", "loss.png"):
        assert (out / name).is_file(), name
    png = tmp_path / "grid.png"
    code = main(
        [
            "generate",
            "--model",
            "tiny-sd1",
            "--embedding",
            str(out / "learned_embeds.safetensors"),
            "--prompt",
            "a photo of <red-disc>",
            "<red-disc> on the beach",
            "-n",
            "2",
            "--steps",
            "2",
            "--seed",
            "5",
            "--out",
            str(png),
        ]
    )
    assert code == 0
    grid = Image.open(png)
    assert grid.text["seeds"] == "[5, 6]" and "<red-disc> on the beach" in grid.text["prompts"]
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-sd1",
                "--embedding",
                str(out),
                "--prompt",
                "<red-disc>",
                "--batch",
                "0",
                "--out",
                str(tmp_path / "none.png"),
            ]
        )
        == 2
    )
    assert "--batch" in _one_line_error(capsys) and not (tmp_path / "none.png").exists()


@pytest.mark.slow
def test_generate_two_concepts_in_one_prompt(tiny_dirs, concept_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["invert", str(concept_dir), *INVERT, "--out", str(a)]) == 0
    args = [*INVERT]
    args[args.index("<red-disc>")] = "<blue-box>"
    assert main(["invert", str(concept_dir), *args, "--out", str(b)]) == 0
    png = tmp_path / "two.png"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-sd1",
                "--embedding",
                str(a / "red-disc.safetensors"),
                str(b / "blue-box.safetensors"),
                "--prompt",
                "<red-disc> next to <blue-box>",
                "-n",
                "1",
                "--steps",
                "2",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert Image.open(png).text["tokens"] == "<red-disc>,<blue-box>"


@pytest.mark.slow
def test_generate_two_files_with_one_token(tiny_dirs, concept_dir, tmp_path, capsys, caplog):
    """Two runs trained under one --token: the error names the file and the way out, FILE=TOKEN."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["invert", str(concept_dir), *INVERT, "--out", str(a)]) == 0
    assert main(["invert", str(concept_dir), *INVERT, "--seed", "1", "--out", str(b)]) == 0
    first, second = str(a / "red-disc.safetensors"), str(b / "red-disc.safetensors")
    png = tmp_path / "two.png"
    common = ["-n", "1", "--steps", "2", "--out", str(png)]
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-sd1",
                "--embedding",
                first,
                second,
                "--prompt",
                "<red-disc>",
                *common,
            ]
        )
        == 2
    )
    err = _one_line_error(capsys)
    assert second in err and "already in use" in err and f"{second}=<name>" in err
    with caplog.at_level("WARNING"):
        assert (
            main(
                [
                    "generate",
                    "--model",
                    "tiny-sd1",
                    "--embedding",
                    first,
                    f"{second}=<red-disc-2>",
                    "--prompt",
                    "<Red-Disc-2> alone",
                    "a plain photo",
                    *common,
                ]
            )
            == 0
        )
    assert Image.open(png).text["tokens"] == "<red-disc>,<red-disc-2>"
    warned = [r.getMessage() for r in caplog.records if "uses none of the loaded tokens" in r.getMessage()]
    assert len(warned) == 1 and "a plain photo" in warned[0]  # CLIP ignores case: <Red-Disc-2> is used


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.mark.parametrize(
    ("setup", "expect"),
    [
        ("missing", "does not exist"),
        ("empty", "no images"),
        ("corrupt", "cannot be used"),
    ],
)
def test_bad_image_folders(tiny_dirs, tmp_path, capsys, setup, expect):
    folder = tmp_path / "imgs"
    if setup != "missing":
        folder.mkdir()
    if setup == "corrupt":
        Image.new("RGB", (8, 8)).save(folder / "good.png")
        (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    assert main(["invert", str(folder), *INVERT, "--out", str(out)]) == 2
    assert expect in _one_line_error(capsys).lower()
    assert not out.exists()  # nothing partial left behind


def test_token_that_exists_in_vocabulary(tiny_dirs, concept_dir, tmp_path, capsys):
    args = [*INVERT]
    args[args.index("<red-disc>")] = "cat"
    out = tmp_path / "out"
    assert main(["invert", str(concept_dir), *args, "--out", str(out)]) == 2
    assert "already a word" in _one_line_error(capsys)


@pytest.mark.slow
def test_embedding_of_wrong_width(tiny_dirs, concept_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["invert", str(concept_dir), *INVERT, "--out", str(out)]) == 0
    code = main(
        [
            "generate",
            "--model",
            "tiny-sdxl",
            "--embedding",
            str(out / "red-disc.safetensors"),
            "--prompt",
            "<red-disc>",
            "-n",
            "1",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 2
    assert "width" in _one_line_error(capsys)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_console_script_help():
    res = subprocess.run(
        [sys.executable, "-m", "oneword.cli", "invert", "--help"], capture_output=True, text=True, check=True
    )
    # one spelling shown (dashes); the underscore spelling is still accepted, unlisted
    assert (
        "--base-lr" in res.stdout and "--base_lr" not in res.stdout and "embedding_reg_weight" in res.stdout
    )
    from oneword.cli import build_parser

    base = ["invert", "x", "--model", "m", "--token", "<t>", "--init", "i"]
    for spelling in (["--base_lr", "0.1", "--no-scale_lr"], ["--base-lr", "0.1", "--no-scale-lr"]):
        args = build_parser().parse_args([*base, *spelling])
        assert args.subcommand == "invert" and args.invert.base_lr == 0.1 and args.invert.scale_lr is False


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tiny_dirs, concept_dir, tmp_path):
    """A killed job (SIGTERM) exits 130 after saving a checkpoint and the embedding files."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    args = [*INVERT]
    args[args.index("--steps") + 1] = "100000"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oneword.cli",
            "invert",
            str(concept_dir),
            *args,
            "--out",
            str(out),
            "--save_every",
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "loss.csv").is_file():
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (out / "checkpoints" / "last.safetensors").is_file()
    assert (out / "learned_embeds.safetensors").is_file()
    assert "--resume" in err


def test_info(tiny_dirs, capsys):
    assert main(["info", "--model", "tiny-sdxl"]) == 0
    assert "family=sdxl" in capsys.readouterr().out


def test_toy_render(tmp_path, capsys):
    import json

    assert main(["toy", "render", "--out", str(tmp_path), "--concepts", "2", "--images", "3"]) == 0
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 2 and (tmp_path / "contact_sheet.png").is_file()
    for folder in folders:
        assert len(list(folder.glob("*.png"))) == 3
        assert set(json.loads((folder / "concept.json").read_text())) == {
            "shape",
            "fill",
            "pattern",
            "outline",
        }
    toned = tmp_path / "toned"
    assert (
        main(["toy", "render", "--out", str(toned), "--concepts", "2", "--images", "3", "--tone", "0.5"]) == 0
    )
    for folder in folders:
        plain_png = sorted(folder.glob("*.png"))[0]
        assert (toned / folder.name / plain_png.name).read_bytes() != plain_png.read_bytes()
    assert main(["toy", "render", "--out", str(toned), "--tone", "0.6"]) != 0
    assert "--tone must be in [0, 0.5]" in capsys.readouterr().err


def test_toy_train_from_a_model_needs_an_out_folder(tmp_path, capsys):
    """Without --out the run would replace the shipped model it starts from: refused before any work."""
    code = main(
        [
            "toy",
            "train",
            "--parts",
            "ldm",
            "--init-from",
            "oneword/toy/weights/ldm",
            "--work",
            str(tmp_path / "work"),
        ]
    )
    assert code == 2 and "--init-from needs --out" in _one_line_error(capsys)
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_generate_in_batches_draws_the_same_images(tiny_dirs, monkeypatch):
    """Each image has its own seeded generator: the batch sets memory per pipeline call, not the
    images (the evaluation and --select's round trip draw 8 images, 4 per call); on the toy model,
    whose saved scores later runs are paired with, exactly the same images."""
    import numpy as np

    from oneword.models import load_model
    from oneword.sampling import SampleSettings, generate_images

    model = load_model("tiny-sd1")
    assert model.pipeline.vae.use_slicing  # real families decode one image at a time
    calls = []
    pipe_call = type(model.pipeline).__call__
    monkeypatch.setattr(
        type(model.pipeline),
        "__call__",
        lambda self, **kw: calls.append(len(kw["generator"])) or pipe_call(self, **kw),
    )
    prompts = ["a photo of a disc", "a disc on the beach"]
    whole = generate_images(model, prompts, SampleSettings(steps=2, seeds=[3, 4, 5], batch=3))
    split = generate_images(model, prompts, SampleSettings(steps=2, seeds=[3, 4, 5], batch=2))
    assert calls == [3, 3, 2, 1, 2, 1]
    for a, b in zip(whole, split, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    with pytest.raises(ValueError):
        SampleSettings(batch=0)
    toy = load_model("toy")
    assert (
        toy.pipeline.vae.use_slicing is False
    )  # the toy decodes its batch at once, as when its scores were saved
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the saved scores were made (at one thread a pixel may differ by 1)
    try:
        eight = generate_images(toy, prompts, SampleSettings(steps=3, seeds=list(range(8)), batch=8))
        fours = generate_images(toy, prompts, SampleSettings(steps=3, seeds=list(range(8))))
    finally:
        torch.set_num_threads(threads)
    # the same images up to rounding: on some CPUs a batch of 8 and two of 4 differ by 1 in a few
    # pixels (6 of 16 x 3,072 values on an Intel Xeon with torch 2.14)
    for a, b in zip(eight, fours, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_mixed_precision_sets_the_weights_dtype_of_every_trainer(concept_dir, tmp_path, monkeypatch, capsys):
    """ti invert, ti-encode and ti eval curve load the frozen weights in the dtype their
    --mixed_precision names (ti-encode and ti eval used to take the device's default), ti data
    targets in its --dtype."""
    import oneword.models
    from oneword.cli.encode import main as encode_main
    from oneword.errors import ModelLoadError

    asked: list[str | None] = []

    def record(model, *, device=None, dtype=None, family=None):
        asked.append(dtype)
        raise ModelLoadError("stopped by the test")

    monkeypatch.setattr(oneword.models, "load_model", record)
    out = ["--out", str(tmp_path / "out")]
    assert main(["invert", str(concept_dir), *INVERT, "--mixed_precision", "bf16", *out]) == 2
    assert (
        encode_main(
            [str(concept_dir), "--encoder", "toy", "--init", "disc", "--mixed_precision", "fp16", *out]
        )
        == 2
    )
    assert encode_main([str(concept_dir), "--encoder", "toy", "--init", "disc", *out]) == 2
    assert (
        main(
            [
                "eval",
                "curve",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                "--init",
                "disc",
                "--mixed_precision",
                "bf16",
            ]
        )
        == 2
    )
    assert (
        main(["data", "targets", str(tmp_path / "shards"), "--model", "tiny-sd1", "--dtype", "bf16", *out])
        == 2
    )
    assert asked == ["bf16", "fp16", "fp32", "bf16", "bf16"]
    assert "stopped by the test" in capsys.readouterr().err


@pytest.mark.slow
def test_empty_negative_prompt_is_zeros_where_the_stock_sdxl_pipeline_uses_zeros(tiny_dirs):
    """SDXL's config says an empty negative prompt is all zeros (``force_zeros_for_empty_prompt``);
    SD 1.x encodes the empty text; a written negative prompt is always encoded."""
    from oneword.models import load_model
    from oneword.sampling import negative_conditioning

    xl = load_model("tiny-sdxl")
    assert xl.pipeline.config.force_zeros_for_empty_prompt
    empty = negative_conditioning(xl, "", 2)
    assert empty.hidden_states.shape == xl.encode_text(["", ""]).hidden_states.shape
    assert not empty.hidden_states.any() and not empty.pooled.any()
    written = negative_conditioning(xl, "blurry", 2)
    assert torch.equal(written.hidden_states, xl.encode_text(["blurry"] * 2).hidden_states)
    sd1 = load_model("tiny-sd1")
    assert torch.equal(negative_conditioning(sd1, "", 1).hidden_states, sd1.encode_text([""]).hidden_states)


def test_invert_checks_its_out_folder_before_loading_the_model(concept_dir, tmp_path, monkeypatch, capsys):
    """A clash with an earlier run was reported only after loading the model (minutes for SDXL)."""
    import oneword.models

    monkeypatch.setattr(oneword.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "photo.png").write_bytes(b"someone's file")
    assert main(["invert", str(concept_dir), *INVERT, "--out", str(taken)]) == 2
    assert "already holds files" in _one_line_error(capsys)
    assert main(["invert", str(concept_dir), *INVERT, "--resume", "--out", str(tmp_path / "new")]) == 2
    assert "nothing to resume" in _one_line_error(capsys)
    assert main(["invert", str(concept_dir), *INVERT, "--flip_p", "3", "--out", str(tmp_path / "f")]) == 2
    assert "flip_p" in _one_line_error(capsys)


def test_generate_without_a_word_renders_the_base_model_enlarged(tiny_dirs, tmp_path, caplog):
    """A baseline to compare a word with; 32 px images are enlarged 4x (nearest neighbour) so that a
    person can see them, and --zoom 1 keeps the native size."""
    args = ["generate", "--model", "tiny-sd1", "--prompt", "a photo of a disc", "-n", "2", "--steps", "2"]
    with caplog.at_level("WARNING"):
        assert main([*args, "--out", str(tmp_path / "big.png")]) == 0
    assert "uses none of the loaded tokens" not in caplog.text
    big, native = Image.open(tmp_path / "big.png"), None
    assert main([*args, "--zoom", "1", "--out", str(tmp_path / "native.png")]) == 0
    native = Image.open(tmp_path / "native.png")
    assert big.text["zoom"] == "4" and native.text["zoom"] == "1" and big.text["embeddings"] == ""
    pad = 2  # image_grid's padding: 2 columns of 32 px (or 128 px) and 3 paddings
    assert native.size == (2 * 32 + 3 * pad, 32 + 2 * pad) and big.size == (2 * 128 + 3 * pad, 128 + 2 * pad)
    tile = np.asarray(big.convert("RGB"))[pad : pad + 128, pad : pad + 128]
    assert (tile[::4, ::4] == np.asarray(native.convert("RGB"))[pad : pad + 32, pad : pad + 32]).all()
    assert main([*args, "--zoom", "0", "--out", str(tmp_path / "z.png")]) == 2


def test_the_cli_reference_is_current():
    """docs/cli.md is what --help prints; regenerate it with `python -m oneword.cli.reference > docs/cli.md`."""
    from oneword.cli.reference import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    assert doc.read_text() == render(), "docs/cli.md is stale: python -m oneword.cli.reference > docs/cli.md"
