"""Errors that cross the wire as gRPC status codes with a human message (ARCHITECTURE.md, Conventions)."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request failed in a way the client should see: ``code`` and ``str(error)`` go on the wire."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """The request itself is wrong; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    """Backpressure: the queue or the client's in-flight budget is full; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The replica is shutting down; retry on another one."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The request waited longer than its ``timeout_ms`` and was dropped before being computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigError(ValueError):
    """A configuration no replica can serve (refused at start with this one-line message)."""
