"""The service's settings: limits, queue sizes and defaults of ``ti serve``."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass
class ServeSettings:
    """How ``ti serve`` accepts and runs work (the model and encoder aside)."""

    data: str = "serve-data"
    """Folder of the job store (``jobs.sqlite``), the content-addressed files and the checkpoints."""
    db: str | None = None
    """The job store: a ``postgresql://`` URL, or nothing for SQLite in ``data`` (files stay in
    ``data`` unless ``blobs`` says otherwise)."""
    blobs: str | None = None
    """Where uploaded photos and word files go: a folder, or an fsspec URL that every server of a
    cluster can reach (``s3://bucket/prefix``; default: ``DATA/blobs``)."""
    owner: str | None = None
    """Who this server's job claims belong to (default: this host and port). A restarted server
    with the same owner takes its running jobs back at once; others take them over when their
    lease expires."""
    lease_seconds: float = 30.0
    """How long a claimed job stays this server's without a renewal (the worker renews as it works)."""
    group: int = 8
    """Words refined together (one UNet pass per step for the whole group)."""
    refine: int = 200
    """Refinement steps of a word whose request names none."""
    max_refine: int = 1000
    """The most refinement steps a request may ask for."""
    max_queue: int = 64
    """Jobs waiting (all keys together); over it, new jobs get 429 with Retry-After."""
    max_per_key: int = 16
    """Unfinished jobs (waiting or running) of one API key."""
    min_files: int = 1
    """The fewest reference images a word request may send."""
    max_files: int = 8
    """The most reference images a word request may send."""
    max_file_bytes: int = 16 * MIB
    """Bytes of one reference image file."""
    max_request_bytes: int = 64 * MIB
    """Whole request bodies (multipart uploads included); over it, 413 before anything is read."""
    max_pixels: int = 16_000_000
    """Pixels of one reference image (checked from its header, before decoding)."""
    save_every: int = 25
    """Checkpoint every running word every N steps (kill -9 costs at most this many steps)."""
    max_images: int = 4
    """Images per generation request (``n``)."""
    max_sample_steps: int = 100
    """Denoising steps a generation request may ask for."""
    max_generation_queue: int = 32
    """Generation requests waiting for the worker; over it, 429."""
    generation_batch: int = 8
    """Images drawn in one pipeline call (several requests with the same steps and guidance)."""
    init_draws: int = 6
    """Noise draws per shortlisted word when a request's initializer is chosen zero-shot (``ti
    encode`` uses 16). On 84 held-out toy concepts 6 draws with 3 survivors choose as 16 do (84/84)
    in under a third of the time, which the provisional word's latency needs."""
    init_survivors: int = 3
    """Shortlisted words that get the second half of those draws (the rest are out after the
    first half); 0 gives every word all of them."""
    drain_seconds: float = 30.0
    """On SIGTERM: the most time given to checkpoint running words before the process exits."""
    max_attempts: int = 5
    """A job that was running when this many server processes stopped is failed (a crash it causes)."""

    def __post_init__(self) -> None:
        positive = {
            "group": self.group,
            "max_queue": self.max_queue,
            "max_per_key": self.max_per_key,
            "min_files": self.min_files,
            "max_files": self.max_files,
            "max_file_bytes": self.max_file_bytes,
            "max_request_bytes": self.max_request_bytes,
            "max_pixels": self.max_pixels,
            "max_images": self.max_images,
            "max_sample_steps": self.max_sample_steps,
            "max_generation_queue": self.max_generation_queue,
            "generation_batch": self.generation_batch,
            "max_attempts": self.max_attempts,
            "init_draws": self.init_draws,
        }
        bad = [k for k, v in positive.items() if v < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be at least 1")
        if self.min_files > self.max_files:
            raise ValueError(f"min_files ({self.min_files}) is above max_files ({self.max_files})")
        if not 0 <= self.refine <= self.max_refine:
            raise ValueError(
                f"refine must be between 0 and max_refine ({self.max_refine}), got {self.refine}"
            )
        if self.db and not self.db.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                f"db is a postgresql:// URL (or nothing, for SQLite in the data folder), got {self.db!r}"
            )
        if self.init_survivors == 1 or self.init_survivors < 0:
            raise ValueError(f"init_survivors is 0 (all) or at least 2, got {self.init_survivors}")
        if self.save_every < 0 or self.drain_seconds <= 0 or self.lease_seconds <= 0:
            raise ValueError("save_every must be 0 or more, drain_seconds and lease_seconds above 0")
