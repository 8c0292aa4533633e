"""A teacher server (one or more replicas) behind a :class:`~atkd.student.client.TeacherClient`, as a teacher source."""

from __future__ import annotations

from atkd.proto.alignment import join_window
from atkd.proto.signal import TeacherSignal
from atkd.student.client import PendingCall, TeacherClient
from atkd.student.data.lm import LMBatch

from .source import Deferred, TeacherSource


class RemoteTeacher(TeacherSource):
    """A teacher server: the batch goes out when submitted, so the teacher computes while the student trains.

    The request for ``batch`` is :func:`~atkd.proto.alignment.join_window` of its inputs and targets
    (T + 1 tokens, scored where the target is not ignored), so the signal of its first T positions comes
    back aligned with ``batch.targets [B, T]``.
    """

    def __init__(self, client: TeacherClient, top_k: int = 64, codec: str = "fp16", temperature: float = 1.0,
                 tail_samples: int = 0, tail_ids_only: bool = False):
        self.client = client
        self.options = dict(top_k=top_k, codec=codec, temperature=temperature, tail_samples=tail_samples,
                            tail_ids_only=tail_ids_only)

    def submit(self, batch: LMBatch, seed: int | None = None) -> RemoteResult:
        ids, score_mask = join_window(batch.input_ids, batch.targets)
        options = self.options if seed is None else {**self.options, "seed": seed % 2**64}
        return RemoteResult(self.client.score_async(ids, score_mask=score_mask, **options), batch.targets.shape[1])

    def close(self) -> None:
        self.client.close()


class RemoteResult(Deferred):
    """The signal ``[B, T]`` of a batch sent as T + 1 tokens; ``call`` is its :class:`PendingCall` (the replica
    it is on, its attempts so far)."""

    def __init__(self, call: PendingCall[TeacherSignal], length: int):
        super().__init__(lambda: call.result().map_tensors(lambda t: t[:, :length]))
        self.call = call
