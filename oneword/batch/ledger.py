"""The batch ledger: one SQLite file in OUT (``ledger.sqlite``) holding every concept's state.

States: ``pending`` -> ``running`` -> ``done`` or ``failed``. Each change is one committed
transaction (WAL journal, ``synchronous=FULL``), made only after what it records is on disk: a
concept is marked done after its files are written (atomically), so a process killed at any
moment leaves concepts either done with their files, or pending/running to be (re)done. A rerun
first returns ``running`` concepts (those of a killed process) to ``pending``; their per-concept
checkpoints let them continue where they were.

The ledger also keeps the run's settings: a rerun into the same OUT with other settings, another
model or another encoder is refused (the group size and the progress options may change).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from oneword.errors import InputError

FILE = "ledger.sqlite"
STATES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS concepts (
    id TEXT PRIMARY KEY,
    ordinal INTEGER NOT NULL,
    token TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    warning TEXT,
    init TEXT,
    init_how TEXT,
    image_hashes TEXT,
    started REAL,
    finished REAL,
    seconds REAL,
    steps INTEGER,
    loss REAL,
    output TEXT
);
CREATE INDEX IF NOT EXISTS concepts_state ON concepts (state, ordinal);
"""


@dataclass
class Row:
    id: str
    ordinal: int
    token: str
    state: str
    attempts: int
    error: str | None
    warning: str | None
    init: str | None
    init_how: str | None
    image_hashes: str | None
    started: float | None
    finished: float | None
    seconds: float | None
    steps: int | None
    loss: float | None
    output: str | None


class Ledger:
    """The ledger of the batch run in ``out`` (opened by :meth:`open` or :meth:`read`)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path, self.conn = path, conn

    @classmethod
    def open(cls, out: str | Path, settings: Mapping[str, object]) -> Ledger:
        """Open (or create) the ledger of ``out`` for a run with ``settings``; :class:`InputError`
        when the run there was started with other settings."""
        path = Path(out) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger = cls(path, _connect(path))
        wanted = json.dumps(settings, sort_keys=True)
        with ledger.conn:
            ledger.conn.executescript(_SCHEMA)
            row = ledger.conn.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
            if row is None:
                ledger.conn.execute("INSERT INTO meta VALUES ('settings', ?)", (wanted,))
                ledger.conn.execute("INSERT INTO meta VALUES ('created', ?)", (repr(time.time()),))
        if row is not None and row[0] != wanted:
            before, now = _flat(json.loads(row[0])), _flat(json.loads(wanted))
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            shown = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in diff[:4])
            ledger.close()
            raise InputError(
                f"{out} holds a batch run with other settings ({shown}); rerun it with its own "
                "settings, or choose another --out"
            )
        return ledger

    @classmethod
    def read(cls, out: str | Path) -> Ledger:
        """The ledger of ``out``, to read (``ti batch status``)."""
        path = Path(out) / FILE
        if not path.is_file():
            raise InputError(f"{out} holds no batch run (no {FILE}); check the path")
        try:
            conn = _connect(path)
            conn.execute("SELECT 1 FROM concepts LIMIT 1")
        except sqlite3.DatabaseError as err:
            raise InputError(f"{path} is not a batch ledger ({err})") from None
        return cls(path, conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- settings
    def settings(self) -> dict:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        return json.loads(row[0]) if row else {}

    # ----------------------------------------------------------------- concepts
    def add(self, concepts: Iterable[tuple[str, str]]) -> int:
        """Record concepts ``(id, token)`` not yet in the ledger as pending, in order; returns how many
        were new. A concept already recorded keeps its state (a rerun skips what is done)."""
        with self.conn:
            start = self.conn.execute("SELECT COALESCE(MAX(ordinal), -1) + 1 FROM concepts").fetchone()[0]
            before = self.conn.total_changes
            for i, (cid, token) in enumerate(concepts):
                self.conn.execute(
                    "INSERT OR IGNORE INTO concepts (id, ordinal, token, state) VALUES (?, ?, ?, 'pending')",
                    (cid, start + i, token),
                )
            return self.conn.total_changes - before

    def recover(self, max_attempts: int | None = None) -> int:
        """Return the concepts a stopped run left ``running`` to ``pending``; those already tried
        ``max_attempts`` times are failed instead (a concept that crashes every run it is in must
        not stop the others forever). Returns how many were failed."""
        with self.conn:
            failed = 0
            if max_attempts is not None:
                failed = self.conn.execute(
                    "UPDATE concepts SET state = 'failed', error = ? WHERE state = 'running' AND attempts >= ?",
                    (
                        f"the run stopped while working on it {max_attempts} times (killed, or crashed by it)",
                        max_attempts,
                    ),
                ).rowcount
            self.conn.execute("UPDATE concepts SET state = 'pending' WHERE state = 'running'")
            return failed

    def retry_failed(self) -> int:
        """Make every failed concept pending again (``--retry-failed``); returns how many."""
        with self.conn:
            return self.conn.execute(
                "UPDATE concepts SET state = 'pending', error = NULL WHERE state = 'failed'"
            ).rowcount

    def pending(self) -> list[str]:
        rows = self.conn.execute("SELECT id FROM concepts WHERE state = 'pending' ORDER BY ordinal")
        return [r[0] for r in rows]

    def start(self, cid: str, init: str | None, init_how: str | None, image_hashes: list[str]) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE concepts SET state = 'running', attempts = attempts + 1, started = ?, init = ?, "
                "init_how = ?, image_hashes = ?, error = NULL WHERE id = ?",
                (time.time(), init, init_how, json.dumps(image_hashes), cid),
            )

    def done(
        self, cid: str, seconds: float, steps: int, loss: float | None, output: str, warning: str | None
    ) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE concepts SET state = 'done', finished = ?, seconds = ?, steps = ?, loss = ?, "
                "output = ?, warning = ? WHERE id = ?",
                (time.time(), seconds, steps, loss, output, warning, cid),
            )

    def fail(self, cid: str, error: str, seconds: float | None = None) -> None:
        one_line = " ".join(error.split())[:500]
        with self.conn:
            self.conn.execute(
                "UPDATE concepts SET state = 'failed', finished = ?, "
                "attempts = CASE WHEN state = 'running' THEN attempts ELSE attempts + 1 END, "
                "seconds = ?, error = ? WHERE id = ?",
                (time.time(), seconds, one_line, cid),
            )

    def row(self, cid: str) -> Row:
        cur = self.conn.execute(f"SELECT {_COLUMNS} FROM concepts WHERE id = ?", (cid,))
        return Row(*cur.fetchone())

    def rows(self, state: str | None = None) -> list[Row]:
        if state is None:
            cur = self.conn.execute(f"SELECT {_COLUMNS} FROM concepts ORDER BY ordinal")
        else:
            cur = self.conn.execute(
                f"SELECT {_COLUMNS} FROM concepts WHERE state = ? ORDER BY ordinal", (state,)
            )
        return [Row(*r) for r in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for state, n in self.conn.execute("SELECT state, COUNT(*) FROM concepts GROUP BY state"):
            out[state] = n
        return out


_COLUMNS = ", ".join(Row.__dataclass_fields__)


def _flat(d: Mapping, prefix: str = "") -> dict[str, object]:
    """``{"inversion": {"seed": 0}}`` -> ``{"inversion.seed": 0}``: a difference names its field."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.isolation_level = "DEFERRED"  # `with conn:` commits a transaction
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn
