"""Content-addressed files of the service (uploaded photos, word files): a local folder, or any
fsspec URL so that the nodes of a cluster share them (``s3://bucket/prefix``, ``gs://...``,
``az://...``; the protocol's package, such as ``s3fs``, must be installed).

A file is named by the SHA-256 of its bytes under ``<2 hex>/<sha256>``: the same photo uploaded
twice is stored once, and a name never changes meaning, so readers need no locks. A file appears
whole or not at all: locally by an atomic rename, on object stores because one PUT is atomic, on
other fsspec file systems by writing a temporary name and moving it.

Connection settings of a remote store come from fsspec's environment configuration, for example
``FSSPEC_S3_ENDPOINT_URL=http://minio:9000`` with ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
for an S3-compatible server.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from oneword.fileio import atomic_write_bytes

_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def is_url(location: str | Path) -> bool:
    """True for an fsspec URL other than a plain local path (``file://`` counts as local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


class Blobs:
    """Files under ``location`` (a folder or an fsspec URL), by key (``a/b``); :meth:`put` names
    a file by the SHA-256 of its bytes."""

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.location = text
        if not is_url(text):
            self._root = Path(text.removeprefix("file://"))
            self._root.mkdir(parents=True, exist_ok=True)
            self._fs = None
            return
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with the serve extra's dependencies
            raise ValueError(f"{text} needs fsspec: pip install fsspec") from None
        try:
            self._fs, root = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as err:
            raise ValueError(f"cannot open {text}: {err}") from None
        self._remote_root = root.rstrip("/")
        self._atomic = bool(set(_protocols(self._fs)) & _ATOMIC_PUT)
        try:
            self._fs.makedirs(self._remote_root, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot use {text} for the service's files: {err}") from None

    def where(self, key: str) -> str:
        """Where the file ``key`` lives (a path or a URL path), for messages and tests."""
        if self._fs is None:
            return str(self._root / key)
        return f"{self._remote_root}/{key}"

    def exists(self, key: str) -> bool:
        if self._fs is None:
            return (self._root / key).is_file()
        return bool(self._fs.exists(self.where(key)))

    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` as ``key``, replacing what was there; readers see the old file or the new."""
        if self._fs is None:
            path = self._root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            return
        target = self.where(key)
        if self._atomic:
            self._fs.pipe_file(target, data)
        else:
            temporary = f"{target}.tmp-{secrets.token_hex(4)}"
            self._fs.pipe_file(temporary, data)
            self._fs.mv(temporary, target)
        self._fs.invalidate_cache(target)

    def read(self, key: str) -> bytes:
        """The bytes of ``key``; FileNotFoundError when there is no such file."""
        if self._fs is None:
            return (self._root / key).read_bytes()
        return self._fs.cat_file(self.where(key))

    def remove(self, key: str) -> None:
        if self._fs is None:
            (self._root / key).unlink(missing_ok=True)
            return
        try:
            self._fs.rm_file(self.where(key))
        except FileNotFoundError:
            pass
        self._fs.invalidate_cache(self.where(key))

    # content-addressed files: key ``<2 hex>/<sha256>``
    def put(self, sha: str, data: bytes) -> None:
        """Store ``data`` under its hash ``sha`` (nothing happens when it is already there)."""
        if not self.exists(_addressed(sha)):
            self.write(_addressed(sha), data)

    def get(self, sha: str) -> bytes:
        return self.read(_addressed(sha))

    def delete(self, sha: str) -> None:
        self.remove(_addressed(sha))


def _addressed(sha: str) -> str:
    return f"{sha[:2]}/{sha}"


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
