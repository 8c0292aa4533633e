"""The interface every teacher source implements: ``submit(batch, seed)`` now, ``.result()`` when needed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from atkd.student.data.lm import LMBatch
from atkd.student.losses import TeacherInput


class Pending(Protocol):
    """A teacher's answer for one batch, possibly still being computed."""

    def result(self) -> TeacherInput: ...


class Deferred:
    """A result computed when it is first asked for."""

    def __init__(self, compute: Callable[[], TeacherInput]):
        self._compute = compute

    def result(self) -> TeacherInput:
        return self._compute()


class TeacherSource:
    """Base of the sources: :meth:`submit` starts the work on a batch, ``__call__`` is ``submit(...).result()``.

    ``seed`` fixes the tail samples of the batch, so that a batch scored twice (e.g. after resuming from a
    checkpoint) gets the same signal. The output is a :data:`~atkd.student.losses.TeacherInput` over the
    batch's positions ``[B, T]``, aligned with ``batch.targets``.
    """

    def submit(self, batch: LMBatch, seed: int | None = None) -> Pending:
        raise NotImplementedError

    def __call__(self, batch: LMBatch, seed: int | None = None) -> TeacherInput:
        return self.submit(batch, seed).result()

    def close(self) -> None:
        """Release connections or files (a no-op by default)."""
