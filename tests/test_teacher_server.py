"""The teacher replica end to end: a real gRPC + HTTP server on 127.0.0.1 serving a tiny Llama."""

from __future__ import annotations

import argparse
import filecmp
import queue
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from atkd.proto import generate
from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.codec import decode_signal
from atkd.proto.fingerprint import tokenizer_fingerprint, weights_digest
from atkd.proto.metadata import CLIENT_ID_KEY
from atkd.services.teacher.cli import add_config_flags, parse_config
from atkd.services.teacher.config import TeacherConfig
from atkd.student.client import ScoreBatch, TeacherClient, TeacherError
from atkd.student.demo.teacher_process import teacher_process
from tests.teacher_harness import GatedEngine, ServerThread, http_get, reference_signals, wait_until

ROOT = Path(__file__).resolve().parent.parent
SEQUENCES = [list(range(3, 40)), list(range(100, 112)), list(range(300, 302)), list(range(50, 90))]
#: Per codec, absolute tolerances per field (relative for the uncertainty); see proto/codec.py.
TOLERANCE = {
    "fp16": dict(topk_logprobs=0.006, target_logprob=1e-4, tail_logprob=1e-4, entropy=1e-4, uncertainty=1e-4),
    "q8": dict(topk_logprobs=0.08, target_logprob=0.02, tail_logprob=0.02, entropy=0.032, uncertainty=0.02),
}


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tiny_teacher_engine):
    """One replica for the tests that only read from it."""
    config = TeacherConfig(model=tiny_model_dir, port=0, http_port=0, top_k_max=64, max_tail_samples=8,
                           max_batch_tokens=1024)
    server = ServerThread(config, lambda: tiny_teacher_engine).start()
    yield server
    server.close()


def stub(server: ServerThread, client: str = "test", channel_options=()) -> tuple[pb_grpc.TeacherStub, tuple]:
    """A stub on a connection of its own: the server tells clients apart by connection (without named tokens)."""
    channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                             *channel_options])
    return pb_grpc.TeacherStub(channel), ((CLIENT_ID_KEY, client),)


def request(sequences=((1, 2, 3, 4),), request_id="r", **fields) -> pb.ScoreRequest:
    return pb.ScoreRequest(id=request_id, token_ids=[t for s in sequences for t in s],
                           lengths=[len(s) for s in sequences], top_k=fields.pop("top_k", 4), **fields)


def assert_matches_reference(signal, batch: ScoreBatch, references, codec: str):
    """The server's signal [B, T] against compress() run locally, within the codec's precision.

    Top-k ids are compared through the exact distribution (each returned id carries its own log-prob,
    and the log-probs are the top-k's), so near-ties ordered differently by batched matmuls pass.
    """
    tolerance = TOLERANCE[codec]
    for row, (log_probs, want) in enumerate(references):
        scored = batch.scored[row, : len(log_probs)]
        got = type(signal)(**{name: getattr(signal, name)[row, : len(log_probs)][scored]
                              for name in ("target_logprob", "topk_ids", "topk_logprobs", "tail_logprob",
                                           "uncertainty", "entropy")})
        want = want.select(scored.nonzero().squeeze(1))
        own = log_probs[scored].gather(1, got.topk_ids)
        torch.testing.assert_close(got.topk_logprobs, own, atol=tolerance["topk_logprobs"], rtol=0)
        for name in ("topk_logprobs", "target_logprob", "tail_logprob", "entropy"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=tolerance[name], rtol=0, msg=name)
        torch.testing.assert_close(got.uncertainty, want.uncertainty, rtol=tolerance["uncertainty"], atol=1e-7)
        assert (signal.target_logprob[row][~batch.scored[row]] == 0).all()
        assert (signal.topk_ids[row][~batch.scored[row]] == 0).all()


def test_info_describes_the_model_over_grpc_and_http(shared, tiny_model_dir, tiny_tokenizer):
    info = TeacherClient(shared.address).info()
    assert (info.model_id, info.vocab_size, info.max_sequence_length) == (tiny_model_dir.name, 512, 128)
    assert info.tokenizer_hash == tokenizer_fingerprint(tiny_tokenizer)
    assert info.model_revision == weights_digest(tiny_model_dir)
    assert (info.max_batch_tokens, info.max_top_k, info.max_tail_samples) == (1024, 64, 8)
    assert (info.codecs, info.dtype, info.device) == (("fp16", "q8"), "float32", "cpu")
    status, body = shared.http("/v1/info")
    assert status == 200 and body["tokenizer_hash"] == info.tokenizer_hash and body["codecs"] == ["CODEC_FP16",
                                                                                                  "CODEC_Q8"]


@pytest.mark.parametrize("codec", ["fp16", "q8"])
def test_signal_equals_compress_run_locally(shared, tiny_model_dir, codec):
    mask = torch.ones(len(SEQUENCES), 40, dtype=torch.bool)
    mask[0, :10] = False  # a prompt
    batch = ScoreBatch.of(SEQUENCES, score_mask=mask)
    with TeacherClient(shared.address) as client:
        signal = client.score(SEQUENCES, score_mask=mask, top_k=16, codec=codec, temperature=1.5)
    assert signal.topk_ids.shape == (4, 40, 16)
    assert_matches_reference(signal, batch, reference_signals(tiny_model_dir, SEQUENCES, 16, temperature=1.5), codec)


def test_tail_samples_come_from_the_teacher_tail(shared, tiny_model_dir):
    with TeacherClient(shared.address) as client:
        signal = client.score(SEQUENCES[:1], top_k=8, tail_samples=6, seed=3)
        again = client.score(SEQUENCES[:1], top_k=8, tail_samples=6, seed=3)
    assert torch.equal(signal.tail_sample_ids, again.tail_sample_ids)
    ((log_probs, _),) = reference_signals(tiny_model_dir, SEQUENCES[:1], 8)
    ids, lps = signal.tail_sample_ids[0, :36], signal.tail_sample_logprobs[0, :36]
    targets = torch.tensor(SEQUENCES[0][1:]).unsqueeze(1)
    assert ((ids.unsqueeze(2) != signal.topk_ids[0, :36].unsqueeze(1)).all(2) & (ids != targets)).all()
    torch.testing.assert_close(lps, log_probs.gather(1, ids), atol=0.01, rtol=0)


def test_concurrent_streaming_clients_get_their_own_signals(shared, tiny_model_dir):
    generator = torch.Generator().manual_seed(0)
    work = {f"client{c}": [torch.randint(0, 512, (2, 24), generator=generator) for _ in range(5)] for c in range(4)}

    def stream(client_id):
        with TeacherClient(shared.address, client_id=client_id) as client:
            return list(client.score_stream(work[client_id], in_flight=3, top_k=8))

    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(work, pool.map(stream, work), strict=True))
    for client_id, signals in results.items():
        assert len(signals) == 5
        for ids, signal in zip(work[client_id], signals, strict=True):
            references = reference_signals(tiny_model_dir, ids.tolist(), 8)
            assert_matches_reference(signal, ScoreBatch.of(ids), references, "fp16")


BAD_REQUESTS = [
    (dict(sequences=[[1, 512]]), "token_ids[1] = 512 is outside the vocabulary"),
    (dict(sequences=[[1, 2], []]), "lengths[1] = 0: sequences must not be empty"),
    (dict(sequences=[list(range(129))]), "lengths[0] = 129 is longer than this teacher's maximum sequence length"),
    (dict(sequences=[list(range(100))] * 11), "more than max_batch_tokens = 1024"),
    (dict(top_k=65), "top_k = 65 must be in [1, 64]"),
    (dict(codec=5), "codec: unknown codec value 5"),
    (dict(temperature=-2.0), "temperature = -2.0 must be in [0.01, 100]"),
    (dict(tail_samples=9), "tail_samples = 9 is above this teacher's maximum 8"),
    (dict(score_mask=[True]), "score_mask has 1 flags for 4 token_ids"),
]


@pytest.mark.parametrize("fields, message", BAD_REQUESTS, ids=[m.split()[0] for _, m in BAD_REQUESTS])
def test_bad_inputs_get_invalid_argument_naming_the_field(shared, fields, message):
    teacher, metadata = stub(shared)
    with pytest.raises(grpc.RpcError) as failure:
        teacher.Score(request(**fields), metadata=metadata, timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()
    # on a stream the error comes back in the response and the stream goes on
    responses = list(teacher.ScoreStream(iter([request(request_id="bad", **fields), request(request_id="good")]),
                                         metadata=metadata, timeout=10))
    by_id = {response.id: response for response in responses}
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert message in by_id["bad"].error.message
    assert by_id["good"].signal.num_positions == 3


def test_stream_ids_must_be_present_and_unique_in_flight(serve_teacher, tiny_teacher_engine):
    gated = GatedEngine(tiny_teacher_engine)
    gated.gate.clear()
    server = serve_teacher(gated)
    teacher, metadata = stub(server)
    requests = queue.Queue()
    responses = teacher.ScoreStream(iter(requests.get, None), metadata=metadata, timeout=20)
    requests.put(request(request_id="same"))
    wait_until(gated.entered.is_set, what="the first request to compute")
    requests.put(request(request_id="same"))
    requests.put(request(request_id=""))
    errors = [next(responses).error for _ in range(2)]
    assert sorted(error.message.split(":")[0] for error in errors) == ["id 'same' is already in flight on this stream",
                                                                       "id is empty"]
    assert {error.code for error in errors} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    gated.gate.set()
    assert next(responses).signal.num_positions == 3
    requests.put(None)
    assert list(responses) == []


def test_backpressure_and_readiness_when_the_queue_fills(serve_teacher, tiny_teacher_engine):
    gated = GatedEngine(tiny_teacher_engine)
    gated.gate.clear()
    # one client may fill the whole queue here, to see the queue's own bound (tests/test_teacher_abuse.py
    # checks the default share)
    server = serve_teacher(gated, max_batch_tokens=64, max_queue_tokens=128, max_inflight_per_client=2,
                           max_client_queue_share=1.0)
    a, a_metadata = stub(server, "a")
    b, b_metadata = stub(server, "b")
    first = a.Score.future(request([list(range(16))], "a0"), metadata=a_metadata, timeout=20)
    wait_until(gated.entered.is_set, what="the first batch to compute")
    second = a.Score.future(request([list(range(16))], "a1"), metadata=a_metadata, timeout=20)
    wait_until(lambda: server.server.replica.scheduler.inflight() == 2)
    with pytest.raises(grpc.RpcError) as failure:
        a.Score(request([list(range(16))], "a2"), metadata=a_metadata, timeout=10)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 2 requests in flight, the limit is 2" in failure.value.details()
    assert server.http("/readyz")[0] == 200
    queued = [b.Score.future(request([list(range(56))], f"b{i}"), metadata=b_metadata, timeout=20) for i in range(2)]
    wait_until(lambda: server.server.replica.scheduler.queue.queued_tokens == 128)
    assert server.http("/readyz") == (503, {"ready": False, "reason": "queue saturated"})
    c, c_metadata = stub(server, "c")
    with pytest.raises(grpc.RpcError) as failure:
        c.Score(request([list(range(8))], "c0"), metadata=c_metadata, timeout=10)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the teacher's queue is full (128 tokens queued, limit 128)" in failure.value.details()
    gated.gate.set()
    assert [f.result().signal.num_positions for f in [first, second, *queued]] == [15, 15, 55, 55]
    assert server.http("/readyz")[0] == 200


def test_expired_and_cancelled_requests_are_never_computed(serve_teacher, tiny_teacher_engine):
    gated = GatedEngine(tiny_teacher_engine)
    gated.gate.clear()
    server = serve_teacher(gated, max_batch_tokens=64)
    teacher, metadata = stub(server)
    scheduler = server.server.replica.scheduler
    running = teacher.Score.future(request([[1] * 8]), metadata=metadata, timeout=20)
    wait_until(gated.entered.is_set, what="the first batch to compute")
    with pytest.raises(grpc.RpcError) as failure:  # the request's own timeout_ms, enforced by the scheduler
        teacher.Score(request([[2] * 8], timeout_ms=50), metadata=metadata, timeout=10)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "timeout_ms" in failure.value.details()
    with pytest.raises(grpc.RpcError) as failure:  # the call's deadline: gRPC cancels the handler
        teacher.Score(request([[3] * 8]), metadata=metadata, timeout=0.3)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled = teacher.Score.future(request([[4] * 8]), metadata=metadata, timeout=20)
    wait_until(lambda: scheduler.queue.queued_requests == 1, what="the request to be queued")
    cancelled.cancel()
    wait_until(lambda: scheduler.queue.queued_requests == 0, what="the cancelled request to leave the queue")
    gated.gate.set()
    running.result()
    teacher.Score(request([[5] * 8]), metadata=metadata, timeout=10)
    assert [job.token_ids[0].item() for job in gated.computed] == [1, 5]


@pytest.mark.parametrize("source", ["file", "env"])
def test_bearer_token_auth(serve_teacher, tmp_path, monkeypatch, source):
    if source == "file":
        (tmp_path / "token").write_text("s3cret\n")
        server = serve_teacher(auth_token_file=tmp_path / "token")
    else:
        monkeypatch.setenv("TEACHER_TOKEN", "s3cret")
        server = serve_teacher(auth_token_env="TEACHER_TOKEN")
    for token in (None, "wrong"):
        with TeacherClient(server.address, token=token) as client, pytest.raises(TeacherError) as failure:
            client.info()
        assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in failure.value.message
    with TeacherClient(server.address, token="s3cret") as client:
        assert client.score([[1, 2, 3]], top_k=2).topk_ids.shape == (1, 3, 2)
    channel = grpc.insecure_channel(server.address)  # health checks need no token
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_no_auth_configured_accepts_any_caller(shared):
    with TeacherClient(shared.address, token="anything") as client:
        assert client.info().vocab_size == 512


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(serve_teacher, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = serve_teacher(tls_cert=cert, tls_key=key)
    with TeacherClient(server.address, tls_root_cert=cert) as client:
        assert client.score([[1, 2, 3]], top_k=2).topk_ids.shape == (1, 3, 2)
    with TeacherClient(server.address, timeout=5) as plaintext, pytest.raises(TeacherError) as failure:
        plaintext.info()
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE


def alive(server: ServerThread) -> bool:
    try:
        return server.http("/healthz") == (200, {"status": "alive"})
    except OSError:
        return False


def test_health_and_readiness_follow_the_lifecycle(tiny_model_dir, tiny_teacher_engine):
    loaded = threading.Event()
    gated = GatedEngine(tiny_teacher_engine)
    config = TeacherConfig(model=tiny_model_dir, port=0, http_port=0, grace_s=20)
    server = ServerThread(config, lambda: (loaded.wait(20), gated)[1])
    try:
        starting = server.start_soon(server.server.start())
        wait_until(lambda: server.server.http_port and alive(server), what="the HTTP side")
        assert server.http("/readyz") == (503, {"ready": False, "reason": "loading model"})
        assert server.http("/v1/info")[0] == 503
        loaded.set()
        starting.result(20)
        assert server.http("/readyz") == (200, {"ready": True, "reason": "serving"})
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "atkd.teacher.v1.Teacher"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving

        gated.gate.clear()
        requests = queue.Queue()
        responses = pb_grpc.TeacherStub(channel).ScoreStream(iter(requests.get, None), timeout=20)
        requests.put(request(request_id="in-flight"))
        wait_until(gated.entered.is_set, what="the request to compute")
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=20)
        assert next(watch).status == serving
        stopping = server.start_soon(server.server.stop(20))
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open watch would hold the shutdown for the whole grace period
        wait_until(lambda: server.http("/readyz")[0] == 503, what="readiness to drop")
        assert server.http("/readyz")[1]["reason"] == "shutting down" and alive(server)
        with pytest.raises(grpc.RpcError) as refused:  # no new calls
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        requests.put(request(request_id="late"))  # on the open stream: answered, not computed
        late = next(responses)
        assert (late.id, late.error.code) == ("late", grpc.StatusCode.UNAVAILABLE.value[0])
        assert "shutting down" in late.error.message
        gated.gate.set()
        finished = next(responses)
        assert finished.id == "in-flight" and finished.signal.num_positions == 3
        assert list(responses) == []  # the server ends the stream once nothing is in flight
        requests.put(None)
        stopping.result(5)
        assert not alive(server)
    finally:
        server.close()


def test_metrics_count_requests_tokens_batches_and_bytes(serve_teacher):
    server = serve_teacher()
    with TeacherClient(server.address) as client:
        for _ in range(3):
            client.score([list(range(20)), list(range(10))], top_k=4)
        with pytest.raises(TeacherError):
            client.score([[600]])
    status, text = server.http("/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("atkd_teacher_requests_total", (("code", "OK"), ("rpc", "Score")))] == 3
    assert samples[("atkd_teacher_requests_total", (("code", "INVALID_ARGUMENT"), ("rpc", "Score")))] == 1
    assert samples[("atkd_teacher_tokens_total", ())] == 90
    assert samples[("atkd_teacher_scored_positions_total", ())] == 3 * 28
    assert samples[("atkd_teacher_batch_tokens_count", ())] == 3
    assert samples[("atkd_teacher_batch_tokens_sum", ())] == 90
    assert samples[("atkd_teacher_batch_fill_ratio_sum", ())] == pytest.approx(90 / 1024)
    assert samples[("atkd_teacher_forward_seconds_count", ())] == 3
    assert samples[("atkd_teacher_queue_seconds_count", ())] == 3
    assert samples[("atkd_teacher_response_bytes_total", (("codec", "fp16"),))] > 3 * 28 * (4 * 4 + 16)
    assert samples[("atkd_teacher_queue_requests", ())] == 0 and samples[("atkd_teacher_queue_tokens", ())] == 0


def test_reflection_lists_and_describes_the_services(shared):
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(shared.address))
    assert {"atkd.teacher.v1.Teacher", "grpc.health.v1.Health"} <= set(database.get_services())
    service = DescriptorPool(database).FindServiceByName("atkd.teacher.v1.Teacher")
    assert [method.name for method in service.methods] == ["Info", "Score", "ScoreStream", "Generate"]


def test_message_size_limits_follow_the_config(serve_teacher):
    server = serve_teacher(max_batch_tokens=64)
    teacher, metadata = stub(server)
    with pytest.raises(grpc.RpcError) as failure:  # 64 tokens need far less than 16 * 64 + 64 KiB bytes
        teacher.Score(request([[1] * 70_000]), metadata=metadata, timeout=10)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_generated_stubs_match_the_proto(tmp_path):
    for path in generate.generate(tmp_path):
        committed = generate.HERE / path.name
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run python -m atkd.proto.generate"


def test_cli_reads_yaml_and_flags_override_it(tmp_path, tiny_model_dir):
    (tmp_path / "teacher.yaml").write_text(f"model: {tiny_model_dir}\nmax_batch_tokens: 2048\nport: 6000\n"
                                           "dtype: bfloat16\n")
    config = parse_config(["serve", "--config", str(tmp_path / "teacher.yaml"), "--port", "7000", "--max-wait-ms",
                           "2.5", "--auth-token-env", "TOKEN"])
    assert (config.model, config.max_batch_tokens, config.port, config.max_wait_ms) == (tiny_model_dir, 2048, 7000, 2.5)
    assert (config.dtype, config.auth_token_env, config.queue_tokens) == ("bfloat16", "TOKEN", 8 * 2048)
    assert config.split_requests
    model = ["serve", "--model", str(tiny_model_dir)]
    assert not parse_config([*model, "--split-requests", "false"]).split_requests  # not bool("false")
    with pytest.raises(SystemExit):
        parse_config([*model, "--split-requests", "maybe"])
    assert (config.compute_share, config.stream_compute_window) == ("fair", 4)
    other = parse_config([*model, "--compute-share", "fill", "--stream-compute-window", "2"])
    assert (other.compute_share, other.stream_compute_window) == ("fill", 2)
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert {action.dest for action in parser._actions} - {"help"} == set(TeacherConfig.model_fields)
    with pytest.raises(SystemExit):
        parse_config(["serve", "--port", "1"])  # no model anywhere
    (tmp_path / "bad.yaml").write_text("model: x\nmax_batch_token: 1\n")
    with pytest.raises(SystemExit):
        parse_config(["serve", "--config", str(tmp_path / "bad.yaml")])


def test_sigterm_finishes_in_flight_work_then_exits(tiny_model_dir):
    """A real ``python -m atkd.services.teacher.cli serve`` process: SIGTERM while a request waits in the queue."""
    with teacher_process(tiny_model_dir, extra_args=["--max-wait-ms", "60000", "--threads", "1"]) as teacher:
        with TeacherClient(teacher.address) as client, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.score, [list(range(30))], top_k=4)
            wait_until(lambda: "atkd_teacher_queue_requests 1.0" in http_get(teacher.http_port, "/metrics")[1],
                       what="the request to be queued")
            teacher.process.terminate()  # SIGTERM
            scored = pending.result(30)  # not the 60 s batch wait: draining runs the queue at once
        assert scored.target_logprob.shape == (1, 30) and (scored.target_logprob[0, :29] < 0).all()
        assert teacher.stop() == 0
        assert any("atkd-teacher stopped" in line for line in teacher.log)


def test_two_students_each_over_half_the_budget_share_a_batch(serve_teacher, tiny_teacher_engine, tiny_model_dir):
    """Whole requests of two students of the example config (16 x 129 = 2,064 tokens each; here 17 x 128,
    the tiny model's context being 128) never fit one batch of the default 4,096 tokens; their sequences do:
    the batch after a1 takes a2 whole and fills its room with 15 of b1's 17 sequences, and b1 is answered,
    whole and exact, once its last 2 sequences ran."""
    gated = GatedEngine(tiny_teacher_engine)
    gated.gate.clear()
    server = serve_teacher(gated, max_batch_tokens=TeacherConfig.model_fields["max_batch_tokens"].default)
    generator = torch.Generator().manual_seed(0)
    sequences = {name: torch.randint(0, 512, (17, 128), generator=generator).tolist() for name in ("a1", "a2", "b1")}
    a, a_metadata = stub(server, "a")
    b, b_metadata = stub(server, "b")
    first = a.Score.future(request(sequences["a1"], "a1", top_k=8), metadata=a_metadata, timeout=60)
    wait_until(gated.entered.is_set, what="a1 to compute")
    second = a.Score.future(request(sequences["a2"], "a2", top_k=8), metadata=a_metadata, timeout=60)
    third = b.Score.future(request(sequences["b1"], "b1", top_k=8), metadata=b_metadata, timeout=60)
    wait_until(lambda: server.server.replica.scheduler.queue.queued_requests == 2, what="a2 and b1 to queue")
    gated.gate.set()
    responses = [future.result() for future in (first, second, third)]
    assert [len(job.lengths) for job in gated.computed] == [17, 17, 15, 2]
    clients = {s.labels["le"]: s.value for f in text_string_to_metric_families(server.http("/metrics")[1])
               for s in f.samples if s.name == "atkd_teacher_batch_clients_bucket"}
    assert clients["1.0"] == 2 and clients["2.0"] == 3  # of 3 batches, one held both students
    batch = ScoreBatch.of(sequences["b1"])
    signal = batch.unpack(decode_signal(responses[2].signal))
    assert_matches_reference(signal, batch, reference_signals(tiny_model_dir, sequences["b1"], 8), "fp16")
