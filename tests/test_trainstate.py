"""The shared training-state helpers: schedules, module/optimizer round trips, safetensors errors."""

from __future__ import annotations

import pytest
import torch

from oneword.errors import InputError
from oneword.toy.ldm import min_snr_weights
from oneword.trainstate import (
    load_module,
    load_optimizer,
    module_tensors,
    optimizer_tensors,
    read_safetensors,
    warmup_cosine,
    write_safetensors,
)


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 1.0, warmup=10, floor=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_module_and_optimizer_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt_t, groups = optimizer_tensors(opt)
    path = write_safetensors(
        tmp_path / "s.safetensors", module_tensors("net", net) | opt_t, {"groups": groups}
    )
    tensors, meta = read_safetensors(path)

    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.5)
    load_module("net", net2, tensors)
    load_optimizer(opt2, tensors, meta["groups"])
    assert torch.equal(net2.weight, net.weight)
    assert opt2.param_groups[0]["lr"] == 0.1
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and float(s1["step"]) == float(s2["step"])


def test_read_safetensors_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist; train it"):
        read_safetensors(tmp_path / "none.safetensors", missing="train it")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot be read"):
        read_safetensors(bad)
    ok = write_safetensors(tmp_path / "ok.safetensors", {"x": torch.zeros(1)}, {"format": "a"})
    with pytest.raises(InputError, match="not a b file"):
        read_safetensors(ok, fmt="b")


def test_min_snr_weights():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.arange(0, 1000, 50)
    w = min_snr_weights(sched, t, 5.0)
    assert torch.all(w <= 1.0) and torch.all(w > 0)
    assert w[0] < 0.01 and w[-1] == 1.0  # near-clean steps down-weighted, noisy ones kept
    assert torch.equal(min_snr_weights(sched, t, 0.0), torch.ones(len(t)))
