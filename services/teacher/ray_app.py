"""The teacher as a Ray Serve application: the plain replica's engine, scheduler and servicer behind Serve's gRPC proxy.

A Serve replica (:class:`TeacherReplica`) holds what one ``atkd-teacher serve`` process holds, minus the
network: the :class:`~atkd.services.teacher.engine.TeacherEngine` (on the GPU that ``ray_actor_options:
num_gpus`` gives it), the cross-client :class:`~atkd.services.teacher.scheduler.Scheduler` and the
:class:`~atkd.services.teacher.servicer.TeacherServicer`. Serve's gRPC proxy, started with
``atkd.proto.teacher_pb2_grpc.add_TeacherServicer_to_server``, accepts ``atkd.teacher.v1.Teacher`` calls, picks
the application from the ``application`` metadata (``TeacherClient(..., application=...)``) and a replica
by Serve's router, and calls the replica's method of the RPC's name (``Info``, ``Score``, ``ScoreStream``,
``Generate``)
with the request message. Status codes: the servicer's errors (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED, UNAVAILABLE) are set on Serve's ``grpc_context``, which the proxy copies onto the
client's call, so a caller sees the same code and message as from the plain server.

Batching: the project's Scheduler inside each replica, not ``@serve.batch``. Measured with
``python -m bench.ray_throughput`` (docs/benchmarks.md, "Teacher on Ray Serve"), the Scheduler serves
0.99x the plain server's tokens/s at saturation on CPU and ``@serve.batch`` 0.91x (292 and 305 CPU ms per
1000 tokens: the forward dominates either way), and the Scheduler keeps what ``@serve.batch`` lacks:
a batch budget in tokens rather than in requests (``max_batch_size`` requests of up to
``max_batch_tokens`` each can make a batch many times the budget), fairness between student jobs
(deficit round-robin by tokens), per-client in-flight limits and queue bounds answered with
RESOURCE_EXHAUSTED, and ``timeout_ms`` deadlines, all already tested. Serve's router only chooses the
replica; ``max_ongoing_requests`` must leave room for a few batches per replica so that requests wait in
the Scheduler's fair queues, not in Serve's.

Configuration: :func:`build_app` takes the fields of :class:`~atkd.services.teacher.config.TeacherConfig` as
its ``args`` (validated by it); the fields about the network (``host``, ``port``, ``http_port``, TLS) are
Serve's business (``grpc_options``, ``http_options``) and ignored here. Serve's gRPC proxy has no TLS,
so TLS is refused; bearer-token auth is checked in the replica.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import ray
import torch
import transformers
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from atkd.proto import teacher_pb2 as pb

from .auth import UNAUTHENTICATED
from .config import TeacherConfig
from .ready import Ready, remove_ready, write_ready
from .replica import Replica

log = logging.getLogger(__name__)

APP_NAME = "atkd-teacher"
ROUTE_PREFIX = "/atkd-teacher"
GRPC_SERVICER_FUNCTIONS = ["atkd.proto.teacher_pb2_grpc.add_TeacherServicer_to_server"]


class _Aborted(Exception):
    """Raised by :meth:`_ServeContext.abort` to end a handler whose status is set on Serve's context."""


class _ServeContext:
    """The part of ``grpc.aio.ServicerContext`` that :class:`TeacherServicer` uses, on Serve's context.

    ``abort`` sets the code and message on Serve's context, which the proxy copies onto the client's
    call; the replica then answers an empty message that the client never sees (its status is not OK).
    """

    def __init__(self, context: RayServegRPCContext | None):
        self._context = context

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._context.invocation_metadata() if self._context else []

    def peer(self) -> str:
        return self._context.peer() if self._context else "deployment-handle"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        if self._context is not None:
            self._context.set_code(code)
            self._context.set_details(details)
        raise _Aborted(f"{code.name}: {details}")


class TeacherReplica:
    """One Serve replica: a :class:`Replica`, with methods named after the RPCs (Serve's proxy calls them)."""

    async def __init__(self, config: dict[str, Any]):
        config = TeacherConfig(**config)
        transformers.utils.logging.disable_progress_bar()  # replica logs go to the driver and Ray's log files
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.replica = await Replica.load(config)
        self.replica.start()

    async def Info(self, request: pb.InfoRequest, grpc_context: RayServegRPCContext | None = None) -> pb.InfoResponse:
        context = _ServeContext(grpc_context)
        try:
            await self._authenticate(context)
        except _Aborted:
            return pb.InfoResponse()
        return self.replica.info

    async def Score(self, request: pb.ScoreRequest,
                    grpc_context: RayServegRPCContext | None = None) -> pb.ScoreResponse:
        context = _ServeContext(grpc_context)
        try:
            await self._authenticate(context)
            return await self.replica.servicer.Score(request, context)
        except _Aborted:
            return pb.ScoreResponse()

    async def ScoreStream(self, requests: AsyncIterator[pb.ScoreRequest],
                          grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.ScoreResponse]:
        context = _ServeContext(grpc_context)
        try:
            await self._authenticate(context)
        except _Aborted:
            return
        async for response in self.replica.servicer.ScoreStream(requests, context):
            yield response

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.GenerateResponse]:
        context = _ServeContext(grpc_context)
        try:
            await self._authenticate(context)
            async for response in self.replica.servicer.Generate(request, context):
                yield response
        except _Aborted:
            # Serve's proxy copies a server-streaming call's status from the context of a yielded message
            # only: one empty response carries it (the client then sees the error status).
            yield pb.GenerateResponse()

    def stats(self) -> dict[str, Any]:
        """This replica's id, process and Score requests answered by status code (from its metrics)."""
        answered = {}
        for family in self.replica.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == "atkd_teacher_requests_total":
                    key = f"{sample.labels['rpc']}/{sample.labels['code']}"
                    answered[key] = answered.get(key, 0) + int(sample.value)
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(), "answered": answered}

    async def __del__(self) -> None:
        """Serve stops a replica once its ongoing requests are done (or its graceful timeout ran out)."""
        self.replica.close()
        await self.replica.stop()

    async def _authenticate(self, context: _ServeContext) -> None:
        policy = self.replica.auth
        if policy is not None and not policy.allows(context.invocation_metadata()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


#: The deployment's defaults; the ``deployments:`` section of a Serve config file overrides any of them.
TeacherDeployment = serve.deployment(
    TeacherReplica,
    name="Teacher",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_timeout_s=30,
)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (``import_path: atkd.services.teacher.ray_app:build_app``): ``args`` holds
    :class:`TeacherConfig` fields, e.g. ``{"model": "/models/teacher", "max_batch_tokens": 8192}``."""
    return application(TeacherConfig(**args))


def application(config: TeacherConfig, **deployment_options: Any) -> serve.Application:
    """The teacher deployment bound to ``config``; ``deployment_options`` override the defaults
    (``num_replicas``, ``ray_actor_options``, ...)."""
    if config.tls_cert is not None:
        raise ValueError("Serve's gRPC proxy serves plaintext only: terminate TLS in front of it (e.g. an ingress)")
    options = {"graceful_shutdown_timeout_s": config.grace_s, **deployment_options}
    return TeacherDeployment.options(**options).bind(config.model_dump(mode="json"))


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run(config: TeacherConfig) -> None:
    """``atkd-teacher serve --backend ray``: a local Ray, one replica, Serve's gRPC proxy on ``port`` and its
    HTTP proxy on ``http_port``; SIGTERM or SIGINT shuts Serve and Ray down."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = config.port or free_port(config.host)
    http_port = config.http_port or free_port(config.host)
    # Serve's proxy imports the generated servicer function by name: Ray's worker processes run this
    # interpreter, so they find the installed `atkd` package as this process does.
    cpus = config.threads or os.cpu_count()
    app = application(config, ray_actor_options={"num_cpus": cpus})
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=config.log_level.upper())
    try:
        serve.start(http_options={"host": config.host, "port": http_port},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        handle = serve.run(app, name=APP_NAME, route_prefix=ROUTE_PREFIX)
        info = handle.Info.remote(pb.InfoRequest()).result()
        # The gRPC proxy binds every interface whatever config.host says.
        log.info("atkd-teacher serving %s (V=%d, %s on %s): gRPC on %s:%d, HTTP on %s:%d", info.model_id,
                 info.vocab_size, info.dtype, info.device, "[::]", port, config.host, http_port)
        if config.ready_file is not None:
            write_ready(config.ready_file, Ready(pid=os.getpid(), host=config.host, grpc_port=port,
                                                 http_port=http_port, model_id=info.model_id))
        _wait_for_signal()
        remove_ready(config.ready_file)
        serve.shutdown()
    finally:
        remove_ready(config.ready_file)
        ray.shutdown()
    log.info("atkd-teacher stopped")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()

