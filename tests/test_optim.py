"""The one optimiser config: its defaults and validation, AdamW's parameter groups, the LR schedule."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from atkd.student.optim import OptimConfig, cosine_with_warmup, make_optimizer


def test_schedule_warms_up_then_decays_to_the_floor():
    values = [cosine_with_warmup(s, 100, 10, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[-1] == pytest.approx(0.1, abs=1e-3)


def test_defaults_and_validation():
    optim = OptimConfig()
    assert optim.lr == 1e-3  # callers that want more (the demo, the benches, teacher pre-training) pass it
    assert (optim.warmup, optim.min_lr_ratio, optim.weight_decay, optim.grad_clip) == (20, 0.1, 0.1, 1.0)
    with pytest.raises(ValidationError, match="greater than 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        OptimConfig(steps=10)  # the schedule's length is the loop's, not the config's


def test_make_optimizer_decays_matrices_only_and_follows_the_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer, schedule = make_optimizer(model, OptimConfig(lr=2e-3, warmup=2, weight_decay=0.5, min_lr_ratio=0.2), 10)
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])] and decay["weight_decay"] == 0.5
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:2] == pytest.approx([1e-3, 2e-3])
    assert lrs == pytest.approx([2e-3 * cosine_with_warmup(s, 10, 2, 0.2) for s in range(10)])
