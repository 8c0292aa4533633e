"""Teacher sources: one interface, three places the signal comes from.

- :class:`LocalTeacher`: the teacher model in this process; dense logits ``[B, T, V]`` or, with
  ``top_k`` set, the compressed :class:`TeacherSignal`.
- :class:`RemoteTeacher`: a teacher server (one or more replicas) behind a
  :class:`~atkd.student.client.TeacherClient`.
- :class:`~atkd.student.signal_cache.CachedTeacher`: signals exported to disk earlier.

Each is called as ``teacher(batch, seed=None)``, or ``teacher.submit(batch, seed=None).result()`` when
the caller wants to start the work early (a remote teacher computes while the student trains;
the others compute or read when the result is asked for). ``seed`` fixes the tail samples of the
batch, so that a batch scored twice (e.g. after resuming from a checkpoint) gets the same signal.
The losses cannot tell the sources apart. :func:`prefetched` keeps a source busy on the next batches
while the caller trains on the current one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch
from transformers import PreTrainedModel

from atkd.proto.signal import IGNORE_INDEX, TeacherSignal, compress
from atkd.student.client import TeacherClient
from atkd.student.data.lm import LMBatch

TeacherOutput = torch.Tensor | TeacherSignal


class Pending(Protocol):
    def result(self) -> TeacherOutput: ...


class Deferred:
    """A result computed when it is first asked for."""

    def __init__(self, compute: Callable[[], TeacherOutput]):
        self._compute = compute

    def result(self) -> TeacherOutput:
        return self._compute()


class TeacherSource:
    """Base of the sources: ``__call__`` is ``submit(...).result()``."""

    def submit(self, batch: LMBatch, seed: int | None = None) -> Pending:
        raise NotImplementedError

    def __call__(self, batch: LMBatch, seed: int | None = None) -> TeacherOutput:
        return self.submit(batch, seed).result()

    def close(self) -> None:
        """Release connections or files (a no-op by default)."""


class LocalTeacher(TeacherSource):
    """The teacher model in this process.

    Args:
        model: a causal LM (eval mode, no grad).
        top_k: None for dense logits, else the k of the compressed signal.
        temperature: softmax temperature of the signal (dense logits are divided by it too).
        tail_samples: tokens drawn from the teacher's tail per position (compressed only).
        seed: seed of the tail-sampling generator used by calls that pass no seed of their own.
    """

    def __init__(self, model: PreTrainedModel, top_k: int | None = None, temperature: float = 1.0,
                 tail_samples: int = 0, seed: int = 0):
        if tail_samples and top_k is None:
            raise ValueError("tail_samples needs a compressed signal (set top_k)")
        self.model = model.eval()
        self.top_k = top_k
        self.temperature = temperature
        self.tail_samples = tail_samples
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def submit(self, batch: LMBatch, seed: int | None = None) -> Deferred:
        return Deferred(lambda: self.score(batch, seed))

    @torch.no_grad()
    def score(self, batch: LMBatch, seed: int | None = None) -> TeacherOutput:
        logits = self.model(batch.input_ids.to(self.device)).logits
        if self.top_k is None:
            return logits.float() / self.temperature
        generator = self.generator if seed is None else torch.Generator(self.device).manual_seed(seed)
        return compress(logits, batch.targets.to(self.device), self.top_k, self.temperature,
                        tail_samples=self.tail_samples, generator=generator)


class RemoteTeacher(TeacherSource):
    """A teacher server behind a :class:`~atkd.student.client.TeacherClient`.

    The server scores position t of a sequence with target ``ids[t + 1]``, so the batch goes out as
    ``input_ids`` plus the window's last target (T + 1 tokens) with ``score_mask`` = targets != -100,
    and the signal of the first T positions comes back aligned with ``targets [B, T]``.
    """

    def __init__(self, client: TeacherClient, top_k: int = 64, codec: str = "fp16", temperature: float = 1.0,
                 tail_samples: int = 0):
        self.client = client
        self.options = dict(top_k=top_k, codec=codec, temperature=temperature, tail_samples=tail_samples)

    @staticmethod
    def request_of(batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids ``[B, T + 1]``, score_mask ``[B, T + 1]``) of the request for ``batch``."""
        has_target = batch.targets != IGNORE_INDEX
        last = batch.targets[:, -1:].clamp(min=0)  # an ignored last target is never scored
        ids = torch.cat([batch.input_ids, last], dim=1)
        mask = torch.cat([has_target, torch.zeros_like(has_target[:, :1])], dim=1)
        return ids, mask

    def submit(self, batch: LMBatch, seed: int | None = None) -> Deferred:
        ids, mask = self.request_of(batch)
        options = self.options if seed is None else {**self.options, "seed": seed % 2**64}
        pending = self.client.score_async(ids, score_mask=mask, **options)
        length = batch.targets.shape[1]
        return Deferred(lambda: pending.result().map_tensors(lambda t: t[:, :length]))

    def close(self) -> None:
        self.client.close()


def prefetched(
    teacher: TeacherSource, batches: Iterable[tuple[LMBatch, int | None]], depth: int
) -> Iterator[tuple[LMBatch, TeacherOutput, float]]:
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
