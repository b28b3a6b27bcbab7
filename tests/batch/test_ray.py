"""``ti batch --ray``: the same words from Ray actors as from one process, and a rerun skips what
is done. A local Ray instance with two CPU actors, on this machine only."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from conftest import make_concept_images

from oneword.cli import main
from oneword.inversion.embedding_io import load_embedding

TINY = [
    "--method",
    "invert",
    "--model",
    "tiny-sd1",
    "--init",
    "disc",
    "--resolution",
    "32",
    "--batch-size",
    "1",
]
TINY += ["--views-per-image", "1", "--no-progress", "--steps", "6", "--group", "2", "--save-every", "2"]


def _states(out):
    with sqlite3.connect(out / "ledger.sqlite") as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, state, attempts FROM concepts")}


@pytest.mark.slow
def test_ray_actors_give_the_words_of_one_process_and_reruns_skip(tiny_dirs, tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(5):
        make_concept_images(src / f"c{i}", n=2 + i % 3)
    (src / "empty").mkdir()  # fails alone in an actor as in one process
    assert main(["batch", str(src), "--out", str(tmp_path / "one"), *TINY, "--preview-steps", "0"]) == 0
    try:
        args = ["batch", str(src), "--out", str(tmp_path / "ray"), *TINY, "--ray", "--ray-workers", "2"]
        assert main(args) == 0
        states = _states(tmp_path / "ray")
        assert states == _states(tmp_path / "one") and states["empty"][0] == "failed"
        for i in range(5):
            one = load_embedding(
                tmp_path / "one" / "concepts" / f"c{i}" / "learned_embeds.safetensors"
            ).vectors[0]
            word = tmp_path / "ray" / "concepts" / f"c{i}" / "learned_embeds.safetensors"
            assert torch.allclose(load_embedding(word).vectors[0], one, atol=1e-5, rtol=0), i
            assert (word.parent / "preview.png").is_file()  # rendered by the actor
        capsys.readouterr()
        assert main(args) == 0  # the same command again: nothing to do, nothing recorded twice
        assert "0 concept(s)" in capsys.readouterr().err and _states(tmp_path / "ray") == states
        # the local instance listened on loopback only
        import ray  # the dev install has the ray extra (imported here: ti batch sets it up first)

        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        import ray

        ray.shutdown()
