"""How a failed teacher call reaches the student: :class:`TeacherError` with the call's gRPC status."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


class TeacherError(RuntimeError):
    """A teacher call failed; ``code`` is its gRPC status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...).

    ``checkpoint``: set by the trainer when it saved one on the way out (the run resumes from it)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.checkpoint: Path | None = None


class TeacherRevisionError(TeacherError):
    """A replica answered with another model revision than the one this client pinned (one run, one teacher)."""

    def __init__(self, pinned: str, received: str, source: str):
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION,
                         f"{source} serves teacher revision {received}, but this run is pinned to revision {pinned}: "
                         "a replica was swapped to another model mid-run. Point the run at replicas of one revision, "
                         "or allow the change (teacher.allow_revision_change / allow_revision_change=True)")
        self.pinned = pinned
        self.received = received


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
