"""Training data of the encoder as webdataset shards: one sample per concept.

A sample is ``<key>.json`` (initializer word, optional attributes and per-image backgrounds),
``<key>.<i>.png`` (its images) and optionally ``<key>.target.safetensors`` (a target embedding for
distillation, e.g. from textual inversion; safetensors bytes, never pickle). ``ti data shards``
writes them from concept folders or from the toy renderer.
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from oneword.data.images import decode_image
from oneword.errors import InputError
from oneword.fileio import atomic_path

_IMAGE = re.compile(r"^(\d+)\.png$")


@dataclass
class ConceptSample:
    """One concept: its images, initializer word, and optional extras."""

    key: str
    images: list[Image.Image]
    init: str
    attributes: dict[str, str] | None = None
    backgrounds: list[str] | None = None
    target: list[torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_sample(s: ConceptSample) -> dict[str, object]:
    """The tar members of ``s`` (webdataset's dict form)."""
    if not s.images:
        raise InputError(f"concept {s.key!r} has no images")
    if "." in s.key or "/" in s.key:
        raise ValueError(f"shard keys may not contain '.' or '/': {s.key!r}")
    meta = {"init": s.init, "attributes": s.attributes, "backgrounds": s.backgrounds, "n": len(s.images)}
    out: dict[str, object] = {"__key__": s.key, "json": json.dumps(meta).encode()}
    for i, im in enumerate(s.images):
        out[f"{i}.png"] = _png(im)
    if s.target is not None:
        out["target.safetensors"] = save_tensors(
            {f"vectors.{i}": v.float().contiguous() for i, v in enumerate(s.target)}
        )
    return out


def decode_sample(raw: dict) -> ConceptSample:
    """Inverse of :func:`encode_sample` (images decoded with the project's safe loader)."""
    key = raw.get("__key__", "?")
    try:
        meta = json.loads(raw["json"])
        init = str(meta["init"])
    except (KeyError, ValueError, TypeError) as err:
        raise InputError(f"shard sample {key}: no valid json member ({err})") from None
    names = sorted((int(m.group(1)), name) for name in raw if (m := _IMAGE.match(name)))
    images = [decode_image(raw[name], f"{key}.{name}") for _, name in names]
    if not images:
        raise InputError(f"shard sample {key} has no images")
    target = None
    if "target.safetensors" in raw:
        tensors = load_tensors(raw["target.safetensors"])
        target = [tensors[f"vectors.{i}"] for i in range(len(tensors))]
    return ConceptSample(key, images, init, meta.get("attributes"), meta.get("backgrounds"), target)


def write_shard(samples: Iterable[ConceptSample], path: str | Path) -> Path:
    """Write one ``.tar`` shard; it appears atomically when complete."""
    import webdataset as wds

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = wds.TarWriter(str(tmp))
        try:
            for sample in samples:
                writer.write(encode_sample(sample))
        finally:
            writer.close()
    return path


def read_shard(path: str | Path) -> list[ConceptSample]:
    """Every sample of one shard, in order (decoded with the project's safe image loader)."""
    import webdataset as wds

    return [decode_sample(raw) for raw in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]


def write_shards(
    samples: Iterable[ConceptSample], out: str | Path, per_shard: int = 256, prefix: str = "concepts"
) -> list[Path]:
    """Write ``out/<prefix>-000000.tar`` ...; each shard appears atomically when complete."""
    if per_shard < 1:
        raise ValueError("per_shard must be at least 1")
    out = Path(out)
    paths: list[Path] = []
    it = iter(samples)
    try:
        for first in it:  # each pass of the loop fills one shard from the same iterator
            chunk = [first, *islice(it, per_shard - 1)]
            paths.append(write_shard(chunk, out / f"{prefix}-{len(paths):06d}.tar"))
    except BaseException:
        for p in paths:  # a bad concept anywhere: no half-written data set is left behind
            p.unlink(missing_ok=True)
        raise
    if not paths:
        raise InputError("no concepts to write")
    return paths


def folder_samples(
    folders: Sequence[str | Path],
    init: str | Sequence[str] | None = None,
    targets: Sequence[list[torch.Tensor]] | None = None,
) -> Iterator[ConceptSample]:
    """Samples from concept folders (``concept.json`` supplies attributes and, for toy concepts,
    the initializer: the shape). ``init`` is one word for all folders or one per folder.
    ``targets``, one word per concept (its vectors per text encoder, e.g. read from a ``ti invert``
    run), become distillation targets."""
    from oneword.data.concepts import load_concept

    if targets is not None and len(targets) != len(folders):
        raise InputError(f"give one target per concept folder ({len(folders)}), got {len(targets)}")
    inits = [init] * len(folders) if init is None or isinstance(init, str) else list(init)
    if len(inits) == 1:
        inits = inits * len(folders)
    if len(inits) != len(folders):
        raise InputError(
            f"give one --init word for all concept folders or one per folder ({len(folders)}), "
            f"got {len(inits)}"
        )
    keys = [re.sub(r"[^A-Za-z0-9_-]+", "_", Path(f).name) for f in folders]
    if len(set(keys)) < len(keys):  # a tar with two equal keys cannot be read back
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise InputError(f"concept folders need distinct names; these occur twice: {', '.join(twice[:5])}")
    for i, folder in enumerate(folders):
        c = load_concept(folder, inits[i])
        key = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(folder).name)
        target = None if targets is None else targets[i]
        yield ConceptSample(key, [im.image for im in c.images], c.init, c.attributes, target=target)


def is_validation(key: str, fraction: float) -> bool:
    """A stable train/validation split by key hash."""
    return (zlib.crc32(key.encode()) % 10_000) < fraction * 10_000


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from a folder, a glob, a brace pattern (``a-{000000..000009}.tar``) or a list."""
    import glob

    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        if os.path.isdir(s):
            out += sorted(str(p) for p in Path(s).glob("*.tar"))
        elif any(ch in s for ch in "*?["):
            out += sorted(glob.glob(s))
        else:
            out += list(braceexpand.braceexpand(s))
    missing = [p for p in out if "://" not in p and not os.path.isfile(p)]
    if not out or missing:
        raise InputError(f"no shards found for {spec!r}" + (f" (missing: {missing[0]})" if missing else ""))
    for p in out:
        if "://" not in p:
            _check_tar(p)
    return out


def _check_tar(path: str) -> None:
    """A damaged or truncated shard fails here, in one line, not as a traceback hours into a run
    (reading the headers seeks past each member: cheap even for large shards)."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputError(
            f"shard {path} is damaged or truncated ({err}); write it again (ti data shards, ti data targets)"
        ) from None
