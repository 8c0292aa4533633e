"""The gRPC ``Teacher`` service: parse, submit to the scheduler, encode; nothing else happens here.

A client is its token's name when it sent a named token, else its connection (see
:func:`~atkd.services.teacher.auth.client_identity`); fairness and in-flight limits are per client.

Failures: a request's own errors are :class:`ServiceError` s with their status code; anything else that
goes wrong while serving a request (a bug, a signal that is not finite) is logged (rate limited) and
answered INTERNAL with a message, and the stream goes on. A message that does not parse as a
``ScoreRequest`` never reaches the code above: the :class:`DecodeGuard` interceptor hands the servicer a
:class:`Malformed` instead, answered INVALID_ARGUMENT (logged once per minute, not per request).

Flow control of ScoreStream: a stream reads its next request only while fewer than ``stream_window``
of its requests are unanswered or have a response not yet sent, and a request keeps its client's
in-flight slot until its response is sent. So a client that sends and never reads stops being read
(HTTP/2 flow control then stops its sends) and holds at most ``stream_window`` responses in the server.
Of the requests read, a stream submits to the scheduler only while fewer than ``stream_compute_window``
of its requests are computing or computed with a response not yet taken by gRPC; the others wait, read
but not queued (no in-flight slot, no compute). So an unread stream gets that many requests computed, plus
what the HTTP/2 windows take, then nothing: its compute is not spent far ahead of its reader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.codec import encode_signal
from atkd.proto.metadata import CLIENT_ID_KEY
from atkd.proto.signal import TeacherSignal

from .auth import BearerToken, client_identity
from .errors import InvalidArgument, ServiceError
from .generation import GenerateService
from .log_limit import RateLimitedLog
from .metrics import TeacherMetrics, client_label
from .request import Limits, parse_request
from .scheduler import Scheduler

log = logging.getLogger(__name__)

TEACHER_SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
_WAKE = object()  # wakes a ScoreStream to check whether it should end
#: Signal fields that may hold -inf: the log of an empty tail's mass (top-k and target cover the vocabulary).
_MAY_BE_MINUS_INF = frozenset({"tail_logprob"})


class Malformed:
    """Stands for a request message that did not parse; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 -- any parse failure is the caller's bad bytes
            return Malformed(f"{type(error).__name__}: {error}")

    return parse


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Parses the Teacher service's requests with a deserializer that never raises: a message that does
    not parse becomes a :class:`Malformed` (grpcio would log a traceback per message and answer UNKNOWN)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or handler.request_deserializer is None
                or not handler_call_details.method.startswith(f"/{TEACHER_SERVICE}/")):
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))


def _nothing() -> None:
    pass


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def release() -> None:
        first()
        second()

    return release


class TeacherServicer(pb_grpc.TeacherServicer):
    """Thin adapter between the wire and :class:`Scheduler`."""

    generation: GenerateService | None = None  # the Generate RPC's logic, set by the replica

    def __init__(self, info: pb.InfoResponse, limits: Limits, scheduler: Scheduler, metrics: TeacherMetrics,
                 auth: BearerToken | None = None, stream_window: int = 16, stream_compute_window: int = 4):
        self._info = info
        self._limits = limits
        self._scheduler = scheduler
        self._metrics = metrics
        self._auth = auth
        self._stream_window = stream_window
        self._stream_compute_window = min(stream_compute_window, stream_window)
        self._closing = False
        self._streams: set[asyncio.Queue] = set()  # the response queues of the open ScoreStream calls
        self._warnings = RateLimitedLog(log)

    def close(self) -> None:
        """Shutting down: every ScoreStream ends once its requests in flight are answered (the scheduler
        answers new ones with UNAVAILABLE), so that the server can stop without waiting for idle streams."""
        self._closing = True
        for responses in self._streams:
            responses.put_nowait(_WAKE)

    def client(self, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        """(the identity that fairness and limits count a call against, its name in the metrics)."""
        metadata = context.invocation_metadata() or ()
        identity = client_identity(self._auth, metadata, context.peer())
        return identity, client_label(identity, dict(metadata).get(CLIENT_ID_KEY))

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return self._info

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        try:
            response, _ = await self._score(request, self.client(context), "Score")
        except ServiceError as error:
            await context.abort(error.code, str(error))
        return response

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Continuations of the request's prompts, each sent as soon as it is finished (:mod:`.generation`)."""
        try:
            async for response in self.generation.stream(request, self.client(context)[0]):
                yield response
        except ServiceError as error:
            await context.abort(error.code, str(error))

    async def ScoreStream(
        self, requests: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        """Every request is scored concurrently; responses go out as they complete, errors included."""
        client = self.client(context)
        # (response, release of its in-flight and compute slots), _WAKE, or None when the client is done sending
        responses: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self._stream_window)  # requests read whose responses are not sent yet
        computing = asyncio.Semaphore(self._stream_compute_window)  # of those, submitted to the scheduler
        in_flight: dict[str, asyncio.Task] = {}

        async def answer(request: pb.ScoreRequest) -> None:
            try:
                await computing.acquire()  # wait, read but not queued, until a computed response was sent
                try:
                    response, release = await self._score(request, client, "ScoreStream", hold_slot=True)
                except ServiceError as error:
                    response, release = _error_response(request.id, error), _nothing
                except BaseException:
                    computing.release()
                    raise
                responses.put_nowait((response, _both(release, computing.release)))
            finally:
                del in_flight[request.id]

        async def read() -> None:
            iterator = aiter(requests)
            try:
                while True:
                    await window.acquire()  # no room: stop reading, so HTTP/2 flow control stops the client
                    try:
                        request = await anext(iterator)
                    except StopAsyncIteration:
                        return
                    if isinstance(request, Malformed) or not request.id or request.id in in_flight:
                        error = self._refused(request, "ScoreStream", in_flight)
                        responses.put_nowait((_error_response(getattr(request, "id", ""), error), _nothing))
                        continue
                    in_flight[request.id] = asyncio.create_task(answer(request))
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        self._streams.add(responses)
        try:
            reading = True
            while (reading and not self._closing) or in_flight or not responses.empty():
                item = await responses.get()
                if item is None:
                    reading = False
                    reader.result()  # re-raise a failed read
                elif item is not _WAKE:
                    response, release = item
                    try:
                        yield response  # returns once gRPC took the message: flow control holds us here
                    finally:
                        release()
                        window.release()
        finally:
            self._streams.discard(responses)
            reader.cancel()
            for task in in_flight.values():
                task.cancel()
            while not responses.empty():  # answered but never sent: give their slots back
                item = responses.get_nowait()
                if isinstance(item, tuple):
                    item[1]()

    def _refused(self, request: pb.ScoreRequest | Malformed, rpc: str, in_flight) -> InvalidArgument:
        """The error of a stream request refused before parsing (malformed, no id, id in flight)."""
        if isinstance(request, Malformed):
            error = self._malformed(request)
        elif not request.id:
            error = InvalidArgument("id is empty: ScoreStream matches responses to requests by a unique id per "
                                    "request")
        else:
            error = InvalidArgument(f"id {request.id!r} is already in flight on this stream")
        self._count(rpc, error.code)
        return error

    def _malformed(self, request: Malformed) -> InvalidArgument:
        self._warnings.warning("malformed", "refused a message that is not a ScoreRequest: %s", request.reason)
        return InvalidArgument(f"the message is not a valid ScoreRequest ({request.reason})")

    async def _score(self, request: pb.ScoreRequest | Malformed, client: tuple[str, str], rpc: str,
                     hold_slot: bool = False) -> tuple[pb.ScoreResponse, Callable[[], None]]:
        """(the response, the release of its in-flight slot: a no-op unless ``hold_slot``). Every failure
        is a :class:`ServiceError`: an unexpected one is logged and becomes INTERNAL."""
        try:
            if isinstance(request, Malformed):
                raise self._malformed(request)
            job, codec = parse_request(request, self._limits)
            scored = await self._scheduler.submit(client[0], job, request.timeout_ms / 1000 or None,
                                                  hold_slot=hold_slot, label=client[1])
            try:
                _check_finite(scored.signal)
                response = pb.ScoreResponse(
                    id=request.id,
                    signal=encode_signal(scored.signal, codec, self._limits.vocab_size),
                    timing=pb.Timing(queue_ms=scored.queue_s * 1e3, compute_ms=scored.compute_s * 1e3,
                                     batch_tokens=scored.batch_tokens),
                    model_revision=self._info.model_revision,
                )  # fmt: skip
            except BaseException:
                scored.release()
                raise
        except ServiceError as error:
            self._count(rpc, error.code)
            raise
        except Exception as error:
            self._count(rpc, grpc.StatusCode.INTERNAL)
            cause = f"{type(error).__name__}"
            if self._warnings.allow(f"internal:{cause}")[0]:
                log.error("%s failed on request %r of %s (answered INTERNAL)", rpc, request.id, client[0],
                          exc_info=error)
            raise ServiceError(f"the teacher failed on this request: {cause}: {error}") from error
        self._count(rpc, grpc.StatusCode.OK)
        self._metrics.response_bytes.labels(codec).inc(response.ByteSize())
        return response, scored.release

    def _count(self, rpc: str, code: grpc.StatusCode) -> None:
        self._metrics.requests.labels(rpc, code.name).inc()


def _check_finite(signal: TeacherSignal) -> None:
    """Raise ValueError if a field of ``signal`` holds NaN or +-inf (-inf is allowed where it means log 0)."""
    for field in dataclasses.fields(signal):
        name, values = field.name, getattr(signal, field.name)
        if values is None or not values.is_floating_point():
            continue
        array = values.numpy()  # numpy, not torch: no OpenMP team on the event loop
        bad = np.isnan(array) | (array == np.inf)
        if name not in _MAY_BE_MINUS_INF:
            bad |= array == -np.inf
        if bad.any():
            raise ValueError(f"the teacher's signal holds non-finite values in {name}; refusing to send it")


def _error_response(request_id: str, error: ServiceError) -> pb.ScoreResponse:
    return pb.ScoreResponse(id=request_id, error=pb.Error(code=error.code.value[0], message=str(error)))
