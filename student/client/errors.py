"""How a failed teacher call reaches the student: :class:`TeacherError` with the call's gRPC status."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


class TeacherError(RuntimeError):
    """A teacher call failed; ``code`` is its gRPC status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def status_code(value: int) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` of a numeric status (as a stream response's ``error.code`` carries it)."""
    return _STATUS_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


@contextmanager
def teacher_errors() -> Iterator[None]:
    """gRPC errors raised inside become :class:`TeacherError` with the same status code."""
    try:
        yield
    except grpc.RpcError as error:
        raise TeacherError(error.code(), error.details() or "") from None
