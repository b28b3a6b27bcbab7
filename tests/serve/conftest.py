"""The service on the shipped toy world, in process (FastAPI's TestClient) or as a `ti serve` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def world():
    """The toy model and encoder, loaded once (each service's worker uses it in turn)."""
    from oneword.serve.server import load_world

    world, _ = load_world(None, None, "cpu")
    return world


@pytest.fixture(scope="session")
def concepts(tmp_path_factory) -> list[Path]:
    """Four held-out toy concepts, three photos each."""
    from oneword.toy.concepts import write_concepts

    folders, _ = write_concepts(tmp_path_factory.mktemp("concepts"), 4, 3, seed=3, held_out=True)
    return [Path(f) for f in folders]


def photos(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(folder.glob("*.png"))]


def make_service(world, data: Path, keys=None, **settings):
    from oneword.serve.config import ServeSettings
    from oneword.serve.service import Service

    return Service(world, ServeSettings(data=str(data), **settings), keys, "toy")


def client(service):
    from fastapi.testclient import TestClient

    from oneword.serve.app import create_app

    return TestClient(create_app(service))


def wait_for(c, job_id: str, until, timeout: float = 120, headers=None) -> dict:
    """Poll the job (bounded in time) until ``until(job)``; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}", headers=headers or {}).json()
        if until(job):
            return job
        assert not done(job), f"job {job_id} ended without getting there: {job}"
        assert time.monotonic() < deadline, f"job {job_id} did not get there in {timeout} s: {job}"
        time.sleep(0.05)


def done(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "canceled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``ti serve`` in a child process on 127.0.0.1, its log in ``data/../server-PORT-N.log``."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data, self.args, self.port, self.proc, self.runs = data, args, free_port(), None, 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> ServerProcess:
        import httpx

        self.runs += 1
        self.log = self.data.parent / f"server-{self.port}-{self.runs}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "oneword.cli",
            "serve",
            "--port",
            str(self.port),
            "--data",
            str(self.data),
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*cmd, *self.args], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"ti serve exited: {self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"ti serve not ready in {timeout} s"
            time.sleep(0.2)

    def kill(self, sig=signal.SIGKILL, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's ``postgresql`` package) in a temporary folder, on a
    loopback port (:class:`oneword.serve.localpg.LocalPostgres`). Yields the server."""
    from oneword.serve.localpg import LocalPostgres, postgres_bin

    if postgres_bin() is None:
        pytest.skip("no PostgreSQL binaries in /usr/lib/postgresql: `make test` installs Debian's postgresql")
    pytest.importorskip("psycopg", reason="psycopg is in the dev extra (make installs it)")
    server = LocalPostgres()
    with server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database on the session's server."""
    return postgres_server.new_database()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto's, in this process) on a loopback port, with fsspec told to use
    it (``FSSPEC_S3_ENDPOINT_URL``; child processes inherit it). Yields ``s3://`` URL maker."""
    pytest.importorskip("s3fs", reason="s3fs is in the dev extra (make installs it)")
    server_mod = pytest.importorskip(
        "moto.server", reason="moto[server] is in the dev extra (make installs it)"
    )
    import uuid

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec reads its environment at import time
    try:
        yield lambda: f"s3://oneword-{uuid.uuid4().hex[:12]}/serve"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.pop("s3", None)
        server.stop()


@pytest.fixture(params=["folder", "s3"])
def store_blobs(request) -> str | None:
    """Where the store keeps its files: the data folder (None) or a fresh bucket on an S3 server."""
    return None if request.param == "folder" else request.getfixturevalue("s3_server")()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_db(request) -> str | None:
    """The job store's database: SQLite (None) or a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
