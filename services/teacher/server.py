"""The plain entry point of a :class:`~.replica.Replica`: HTTP side and gRPC server in one process and one asyncio loop.

Start-up: the HTTP side opens first (``/healthz`` alive, ``/readyz`` 503 "loading model"), the model
loads on a worker thread, then the gRPC server opens with the Teacher service, the standard health
service (SERVING) and reflection. Shutdown (:meth:`TeacherServer.stop`, SIGTERM in :func:`run`): health
NOT_SERVING and ``/readyz`` 503 at once, the gRPC server stops accepting calls, queued and running
requests finish (new requests on open streams get UNAVAILABLE; a stream ends once its requests are
answered), and the process exits when every call has ended or ``grace_s`` ran out.

Why the HTTP side shares the process and the loop: readiness and metrics read the scheduler's live
state with no IPC, a replica stays a single process to deploy and probe, and probe and scrape traffic
is negligible next to the gRPC stream, so it does not disturb batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

import grpc
import torch
import transformers
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc

from .auth import BearerTokenInterceptor
from .config import TeacherConfig
from .engine import TeacherEngine
from .http import create_app
from .metrics import TeacherMetrics
from .ready import Ready, remove_ready, write_ready
from .replica import Replica

log = logging.getLogger(__name__)

TEACHER_SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name


def message_limits(config: TeacherConfig) -> tuple[int, int]:
    """(receive, send) gRPC message limits in bytes that fit the largest request and response the
    config allows: per token at most 16 request bytes (id, mask flag, length), and at most 6 bytes per
    top-k entry (int32 id, fp16 log-prob), 8 per tail sample (with a fp16 weight) plus 21 of scalars
    (with a tail count and a log-threshold) in the response."""
    slack = 1 << 16
    receive = 16 * config.max_batch_tokens + slack
    send = config.max_batch_tokens * (6 * config.top_k_max + 8 * config.max_tail_samples + 21) + slack
    return receive, send


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: signals belong to the host process (see :func:`run`), not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class TeacherServer:
    """The plain gRPC + HTTP entry point of a :class:`Replica`. ``load_engine`` replaces the engine
    loading of :meth:`Replica.load` (tests inject engines)."""

    def __init__(self, config: TeacherConfig, load_engine: Callable[[], TeacherEngine] | None = None):
        self.config = config
        self.metrics = TeacherMetrics()
        self._load_engine = load_engine
        self._phase = "loading model"
        self.replica: Replica | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self.grpc_port: int | None = None
        self.http_port: int | None = None

    @property
    def info(self) -> pb.InfoResponse | None:
        return self.replica.info if self.replica else None

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): serving, and the queue has room for a full batch."""
        if self._phase != "serving":
            return False, self._phase
        if self.replica.scheduler.saturated:
            return False, "queue saturated"
        return True, "serving"

    async def start(self) -> None:
        """Open the HTTP side, load the model, open the gRPC side; returns when the replica serves."""
        await self._start_http()
        replica = await Replica.load(self.config, self.metrics, self._load_engine)
        if self._phase != "loading model":  # stopped while loading
            return
        self.replica = replica
        replica.start()
        await self._start_grpc()
        self._phase = "serving"
        info = replica.info
        log.info("atkd-teacher serving %s (V=%d, %s on %s): gRPC on %s:%d, HTTP on %s:%d", info.model_id,
                 info.vocab_size, info.dtype, info.device, self.config.host, self.grpc_port,
                 self.config.host, self.http_port)
        if self.config.ready_file is not None:
            write_ready(self.config.ready_file, Ready(pid=os.getpid(), host=self.config.host, grpc_port=self.grpc_port,
                                                      http_port=self.http_port, model_id=info.model_id))

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: refuse new work, finish what is in flight (up to ``grace`` s), then close."""
        if self._phase == "shutting down":
            await self._stopped.wait()
            return
        self._phase = "shutting down"
        remove_ready(self.config.ready_file)
        grace = self.config.grace_s if grace is None else grace
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            self.replica.close()
            # Refuses new calls at once; returns when the open ones are done (Score calls and streams
            # once answered), or cancels them after the grace period. One stop() call: two concurrent
            # ones crash grpcio 1.85 now and then.
            await self._grpc.stop(grace)
            await self.replica.stop()
        if self._http is not None:
            self._http.should_exit = True
            await self._http_task
        self._stopped.set()
        log.info("atkd-teacher stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _start_http(self) -> None:
        app = create_app(self.readiness, lambda: self.info, self.metrics)
        config = uvicorn.Config(app, host=self.config.host, port=self.config.http_port, log_config=None,
                                access_log=False, lifespan="off")
        sock = config.bind_socket()
        self.http_port = sock.getsockname()[1]
        self._http = _EmbeddedUvicorn(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="teacher-http")
        while not self._http.started:  # uvicorn has no start-up event to await
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)

    async def _start_grpc(self) -> None:
        config, replica = self.config, self.replica
        receive, send = message_limits(config)
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(replica.auth)] if replica.auth else None,
            options=[("grpc.max_receive_message_length", receive), ("grpc.max_send_message_length", send),
                     # accept the clients' keepalive pings (every 30 s by default) even while a batch computes
                     ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                     ("grpc.keepalive_permit_without_calls", 1)],
        )
        pb_grpc.add_TeacherServicer_to_server(replica.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for service in ("", TEACHER_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((TEACHER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host = f"[{config.host}]" if ":" in config.host else config.host
        if config.tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            self.grpc_port = server.add_secure_port(f"{host}:{config.port}", credentials)
        else:
            self.grpc_port = server.add_insecure_port(f"{host}:{config.port}")
        await server.start()
        self._grpc = server


def run(config: TeacherConfig) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (the CLI's ``serve``)."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.disable_progress_bar()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    asyncio.run(_serve(config))


async def _serve(config: TeacherConfig) -> None:
    server = TeacherServer(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(server.stop()))
    await server.start()
    await server.wait_stopped()
