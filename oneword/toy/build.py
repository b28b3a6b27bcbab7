"""``ti toy train``: rebuild every trained part of the toy world, resumably.

Parts, in order: the attribute ``oracle``, the toy ``clip`` and the diffusion model ``ldm``. Each
trains in the ``work`` folder (checkpoints, logs; re-running resumes, finished parts are skipped)
and is then copied into ``out`` (by default the package's ``oneword/toy/weights``). Wall-clock
times go to ``work/timings.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from oneword.fileio import atomic_dir, atomic_path, atomic_write_text
from oneword.toy.ldm import ToyLDMConfig, train_toy_ldm

logger = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("oracle", "clip", "ldm")


@dataclass
class ToyBuildConfig:
    """Training budgets of the toy world (the shipped weights' settings)."""

    oracle_steps: int = 1500
    """Oracle steps (batch 128, lr 2e-3)."""
    clip_steps: int = 2000
    """Toy CLIP steps (batch 128, lr 5e-4)."""
    ldm: ToyLDMConfig = field(default_factory=ToyLDMConfig)
    """The diffusion model's architecture and budgets."""


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _record(work: Path, part: str, seconds: float) -> None:
    path = work / "timings.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[part] = round(times.get(part, 0.0) + seconds, 1)
    atomic_write_text(path, json.dumps(times, indent=1) + "\n")


def _train_small(part: str, out: Path, cfg: ToyBuildConfig, progress: bool) -> None:
    if part == "oracle":
        from oneword.toy.oracle import train_oracle

        train_oracle(out, steps=cfg.oracle_steps, progress=progress)
    else:
        import torch

        from oneword.toy.clip import train_toy_clip

        # fp16 storage halves the shipped file; it loads as fp32
        train_toy_clip(out, steps=cfg.clip_steps, progress=progress, dtype=torch.float16)


def build_toy_world(
    work: Path,
    out: Path,
    parts: Sequence[str] = PARTS,
    cfg: ToyBuildConfig | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Train (or resume, or skip when finished) each of ``parts`` in ``work``; copy into ``out``."""
    cfg = cfg or ToyBuildConfig()
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown toy part(s) {unknown}; choose from {PARTS}")
    work.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for part in (p for p in PARTS if p in parts):
        t0 = time.perf_counter()
        if part in ("oracle", "clip"):
            done = work / f"{part}.safetensors"
            if not done.is_file():
                _train_small(part, done, cfg, progress)
            _copy_file(done, out / done.name)
            written[part] = out / done.name
        else:
            export = train_toy_ldm(work, work / "export" / "ldm", cfg.ldm, progress=progress)
            with atomic_dir(out / "ldm") as tmp:
                shutil.copytree(export, tmp, dirs_exist_ok=True)
            written[part] = out / "ldm"
        _record(work, part, time.perf_counter() - t0)
        logger.info("toy %s -> %s (%.0f s)", part, written[part], time.perf_counter() - t0)
    return written
