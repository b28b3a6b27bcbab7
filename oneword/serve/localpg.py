"""A throwaway PostgreSQL server in a temporary folder, on a loopback port: for tests, benchmarks,
and trying ``ti serve --db`` on one machine. It runs Debian's (or any) ``initdb`` / ``pg_ctl``
binaries, as the ``postgres`` user when started by root (PostgreSQL refuses to run as root).

    with LocalPostgres() as url:            # postgresql://postgres@127.0.0.1:PORT/postgres
        ...
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (the newest of /usr/lib/postgresql/*), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


class LocalPostgres:
    """Start on ``__enter__`` (returns the URL of its ``postgres`` database), stop and delete on exit."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("no PostgreSQL binaries (initdb): apt-get install postgresql")
        self.root: Path | None = None
        self._as_user: list[str] = []
        self.url = ""

    def __enter__(self) -> str:
        import pwd

        self.root = root = Path(tempfile.mkdtemp(prefix="oneword-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._run("initdb", "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        opts = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=on -c max_connections=200"
        self._run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-o", opts, "-w", "start")
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        return self.url

    def new_database(self) -> str:
        """The URL of a new, empty database on this server."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def __exit__(self, *exc) -> None:
        if self.root is None:
            return
        subprocess.run(
            [
                *self._as_user,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.root / "data"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as_user, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise RuntimeError(f"{tool} failed: {(done.stderr or done.stdout).strip()[-500:]}")
