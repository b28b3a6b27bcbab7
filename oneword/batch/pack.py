"""``ti batch --format shards``: the done words of a batch packed as webdataset shards with a
Parquet index, for datasets too large to handle as one folder per concept.

``OUT/shards/words-NNNNNN.tar`` holds, per concept (key: its id made file-safe, without dots):
``<key>.safetensors`` (the word in the single-file layout, with its metadata header: loadable by
``ti generate``, A1111 and ComfyUI), ``<key>.json`` (its ledger record) and ``<key>.png`` (its
preview, where rendered). ``OUT/shards/index.parquet`` has a row per packed concept: id, token,
initializer and how it was chosen, steps, final loss, seconds, shard and key. The shards are
written afresh (each atomically) from the ledger and the run folders at the end of every run, so
they always hold exactly the concepts that are done.
"""

from __future__ import annotations

import json
from pathlib import Path

from oneword.batch.ledger import Ledger
from oneword.errors import InputError
from oneword.fileio import atomic_path
from oneword.inversion.runfolder import safe_file_stem

SHARDS = "shards"
INDEX = "index.parquet"


def require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError(
            "--format shards writes a Parquet index and needs pyarrow: pip install 'oneword[batch]'"
        ) from None


def shard_key(cid: str) -> str:
    """A webdataset key for concept ``cid`` (no dots: webdataset splits the key at the first one)."""
    return safe_file_stem(cid).replace(".", "_")


def pack(out: str | Path, ledger: Ledger, per_shard: int = 1000) -> list[Path]:
    """Write ``OUT/shards/`` from the done concepts of ``ledger``; the shard paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from oneword.inversion.embedding_io import load_embedding

    out = Path(out)
    folder = out / SHARDS
    folder.mkdir(parents=True, exist_ok=True)
    rows = ledger.rows("done")
    keys = [shard_key(r.id) for r in rows]
    if len(set(k.lower() for k in keys)) != len(keys):
        raise InputError("two concept ids give the same shard key (ignoring case, dots and odd characters)")
    index, paths = [], []
    for start in range(0, max(len(rows), 1), per_shard):
        chunk = list(zip(rows[start : start + per_shard], keys[start : start + per_shard]))
        if not chunk:
            break
        path = folder / f"words-{start // per_shard:06d}.tar"
        with atomic_path(path) as tmp:
            writer = wds.TarWriter(str(tmp))
            try:
                for row, key in chunk:
                    word_dir = (out / row.output).parent
                    emb = load_embedding(out / row.output)
                    single = word_dir / f"{safe_file_stem(emb.token)}.safetensors"
                    record = {
                        "id": row.id,
                        "token": row.token,
                        "init": row.init,
                        "init_how": row.init_how,
                        "steps": row.steps,
                        "loss": row.loss,
                        "seconds": row.seconds,
                        "image_sha256": json.loads(row.image_hashes or "[]"),
                        "warning": row.warning,
                    }
                    sample = {
                        "__key__": key,
                        "safetensors": single.read_bytes(),
                        "json": json.dumps(record).encode(),
                    }
                    preview = word_dir / "preview.png"
                    if preview.is_file():
                        sample["png"] = preview.read_bytes()
                    writer.write(sample)
                    index.append(
                        {
                            **{
                                k: record[k]
                                for k in ("id", "token", "init", "init_how", "steps", "loss", "seconds")
                            },
                            "shard": path.name,
                            "key": key,
                        }
                    )
            finally:
                writer.close()
        paths.append(path)
    stale = {p for p in folder.glob("words-*.tar")} - set(paths)
    for p in stale:  # an earlier pack with a smaller per_shard wrote more shards
        p.unlink()
    table = pa.Table.from_pylist(index) if index else pa.table({"id": pa.array([], pa.string())})
    with atomic_path(folder / INDEX) as tmp:
        pq.write_table(table, tmp)
    return paths
