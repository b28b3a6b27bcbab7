"""API keys: a keys file holds only their SHA-256 hashes; each key is a tenant.

The file has one key per line, ``NAME sha256:HEX`` (``#`` starts a comment). ``ti serve keys add
NAME --keys FILE`` makes a random key, prints it once and appends its hash. A presented key is
hashed and compared with every stored hash in constant time (no early exit on the first match),
so neither the keys nor their count leak through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from oneword.errors import InputError
from oneword.fileio import atomic_write_text

LOCAL_TENANT = "local"
"""The one tenant of a server without keys (it listens on loopback only)."""

_LINE = re.compile(r"^([A-Za-z0-9_.@-]{1,64})\s+sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class Keys:
    """Tenant name -> SHA-256 of its key."""

    hashes: dict[str, bytes]

    @classmethod
    def load(cls, path: str | Path) -> Keys:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise InputError(f"cannot read the keys file {path}: {err.strerror or err}") from None
        hashes: dict[str, bytes] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = _LINE.match(line)
            if m is None:
                raise InputError(
                    f"{path}, line {n}: expected 'NAME sha256:<64 hex digits>' (make keys with "
                    "ti serve keys add NAME --keys FILE)"
                )
            if m.group(1) in hashes:
                raise InputError(f"{path}, line {n}: the name {m.group(1)!r} has two keys")
            hashes[m.group(1)] = bytes.fromhex(m.group(2))
        if not hashes:
            raise InputError(f"{path} holds no keys; add one with ti serve keys add NAME --keys {path}")
        return cls(hashes)

    def tenant(self, key: str | None) -> str | None:
        """The tenant whose key this is, or None."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, stored in self.hashes.items():
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


def add_key(path: str | Path, name: str) -> str:
    """Append a new random key for ``name`` to the keys file (made if missing); returns the key,
    which is stored nowhere else."""
    path = Path(path)
    if not _LINE.match(f"{name} sha256:{'0' * 64}"):
        raise InputError(f"key name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    old = path.read_text() if path.is_file() else ""
    if old and name in Keys.load(path).hashes:
        raise InputError(f"{path} has a key named {name!r} already; remove its line to replace it")
    key = "ow_" + secrets.token_urlsafe(32)
    line = f"{name} sha256:{hashlib.sha256(key.encode()).hexdigest()}\n"
    atomic_write_text(path, old + ("" if not old or old.endswith("\n") else "\n") + line)
    os.chmod(path, 0o600)
    return key
