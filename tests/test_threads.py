"""The torch threads of a training process when ``threads`` is unset: the cores less one for a teacher server
here, shared by the ranks here; a warning when the load average says other processes are busy."""

from __future__ import annotations

import logging

import pytest
import torch

from atkd.student.losses import LOSSES
from atkd.student.trainer import loop
from atkd.student.trainer.threads import Machine, choose_threads, is_this_machine, plan_threads
from tests.test_trainer import run_config


@pytest.mark.parametrize("machine, threads", [
    (Machine(cores=2), 2),                                         # the machine to itself: every core
    (Machine(cores=2, teacher_here=True), 1),                      # a teacher server on one of two cores
    (Machine(cores=1, teacher_here=True), 1),                      # never fewer than one
    (Machine(cores=16, ranks_here=2), 8),                          # two ranks share the cores
    (Machine(cores=16, teacher_here=True, ranks_here=4), 3),
    (Machine(cores=2, load=5.0), 2),                               # the load does not change the choice ...
])  # fmt: skip
def test_threads_are_the_cores_left_by_a_teacher_server_shared_by_the_ranks(machine, threads):
    assert choose_threads(machine) == threads


def test_a_busy_machine_is_warned_about_with_the_count_that_fits():
    busy = Machine(cores=2, load=1.2)  # ... but another process keeps one of the two cores busy
    threads, message, warn = plan_threads(None, busy)
    assert (threads, warn) == (2, True)
    assert message == ("threads unset: 2 torch threads per rank (2 cores, 1 rank here); set threads to choose; but "
                       "the load average (1.2) says other processes keep only 1 of the cores free: torch threads "
                       "that compete for cores make steps several times slower, set threads=1 while they run")
    assert plan_threads(1, busy) == (1, "threads=1 (2 cores, 1 rank here)", False)
    assert plan_threads(4, Machine(cores=16, load=9.6, ranks_here=2))[::2] == (4, True)  # 6 free: 3 per rank
    assert plan_threads(3, Machine(cores=16, load=9.6, ranks_here=2))[::2] == (3, False)


def test_a_teacher_server_here_is_counted_once_in_the_load():
    threads, message, warn = plan_threads(None, Machine(cores=2, load=1.3, teacher_here=True))
    assert (threads, warn) == (1, False)
    assert message == ("threads unset: 1 torch thread per rank (2 cores, less one for the teacher server on this "
                       "machine, 1 rank here); set threads to choose")


@pytest.mark.parametrize("address, here", [
    ("127.0.0.1:50051", True), ("localhost:50051", True), ("[::1]:50051", True), ("dns:///localhost:50051", True),
    ("ipv4:127.0.0.1:50051,127.0.0.1:50052", True), ("unix:/tmp/teacher.sock", True),
    ("10.0.0.5:50051", False), ("dns:///teacher.atkd.svc:50051", False), ("teacher-0:50051", False),
])  # fmt: skip
def test_a_teacher_address_on_this_machine_is_recognised(address, here):
    assert is_this_machine(address) is here


def test_train_uses_the_choice_and_restores_torchs_threads(tmp_path, corpus, tiny_model_factory, monkeypatch, caplog):
    seen = []
    three_cores = Machine(cores=3)  # not this machine's count, so the choice is seen to come from it
    monkeypatch.setattr(loop.Machine, "here", classmethod(lambda cls, addresses=(): three_cores))
    monkeypatch.setattr(loop, "get_loss", lambda name, **options: _recording(seen, LOSSES[name]))
    before = torch.get_num_threads()
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), None, max_steps=1, **{"loss.name": "sft"})
    with caplog.at_level(logging.INFO, logger="atkd.student.trainer.loop"):
        result = loop.train(config)
    assert result.state.step == 1 and seen == [3]
    assert "threads unset: 3 torch threads per rank (3 cores, 1 rank here)" in caplog.text
    assert torch.get_num_threads() == before


def _recording(seen: list, loss):
    def call(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return loss(*args, **kwargs)

    return call
