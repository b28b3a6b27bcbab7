"""The service's durable state: jobs and words in SQL, files content-addressed on disk.

One database holds every job and word: SQLite by default (``DATA/jobs.sqlite``, WAL,
``synchronous=FULL``), or PostgreSQL (``db="postgresql://..."``; the same statements, with
``FOR UPDATE SKIP LOCKED`` where workers claim jobs). A row is committed before the request that
made it is answered, so an accepted job survives ``kill -9``. Uploaded images and word files are
content-addressed (:mod:`oneword.serve.blobs`): under ``DATA/blobs`` or at any fsspec URL that the
nodes of a cluster share.

Every read and write that a tenant can reach takes the tenant: a row of another tenant is as
absent as a row that does not exist. One connection serves all threads behind a lock (a request
holds it for a few milliseconds; the worker writes once per job state change, not per step).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from oneword.serve.blobs import Blobs, is_url
from oneword.serve.records import (
    ACTIVE,
    CANCEL_DISCARD,
    CANCEL_KEEP,
    FINAL,
    Busy,
    Conflict,
    Job,
    Word,
    job_from_row,
    new_id,
    word_from_row,
)
from oneword.serve.sql import SCHEMA, Connection, connect_postgres, connect_sqlite, owner_id, postgres_schema


class Store:
    """Jobs and words of ``data`` (see the module docstring)."""

    def __init__(
        self,
        data: str | Path,
        db: str | None = None,
        owner: str | None = None,
        lease_seconds: float = 30.0,
        blobs: str | None = None,
    ) -> None:
        self.data = Path(data)
        self.data.mkdir(parents=True, exist_ok=True)
        self.owner = owner or owner_id(self.data)
        """Who this store's claims belong to: stable for one ``data`` folder on one host, so a
        restarted server takes its own running jobs back at once."""
        self.lease_seconds = lease_seconds
        self.blobs = Blobs(blobs or self.data / "blobs")
        self.checkpoints = Blobs(
            f"{blobs.rstrip('/')}/checkpoints" if blobs and is_url(blobs) else self.data / "jobs"
        )
        """Running words' checkpoints (``<job id>/last.safetensors``): beside the blobs when those
        are at a URL, so that another node can continue a word."""
        self._lock = threading.RLock()
        self.postgres = bool(db) and str(db).startswith(("postgresql://", "postgres://"))
        if db and not self.postgres:
            raise ValueError(
                f"db is a postgresql:// URL (or nothing, for SQLite in the data folder), got {db!r}"
            )
        self._db = Connection(
            connect_postgres(db) if self.postgres else connect_sqlite(self.data), self.postgres
        )
        if self.postgres:
            with self._tx() as tx:  # one schema, made once, whichever node starts first
                tx.execute("SELECT pg_advisory_xact_lock(715517)")
                tx.script(postgres_schema(SCHEMA))
        else:
            self._db.script(SCHEMA)
        columns = self._db.execute("SELECT * FROM jobs LIMIT 0").description
        if "owner" not in {c[0] for c in columns}:  # a store made before leases
            for column in (
                "owner TEXT",
                "lease_until DOUBLE PRECISION" if self.postgres else "lease_until REAL",
            ):
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._lock:
            self._db.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: Sequence = ()):
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: Sequence = ()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ----------------------------------------------------------------- blobs
    def _drop_unused_blobs(self, shas: Sequence[str]) -> None:
        """Remove word files no word and no job refers to any more (called inside a transaction)."""
        for sha in set(shas):
            used = self._db.execute(
                "SELECT 1 FROM words WHERE files LIKE ? UNION SELECT 1 FROM jobs WHERE images LIKE ? LIMIT 1",
                (f"%{sha}%", f"%{sha}%"),
            ).fetchone()
            if used is None:
                self.blobs.delete(sha)

    # ----------------------------------------------------------------- jobs
    def create_job(
        self,
        tenant: str,
        token: str,
        init: str | None,
        refine: int,
        images: Sequence[tuple[str, bytes]],
        idem_key: str | None,
        body_sha256: str,
        max_queue: int,
        max_per_key: int,
    ) -> tuple[Job, bool]:
        """Store a new job and its images, or return the job an earlier request with the same
        idempotency key made (``created`` False). Raises :class:`Conflict` (the key was used with
        another body, or the token is the tenant's already) and :class:`Busy` (queue full); nothing
        is stored then."""
        key = token.lower()
        with self._tx() as db:
            if idem_key is not None:
                row = db.execute(
                    "SELECT * FROM jobs WHERE tenant = ? AND idem_key = ?", (tenant, idem_key)
                ).fetchone()
                if row is not None:
                    if row["body_sha256"] != body_sha256:
                        raise Conflict(
                            "this Idempotency-Key was used for a different request; use a new key for new work"
                        )
                    return job_from_row(row), False
            clash = db.execute(
                "SELECT id FROM words WHERE tenant = ? AND token_key = ? UNION "
                "SELECT id FROM jobs WHERE tenant = ? AND token_key = ? AND state IN ('queued', 'running')",
                (tenant, key, tenant, key),
            ).fetchone()
            if clash is not None:
                raise Conflict(
                    f"you already have a word or job with the token {token!r} ({clash['id']}); "
                    "delete it or pick another token"
                )
            queued = db.execute("SELECT COUNT(*) AS n FROM jobs WHERE state = 'queued'").fetchone()["n"]
            if queued >= max_queue:
                raise Busy(f"the queue is full ({queued} jobs waiting); retry later", queued)
            mine = db.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND state IN ('queued', 'running')",
                (tenant,),
            ).fetchone()["n"]
            if mine >= max_per_key:
                raise Busy(
                    f"this key has {mine} unfinished jobs, the most allowed; wait for one to finish", queued
                )
            for sha, data in images:
                self.blobs.put(sha, data)
            jid = new_id("job")
            db.execute(
                "INSERT INTO jobs (id, tenant, state, stage, token, token_key, init, refine, images, "
                "idem_key, body_sha256, created) VALUES (?, ?, 'queued', 'encode', ?, ?, ?, ?, ?, ?, ?, ?)",
                (jid, tenant, token, key, init, refine, json.dumps([s for s, _ in images]), idem_key,
                 body_sha256, time.time()),
            )  # fmt: skip
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
        return job_from_row(row), True

    def job(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job, if it exists and belongs to ``tenant`` (any tenant's with ``None``: the worker)."""
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return job_from_row(row)

    def jobs(self, tenant: str, limit: int = 100) -> list[Job]:
        rows = self._all("SELECT * FROM jobs WHERE tenant = ? ORDER BY seq DESC LIMIT ?", (tenant, limit))
        return [job_from_row(r) for r in rows]

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to start; None once it runs."""
        if job.state != "queued":
            return None
        row = self._one("SELECT COUNT(*) AS n FROM jobs WHERE state = 'queued' AND seq < ?", (job.seq,))
        return int(row["n"]) + 1

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(ACTIVE + FINAL, 0)
        for row in self._all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            out[row["state"]] = int(row["n"])
        return out

    def queued(self) -> int:
        return int(self._one("SELECT COUNT(*) AS n FROM jobs WHERE state = 'queued'")["n"])

    def claim(self, stage: str, limit: int) -> list[Job]:
        """The oldest ``limit`` queued jobs of ``stage``, marked running under this store's
        owner, with a lease of ``lease_seconds`` that :meth:`heartbeat` extends."""
        if limit < 1:
            return []
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state = 'queued' AND stage = ? ORDER BY seq LIMIT ?"
                + (" FOR UPDATE SKIP LOCKED" if self.postgres else ""),  # two workers never take one job
                (stage, limit),
            ).fetchall()
            now = time.time()
            for row in rows:
                db.execute(
                    "UPDATE jobs SET state = 'running', started = COALESCE(started, ?), owner = ?, "
                    "lease_until = ? WHERE id = ?",
                    (now, self.owner, now + self.lease_seconds, row["id"]),
                )
            ids = [r["id"] for r in rows]
        return [self.job(i) for i in ids]

    def set_init(self, job_id: str, init: str, init_how: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET init = ?, init_how = ? WHERE id = ?", (init, init_how, job_id))

    def heartbeat(self, progress: dict[str, tuple[int, float | None]]) -> set[str]:
        """Record the step and loss of this owner's running jobs (so that every replica can show
        them), extend their leases by ``lease_seconds``, and return those of them whose cancel was
        asked for (on any replica). The worker calls it about once a second."""
        if not progress:
            return set()
        with self._tx() as db:
            for job_id, (step, loss) in progress.items():
                db.execute(
                    "UPDATE jobs SET step = ?, loss = ?, lease_until = ? "
                    "WHERE id = ? AND owner = ? AND state = 'running'",
                    (step, loss, time.time() + self.lease_seconds, job_id, self.owner),
                )
            rows = db.execute(
                f"SELECT id FROM jobs WHERE cancel > 0 AND id IN ({', '.join('?' * len(progress))})",
                tuple(progress),
            ).fetchall()
        return {r["id"] for r in rows}

    def recover(self, max_attempts: int, mine: bool = True) -> tuple[int, int]:
        """Jobs whose worker stopped wait again (their checkpoints continue them): with ``mine``
        (at start) this owner's running jobs, and always those of any owner whose lease expired (a
        worker that died elsewhere). A job that was running in ``max_attempts`` stopped workers
        fails (a job that crashes them). Returns (requeued, failed)."""
        stopped = "state = 'running' AND (lease_until IS NULL OR lease_until < ?" + (
            " OR owner = ?)" if mine else ")"
        )
        args = (time.time(), self.owner) if mine else (time.time(),)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET attempts = attempts + 1, owner = 'stopped' WHERE {stopped}", args)
            failed = db.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = ? "
                "WHERE owner = 'stopped' AND state = 'running' AND attempts >= ?",
                (time.time(), f"the server stopped {max_attempts} times while working on it", max_attempts),
            ).rowcount
            requeued = db.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL "
                "WHERE owner = 'stopped' AND state = 'running'"
            ).rowcount
        return requeued, failed

    def request_cancel(self, tenant: str, job_id: str, how: int = CANCEL_KEEP) -> Job | None:
        """Ask a job to stop. A job that waits for the encoder is canceled at once; one whose word
        exists or is being refined is marked, and the worker stops it between steps."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
            if row is None:
                return None
            if row["state"] == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'canceled', cancel = ?, finished = ? WHERE id = ?",
                    (how, time.time(), job_id),
                )  # a word the encoder made is kept as it is
                db.execute("UPDATE words SET status = 'final' WHERE job_id = ?", (job_id,))
            elif row["state"] == "running":
                db.execute(
                    "UPDATE jobs SET cancel = CASE WHEN cancel > ? THEN cancel ELSE ? END WHERE id = ?",
                    (how, how, job_id),
                )
        return self.job(job_id)

    def end_job(
        self,
        job_id: str,
        state: str,
        error: str | None = None,
        step: int | None = None,
        loss: float | None = None,
    ) -> None:
        """End a job; the word it made so far (the encoder's, if any) becomes final as it is."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ?, step = COALESCE(?, step), "
                "loss = COALESCE(?, loss) WHERE id = ?",
                (state, error, time.time(), step, loss, job_id),
            )
            db.execute("UPDATE words SET status = 'final' WHERE job_id = ?", (job_id,))

    # ----------------------------------------------------------------- words
    def put_word(
        self,
        job: Job,
        files: dict[str, bytes],
        meta: dict,
        status: str,
        kept: str,
        steps: int,
        end: tuple[str, float | None] | None = None,
        requeue: bool = False,
    ) -> Word:
        """Store the job's word (a new one, or its next version) and, in the same transaction, end
        the job with ``end`` (state, loss), or with ``requeue`` make it wait for a refinement slot."""
        shas = {layout: _sha256(data) for layout, data in files.items()}
        for layout, data in files.items():
            self.blobs.put(shas[layout], data)
        now = time.time()
        with self._tx() as db:
            old = db.execute("SELECT files FROM words WHERE job_id = ?", (job.id,)).fetchone()
            if old is None:
                wid = job.word_id or new_id("word")
                db.execute(
                    "INSERT INTO words (id, tenant, token, token_key, job_id, status, kept, steps, files, "
                    "meta, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (wid, job.tenant, job.token, job.token.lower(), job.id, status, kept, steps,
                     json.dumps(shas), json.dumps(meta), now, now),
                )  # fmt: skip
                db.execute(
                    "UPDATE jobs SET word_id = ?, provisional_at = COALESCE(provisional_at, ?) WHERE id = ?",
                    (wid, now, job.id),
                )
            else:
                db.execute(
                    "UPDATE words SET status = ?, kept = ?, steps = ?, files = ?, meta = ?, updated = ? "
                    "WHERE job_id = ?",
                    (status, kept, steps, json.dumps(shas), json.dumps(meta), now, job.id),
                )
            if requeue:
                db.execute("UPDATE jobs SET state = 'queued', stage = 'refine' WHERE id = ?", (job.id,))
            if end is not None:
                db.execute(
                    "UPDATE jobs SET state = ?, finished = ?, step = ?, loss = ? WHERE id = ?",
                    (end[0], now, steps, end[1], job.id),
                )
            if old is not None:
                self._drop_unused_blobs(list(json.loads(old["files"]).values()))
            row = db.execute("SELECT * FROM words WHERE job_id = ?", (job.id,)).fetchone()
        return word_from_row(row)

    def word(self, word_id: str, tenant: str) -> Word | None:
        row = self._one("SELECT * FROM words WHERE id = ? AND tenant = ?", (word_id, tenant))
        return None if row is None else word_from_row(row)

    def word_of_job(self, job_id: str) -> Word | None:
        row = self._one("SELECT * FROM words WHERE job_id = ?", (job_id,))
        return None if row is None else word_from_row(row)

    def words(self, tenant: str) -> list[Word]:
        return [
            word_from_row(r)
            for r in self._all("SELECT * FROM words WHERE tenant = ? ORDER BY created", (tenant,))
        ]

    def delete_word(self, tenant: str, word_id: str) -> Word | None:
        """Remove a word (and its files, when nothing else uses them); a job still refining it is
        canceled without keeping anything."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM words WHERE id = ? AND tenant = ?", (word_id, tenant)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM words WHERE id = ?", (word_id,))
            db.execute(
                "UPDATE jobs SET cancel = ? WHERE id = ? AND state IN ('queued', 'running')",
                (CANCEL_DISCARD, row["job_id"]),
            )
            db.execute(
                "UPDATE jobs SET state = 'canceled', finished = ? WHERE id = ? AND state = 'queued'",
                (time.time(), row["job_id"]),
            )
            self._drop_unused_blobs(list(json.loads(row["files"]).values()))
        return word_from_row(row)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
