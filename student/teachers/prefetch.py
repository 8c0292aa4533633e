"""Keep a teacher source busy on the next batches while the caller trains on the current one."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator

from atkd.student.data.lm import LMBatch
from atkd.student.losses import TeacherInput

from .source import Pending, TeacherSource


def prefetched(
    teacher: TeacherSource, batches: Iterable[tuple[LMBatch, int | None]], depth: int
) -> Iterator[tuple[LMBatch, TeacherInput, float]]:
    """``(batch, teacher output, seconds waited for it)`` for each ``(batch, seed)`` of ``batches``, in order.

    Batch n + depth is submitted before the wait for batch n, so while the caller works on batch n the
    teacher has batches n + 1 .. n + depth in flight; ``depth=0`` asks for each batch when it is needed.
    At most ``depth + 1`` batches and their signals are held. A batch that fails after its retries
    raises in its turn: no batch is skipped or reordered.
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    upcoming = iter(batches)
    queue: deque[tuple[LMBatch, Pending]] = deque()
    while True:
        while len(queue) <= depth:
            item = next(upcoming, None)
            if item is None:
                break
            queue.append((item[0], teacher.submit(*item)))
        if not queue:
            return
        batch, pending = queue.popleft()
        start = time.perf_counter()
        output = pending.result()
        yield batch, output, time.perf_counter() - start
