"""Optional bearer-token authentication, and who a caller is.

Clients send the metadata (or HTTP header) ``authorization: Bearer <token>``; any other call gets
UNAUTHENTICATED. The health service stays open so that load balancers and Kubernetes probes need no secret.

Two kinds of tokens: one shared token (``auth_token_file`` / ``auth_token_env``) that lets a caller in,
and a tokens file (``auth_tokens_file``, YAML ``client name: token``) whose every token also names its
client. Fairness and in-flight limits are per client, and a client is (:func:`client_identity`):
the name of its token when it sent a named one, else its connection (the transport's peer, e.g.
``ipv4:10.0.0.7:51234``). The ``atkd-client-id`` metadata only names the client in the metrics: it
neither escapes nor spends another client's limits.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc
import yaml

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


def load_tokens(tokens_file: Path) -> dict[str, str]:
    """``{token: client name}`` of a YAML file of ``client name: token`` lines; refuses empty or shared tokens."""
    entries = yaml.safe_load(Path(tokens_file).read_text()) or {}
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{tokens_file}: expected a mapping of client name: token")
    tokens: dict[str, str] = {}
    for name, token in entries.items():
        token = str(token or "").strip()
        if not token:
            raise ValueError(f"{tokens_file}: the token of client {name!r} is empty")
        if token in tokens:
            raise ValueError(f"{tokens_file}: clients {tokens[token]!r} and {name!r} share a token")
        tokens[token] = str(name)
    return tokens


UNAUTHENTICATED = "missing or wrong bearer token: send the metadata 'authorization: Bearer <token>'"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class BearerToken:
    """The replica's auth policy: a call is allowed when its metadata carries ``authorization: Bearer
    <token>`` of a known token. Tokens are looked up by their sha256, so the comparison takes the same
    time whatever the token sent. Both transports ask it: the plain server through
    :class:`BearerTokenInterceptor` and the HTTP side, the Ray Serve replica in each RPC method.

    ``tokens``: ``{token: client name}``, the name None for a shared token that names nobody."""

    def __init__(self, tokens: str | Mapping[str, str | None]):
        if isinstance(tokens, str):
            tokens = {tokens: None}
        self._names = {_digest(bearer(token)): name for token, name in tokens.items()}

    @classmethod
    def from_config(cls, token_file: Path | None, token_env: str | None,
                    tokens_file: Path | None = None) -> BearerToken | None:
        """The policy of a config (None: no auth configured, every call allowed)."""
        if tokens_file is not None:
            return cls(load_tokens(tokens_file))
        token = load_token(token_file, token_env)
        return None if token is None else cls(token)

    def allows(self, metadata: Iterable[tuple[str, str]] | None) -> bool:
        """``metadata``: the call's ``(key, value)`` pairs (keys lower case, as gRPC and HTTP/2 send them)."""
        return _digest(_authorization(metadata)) in self._names

    def client_name(self, metadata: Iterable[tuple[str, str]] | None) -> str | None:
        """The name of the client whose token ``metadata`` carries (None: no named token)."""
        return self._names.get(_digest(_authorization(metadata)))


def _authorization(metadata: Iterable[tuple[str, str]] | None) -> str:
    value = dict(metadata or ()).get(AUTHORIZATION_KEY, "")
    return value if isinstance(value, str) else ""


def client_identity(policy: BearerToken | None, metadata: Iterable[tuple[str, str]] | None, peer: str) -> str:
    """Who a call is for fairness and limits: ``token:<name>`` for a named token, else ``peer`` (the connection)."""
    name = policy.client_name(metadata) if policy is not None else None
    return f"token:{name}" if name is not None else peer


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
    """A handler of the same kind as ``handler`` that aborts every call with UNAUTHENTICATED, without
    decoding its request (no deserializer: an unauthenticated caller's bytes are never parsed)."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(_refuse, request_deserializer=None, response_serializer=handler.response_serializer)
