"""What ``ti batch`` reads: concept folders and manifests, checked before any work."""

from __future__ import annotations

import json

import pytest
from conftest import make_concept_images

from oneword.batch.ledger import Ledger
from oneword.batch.sources import ConceptSpec, read_source
from oneword.errors import InputError


def test_a_folder_of_concept_folders(tmp_path):
    make_concept_images(tmp_path / "src" / "b-mug", n=2)
    make_concept_images(tmp_path / "src" / "a-cat", n=3)
    (tmp_path / "src" / "empty").mkdir()
    (tmp_path / "src" / ".hidden").mkdir()
    (tmp_path / "src" / "a-cat" / "._img_0.png").write_bytes(b"macOS resource fork")
    (tmp_path / "src" / "runs").mkdir()  # a batch's own OUT inside its SOURCE
    (tmp_path / "src" / "runs" / "ledger.sqlite").write_bytes(b"")
    (tmp_path / "src" / "runs" / "contact_sheet.png").write_bytes(b"")
    specs = read_source(tmp_path / "src")
    assert [s.id for s in specs] == ["a-cat", "b-mug", "empty"]
    assert [len(s.images) for s in specs] == [3, 2, 0]
    assert specs[2].problems and "no image files" in specs[2].problems[0] and not specs[0].problems
    make_concept_images(tmp_path / "flat", n=2)
    with pytest.raises(InputError, match="not concept folders"):
        read_source(tmp_path / "flat")
    with pytest.raises(InputError, match="does not exist"):
        read_source(tmp_path / "nowhere")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InputError, match="manifest"):
        read_source(tmp_path / "x.txt")


def test_manifests(tmp_path):
    make_concept_images(tmp_path / "imgs", n=3)
    rows = [
        {"id": "cat", "images": ["imgs/img_0.png", "imgs/img_1.png"], "init": "cat", "token": "<kitty>"},
        {"id": "mug", "images": ["imgs/img_2.png", "imgs/gone.png"]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cat, mug = read_source(tmp_path / "m.jsonl")
    assert (cat.id, cat.init, cat.token, cat.images[0]) == (
        "cat",
        "cat",
        "<kitty>",
        tmp_path / "imgs/img_0.png",
    )
    assert not cat.problems and "gone.png" in mug.problems[0]  # fails alone, the others go on
    (tmp_path / "m.csv").write_text(
        "id,images,init\ncat,imgs/img_0.png;imgs/img_1.png,cat\nmug,imgs/img_2.png,\n"
    )
    cat, mug = read_source(tmp_path / "m.csv")
    assert len(cat.images) == 2 and cat.init == "cat" and mug.init is None
    (tmp_path / "rows.csv").write_text(
        "id,image\ncat,imgs/img_0.png\nmug,imgs/img_2.png\ncat,imgs/img_1.png\n"
    )
    cat, mug = read_source(tmp_path / "rows.csv")  # one image per row, gathered by id
    assert [p.name for p in cat.images] == ["img_0.png", "img_1.png"] and len(mug.images) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"id": "a", "images": ["x.png"]}\n{"id": "A", "images": ["y.png"]}\n', "share the id 'A'"),
        ('{"id": "a", "images": ["x.png"]}\nnot json\n', "m.jsonl:2: not a JSON object"),
        ('{"id": "a", "images": 5}\n', "must be a list"),
        ('{"images": ["x.png"]}\n', "without an id"),
        ("[1, 2]\n", "not a JSON object"),
    ],
)
def test_bad_manifests_are_refused_before_any_work(tmp_path, text, message):
    (tmp_path / "m.jsonl").write_text(text)
    with pytest.raises(InputError, match=message):
        read_source(tmp_path / "m.jsonl")


def test_a_csv_without_the_columns(tmp_path):
    (tmp_path / "m.csv").write_text("name,path\na,x.png\n")
    with pytest.raises(InputError, match="'id' and 'images'"):
        read_source(tmp_path / "m.csv")
    (tmp_path / "d.csv").write_text("id,images\na,x.png\nb,y.png\na,z.png\n")
    with pytest.raises(InputError, match="share the id"):
        read_source(tmp_path / "d.csv")


def test_the_ledger_refuses_other_settings_and_keeps_states(tmp_path):
    with Ledger.open(tmp_path, {"steps": 5, "model": "m"}) as ledger:
        assert ledger.add([("a", "<a>"), ("b", "<b>")]) == 2
        ledger.start("a", "cat", "given", ["h"])
        ledger.done("a", 1.0, 5, 0.1, "out", None)
        ledger.start("b", "dog", "auto", [])
    with pytest.raises(InputError, match=r"other settings \(steps: 5 there, 6 now\)"):
        Ledger.open(tmp_path, {"steps": 6, "model": "m"})
    with Ledger.open(tmp_path, {"steps": 5, "model": "m"}) as ledger:
        assert ledger.add([("a", "<a>"), ("b", "<b>"), ("c", "<c>")]) == 1  # a and b are known
        assert ledger.counts() == {"pending": 1, "running": 1, "done": 1, "failed": 0}
        assert ledger.recover(max_attempts=5) == 0 and ledger.pending() == ["b", "c"]
        ledger.fail("c", "bad\nthings  happened")
        assert ledger.row("c").error == "bad things happened" and ledger.row("c").attempts == 1
        assert ledger.row("a").attempts == 1 and ledger.row("b").attempts == 1
        assert ledger.retry_failed() == 1 and ledger.pending() == ["b", "c"]
        for _ in range(3):  # a concept that every run stopped on is failed, not tried forever
            ledger.start("b", "dog", "auto", [])
            ledger.recover(max_attempts=3)
        assert ledger.row("b").state == "failed" and "3 times" in ledger.row("b").error
    with pytest.raises(InputError, match=r"inversion.seed: 0 there, 1 now"):
        Ledger.open(tmp_path / "nested", {"inversion": {"seed": 0}}).close() or Ledger.open(
            tmp_path / "nested", {"inversion": {"seed": 1}}
        )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ledger.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(InputError, match="not a batch ledger"):
        Ledger.read(tmp_path / "junk")
    with pytest.raises(InputError, match="no batch run"):
        Ledger.read(tmp_path / "none")


def test_shards_as_a_source(tmp_path):
    from oneword.data.shards import folder_samples, write_shards

    folders = [make_concept_images(tmp_path / f"c{i}", n=2 + i) for i in range(3)]
    paths = write_shards(folder_samples(folders, ["disc", "cat", "mug"]), tmp_path / "shards", per_shard=2)
    assert len(paths) == 2
    for source in (tmp_path / "shards", paths[0], str(tmp_path / "shards" / "*.tar")):
        specs = read_source(source)
        assert [s.id for s in specs][:2] == ["c0", "c1"] and specs[0].init == "disc"
    specs = read_source(tmp_path / "shards")
    images, bad = specs[2].load(64 * 1024 * 1024)
    assert ConceptSpec.from_dict(json.loads(json.dumps(specs[2].to_dict()))) == specs[2]
    assert len(images) == 4 and not bad and images[0].image.size == (48, 40)
    assert images[0].sha256 != images[1].sha256
    paths[1].write_bytes(paths[1].read_bytes()[:700])  # a damaged shard: refused before any work
    with pytest.raises(InputError, match="damaged or truncated"):
        read_source(tmp_path / "shards")


def test_parquet_manifests(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_concept_images(tmp_path / "imgs", n=2)
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b"],
                "images": [["imgs/img_0.png"], ["imgs/img_1.png", "imgs/gone.png"]],
                "init": ["cat", None],
            }
        ),
        tmp_path / "m.parquet",
    )
    a, b = read_source(tmp_path / "m.parquet")
    assert (a.id, a.init, a.images) == ("a", "cat", [tmp_path / "imgs/img_0.png"]) and b.init is None
    assert "gone.png" in b.problems[0]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="cannot read the Parquet manifest"):
        read_source(tmp_path / "bad.parquet")
