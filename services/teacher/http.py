"""The HTTP side of a replica (FastAPI): liveness, readiness, Prometheus metrics and the Info as JSON.

It runs in the replica's own event loop (see :mod:`atkd.services.teacher.server`), so it reads the live
scheduler state directly. The endpoints carry no secrets and take no auth: keep the port internal.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST

from atkd.proto import teacher_pb2 as pb

from .metrics import TeacherMetrics

#: (ready, reason): reason says why not, e.g. "loading model", "queue saturated", "shutting down".
Readiness = Callable[[], tuple[bool, str]]


def create_app(readiness: Readiness, info: Callable[[], pb.InfoResponse | None], metrics: TeacherMetrics) -> FastAPI:
    app = FastAPI(title="atkd teacher", docs_url=None, redoc_url=None, openapi_url=None)

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
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def v1_info() -> JSONResponse:
        """The gRPC Info response as JSON (field names as in teacher.proto); 503 while the model loads."""
        message = info()
        if message is None:
            return JSONResponse({"error": "the model is loading"}, status_code=503)
        return JSONResponse(MessageToDict(message, preserving_proto_field_name=True,
                                          always_print_fields_with_no_presence=True))

    return app
