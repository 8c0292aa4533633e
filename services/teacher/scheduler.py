"""The replica's batching loop: when a batch is due, take it from the :class:`FairQueue`, run it, answer it.

A batch is due when the queued tokens reach ``max_batch_tokens``, the oldest request has waited
``max_wait_s``, or the replica is closing, and as soon as the engine is free: batches run one at a time
on one worker thread while the event loop keeps receiving requests and sending responses. *What* goes
into a batch (deficit round-robin by tokens between clients, each within its share of the batch) and who
may queue (per-client and total limits, RESOURCE_EXHAUSTED at once) is the synchronous policy of
:mod:`.fair_queue`; this module only adds time: futures, deadlines, the worker thread and metrics. One
turn of :meth:`Scheduler._run`::

    await self._until_batch_due()          # wait: full, old enough, or closing
    batch = self._take_batch()             # FairQueue.take_batch(), less what was cancelled meanwhile
    await self._run_batch(batch)           # engine on the worker thread; answer every future

A request whose caller is cancelled, or whose ``timeout_s`` runs out while queued (DEADLINE_EXCEEDED),
leaves its queue at once and is never computed. A batch that fails in the engine is run again job by
job, so that a job the engine cannot compute fails alone, never the requests of others beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from atkd.proto.signal import TeacherSignal, concat_signals

from .errors import DeadlineExceeded, ServiceError, Unavailable
from .fair_queue import FairQueue
from .metrics import TeacherMetrics, client_label
from .request import ScoreJob

log = logging.getLogger(__name__)

Compute = Callable[[Sequence[ScoreJob]], list[TeacherSignal]]


@dataclass(frozen=True)
class Scored:
    """A request's signal with where its time went (seconds). ``release`` frees the request's in-flight
    slot when the caller asked to hold it (:meth:`Scheduler.submit`'s ``hold_slot``); a no-op otherwise."""

    signal: TeacherSignal
    queue_s: float
    compute_s: float
    batch_tokens: int
    release: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)


@dataclass(eq=False)
class _Pending:
    """A request: ``job`` is what is still queued of it (all of it until a batch takes a prefix)."""

    client: str
    job: ScoreJob
    future: asyncio.Future[Scored]
    arrived: float
    label: str = ""  # the client's name in the metrics
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)
    started: float | None = None  # when its first part's batch started
    signals: list[TeacherSignal] = field(default_factory=list, repr=False)  # of its parts computed so far
    compute_s: float = 0.0

    @property
    def tokens(self) -> int:
        return self.job.tokens

    def prefix_tokens(self, room: int) -> int:
        return self.job.prefix_tokens(room)

    def take_prefix(self, tokens: int) -> _Part:
        """Split off the first sequences (``tokens`` tokens) for a batch; the rest stays queued."""
        first, self.job = self.job.split(tokens)
        return _Part(self, first, last=False)


@dataclass(eq=False)
class _Part:
    """What a batch computes of a request: all of it, or a prefix of its sequences (``last`` is False)."""

    request: _Pending
    job: ScoreJob
    last: bool


class Scheduler:
    """Batches :class:`ScoreJob` s of many clients onto ``compute`` (run on one worker thread)."""

    def __init__(
        self,
        compute: Compute,
        metrics: TeacherMetrics,
        *,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue_tokens: int,
        max_inflight_per_client: int,
        split_requests: bool = True,
        max_client_queue_tokens: int | None = None,
        fair_share: bool = True,
    ):
        self._compute = compute
        self._metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.queue: FairQueue[_Pending] = FairQueue(max_batch_tokens=max_batch_tokens,
                                                    max_queue_tokens=max_queue_tokens,
                                                    max_inflight_per_client=max_inflight_per_client,
                                                    split_requests=split_requests,
                                                    max_client_queue_tokens=max_client_queue_tokens,
                                                    fair_share=fair_share)
        self._computing = False
        self._closing = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="teacher-engine")
        self._task: asyncio.Task | None = None
        metrics.queue_requests.set_function(lambda: self.queue.queued_requests)
        metrics.queue_tokens.set_function(lambda: self.queue.queued_tokens)

    @property
    def saturated(self) -> bool:
        """True when the queue has no room left for a request of ``max_batch_tokens``."""
        return self.queue.saturated

    def inflight(self, client: str | None = None) -> int:
        """Requests in flight of ``client`` (of every client if None)."""
        return self.queue.inflight(client)

    def start(self) -> None:
        """Start the batching loop (in the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="teacher-scheduler")

    async def submit(self, client: str, job: ScoreJob, timeout_s: float | None = None, *,
                     hold_slot: bool = False, label: str | None = None) -> Scored:
        """Queue ``job`` for ``client`` and wait for its signal.

        The request holds one of the client's in-flight slots until it is answered, or, with ``hold_slot``,
        until the caller calls the result's ``release`` (once its response is sent: a client that does
        not read its responses then runs out of slots instead of piling them up in the server).
        ``label``: the client's name in the metrics (default :func:`~.metrics.client_label` of ``client``).
        Raises RESOURCE_EXHAUSTED (client or queue full), UNAVAILABLE (closing), DEADLINE_EXCEEDED
        (``timeout_s`` ran out before the job was batched) as :class:`ServiceError` s.
        """
        if self._closing:
            raise Unavailable("the teacher is shutting down: retry on another replica")
        self.queue.admit(client, job.tokens)
        loop = asyncio.get_running_loop()
        pending = _Pending(client, job, loop.create_future(), loop.time(), label or client_label(client))
        if timeout_s:
            pending.expiry = loop.call_later(timeout_s, self._expire, pending)
        self.queue.push(pending)
        self._idle.clear()
        pending.future.add_done_callback(lambda future: self._finished(pending, hold_slot and _succeeded(future)))
        self._wake.set()
        try:
            scored = await pending.future
        except asyncio.CancelledError:  # cancelled after the answer came: nobody will release the held slot
            if hold_slot and pending.future.done() and _succeeded(pending.future):
                self.queue.release(client)
            raise
        if not hold_slot:
            return scored
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                self.queue.release(client)

        return dataclasses.replace(scored, release=release)

    def close(self) -> None:
        """Refuse new requests (UNAVAILABLE) and run what is queued without waiting for full batches."""
        self._closing = True
        self._wake.set()

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing computing."""
        return self._idle.is_set()

    async def drained(self) -> None:
        """Wait until :attr:`idle`."""
        await self._idle.wait()

    async def stop(self) -> None:
        """Stop the batching loop; a batch on the worker thread finishes there, unanswered."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            await self._until_batch_due()
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)
            else:  # everything due was cancelled meanwhile
                self._update_idle()

    async def _until_batch_due(self) -> None:
        """Wait until the queued tokens fill a batch, the oldest request waited ``max_wait_s``, or closing."""
        loop = asyncio.get_running_loop()
        while True:
            timeout = None
            oldest = self.queue.oldest_arrival
            if oldest is not None:
                if self.queue.queued_tokens >= self.max_batch_tokens or self._closing:
                    return
                timeout = oldest + self.max_wait_s - loop.time()
                if timeout <= 0:
                    return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _take_batch(self) -> list[_Part]:
        """The fair queue's next batch as parts (a request taken whole is its last part), less requests
        cancelled or expired since (their done callbacks, which take them out of the queue, may not have
        run yet). A request whose first part is taken no longer expires."""
        batch = [entry if isinstance(entry, _Part) else _Part(entry, entry.job, last=True)
                 for entry in self.queue.take_batch()]
        for part in batch:
            if part.request.expiry is not None:
                part.request.expiry.cancel()
        return [part for part in batch if not part.request.future.done()]

    async def _run_batch(self, batch: list[_Part]) -> None:
        loop = asyncio.get_running_loop()
        jobs = [part.job for part in batch]
        tokens = sum(job.tokens for job in jobs)
        started = loop.time()
        self._computing = True
        for part in batch:
            if part.request.started is None:
                part.request.started = started
                self._metrics.queue_seconds.observe(started - part.request.arrived)
        self._metrics.batch_tokens.observe(tokens)
        self._metrics.batch_requests.observe(len(batch))
        self._metrics.batch_clients.observe(len({part.request.client for part in batch}))
        self._metrics.batch_fill.observe(tokens / self.max_batch_tokens)
        try:
            signals = await loop.run_in_executor(self._executor, self._compute_isolated, jobs)
            compute_s = loop.time() - started
            self._metrics.forward_seconds.observe(compute_s)
            self._metrics.tokens.inc(tokens)
            self._metrics.positions.inc(sum(job.num_positions for job in jobs))
            for part, signal in zip(batch, signals, strict=True):
                request = part.request
                if isinstance(signal, ServiceError):  # this job failed alone; the others go on
                    if not request.future.done():
                        request.future.set_exception(signal)
                    continue
                self._metrics.count_client_tokens(request.label, part.job.tokens)
                request.signals.append(signal)
                request.compute_s += compute_s
                if part.last and not request.future.done():
                    whole = request.signals[0]
                    if len(request.signals) > 1:  # a split request: torch.cat on the worker, not on the loop
                        whole = await loop.run_in_executor(self._executor, concat_signals, request.signals)
                    if not request.future.done():  # the caller may have gone while the parts were joined
                        request.future.set_result(Scored(whole, request.started - request.arrived,
                                                         request.compute_s, tokens))
        except Exception as error:  # a failure outside the engine fails this batch, not the server
            log.exception("the scheduler failed on a batch of %d requests", len(batch))
            failure = ServiceError(f"the teacher failed on this batch: {type(error).__name__}: {error}")
            for part in batch:
                if not part.request.future.done():
                    part.request.future.set_exception(failure)
        finally:
            self._computing = False
            self._update_idle()

    def _compute_isolated(self, jobs: Sequence[ScoreJob]) -> list[TeacherSignal | ServiceError]:
        """``compute(jobs)`` on the worker thread; if the batch fails, each job alone, so that a job the
        engine cannot compute gets its own error (logged) and the others their signals."""
        try:
            return self._compute(jobs)
        except Exception:
            if len(jobs) == 1:
                return [self._engine_failure(jobs[0])]
        return [self._compute_one(job) for job in jobs]

    def _compute_one(self, job: ScoreJob) -> TeacherSignal | ServiceError:
        try:
            return self._compute([job])[0]
        except Exception:
            return self._engine_failure(job)

    def _engine_failure(self, job: ScoreJob) -> ServiceError:
        """The error answered for a job the engine failed on (logged, with its traceback, from the
        ``except`` block that caught it)."""
        error = sys.exc_info()[1]
        log.exception("the teacher engine failed on a job of %d tokens", job.tokens)
        return ServiceError(f"the teacher engine failed on this request: {type(error).__name__}: {error}")

    def _finished(self, pending: _Pending, hold_slot: bool = False) -> None:
        """Done callback of every request's future: result, error, cancellation or expiry. With
        ``hold_slot`` the request leaves the queue but keeps its in-flight slot (see :meth:`submit`)."""
        if pending.expiry is not None:
            pending.expiry.cancel()
        if hold_slot:
            self.queue.withdraw(pending)
        else:
            self.queue.finished(pending)
        self._update_idle()

    def _expire(self, pending: _Pending) -> None:
        if not pending.future.done():
            waited = asyncio.get_running_loop().time() - pending.arrived
            pending.future.set_exception(DeadlineExceeded(
                f"the request waited {waited * 1000:.0f} ms without being scheduled (timeout_ms exceeded)"))

    def _update_idle(self) -> None:
        if not self.queue.queued_requests and not self._computing:
            self._idle.set()


def _succeeded(future: asyncio.Future) -> bool:
    return not future.cancelled() and future.exception() is None
