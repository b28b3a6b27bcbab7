"""Reading and writing learned pseudo-word embeddings in the formats other tools use.

Layouts understood (the reader picks one by the file's *content*, never its extension):

* diffusers: safetensors ``{token: [n, d]}`` (``learned_embeds.safetensors``); for SDXL a second
  file ``learned_embeds_2.safetensors`` holds the text-encoder-2 vectors and is merged in.
* single file (AUTOMATIC1111 / ComfyUI / kohya): ``{"emb_params": [n, d]}``, or for SDXL
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
* AUTOMATIC1111 legacy ``.pt``: a torch pickle with ``string_to_param: {"*": [n, d]}`` (or only
  ``emb_params``). Pickles are only ever opened with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from oneword.errors import EmbeddingFileError, TokenError
from oneword.fileio import atomic_path

if TYPE_CHECKING:
    from oneword.models import FrozenLDM

__all__ = [
    "DIFFUSERS_FILE",
    "DIFFUSERS_FILE_2",
    "Embedding",
    "build_metadata",
    "check_widths",
    "family_for_widths",
    "load_embedding",
    "load_embedding_bytes",
    "save_diffusers",
    "save_single_file",
]

DIFFUSERS_FILE = "learned_embeds.safetensors"
DIFFUSERS_FILE_2 = "learned_embeds_2.safetensors"
_RESERVED_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")
_MAX_PICKLE_BYTES = 64 << 20  # a torch file this large is a checkpoint, not an embedding
_FAMILIES = {(768,): "SD 1.x", (1024,): "SD 2.x", (768, 1280): "SDXL"}


_REDO = "re-download or re-export the embedding"
_NOT_TI = "it is not a textual-inversion embedding"


def _fail(name: str, problem: str, fix: str = _REDO) -> EmbeddingFileError:
    """Build a one-line EmbeddingFileError: '<name> <problem>; <fix>'."""
    return EmbeddingFileError(" ".join(f"{name} {problem}; {fix}".split()))


def _check_vectors(vectors: Sequence[Any], label: str) -> list[torch.Tensor]:
    """Validate shapes/values and return float32, contiguous CPU copies."""
    if not vectors:
        raise _fail(label, "has no vectors", "an embedding needs one tensor per text encoder")
    out: list[torch.Tensor] = []
    for i, t in enumerate(vectors):
        ok = isinstance(t, torch.Tensor) and t.ndim == 2 and t.is_floating_point()
        if not ok or min(t.shape) < 1:
            what = type(t).__name__
            if isinstance(t, torch.Tensor):
                what = f"{t.dtype} tensor of shape {tuple(t.shape)}"
            expected = "expected float [n_vectors >= 1, width]; " + _REDO
            raise _fail(label, f"has a {what} for text encoder {i}", expected)
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        if not bool(torch.isfinite(t).all()):
            raise _fail(label, "contains NaN or infinite values", "retrain or use an earlier save")
        out.append(t)
    if len({t.shape[0] for t in out}) != 1:
        counts = [t.shape[0] for t in out]
        raise _fail(label, f"has different vector counts per text encoder {counts}")
    return out


@dataclass
class Embedding:
    """A learned pseudo-word: one [n_vectors, width] float32 tensor per text encoder, in the
    model's text-encoder order (SD1/SD2/toy: one; SDXL: [clip_l (768), clip_g (1280)])."""

    token: str
    vectors: list[torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token.strip():
            raise ValueError(f"embedding token must be a non-empty string, got {self.token!r}")
        self.vectors = _check_vectors(list(self.vectors), f"embedding {self.token!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError("embedding metadata must map str to str")
        self.metadata = dict(self.metadata)

    @property
    def num_vectors(self) -> int:
        """Number of vectors (tokens) the pseudo-word spans."""
        return int(self.vectors[0].shape[0])

    @property
    def widths(self) -> list[int]:
        """Embedding width per text encoder, e.g. [768] or [768, 1280]."""
        return [int(t.shape[1]) for t in self.vectors]


def build_metadata(
    *,
    family: str,
    token: str,
    init: str | None,
    steps: int,
    source_hashes: list[str],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Flat str->str metadata for the safetensors header (widths/num_vectors are added on save)."""
    meta = {
        "oneword.format": "1",
        "oneword.family": str(family),
        "oneword.token": str(token),
        "oneword.init": "" if init is None else str(init),
        "oneword.steps": str(int(steps)),
        "oneword.source_sha256": json.dumps([str(h) for h in source_hashes]),
    }
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"extra metadata key {key!r} would overwrite a oneword field")
        meta[str(key)] = str(value)
    return meta


def _header(embedding: Embedding) -> dict[str, str]:
    """Metadata written to every file: the embedding's own, plus shape and token facts."""
    meta = dict(embedding.metadata)
    meta.setdefault("oneword.format", "1")
    meta["oneword.token"] = embedding.token
    meta["oneword.widths"] = ",".join(str(w) for w in embedding.widths)
    meta["oneword.num_vectors"] = str(embedding.num_vectors)
    return meta


def _save_file(
    tensors: dict[str, torch.Tensor], filename: Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through bytes: that one creates the file with mode 0600, so
    an A1111 running as another user could not read the word; this one follows the umask."""
    Path(filename).write_bytes(save(tensors, metadata=metadata))


def save_diffusers(embedding: Embedding, out_dir: Path) -> list[Path]:
    """Write ``learned_embeds.safetensors`` (+ ``learned_embeds_2.safetensors`` for two encoders).

    Both files are written atomically and replaced together. A stale ``learned_embeds_2``
    left in ``out_dir`` by an earlier SDXL save is removed when saving a one-encoder embedding.
    """
    if len(embedding.vectors) > 2:
        raise ValueError("the diffusers layout holds at most two text encoders")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _header(embedding)
    paths = [out_dir / DIFFUSERS_FILE, out_dir / DIFFUSERS_FILE_2][: len(embedding.vectors)]
    with ExitStack() as stack:
        for path, vec in zip(paths, embedding.vectors):
            tmp = stack.enter_context(atomic_path(path))
            _save_file({embedding.token: vec}, tmp, metadata=meta)
    if len(paths) == 1:
        (out_dir / DIFFUSERS_FILE_2).unlink(missing_ok=True)
    return paths


def save_single_file(embedding: Embedding, path: Path) -> Path:
    """Write the A1111/ComfyUI single-file layout (``emb_params`` or ``clip_l`` + ``clip_g``)."""
    if len(embedding.vectors) == 1:
        tensors = {"emb_params": embedding.vectors[0]}
    elif len(embedding.vectors) == 2:
        tensors = {"clip_l": embedding.vectors[0], "clip_g": embedding.vectors[1]}
    else:
        raise ValueError("the single-file layout holds one or two text encoders")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        _save_file(tensors, tmp, metadata=_header(embedding))
    return path


# --------------------------------------------------------------------------- reading


@dataclass
class _Raw:
    """What one file holds, before token resolution."""

    vectors: list[torch.Tensor]
    metadata: dict[str, str]
    key: str | None  # the token key of a diffusers-layout file
    layout: str  # "diffusers" | "single" | "a1111"


def _sniff(path: Path) -> str:
    """Return 'safetensors', 'torch-zip' or 'torch-pickle' from the first bytes of the file."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as err:
        raise _fail(name, f"cannot be read ({err.strerror or err})", "check its permissions") from err
    if size == 0:
        raise _fail(name, "is empty (0 bytes)")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    # safetensors first: its 8-byte header length may begin with 0x80, a pickle's first byte
    if len(head) == 9 and head[8:9] == b"{":
        if 8 + int.from_bytes(head[:8], "little") <= size:
            return "safetensors"
        if not head.startswith(b"\x80"):
            raise _fail(name, "is truncated or damaged (safetensors header runs past the end)")
    if head.startswith(b"\x80"):
        return "torch-pickle"
    if len(head) < 9:
        raise _fail(name, f"is only {size} bytes long", "it is truncated or not an embedding file")
    raise _fail(name, "is not an embedding file (neither safetensors nor torch)", _NOT_TI)


def _as_2d(value: Any, name: str, key: str) -> torch.Tensor:
    """Accept [d] (one vector) or [n, d]; anything else is an error naming the key."""
    if not isinstance(value, torch.Tensor):
        raise _fail(name, f"has a {type(value).__name__} under {key!r}, not a tensor", _NOT_TI)
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2:
        raise _fail(name, f"has a tensor of shape {tuple(value.shape)} under {key!r}", _NOT_TI)
    return value


def _pick(keys: Sequence[str], name: str) -> tuple[str, list[str]]:
    """Decide the layout from the tensor names: (layout, keys in text-encoder order)."""
    if "clip_l" in keys or "clip_g" in keys:
        if not ("clip_l" in keys and "clip_g" in keys):
            raise _fail(name, "has only one of 'clip_l'/'clip_g'", "an SDXL embedding needs both")
        return "single", ["clip_l", "clip_g"]
    if "emb_params" in keys:
        return "single", ["emb_params"]
    if len(keys) == 1:
        return "diffusers", list(keys)
    shown = ", ".join(repr(k) for k in list(keys)[:5]) or "nothing"
    raise _fail(name, f"holds {len(keys)} tensors ({shown}), no embedding layout", _NOT_TI)


def _read_safetensors(path: Path) -> _Raw:
    name = path.name
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            layout, wanted = _pick(list(f.keys()), name)  # before loading any tensor data
            vectors = [_as_2d(f.get_tensor(k), name, k) for k in wanted]
            metadata = dict(f.metadata() or {})
    except EmbeddingFileError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises assorted error types on bad data
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise _fail(name, f"is damaged or not a valid safetensors file ({reason})") from None
    return _Raw(vectors, metadata, wanted[0] if layout == "diffusers" else None, layout)


def _read_torch(path: Path) -> _Raw:
    name = path.name
    if path.stat().st_size > _MAX_PICKLE_BYTES:
        size_mib = path.stat().st_size >> 20
        raise _fail(name, f"is {size_mib} MiB, far too large for an embedding", _NOT_TI)
    # The original textual_inversion code saved its vectors in an nn.ParameterDict (A1111 and
    # ComfyUI read those): allowed by name, nothing else is.
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([torch.nn.ParameterDict]) if allow is not None else nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "global" in str(err).lower():
            raise _fail(
                name,
                "contains code or objects that are not safe to load",
                "convert it to .safetensors with a tool you trust",
            ) from None
        raise _fail(name, "is damaged or truncated") from None
    except Exception:  # noqa: BLE001 - EOFError, RuntimeError (bad zip, magic number), ...
        raise _fail(name, "is damaged, truncated or not a torch embedding file") from None
    if not isinstance(obj, Mapping):
        raise _fail(name, f"holds a {type(obj).__name__}, not a dict of tensors", _NOT_TI)
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        params = getattr(params, "_parameters", params)  # an nn.ParameterDict's own mapping
        if not isinstance(params, Mapping) or not params:
            raise _fail(name, "has an unusable 'string_to_param' entry")
        key = "*" if "*" in params else next(iter(params))
        return _Raw([_as_2d(params[key], name, "string_to_param")], {}, None, "a1111")
    entries = {str(k): v for k, v in obj.items()}
    reserved = [k for k in _RESERVED_KEYS if k in entries]
    tensors = [k for k, v in entries.items() if isinstance(v, torch.Tensor)]
    layout, wanted = _pick(reserved or tensors, name)
    vectors = [_as_2d(entries[k], name, k) for k in wanted]
    return _Raw(vectors, {}, wanted[0] if layout == "diffusers" else None, layout)


def _read(path: Path) -> _Raw:
    kind = _sniff(path)
    return _read_safetensors(path) if kind == "safetensors" else _read_torch(path)


def _merge_sdxl_pair(path: Path, raw: _Raw) -> _Raw:
    """If ``path`` is the first file of a diffusers SDXL pair, append the second file's vectors."""
    sibling = path.with_name(DIFFUSERS_FILE_2)
    declared = raw.metadata.get("oneword.widths", "")
    if declared and "," not in declared:
        return raw  # written by oneword for a one-encoder model: never pair it
    if not sibling.is_file():
        if "," in declared:
            missing = f"is half of an SDXL embedding but {sibling.name} is missing"
            raise _fail(path.name, missing, "keep both learned_embeds files in one folder")
        return raw
    second = _read(sibling)
    if second.layout != "diffusers" or second.key != raw.key:
        problem = f"does not match {path.name} (token {second.key!r} vs {raw.key!r})"
        raise _fail(sibling.name, problem, "keep only files from one training run together")
    return _Raw(raw.vectors + second.vectors, raw.metadata, raw.key, raw.layout)


def load_embedding(path: str | Path, *, token: str | None = None) -> Embedding:
    """Load an embedding in any supported layout (chosen by content, not extension).

    Token: ``token`` if given, else the ``oneword.token`` metadata, else the diffusers key, else
    the file stem (the A1111 convention: ``my-cat.pt`` is the word ``my-cat``). A directory is
    searched for ``learned_embeds.safetensors``; a diffusers ``learned_embeds.safetensors``
    with a ``learned_embeds_2.safetensors`` beside it loads as a two-encoder (SDXL) embedding.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in (DIFFUSERS_FILE, "learned_embeds.bin") if (path / n).is_file()]
        if not found:
            raise _fail(str(path), f"is a folder without {DIFFUSERS_FILE}", "pass the file itself")
        path = found[0]
    if not path.is_file():
        raise _fail(str(path), "does not exist or is not a file", "check the embedding path")
    raw = _read(path)
    if raw.layout == "diffusers" and path.name == DIFFUSERS_FILE:
        raw = _merge_sdxl_pair(path, raw)
    candidates = (token, raw.metadata.get("oneword.token"), raw.key, path.stem)
    chosen = next(c for c in candidates if c is not None and c.strip())
    return Embedding(chosen, _check_vectors(raw.vectors, path.name), raw.metadata)


def load_embedding_bytes(data: bytes, name: str = "word.safetensors") -> Embedding:
    """:func:`load_embedding` of a single file's bytes (``name`` gives its layout hints and, in
    the A1111 convention, the token when the file names none)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="oneword-embedding-") as tmp:
        path = Path(tmp) / Path(name).name
        path.write_bytes(data)
        return load_embedding(path)


def family_for_widths(widths: Sequence[int]) -> str:
    """Human name of the model family with these text-encoder widths ('another model' if unknown)."""
    return _FAMILIES.get(tuple(int(w) for w in widths), "another model")


def check_widths(embedding: Embedding, widths: Sequence[int], *, path: str | Path | None = None) -> None:
    """Raise EmbeddingFileError unless the embedding's widths equal the model's ``widths``."""
    have, want = embedding.widths, [int(w) for w in widths]
    if have == want:
        return
    name = Path(path).name if path is not None else f"embedding {embedding.token!r}"
    made_for, needed = family_for_widths(have), family_for_widths(want)
    fix = f"use an {needed} embedding or the matching model"
    if needed == "another model":
        fix = "use an embedding made for this model"
    hv, wv = ", ".join(map(str, have)), ", ".join(map(str, want))
    if len(have) == len(want) == 1:
        problem = f"has vectors of width {hv} but the model's text encoder expects {wv}"
    else:
        problem = f"has vectors of widths {hv} but the model's text encoders expect {wv}"
    raise EmbeddingFileError(f"{name} {problem} (this embedding was made for {made_for}; {fix})")


def split_token_override(spec: str | Path) -> tuple[str, str | None]:
    """``"cat.safetensors=<tom>"`` -> ``("cat.safetensors", "<tom>")``; a spec that names an
    existing path (even one with ``=`` in it) or has no ``=`` keeps the file's own token."""
    text = str(spec)
    path, eq, token = text.rpartition("=")
    if not eq or Path(text).exists() or not path or not token:
        return text, None
    return path, token


def add_embeddings(model: FrozenLDM, specs: Sequence[str | Path]) -> list[Embedding]:
    """Load embedding files (``FILE`` or ``FILE=TOKEN`` to use another token) into ``model``;
    widths are checked against its text encoders."""
    loaded = []
    for spec in specs:
        path, token = split_token_override(spec)
        emb = load_embedding(path)
        if token is not None:
            emb = dataclasses.replace(emb, token=token)
        check_widths(emb, model.widths, path=path)
        try:
            model.add_placeholder(emb.token, [v.to(torch.float32) for v in emb.vectors])
        except TokenError as err:
            raise TokenError(f"{path}: {err}; load it under another token with {path}=<name>") from None
        loaded.append(emb)
    return loaded
