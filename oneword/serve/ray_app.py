"""The service on Ray Serve: the same FastAPI app as the ingress, and one worker replica per GPU
(a CPU replica where there is none), all sharing one job store.

    ti serve --ray                       # a local Ray instance
    ti serve --ray auto --db postgresql://... --blobs s3://bucket/oneword --replicas 2 --max-replicas 8
    serve run oneword.serve.ray_app:app db=postgresql://... blobs=s3://bucket/oneword replicas=2

``Ingress`` holds no model: it answers every route from the store, as ``ti serve`` does, and hands
image requests to a worker replica. Each ``WordWorker`` replica loads the model and encoder and
runs the worker thread of ``ti serve``: it claims jobs from the store with leases, so a replica
that dies loses nothing (another takes its jobs when the lease expires). Replicas scale between
``replicas`` and ``max_replicas`` on the store's queue depth (:func:`queue_depth_policy`: one
replica per ``group`` words waiting or running).

The store must be one that every replica reaches: PostgreSQL (``db``) for a cluster; SQLite in a
shared ``data`` folder works on one node. Photos, words and checkpoints go to ``blobs`` (an fsspec
URL such as ``s3://`` for a cluster).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from ray import serve

from oneword.serve.config import ServeSettings

logger = logging.getLogger("oneword.serve")

#: The fields of a generation request that travel to a worker replica (not its future).
_SENT = ("prompt", "negative_prompt", "n", "steps", "guidance", "seed", "words", "size")

#: How often the ingress reads the workers' pace and health.
STATS_SECONDS = 2.0


@dataclass
class Options:
    """What the deployments are built from (``serve run ... key=value`` gives these as strings)."""

    model: str | None = None
    encoder: str | None = None
    device: str | None = None
    mixed_precision: str = "no"
    keys: str | None = None
    """API keys file, read by the ingress (without keys: one tenant; bind Ray's HTTP to loopback)."""
    replicas: int = 1
    """Worker replicas to start with (and the fewest kept)."""
    max_replicas: int | None = None
    """Most worker replicas (above ``replicas``: scale on the queue; default: ``replicas``)."""
    gpus: float | None = None
    """GPUs per worker replica (default: 1 when the cluster has GPUs, else 0 and 1 CPU)."""
    cpus: float = 1.0
    """CPUs per worker replica when it has no GPU."""
    settings: dict = field(default_factory=dict)
    """:class:`ServeSettings` fields."""

    @classmethod
    def parse(cls, args: dict) -> Options:
        """From a dict of values or strings; unknown keys that are settings go to ``settings``."""
        own = {f.name: f for f in dataclasses.fields(cls)}
        kinds = {f.name: str(f.type) for f in dataclasses.fields(ServeSettings)}
        out, settings = {}, dict(args.get("settings") or {})
        for key, value in args.items():
            key = key.replace("-", "_")
            if key == "settings":
                continue
            if key in own:
                out[key] = _typed(value, str(own[key].type))
            elif key in kinds:
                settings[key] = value
            else:
                raise ValueError(f"unknown option {key!r}")
        out["settings"] = {k: _typed(v, kinds[k]) for k, v in settings.items()}
        options = cls(**out)
        options.serve_settings()  # checked now, before anything starts
        if options.replicas < 1 or (
            options.max_replicas is not None and options.max_replicas < options.replicas
        ):
            raise ValueError("replicas must be at least 1, and max_replicas at least replicas")
        return options

    def serve_settings(self, owner: str | None = None) -> ServeSettings:
        given = dict(self.settings)
        if owner is not None:
            given["owner"] = owner
        return ServeSettings(**given)


def _typed(value, kind: str):
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null", "") and "None" in kind:
        return None
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return value


def _replica_owner(role: str) -> str:
    """A job-claim owner unique to this replica (a restarted replica is a new owner: its jobs wait
    for their leases to expire, then any replica continues them from their checkpoints)."""
    context = serve.get_replica_context()
    return f"{socket.gethostname()}:{role}:{context.replica_tag}"


@serve.deployment(
    name="WordWorker",
    health_check_period_s=10,
    graceful_shutdown_timeout_s=60,
    logging_config={"enable_access_log": False},
)
class WordWorker:
    """One model and its worker thread (the GroupEngine driver of ``ti serve``)."""

    def __init__(self, options: dict) -> None:
        import copy

        from oneword.serve.events import EventHub
        from oneword.serve.server import load_world
        from oneword.serve.service import world_facts
        from oneword.serve.store import Store
        from oneword.serve.worker import Worker

        opts = Options.parse(options)
        self.settings = settings = opts.serve_settings(owner=_replica_owner("worker"))
        world, model_name = load_world(opts.model, opts.encoder, opts.device, opts.mixed_precision)
        self.facts = world_facts(world, model_name)
        self.tokenizer = copy.deepcopy(world.model.tokenizers[0])
        self.store = Store(settings.data, settings.db, settings.owner, settings.lease_seconds, settings.blobs)
        self.worker = Worker(world, self.store, EventHub(), settings)
        self.worker.start()
        logger.info("worker replica %s serves %s", settings.owner, model_name)

    def describe(self) -> dict:
        """The model's facts and a tokenizer, for the ingress's token checks."""
        return {"facts": self.facts, "tokenizer": self.tokenizer}

    def notify(self) -> None:
        self.worker.notify()

    async def draw(self, request: dict) -> tuple[str, object]:
        """The images of a :class:`~oneword.serve.drawing.GenerationRequest` given as a dict of its
        :data:`_SENT` fields: ``("ok", [(seed, image), ...])``, or ``("busy" | "stopping", message)``."""
        from oneword.serve.drawing import GenerationRequest

        try:
            future = self.worker.submit(GenerationRequest(**request))
        except queue.Full:
            return "busy", "too many image requests wait; retry shortly"
        try:
            return "ok", await asyncio.wrap_future(future)
        except RuntimeError as err:
            return "stopping", str(err)

    def stats(self) -> dict:
        worker = self.worker
        return {
            "healthy": worker.healthy,
            "error": None if worker.error is None else str(worker.error),
            "steps_per_second": worker.steps_per_second,
            "words_per_second": worker.words_per_second(),
            "occupancy": worker.occupancy,
            "waiting_images": worker.waiting_images(),
            "replicas": serve.get_replica_context().world_size,
        }

    def check_health(self) -> None:
        if not self.worker.healthy:
            raise RuntimeError(f"the worker is not running ({self.worker.error})")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Read by :func:`queue_depth_policy` (every replica sees the same store)."""
        return {
            "queued": float(self.store.queued()),
            "occupancy": float(self.worker.occupancy),
            "group": float(self.settings.group),
        }

    def __del__(self) -> None:  # Ray's graceful shutdown: checkpoint running words at a step boundary
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop(self.settings.drain_seconds)
            self.store.close()


def queue_depth_policy(ctx) -> tuple[int, dict]:
    """Worker replicas for the words waiting and running: one per group of them, within the
    deployment's bounds (a Ray Serve custom autoscaling policy)."""
    metrics = ctx.aggregated_metrics or {}
    queued = max(metrics.get("queued", {}).values(), default=0.0)
    running = sum(metrics.get("occupancy", {}).values())
    group = max(metrics.get("group", {}).values(), default=8.0) or 8.0
    want = math.ceil((queued + running) / group)
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return max(low, min(high, want)), {}


class RemoteWorkers:
    """The worker replicas as the ingress's :class:`~oneword.serve.service.Service` sees its worker:
    new work wakes one replica (the others find it in the store within a second), image requests
    go to a replica, and the pace and health are read every :data:`STATS_SECONDS`."""

    def __init__(self, handle, settings: ServeSettings) -> None:
        self.handle, self.settings = handle, settings
        self._pool = concurrent.futures.ThreadPoolExecutor(
            settings.max_generation_queue, thread_name_prefix="oneword-draw"
        )
        self._lock = threading.Lock()
        self._waiting = 0
        self._stats: dict = {}
        self._seen = 0.0
        self.error: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="oneword-stats", daemon=True)

    # the worker thread's interface
    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        self._stopping.set()
        self._thread.join(min(timeout or 2.0, 2.0))  # its call may wait on a replica that stops too
        self._pool.shutdown(wait=False, cancel_futures=True)
        return True

    @property
    def healthy(self) -> bool:
        fresh = time.monotonic() - self._seen < 5 * STATS_SECONDS
        return fresh and bool(self._stats.get("healthy"))

    @property
    def steps_per_second(self) -> float | None:
        return self._stats.get("steps_per_second")

    @property
    def occupancy(self) -> int:
        return int(self._stats.get("occupancy") or 0)

    def words_per_second(self) -> float | None:
        rate = self._stats.get("words_per_second")
        return None if rate is None else rate * max(1, self._stats.get("replicas") or 1)

    def waiting_images(self) -> int:
        return self._waiting

    def notify(self, cancel: str | None = None) -> None:
        """New work, or a cancel (which the replica refining the job reads from the store)."""
        self.handle.notify.remote()

    def submit(self, request) -> concurrent.futures.Future:
        with self._lock:
            if self._waiting >= self.settings.max_generation_queue:
                raise queue.Full
            self._waiting += 1
        return self._pool.submit(self._draw, request)

    def _draw(self, request):
        plain = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name in _SENT}
        try:
            kind, value = self.handle.draw.remote(plain).result()
        finally:
            with self._lock:
                self._waiting -= 1
        if kind == "busy":
            raise queue.Full(value)
        if kind != "ok":
            raise RuntimeError(value)
        return value

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._stats = self.handle.stats.remote().result(timeout_s=10)
                self._seen = time.monotonic()
                self.error = self._stats.get("error")
            except Exception as err:  # noqa: BLE001 - shown by /readyz until the replicas answer
                self.error = f"the worker replicas do not answer ({type(err).__name__})"
            self._stopping.wait(STATS_SECONDS)


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1024,  # each open event stream is one; the app limits the real work itself
    graceful_shutdown_timeout_s=10,
    logging_config={"enable_access_log": False},  # the app logs each request as JSON
)
@serve.ingress()
class Ingress:
    """The FastAPI app of ``ti serve`` over the shared store, without a model."""

    async def __init__(self, workers, options: dict) -> None:
        from oneword.serve.auth import Keys
        from oneword.serve.service import Service

        opts = Options.parse(options)
        described = await workers.describe.remote()
        settings = opts.serve_settings(owner=_replica_owner("ingress"))
        keys = Keys.load(opts.keys) if opts.keys else None
        self.service = Service.front(
            settings, keys, described["facts"], described["tokenizer"], RemoteWorkers(workers, settings)
        )

    def __serve_build_asgi_app__(self):
        from oneword.serve.app import create_app

        return create_app(self.service)


def app(args: dict):
    """The application: ``serve run oneword.serve.ray_app:app key=value ...`` (keys: the fields of
    :class:`Options` and of :class:`~oneword.serve.config.ServeSettings`)."""
    import ray

    opts = Options.parse(args)
    gpus = opts.gpus
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actor = {"num_gpus": gpus} if gpus else {"num_cpus": opts.cpus}
    scaling: dict = {"num_replicas": opts.replicas}
    high = opts.max_replicas or opts.replicas
    if high > opts.replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": opts.replicas,
                "max_replicas": high,
                "initial_replicas": opts.replicas,
                "upscale_delay_s": 10,
                "downscale_delay_s": 120,
                "policy": {"policy_function": queue_depth_policy},
            }
        }
    plain = dataclasses.asdict(opts)
    # image requests wait in the worker's own bounded queue (a full one answers 429)
    ongoing = opts.serve_settings().max_generation_queue + 16
    workers = WordWorker.options(ray_actor_options=actor, max_ongoing_requests=ongoing, **scaling).bind(plain)
    return Ingress.bind(workers, plain)


def run(address: str | None, args: dict, host: str, port: int) -> int:
    """``ti serve --ray [ADDRESS]``: deploy on Ray (a local instance when ``address`` is None) and
    serve HTTP on ``host:port`` until SIGTERM or Ctrl-C, then shut the application down (the worker
    replicas checkpoint their running words)."""
    import signal

    import ray

    ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app(args), name="oneword", route_prefix="/")
        logger.info("serving on Ray at http://%s:%d (API docs at /docs)", host, port)
        stop.wait()
        logger.warning("stopping: the worker replicas checkpoint their words")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
