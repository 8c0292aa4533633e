"""A ScoreStream that survives its replica: the unanswered batches go again, in order, to another one.

:func:`score_stream` keeps up to ``in_flight`` batches out on one ``ScoreStream`` and yields their signals in
the caller's order. Each batch taken from the caller's iterable gets an index (its request id on the wire)
and stays *outstanding* until its response arrives. An attempt (one stream on one replica) ends in failure
when:

* the call fails with a :data:`~.pending.FAILOVER` status (the replica died, is restarting or draining);
* a response carries a per-request error with such a status (the replica shed that batch);
* the replica sends nothing for ``timeout`` seconds while batches are outstanding and the caller is waiting
  for one (a hung or too slow replica; the time the caller spends training between two signals does not
  count);
* the replica ends the stream with batches outstanding (it shut down).

The next attempt goes where :class:`~.pending.Failover` says (another healthy replica, or the same after a
backoff, within ``retry_budget``), and its stream first sends the outstanding batches again in index order,
then goes on with the caller's iterable. A replica's answer is a pure function of the request, so a batch
answered by the second replica carries the signal the first would have sent: the caller sees every signal
once, in order, as if nothing had happened. Any other failure (a per-request error such as an id outside
the vocabulary, a revision change, the caller's iterable raising) ends the stream with that error, in the
batch's turn.

Threads: gRPC's request thread runs an attempt's request generator; the caller's thread reads responses; a
watchdog thread per attempt cancels a silent one. The caller's iterable is only ever advanced by one
attempt's generator at a time (``_pull_lock``), and an attempt that was closed takes nothing more from it,
so no batch is skipped or scored twice across attempts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc

from atkd.proto import teacher_pb2 as pb
from atkd.proto.codec import decode_signal
from atkd.proto.signal import TeacherSignal

from .batch import ScoreBatch
from .errors import TeacherError, status_code
from .pending import FAILOVER, Failover
from .replicas import Endpoint, Replicas


class _AttemptFailed(Exception):
    """An attempt ended with a status to fail over on (or to raise, if it is not one)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class _Source:
    """The caller's batches, numbered as they are taken, and those sent but not answered yet."""

    def __init__(self, batches: Iterable[ScoreBatch | object]):
        self._iterator = iter(batches)
        self.pull_lock = threading.Lock()  # one attempt's generator takes from the iterable at a time
        self._state_lock = threading.Lock()
        self.outstanding: dict[int, ScoreBatch] = {}
        self.taken = 0
        self.exhausted = False
        self.error: BaseException | None = None

    def first_unanswered(self) -> int:
        with self._state_lock:
            return min(self.outstanding, default=self.taken)

    def resend(self, index: int) -> tuple[bool, ScoreBatch | None]:
        """(whether ``index`` was taken already, its batch if it is still outstanding)."""
        with self._state_lock:
            return index < self.taken, self.outstanding.get(index)

    def take(self) -> ScoreBatch | None:
        """The next batch of the iterable, outstanding from now on (None once it is exhausted); call with
        :attr:`pull_lock` held."""
        if self.exhausted:
            return None
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.exhausted = True
            return None
        except BaseException as error:  # surfaced in the caller's thread
            self.error = error
            raise
        batch = batch if isinstance(batch, ScoreBatch) else ScoreBatch.of(batch)
        with self._state_lock:
            self.outstanding[self.taken] = batch
            self.taken += 1
        return batch

    def answered(self, index: int) -> ScoreBatch | None:
        """The batch of ``index``, no longer outstanding (None if it was not)."""
        with self._state_lock:
            return self.outstanding.pop(index, None)

    def unanswer(self, index: int, batch: ScoreBatch) -> None:
        """``index`` is outstanding again (its answer was an error to fail over on)."""
        with self._state_lock:
            self.outstanding[index] = batch

    @property
    def done(self) -> bool:
        with self._state_lock:
            return self.exhausted and not self.outstanding


class _Attempt:
    """One ScoreStream on one replica: sends the outstanding batches again, then new ones, with at most
    ``in_flight`` unanswered; its responses come from :meth:`responses`."""

    def __init__(self, endpoint: Endpoint, source: _Source, request: Callable[[ScoreBatch, str], pb.ScoreRequest],
                 metadata: tuple, in_flight: int, timeout: float | None):
        self.endpoint = endpoint
        self._source = source
        self._request = request
        self._slots = threading.Semaphore(in_flight)
        self._timeout = timeout
        self._closing = threading.Event()
        self._waiting_since: float | None = None  # when the caller's thread began waiting for a response
        self._silent = False
        self._call = endpoint.stub.ScoreStream(self._requests(), metadata=metadata)
        if timeout is not None:  # None: wait for a replica without limit
            threading.Thread(target=self._watch, name="score-stream-watchdog", daemon=True).start()

    def _requests(self) -> Iterator[pb.ScoreRequest]:
        index = None
        while True:
            self._slots.acquire()
            with self._source.pull_lock:
                if self._closing.is_set():
                    return
                if index is None:
                    index = self._source.first_unanswered()
                taken, batch = self._source.resend(index)
                if taken and batch is None:  # answered meanwhile: nothing to send for it
                    self._slots.release()
                    index += 1
                    continue
                if not taken and (batch := self._source.take()) is None:
                    return  # the caller's batches are all out: the stream ends once they are answered
            yield self._request(batch, str(index))
            index += 1

    def responses(self) -> Iterator[tuple[int, ScoreBatch, pb.ScoreResponse]]:
        """(index, batch, response) of each answered batch, as the responses arrive; raises
        :class:`_AttemptFailed` as the module says. A response with a per-request error is yielded unless its
        status is one to fail over on."""
        try:
            while True:
                self._waiting_since = time.monotonic()
                try:
                    response = next(self._call)
                except StopIteration:
                    break
                finally:
                    self._waiting_since = None
                self._slots.release()
                batch = self._source.answered(int(response.id))
                if batch is None:
                    continue  # not one of ours (cannot happen with a conforming server)
                if response.HasField("error") and status_code(response.error.code) in FAILOVER:
                    self._source.unanswer(int(response.id), batch)  # it goes again on the next attempt
                    raise _AttemptFailed(status_code(response.error.code), response.error.message)
                yield int(response.id), batch, response
        except grpc.RpcError as error:
            if self._silent:
                raise _AttemptFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no response for {self._timeout:g} s "
                                     "with batches outstanding (a hung or too slow replica)") from None
            raise _AttemptFailed(error.code(), error.details() or "") from None
        if not self._source.done:
            raise _AttemptFailed(grpc.StatusCode.UNAVAILABLE, "the replica ended the stream with batches "
                                 "unanswered (shutting down?)")

    def _watch(self) -> None:
        """Cancel the call once the caller has waited ``timeout`` for a response with batches outstanding."""
        period = min(0.5, self._timeout / 4)
        while not self._closing.wait(period):
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self._timeout and self._source.outstanding:
                self._silent = True
                self._call.cancel()
                return

    def close(self) -> None:
        """End the attempt: its generator takes nothing more from the caller's batches."""
        self._closing.set()
        self._slots.release()
        self._call.cancel()


def score_stream(batches: Iterable[ScoreBatch | object], *, replicas: Replicas,
                 request: Callable[[ScoreBatch, str], pb.ScoreRequest], metadata: tuple, in_flight: int,
                 timeout: float | None, retry_budget: float,
                 check_revision: Callable[[str, str], None]) -> Iterator[TeacherSignal]:
    """Signals ``[B, T]`` for ``batches``, in order, failed over as the module says. ``request(batch, id)``
    builds a request; ``check_revision(revision, source)`` checks each response's model revision."""
    source = _Source(batches)
    endpoint, _ = replicas.pick()
    failover = Failover(replicas, endpoint, retry_budget, "ScoreStream")
    ready: dict[int, TeacherSignal | TeacherError] = {}  # answered out of order, waiting for their turn
    next_index = 0
    while True:
        attempt = _Attempt(endpoint, source, request, metadata, in_flight, timeout)
        try:
            for index, batch, response in attempt.responses():
                if response.HasField("error"):
                    ready[index] = TeacherError(status_code(response.error.code), response.error.message)
                else:
                    check_revision(response.model_revision, f"the replica at {endpoint.address}")
                    ready[index] = batch.unpack(decode_signal(response.signal))
                replicas.succeeded(endpoint)
                failover.answered(endpoint)
                while next_index in ready:
                    result = ready.pop(next_index)
                    if isinstance(result, TeacherError):
                        raise result
                    yield result
                    next_index += 1
            return
        except _AttemptFailed as failure:
            if source.error is not None:
                raise source.error from None
            if failure.code not in FAILOVER:
                raise TeacherError(failure.code, failure.details) from None
            endpoint = failover.next(endpoint, failure.code, failure.details)
        finally:
            attempt.close()
