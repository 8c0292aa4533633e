"""The torch threads of a training process when ``threads`` is unset: the free cores, shared by the ranks."""

from __future__ import annotations

import logging

import pytest
import torch

from atkd.student.losses import LOSSES
from atkd.student.trainer import loop
from atkd.student.trainer.threads import Machine, choose_threads, is_this_machine, plan_threads
from tests.test_trainer import run_config


@pytest.mark.parametrize("machine, threads", [
    (Machine(cores=2), 2),                                   # an idle machine: every core
    (Machine(cores=2, teacher_here=True), 1),                # a teacher server on one of two cores
    (Machine(cores=2, load=1.4, teacher_here=True), 1),      # ... already counted in the load
    (Machine(cores=2, load=5.0), 1),                         # overloaded: still one
    (Machine(cores=16, load=3.4, ranks_here=2), 6),          # 13 free cores for 2 ranks
    (Machine(cores=16, load=0.2, teacher_here=True, ranks_here=4), 3),
])  # fmt: skip
def test_threads_are_the_free_cores_shared_by_the_ranks(machine, threads):
    assert choose_threads(machine) == threads


def test_a_configured_count_is_kept_and_warned_about_when_it_oversubscribes():
    busy = Machine(cores=2, load=0.3, teacher_here=True)
    threads, message, warn = plan_threads(2, busy)
    assert (threads, warn) == (2, True)
    assert message.startswith("threads=2 is more than this rank's 1 (1 of 2 cores free (load 0.3, a teacher server")
    assert message.endswith("threads=1 avoids it")
    assert plan_threads(1, busy)[::2] == (1, False)
    threads, message, warn = plan_threads(None, busy)
    assert (threads, warn) == (1, False) and message.startswith("threads unset: 1 torch thread per rank")


@pytest.mark.parametrize("address, here", [
    ("127.0.0.1:50051", True), ("localhost:50051", True), ("[::1]:50051", True), ("dns:///localhost:50051", True),
    ("ipv4:127.0.0.1:50051,127.0.0.1:50052", True), ("unix:/tmp/teacher.sock", True),
    ("10.0.0.5:50051", False), ("dns:///teacher.atkd.svc:50051", False), ("teacher-0:50051", False),
])  # fmt: skip
def test_a_teacher_address_on_this_machine_is_recognised(address, here):
    assert is_this_machine(address) is here


def test_train_uses_the_choice_and_restores_torchs_threads(tmp_path, corpus, tiny_model_factory, monkeypatch, caplog):
    seen = []
    three_cores = Machine(cores=3, teacher_here=True)
    monkeypatch.setattr(loop.Machine, "here", classmethod(lambda cls, addresses=(): three_cores))
    monkeypatch.setattr(loop, "get_loss", lambda name, **options: _recording(seen, LOSSES[name]))
    before = torch.get_num_threads()
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), None, max_steps=1, **{"loss.name": "sft"})
    with caplog.at_level(logging.INFO, logger="atkd.student.trainer.loop"):
        train_result = loop.train(config)
    assert train_result.state.step == 1 and seen == [2]  # 3 cores, one taken by the teacher server
    assert "threads unset: 2 torch threads per rank (2 of 3 cores free" in caplog.text
    assert torch.get_num_threads() == before


def _recording(seen: list, loss):
    def call(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return loss(*args, **kwargs)

    return call
