"""The job store's SQL: its schema, and SQLite or PostgreSQL behind one small connection class."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path

from oneword.fileio import atomic_write_bytes

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL,
    token TEXT NOT NULL,
    token_key TEXT NOT NULL,
    init TEXT,
    init_how TEXT,
    refine INTEGER NOT NULL,
    images TEXT NOT NULL,
    word_id TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    error TEXT,
    cancel INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    idem_key TEXT,
    body_sha256 TEXT,
    owner TEXT,
    lease_until REAL,
    created REAL NOT NULL,
    started REAL,
    provisional_at REAL,
    finished REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(tenant, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, stage, seq);
CREATE TABLE IF NOT EXISTS words (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    token TEXT NOT NULL,
    token_key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    status TEXT NOT NULL,
    kept TEXT NOT NULL,
    steps INTEGER NOT NULL,
    files TEXT NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS words_token ON words(tenant, token_key);
"""


class Connection:
    """A SQLite or psycopg connection behind one interface: ``?`` parameters, rows by column name."""

    def __init__(self, raw, postgres: bool) -> None:
        self.raw, self.postgres = raw, postgres

    def execute(self, sql: str, args: Sequence = ()):
        return self.raw.execute(sql.replace("?", "%s") if self.postgres else sql, tuple(args))

    def script(self, sql: str) -> None:
        if self.postgres:
            for statement in filter(str.strip, sql.split(";")):
                self.raw.execute(statement)
        else:
            self.raw.executescript(sql)

    def close(self) -> None:
        self.raw.close()


def owner_id(data: Path) -> str:
    """``host:<id kept in DATA/owner>``: the same after a restart of this server."""
    import socket

    path = data / "owner"
    if not path.is_file():
        atomic_write_bytes(path, uuid.uuid4().hex[:12].encode())
    return f"{socket.gethostname()}:{path.read_text().strip()}"


def connect_sqlite(data: Path):
    db = sqlite3.connect(data / "jobs.sqlite", check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=10000")
    return db


def connect_postgres(url: str):
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError as err:
        raise ImportError("a PostgreSQL store needs psycopg: pip install 'oneword[postgres]'") from err
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def postgres_schema(sqlite_schema: str) -> str:
    """The schema in PostgreSQL's types (timestamps in double precision: its REAL is 4 bytes)."""
    return sqlite_schema.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY").replace(
        " REAL", " DOUBLE PRECISION"
    )
