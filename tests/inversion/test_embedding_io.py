"""Tests for oneword.inversion.embedding_io and oneword.fileio (CPU, tiny tensors)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from oneword import fileio
from oneword.errors import EmbeddingFileError
from oneword.fileio import atomic_path, atomic_write_bytes, atomic_write_text, sha256_file
from oneword.inversion import embedding_io as eio
from oneword.inversion.embedding_io import (
    Embedding,
    build_metadata,
    check_widths,
    load_embedding,
    save_diffusers,
    save_single_file,
)


def _rand(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def _one(token: str = "<cat>", n: int = 2) -> Embedding:
    meta = build_metadata(family="sd1", token=token, init="cat", steps=50, source_hashes=["ab", "cd"])
    return Embedding(token, [_rand(n, 768, 0)], meta)


def _two(token: str = "<dog>", n: int = 3) -> Embedding:
    meta = build_metadata(
        family="sdxl", token=token, init=None, steps=7, source_hashes=[], extra={"note": "hi"}
    )
    return Embedding(token, [_rand(n, 768, 1), _rand(n, 1280, 2)], meta)


def _same(a: Embedding, b: Embedding) -> None:
    assert a.token == b.token
    assert len(a.vectors) == len(b.vectors)
    for x, y in zip(a.vectors, b.vectors):
        assert x.dtype == y.dtype == torch.float32
        assert torch.equal(x, y)


def _no_temps(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


# ----------------------------------------------------------------------------- Embedding


def test_embedding_properties_and_copies() -> None:
    src = torch.ones(2, 8, dtype=torch.float16, requires_grad=False)
    emb = Embedding("w", [src])
    assert emb.num_vectors == 2 and emb.widths == [8]
    assert emb.vectors[0].dtype == torch.float32 and emb.vectors[0].is_contiguous()
    src.fill_(5)
    assert emb.vectors[0].max().item() == 1.0  # stored a copy


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_embedding_rejects_non_finite(bad: float) -> None:
    t = torch.zeros(1, 4)
    t[0, 2] = bad
    with pytest.raises(EmbeddingFileError, match="NaN or infinite"):
        Embedding("w", [t])


def test_embedding_rejects_bad_shapes() -> None:
    with pytest.raises(EmbeddingFileError):
        Embedding("w", [torch.zeros(4)])
    with pytest.raises(EmbeddingFileError):
        Embedding("w", [torch.zeros(0, 4)])
    with pytest.raises(EmbeddingFileError, match="vector counts"):
        Embedding("w", [torch.zeros(1, 4), torch.zeros(2, 6)])
    with pytest.raises(EmbeddingFileError):
        Embedding("w", [])


def test_nan_file_rejected(tmp_path: Path) -> None:
    t = torch.zeros(1, 768)
    t[0, 0] = float("nan")
    save_file({"emb_params": t}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(EmbeddingFileError, match=r"nan\.safetensors.*NaN"):
        load_embedding(tmp_path / "nan.safetensors")


def test_build_metadata_flat_strings() -> None:
    meta = build_metadata(
        family="sd2", token="<x>", init=None, steps=3, source_hashes=["a"], extra={"k": "v"}
    )
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["oneword.format"] == "1" and meta["oneword.init"] == "" and meta["k"] == "v"
    assert json.loads(meta["oneword.source_sha256"]) == ["a"]
    with pytest.raises(ValueError):
        build_metadata(
            family="x",
            token="t",
            init=None,
            steps=1,
            source_hashes=[],
            extra={"oneword.token": "y"},
        )


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [_one, _two])
def test_round_trip_single_file(tmp_path: Path, make) -> None:
    emb = make()
    out = save_single_file(emb, tmp_path / "sub" / "word.safetensors")
    back = load_embedding(out)
    _same(emb, back)
    for k, v in emb.metadata.items():
        assert back.metadata[k] == v
    assert back.metadata["oneword.widths"] == ",".join(map(str, emb.widths))
    assert back.metadata["oneword.num_vectors"] == str(emb.num_vectors)
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert keys == ({"emb_params"} if len(emb.vectors) == 1 else {"clip_l", "clip_g"})
    _no_temps(out.parent)


@pytest.mark.parametrize("make", [_one, _two])
def test_round_trip_diffusers(tmp_path: Path, make) -> None:
    emb = make()
    paths = save_diffusers(emb, tmp_path / "out")
    assert [p.name for p in paths] == [
        "learned_embeds.safetensors",
        "learned_embeds_2.safetensors",
    ][: len(emb.vectors)]
    for p in paths:  # each file is plain diffusers layout: one key, the token
        with safe_open(str(p), framework="pt") as f:
            assert list(f.keys()) == [emb.token]
    back = load_embedding(paths[0])
    _same(emb, back)
    assert back.metadata["oneword.init"] == emb.metadata["oneword.init"]
    _same(emb, load_embedding(tmp_path / "out"))  # directory path
    _no_temps(tmp_path / "out")


def test_stale_second_file_removed_and_not_merged(tmp_path: Path) -> None:
    save_diffusers(_two(), tmp_path)
    save_diffusers(_one(), tmp_path)
    assert not (tmp_path / "learned_embeds_2.safetensors").exists()
    # even if a stray second file appears, oneword's own one-encoder file is not paired
    shutil.copy(tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors")
    assert load_embedding(tmp_path / "learned_embeds.safetensors").widths == [768]


def test_diffusers_sdxl_pair_from_other_tools_merges(tmp_path: Path) -> None:
    a, b = _rand(2, 768, 3), _rand(2, 1280, 4)
    save_file({"<tok>": a}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<tok>": b}, str(tmp_path / "learned_embeds_2.safetensors"))
    emb = load_embedding(tmp_path / "learned_embeds.safetensors")
    assert emb.token == "<tok>" and emb.widths == [768, 1280]
    assert torch.equal(emb.vectors[0], a) and torch.equal(emb.vectors[1], b)
    check_widths(emb, [768, 1280])


def test_sdxl_pair_missing_second_half(tmp_path: Path) -> None:
    save_diffusers(_two(), tmp_path)
    (tmp_path / "learned_embeds_2.safetensors").unlink()
    with pytest.raises(EmbeddingFileError, match="learned_embeds_2.safetensors is missing"):
        load_embedding(tmp_path)


def test_one_d_diffusers_tensor_and_token_rules(tmp_path: Path) -> None:
    v = _rand(1, 1024, 5)[0]
    save_file({"<sks>": v}, str(tmp_path / "thing.safetensors"))
    emb = load_embedding(tmp_path / "thing.safetensors")
    assert emb.token == "<sks>" and emb.num_vectors == 1 and emb.widths == [1024]
    assert load_embedding(tmp_path / "thing.safetensors", token="other").token == "other"
    save_file({"emb_params": _rand(2, 768, 6)}, str(tmp_path / "my-cat.safetensors"))
    assert load_embedding(tmp_path / "my-cat.safetensors").token == "my-cat"
    # metadata token beats the diffusers key
    save_file({"<key>": v}, str(tmp_path / "m.safetensors"), metadata={"oneword.token": "<meta>"})
    assert load_embedding(tmp_path / "m.safetensors").token == "<meta>"


# ----------------------------------------------------------------------------- content sniffing


def test_a1111_pt_loads_with_stem_token(tmp_path: Path) -> None:
    t = _rand(2, 768, 7)
    path = tmp_path / "my-cat.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "x", "step": 10}, path)
    emb = load_embedding(path)
    assert emb.token == "my-cat" and torch.equal(emb.vectors[0], t)
    renamed = tmp_path / "renamed.bin"
    path.rename(renamed)
    assert torch.equal(load_embedding(renamed).vectors[0], t)


def test_a1111_parameter_and_legacy_formats(tmp_path: Path) -> None:
    t = _rand(1, 768, 8)
    torch.save({"string_to_param": {"*": torch.nn.Parameter(t.clone())}}, tmp_path / "p.pt")
    assert torch.equal(load_embedding(tmp_path / "p.pt").vectors[0], t)
    torch.save({"emb_params": t}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "old.pt").read_bytes()[:1] == b"\x80"
    emb = load_embedding(tmp_path / "old.pt")
    assert emb.token == "old" and torch.equal(emb.vectors[0], t)
    torch.save({"<diff>": t.half()}, tmp_path / "learned_embeds.bin")  # diffusers legacy .bin
    emb = load_embedding(tmp_path)
    assert emb.token == "<diff>" and emb.vectors[0].dtype == torch.float32
    two = _rand(2, 768, 9)  # the original textual_inversion code's layout: an nn.ParameterDict
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": torch.nn.ParameterDict({"*": two.clone()}),
            "name": "pd",
            "step": 5000,
        },
        tmp_path / "pd.pt",
    )
    assert torch.equal(load_embedding(tmp_path / "pd.pt").vectors[0], two)


def test_safetensors_renamed_to_pt_still_loads(tmp_path: Path) -> None:
    emb = _one()
    out = save_single_file(emb, tmp_path / "w.safetensors")
    out.rename(tmp_path / "w.pt")
    _same(emb, load_embedding(tmp_path / "w.pt"))


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path: Path) -> None:
    """A safetensors file begins with its header's length (8 bytes, little-endian): one in 256
    lengths begins with 0x80, a pickle's first byte. Such a file keeps its metadata."""
    for pad in range(300):
        emb = Embedding("<cat>", _one().vectors, {"oneword.note": "x" * pad})
        path = save_single_file(emb, tmp_path / f"w{pad}.safetensors")
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    loaded = load_embedding(path)
    assert loaded.metadata["oneword.note"] == "x" * pad
    _same(emb, loaded)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_raw_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": _Evil(marker)}}, protocol=2))
    with pytest.raises(EmbeddingFileError, match="not safe to load") as info:
        load_embedding(path)
    assert "\n" not in str(info.value) and "evil.pt" in str(info.value)
    assert not marker.exists()


def test_malicious_torch_zip_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"emb_params": torch.zeros(1, 4), "x": _Evil(marker)}, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    with pytest.raises(EmbeddingFileError, match="not safe to load"):
        load_embedding(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"abc",
        b"hello world, this is plain text\n",
        b"\x00" * 64,
        b"PK\x03\x04garbage",
        b"\x80\x02}q\x00",
    ],
    ids=["empty", "short", "text", "zeros", "bad-zip", "cut-pickle"],
)
def test_garbage_files_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(EmbeddingFileError) as info:
        load_embedding(path)
    assert "junk.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_truncated_files_rejected(tmp_path: Path) -> None:
    good = save_single_file(_one(), tmp_path / "good.safetensors").read_bytes()
    torch.save({"emb_params": torch.zeros(2, 768)}, tmp_path / "good.pt")
    good_pt = (tmp_path / "good.pt").read_bytes()
    for name, data in [
        ("a.safetensors", good[:20]),
        ("b.safetensors", good[: len(good) - 100]),
        ("c.pt", good_pt[: len(good_pt) // 2]),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EmbeddingFileError, match=name.replace(".", r"\.")):
            load_embedding(tmp_path / name)


def test_missing_path_and_non_embedding_layout(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingFileError, match="does not exist"):
        load_embedding(tmp_path / "nope.pt")
    with pytest.raises(EmbeddingFileError, match="folder"):
        load_embedding(tmp_path)
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(EmbeddingFileError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "lora.safetensors")
    save_file({"clip_l": torch.zeros(1, 768)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(EmbeddingFileError, match="clip_g"):
        load_embedding(tmp_path / "half.safetensors")


# ----------------------------------------------------------------------------- check_widths


def test_check_widths_messages() -> None:
    emb = _one()
    check_widths(emb, [768])
    with pytest.raises(EmbeddingFileError) as info:
        check_widths(emb, [1024], path="dir/my-cat.safetensors")
    msg = str(info.value)
    assert msg.startswith("my-cat.safetensors ") and "768" in msg and "1024" in msg
    assert "SD 1.x" in msg and "SD 2.x" in msg and "\n" not in msg
    with pytest.raises(EmbeddingFileError, match=r"768.*768, 1280.*SD 1\.x.*SDXL"):
        check_widths(emb, [768, 1280])
    with pytest.raises(EmbeddingFileError, match="another model"):
        check_widths(Embedding("t", [torch.zeros(1, 32)]), [768])


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_helpers(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sha256_file(target) == "b413f47d13ee2fe6c845b2ee141af81de858df4ec549a58b7970bb96645bc8d2"
    _no_temps(tmp_path)


def test_atomic_path_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "b.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".b.bin.tmp-")
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert fileio.__name__ == "oneword.fileio"
    _no_temps(tmp_path)


def _failing_save(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half-written")
    raise OSError("disk full")


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = save_single_file(_one(), tmp_path / "keep.safetensors").read_bytes()
    save_diffusers(_two(), tmp_path / "d")
    old_pair = [
        (tmp_path / "d" / n).read_bytes()
        for n in ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
    ]
    monkeypatch.setattr(eio, "_save_file", _failing_save)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(_two(), tmp_path / "new.safetensors")
    with pytest.raises(OSError):
        save_single_file(_two(), tmp_path / "keep.safetensors")
    with pytest.raises(OSError):
        save_diffusers(_one(), tmp_path / "d")
    with pytest.raises(OSError):
        save_diffusers(_two(), tmp_path / "fresh")
    assert not (tmp_path / "new.safetensors").exists()
    assert (tmp_path / "keep.safetensors").read_bytes() == old
    assert [
        (tmp_path / "d" / n).read_bytes()
        for n in ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
    ] == old_pair
    assert list((tmp_path / "fresh").iterdir()) == []
    _no_temps(tmp_path)
    _no_temps(tmp_path / "d")


def test_failed_second_file_of_pair_keeps_old_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_diffusers(_two(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []
    real = eio._save_file

    def second_fails(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            _failing_save(tensors, filename, metadata)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(eio, "_save_file", second_fails)
    with pytest.raises(OSError):
        save_diffusers(_two("<new>"), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_written_files_are_as_readable_as_the_umask_allows(tmp_path: Path) -> None:
    """An A1111 install running as another user must be able to read the word (safetensors'
    save_file creates files with mode 0600)."""
    old = os.umask(0o022)
    try:
        files = [
            save_single_file(_one(), tmp_path / "w.safetensors"),
            *save_diffusers(_two(), tmp_path / "d"),
        ]
    finally:
        os.umask(old)
    assert [oct(f.stat().st_mode & 0o777) for f in files] == [oct(0o644)] * 3
