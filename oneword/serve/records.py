"""The job store's records (jobs, words), its states and its refusals."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "canceled")
#: ``cancel`` values: keep the best word so far, or keep nothing (the word was deleted).
CANCEL_KEEP, CANCEL_DISCARD = 1, 2


class Conflict(Exception):
    """The request contradicts what is stored (a reused idempotency key, a token in use): 409."""


class Busy(Exception):
    """The queue (or the key's share of it) is full: 429."""

    def __init__(self, message: str, queued: int) -> None:
        super().__init__(message)
        self.queued = queued


@dataclass
class Job:
    id: str
    tenant: str
    state: str
    stage: str
    token: str
    init: str | None
    init_how: str | None
    refine: int
    images: list[str]
    word_id: str | None
    step: int
    loss: float | None
    error: str | None
    cancel: int
    attempts: int
    created: float
    started: float | None
    provisional_at: float | None
    finished: float | None
    seq: int


@dataclass
class Word:
    id: str
    tenant: str
    token: str
    job_id: str
    status: str
    """``provisional`` (the encoder's prediction, refinement under way) or ``final``."""
    kept: str
    """``encoder``, ``refined``, or ``partial`` (a canceled refinement's last vectors)."""
    steps: int
    files: dict[str, str]
    """Layout -> SHA-256 of the file's bytes."""
    meta: dict
    created: float
    updated: float


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def job_from_row(row) -> Job:
    d = dict(row)
    d["images"] = json.loads(d["images"])
    for k in ("token_key", "idem_key", "body_sha256", "owner", "lease_until"):
        d.pop(k, None)
    return Job(**d)


def word_from_row(row) -> Word:
    d = dict(row)
    d.pop("token_key")
    d["files"], d["meta"] = json.loads(d["files"]), json.loads(d["meta"])
    return Word(**d)
