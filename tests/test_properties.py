"""Property tests (hypothesis) of what crosses the wire: the request parser, the server, and the client's decoder.

* ``parse_request`` on arbitrary field values either returns a job within the replica's limits or raises
  InvalidArgument, nothing else;
* a live server sent arbitrary bytes or arbitrary field values answers OK, INVALID_ARGUMENT or
  RESOURCE_EXHAUSTED (never UNKNOWN or INTERNAL, never a crash), an OK signal decodes with every value
  finite, and a good request is still served afterwards;
* ``decode_signal`` on arbitrary bytes and on arbitrary tensors either returns a consistent signal with
  finite values or raises MalformedSignal (a ValueError naming the problem).
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.codec import MalformedSignal, decode_signal
from atkd.services.teacher.config import TeacherConfig
from atkd.services.teacher.errors import InvalidArgument
from atkd.services.teacher.request import MAX_TEMPERATURE, MIN_TEMPERATURE, Limits, parse_request
from tests.teacher_harness import ServerThread

LIMITS = Limits(vocab_size=512, max_seq_len=128, max_batch_tokens=1024, max_top_k=64, max_tail_samples=8)
SCORE = "/atkd.teacher.v1.Teacher/Score"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def score_requests(draw) -> pb.ScoreRequest:
    """Requests with arbitrary values in every field, biased towards the edges of the limits (a third of them
    with every id in the vocabulary, most with one sequence of all the ids; :func:`valid_score_requests` draws
    the ones that reach the engine)."""
    valid_ids = st.integers(0, 511)
    token_ids = draw(st.lists(draw(st.sampled_from([valid_ids, valid_ids, st.integers(-2, 520), int32])),
                              min_size=draw(st.sampled_from([0, 1, 1])), max_size=40))
    lengths = draw(st.one_of(
        st.just([len(token_ids)]),
        st.just([len(token_ids)]),
        st.lists(st.one_of(st.integers(-2, 130), int32), max_size=6)))
    return pb.ScoreRequest(
        id=draw(st.text(max_size=8)), token_ids=token_ids, lengths=lengths,
        score_mask=draw(st.one_of(st.just([]), st.lists(st.booleans(), max_size=41))),
        top_k=draw(st.one_of(st.integers(1, 64), st.integers(0, 600), uint32)), codec=draw(st.integers(0, 4)),
        temperature=draw(st.one_of(float32, st.floats(0.0078125, 128.0, width=32))),
        tail_samples=draw(st.one_of(st.integers(0, 10), uint32)),
        timeout_ms=draw(st.integers(0, 5000)),
        tail_estimator=draw(st.integers(0, 7)), adaptive_tail=draw(st.booleans()),
        **({"seed": draw(st.integers(0, 2**64 - 1))} if draw(st.booleans()) else {}),
    )  # fmt: skip


@st.composite
def valid_score_requests(draw) -> pb.ScoreRequest:
    """Requests within the limits in every field (the engine computes them: the OK side of the property)."""
    token_ids = draw(st.lists(st.integers(0, 511), min_size=2, max_size=40))
    tail_samples = draw(st.integers(0, 8))
    return pb.ScoreRequest(
        id=draw(st.text(max_size=8)), token_ids=token_ids, lengths=[len(token_ids)], top_k=draw(st.integers(1, 64)),
        codec=draw(st.integers(0, 2)), temperature=draw(st.floats(0.015625, 64.0, width=32)), tail_samples=tail_samples,
        tail_estimator=draw(st.integers(0, 4)) if tail_samples else 0,
        adaptive_tail=draw(st.booleans()) if tail_samples else False,
        **({"seed": draw(st.integers(0, 2**64 - 1))} if draw(st.booleans()) else {}),
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(score_requests())
def test_parse_request_returns_a_job_within_the_limits_or_invalid_argument(request):
    try:
        job, codec = parse_request(request, LIMITS)
    except InvalidArgument as error:
        assert str(error)
        return
    assert 0 < job.tokens <= LIMITS.max_batch_tokens and sum(job.lengths) == job.tokens
    assert all(1 <= length <= LIMITS.max_seq_len for length in job.lengths)
    assert ((job.token_ids >= 0) & (job.token_ids < LIMITS.vocab_size)).all()
    assert 1 <= job.top_k <= LIMITS.max_top_k and job.tail_samples <= LIMITS.max_tail_samples
    assert math.isfinite(job.temperature) and MIN_TEMPERATURE <= job.temperature <= MAX_TEMPERATURE
    assert codec in ("fp16", "q8")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_teacher_engine):
    config = TeacherConfig(model=tiny_model_dir, port=0, http_port=0, top_k_max=64, max_tail_samples=8,
                           max_batch_tokens=1024, max_wait_ms=0)
    server = ServerThread(config, lambda: tiny_teacher_engine).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def _served_after(channel) -> None:
    good = pb.ScoreRequest(id="good", token_ids=[1, 2, 3, 4], lengths=[4], top_k=4)
    assert pb_grpc.TeacherStub(channel).Score(good, timeout=30).signal.num_positions == 3


ANSWERED: dict[str, int] = {}  # status code name: count, over the server properties


def _check_reply(call) -> None:
    try:
        reply = call()
    except grpc.RpcError as error:
        ANSWERED[error.code().name] = ANSWERED.get(error.code().name, 0) + 1
        assert error.code() in ALLOWED, (error.code(), error.details())
        assert error.details()
        return
    ANSWERED["OK"] = ANSWERED.get("OK", 0) + 1
    response = reply if isinstance(reply, pb.ScoreResponse) else pb.ScoreResponse.FromString(reply)
    decode_signal(response.signal, vocab_size=512)  # finite and consistent, or MalformedSignal fails the test


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_server_nor_come_back_ok_with_a_bad_signal(channel, data):
    raw = channel.unary_unary(SCORE)
    _check_reply(lambda: raw(data, timeout=30))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(score_requests(), valid_score_requests()))
def test_arbitrary_field_values_never_crash_the_server_nor_come_back_ok_with_a_bad_signal(channel, request):
    _check_reply(lambda: pb_grpc.TeacherStub(channel).Score(request, timeout=30))


def test_the_server_still_serves_after_the_properties(channel):
    _served_after(channel)
    assert ANSWERED.get("OK", 0) >= 5 and ANSWERED.get("INVALID_ARGUMENT", 0) >= 5  # both kinds were exercised


# -- the client's decoder -----------------------------------------------------------------------------------
DTYPES = [pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_UINT8, pb.DTYPE_UINT16,
          pb.DTYPE_INT32, pb.DTYPE_INT64, 99]


@st.composite
def tensors(draw) -> pb.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.one_of(st.integers(0, 4), st.integers(-3, 2**40)), max_size=3))
    size = math.prod(shape) if shape and all(0 <= s <= 4 for s in shape) else draw(st.integers(0, 8))
    itemsize = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_UINT8: 1, pb.DTYPE_UINT16: 2,
                pb.DTYPE_INT32: 4, pb.DTYPE_INT64: 8}.get(dtype, 1)
    data = draw(st.one_of(st.binary(min_size=size * itemsize, max_size=size * itemsize), st.binary(max_size=40)))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def signals(draw) -> pb.Signal:
    message = pb.Signal(num_positions=draw(st.integers(-2, 5)))
    if draw(st.booleans()):
        body = message.fp16
        names = ("target_logprob", "topk_ids", "topk_logprobs", "tail_logprob", "uncertainty", "entropy")
    else:
        body = message.q8
        names = ("topk_ids", "topk_head_logprobs", "topk_rest_codes", "target_log_odds", "tail_logprob", "entropy")
    for name in names:
        if draw(st.integers(0, 9)):  # now and then a field is missing
            getattr(body, name).CopyFrom(draw(tensors()))
    if draw(st.booleans()):
        message.tail_samples.ids.CopyFrom(draw(tensors()))
        message.tail_samples.logprobs.CopyFrom(draw(tensors()))
    return message


def _decodes_or_refuses(message: pb.Signal) -> None:
    try:
        signal = decode_signal(message, vocab_size=512)
    except MalformedSignal as error:
        assert str(error).startswith("malformed Signal message")
        return
    n = message.num_positions
    assert signal.target_logprob.shape == (n,) and signal.topk_ids.shape[0] == n
    for name in ("target_logprob", "topk_logprobs", "uncertainty", "entropy"):
        assert np.isfinite(getattr(signal, name).numpy()).all()
    assert not torch.isnan(signal.tail_logprob).any() and (signal.topk_ids < 512).all()


@settings(max_examples=200, deadline=None)
@given(signals())
def test_the_decoder_refuses_malformed_tensors_with_a_clear_error(message):
    _decodes_or_refuses(message)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_the_decoder_refuses_arbitrary_bytes_with_a_clear_error(data):
    try:
        message = pb.Signal.FromString(data)
    except DecodeError:
        return  # protobuf itself refused the bytes
    _decodes_or_refuses(message)
