"""Training state in safetensors files: the pieces every trainer of oneword shares.

Textual inversion, the toy model, the oracle and the toy CLIP all checkpoint modules and an
optimizer without pickle, read back safetensors files with a one-line error when they are missing
or foreign, and schedule the learning rate with a linear warm-up and a cosine decay.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from oneword.errors import InputError
from oneword.fileio import atomic_write_bytes


def warmup_cosine(step: int, total: int, peak: float, warmup: int, floor: float = 0.0) -> float:
    """Learning rate at ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then a cosine
    decay to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return peak * (floor + (1 - floor) * cosine)


def module_tensors(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state as ``{prefix.name: tensor}`` (CPU, contiguous)."""
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def load_module(prefix: str, module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Inverse of :func:`module_tensors`."""
    n = len(prefix) + 1
    module.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, Tensor], str]:
    """An optimizer's per-parameter state as ``{prefix.param_id.key: tensor}`` and its param groups
    as JSON (scalars such as Adam's ``step`` become 0-d tensors)."""
    state = opt.state_dict()
    tensors = {
        f"{prefix}.{pid}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
        for pid, entries in state["state"].items()
        for key, value in entries.items()
    }
    return tensors, json.dumps(state["param_groups"])


def load_optimizer(
    opt: torch.optim.Optimizer,
    tensors: dict[str, Tensor],
    param_groups: str | None = None,
    prefix: str = "optim",
) -> None:
    """Inverse of :func:`optimizer_tensors`; ``param_groups=None`` keeps the optimizer's own."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    groups = json.loads(param_groups) if param_groups else opt.state_dict()["param_groups"]
    opt.load_state_dict({"state": state, "param_groups": groups})


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically (through bytes: ``save_file`` would create the file with mode 0600)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, save(tensors, metadata=metadata))
    return target


def read_safetensors(
    path: str | Path, *, fmt: str | None = None, missing: str = ""
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header of a safetensors file; with ``fmt``, its header must say ``format == fmt``.

    Raises :class:`InputError` (one line) for a missing file (followed by ``missing``, a hint), an
    unreadable one, or one of another format.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if fmt is not None and meta.get("format") != fmt:
                raise InputError(f"{path} is not a {fmt} file (its header has no format={fmt})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist" + (f"; {missing}" if missing else "")) from None
    except (SafetensorError, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path} cannot be read as a safetensors file ({msg})") from None
    return tensors, meta
