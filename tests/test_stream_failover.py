"""student/client/stream.py: a ScoreStream moves to another replica when its own dies or hangs, and the caller
gets every signal once, in order, equal to a fault-free stream's (two in-process replicas on loopback)."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
import torch

from atkd.student.client import TeacherClient, TeacherError
from atkd.student.client.pending import Failover
from atkd.student.client.replicas import Replicas
from tests.teacher_harness import GatedEngine, ServerThread, wait_until

BATCHES = [torch.randint(1, 500, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(10)]


def two_replicas(serve_teacher, tiny_teacher_engine) -> tuple[list[tuple[ServerThread, GatedEngine]], list[str]]:
    """Two replicas, each with its own gated engine, and their addresses."""
    replicas = []
    for _ in range(2):
        gated = GatedEngine(tiny_teacher_engine)
        replicas.append((serve_teacher(gated, max_wait_ms=0), gated))
    return replicas, [server.address for server, _ in replicas]


def serving(replicas: list[tuple[ServerThread, GatedEngine]]) -> tuple[tuple, tuple]:
    """(the replica the stream is on, the other one): the one that computed its batches."""
    wait_until(lambda: any(gated.computed for _, gated in replicas), what="a replica computing")
    first, second = replicas
    return (first, second) if first[1].computed else (second, first)


def assert_every_signal_once_in_order(streamed, client: TeacherClient) -> None:
    assert len(streamed) == len(BATCHES)
    for batch, signal in zip(BATCHES, streamed, strict=True):
        expected = client.score(batch, top_k=8)
        torch.testing.assert_close(signal.topk_logprobs, expected.topk_logprobs, rtol=0, atol=0)
        torch.testing.assert_close(signal.target_logprob, expected.target_logprob, rtol=0, atol=0)


def test_a_stream_whose_replica_dies_mid_run_moves_to_the_other_with_its_unanswered_batches(
    serve_teacher, tiny_teacher_engine, caplog
):
    replicas, addresses = two_replicas(serve_teacher, tiny_teacher_engine)
    with TeacherClient(addresses, timeout=30, retry_budget=30) as client, caplog.at_level(logging.WARNING):
        stream = client.score_stream(BATCHES, in_flight=3, top_k=8)
        streamed = [next(stream) for _ in range(3)]
        (dying, dying_engine), (survivor, _) = serving(replicas)
        dying_engine.gate.clear()  # its next batches stay unanswered: they must go again to the survivor
        wait_until(lambda: dying.server.replica.scheduler.inflight() > 0, what="batches stuck on the dying one")
        dying.close()
        dying_engine.gate.set()
        streamed.extend(stream)
        assert_every_signal_once_in_order(streamed, client)
    assert any(f"ScoreStream on {dying.address} failed" in record.message and f"moved to {survivor.address}"
               in record.message for record in caplog.records)


def test_a_hung_replica_is_left_when_the_caller_has_waited_the_timeout_for_a_signal(
    serve_teacher, tiny_teacher_engine, caplog
):
    replicas, addresses = two_replicas(serve_teacher, tiny_teacher_engine)
    with TeacherClient(addresses, timeout=1.0, retry_budget=30) as client, caplog.at_level(logging.WARNING):
        stream = client.score_stream(BATCHES, in_flight=2, top_k=8)
        streamed = [next(stream)]
        (hung, hung_engine), _ = serving(replicas)
        hung_engine.gate.clear()  # hangs (a SIGSTOP-ed replica, as the client sees it), never answers
        try:
            streamed.extend(stream)
        finally:
            hung_engine.gate.set()
        assert_every_signal_once_in_order(streamed, client)
    assert any(f"ScoreStream on {hung.address} failed (DEADLINE_EXCEEDED: no response for 1 s" in record.message
               for record in caplog.records)


def test_the_time_the_caller_trains_between_signals_is_not_taken_for_a_hung_replica(serve_teacher, caplog):
    server = serve_teacher()
    with TeacherClient(server.address, timeout=0.5) as client, caplog.at_level(logging.WARNING):
        streamed = []
        for signal in client.score_stream(BATCHES[:3], in_flight=2, top_k=8):
            streamed.append(signal)
            threading.Event().wait(1.0)  # a training step longer than the timeout
    assert len(streamed) == 3 and not [r for r in caplog.records if "failed" in r.message]


def test_past_the_budget_a_stream_without_a_replica_fails_with_a_clear_error(serve_teacher):
    server = serve_teacher()
    with TeacherClient(server.address, timeout=5, retry_budget=1.0) as client:
        stream = client.score_stream(BATCHES, in_flight=2, top_k=8)
        next(stream)
        server.close()
        with pytest.raises(TeacherError) as failure:
            list(stream)
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no teacher replica answered the ScoreStream call within its retry budget of 1 s" in failure.value.message


def test_each_failure_episode_of_a_long_stream_gets_the_whole_retry_budget():
    """A stream lives for a whole run: a failure hours after an earlier one that was recovered from must not
    find the budget already spent."""
    replicas = Replicas(["127.0.0.1:1"])  # nothing listens there; no call is made
    try:
        (endpoint,) = replicas.all
        failover = Failover(replicas, endpoint, budget=0.5, what="ScoreStream")
        failover.next(endpoint, grpc.StatusCode.UNAVAILABLE, "gone")  # backs off 0.2 s, within the budget
        threading.Event().wait(0.5)  # the budget of this episode is over
        failover.answered(endpoint)  # ... but the replica answered again meanwhile
        assert failover.next(endpoint, grpc.StatusCode.UNAVAILABLE, "gone again") is endpoint
        threading.Event().wait(0.5)
        with pytest.raises(TeacherError, match="within its retry budget of 0.5 s"):
            failover.next(endpoint, grpc.StatusCode.UNAVAILABLE, "still gone")
    finally:
        replicas.close()
