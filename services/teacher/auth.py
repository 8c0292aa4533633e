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


UNAUTHENTICATED = "missing or wrong bearer token: send the metadata 'authorization: Bearer <token>'"


class BearerToken:
    """The replica's auth policy: a call is allowed when its metadata carries ``authorization: Bearer
    <token>`` (compared in constant time). Both transports ask it: the plain server through
    :class:`BearerTokenInterceptor`, the Ray Serve replica in each RPC method."""

    def __init__(self, token: str):
        self._expected = bearer(token).encode()

    @classmethod
    def from_config(cls, token_file: Path | None, token_env: str | None) -> BearerToken | None:
        """The policy of a config (None: no auth configured, every call allowed)."""
        token = load_token(token_file, token_env)
        return None if token is None else cls(token)

    def allows(self, metadata) -> bool:
        """``metadata``: the call's ``(key, value)`` pairs."""
        sent = dict(metadata or ()).get(AUTHORIZATION_KEY, "")
        return hmac.compare_digest(sent.encode(), self._expected)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only if ``policy`` allows it (health checks always pass)."""

    def __init__(self, policy: BearerToken):
        self._policy = policy

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHODS_PREFIX):
            return handler
        if self._policy.allows(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler)


async def _refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


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
