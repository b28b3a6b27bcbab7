"""The worker: the one thread that owns the model, learning words and drawing images in turn.

It is a driver of the :class:`~oneword.inversion.group.GroupEngine`, like ``ti batch``'s, fed by
the job store instead of a dataset. Each turn of its loop, in order of who waits most
impatiently:

1. stops canceled words between steps (keeping their last vectors);
2. gives newly accepted jobs, in waves of up to 8, their initializer word and the encoder's
   prediction in one batched pass each, and stores that prediction at once as a usable
   ``provisional`` word (a short piece of work per word, so it goes first);
3. draws one pipeline call of waiting images (requests with the same steps and guidance share
   it), and starts the turn again while images wait, so an interactive request never waits
   behind the refinement;
4. fills the group's free slots with jobs whose provisional word exists;
5. makes one step of the group, checkpointing each slot every ``save_every`` steps and storing
   the refined word of each slot that finished.

A job's trajectory does not depend on its neighbours in the group (the engine's guarantee), so a
word is the same whether it was refined alone or among fifteen others.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from oneword.errors import OneWordError
from oneword.inversion.checkpoint import state_bytes, state_from_bytes
from oneword.inversion.config import InversionConfig
from oneword.inversion.embedding_io import Embedding, load_embedding_bytes
from oneword.inversion.runfolder import word_file_bytes, word_metadata
from oneword.serve import events as ev
from oneword.serve.config import ServeSettings
from oneword.serve.drawing import Drawing, GenerationRequest
from oneword.serve.records import CANCEL_DISCARD, Job
from oneword.serve.store import Store

logger = logging.getLogger("oneword.serve")

#: How often the worker looks for jobs and cancels that came through other replicas, and stores
#: its running words' progress.
POLL_SECONDS = 1.0

#: Words that join the group per step: a few at a time, so that workers sharing a store split a
#: burst of new words between them instead of the first to look taking them all.
ADMIT_PER_STEP = 4

#: New jobs given their provisional word per pass: larger waves share more of each pass's fixed
#: cost (the last word of a burst of 16 comes sooner), smaller ones give the first word sooner.
ENCODE_WAVE = 8


@dataclass
class World:
    """What the worker serves: the frozen model, the encoder, and the inversion settings."""

    model: object
    encoder: object
    encoder_meta: dict[str, str]
    cfg: InversionConfig
    """Shared by every job; token, initializer, steps and seed are set per job."""
    space: object = None
    """CLIP space of ``auto`` initializers (default: the encoder's)."""
    cache: dict = field(default_factory=dict)
    """Auto-init's candidate words and their text features, made once."""


@dataclass
class _Active:
    job: Job
    cfg: InversionConfig
    fingerprint: dict[str, str]
    loss: float | None = None


class Worker(threading.Thread):
    """See the module docstring. ``observe(name, value)`` receives measurements (metrics)."""

    def __init__(self, world: World, store: Store, hub: ev.EventHub, settings: ServeSettings, observe=None):
        super().__init__(name="oneword-worker", daemon=True)
        self.world, self.store, self.hub, self.settings = world, store, hub, settings
        self.observe = observe or (lambda name, value: None)
        self.drawing = Drawing(settings.max_generation_queue, settings.generation_batch, self.observe)
        self.error: BaseException | None = None
        self.steps_per_second: float | None = None
        """Group steps per second (a moving average): each running word advances one step per group step."""
        self.finished_at: deque[float] = deque(maxlen=50)
        self.occupancy = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._look = True  # the store may hold work
        self._cancels: set[str] = set()
        self._engine = None
        self._active: dict[int, _Active] = {}
        self._recovered = time.monotonic()
        self._polled = 0.0

    # ----------------------------------------------------------------- from other threads
    def notify(self, cancel: str | None = None) -> None:
        """New work in the store, or a job to stop."""
        if cancel is not None:
            self._cancels.add(cancel)
        self._look = True
        self._wake.set()

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        """Queue a generation request; raises :class:`queue.Full` when too many wait."""
        future = self.drawing.submit(request)
        self._wake.set()
        return future

    def stop(self, timeout: float | None = None) -> bool:
        """Checkpoint every running word at a step boundary and end; True when it ended in time."""
        self._stopping.set()
        self._wake.set()
        self.join(timeout)
        return not self.is_alive()

    @property
    def healthy(self) -> bool:
        return self.is_alive() and self.error is None and not self._stopping.is_set()

    def waiting_images(self) -> int:
        """Generation requests waiting for a pipeline call."""
        return self.drawing.queue.qsize()

    def words_per_second(self) -> float | None:
        """Words finished per second over the recent ones."""
        if len(self.finished_at) < 2:
            return None
        span = self.finished_at[-1] - self.finished_at[0]
        return (len(self.finished_at) - 1) / span if span > 0 else None

    # ----------------------------------------------------------------- the loop
    def run(self) -> None:
        from oneword.inversion.group import GroupEngine

        try:
            self._engine = GroupEngine(self.world.model, self.settings.group)
            while not self._stopping.is_set():
                self._wake.clear()
                self._keep_leases()
                self._poll()
                self._cancel()
                busy = False
                if self._look:  # new words first: each is a short, bounded piece of work
                    self._look = False
                    while self._encode():
                        busy = True
                if self.drawing.draw_one_call(self.world.model):  # then one pipeline call of images
                    busy = True
                    continue  # new words may have come meanwhile
                self._admit()
                if self._engine.active:
                    self._step()
                elif not busy:
                    self._wake.wait(1.0)
                    self._look = True
            for sid in list(self._active):  # a step boundary: the states continue exactly
                self._save(sid)
            self._polled = 0.0  # the stored steps are the checkpoints' (a restart shows them)
            self._poll()
        except BaseException as err:  # noqa: BLE001 - readiness reports it; jobs resume on restart
            self.error = err
            logger.exception("the worker stopped")
        finally:
            self.drawing.fail_all("the server is stopping" if self.error is None else "the worker failed")

    def _keep_leases(self) -> None:
        """Take back jobs whose worker stopped elsewhere (their leases expired), a few times per
        lease (this worker's own leases are extended by :meth:`_poll`'s heartbeat)."""
        now = time.monotonic()
        if now - self._recovered < self.store.lease_seconds / 4:
            return
        self._recovered = now
        requeued, failed = self.store.recover(self.settings.max_attempts, mine=False)
        if requeued or failed:
            logger.warning(
                "took over %d job(s) whose worker stopped; %d failed after too many", requeued, failed
            )
            self._look = True

    def _poll(self) -> None:
        """Every :data:`POLL_SECONDS`: look for new jobs, and send the store the running words'
        progress (which extends their leases); it answers with cancels, which may come through
        other replicas."""
        now = time.monotonic()
        if now - self._polled < POLL_SECONDS:
            return
        self._polled, self._look = now, True
        progress = {act.job.id: (self._engine.slot(sid).step, act.loss) for sid, act in self._active.items()}
        self._cancels |= self.store.heartbeat(progress)

    # ----------------------------------------------------------------- encode
    def _encode(self) -> bool:
        """Give the oldest new jobs their provisional words; True when there were any."""
        from oneword.encoder.autoinit import AUTO, resolve_inits
        from oneword.encoder.model import predict_embeddings

        jobs = self.store.claim("encode", ENCODE_WAVE)
        if not jobs:
            return False
        self._look = True  # more may wait
        world, ready = self.world, []
        for job in jobs:
            self._publish(job, ev.ENCODING, "encoding", state="running", stage="encode")
            try:
                ready.append((job, self._images(job)))
            except Exception as err:  # noqa: BLE001 - this job's trouble is its own
                self._fail(job, f"its images cannot be read: {err}")
        if not ready:
            return True
        try:
            given = [job.init or AUTO for job, _ in ready]
            space = world.space if world.space is not None else world.encoder.space
            choices = resolve_inits(
                space if AUTO in given else None,
                world.model,
                [imgs for _, imgs in ready],
                given,
                names=[job.id for job, _ in ready],
                cache=world.cache,
                draws=self.settings.init_draws,
                survivors=self.settings.init_survivors or None,
            )
            starts = predict_embeddings(
                world.encoder, world.model, [imgs for _, imgs in ready], [c.word for c in choices]
            )
        except Exception as err:  # noqa: BLE001
            logger.exception("encoding a wave")
            for job, _ in ready:
                self._fail(job, f"the encoder failed: {type(err).__name__}: {err}")
            return True
        for (job, _), choice, start in zip(ready, choices, starts):
            self.store.set_init(job.id, choice.word, choice.how)
            job = self.store.job(job.id)
            extra = choice.metadata()
            if job.cancel == CANCEL_DISCARD:
                self.store.end_job(job.id, "canceled")
                continue
            final = job.refine == 0 or job.cancel or job.id in self._cancels
            end = ("succeeded" if job.refine == 0 else "canceled", None) if final else None
            self._store_word(job, start, 0, "encoder", extra, end=end, requeue=not final)
            job = self.store.job(job.id)
            self.observe("provisional_seconds", (job.provisional_at or time.time()) - job.created)
            self._publish(job, ev.PROVISIONAL, "provisional", stage="refine")
            if final:
                self._ended(job)
        return True

    def _images(self, job: Job) -> list:
        from oneword.data.images import decode_image

        return [decode_image(self.store.blobs.get(sha), sha[:12]) for sha in job.images]

    # ----------------------------------------------------------------- refine
    def _job_cfg(self, job: Job) -> InversionConfig:
        return replace(
            self.world.cfg,
            token=job.token,
            init=job.init,
            steps=max(1, job.refine),
            save_every=0,
            preview_every=0,
        )

    def _admit(self) -> None:
        engine = self._engine
        for job in self.store.claim("refine", min(ADMIT_PER_STEP, engine.capacity - len(engine))):
            word = self.store.word_of_job(job.id)
            if word is None or job.cancel:
                self._stop_job(job, None)
                continue
            try:
                start = load_embedding_bytes(self.store.blobs.get(word.files["a1111"])).vectors
                cfg = self._job_cfg(job)
                sid = engine.add(self._images(job), cfg, start, name=job.id)
            except Exception as err:  # noqa: BLE001
                logger.debug("adding %s", job.id, exc_info=True)
                self._fail(job, f"{type(err).__name__}: {err}")
                continue
            act = self._active[sid] = _Active(
                job, cfg, {"images": ",".join(job.images), "start": word.files["a1111"]}
            )
            self._resume(sid, act)
        self.occupancy = len(engine)

    @staticmethod
    def _checkpoint(job: Job) -> str:
        return f"{job.id}/last.safetensors"

    def _resume(self, sid: int, act: _Active) -> None:
        files = self.store.checkpoints
        try:
            data = files.read(self._checkpoint(act.job))
        except FileNotFoundError:
            return
        try:
            ts = state_from_bytes(data)
            if ts.meta != act.fingerprint:
                raise OneWordError("it was made from another start")
            self._engine.load(sid, ts)
            self.store.heartbeat({act.job.id: (ts.step, None)})  # where it continues, not where it was
            logger.info("%s: continuing from step %d", act.job.id, ts.step)
        except (OneWordError, ValueError, KeyError, RuntimeError) as err:
            logger.warning("%s: its checkpoint cannot be used (%s); refining from the start", act.job.id, err)
            files.remove(self._checkpoint(act.job))

    def _save(self, sid: int) -> None:
        act = self._active[sid]
        ts = self._engine.state(sid)
        ts.meta = act.fingerprint
        self.store.checkpoints.write(self._checkpoint(act.job), state_bytes(ts))

    def _step(self) -> None:
        engine, t0 = self._engine, time.perf_counter()
        try:
            losses = engine.step()
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: the group's words fail
            logger.exception("a group step failed")
            for sid in list(self._active):
                act = self._active.pop(sid)
                engine.remove(sid)
                self._fail(act.job, f"the refinement failed: {type(err).__name__}: {err}")
            return
        took = time.perf_counter() - t0
        rate = 1.0 / took if took > 0 else 0.0
        self.steps_per_second = (
            rate if self.steps_per_second is None else 0.9 * self.steps_per_second + 0.1 * rate
        )
        self.observe("refine_steps", len(losses))
        for sid in list(self._active):
            act, slot = self._active[sid], engine.slot(sid)
            if sid in losses:
                act.loss = losses[sid]
                self._publish(
                    act.job, ev.progress_id(slot.step), "progress", state="running", stage="refine",
                    step=slot.step, loss=losses[sid],
                )  # fmt: skip
            if slot.active:
                if self.settings.save_every and slot.step % self.settings.save_every == 0:
                    self._save(sid)
                continue
            self._active.pop(sid)
            res = engine.remove(sid)
            if res.error:
                self._fail(act.job, res.error)
            else:
                self._store_word(act.job, res.vectors, res.step, "refined", end=("succeeded", res.loss))
                self._ended(self.store.job(act.job.id))
        self.occupancy = len(engine)

    def _cancel(self) -> None:
        if not self._cancels:
            return
        for sid, act in list(self._active.items()):
            if act.job.id in self._cancels:
                self._active.pop(sid)
                self._stop_job(self.store.job(act.job.id), self._engine.remove(sid))
        self._cancels = {
            c for c in self._cancels if (j := self.store.job(c)) is not None and j.state == "running"
        }
        self.occupancy = len(self._engine)

    def _stop_job(self, job: Job, res) -> None:
        """End a canceled job: keep its last vectors (after at least one step) unless the word was deleted."""
        if job.cancel != CANCEL_DISCARD and res is not None and res.step > 0 and not res.error:
            self._store_word(job, res.vectors, res.step, "partial", end=("canceled", res.loss))
        else:  # the encoder's word, if any, stays as it is
            self.store.end_job(job.id, "canceled")
        self._ended(self.store.job(job.id))

    # ----------------------------------------------------------------- endings
    def _fail(self, job: Job, error: str) -> None:
        """Fail a job; its provisional word, if any, stays as a final word."""
        logger.warning("%s failed: %s", job.id, error)
        self.store.end_job(job.id, "failed", error=error)
        self._ended(self.store.job(job.id))

    def _ended(self, job: Job) -> None:
        self.store.checkpoints.remove(self._checkpoint(job))
        self._cancels.discard(job.id)
        if job.state == "succeeded":
            self.finished_at.append(time.perf_counter())
            self.observe("job_seconds", (job.finished or time.time()) - job.created)
        self._look = True  # a slot is free
        self._publish(job, ev.final_id(job.refine), job.state)

    def _store_word(self, job, vectors, steps: int, kept: str, extra=None, end=None, requeue=False) -> None:
        world = self.world
        meta = word_metadata(
            world.model,
            job.token,
            job.init,
            steps,
            job.images,
            {**world.encoder_meta, **(extra or _init_meta(self.store, job)), "oneword.kept": kept,
             "oneword.job": job.id},
        )  # fmt: skip
        files = word_file_bytes(Embedding(job.token, vectors, meta))
        status = "provisional" if requeue else "final"
        self.store.put_word(job, files, meta, status, kept, steps, end=end, requeue=requeue)

    def _publish(self, job: Job, eid: int, kind: str, **live) -> None:
        word = self.store.word_of_job(job.id) if kind != "progress" else None
        fresh = self.store.job(job.id) if kind != "progress" else job
        self.hub.publish(job.id, ev.Event(eid, kind, ev.snapshot(fresh, word, **live)))


def _init_meta(store: Store, job: Job) -> dict[str, str]:
    """The initializer facts of a job's earlier word (a refined word keeps its provisional's)."""
    word = store.word_of_job(job.id)
    if word is None:
        return {}
    return {k: v for k, v in word.meta.items() if k.startswith("oneword.init_")}
