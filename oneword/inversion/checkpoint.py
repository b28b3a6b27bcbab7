"""Training state of an inversion run, saved as safetensors (no pickle) for exact resumption.

One file holds the learned vectors, the optimizer's tensors, the noise generator's state, and,
in the header, the step, the optimizer's param groups and the prompt sampler's state.
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


def save_state(path: str | Path, ts: TrainState) -> Path:
    tensors = {f"vectors.{i}": v.detach().float().cpu().contiguous() for i, v in enumerate(ts.vectors)}
    tensors.update(ts.optimizer)
    tensors["rng.generator"] = ts.generator_state.clone()
    version, internal, gauss = ts.prompt_rng_state
    meta = {
        "step": str(ts.step),
        "param_groups": ts.param_groups,
        "prompt_rng": json.dumps([version, list(internal), gauss]),
        "scaler": json.dumps(ts.scaler),
        "meta": json.dumps(ts.meta),
    }
    return write_safetensors(path, tensors, meta)


def load_state(path: str | Path) -> TrainState:
    tensors, meta = read_safetensors(path, missing="start again without --resume")
    try:
        n = sum(1 for k in tensors if k.startswith("vectors."))
        version, internal, gauss = json.loads(meta["prompt_rng"])
        return TrainState(
            step=int(meta["step"]),
            vectors=[tensors[f"vectors.{i}"] for i in range(n)],
            optimizer={k: v for k, v in tensors.items() if k.startswith("optim.")},
            param_groups=meta["param_groups"],
            generator_state=tensors["rng.generator"],
            prompt_rng_state=(version, tuple(internal), gauss),
            scaler=json.loads(meta.get("scaler", "null")),
            meta=json.loads(meta.get("meta", "{}")),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise InputError(f"checkpoint {path} is incomplete ({err}); start again without --resume") from None


def restore_prompt_rng(state: tuple) -> random.Random:
    rng = random.Random()
    rng.setstate(state)
    return rng
