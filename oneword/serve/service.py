"""The service behind the HTTP routes: store, events, worker, keys and limits, started and
stopped together. Routes stay thin and call this."""

from __future__ import annotations

import copy
import logging
import math
import secrets
import threading
from collections import OrderedDict

import torch

from oneword.errors import OneWordError
from oneword.models import validate_token
from oneword.serve.auth import Keys
from oneword.serve.config import ServeSettings
from oneword.serve.events import EventHub
from oneword.serve.metrics import Metrics
from oneword.serve.prompts import INTERNAL_PREFIX
from oneword.serve.records import Job, Word
from oneword.serve.store import Store
from oneword.serve.uploads import Rejected
from oneword.serve.worker import Worker, World

logger = logging.getLogger("oneword.serve")


def world_facts(world: World, model_name: str) -> dict:
    """What ``/readyz`` tells about the served model."""
    model = world.model
    return {
        "model": model_name,
        "family": model.family,
        "resolution": model.resolution,
        "num_vectors": world.cfg.num_vectors,
        "encoder": world.encoder_meta.get("oneword.encoder"),
    }


class Service:
    """One model served: see the module docstring. ``keys`` None: one tenant, loopback only."""

    def __init__(self, world: World, settings: ServeSettings, keys: Keys | None, model_name: str) -> None:
        self.world = world
        # the HTTP threads check tokens with their own copy: the worker owns the model's tokenizers
        self._open(settings, keys, world_facts(world, model_name), copy.deepcopy(world.model.tokenizers[0]))
        self.worker = Worker(world, self.store, self.hub, settings, observe=self.metrics.observe)

    @classmethod
    def front(cls, settings: ServeSettings, keys: Keys | None, facts: dict, tokenizer, workers) -> Service:
        """A service whose workers run elsewhere (Ray Serve replicas sharing the store):
        ``workers`` stands in for the worker thread (``notify``, ``submit``, the pace and health)."""
        self = cls.__new__(cls)
        self.world = None
        self._open(settings, keys, facts, tokenizer)
        self.worker = workers
        return self

    def _open(self, settings: ServeSettings, keys: Keys | None, facts: dict, tokenizer) -> None:
        self.settings, self.keys, self.facts = settings, keys, facts
        self.model_name = facts["model"]
        self.store = Store(settings.data, settings.db, settings.owner, settings.lease_seconds, settings.blobs)
        requeued, failed = self.store.recover(settings.max_attempts)
        if requeued or failed:
            logger.info("%d unfinished job(s) continue; %d failed after too many restarts", requeued, failed)
        self.hub = EventHub()
        self.metrics = Metrics(self)
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self._vectors: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._vectors_lock = threading.Lock()
        self.draining = False

    def start(self) -> None:
        if not self.worker.is_alive():
            self.worker.start()

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new work, checkpoint running words at a step boundary and stop the worker;
        True when the worker ended within ``timeout``."""
        self.draining = True
        ended = self.worker.stop(timeout if timeout is not None else self.settings.drain_seconds)
        self.hub.close()
        return ended

    def close(self) -> None:
        if not self.draining or self.worker.is_alive():
            self.drain()
        self.store.close()

    # ----------------------------------------------------------------- health
    def readiness(self) -> list[str]:
        """Why the service cannot take work now (empty when it can)."""
        why = []
        if self.draining:
            why.append("the server is stopping")
        if not self.worker.healthy:
            why.append("the worker is not running" + (f" ({self.worker.error})" if self.worker.error else ""))
        if self.store.queued() >= self.settings.max_queue:
            why.append("the queue is full")
        return why

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise Rejected(
                503, "the server is stopping; retry on another replica or in a moment", {"Retry-After": "5"}
            )

    def retry_after(self, queued: int | None = None) -> int:
        """Seconds until a queue place is likely free, from the measured pace of words."""
        rate = self.worker.words_per_second()
        if rate is None:
            sps = self.worker.steps_per_second
            rate = sps * self.settings.group / max(1, self.settings.refine) if sps else None
        if not rate:
            return 5
        waiting = max(
            1, (queued if queued is not None else self.store.queued()) - self.settings.max_queue + 1
        )
        return max(1, min(600, math.ceil(waiting / rate)))

    def eta(self, job: Job, step: int) -> float | None:
        sps = self.worker.steps_per_second
        if not sps or job.state not in ("queued", "running"):
            return None
        own = (job.refine - step) / sps
        if job.state == "running":
            return own
        position = self.store.queue_position(job) or 1
        return (position - 1) // self.settings.group * job.refine / sps + own

    # ----------------------------------------------------------------- checks
    def check_token(self, token: str) -> None:
        if len(token) > 64:
            raise Rejected(422, f"the token is {len(token)} characters; use at most 64")
        if token.lower().startswith(INTERNAL_PREFIX):
            raise Rejected(
                422, f"tokens starting with {INTERNAL_PREFIX!r} are reserved for the server; pick another"
            )
        with self._tokenizer_lock:
            try:
                validate_token(token, self._tokenizer)
            except OneWordError as err:
                raise Rejected(422, str(err)) from None

    def check_init(self, init: str) -> None:
        with self._tokenizer_lock:
            ids = self._tokenizer(init, add_special_tokens=False).input_ids
        if not init.strip() or not ids or len(init) > 200:
            raise Rejected(
                422, f"init {init!r} is not a usable word; give a plain word such as 'cat', or leave it out"
            )

    def new_token(self) -> str:
        while True:
            token = f"<w-{secrets.token_hex(3)}>"
            try:
                self.check_token(token)
                return token
            except Rejected:
                continue

    def vectors(self, word: Word) -> list[torch.Tensor]:
        """A word's vectors, read from its file (the most recent few hundred are kept in memory)."""
        from oneword.inversion.embedding_io import load_embedding_bytes

        sha = word.files["a1111"]
        with self._vectors_lock:
            if sha in self._vectors:
                self._vectors.move_to_end(sha)
                return self._vectors[sha]
        vectors = load_embedding_bytes(self.store.blobs.get(sha)).vectors
        with self._vectors_lock:
            self._vectors[sha] = vectors
            while len(self._vectors) > 512:
                self._vectors.popitem(last=False)
        return vectors
