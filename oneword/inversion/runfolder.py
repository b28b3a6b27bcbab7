"""A word's run folder: its layout, its lock, the checks before a run starts, and its word files.

Every command that writes a word (``ti invert``, ``ti encode``, and the batch and service drivers)
goes through :class:`RunFolder`, so the file names, the resume rules and the one function that
writes a word's files (:meth:`RunFolder.write_word`) live here only::

    OUT/
      learned_embeds.safetensors      diffusers layout (+ learned_embeds_2 for SDXL)
      <token>.safetensors             single-file layout of A1111 / ComfyUI / kohya
      config.yaml  loss.csv  loss.png  previews/  checkpoints/last.safetensors
      .oneword.lock                   held (flock) while a process writes the folder

The lock is an OS lock (``fcntl.flock``) on ``.oneword.lock``: a second writer is refused in one
line naming the holder, and a lock whose process was killed is gone with it (the kernel drops it),
so it never needs cleaning up. Within one process the lock is re-entrant for the thread holding it
(a command locks the folder before loading a model and the run locks it again).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from oneword.errors import InputError
from oneword.inversion.checkpoint import TrainState, load_state
from oneword.inversion.config import InversionConfig
from oneword.inversion.embedding_io import (
    DIFFUSERS_FILE,
    DIFFUSERS_FILE_2,
    Embedding,
    build_metadata,
    save_diffusers,
    save_single_file,
)

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
PREVIEWS = "previews"
CHECKPOINT = "checkpoints/last.safetensors"
LOCK = ".oneword.lock"

# What a run writes before its first checkpoint: a folder holding only these and no checkpoint is a
# run that stopped early (diverged, out of memory) and is started over, not refused.
RUN_FILES = {CONFIG, LOSS_CSV, LOSS_PNG, PREVIEWS, "checkpoints", DIFFUSERS_FILE, DIFFUSERS_FILE_2, LOCK}

# Settings that may change when a run is continued (the rest must match the saved config.yaml).
_RESUMABLE = {
    "steps",
    "base_lr",
    "save_every",
    "preview_every",
    "preview_prompts",
    "preview_seeds",
    "preview_steps",
}

_held: dict[Path, tuple[int, int, int]] = {}  # resolved folder -> (fd, owning thread, depth)
_held_guard = threading.Lock()


def safe_file_stem(token: str) -> str:
    """File name for the single-file layout: A1111 and ComfyUI use the name as the prompt word."""
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in token.strip("<>")).strip("-.")
    return stem or "embedding"


def word_metadata(
    model,
    token: str,
    init: str | None,
    steps: int,
    image_hashes: list[str],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The header of a word's files: family, token, initializer, steps, the reference images'
    hashes, the model, and what the caller adds (e.g. the encoder's name and hash)."""
    return build_metadata(
        family=model.family,
        token=token,
        init=init,
        steps=steps,
        source_hashes=image_hashes,
        extra={"oneword.model": model.source, **(extra or {})},
    )


class RunFolder:
    """The run folder at ``path``; use it as a context manager to hold its lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._keys: list[Path] = []  # what each lock() of this object took, for its unlock()

    # ----------------------------------------------------------------- layout
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def loss_csv(self) -> Path:
        return self.path / LOSS_CSV

    @property
    def loss_png(self) -> Path:
        return self.path / LOSS_PNG

    def preview(self, step: int) -> Path:
        return self.path / PREVIEWS / f"step_{step:06d}.png"

    def single_file(self, token: str) -> Path:
        return self.path / f"{safe_file_stem(token)}.safetensors"

    def holds_files(self) -> bool:
        """Anything besides the lock file."""
        return self.path.is_dir() and any(p.name != LOCK for p in self.path.iterdir())

    def check_free(self) -> None:
        """:class:`InputError` naming the holder when another process writes the folder now; unlike
        :meth:`lock` it creates nothing (for commands that check many folders before writing any)."""
        if not (self.path / LOCK).is_file():
            return
        self.lock()  # free (or held by this thread): taken and given back at once
        self.unlock()

    # ----------------------------------------------------------------- the lock
    def lock(self) -> RunFolder:
        """Take the folder's exclusive lock (creating the folder); :class:`InputError` naming the
        holder when another process or thread writes it."""
        self.path.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        me = threading.get_ident()
        with _held_guard:
            if key in _held:
                fd, owner, depth = _held[key]
                if owner != me:
                    raise InputError(
                        f"{self.path} is being written by another run in this process; wait for it "
                        "or choose another --out"
                    )
                _held[key] = (fd, owner, depth + 1)
                self._keys.append(key)
                return self
            fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise InputError(
                        f"{self.path} is in use by another run ({_describe_holder(fd)}); wait for it to "
                        "finish or choose another --out"
                    ) from None
                info = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except BaseException:
                os.close(fd)  # and with it the lock, if it was taken
                raise
            _held[key] = (fd, me, 1)
            self._keys.append(key)
        return self

    def unlock(self) -> None:
        """Give back the lock this object took last (the folder as resolved when it was taken)."""
        with _held_guard:
            key = self._keys.pop()
            fd, owner, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, owner, depth - 1)
                return
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunFolder:
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.unlock()

    # ----------------------------------------------------------------- checks and resume
    def saved_config(self) -> InversionConfig:
        try:
            return InversionConfig.from_yaml(self.config.read_text())
        except OSError as err:
            raise InputError(
                f"cannot resume {self.path}: its config.yaml cannot be read ({err.strerror or err})"
            ) from None
        except Exception as err:  # noqa: BLE001 - YAML errors, unknown keys, bad values: one line for the user
            first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise InputError(f"cannot resume {self.path}: its config.yaml is damaged ({first})") from None

    def prepare(self, cfg: InversionConfig, resume: bool) -> TrainState | None:
        """Check the folder for a run of ``cfg`` (call it holding the lock, before loading a model
        that takes minutes): with ``resume`` the saved state to continue; otherwise the folder must be
        empty or hold a run that stopped before its first checkpoint, which is cleared."""
        out = self.path
        if resume:
            if not self.checkpoint.is_file():
                raise InputError(f"nothing to resume: {self.checkpoint} does not exist; drop --resume")
            saved = self.saved_config()
            ignore = set(_RESUMABLE)
            if cfg.lr_schedule == "cosine":  # the schedule's length is part of every step's rate
                ignore.discard("steps")
            diff = [k for k, v in saved.to_dict().items() if k not in ignore and getattr(cfg, k) != v]
            if diff:
                raise InputError(
                    f"cannot resume {out}: settings differ from the saved run ({', '.join(diff)}); "
                    "use the same settings or another --out"
                )
            if cfg.base_lr != saved.base_lr:
                logger.warning("continuing %s at base_lr %g (it ran at %g)", out, cfg.base_lr, saved.base_lr)
            ts = load_state(self.checkpoint)
            if ts.step > cfg.steps:
                raise InputError(
                    f"cannot resume {out}: it is at step {ts.step}, past --steps {cfg.steps}; "
                    f"give --steps {ts.step} or more"
                )
            return ts
        if self.holds_files():
            names = {p.name for p in out.iterdir()}
            if self.checkpoint.is_file() or not names <= RUN_FILES | {self.single_file(cfg.token).name}:
                raise InputError(
                    f"{out} already holds files; pass --resume to continue that run or choose another --out"
                )
            logger.warning("%s holds a run that stopped before its first checkpoint: starting it over", out)
            for name in names - {LOCK}:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None

    # ----------------------------------------------------------------- outputs
    def write_word(self, embedding: Embedding) -> list[Path]:
        """The word's files in both layouts (diffusers, and single-file named after the token),
        each written atomically."""
        return [
            *save_diffusers(embedding, self.path),
            save_single_file(embedding, self.single_file(embedding.token)),
        ]


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info:
        return "a process that has not said which"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}: {info.get('command')}"


def word_file_bytes(embedding: Embedding) -> dict[str, bytes]:
    """The bytes :meth:`RunFolder.write_word` writes for a word, by layout, without a run folder
    (the service stores them content-addressed): ``diffusers`` (and ``diffusers_2``, SDXL's second
    text encoder) and ``a1111`` (the single file)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="oneword-word-") as tmp:
        folder = RunFolder(tmp)
        folder.write_word(embedding)
        out = {"diffusers": (Path(tmp) / DIFFUSERS_FILE).read_bytes()}
        if (Path(tmp) / DIFFUSERS_FILE_2).is_file():
            out["diffusers_2"] = (Path(tmp) / DIFFUSERS_FILE_2).read_bytes()
        out["a1111"] = folder.single_file(embedding.token).read_bytes()
    return out
