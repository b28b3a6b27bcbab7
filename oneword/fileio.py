"""Small file helpers: atomic writes and content hashes.

Every output file of oneword is written through :func:`atomic_path` (or the two convenience
wrappers), so a crash, a full disk or an exception half-way through never leaves a partial file
behind: the data goes to a hidden temporary file in the same directory, which is renamed onto
the target only once it is complete. An existing target stays untouched if the write fails.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_text", "sha256_file"]


def _temp_name(path: Path) -> Path:
    """A fresh hidden temporary path next to ``path`` (same directory, hence same filesystem)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    """Best-effort fsync of a file or directory (not supported everywhere, e.g. dirs on Windows)."""
    flags = os.O_RDONLY if directory else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is moved onto ``path`` atomically.

    The temporary file is ``.{name}.tmp-{pid}-{random}`` in the target's directory. If the body
    raises (anything, including KeyboardInterrupt), the temporary file is deleted and the
    exception propagates; the target, if it existed, is left as it was.
    """
    target = Path(path)
    tmp = _temp_name(target)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    _fsync_path(target.parent, directory=True)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path`` (an existing
    folder there is removed first), on failure it is deleted and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _public_modes(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _public_modes(root: Path) -> None:
    """Give a finished folder the modes of ordinary files (mkdtemp makes 0700, safetensors 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the target path."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "xb") as fh:
        fh.write(data)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation); return the target path."""
    return atomic_write_bytes(path, text.encode(encoding))


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
