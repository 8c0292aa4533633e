"""A replica that one client cannot take down: flow control, failures answered INTERNAL, a bad job failing
alone, impossible configs refused, identity from the credential or the connection, the HTTP side's auth,
and malformed bytes refused without flooding the log. Every test here failed on the server before
these fixes (issue 11, items 2-6 and 8); the full table of hostile requests is tests/test_teacher_badinput.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import grpc
import pytest
import torch
from pydantic import ValidationError

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.metadata import AUTHORIZATION_KEY, CLIENT_ID_KEY, bearer
from atkd.proto.signal import compress
from atkd.services.teacher.config import TeacherConfig
from atkd.services.teacher.errors import ConfigError, ServiceError
from atkd.services.teacher.metrics import TeacherMetrics
from atkd.services.teacher.replica import Replica
from atkd.services.teacher.request import Limits, ScoreJob
from atkd.services.teacher.scheduler import Scheduler
from atkd.services.teacher.servicer import TeacherServicer
from tests.teacher_harness import GatedEngine, wait_until

SCORE = "/atkd.teacher.v1.Teacher/Score"


def connect(server, *metadata: tuple[str, str]) -> tuple[pb_grpc.TeacherStub, tuple, grpc.Channel]:
    """A stub on a connection of its own (the server tells connections apart) and the call metadata."""
    channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
    return pb_grpc.TeacherStub(channel), tuple(metadata), channel


def request(request_id: str = "r", sequences: Sequence[Sequence[int]] = ((1, 2, 3, 4),), **fields) -> pb.ScoreRequest:
    return pb.ScoreRequest(id=request_id, token_ids=[t for s in sequences for t in s],
                           lengths=[len(s) for s in sequences], top_k=fields.pop("top_k", 4), **fields)


def answered(server, code: str = "OK") -> int:
    """Score requests the server answered with ``code`` (from its metrics)."""
    return int(sum(sample.value for family in server.server.metrics.registry.collect() for sample in family.samples
                   if sample.name == "atkd_teacher_requests_total" and sample.labels["code"] == code))


# -- item 2: an unread ScoreStream is flow-controlled -----------------------------------------------------
def test_a_stream_that_is_never_read_stops_being_served_and_frees_its_slots_on_cancel(serve_teacher):
    server = serve_teacher(max_inflight_per_client=4)
    teacher, _, channel = connect(server)
    big = [[(i * 7 + j) % 500 for j in range(100)] for i in range(10)]  # 1000 tokens: ~270 KB per response
    call = teacher.ScoreStream(iter([request(str(i), big, top_k=64) for i in range(60)]), timeout=60)
    scheduler = server.server.replica.scheduler
    wait_until(lambda: scheduler.inflight() == 4 and scheduler.idle, timeout=60,
               what="the stream's 4 slots held, nothing queued")
    time.sleep(1.0)  # not a synchronisation: nothing more may be computed while nobody reads
    computed = answered(server)
    # the 4 held responses plus what the HTTP/2 windows took; before the fix all 60 were computed and buffered
    assert computed < 30 and scheduler.inflight() == 4
    call.cancel()
    wait_until(lambda: scheduler.inflight() == 0, what="the slots to come back after the cancel")
    assert answered(server) == computed and not server.server.replica.servicer._streams
    channel.close()


class FakeContext:
    """What ScoreStream asks of a grpc.aio context."""

    def invocation_metadata(self):
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


@pytest.mark.parametrize("compute_window", [1, 2])
def test_a_never_read_stream_gets_no_more_computed_than_its_compute_window(compute_window):
    """The servicer driven without gRPC (no HTTP/2 window to take responses): 50 requests sent, the first
    response taken, then nobody reads. Only ``stream_compute_window`` requests are computed, not the
    ``stream_window`` (16) read, and each response taken lets one more be computed. Before, all 16 read
    were computed at once (issue 11, "Load", case 2: an unread stream's burst)."""
    vocab = 32
    computed: list[ScoreJob] = []

    def compute(jobs):
        computed.extend(jobs)
        return [compress(torch.zeros(job.num_positions, vocab), job.targets, job.top_k) for job in jobs]

    async def main():
        scheduler = Scheduler(compute, TeacherMetrics(), max_batch_tokens=1024, max_wait_s=0.001,
                              max_queue_tokens=1 << 16, max_inflight_per_client=16)
        scheduler.start()
        limits = Limits(vocab_size=vocab, max_seq_len=64, max_batch_tokens=1024, max_top_k=8, max_tail_samples=0)
        servicer = TeacherServicer(pb.InfoResponse(model_revision="r"), limits, scheduler, TeacherMetrics(),
                                   stream_window=16, stream_compute_window=compute_window)
        read = asyncio.Event()
        pulled = 0

        async def requests():
            nonlocal pulled
            for i in range(50):
                pulled += 1
                if pulled == 16:
                    read.set()
                yield request(str(i), [[1, 2, 3, 4, 5, 6, 7, 8]], top_k=4)

        async def settled() -> int:
            await read.wait()  # the stream's window is full: nothing more is read
            for _ in range(20):  # let every request that may be computed reach the scheduler and be computed
                await asyncio.sleep(0.01)
                await scheduler.drained()
            return len(computed)

        stream = servicer.ScoreStream(requests(), FakeContext())
        first = await anext(stream)
        held = await settled()
        await anext(stream)  # one more response taken: one more may be computed
        after_one_more = await settled()
        await stream.aclose()
        await scheduler.stop()
        return first, held, after_one_more, pulled

    first, held, after_one_more, pulled = asyncio.run(asyncio.wait_for(main(), 30))
    assert first.HasField("signal") and not first.HasField("error")
    assert held == compute_window and after_one_more == compute_window + 1
    assert pulled <= 17  # stream_window requests read (and one more once a response was taken)


# -- item 3: any failure answers INTERNAL and leaves the stream usable ------------------------------------
class UnencodableEngine(GatedEngine):
    """Fault injection: for requests with top_k = 3 the engine returns a signal of positions [1, n] instead of
    [n], which the encoder refuses (a bug outside ServiceError, as a real one would be)."""

    def score(self, jobs):
        signals = super().score(jobs)
        return [signal.map_tensors(lambda t: t.unsqueeze(0)) if job.top_k == 3 else signal
                for job, signal in zip(jobs, signals, strict=True)]


def test_an_unexpected_failure_answers_internal_and_the_stream_goes_on(serve_teacher, tiny_teacher_engine, caplog):
    server = serve_teacher(UnencodableEngine(tiny_teacher_engine))
    teacher, metadata, channel = connect(server)
    with pytest.raises(grpc.RpcError) as failure:
        teacher.Score(request(top_k=3), timeout=10)
    assert failure.value.code() == grpc.StatusCode.INTERNAL  # not UNKNOWN
    assert "the teacher failed on this request: ValueError: encode a flattened signal" in failure.value.details()
    requests = queue.Queue()
    responses = teacher.ScoreStream(iter(requests.get, None), timeout=10)
    requests.put(request("x", top_k=3))
    broken = next(responses)
    assert (broken.id, broken.error.code) == ("x", grpc.StatusCode.INTERNAL.value[0])
    assert "encode a flattened signal" in broken.error.message
    requests.put(request("x", top_k=4))  # the id is free again and the stream still serves
    assert next(responses).signal.num_positions == 3
    requests.put(None)
    assert list(responses) == []  # the stream ends when the client is done, not at its deadline
    assert any(record.levelno == logging.ERROR and "answered INTERNAL" in record.getMessage()
               for record in caplog.records)
    channel.close()


class NanEngine(GatedEngine):
    """Fault injection: a NaN in every signal (a broken model or kernel), which must never go out as OK."""

    def score(self, jobs):
        return [dataclasses.replace(s, entropy=torch.full_like(s.entropy, float("nan"))) for s in super().score(jobs)]


def test_a_signal_that_is_not_finite_is_never_answered_ok(serve_teacher, tiny_teacher_engine):
    server = serve_teacher(NanEngine(tiny_teacher_engine))
    teacher, _, channel = connect(server)
    with pytest.raises(grpc.RpcError) as failure:
        teacher.Score(request(), timeout=10)
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert "non-finite values in entropy" in failure.value.details()
    channel.close()


# -- item 4: a bad job fails alone; impossible configs are refused at start -------------------------------
def test_a_job_the_engine_cannot_compute_fails_alone_not_its_batch(tiny_teacher_engine):
    def job(ids, top_k) -> ScoreJob:
        n = len(ids) - 1
        return ScoreJob(token_ids=torch.tensor(ids), lengths=(len(ids),), rows=torch.zeros(n, dtype=torch.long),
                        cols=torch.arange(n), targets=torch.tensor(ids[1:]), top_k=top_k, temperature=1.0,
                        tail_samples=0)

    good, bad = job([5, 6, 7, 8], 4), job([9, 10, 11], tiny_teacher_engine.vocab_size + 1)  # top-k over V

    async def main():
        scheduler = Scheduler(tiny_teacher_engine.score, TeacherMetrics(), max_batch_tokens=64, max_wait_s=0.05,
                              max_queue_tokens=256, max_inflight_per_client=4)
        scheduler.start()
        results = await asyncio.gather(scheduler.submit("a", good), scheduler.submit("b", bad),
                                       return_exceptions=True)
        await scheduler.stop()
        return results

    scored, failure = asyncio.run(main())
    assert scored.batch_tokens == 7  # both were in one batch
    torch.testing.assert_close(scored.signal.topk_logprobs, tiny_teacher_engine.score([good])[0].topk_logprobs)
    assert isinstance(failure, ServiceError) and failure.code == grpc.StatusCode.INTERNAL
    assert "the teacher engine failed on this request: ValueError: k must be in [0, 512], got 513" in str(failure)


def test_impossible_configs_are_refused_with_one_line(tiny_model_dir, tiny_teacher_engine):
    with pytest.raises(ValidationError, match="above gRPC's message limit"):
        TeacherConfig(model=tiny_model_dir, top_k_max=100_000)
    with pytest.raises(ValidationError, match="must hold at least one request of max_batch_tokens"):
        TeacherConfig(model=tiny_model_dir, max_batch_tokens=1024, max_queue_tokens=1024)
    with pytest.raises(ConfigError, match="top_k_max = 513 is above the model's vocabulary of 512"):
        Replica(TeacherConfig(model=tiny_model_dir, top_k_max=513), tiny_teacher_engine)
    for flags, message in ((["--top-k-max", "100000"], "above gRPC's message limit"),
                           (["--top-k-max", "600"], "top_k_max = 600 is above the model's vocabulary of 512")):
        run = subprocess.run([sys.executable, "-m", "atkd.services.teacher.cli", "serve", "--model", tiny_model_dir,
                              "--port", "0", "--http-port", "0", *flags], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        (line,) = [line for line in run.stderr.splitlines() if message in line]


# -- item 5: temperatures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-45, 1e-30, float("nan"), float("inf"), -1.0, 1e30])
def test_absurd_temperatures_are_invalid_arguments(serve_teacher, temperature):
    teacher, _, channel = connect(serve_teacher())
    with pytest.raises(grpc.RpcError) as failure:
        teacher.Score(request(temperature=temperature), timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in failure.value.details()
    channel.close()


# -- item 6: identity and the queue share -----------------------------------------------------------------
def test_without_auth_the_client_is_its_connection_not_its_header(serve_teacher, tiny_teacher_engine):
    gated = GatedEngine(tiny_teacher_engine)
    gated.gate.clear()
    server = serve_teacher(gated, max_inflight_per_client=2)
    victim, victim_metadata, _ = connect(server, (CLIENT_ID_KEY, "victim"))
    spoofer, _, _ = connect(server, (CLIENT_ID_KEY, "victim"))
    hogged = [spoofer.Score.future(request(f"s{i}"), metadata=victim_metadata, timeout=20) for i in range(2)]
    wait_until(lambda: server.server.replica.scheduler.inflight() == 2, what="the spoofer's 2 requests in flight")
    with pytest.raises(grpc.RpcError) as failure:  # rotating the header does not escape the limit
        spoofer.Score(request("s2"), metadata=((CLIENT_ID_KEY, "someone-else"),), timeout=10)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    served = victim.Score.future(request("v"), metadata=victim_metadata, timeout=20)  # not starved by the spoof
    gated.gate.set()
    assert served.result().signal.num_positions == 3 and all(f.result().signal for f in hogged)


def test_with_named_tokens_the_client_is_its_token(serve_teacher, tiny_teacher_engine, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("alice: alice-secret\nbob: bob-secret\n")
    gated = GatedEngine(tiny_teacher_engine)
    gated.gate.clear()
    server = serve_teacher(gated, max_inflight_per_client=2, auth_tokens_file=tokens)
    alice = ((AUTHORIZATION_KEY, bearer("alice-secret")),)
    first, _, _ = connect(server)
    second, _, _ = connect(server)  # another connection, another header: still alice
    hogged = [first.Score.future(request(f"a{i}"), metadata=alice + ((CLIENT_ID_KEY, f"a{i}"),), timeout=20)
              for i in range(2)]
    wait_until(lambda: server.server.replica.scheduler.inflight("token:alice") == 2, what="alice's 2 requests")
    with pytest.raises(grpc.RpcError) as failure:
        second.Score(request("a2"), metadata=alice + ((CLIENT_ID_KEY, "fresh"),), timeout=10)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "client 'token:alice' already has 2 requests in flight" in failure.value.details()
    bob = second.Score.future(request("b"), metadata=((AUTHORIZATION_KEY, bearer("bob-secret")),), timeout=20)
    gated.gate.set()
    assert bob.result().signal.num_positions == 3 and all(f.result().signal for f in hogged)


def test_one_client_cannot_fill_the_queue_alone(serve_teacher, tiny_teacher_engine):
    gated = GatedEngine(tiny_teacher_engine)
    gated.gate.clear()
    # 16 requests of 64 tokens in flight would fill the 512-token queue; its share is half of it
    server = serve_teacher(gated, max_batch_tokens=64, max_queue_tokens=512, max_inflight_per_client=16)
    hog, _, _ = connect(server)
    other, _, _ = connect(server)
    sequence = [list(range(64))]
    held = [hog.Score.future(request("h0", sequence), timeout=20)]
    wait_until(gated.entered.is_set, what="the first batch to compute")
    held += [hog.Score.future(request(f"h{i}", sequence), timeout=20) for i in range(1, 5)]
    wait_until(lambda: server.server.replica.scheduler.queue.queued_tokens == 256, what="the hog's share queued")
    with pytest.raises(grpc.RpcError) as failure:
        hog.Score(request("h5", sequence), timeout=10)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "its share of the queue is 256" in failure.value.details()
    admitted = other.Score.future(request("o", sequence), timeout=20)
    wait_until(lambda: server.server.replica.scheduler.queue.queued_tokens == 320, what="the other client queued")
    gated.gate.set()
    assert admitted.result().signal.num_positions == 63 and all(f.result().signal for f in held)


# -- item 8: the HTTP side; malformed bytes ---------------------------------------------------------------
def http(host: str, port: int, path: str, token: str | None = None) -> int:
    """The status of ``GET path`` on host:port, with ``Authorization: Bearer token`` when given."""
    headers = {"Authorization": bearer(token)} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}{path}", headers=headers),
                                    timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_http_info_and_metrics_want_the_token_when_auth_is_on(serve_teacher, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = serve_teacher(auth_token_file=token, http_host="127.0.0.2")
    port = server.server.http_port
    assert [http("127.0.0.2", port, path) for path in ("/healthz", "/readyz", "/v1/info", "/metrics")] == \
        [200, 200, 401, 401]
    assert [http("127.0.0.2", port, path, "s3cret") for path in ("/v1/info", "/metrics")] == [200, 200]
    assert http("127.0.0.2", port, "/v1/info", "wrong") == 401
    with pytest.raises(urllib.error.URLError):  # --http-host: not on the gRPC side's address
        http("127.0.0.1", port, "/healthz")
    public = serve_teacher(auth_token_file=token, metrics_public=True)
    assert [http("127.0.0.1", public.server.http_port, path) for path in ("/metrics", "/v1/info")] == [200, 401]


def test_malformed_messages_are_refused_before_decoding_and_logged_once(serve_teacher, tmp_path, caplog):
    token = tmp_path / "token"
    token.write_text("s3cret")
    server = serve_teacher(auth_token_file=token)
    _, _, channel = connect(server)
    raw = channel.unary_unary(SCORE)  # bytes in, bytes out: no serializer
    garbage = b"\x0a\x02\xff\xfe" + bytes(range(7, 40))  # field 1 (the id, a string) is not UTF-8
    caplog.set_level(logging.WARNING)
    codes = []
    for _ in range(20):
        with pytest.raises(grpc.RpcError) as failure:
            raw(garbage, metadata=((AUTHORIZATION_KEY, bearer("s3cret")),), timeout=10)
        codes.append(failure.value.code())
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert "the message is not a valid ScoreRequest" in failure.value.details()
    for _ in range(20):  # an unauthenticated caller's bytes are not even parsed
        with pytest.raises(grpc.RpcError) as failure:
            raw(garbage, timeout=10)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(20):  # garbage on the HTTP port
        with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            sock.recv(1024)
    records = [r for r in caplog.records if r.name.startswith(("atkd", "uvicorn", "grpc"))]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    assert sum("not a ScoreRequest" in r.getMessage() for r in records) == 1
    assert sum("Invalid HTTP request" in r.getMessage() for r in records) <= 1
    channel.close()
