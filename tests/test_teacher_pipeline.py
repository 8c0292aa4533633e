"""Student side of a shared teacher: prefetch order and depth, round_robin over replicas, failover, and a
teacher that disappears for good."""

from __future__ import annotations

import signal

import grpc
import pytest
import torch

from atkd.student.client import TeacherClient, TeacherError
from atkd.student.client.channel import channel_target
from atkd.student.data.examples import PackedText
from atkd.student.demo.teacher_process import teacher_process, teacher_server
from atkd.student.teachers import Deferred, RemoteTeacher, TeacherSource, prefetched
from tests.conftest import TINY_VOCAB


class RecordingTeacher(TeacherSource):
    """Records when each batch is submitted and when its result is taken (the pipeline's contract)."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []

    def submit(self, batch, seed=None):
        index = int(batch.example_ids[0])
        self.events.append(("submit", index))

        def result():
            self.events.append(("result", index))
            return torch.full((1,), float(index))

        return Deferred(result)


def numbered_batches(count: int):
    data = PackedText(torch.arange(10 * count + 1) % TINY_VOCAB, seq_len=10)
    return [(data.batch([i]), i) for i in range(count)]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_keeps_depth_batches_in_flight_in_order(depth):
    teacher = RecordingTeacher()
    seen = []
    for batch, output, _ in prefetched(teacher, numbered_batches(6), depth):
        index = int(batch.example_ids[0])
        assert output.item() == index  # each batch with its own signal
        submitted = {i for kind, i in teacher.events if kind == "submit"}
        taken = {i for kind, i in teacher.events if kind == "result"}
        # while the caller works on batch n, batches n+1 .. n+depth are already submitted
        assert submitted == set(range(min(index + depth + 1, 6)))
        assert taken == set(range(index + 1))
        seen.append(index)
    assert seen == list(range(6))


def test_prefetch_raises_a_failed_batch_in_its_turn():
    class FailsOnThree(RecordingTeacher):
        def submit(self, batch, seed=None):
            pending = super().submit(batch, seed)
            if int(batch.example_ids[0]) == 3:
                return Deferred(lambda: (_ for _ in ()).throw(TeacherError(grpc.StatusCode.INVALID_ARGUMENT, "bad")))
            return pending

    got = []
    with pytest.raises(TeacherError, match="bad"):
        for batch, _, _ in prefetched(FailsOnThree(), numbered_batches(6), depth=2):
            got.append(int(batch.example_ids[0]))
    assert got == [0, 1, 2]


def test_channel_target_lists_replicas_for_round_robin():
    assert channel_target("dns:///teacher:50051") == "dns:///teacher:50051"
    assert channel_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["localhost:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        channel_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="must be host:port"):
        channel_target(["127.0.0.1", "127.0.0.1:2"])


def scored_batches(server) -> float:
    """Score requests a replica answered OK (its Prometheus counter)."""
    for line in server.http("/metrics")[1].splitlines():
        if line.startswith('atkd_teacher_requests_total{code="OK",rpc="Score"}'):
            return float(line.split()[-1])
    return 0.0


def test_calls_are_spread_over_replicas_and_fail_over_when_one_stops(serve_teacher, tiny_tokenizer):
    first, second = serve_teacher(), serve_teacher()
    batch = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with TeacherClient([first.address, second.address], tokenizer=tiny_tokenizer, top_k=8) as client:
        reference = client.score(batch)
        for _ in range(7):
            client.score(batch)
        assert scored_batches(first) >= 2 and scored_batches(second) >= 2  # round_robin, not pick_first
        first.close()
        for _ in range(6):  # every call lands on the survivor, failed over there by the client if it hit the dead one
            signal = client.score(batch)
            torch.testing.assert_close(signal.target_logprob, reference.target_logprob)
    assert scored_batches(second) >= 8


def test_a_teacher_that_is_gone_fails_the_batch_with_a_clear_error_after_the_retry_budget(serve_teacher,
                                                                                          tiny_tokenizer):
    server = serve_teacher()
    client = TeacherClient(server.address, tokenizer=tiny_tokenizer, top_k=8, retry_budget=1.5)
    client.check()
    server.close()
    with pytest.raises(TeacherError) as error:
        client.score([[1, 2, 3, 4]])
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no teacher replica answered the Score call within its retry budget of 1.5 s" in error.value.message
    assert f"replicas: {server.address};" in error.value.message
    client.close()


@pytest.mark.slow
def test_training_batches_survive_a_replica_killed_mid_run(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Two teacher processes; one is SIGKILLed while batches are in flight: every batch still arrives, in order,
    with the signal the survivor computes for it."""
    data = PackedText(torch.randint(0, TINY_VOCAB, (20 * 24 + 1,), generator=torch.Generator().manual_seed(1)), 24)
    batches = [(data.batch([2 * i, 2 * i + 1]), i) for i in range(10)]
    with teacher_process(tiny_model_dir) as doomed, teacher_server(tiny_model_dir) as survivor:
        with TeacherClient(survivor, tokenizer=tiny_tokenizer, top_k=8) as client:
            expected = [RemoteTeacher(client, top_k=8)(batch) for batch, _ in batches]
        with TeacherClient([doomed.address, survivor], tokenizer=tiny_tokenizer, top_k=8) as client:
            got = []
            for number, (batch, output, _) in enumerate(prefetched(RemoteTeacher(client, top_k=8), batches, 3)):
                if number == 2:
                    doomed.process.send_signal(signal.SIGKILL)
                got.append((batch, output))
    assert [int(b.example_ids[0]) for b, _ in got] == [2 * i for i in range(10)]
    for (_, output), reference in zip(got, expected, strict=True):
        torch.testing.assert_close(output.target_logprob, reference.target_logprob, rtol=1e-4, atol=1e-4)
