"""What the training job logs: LogWindow's means over micro-batches and steps, read once per record."""

from __future__ import annotations

import pytest
import torch

from atkd.student.losses import LossResult
from atkd.student.trainer.metrics import LogWindow


def result(loss: float, n_hard: int, mean_uncertainty: float) -> LossResult:
    stats = {"n_hard": torch.tensor(n_hard), "mean_uncertainty": torch.tensor(mean_uncertainty)}
    return LossResult(torch.tensor(loss), stats)


def test_a_record_of_one_step_has_the_step_mean_loss_and_the_step_counts():
    window = LogWindow()
    window.add_micro_batch(result(2.0, 10, 0.25), tokens=64)
    window.add_micro_batch(result(4.0, 12, 0.75), tokens=64)
    window.add_step(torch.tensor(0.5), teacher_wait_s=0.1, step_s=1.0)
    record = window.read()
    assert record["loss"] == pytest.approx(3.0) and record["mean_uncertainty"] == pytest.approx(0.5)
    assert record["n_hard"] == 22  # counts are per step: summed over its micro-batches
    assert record["grad_norm"] == pytest.approx(0.5)
    assert (record["teacher_wait_s"], record["step_s"]) == pytest.approx((0.1, 1.0))
    assert record["tokens_per_s"] > 0


def test_a_record_of_several_steps_averages_them_and_the_next_starts_afresh():
    window = LogWindow()
    for step, (loss, n_hard, norm) in enumerate([(1.0, 4, 1.0), (3.0, 8, 3.0)]):
        window.add_micro_batch(result(loss, n_hard, 0.5), tokens=32)
        window.add_step(torch.tensor(norm), teacher_wait_s=0.0, step_s=float(step + 1))
    record = window.read()
    means = (record["loss"], record["n_hard"], record["grad_norm"], record["step_s"])
    assert means == pytest.approx((2.0, 6, 2.0, 1.5))
    window.add_micro_batch(result(5.0, 2, 0.5), tokens=32)
    window.add_step(torch.tensor(1.0), teacher_wait_s=0.0, step_s=1.0)
    assert window.read()["loss"] == pytest.approx(5.0)


def test_a_loss_without_stats_logs_the_loss_only():
    window = LogWindow()
    window.add_micro_batch(LossResult(torch.tensor(1.5)), tokens=8)
    window.add_step(torch.tensor(0.1), teacher_wait_s=0.0, step_s=0.1)
    assert window.read().keys() == {"loss", "grad_norm", "teacher_wait_s", "step_s", "tokens_per_s"}
    with pytest.raises(RuntimeError, match="before any step"):
        window.read()
