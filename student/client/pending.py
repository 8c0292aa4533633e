"""A teacher call in flight, failed over to another replica or retried with backoff until one answers.

Each attempt has its own deadline (the client's ``timeout``), so a replica that hangs (stopped, wedged,
or too slow) costs one attempt, not the batch. An attempt that fails with a :data:`FAILOVER` status is
started again at once on a healthy replica the call has not tried since its last backoff; when there is
none, after a backoff (0.2 s doubling to 5 s). The failed replica is ejected for a while
(:class:`~.replicas.Replicas`), so the calls after it go elsewhere. Once ``retry_budget`` seconds have
passed since the call's first failure and no replica answered, :meth:`PendingCall.result` raises a
:class:`TeacherError` that names the replicas and the budget. A replica's answer is the same as any
other's (a score is a pure function of the request, tail samples included when a seed is sent), so a
retried batch gets the signal its first attempt would have got.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc

from .channel import RETRYABLE
from .errors import TeacherError
from .replicas import Endpoint, Replicas

log = logging.getLogger(__name__)

#: Failures that move a call to another replica: gRPC's retryable codes, a deadline that fired (a hung or
#: too slow replica), and a cancellation the client did not ask for (a replica shutting down cancels the
#: calls that reach it after its SIGTERM). Every Teacher method is idempotent: a second attempt is safe.
FAILOVER = RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.2, 5.0

T = TypeVar("T")


class Failover:
    """Where a call goes after each failure: another healthy replica it has not tried since its last backoff,
    or, when there is none, the best one after a backoff (0.2 s doubling to 5 s), until ``budget`` seconds
    have passed since the call's first failure. Shared by the unary calls (:class:`PendingCall`) and the
    streams (:mod:`.stream`). ``what`` names the call in logs and errors."""

    def __init__(self, replicas: Replicas, first: Endpoint, budget: float, what: str):
        self._replicas = replicas
        self._budget = budget
        self._what = what
        self._tried = {first}
        self._backoff = FIRST_BACKOFF_S
        self._started_failing: float | None = None
        self.attempts = 1

    def next(self, failed: Endpoint, code: grpc.StatusCode, details: str) -> Endpoint:
        """The replica of the next attempt after ``failed`` ended with ``code``; ejects ``failed``, may sleep
        for the backoff, and raises :class:`TeacherError` (with the last status) once the budget is spent."""
        ejected_s = self._replicas.failed(failed)
        now = time.monotonic()
        self._started_failing = self._started_failing or now
        endpoint, fresh = self._replicas.pick(avoid=self._tried)
        if not fresh:  # no healthy replica left to try at once: back off, or give up
            if now + self._backoff > self._started_failing + self._budget:
                raise TeacherError(code, self._gave_up(now - self._started_failing, failed, code, details))
            log.warning("teacher %s on %s failed (%s: %s); no other replica is healthy: retrying in %.1f s",
                        self._what, failed.address, code.name, details, self._backoff)
            time.sleep(self._backoff)
            self._backoff = min(2 * self._backoff, MAX_BACKOFF_S)
            endpoint, self._tried = self._replicas.pick()[0], set()
        else:
            log.warning("teacher %s on %s failed (%s: %s): moved to %s (%s ejected for %.1f s)", self._what,
                        failed.address, code.name, details, endpoint.address, failed.address, ejected_s)
        self._tried.add(endpoint)
        self.attempts += 1
        return endpoint

    def answered(self, endpoint: Endpoint) -> None:
        """``endpoint`` answered: a later failure starts a fresh budget and backoff (a long-lived stream
        fails over many times over a run; each episode gets the whole budget)."""
        self._tried, self._backoff, self._started_failing = {endpoint}, FIRST_BACKOFF_S, None

    def _gave_up(self, failing_s: float, last: Endpoint, code: grpc.StatusCode, details: str) -> str:
        return (f"no teacher replica answered the {self._what} call within its retry budget of {self._budget:g} s "
                f"(replicas: {self._replicas}; {self.attempts} attempts, failing for {failing_s:.1f} s); "
                f"last error from {last.address}: {code.name}: {details}")


class PendingCall(Generic[T]):
    """A call in flight; :meth:`result` waits for it, failing over or retrying :data:`FAILOVER` failures.

    ``start(endpoint)`` starts one attempt on a replica and returns its ``grpc.Future`` (with the attempt's
    deadline); ``finish(response, endpoint)`` turns the response into the result (and may raise a
    :class:`TeacherError`, which is not retried). ``what`` names the call in errors.
    """

    def __init__(self, replicas: Replicas, start: Callable[[Endpoint], grpc.Future],
                 finish: Callable[[Any, Endpoint], T], retry_budget: float, what: str = "Score"):
        self._replicas = replicas
        self._start = start
        self._finish = finish
        self.endpoint, _ = replicas.pick()
        self._failover = Failover(replicas, self.endpoint, retry_budget, what)
        self._future = start(self.endpoint)
        self._cancelled = False

    @property
    def attempts(self) -> int:
        return self._failover.attempts

    def result(self) -> T:
        """The result; retries as the module says, then raises :class:`TeacherError` with the last status."""
        while True:
            try:
                response = self._future.result()
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
            else:
                self._replicas.succeeded(self.endpoint)
                return self._finish(response, self.endpoint)
            if code not in FAILOVER or self._cancelled:
                raise TeacherError(code, details)
            self.endpoint = self._failover.next(self.endpoint, code, details)
            self._future = self._start(self.endpoint)

    def done(self) -> bool:
        """Whether the current attempt has ended (answered or failed)."""
        return self._future.done()

    def cancel(self) -> None:
        self._cancelled = True
        self._future.cancel()
