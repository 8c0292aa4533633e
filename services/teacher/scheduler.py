"""Cross-client batching: per-client queues, deficit round-robin by tokens, one batch on the engine at a time.

Requests of every client wait in that client's FIFO queue. A batch starts when the queued tokens reach
``max_batch_tokens`` or the oldest request has waited ``max_wait_s``, whichever comes first, and as soon
as the engine is free (batches run one at a time on one worker thread, while the event loop keeps
receiving requests and sending responses). A batch is filled by deficit round-robin over the clients
with queued work: each visit adds ``quantum`` tokens to the client's deficit and takes requests from the
head of its queue while they fit the deficit and the batch's remaining room; a client whose queue
empties leaves the ring and loses its deficit, and nobody is credited once the batch is full. So every
backlogged client gets the same share of tokens, and a light client (one request in flight) takes its
turn in the rotation: next to one heavy client, its request goes into the batch after the one running
when it arrived, however long the heavy client's backlog.

Backpressure: a client may have ``max_inflight_per_client`` requests queued or computing, and all
clients together ``max_queue_tokens`` queued tokens; beyond that :meth:`Scheduler.submit` raises
RESOURCE_EXHAUSTED at once. A request whose caller is cancelled, or whose ``timeout_s`` runs out while
queued (DEADLINE_EXCEEDED), leaves its queue at once and is never computed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from atkd.proto.signal import TeacherSignal

from .errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from .metrics import TeacherMetrics
from .request import ScoreJob

log = logging.getLogger(__name__)

Compute = Callable[[Sequence[ScoreJob]], list[TeacherSignal]]


@dataclass(frozen=True)
class Scored:
    """A request's signal with where its time went (seconds)."""

    signal: TeacherSignal
    queue_s: float
    compute_s: float
    batch_tokens: int


@dataclass(eq=False)
class _Pending:
    client: str
    job: ScoreJob
    future: asyncio.Future[Scored]
    arrived: float
    queued: bool = True
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


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
    ):
        self._compute = compute
        self._metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_tokens = max_queue_tokens
        self.max_inflight_per_client = max_inflight_per_client
        self.quantum = max(1, max_batch_tokens // 8)
        self._queues: dict[str, deque[_Pending]] = {}
        self._ring: deque[str] = deque()  # clients with queued work, in visiting order
        self._deficit: Counter[str] = Counter()
        self._visiting = False  # whether ring[0] already got its quantum for the current visit
        self._inflight: Counter[str] = Counter()
        self.queued_tokens = 0
        self.queued_requests = 0
        self._computing = False
        self._closing = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="teacher-engine")
        self._task: asyncio.Task | None = None
        metrics.queue_requests.set_function(lambda: self.queued_requests)
        metrics.queue_tokens.set_function(lambda: self.queued_tokens)

    @property
    def saturated(self) -> bool:
        """True when the queue has no room left for a request of ``max_batch_tokens``."""
        return self.max_queue_tokens - self.queued_tokens < self.max_batch_tokens

    def inflight(self, client: str) -> int:
        return self._inflight[client]

    def start(self) -> None:
        """Start the batching loop (in the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="teacher-scheduler")

    async def submit(self, client: str, job: ScoreJob, timeout_s: float | None = None) -> Scored:
        """Queue ``job`` for ``client`` and wait for its signal.

        Raises RESOURCE_EXHAUSTED (client or queue full), UNAVAILABLE (closing), DEADLINE_EXCEEDED
        (``timeout_s`` ran out before the job was batched) as :class:`ServiceError` s.
        """
        if self._closing:
            raise Unavailable("the teacher is shutting down: retry on another replica")
        if self._inflight[client] >= self.max_inflight_per_client:
            raise ResourceExhausted(f"client {client!r} already has {self._inflight[client]} requests in flight, the "
                                    f"limit is {self.max_inflight_per_client}: wait for responses before sending more")
        if self.queued_tokens + job.tokens > self.max_queue_tokens:
            raise ResourceExhausted(f"the teacher's queue is full ({self.queued_tokens} tokens queued, limit "
                                    f"{self.max_queue_tokens}): retry later or on another replica")
        loop = asyncio.get_running_loop()
        pending = _Pending(client, job, loop.create_future(), loop.time())
        if timeout_s:
            pending.expiry = loop.call_later(timeout_s, self._expire, pending)
        self._queues.setdefault(client, deque()).append(pending)
        if len(self._queues[client]) == 1:
            self._ring.append(client)
        self._inflight[client] += 1
        self.queued_tokens += job.tokens
        self.queued_requests += 1
        self._idle.clear()
        pending.future.add_done_callback(lambda _: self._finished(pending))
        self._wake.set()
        return await pending.future

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
            if self.queued_requests:
                if self.queued_tokens >= self.max_batch_tokens or self._closing:
                    return
                oldest = min(queue[0].arrived for queue in self._queues.values())
                timeout = oldest + self.max_wait_s - loop.time()
                if timeout <= 0:
                    return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _take_batch(self) -> list[_Pending]:
        """Deficit round-robin over the ring until the batch has no room for the next request due."""
        batch: list[_Pending] = []
        room = self.max_batch_tokens
        while self._ring:
            client = self._ring[0]
            queue = self._queues[client]
            if queue[0].future.done():  # cancelled or expired; its done callback has not run yet
                self._unqueue(queue.popleft())
                continue
            tokens = queue[0].job.tokens
            if tokens > room:
                break  # full: the visit goes on in the next batch, and nobody is credited ahead of time
            if not self._visiting:
                self._deficit[client] += self.quantum
                self._visiting = True
            if tokens > self._deficit[client]:
                self._ring.rotate(-1)
                self._visiting = False
                continue
            pending = queue.popleft()
            self._deficit[client] -= tokens
            room -= tokens
            self._unqueue(pending)
            batch.append(pending)
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        jobs = [pending.job for pending in batch]
        tokens = sum(job.tokens for job in jobs)
        started = loop.time()
        self._computing = True
        for pending in batch:
            self._metrics.queue_seconds.observe(started - pending.arrived)
        self._metrics.batch_tokens.observe(tokens)
        self._metrics.batch_requests.observe(len(batch))
        self._metrics.batch_fill.observe(tokens / self.max_batch_tokens)
        try:
            signals = await loop.run_in_executor(self._executor, self._compute, jobs)
        except Exception as error:  # an engine failure fails this batch, not the server
            log.exception("teacher engine failed on a batch of %d requests", len(batch))
            failure = ServiceError(f"the teacher engine failed: {type(error).__name__}: {error}")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(failure)
        else:
            compute_s = loop.time() - started
            self._metrics.forward_seconds.observe(compute_s)
            self._metrics.tokens.inc(tokens)
            for pending in batch:
                self._metrics.client_tokens.labels(pending.client).inc(pending.job.tokens)
            self._metrics.positions.inc(sum(job.num_positions for job in jobs))
            for pending, signal in zip(batch, signals, strict=True):
                if not pending.future.done():
                    pending.future.set_result(Scored(signal, started - pending.arrived, compute_s, tokens))
        finally:
            self._computing = False
            self._update_idle()

    def _unqueue(self, pending: _Pending) -> None:
        """Bookkeeping of a request leaving its queue (the caller removed it from the deque)."""
        pending.queued = False
        if pending.expiry is not None:
            pending.expiry.cancel()
        self.queued_tokens -= pending.job.tokens
        self.queued_requests -= 1
        client = pending.client
        if not self._queues[client]:
            del self._queues[client]
            if self._ring[0] == client:
                self._visiting = False
            self._ring.remove(client)
            del self._deficit[client]

    def _finished(self, pending: _Pending) -> None:
        """Done callback of every request's future: result, error, cancellation or expiry."""
        self._inflight[pending.client] -= 1
        if not self._inflight[pending.client]:
            del self._inflight[pending.client]
        if pending.queued:  # cancelled or expired while waiting: never computed
            self._queues[pending.client].remove(pending)
            self._unqueue(pending)
            self._update_idle()

    def _expire(self, pending: _Pending) -> None:
        if pending.queued and not pending.future.done():
            waited = asyncio.get_running_loop().time() - pending.arrived
            pending.future.set_exception(DeadlineExceeded(
                f"the request waited {waited * 1000:.0f} ms without being scheduled (timeout_ms exceeded)"))

    def _update_idle(self) -> None:
        if not self.queued_requests and not self._computing:
            self._idle.set()
