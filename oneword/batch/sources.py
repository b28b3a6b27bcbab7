"""What ``ti batch`` reads: the concepts of a SOURCE, each an id, its image files, and optionally
its initializer word and token.

A SOURCE is one of:

- a **folder of concept folders**: every sub-folder is a concept named after it (one without
  image files fails alone); hidden folders and files, and a batch's own OUT inside it, are skipped;
- a **manifest**: JSON Lines (``.jsonl``), one object per concept, or CSV (``.csv``) with a header.
  Fields: ``id``, ``images`` (JSONL: a list; CSV: paths separated by ``;``) or ``image`` (one path
  per row, rows of one id gathered in order), and optional ``init`` and ``token``. Relative paths
  are relative to the manifest's folder.

Ids are checked before any work: none empty, none twice (ids that differ only in case count as
the same: they name one run folder on case-insensitive file systems, and one token).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from oneword.data.images import IMAGE_SUFFIXES
from oneword.errors import InputError

MANIFEST_SUFFIXES = (".jsonl", ".csv")


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


def read_source(source: str | Path) -> list[ConceptSpec]:
    """The concepts of ``source`` in its order; :class:`InputError` for a source that cannot be
    read at all or whose ids collide. A concept with missing files is returned with ``problems``:
    it fails alone, the others go on."""
    path = Path(source)
    if path.is_dir():
        specs = _folder_source(path)
    elif path.suffix.lower() == ".jsonl":
        specs = _jsonl_source(path)
    elif path.suffix.lower() == ".csv":
        specs = _csv_source(path)
    elif not path.exists():
        raise InputError(f"{source} does not exist (give a folder of concept folders or a manifest)")
    else:
        raise InputError(
            f"{source}: not a folder of concept folders nor a manifest ({', '.join(MANIFEST_SUFFIXES)})"
        )
    if not specs:
        raise InputError(f"{source} holds no concepts")
    check_ids(specs)
    for spec in specs:
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


def _jsonl_source(path: Path) -> list[ConceptSpec]:
    base, specs = path.parent, []
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
        images = row.get("images", [row["image"]] if "image" in row else None)
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise InputError(f"{where}: 'images' must be a list of paths")
        specs.append(
            ConceptSpec(
                _text(row.get("id"), "id", where) or "",
                [base / i for i in images],
                _text(row.get("init"), "init", where),
                _text(row.get("token"), "token", where),
                where,
            )
        )
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
