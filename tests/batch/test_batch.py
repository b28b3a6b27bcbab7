"""``ti batch`` end to end on the miniature model and the toy world: bad concepts fail alone,
reruns skip what is done, a killed run continues to the same words, other settings are refused."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_concept_images
from PIL import Image

from oneword.cli import main
from oneword.inversion.embedding_io import load_embedding

TINY = ["--method", "invert", "--model", "tiny-sd1", "--init", "disc", "--resolution", "32"]
TINY += ["--batch-size", "1", "--views-per-image", "1", "--no-progress", "--preview-steps", "0"]


def _words(out) -> dict[str, torch.Tensor]:
    return {
        p.parent.name: load_embedding(p).vectors[0]
        for p in sorted((out / "concepts").glob("*/learned_embeds.safetensors"))
    }


def _states(out) -> dict[str, tuple[str, int, str | None]]:
    with sqlite3.connect(out / "ledger.sqlite") as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, state, attempts, error FROM concepts")}


def _mixed_manifest(tmp_path):
    """Three good concepts and five that cannot be done, in one JSONL manifest."""
    good = [make_concept_images(tmp_path / f"good{i}", n=2 + i % 2) for i in range(3)]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("this is text, not a picture")
    full = good[0] / "img_0.png"
    (bad / "half.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    Image.new("1", (9000, 9000)).save(bad / "bomb.png")  # 81 MP: over the 64 MP guard, tiny on disk
    rows = [
        {"id": f"good{i}", "images": [str(p) for p in sorted(g.glob("*.png"))]} for i, g in enumerate(good)
    ]
    rows += [
        {"id": "text", "images": [str(bad / "notes.png")]},
        {"id": "truncated", "images": [str(bad / "half.png")]},
        {"id": "bomb", "images": [str(bad / "bomb.png")]},
        {"id": "missing", "images": [str(good[0] / "img_0.png"), str(tmp_path / "gone.png")]},
        {"id": "partly", "images": [str(good[1] / "img_0.png"), str(bad / "half.png")]},
    ]
    manifest = tmp_path / "concepts.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.mark.slow
def test_bad_concepts_fail_alone_and_reruns_skip_what_is_done(tiny_dirs, tmp_path, capsys):
    manifest, out = _mixed_manifest(tmp_path), tmp_path / "out"
    args = ["batch", str(manifest), "--out", str(out), *TINY, "--steps", "3", "--group", "2"]
    assert main(args) == 0
    states = _states(out)
    assert {k for k, v in states.items() if v[0] == "done"} == {"good0", "good1", "good2", "partly"}
    errors = {k: v[2] for k, v in states.items() if v[0] == "failed"}
    assert set(errors) == {"text", "truncated", "bomb", "missing"}
    assert "notes.png" in errors["text"] and "half.png" in errors["truncated"]
    assert "max-pixels" in errors["bomb"] or "pixels" in errors["bomb"]
    assert "gone.png" in errors["missing"]
    words = _words(out)
    assert set(words) == {"good0", "good1", "good2", "partly"}
    meta = load_embedding(out / "concepts" / "good0" / "learned_embeds.safetensors").metadata
    assert (
        meta["oneword.token"] == "<good0>" and meta["oneword.init"] == "disc" and meta["oneword.steps"] == "3"
    )
    with sqlite3.connect(out / "ledger.sqlite") as db:
        warning = db.execute("SELECT warning FROM concepts WHERE id = 'partly'").fetchone()[0]
    assert "skipped 1 of 2" in warning
    stamps = {p: p.stat().st_mtime_ns for p in (out / "concepts").glob("*/learned_embeds.safetensors")}
    capsys.readouterr()
    # the same command again: nothing to do
    assert main(args) == 0
    assert "0 concept(s)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and _states(out) == states
    # the failed ones once more: they fail again, each now with two attempts
    assert main([*args, "--retry-failed"]) == 0
    after = _states(out)
    assert all(after[k][1] == 2 and after[k][0] == "failed" for k in errors)
    assert all(after[k] == states[k] for k in words)
    assert main(["batch", "status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 done, 4 failed, 0 running, 0 pending" in printed and "failed bomb" in printed
    report = (out / "report.md").read_text()
    assert "| bomb | failed |" in report and "gone.png" in report and "skipped 1 of 2" in report
    # other settings into the same folder: refused before any work
    assert main([*args[:-4], "--steps", "5", "--group", "2"]) == 2
    assert "other settings (steps: 3 there, 5 now)" in capsys.readouterr().err
    assert _states(out) == after


@pytest.mark.slow
def test_duplicate_tokens_and_words_of_the_vocabulary_are_refused_first(tiny_dirs, tmp_path, capsys):
    src = tmp_path / "src"
    make_concept_images(src / "a b", n=2)
    make_concept_images(src / "a-b", n=2)  # both run folders would be a-b
    assert main(["batch", str(src), "--out", str(tmp_path / "o"), *TINY, "--steps", "2"]) == 2
    assert "would share the token" in capsys.readouterr().err
    assert not (tmp_path / "o" / "ledger.sqlite").exists()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"id": "x", "images": [str(p) for p in (src / "a-b").glob("*.png")], "token": "dog"})
        + "\n"
    )
    assert main(["batch", str(manifest), "--out", str(tmp_path / "p"), *TINY, "--steps", "2"]) == 2
    assert "already a word of the vocabulary" in capsys.readouterr().err


def _stop_midway(cmd, cwd, out, sig, done_before: int) -> int:
    """Start ``cmd`` and send ``sig`` once more than ``done_before`` concepts are done and another
    is part-way with a checkpoint; its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, sent = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        if (out / "ledger.sqlite").is_file():
            try:
                states = _states(out)
            except sqlite3.OperationalError:  # the ledger's file exists, its tables not yet
                time.sleep(0.05)
                continue
            done = [k for k, v in states.items() if v[0] == "done"]
            partway = [
                k
                for k, v in states.items()
                if v[0] == "running" and (out / "concepts" / k / "checkpoints" / "last.safetensors").is_file()
            ]
            if len(done) > done_before and partway:
                proc.send_signal(sig)
                sent = True
                break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert sent, f"the run ended before it could be stopped mid-way: {err.decode()[-500:]}"
    return proc.returncode


@pytest.mark.slow
def test_a_stopped_and_killed_batch_continues_to_the_same_words(tiny_dirs, tmp_path):
    """SIGTERM in the middle (it stops at a step boundary and saves), then kill -9 in the middle of
    the rerun, then the same command with another group size, from another directory: every
    concept is done once, and every word is the word of an uninterrupted run in groups of one (the
    engine's invariance and exact resume)."""
    src = tmp_path / "src"
    for i in range(8):
        make_concept_images(src / f"c{i}", n=2 + i % 2)
    common = ["batch", str(src), *TINY, "--steps", "40", "--save-every", "4"]
    assert main([*common, "--out", str(tmp_path / "ref"), "--group", "1"]) == 0
    reference = _words(tmp_path / "ref")

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "oneword.cli", *common, "--out", "out"]  # relative to tmp_path
    assert _stop_midway([*cmd, "--group", "2"], tmp_path, out, signal.SIGTERM, 0) == 130
    stopped = _states(out)
    done_first = sum(v[0] == "done" for v in stopped.values())
    assert 0 < done_first < 8
    assert _stop_midway([*cmd, "--group", "2"], tmp_path, out, signal.SIGKILL, done_first) == -signal.SIGKILL
    before = _states(out)
    assert main([*common, "--out", str(out), "--group", "3"]) == 0
    after = _states(out)
    assert all(v[0] == "done" for v in after.values()) and len(after) == 8
    for k, v in before.items():  # what was done is not done again
        if v[0] == "done":
            assert after[k][1] == v[1]
    words = _words(out)
    assert set(words) == set(reference)
    for name, ref in reference.items():
        assert torch.allclose(words[name], ref, atol=3e-5, rtol=0), (name, (words[name] - ref).abs().max())
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
    with sqlite3.connect(out / "ledger.sqlite") as db:  # outputs are recorded relative to OUT
        assert {r[0] for r in db.execute("SELECT output FROM concepts")} == {
            f"concepts/c{i}/learned_embeds.safetensors" for i in range(8)
        }


@pytest.mark.slow
def test_one_concepts_unexpected_error_fails_it_alone(tiny_dirs, tmp_path, monkeypatch, capsys):
    from oneword.inversion import group

    src = tmp_path / "src"
    for i in range(3):
        make_concept_images(src / f"c{i}", n=2)
    real_add = group.GroupEngine.add

    def add(self, images, cfg, start=None, anchor=None, name=""):
        if name == "c1":
            raise RuntimeError("CUDA out of memory (pretend)")
        return real_add(self, images, cfg, start, anchor, name)

    monkeypatch.setattr(group.GroupEngine, "add", add)
    out = tmp_path / "out"
    assert main(["batch", str(src), "--out", str(out), *TINY, "--steps", "2", "--group", "2"]) == 0
    states = _states(out)
    assert states["c1"][0] == "failed" and "out of memory" in states["c1"][2]
    assert states["c0"][0] == states["c2"][0] == "done"
    # a later source whose id differs from a concept of the batch only in case is refused
    make_concept_images(tmp_path / "src2" / "C0", n=2)
    assert main(["batch", str(tmp_path / "src2"), "--out", str(out), *TINY, "--steps", "2"]) == 2
    assert "differ only in case" in capsys.readouterr().err


@pytest.mark.slow
def test_toy_encode_chooses_initializers_without_asking(tmp_path, capsys):
    """The default method on the shipped toy world: encoder + refinement, --init auto."""
    from oneword.toy.concepts import write_concepts

    folders, sheet = write_concepts(tmp_path / "src", 2, 3, seed=3, held_out=True)
    sheet.unlink()
    out = tmp_path / "out"
    assert (
        main(
            [
                "batch",
                str(tmp_path / "src"),
                "--out",
                str(out),
                "--refine",
                "3",
                "--no-progress",
                "--log-json",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"] for line in lines] == ["done", "done"] and lines[-1]["done"] == 2
    for folder in folders:
        meta = load_embedding(out / "concepts" / folder.name / "learned_embeds.safetensors").metadata
        truth = json.loads((folder / "concept.json").read_text())["shape"]
        assert meta["oneword.init_how"] == "auto" and meta["oneword.init"] == truth
        assert meta["oneword.method"] == "encode" and meta["oneword.encoder"] == "encoder.safetensors"
        assert (out / "concepts" / folder.name / "preview.png").is_file()
    report = (out / "report.md").read_text()
    assert "2 done, 0 failed" in report and "(auto)" in report and "contact_sheet.png" in report
    assert Image.open(out / "contact_sheet.png").size[0] > 256


@pytest.mark.slow
def test_shards_and_parquet_give_the_words_of_folders(tiny_dirs, tmp_path, capsys):
    """The same concepts read from concept folders, from webdataset shards (`ti data shards`) and
    from a Parquet manifest become the same words; a shard sample with a damaged image fails alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    src = tmp_path / "src"
    folders = [make_concept_images(src / f"c{i}", n=2 + i) for i in range(2)]
    run = [*TINY, "--steps", "3", "--group", "2"]
    assert main(["batch", str(src), "--out", str(tmp_path / "folders"), *run]) == 0
    expected = _words(tmp_path / "folders")

    shards = tmp_path / "shards"
    assert main(["data", "shards", *map(str, folders), "--init", "disc", "--out", str(shards)]) == 0
    with wds.TarWriter(str(shards / "extra-000000.tar")) as tar:  # a sample whose image is damaged
        png = (folders[0] / "img_0.png").read_bytes()
        tar.write({"__key__": "broken", "json": b'{"init": "disc"}', "0.png": png[: len(png) // 2]})
    capsys.readouterr()
    assert main(["batch", str(shards), "--out", str(tmp_path / "from-shards"), *run]) == 0
    states = _states(tmp_path / "from-shards")
    assert states["broken"][0] == "failed" and "truncated" in states["broken"][2]
    got = _words(tmp_path / "from-shards")
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=0), name

    table = pa.table(
        {
            "id": [f.name for f in folders],
            "images": [[str(p) for p in sorted(f.glob("*.png"))] for f in folders],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    assert main(["batch", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "from-parquet"), *run]) == 0
    got = _words(tmp_path / "from-parquet")
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=0), name


@pytest.mark.slow
def test_words_packed_as_shards_with_a_parquet_index(tiny_dirs, tmp_path):
    import pyarrow.parquet as pq
    import webdataset as wds

    src = tmp_path / "src"
    for i in range(3):
        make_concept_images(src / f"c.{i}", n=2)
    (src / "empty").mkdir()
    out = tmp_path / "out"
    args = ["batch", str(src), "--out", str(out), *TINY, "--steps", "2", "--format", "shards"]
    assert main([*args, "--per-shard", "2"]) == 0
    shards = sorted((out / "shards").glob("words-*.tar"))
    assert [p.name for p in shards] == ["words-000000.tar", "words-000001.tar"]
    samples = [s for p in shards for s in wds.WebDataset(str(p), shardshuffle=False, empty_check=False)]
    assert [s["__key__"] for s in samples] == ["c_0", "c_1", "c_2"]  # no dots in webdataset keys
    for sample in samples:
        record = json.loads(sample["json"])
        word = tmp_path / f"{sample['__key__']}.safetensors"
        word.write_bytes(sample["safetensors"])
        packed = load_embedding(word)
        folder = load_embedding(out / "concepts" / record["id"] / "learned_embeds.safetensors")
        assert packed.token == folder.token == f"<{record['id']}>" and torch.equal(
            packed.vectors[0], folder.vectors[0]
        )
        assert packed.metadata["oneword.batch_id"] == record["id"] and record["steps"] == 2
    index = pq.read_table(out / "shards" / "index.parquet").to_pylist()
    assert [(r["id"], r["shard"], r["key"]) for r in index] == [
        ("c.0", "words-000000.tar", "c_0"),
        ("c.1", "words-000000.tar", "c_1"),
        ("c.2", "words-000001.tar", "c_2"),
    ]
    assert main([*args, "--per-shard", "10"]) == 0  # packed again, in one shard
    assert [p.name for p in (out / "shards").glob("words-*.tar")] == ["words-000000.tar"]
