"""Where a result came from: the one header every benchmark and evaluation JSON carries.

:func:`provenance` records the commit and whether the tree had uncommitted changes, the command
line, the library versions, the device, and SHA-256 hashes of the inputs (reference images, an
encoder file), so a number in ``docs/`` can be traced to what made it and rerun.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

from oneword.fileio import sha256_file

LIBRARIES = (
    "oneword",
    "torch",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "safetensors",
    "numpy",
    "pillow",
)


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_description() -> dict[str, object]:
    """The machine the numbers were measured on: CPU, threads and, where there is one, the GPU."""
    import torch

    info: dict[str, object] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(
    inputs: Mapping[str, Iterable[str | Path] | str | Path] | None = None, encoder: str | Path | None = None
) -> dict[str, object]:
    """The provenance header: ``inputs`` maps a name to a file or files whose SHA-256 is recorded
    (e.g. ``{"concepts": [...images]}``), ``encoder`` an encoder file (name and SHA-256)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    hashes: dict[str, object] = {}
    for name, files in (inputs or {}).items():
        if isinstance(files, (str, Path)):
            hashes[name] = sha256_file(files)
        else:
            hashes[name] = {str(f): sha256_file(f) for f in files}
    out: dict[str, object] = {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in LIBRARIES},
        "device": device_description(),
        "inputs": hashes,
    }
    if encoder is not None:
        out["encoder"] = {"file": Path(encoder).name, "sha256": sha256_file(encoder)}
    return out
