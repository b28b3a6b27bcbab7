"""Server-sent events of jobs: what happened, with ids that order them across restarts.

A job's event ids follow its life, not a counter: 1 ``queued``, 2 ``encoding``, 3 ``provisional``
(the encoder's word is stored), ``3 + k`` ``progress`` (refinement step k), and ``4 + total`` the
final ``succeeded``, ``failed`` or ``canceled``. A client that resumes with ``Last-Event-ID: n``
gets every event after ``n`` that is known. Progress events live in memory (:class:`EventHub`);
the state events are rebuilt from the job's row, so they are replayed after a restart too, and
a job continued from its checkpoint at step s emits ids from ``3 + s + 1`` on, in order.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from oneword.serve.records import FINAL, Job, Word

QUEUED, ENCODING, PROVISIONAL = 1, 2, 3


def progress_id(step: int) -> int:
    return PROVISIONAL + step


def final_id(total: int) -> int:
    return PROVISIONAL + total + 1


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict

    def encode(self) -> bytes:
        return f"id: {self.id}\nevent: {self.type}\ndata: {json.dumps(self.data)}\n\n".encode()


def snapshot(job: Job, word: Word | None = None, **live) -> dict:
    """The payload of every event: where the job is."""
    out = {
        "job_id": job.id,
        "state": job.state,
        "stage": job.stage,
        "step": job.step,
        "total": job.refine,
        "loss": job.loss,
        "word_id": job.word_id if word is None else word.id,
        "word_status": None if word is None else word.status,
        "error": job.error,
    }
    out.update(live)
    return out


def state_events(job: Job, word: Word | None) -> list[Event]:
    """The events a job's row shows happened, each with the job as it was then; of progress, only
    the step the worker last stored (every second or so)."""
    before = {"step": 0, "loss": None, "word_id": None, "word_status": None, "error": None}
    out = [Event(QUEUED, "queued", {**snapshot(job, word), **before, "state": "queued", "stage": "encode"})]
    if job.started is not None:
        out.append(
            Event(
                ENCODING, "encoding", {**snapshot(job, word), **before, "state": "running", "stage": "encode"}
            )
        )
    if job.provisional_at is not None and job.word_id is not None:
        out.append(
            Event(
                PROVISIONAL,
                "provisional",
                {**snapshot(job, word), **before, "state": "queued", "stage": "refine", "word_id": job.word_id,
                 "word_status": "provisional"},
            )
        )  # fmt: skip
    if job.state == "running" and job.stage == "refine" and job.step > 0:  # as the worker last stored it
        out.append(Event(progress_id(job.step), "progress", snapshot(job, word)))
    if job.state in FINAL:
        out.append(Event(final_id(job.refine), job.state, snapshot(job, word)))
    return out


class EventHub:
    """Progress events in memory, and the subscribers of each job's stream (threads publish,
    event loops read)."""

    def __init__(self, jobs_kept: int = 2000) -> None:
        self._lock = threading.Lock()
        self._history: OrderedDict[str, list[Event]] = OrderedDict()
        self._subscribers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}
        self._kept = jobs_kept
        self.closed = False

    def publish(self, job_id: str, event: Event) -> None:
        with self._lock:
            if event.type == "progress":
                history = self._history.setdefault(job_id, [])
                self._history.move_to_end(job_id)
                history.append(event)
                while len(self._history) > self._kept:
                    self._history.popitem(last=False)
            subscribers = list(self._subscribers.get(job_id, ()))
        self._deliver(job_id, subscribers, event)

    def _deliver(self, job_id: str, subscribers, event: Event | None) -> None:
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # its event loop is closed: a stream that was never finished
                self.unsubscribe(job_id, queue)

    def progress(self, job_id: str) -> list[Event]:
        with self._lock:
            return list(self._history.get(job_id, ()))

    def latest(self, job_id: str) -> Event | None:
        with self._lock:
            history = self._history.get(job_id)
            return history[-1] if history else None

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers.setdefault(job_id, []).append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            subs = [s for s in self._subscribers.get(job_id, []) if s[1] is not queue]
            if subs:
                self._subscribers[job_id] = subs
            else:
                self._subscribers.pop(job_id, None)

    def close(self) -> None:
        """Wake every stream so that it ends (the server is stopping)."""
        with self._lock:
            self.closed = True
            subscribers = {job: list(subs) for job, subs in self._subscribers.items()}
        for job_id, subs in subscribers.items():
            self._deliver(job_id, subs, None)
