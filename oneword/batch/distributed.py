"""``ti batch --ray [ADDRESS]``: the same engine in Ray actors, one per GPU (CPU actors where there
is none), fed by Ray Data.

The pending concepts become a Ray Dataset; :meth:`ray.data.Dataset.map_batches` sends batches of
them to a pool of :class:`Worker` actors. Each actor loads the model (and encoder) once and runs
:func:`~oneword.batch.runner.work` on its batch: the same group engine, the same writers, the same
per-concept checkpoints in the shared OUT folder. What a worker reports (each concept's start,
end or failure) comes back to this process, which alone writes the ledger, so its rules hold as in
one process: a concept is recorded done only after its files exist, and a rerun of the same
command continues. OUT must be a folder every worker sees (the local disk for one machine, a
shared file system for a cluster), and every node needs oneword installed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from oneword.batch.sources import ConceptSpec
from oneword.errors import InputError

logger = logging.getLogger("oneword")


@dataclass
class RayPlan:
    """Where and how the actors run."""

    address: str | None = None
    """A running cluster's address (``auto``, ``ray://host:10001``); None starts a local instance."""
    workers: int | None = None
    """Actors: default one per GPU, else 2."""
    cpus_per_worker: int = 1
    """CPU threads of each CPU actor."""


@dataclass
class WorkerSpec:
    """What every actor needs to build its model and settings (plain data, sent to each actor)."""

    out: str
    model: str
    dtype: str | None
    cfg: dict[str, Any]
    settings: dict[str, Any]
    encoder: str | None
    encoder_meta: dict[str, str] | None
    use_gpu: bool
    threads: int


class _Events:
    """A recorder that keeps a worker's reports, to send back."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def start(self, cid, init, init_how, image_hashes) -> None:
        self.events.append(json.dumps(["start", cid, init, init_how, image_hashes]))

    def done(self, cid, seconds, steps, loss, output, warning) -> None:
        self.events.append(json.dumps(["done", cid, seconds, steps, loss, output, warning]))

    def fail(self, cid, error, seconds=None) -> None:
        self.events.append(json.dumps(["fail", cid, error, seconds]))


class Worker:
    """A Ray Data actor: one loaded model, :func:`~oneword.batch.runner.work` per batch."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from oneword.batch.runner import BatchSettings
        from oneword.inversion.config import InversionConfig
        from oneword.models import load_model

        self.spec = WorkerSpec(**spec)
        if not self.spec.use_gpu:
            torch.set_num_threads(self.spec.threads)
        device = "cuda" if self.spec.use_gpu else "cpu"
        self.model = load_model(self.spec.model, device=device, dtype=self.spec.dtype)
        self.cfg = InversionConfig.from_dict(self.spec.cfg)
        self.settings = BatchSettings(**{**self.spec.settings, "progress": False, "log_json": False})
        self.encoder = None
        if self.spec.encoder:
            from oneword.encoder.model import load_encoder

            self.encoder = load_encoder(self.spec.encoder)
            self.encoder.to(self.model.device)
            self.encoder.space.to(self.model.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        from oneword.batch.runner import work

        specs = [ConceptSpec.from_dict(json.loads(s)) for s in batch["spec"]]
        events = _Events()
        out = Path(self.spec.out)
        work(
            specs,
            out,
            self.model,
            self.cfg,
            self.settings,
            events,
            self.encoder,
            self.spec.encoder_meta,
            previews=True,
        )
        return {"event": events.events}


def work_on_ray(
    specs: list[ConceptSpec],
    recorder,
    stop=None,
    *,
    worker: WorkerSpec,
    plan: RayPlan,
    group: int,
    progress: bool = True,
) -> bool:
    """Do ``specs`` in Ray actors and report every event to ``recorder`` (the ledger) as it comes
    back; True when ``stop`` asked to stop (the actors are let go; their concepts' checkpoints of
    the last ``--save-every`` steps stand)."""
    if not plan.address:
        # a local instance serves this machine only: its sockets on loopback (Ray reads this
        # documented switch when it is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'oneword[ray]'") from None
    if not specs:
        return False
    if not ray.is_initialized():
        if plan.address:
            ray.init(address=plan.address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=os.cpu_count(), logging_level=logging.WARNING, include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0
    workers = plan.workers or (gpus if use_gpu else 2)
    worker.use_gpu, worker.threads = use_gpu, plan.cpus_per_worker
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    items = [{"spec": json.dumps(s.to_dict())} for s in specs]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // max(1, group)))
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": plan.cpus_per_worker}
    logger.info("ray: %d %s worker(s) for %d concepts", workers, "GPU" if use_gpu else "CPU", len(specs))
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    results = ds.map_batches(
        Worker,
        fn_constructor_kwargs={"spec": asdict(worker)},
        batch_size=2 * group,
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_format="numpy",
        **resources,
    )
    for row in results.iter_rows():
        _apply(json.loads(row["event"]), recorder)
        if stop is not None and stop.requested:
            return True
    return False


def _apply(event: list, recorder) -> None:
    kind, cid, *rest = event
    {"start": recorder.start, "done": recorder.done, "fail": recorder.fail}[kind](cid, *rest)
