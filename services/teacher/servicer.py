"""The gRPC ``Teacher`` service: parse, submit to the scheduler, encode; nothing else happens here.

A client is identified by the metadata ``atkd-client-id`` (the Python client sends one per
``TeacherClient``), else by its connection's peer address; fairness and in-flight limits are per client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.codec import encode_signal
from atkd.proto.metadata import CLIENT_ID_KEY

from .errors import InvalidArgument, ServiceError
from .generation import GenerateService
from .metrics import TeacherMetrics
from .request import Limits, parse_request
from .scheduler import Scheduler

_WAKE = object()  # wakes a ScoreStream to check whether it should end


def client_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_KEY and value:
            return value
    return context.peer()


class TeacherServicer(pb_grpc.TeacherServicer):
    """Thin adapter between the wire and :class:`Scheduler`."""

    generation: GenerateService | None = None  # the Generate RPC's logic, set by the replica

    def __init__(self, info: pb.InfoResponse, limits: Limits, scheduler: Scheduler, metrics: TeacherMetrics):
        self._info = info
        self._limits = limits
        self._scheduler = scheduler
        self._metrics = metrics
        self._closing = False
        self._streams: set[asyncio.Queue] = set()  # the response queues of the open ScoreStream calls

    def close(self) -> None:
        """Shutting down: every ScoreStream ends once its requests in flight are answered (the scheduler
        answers new ones with UNAVAILABLE), so that the server can stop without waiting for idle streams."""
        self._closing = True
        for responses in self._streams:
            responses.put_nowait(_WAKE)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return self._info

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        try:
            return await self._score(request, client_id(context), "Score")
        except ServiceError as error:
            await context.abort(error.code, str(error))

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Continuations of the request's prompts, each sent as soon as it is finished (:mod:`.generation`)."""
        try:
            async for response in self.generation.stream(request, client_id(context)):
                yield response
        except ServiceError as error:
            await context.abort(error.code, str(error))

    async def ScoreStream(
        self, requests: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        """Every request is scored concurrently; responses go out as they complete, errors included."""
        client = client_id(context)
        responses: asyncio.Queue = asyncio.Queue()  # ScoreResponse, _WAKE, or None when the client is done
        in_flight: dict[str, asyncio.Task] = {}

        async def answer(request: pb.ScoreRequest) -> None:
            try:
                response = await self._score(request, client, "ScoreStream")
            except ServiceError as error:
                response = _error_response(request, error)
            del in_flight[request.id]
            responses.put_nowait(response)

        async def read() -> None:
            try:
                async for request in requests:
                    if not request.id or request.id in in_flight:
                        error = InvalidArgument(
                            f"id {request.id!r} is already in flight on this stream" if request.id else
                            "id is empty: ScoreStream matches responses to requests by a unique id per request")
                        self._count("ScoreStream", error.code)
                        responses.put_nowait(_error_response(request, error))
                        continue
                    in_flight[request.id] = asyncio.create_task(answer(request))
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        self._streams.add(responses)
        try:
            reading = True
            while (reading and not self._closing) or in_flight or not responses.empty():
                response = await responses.get()
                if response is None:
                    reading = False
                    reader.result()  # re-raise a failed read
                elif response is not _WAKE:
                    yield response
        finally:
            self._streams.discard(responses)
            reader.cancel()
            for task in in_flight.values():
                task.cancel()

    async def _score(self, request: pb.ScoreRequest, client: str, rpc: str) -> pb.ScoreResponse:
        try:
            job, codec = parse_request(request, self._limits)
            scored = await self._scheduler.submit(client, job, request.timeout_ms / 1000 or None)
        except ServiceError as error:
            self._count(rpc, error.code)
            raise
        response = pb.ScoreResponse(
            id=request.id,
            signal=encode_signal(scored.signal, codec, self._limits.vocab_size),
            timing=pb.Timing(queue_ms=scored.queue_s * 1e3, compute_ms=scored.compute_s * 1e3,
                             batch_tokens=scored.batch_tokens),
        )  # fmt: skip
        self._count(rpc, grpc.StatusCode.OK)
        self._metrics.response_bytes.labels(codec).inc(response.ByteSize())
        return response

    def _count(self, rpc: str, code: grpc.StatusCode) -> None:
        self._metrics.requests.labels(rpc, code.name).inc()


def _error_response(request: pb.ScoreRequest, error: ServiceError) -> pb.ScoreResponse:
    return pb.ScoreResponse(id=request.id, error=pb.Error(code=error.code.value[0], message=str(error)))
