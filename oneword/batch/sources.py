"""What ``ti batch`` reads: the concepts of a SOURCE, each an id, its image files, and optionally
its initializer word and token.

A SOURCE is one of:

- a **folder of concept folders**: every sub-folder is a concept named after it (one without
  image files fails alone); hidden folders and files, and a batch's own OUT inside it, are skipped;
- a **manifest**: JSON Lines (``.jsonl``) or Parquet (``.parquet``, with pyarrow), one record per
  concept, or CSV (``.csv``) with a header. Fields: ``id``, ``images`` (a list; in CSV, paths
  separated by ``;``) or ``image`` (CSV: one path per row, rows of one id gathered in order), and
  optional ``init`` and ``token``. Relative paths are relative to the manifest's folder;
- **webdataset shards** as ``ti data shards`` writes them: a ``.tar`` file, a folder of them, a
  glob or a brace pattern (``concepts-{000000..000009}.tar``). A sample's key is its id, its
  ``json`` member's ``init`` its initializer word; its images are read from the shard when the
  concept's turn comes.

Ids are checked before any work: none empty, none twice (ids that differ only in case count as
the same: they name one run folder on case-insensitive file systems, and one token).
"""

from __future__ import annotations

import csv
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from oneword.data.images import IMAGE_SUFFIXES
from oneword.errors import InputError

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass
class ConceptSpec:
    """One concept of a batch, as its source describes it (nothing is read yet)."""

    id: str
    images: list[Path]
    init: str | None = None
    token: str | None = None
    where: str = ""
    """Where the source describes it (a folder, or a manifest's line), for error messages."""
    problems: list[str] = field(default_factory=list)
    """What is wrong with it that does not stop the others (e.g. image files that do not exist)."""
    shard: str | None = None
    """A shard source: the ``.tar`` file whose ``members`` are the images (``images`` is empty)."""
    members: list[str] = field(default_factory=list)

    def load(self, max_pixels: int) -> tuple[list, list[str]]:
        """The usable images and a line per unusable one (:func:`oneword.data.images.load_files`)."""
        from oneword.data.images import load_blobs, load_files

        if self.shard is None:
            return load_files(self.images, max_pixels=max_pixels)
        with tarfile.open(self.shard) as tar:
            blobs = [
                (f"{Path(self.shard).name}:{name}", tar.extractfile(name).read()) for name in self.members
            ]
        return load_blobs(blobs, max_pixels=max_pixels)

    def to_dict(self) -> dict:
        """A JSON-able form (for workers in other processes); :meth:`from_dict` inverts it."""
        return {**asdict(self), "images": [str(p) for p in self.images]}

    @classmethod
    def from_dict(cls, d: dict) -> ConceptSpec:
        return cls(**{**d, "images": [Path(p) for p in d["images"]]})


def read_source(source: str | Path) -> list[ConceptSpec]:
    """The concepts of ``source`` in its order; :class:`InputError` for a source that cannot be
    read at all or whose ids collide. A concept with missing files is returned with ``problems``:
    it fails alone, the others go on."""
    path = Path(source)
    if _is_shards(source):
        specs = _shard_source(str(source))
    elif path.is_dir():
        specs = _folder_source(path)
    elif path.suffix.lower() == ".jsonl":
        specs = _jsonl_source(path)
    elif path.suffix.lower() == ".csv":
        specs = _csv_source(path)
    elif path.suffix.lower() == ".parquet":
        specs = _parquet_source(path)
    elif not path.exists():
        raise InputError(f"{source} does not exist (give a folder of concept folders or a manifest)")
    else:
        raise InputError(
            f"{source}: not a folder of concept folders nor a manifest ({', '.join(MANIFEST_SUFFIXES)})"
        )
    if not specs:
        raise InputError(f"{source} holds no concepts")
    check_ids(specs)
    for spec in (s for s in specs if s.shard is None):
        missing = [str(p) for p in spec.images if not p.is_file()]
        if missing:
            spec.problems.append(
                f"missing image file(s): {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
        if not spec.images and not spec.problems:
            spec.problems.append("no images listed")
    return specs


def check_ids(specs: list[ConceptSpec]) -> None:
    seen: dict[str, ConceptSpec] = {}
    for spec in specs:
        if not spec.id.strip():
            raise InputError(f"{spec.where}: a concept without an id")
        other = seen.get(spec.id.lower())
        if other is not None:
            raise InputError(
                f"two concepts share the id {spec.id!r} ({other.where} and {spec.where}); ids must "
                "be distinct (ignoring case)"
            )
        seen[spec.id.lower()] = spec


def _folder_source(root: Path) -> list[ConceptSpec]:
    specs = []
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for sub in sorted(p for p in subs if not (p / "ledger.sqlite").is_file()):  # not a batch's OUT
        files = sorted(
            p
            for p in sub.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        spec = ConceptSpec(sub.name, files, where=str(sub))
        if not files:
            spec.problems.append(f"no image files in {sub}")
        specs.append(spec)
    if not specs and any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        raise InputError(
            f"{root} holds images, not concept folders: put each concept's images in a sub-folder "
            "(or use ti-encode for one concept)"
        )
    return specs


def _text(value, what: str, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, int)):
        raise InputError(f"{where}: {what} must be text, got {type(value).__name__}")
    return str(value)


def _row_spec(row: dict, base: Path, where: str) -> ConceptSpec:
    """A JSONL or Parquet record as a concept."""
    images = row.get("images", [row["image"]] if row.get("image") else None)
    if isinstance(images, str):
        images = [p.strip() for p in images.split(";") if p.strip()]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise InputError(f"{where}: 'images' must be a list of paths")
    return ConceptSpec(
        _text(row.get("id"), "id", where) or "",
        [base / i for i in images],
        _text(row.get("init"), "init", where),
        _text(row.get("token"), "token", where),
        where,
    )


def _jsonl_source(path: Path) -> list[ConceptSpec]:
    specs = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise InputError(f"{where}: not a JSON object ({err})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: not a JSON object")
        specs.append(_row_spec(row, path.parent, where))
    return specs


def _parquet_source(path: Path) -> list[ConceptSpec]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            f"reading the Parquet manifest {path} needs pyarrow: pip install 'oneword[batch]'"
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise InputError(
            f"cannot read the Parquet manifest {path}: {' '.join(str(err).split())[:200]}"
        ) from None
    if rows and "id" not in rows[0]:
        raise InputError(f"{path}: the manifest needs 'id' and 'images' columns, got {sorted(rows[0])}")
    return [_row_spec(row, path.parent, f"{path}: row {n}") for n, row in enumerate(rows, 1)]


def _is_shards(source: str | Path) -> bool:
    text, path = str(source), Path(source)
    if path.suffix == ".tar" or any(ch in text for ch in "*?[{"):
        return True
    return path.is_dir() and any(path.glob("*.tar")) and not any(p.is_dir() for p in path.iterdir())


def _shard_source(spec: str) -> list[ConceptSpec]:
    from oneword.data.shards import expand_shards

    specs = []
    for shard in expand_shards(spec):  # damaged shards are refused here, in one line
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    key, _, part = Path(member.name).name.partition(".")
                    samples.setdefault(key, {})[part] = member
            for key, parts in samples.items():
                init = None
                if "json" in parts:
                    try:
                        meta = json.loads(tar.extractfile(parts["json"]).read())
                        init = (
                            _text(meta.get("init"), "init", f"{shard}:{key}")
                            if isinstance(meta, dict)
                            else None
                        )
                    except ValueError:
                        pass  # the concept fails alone when its images are read
                names = sorted(
                    (p for p in parts if p.endswith(".png") and p[:-4].isdigit()), key=lambda p: int(p[:-4])
                )
                where = f"{shard}:{key}"
                spec_ = ConceptSpec(
                    key, [], init, None, where, shard=shard, members=[parts[n].name for n in names]
                )
                if not names:
                    spec_.problems.append(f"no images in shard sample {where}")
                specs.append(spec_)
    return specs


def _csv_source(path: Path) -> list[ConceptSpec]:
    base = path.parent
    rows = csv.DictReader(_read_lines(path))
    fields = set(rows.fieldnames or ())
    if "id" not in fields or not fields & {"images", "image"}:
        raise InputError(
            f"{path}: the header needs 'id' and 'images' (or 'image') columns, got {sorted(fields)}"
        )
    by_id: dict[str, ConceptSpec] = {}
    specs = []
    for n, row in enumerate(rows, 2):
        where = f"{path}:{n}"
        cid = (row.get("id") or "").strip()
        files = [p.strip() for p in (row.get("images") or row.get("image") or "").split(";") if p.strip()]
        spec = by_id.get(cid) if "image" in fields and "images" not in fields else None
        if spec is None:
            spec = ConceptSpec(
                cid,
                [],
                (row.get("init") or "").strip() or None,
                (row.get("token") or "").strip() or None,
                where,
            )
            if cid and cid in by_id:  # an id on two rows of an images-per-row manifest
                check_ids([by_id[cid], spec])
            by_id.setdefault(cid, spec)
            specs.append(spec)
        spec.images += [base / f for f in files]
    return specs


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the manifest {path}: {err}") from None
