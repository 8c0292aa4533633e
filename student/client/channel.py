"""The gRPC channel to one or more teacher replicas: target, load balancing, retries, keepalive, TLS.

``address`` is one endpoint (``host:port``, ``dns:///name:port`` whose resolver returns every replica
behind the name, e.g. a Kubernetes headless Service, or ``unix:...``) or a list of ``host:port``.
Calls are balanced over the resolved replicas with gRPC's ``round_robin`` policy. Every Teacher method is
idempotent (a score is a pure function of the request, tail samples included when a seed is sent), so
gRPC itself retries it on :data:`RETRYABLE` codes through the channel's service config, and the retry
lands on another replica when one is down.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc

from atkd.proto import teacher_pb2 as pb

TEACHER_SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
#: Failures worth another attempt: the replica is gone or restarting, or it sheds load.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def service_config(max_attempts: int = 5) -> dict:
    """The channel's service config: round_robin over every resolved replica, and gRPC retries (at most
    5 attempts, gRPC's cap; exponential backoff from 0.1 s to 2 s) of every Teacher method on
    :data:`RETRYABLE` codes. A retry picks the next replica, so a dead one costs one failed attempt."""
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": TEACHER_SERVICE}],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                            "backoffMultiplier": 2, "retryableStatusCodes": sorted(c.name for c in RETRYABLE)},
        }],
    }  # fmt: skip


def channel_target(address: str | Sequence[str]) -> str:
    """The gRPC target for one or more replicas.

    One address is used as given (``host:port``, ``dns:///name:port``, ``unix:...``). Several become
    one ``ipv4:`` or ``ipv6:`` target listing them all; host names among them are resolved here, once.
    """
    addresses = [address] if isinstance(address, str) else list(address)
    if not addresses:
        raise ValueError("no teacher address given")
    if len(addresses) == 1:
        return addresses[0]
    resolved = []
    for entry in addresses:
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"teacher address {entry!r} must be host:port when several are given")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0])
        resolved.append((ip, int(port)))
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ValueError(f"teacher addresses mix IPv4 and IPv6: {addresses}")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in resolved)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in resolved)


def open_channel(address: str | Sequence[str], *, tls_root_cert: Path | bytes | bool | None = None,
                 tls_client_cert: tuple[Path | bytes, Path | bytes] | None = None,
                 keepalive_s: float = 30.0, retries: bool = True) -> grpc.Channel:
    """A channel to ``address`` with :func:`service_config`, unlimited message sizes and HTTP/2 keepalive
    pings every ``keepalive_s`` (so that a replica that vanished without closing its connection is noticed).
    A lost connection is retried after at most 5 s (gRPC's default backs off to 120 s), so a restarted
    replica is found soon. ``retries=False`` turns gRPC's retries off (for a caller that fails over itself).
    ``tls_root_cert``: PEM (a path or bytes) of the CA to trust, or True for the system roots, to connect
    over TLS; None or False for a plain connection. ``tls_client_cert``: PEM (paths or bytes) of this
    client's (certificate chain, private key), for a teacher that requires client certificates (mTLS)."""
    # a connection of its own (gRPC would share one between channels of equal options in a process): the
    # teacher tells clients apart by connection when they carry no token of their own
    options = [("grpc.use_local_subchannel_pool", 1),
               ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
               ("grpc.service_config", json.dumps(service_config())), ("grpc.enable_retries", int(retries)),
               ("grpc.keepalive_time_ms", int(keepalive_s * 1000)), ("grpc.keepalive_timeout_ms", 10_000),
               ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5_000)]
    target = channel_target(address)
    if not tls_root_cert:
        return grpc.insecure_channel(target, options)
    roots = None if tls_root_cert is True else _pem(tls_root_cert)
    chain, key = (None, None) if tls_client_cert is None else map(_pem, tls_client_cert)
    credentials = grpc.ssl_channel_credentials(roots, private_key=key, certificate_chain=chain)
    return grpc.secure_channel(target, credentials, options)


def _pem(source: Path | bytes) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()
