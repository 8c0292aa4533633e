"""The HTTP side of a replica (FastAPI): liveness, readiness, Prometheus metrics and the Info as JSON.

It runs in the replica's own event loop (see :mod:`atkd.services.teacher.server`), so it reads the live
scheduler state directly. ``/healthz`` and ``/readyz`` are open (probes carry no secret); when the replica
requires auth, ``/v1/info`` and ``/metrics`` want the same ``Authorization: Bearer <token>`` header as the
gRPC side (401 otherwise), ``/metrics`` only unless ``metrics_public``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST

from atkd.proto import teacher_pb2 as pb

from .auth import UNAUTHENTICATED
from .metrics import TeacherMetrics

#: (ready, reason): reason says why not, e.g. "loading model", "queue saturated", "shutting down".
Readiness = Callable[[], tuple[bool, str]]
#: Whether a request with these (lower-case) headers may read what needs auth.
Authorize = Callable[[Iterable[tuple[str, str]]], bool]


def create_app(readiness: Readiness, info: Callable[[], pb.InfoResponse | None], metrics: TeacherMetrics,
               authorize: Authorize = lambda headers: True, metrics_public: bool = False) -> FastAPI:
    app = FastAPI(title="atkd teacher", docs_url=None, redoc_url=None, openapi_url=None)

    def refused(request: Request) -> JSONResponse | None:
        if authorize(request.headers.items()):
            return None
        return JSONResponse({"error": UNAUTHENTICATED.replace("metadata", "header")}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is alive and its event loop answers."""
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 when the model is loaded, the queue has room and the replica is not shutting down; else 503."""
        ready, reason = readiness()
        return JSONResponse({"ready": ready, "reason": reason}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not metrics_public and (refusal := refused(request)) is not None:
            return refusal
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def v1_info(request: Request) -> JSONResponse:
        """The gRPC Info response as JSON (field names as in teacher.proto); 503 while the model loads."""
        if (refusal := refused(request)) is not None:
            return refusal
        message = info()
        if message is None:
            return JSONResponse({"error": "the model is loading"}, status_code=503)
        return JSONResponse(MessageToDict(message, preserving_proto_field_name=True,
                                          always_print_fields_with_no_presence=True))

    return app
