"""Training state of an inversion run, saved as safetensors (no pickle) for exact resumption.

One file holds the learned vectors, the optimizer's tensors, the noise generator's state, and,
in the header, the step, the optimizer's param groups and the prompt sampler's state: of one
concept (:func:`save_state`) or of a group's slots under ``slot<i>.`` prefixes (:func:`save_states`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oneword.errors import InputError
from oneword.trainstate import read_safetensors, write_safetensors


@dataclass
class TrainState:
    step: int
    vectors: list[torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    """Per-parameter optimizer tensors, as :func:`oneword.trainstate.optimizer_tensors` gives them."""
    param_groups: str
    """The optimizer's param groups (JSON)."""
    generator_state: torch.Tensor
    prompt_rng_state: tuple
    scaler: dict[str, Any] | None = None
    meta: dict[str, str] = field(default_factory=dict)
    """What else the owner must check on resume (e.g. a fingerprint of its inputs)."""


def _pack(ts: TrainState, prefix: str, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    tensors.update(
        {f"{prefix}vectors.{i}": v.detach().float().cpu().contiguous() for i, v in enumerate(ts.vectors)}
    )
    tensors.update({prefix + k: v for k, v in ts.optimizer.items()})
    tensors[f"{prefix}rng.generator"] = ts.generator_state.clone()
    version, internal, gauss = ts.prompt_rng_state
    header.update(
        {
            f"{prefix}step": str(ts.step),
            f"{prefix}param_groups": ts.param_groups,
            f"{prefix}prompt_rng": json.dumps([version, list(internal), gauss]),
            f"{prefix}scaler": json.dumps(ts.scaler),
            f"{prefix}meta": json.dumps(ts.meta),
        }
    )


def _unpack(tensors: dict[str, torch.Tensor], header: dict[str, str], prefix: str) -> TrainState:
    n = sum(1 for k in tensors if k.startswith(f"{prefix}vectors."))
    version, internal, gauss = json.loads(header[f"{prefix}prompt_rng"])
    optim = prefix + "optim."
    return TrainState(
        step=int(header[f"{prefix}step"]),
        vectors=[tensors[f"{prefix}vectors.{i}"] for i in range(n)],
        optimizer={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(optim)},
        param_groups=header[f"{prefix}param_groups"],
        generator_state=tensors[f"{prefix}rng.generator"],
        prompt_rng_state=(version, tuple(internal), gauss),
        scaler=json.loads(header.get(f"{prefix}scaler", "null")),
        meta=json.loads(header.get(f"{prefix}meta", "{}")),
    )


def save_state(path: str | Path, ts: TrainState) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, str] = {}
    _pack(ts, "", tensors, header)
    return write_safetensors(path, tensors, header)


def state_bytes(ts: TrainState) -> bytes:
    """The bytes :func:`save_state` writes (for stores that are not a local folder)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, str] = {}
    _pack(ts, "", tensors, header)
    return save(tensors, metadata=header)


def state_from_bytes(data: bytes) -> TrainState:
    """Inverse of :func:`state_bytes`; :class:`InputError` for bytes that are not a whole state."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="oneword-state-") as tmp:
        path = Path(tmp) / "last.safetensors"
        path.write_bytes(data)
        return load_state(path)


def load_state(path: str | Path) -> TrainState:
    tensors, meta = read_safetensors(path, missing="start again without --resume")
    try:
        return _unpack(tensors, meta, "")
    except (KeyError, ValueError, TypeError) as err:
        raise InputError(f"checkpoint {path} is incomplete ({err}); start again without --resume") from None


def save_states(path: str | Path, states: list[TrainState], meta: dict[str, str]) -> Path:
    """Several slots' states (a group's) in one file, with ``meta`` for the whole group."""
    tensors: dict[str, torch.Tensor] = {}
    header = {"slots": str(len(states)), "meta": json.dumps(meta)}
    for i, ts in enumerate(states):
        _pack(ts, f"slot{i}.", tensors, header)
    return write_safetensors(path, tensors, header)


def load_states(path: str | Path) -> tuple[list[TrainState], dict[str, str]]:
    """Inverse of :func:`save_states`; :class:`InputError` for a missing, foreign or incomplete file."""
    tensors, header = read_safetensors(path)
    if "slots" not in header:
        raise InputError(f"{path} is not a group state (an older version of oneword wrote it)")
    try:
        states = [_unpack(tensors, header, f"slot{i}.") for i in range(int(header["slots"]))]
        return states, json.loads(header["meta"])
    except (KeyError, ValueError, TypeError) as err:
        raise InputError(f"group state {path} is incomplete ({err})") from None


def restore_prompt_rng(state: tuple) -> random.Random:
    rng = random.Random()
    rng.setstate(state)
    return rng
