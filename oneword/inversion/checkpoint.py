"""Training state of an inversion run, saved as safetensors (no pickle) for exact resumption.

One file holds the learned vectors, the optimizer's tensors, the noise generator's state, and,
in the header, the step, the optimizer's hyper-parameters and the prompt sampler's state.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from oneword.errors import InputError
from oneword.fileio import atomic_path


@dataclass
class TrainState:
    step: int
    vectors: list[torch.Tensor]
    optimizer: dict[str, Any]
    generator_state: torch.Tensor
    prompt_rng_state: tuple
    scaler: dict[str, Any] | None = None


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(path: str | Path, ts: TrainState) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"vectors.{i}": v.detach().float().cpu().contiguous() for i, v in enumerate(ts.vectors)}
    optim_tensors, optim_meta = _flatten_optimizer(ts.optimizer)
    tensors.update(optim_tensors)
    tensors["rng.generator"] = ts.generator_state.clone()
    version, internal, gauss = ts.prompt_rng_state
    meta = {
        "step": str(ts.step),
        "optimizer": json.dumps(optim_meta),
        "prompt_rng": json.dumps([version, list(internal), gauss]),
        "scaler": json.dumps(ts.scaler),
    }
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return target


def load_state(path: str | Path) -> TrainState:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise InputError(f"checkpoint {path} cannot be read ({err}); start again without --resume") from err
    n = sum(1 for k in tensors if k.startswith("vectors."))
    vectors = [tensors[f"vectors.{i}"] for i in range(n)]
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    version, internal, gauss = json.loads(meta["prompt_rng"])
    return TrainState(
        step=int(meta["step"]),
        vectors=vectors,
        optimizer=_unflatten_optimizer(optim, json.loads(meta["optimizer"])),
        generator_state=tensors["rng.generator"],
        prompt_rng_state=(version, tuple(internal), gauss),
        scaler=json.loads(meta.get("scaler", "null")),
    )


def restore_prompt_rng(state: tuple) -> random.Random:
    rng = random.Random()
    rng.setstate(state)
    return rng
