"""A Score call in flight, retried with backoff until a replica answers or the retry budget is spent.

gRPC already retries a call a few times across replicas (:func:`~atkd.student.client.channel.service_config`);
on top of that :class:`PendingScore` keeps retrying for ``retry_budget`` seconds, so a student outlives a
teacher restart and fails with a clear error only when no replica came back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from atkd.proto.codec import decode_signal
from atkd.proto.signal import TeacherSignal

from .batch import ScoreBatch
from .channel import RETRYABLE
from .errors import TeacherError


class PendingScore:
    """A Score call in flight; :meth:`result` waits for it, retrying :data:`RETRYABLE` failures.

    ``call()`` starts one attempt and returns its ``grpc.Future``; ``address`` names the teacher in errors.
    """

    def __init__(self, call: Callable[[], grpc.Future], batch: ScoreBatch, retry_budget: float, address: str):
        self._call = call
        self._batch = batch
        self._budget = retry_budget
        self._address = address
        self._future = call()
        self.attempts = 1

    def result(self) -> TeacherSignal:
        """The signal ``[B, T]``; retries with backoff (0.2 s doubling to 5 s) until ``retry_budget`` s
        after the first failure, then raises :class:`TeacherError` with the last status."""
        give_up_at, backoff = None, 0.2
        while True:
            try:
                response = self._future.result()
                return self._batch.unpack(decode_signal(response.signal))
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
            now = time.monotonic()
            give_up_at = give_up_at or now + self._budget
            if code not in RETRYABLE or now + backoff > give_up_at:
                if code in RETRYABLE:
                    details = (f"no teacher replica at {self._address} answered for {self._budget:.0f} s "
                               f"({self.attempts} attempts); last error: {details}")
                raise TeacherError(code, details)
            time.sleep(backoff)
            backoff = min(2 * backoff, 5.0)
            self._future = self._call()
            self.attempts += 1

    def cancel(self) -> None:
        self._future.cancel()
