"""``ti batch``: turn every concept of a source into a word, on one loaded model, resumably.

:func:`run_batch` is a driver of the group engine: it keeps every slot of a
:class:`~oneword.inversion.group.GroupEngine` busy (a concept that finishes frees its slot for the
next at once), computes the encoder's predictions and the zero-shot initializers for each wave of
new concepts in one batched pass, checkpoints every slot every ``save_every`` steps, and records
each concept in the :class:`~oneword.batch.ledger.Ledger` only after its files are written. Each
concept's word goes to ``OUT/concepts/<id>/`` through
:class:`~oneword.inversion.runfolder.RunFolder`, in ``ti invert``'s layout.

A concept that cannot be done (no usable images, missing files, a loss that goes NaN) is recorded
as failed with its reason, and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from oneword.batch.ledger import Ledger
from oneword.batch.report import render_previews, write_previews, write_report
from oneword.batch.sources import ConceptSpec
from oneword.errors import InputError, OneWordError
from oneword.fileio import atomic_write_text
from oneword.inversion.checkpoint import load_state, save_state
from oneword.inversion.config import PER_RUN_FIELDS, InversionConfig
from oneword.inversion.embedding_io import Embedding
from oneword.inversion.runfolder import CHECKPOINT, CONFIG, RunFolder, safe_file_stem, word_metadata

logger = logging.getLogger("oneword")

CONCEPTS = "concepts"


@dataclass
class BatchSettings:
    """How ``ti batch`` turns concepts into words (the inversion settings aside)."""

    method: Literal["encode", "invert"] = "encode"
    steps: int = 200
    """Optimization steps per concept: the refinement's (encode; 0 = the encoder alone) or the
    inversion's from the initializer word (invert)."""
    group: int = 8
    """Concepts optimized together (one UNet pass per step for the whole group)."""
    init: str = "auto"
    """Initializer word of concepts whose source gives none: a word, or ``auto`` (zero-shot)."""
    init_vocab: list[str] | None = None
    """Candidate words of ``auto`` (default: see :mod:`oneword.encoder.autoinit`)."""
    save_every: int = 50
    """Checkpoint every slot every N steps (0: only what Ctrl-C saves)."""
    preview_steps: int = 25
    """Sampling steps of each word's ``preview.png``, rendered when every concept is done (0: none)."""
    retry_failed: bool = False
    format: Literal["folders", "shards"] = "folders"
    """``shards``: also pack the done words as webdataset shards with a Parquet index (:mod:`.pack`)."""
    per_shard: int = 1000
    progress: bool = True
    log_json: bool = False
    """One JSON line per finished concept on stdout."""

    def __post_init__(self) -> None:
        if self.method not in ("encode", "invert"):
            raise ValueError(f"method is encode or invert, got {self.method!r}")
        if self.steps < 0 or (self.method == "invert" and self.steps < 1):
            raise ValueError("steps must be at least 1 with method invert (0 or more with encode)")
        if self.group < 1 or self.per_shard < 1:
            raise ValueError("group and per_shard must be at least 1")
        if self.format not in ("folders", "shards"):
            raise ValueError(f"format is folders or shards, got {self.format!r}")
        if self.save_every < 0 or self.preview_steps < 0:
            raise ValueError("save_every and preview_steps must be 0 or more")


def token_of(spec: ConceptSpec) -> str:
    return spec.token or f"<{safe_file_stem(spec.id)}>"


def concept_dir(out: str | Path, spec_id: str) -> Path:
    return Path(out) / CONCEPTS / safe_file_stem(spec_id)


def check_names(specs: Sequence[ConceptSpec], model) -> None:
    """Before any work: tokens and run folders distinct (ignoring case), tokens new to the model."""
    from oneword.models import validate_token

    for what, key in (("token", token_of), ("run folder", lambda s: safe_file_stem(s.id))):
        seen: dict[str, str] = {}
        for spec in specs:
            name = key(spec).lower()
            if name in seen:
                raise InputError(
                    f"concepts {seen[name]!r} and {spec.id!r} would share the {what} {key(spec)!r} "
                    "(names are compared ignoring case, and made file-safe); give them distinct ids or tokens"
                )
            seen[name] = spec.id
    bad = []
    for spec in specs:
        try:
            validate_token(token_of(spec), model.tokenizers[0])
        except OneWordError as err:
            bad.append(f"{spec.id}: {err}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise InputError(f"{len(bad)} concept token(s) cannot be used: {'; '.join(bad[:3])}{more}")


_FREE = {"max_pixels", "gradient_checkpointing"}


def identity(
    settings: BatchSettings, cfg: InversionConfig, model_name: str, encoder_meta: dict[str, str] | None
) -> dict[str, object]:
    """What makes a batch run's words: a rerun into the same OUT must match it (the group size,
    checkpointing, progress, ``--max-pixels`` and gradient checkpointing may change: a failed
    concept may be retried with a larger image limit)."""
    inv = {k: v for k, v in cfg.to_dict().items() if k not in PER_RUN_FIELDS | _FREE}
    return {
        "method": settings.method,
        "steps": settings.steps,
        "model": model_name,
        "encoder_sha256": (encoder_meta or {}).get("oneword.encoder_sha256"),
        "init": settings.init,
        "init_vocab": settings.init_vocab,
        "inversion": inv,
    }


@dataclass
class _Job:
    spec: ConceptSpec
    cfg: InversionConfig
    folder: Path
    images: list = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    warning: str | None = None
    choice: object | None = None
    start: list[torch.Tensor] | None = None
    t0: float = 0.0


@dataclass
class BatchResult:
    counts: dict[str, int]
    finished: int
    """Concepts done or failed by this call."""
    seconds: float
    interrupted: bool = False


class _Progress:
    def __init__(self, total: int, initial: int, settings: BatchSettings) -> None:
        from tqdm.auto import tqdm

        self.settings, self.t0, self.count, self.total = settings, time.perf_counter(), 0, total
        self.done = initial  # a disabled bar does not count
        self.bar = tqdm(
            total=total, initial=initial, unit="concept", disable=not settings.progress, dynamic_ncols=True
        )

    def finished(self, cid: str, state: str, **extra) -> None:
        self.count += 1
        self.done += 1
        self.bar.update(1)
        took = time.perf_counter() - self.t0
        per_hour = self.count / took * 3600 if took > 0 else 0.0
        left = self.total - self.done
        self.bar.set_postfix_str(f"{per_hour:.0f}/h")
        if self.settings.log_json:
            eta = left / per_hour * 3600 if per_hour else None
            line = {
                "event": state,
                "id": cid,
                "done": self.done,
                "total": self.total,
                "per_hour": per_hour,
                "eta_s": eta,
                **extra,
            }
            print(json.dumps(line), flush=True)

    def close(self) -> None:
        self.bar.close()


def run_batch(
    specs: Sequence[ConceptSpec],
    out: str | Path,
    model,
    cfg: InversionConfig,
    settings: BatchSettings,
    ledger: Ledger,
    encoder=None,
    encoder_meta: dict[str, str] | None = None,
    space=None,
    remote=None,
) -> BatchResult:
    """Work through every pending concept of ``ledger`` that ``specs`` describe (see the module
    docstring). ``cfg`` holds the inversion settings shared by all concepts (token, initializer and
    steps are set per concept); ``encoder`` is needed with method encode; ``space`` is the CLIP
    space of ``auto`` initializers (default: the encoder's). ``remote(specs, recorder, stop)``, if
    given, does the work elsewhere instead (:func:`oneword.batch.distributed.work_on_ray`: Ray
    actors, each with its own model, which also render the previews); this process keeps the
    ledger. Ctrl-C checkpoints every slot and returns ``interrupted``."""
    if settings.method == "encode" and encoder is None and remote is None:
        raise ValueError("method encode needs an encoder")
    out = Path(out)
    todo = _pending(specs, ledger, settings, out)
    counts = ledger.counts()
    recorder = Recording(ledger, _Progress(sum(counts.values()), counts["done"] + counts["failed"], settings))
    t0, interrupted = time.perf_counter(), False
    stop = _StopBetweenSteps()
    try:
        with stop:
            if remote is not None:
                interrupted = remote(todo, recorder, stop)
            else:
                interrupted = work(
                    todo, out, model, cfg, settings, recorder, encoder, encoder_meta, space, stop
                )
            recorder.progress.close()
            if settings.preview_steps and not interrupted and remote is None:
                write_previews(model, ledger, settings.preview_steps, out, settings.progress, stop)
            if settings.format == "shards" and not interrupted:
                from oneword.batch.pack import pack

                pack(out, ledger, settings.per_shard)
    except KeyboardInterrupt:  # a second Ctrl-C: the last periodic checkpoints stand
        interrupted = True
    finally:
        recorder.progress.close()
    write_report(out, ledger)
    return BatchResult(ledger.counts(), recorder.finished, time.perf_counter() - t0, interrupted)


def _pending(
    specs: Sequence[ConceptSpec], ledger: Ledger, settings: BatchSettings, out: Path
) -> list[ConceptSpec]:
    """Record the source's concepts, recover a stopped run's, and return what is to do, in order."""
    by_id = {s.id: s for s in specs}
    check_against_ledger(specs, ledger)
    ledger.add((s.id, token_of(s)) for s in specs)
    given_up = ledger.recover(MAX_ATTEMPTS)
    if given_up:
        logger.warning(
            "%d concept(s) stopped %d runs while being worked on: recorded failed", given_up, MAX_ATTEMPTS
        )
    if settings.retry_failed:
        logger.info("retrying %d failed concept(s)", ledger.retry_failed())
    pending = ledger.pending()
    todo = [by_id[i] for i in pending if i in by_id]
    if len(todo) < len(pending):
        logger.warning(
            "%d pending concept(s) of %s are not in this SOURCE: left pending", len(pending) - len(todo), out
        )
    return todo


class Recording:
    """Where :func:`work` reports each concept: the ledger (and the progress bar)."""

    def __init__(self, ledger: Ledger, progress: _Progress | None = None) -> None:
        self.ledger, self.progress, self.finished = ledger, progress, 0

    def start(self, cid: str, init: str | None, init_how: str | None, image_hashes: list[str]) -> None:
        self.ledger.start(cid, init, init_how, image_hashes)

    def done(
        self, cid: str, seconds: float, steps: int, loss: float | None, output: str, warning: str | None
    ) -> None:
        self.ledger.done(cid, seconds, steps, loss, output, warning)
        self.finished += 1
        if self.progress is not None:
            self.progress.finished(cid, "done", loss=loss, output=output)

    def fail(self, cid: str, error: str, seconds: float | None = None) -> None:
        self.ledger.fail(cid, error, seconds)
        self.finished += 1
        if self.progress is not None:
            self.progress.finished(cid, "failed", error=error)


def work(
    specs: Sequence[ConceptSpec],
    out: Path,
    model,
    cfg: InversionConfig,
    settings: BatchSettings,
    recorder,
    encoder=None,
    encoder_meta: dict[str, str] | None = None,
    space=None,
    stop=None,
    previews: bool = False,
) -> bool:
    """Turn ``specs`` into words on one loaded model, keeping the group full; each concept's
    start, end or failure goes to ``recorder`` (a :class:`Recording`, or what a worker sends back)
    after its files are written; with ``previews``, their previews are rendered at the end. Returns
    True when ``stop`` asked it to stop (every slot then checkpointed at a step boundary)."""
    from oneword.inversion.group import GroupEngine

    todo = deque(specs)
    words: list[Path] = []
    engine = GroupEngine(model, settings.group) if settings.steps else None
    jobs: dict[int, _Job] = {}
    cache: dict[str, object] = {} if space is None else {"space": space}

    def fail(job: _Job, error: str) -> None:
        recorder.fail(job.spec.id, error, time.perf_counter() - job.t0 if job.t0 else None)
        (job.folder / CHECKPOINT).unlink(missing_ok=True)  # a retry starts over
        logger.warning("%s failed: %s", job.spec.id, error)

    def finish(job: _Job, vectors, steps: int, loss: float | None) -> None:
        extra = {**(encoder_meta or {}), "oneword.batch_id": job.spec.id, "oneword.method": settings.method}
        if job.choice is not None:
            extra.update(job.choice.metadata())
        meta = word_metadata(model, job.cfg.token, job.cfg.init, steps, job.hashes, extra)
        files = RunFolder(job.folder).write_word(Embedding(job.cfg.token, vectors, meta))
        atomic_write_text(job.folder / CONFIG, job.cfg.to_yaml())
        output = os.path.relpath(files[0], out)  # OUT may be moved, or the next run started elsewhere
        if previews and settings.preview_steps:
            words.append(files[0])
        recorder.done(job.spec.id, time.perf_counter() - job.t0, steps, loss, output, job.warning)

    def save(sid: int) -> None:
        ts = engine.state(sid)
        ts.meta = _fingerprint(jobs[sid])
        save_state(jobs[sid].folder / CHECKPOINT, ts)

    def join(job: _Job) -> None:
        """Add a prepared concept to the group (continuing its checkpoint), or fail it alone."""
        try:
            sid = engine.add([im.image for im in job.images], job.cfg, job.start, name=job.spec.id)
        except Exception as err:  # noqa: BLE001 - one concept's trouble (memory, odd sizes) is its own
            logger.debug("adding %s", job.spec.id, exc_info=True)
            fail(job, f"{type(err).__name__}: {err}")
            return
        jobs[sid] = job
        if not _resume(engine, sid, job):
            engine.remove(sid)  # a checkpoint that could not be used leaves nothing of itself
            del jobs[sid]
            join(job)

    while todo or jobs:
        if stop is not None and stop.requested:
            for sid in jobs:  # states at a step boundary
                save(sid)
            return True
        free = settings.group - len(jobs)
        if todo and free > 0:
            wave = [todo.popleft() for _ in range(min(free, len(todo)))]
            for job in _prepare(wave, out, model, cfg, settings, recorder, encoder, cache, fail):
                if engine is None:  # the encoder alone
                    finish(job, job.start, 0, None)
                else:
                    join(job)
            continue
        engine.step()
        for sid in list(jobs):
            slot = engine.slot(sid)
            if slot.active:
                if settings.save_every and slot.step % settings.save_every == 0:
                    save(sid)
                continue
            job, res = jobs.pop(sid), engine.remove(sid)
            if res.error:
                fail(job, res.error)
            else:
                finish(job, res.vectors, res.step, res.loss)
    if words:
        render_previews(model, words, settings.preview_steps)
    return False


#: A concept that was being worked on when this many runs stopped is failed (a crash it causes).
MAX_ATTEMPTS = 5


class _StopBetweenSteps:
    """Ctrl-C and SIGTERM ask the loop to stop at the next step boundary (a state saved inside a
    step would apply part of it twice on resume); a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stopping after this step (again to stop at once)")

    def __enter__(self) -> _StopBetweenSteps:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_against_ledger(specs: Sequence[ConceptSpec], ledger: Ledger) -> None:
    """A source's ids and tokens must not collide (ignoring case) with other concepts of the ledger."""
    ids = {r.id.lower(): r.id for r in ledger.rows()}
    tokens = {r.token.lower(): r.id for r in ledger.rows()}
    for spec in specs:
        other = ids.get(spec.id.lower(), spec.id)
        if other != spec.id:
            raise InputError(
                f"{spec.id!r} and {other!r}, a concept of this batch already, differ only in case; rename one"
            )
        owner = tokens.get(token_of(spec).lower(), spec.id)
        if owner != spec.id:
            raise InputError(
                f"{spec.id!r} would take the token {token_of(spec)!r} of {owner!r}, a concept of this batch already"
            )


def _fingerprint(job: _Job) -> dict[str, str]:
    return {"images": json.dumps(sorted(job.hashes)), "init": job.cfg.init}


def _resume(engine, sid: int, job: _Job) -> bool:
    """Continue slot ``sid`` from its concept's checkpoint, if it has one made from the same images
    and initializer; False when a checkpoint was there but could not be used (it is removed)."""
    path = job.folder / CHECKPOINT
    if not path.is_file():
        return True
    try:
        ts = load_state(path)
        if ts.meta and ts.meta != _fingerprint(job):
            raise InputError("it was made from other images or another initializer word")
        engine.load(sid, ts)
    except (OneWordError, ValueError, KeyError, RuntimeError) as err:
        logger.warning("%s: its checkpoint cannot be used (%s); starting it over", job.spec.id, err)
        path.unlink(missing_ok=True)
        return False
    logger.info("%s: continuing from step %d", job.spec.id, engine.slot(sid).step)
    return True


def _prepare(wave, out, model, cfg, settings, recorder, encoder, cache, fail) -> list[_Job]:
    """Load a wave of concepts' images, choose their initializers and predict their words, in
    one batched pass each; concepts that cannot start are failed."""
    from oneword.encoder.autoinit import AUTO, resolve_inits

    jobs = []
    for spec in wave:
        job = _Job(spec, cfg, concept_dir(out, spec.id), t0=time.perf_counter())
        if spec.problems:
            fail(job, "; ".join(spec.problems))
            continue
        images, bad = spec.load(cfg.max_pixels)
        if not images:
            fail(job, f"no usable images: {', '.join(bad[:3])}")
            continue
        if bad:
            job.warning = f"skipped {len(bad)} of {len(images) + len(bad)} images: {', '.join(bad[:3])}"
            logger.warning("%s: %s", spec.id, job.warning)
        job.images, job.hashes = images, [im.sha256 for im in images]
        jobs.append(job)
    if not jobs:
        return []
    given = [j.spec.init or settings.init for j in jobs]
    if any(g == AUTO for g in given):
        if "space" not in cache:  # loaded once per run
            cache["space"] = encoder.space if encoder is not None else _default_space(model)
        choices = resolve_inits(
            cache["space"],
            model,
            [[im.image for im in j.images] for j in jobs],
            given,
            settings.init_vocab,
            names=[j.spec.id for j in jobs],
            cache=cache,  # the CLIP space, candidates and their text features: once per run
        )
    else:
        choices = resolve_inits(None, model, [[] for _ in jobs], given)
    ready = []
    for job, choice in zip(jobs, choices):
        try:
            model.initializer_vectors(
                choice.word, cfg.num_vectors
            )  # an unknown word fails this concept alone
        except OneWordError as err:
            fail(job, str(err))
            continue
        job.choice = choice
        job.cfg = _concept_cfg(cfg, job.spec, choice.word, settings)
        job.folder.mkdir(parents=True, exist_ok=True)
        recorder.start(job.spec.id, choice.word, choice.how, job.hashes)
        ready.append(job)
    if ready and encoder is not None and settings.method == "encode":
        from oneword.encoder.model import predict_embeddings

        try:
            predicted = predict_embeddings(
                encoder, model, [[im.image for im in j.images] for j in ready], [j.cfg.init for j in ready]
            )
        except Exception:  # noqa: BLE001 - find the concept at fault: predict them one by one
            logger.debug("batched prediction", exc_info=True)
            predicted = []
            for job in ready:
                try:
                    predicted += predict_embeddings(
                        encoder, model, [[im.image for im in job.images]], [job.cfg.init]
                    )
                except Exception as err:  # noqa: BLE001
                    fail(job, f"the encoder cannot read it: {type(err).__name__}: {err}")
                    predicted.append(None)
        for job, vectors in zip(ready, predicted):
            job.start = vectors
        ready = [j for j in ready if j.start is not None]
    return ready


def _concept_cfg(
    cfg: InversionConfig, spec: ConceptSpec, init: str, settings: BatchSettings
) -> InversionConfig:
    import dataclasses

    return dataclasses.replace(
        cfg, token=token_of(spec), init=init, steps=max(1, settings.steps), save_every=0, preview_every=0
    )


def _default_space(model):
    from oneword.eval.space import default_space_name, load_space

    return load_space(default_space_name(model.family), device=model.device)


def print_summary(result: BatchResult, out: Path) -> None:
    c = result.counts
    state = "interrupted" if result.interrupted else "finished"
    print(
        f"{state}: {result.finished} concept(s) in {result.seconds:.0f} s; {c['done']} done, {c['failed']} failed, "
        f"{c['pending'] + c['running']} left in {out}",
        file=sys.stderr,
    )
