"""Encoder training data: webdataset shards from folders or the toy world, and `ti data targets`
(batched inversions as distillation targets, resumable)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_encoder

from oneword.data.shards import decode_sample, encode_sample, expand_shards, write_shards
from oneword.encoder.model import load_encoder, save_encoder
from oneword.errors import InputError
from oneword.models import load_model
from oneword.toy.concepts import toy_samples


def test_shard_round_trip_and_expand(tmp_path):
    samples = list(toy_samples(limit=3, images=3, size=32))
    assert samples[0].backgrounds != samples[1].backgrounds or samples[0].images != samples[1].images
    raw = encode_sample(samples[0])
    back = decode_sample(raw)
    assert back.key == samples[0].key and back.init == samples[0].init and len(back.images) == 3
    assert back.images[0].tobytes() == samples[0].images[0].tobytes()
    samples[0].target = [torch.ones(1, 32)]
    assert torch.equal(decode_sample(encode_sample(samples[0])).target[0], torch.ones(1, 32))
    paths = write_shards(samples, tmp_path / "s", per_shard=2)
    assert len(paths) == 2 and expand_shards(str(tmp_path / "s")) == [str(p) for p in paths]
    with pytest.raises(InputError):
        expand_shards(str(tmp_path / "none-*.tar"))
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: len(whole) // 2])  # a copy cut short: one line now, not a traceback later
    with pytest.raises(InputError, match="concepts-000001.tar is damaged or truncated"):
        expand_shards(str(tmp_path / "s"))
    paths[1].write_bytes(b"not a tar at all")
    with pytest.raises(InputError, match="damaged or truncated"):
        expand_shards(str(paths[1]))


def test_ti_data_shards(tmp_path, capsys):
    from oneword.cli import main

    assert (
        main(
            [
                "data",
                "shards",
                "--toy",
                "--limit",
                "3",
                "--images",
                "2",
                "--size",
                "32",
                "--per-shard",
                "2",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.split()) == 2
    assert main(["data", "shards", "--out", str(tmp_path / "s")]) == 2
    capsys.readouterr()
    toy = [
        "data",
        "shards",
        "--toy",
        "--limit",
        "1",
        "--images",
        "2",
        "--size",
        "32",
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(toy) == 2  # a rerun into the same folder would leave the old shards beside the new ones
    assert "already holds concepts-*.tar" in capsys.readouterr().err
    assert main([*toy, "--prefix", "more"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "concepts-000000.tar",
        "concepts-000001.tar",
        "more-000000.tar",
    ]


def test_ti_data_refuses_what_would_lose_concepts(tmp_path, capsys):
    """Two concept folders of one name made an unreadable shard; two shard folders written with
    one prefix fed to ti data targets kept only the first folder's concepts."""
    from conftest import make_concept_images

    from oneword.cli import main

    for sub in ("a", "b"):
        make_concept_images(tmp_path / sub / "cat")
    assert (
        main(
            [
                "data",
                "shards",
                str(tmp_path / "a" / "cat"),
                str(tmp_path / "b" / "cat"),
                "--init",
                "cat",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    assert "distinct names" in capsys.readouterr().err and not (tmp_path / "s").exists()
    for sub in ("a", "b"):
        assert (
            main(
                [
                    "data",
                    "shards",
                    str(tmp_path / sub / "cat"),
                    "--init",
                    "cat",
                    "--out",
                    str(tmp_path / f"s{sub}"),
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "targets",
                str(tmp_path / "s*" / "*.tar"),
                "--model",
                "tiny-sd1",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert "share file names (concepts-000000.tar)" in capsys.readouterr().err
    make_concept_images(tmp_path / "b" / "dog")  # classes in one data set: a word per folder
    both = [str(tmp_path / "a" / "cat"), str(tmp_path / "b" / "dog")]
    assert main(["data", "shards", *both, "--init", "cat", "dog", "mug", "--out", str(tmp_path / "m")]) == 2
    assert "one per folder (2), got 3" in capsys.readouterr().err
    assert main(["data", "shards", *both, "--init", "cat", "dog", "--out", str(tmp_path / "m")]) == 0
    from oneword.data.shards import read_shard

    assert [(x.key, x.init) for x in read_shard(tmp_path / "m" / "concepts-000000.tar")] == [
        ("cat", "cat"),
        ("dog", "dog"),
    ]


def test_shards_from_folders_with_targets(tiny_dirs, concept_dir, tmp_path):
    from oneword.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "invert",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                "--token",
                "<t>",
                "--init",
                "disc",
                "--steps",
                "1",
                "--batch_size",
                "1",
                "--resolution",
                "32",
                "--views_per_image",
                "1",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "shards",
                str(concept_dir),
                "--init",
                "disc",
                "--targets",
                str(run),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    import webdataset as wds

    (raw,) = list(wds.WebDataset(expand_shards(str(tmp_path / "s")), shardshuffle=False))
    sample = decode_sample(raw)
    assert sample.init == "disc" and len(sample.images) == 3 and sample.target[0].shape == (1, 32)


def test_a_bad_concept_folder_leaves_no_shards(tmp_path, concept_dir):
    from oneword.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "s"
    assert (
        main(
            [
                "data",
                "shards",
                str(concept_dir),
                str(empty),
                "--init",
                "disc",
                "--per-shard",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert list(out.iterdir()) == []  # the first concept's finished shard was removed too


@pytest.mark.slow
def test_ti_data_targets_adds_embeddings_and_resumes(tiny_dirs, tmp_path, capsys):
    from oneword.cli import main
    from oneword.data.shards import read_shard

    write_shards(toy_samples(limit=3, images=2, size=32), tmp_path / "s", per_shard=2)
    args = [
        "data",
        "targets",
        str(tmp_path / "s"),
        "--model",
        "tiny-sd1",
        "--steps",
        "2",
        "--group",
        "2",
        "--out",
        str(tmp_path / "t"),
    ]
    assert main(args) == 0
    assert "inverting 2 concepts" in capsys.readouterr().err  # the step bar inside a shard's group
    out = sorted((tmp_path / "t").glob("*.tar"))
    assert [p.name for p in out] == ["concepts-000000.tar", "concepts-000001.tar"]
    before, after = read_shard(tmp_path / "s" / out[0].name), read_shard(out[0])
    assert [s.key for s in after] == [s.key for s in before] and [s.init for s in after] == [
        s.init for s in before
    ]
    init = load_model("tiny-sd1").initializer_vectors(after[0].init, 1)[0]
    assert all(s.target[0].shape == (1, 32) and not torch.allclose(s.target[0], init) for s in after)
    assert not any((tmp_path / "t" / ".partial").iterdir())  # the groups' saved states go with their shard
    stamp = out[0].stat().st_mtime_ns
    out[1].unlink()  # as if interrupted during the second shard
    assert main(args) == 0
    assert out[0].stat().st_mtime_ns == stamp and out[1].is_file()
    assert (
        main(["data", "targets", str(tmp_path / "s"), "--model", "tiny-sd1", "--out", str(tmp_path / "s")])
        == 2
    )
    capsys.readouterr()  # other settings into the same OUT skipped every shard and reported success
    assert main([*args[:-2], "--steps", "5", "--out", str(tmp_path / "t")]) == 2
    assert "steps: 2 there, 5 now" in capsys.readouterr().err and out[0].stat().st_mtime_ns == stamp
    assert main([*args[:4], "tiny-sd2", *args[5:]]) == 2
    assert "'tiny-sd1' there, 'tiny-sd2' now" in capsys.readouterr().err
    # --continue starts from the existing targets: at a negligible rate they come back unchanged.
    more = [
        "data",
        "targets",
        str(tmp_path / "t"),
        "--model",
        "tiny-sd1",
        "--steps",
        "1",
        "--continue",
        "--base-lr",
        "1e-12",
        "--out",
        str(tmp_path / "t2"),
    ]
    assert main(more) == 0
    for old, new in zip(after, read_shard(tmp_path / "t2" / out[0].name)):
        torch.testing.assert_close(new.target[0], old.target[0], atol=1e-6, rtol=0)
    assert (
        main(
            [
                "data",
                "targets",
                str(tmp_path / "s"),
                "--model",
                "tiny-sd1",
                "--continue",
                "--out",
                str(tmp_path / "t3"),
            ]
        )
        == 2
    )  # nothing to continue from


@pytest.mark.slow
def test_ti_data_targets_continues_a_group_after_an_interruption(tiny_dirs, tmp_path, monkeypatch, capsys):
    import oneword.encoder.targets as targets
    import oneword.inversion.group as group
    from oneword.cli import main
    from oneword.inversion.checkpoint import load_states
    from oneword.inversion.loss import denoising_loss

    write_shards(toy_samples(limit=2, images=2, size=32), tmp_path / "s", per_shard=2)
    args = [
        "data",
        "targets",
        str(tmp_path / "s"),
        "--model",
        "tiny-sd1",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "t"),
    ]
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return denoising_loss(*a, **kw)

    monkeypatch.setattr(targets, "SAVE_EVERY", 1)
    monkeypatch.setattr(group, "denoising_loss", interrupted)
    assert main(args) == 130
    assert "the same command continues" in capsys.readouterr().err
    (state,) = (tmp_path / "t" / ".partial").iterdir()
    assert all(ts.step == 2 for ts in load_states(state)[0]) and not list((tmp_path / "t").glob("*.tar"))
    stale = state.with_name("concepts-000000-000064.safetensors")  # as if from a run with another --group
    stale.write_bytes(b"")
    calls.clear()
    monkeypatch.setattr(group, "denoising_loss", lambda *a, **kw: calls.append(1) or denoising_loss(*a, **kw))
    assert main(args) == 0
    assert len(calls) == 1 and len(list((tmp_path / "t").glob("*.tar"))) == 1  # only the third step ran
    assert not any((tmp_path / "t" / ".partial").iterdir())


@pytest.mark.slow
def test_ti_data_targets_from_an_encoder(tiny_dirs, tmp_path):
    """--from-encoder starts each inversion at the encoder's prediction for the sample's images: at a
    negligible rate the targets are that prediction."""
    from oneword.cli import main
    from oneword.data.shards import read_shard
    from oneword.encoder.model import predict_embeddings

    enc, model = tiny_encoder()
    path = save_encoder(enc, tmp_path / "enc.safetensors")
    write_shards(toy_samples(limit=3, images=2, size=32), tmp_path / "s", per_shard=4)
    args = [
        "data",
        "targets",
        str(tmp_path / "s"),
        "--model",
        "tiny-sd1",
        "--steps",
        "1",
        "--base-lr",
        "1e-12",
        "--from-encoder",
        str(path),
        "--out",
        str(tmp_path / "t"),
    ]
    assert main(args) == 0
    samples = read_shard(next((tmp_path / "t").glob("*.tar")))
    expected = predict_embeddings(
        load_encoder(path), model, [s.images for s in samples], [s.init for s in samples]
    )
    init = model.initializer_vectors(samples[0].init, 1)[0]
    for s, e in zip(samples, expected):
        torch.testing.assert_close(s.target[0], e[0], atol=1e-5, rtol=0)
        assert not torch.allclose(s.target[0], init, atol=1e-3)  # the encoder moved it off the initializer
    assert main(args[:-2] + ["--continue", "--out", str(tmp_path / "t2")]) == 2  # one start, not two
    other, _ = tiny_encoder("sdxl")  # two text encoders: not for tiny-sd1
    save_encoder(other, tmp_path / "sdxl.safetensors")
    assert (
        main(args[:7] + ["--from-encoder", str(tmp_path / "sdxl.safetensors"), "--out", str(tmp_path / "t3")])
        == 2
    )
