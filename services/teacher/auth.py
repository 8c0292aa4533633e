"""Optional bearer-token authentication of the gRPC side.

Clients send the metadata ``authorization: Bearer <token>``; any other call gets UNAUTHENTICATED.
The health service stays open so that load balancers and Kubernetes probes need no secret.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from atkd.proto.metadata import AUTHORIZATION_KEY, bearer

OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"


def load_token(token_file: Path | None = None, token_env: str | None = None) -> str | None:
    """The token from a file (surrounding whitespace stripped) or an environment variable; None if neither."""
    if token_file is not None:
        token = Path(token_file).read_text().strip()
        source = str(token_file)
    elif token_env is not None:
        token = os.environ.get(token_env, "").strip()
        source = f"${token_env}"
    else:
        return None
    if not token:
        raise ValueError(f"the auth token in {source} is empty")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>`` (health checks always pass)."""

    def __init__(self, token: str):
        self._expected = bearer(token).encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHODS_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if hmac.compare_digest(metadata.get(AUTHORIZATION_KEY, "").encode(), self._expected):
            return handler
        return _refusing(handler)


async def _refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or wrong bearer token: send the metadata 'authorization: Bearer <token>'")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts every call with UNAUTHENTICATED."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(_refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
