"""The fairness policy of a replica, as plain synchronous code: admission and deficit round-robin by tokens.

Requests of every client wait in that client's FIFO queue. :meth:`FairQueue.take_batch` fills a batch
by deficit round-robin over the clients with queued work: each visit adds ``quantum`` tokens to the
client's deficit and takes requests from the head of its queue while they fit the deficit and the
batch's remaining room; a client whose queue empties leaves the ring and loses its deficit, and nobody
is credited once the batch is full. So every backlogged client gets the same share of tokens, and a
light client (one request in flight) takes its turn in the rotation: next to one heavy client, its
request goes into the batch after the one running when it arrived, however long the heavy client's
backlog.

Share of a batch (``fair_share``): deficit round-robin alone is work-conserving: a client left alone in
the ring is credited again and again until the batch is full, so a backlogged client beside light ones
(a few requests in flight, throughput bound by their latency) fills every batch to the budget and they
wait for batches that long. Instead, while n clients are active (work queued, or work in the batch before,
whose answers are on their way back), a client takes, beyond its first request in a batch (which is
exempt, so that no request starves), at most ``max_batch_tokens // n`` of it, and once it is the only
one left with queued work, no more than the mean of what the other clients have in the batch (one
``quantum`` if they have nothing in it). So a backlogged client gets about what each light client gets
(in a simulation of bench.teacher_load's case 6: exactly as much), instead of the room they leave;
clients backlogged together still fill every batch, and a client alone fills every batch from the second
after the others left.

Memory of service (also ``fair_share``): shares per batch alone still favour a client that always has a
request queued over clients that are sometimes between requests when a batch is taken (a student with 2 in
flight whose next request is on its way): the first gets into every batch, they into most. So the queue also
counts each client's tokens served across batches, and the one client whose count is above every other
client's by more than a ``quantum`` (1/8 of the batch budget) is *deferred*: it takes nothing in this batch
unless nobody else has queued work (the batch is never left empty for it). At most one client is deferred
at a time (the unique maximum), so clients served alike (within a quantum: a split request's remainder,
ties) are never held back, and a light client is never held back by a heavy one: a backlogged client beside
light ones gets, over the run and not only per batch, what the best-served of them gets, to within a
quantum. The counts are kept within one batch budget of the highest (a count further behind is raised to
that floor), so a light client that turns heavy holds the others back for at most about a batch's worth of
tokens, not for all it did not use; a new client starts level with the highest count (no credit for being
new), and a client with nothing queued or in flight whose count sits on the floor is forgotten.

Granularity: a request whose sequences can be split (it has ``prefix_tokens`` / ``take_prefix``) and that
does not fit the room left in a batch gives that room the longest prefix of its whole sequences that fits
(if its client's deficit allows it) and stays at the head of its queue with the rest. So two students whose
requests are each a little over half the budget share every batch instead of taking turns at half fill.

Admission (:meth:`FairQueue.admit`): a client may have ``max_inflight_per_client`` requests queued or
computing (or, for a caller that holds the slot until the response is sent, waiting to be sent), at most
``max_client_queue_tokens`` queued tokens of its own (a fraction of the queue, so that no client fills it
alone), and all clients together ``max_queue_tokens`` queued tokens; beyond that RESOURCE_EXHAUSTED.

No clock, no event loop, no threads: the async driver (:mod:`.scheduler`) decides *when* a batch is
due and calls this to decide *what* goes in it; the tests drive it directly.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from typing import Any, Generic, Protocol, TypeVar

from .errors import ResourceExhausted


class Queued(Protocol):
    """What the queue needs of a request: whose it is, its size in tokens, when it arrived, and how it
    splits: ``prefix_tokens(room)`` = tokens of its longest prefix of whole sequences within ``room`` (0
    if none, or if it cannot be split), ``take_prefix(tokens)`` = that part, the request keeping the rest."""

    client: str
    tokens: int
    arrived: float

    def prefix_tokens(self, room: int) -> int: ...

    def take_prefix(self, tokens: int) -> Any: ...


Item = TypeVar("Item", bound=Queued)


class FairQueue(Generic[Item]):
    """Per-client FIFO queues served by deficit round-robin in tokens, with admission limits."""

    def __init__(self, *, max_batch_tokens: int, max_queue_tokens: int, max_inflight_per_client: int,
                 split_requests: bool = True, max_client_queue_tokens: int | None = None, fair_share: bool = True):
        self.max_batch_tokens = max_batch_tokens
        self.split_requests = split_requests
        self.fair_share = fair_share
        self.max_queue_tokens = max_queue_tokens
        self.max_client_queue_tokens = max_queue_tokens if max_client_queue_tokens is None else max_client_queue_tokens
        self.max_inflight_per_client = max_inflight_per_client
        self.quantum = max(1, max_batch_tokens // 8)
        self._queues: dict[str, deque[Item]] = {}
        self._ring: deque[str] = deque()  # clients with queued work, in visiting order
        self._deficit: Counter[str] = Counter()
        self._visiting = False  # whether ring[0] already got its quantum for the current visit
        self._recent: set[str] = set()  # clients of the last batch taken
        self._service: dict[str, int] = {}  # tokens served, within a batch budget of the top ("Memory of service")
        self._inflight: Counter[str] = Counter()
        self._client_queued_tokens: Counter[str] = Counter()
        self.queued_tokens = 0
        self.queued_requests = 0

    # -- admission ------------------------------------------------------------------------------------
    def admit(self, client: str, tokens: int) -> None:
        """Raise RESOURCE_EXHAUSTED if ``client`` may not queue a request of ``tokens`` now."""
        if self._inflight[client] >= self.max_inflight_per_client:
            raise ResourceExhausted(f"client {client!r} already has {self._inflight[client]} requests in flight, the "
                                    f"limit is {self.max_inflight_per_client}: wait for responses before sending more")
        if self._client_queued_tokens[client] + tokens > self.max_client_queue_tokens:
            raise ResourceExhausted(f"client {client!r} already has {self._client_queued_tokens[client]} tokens "
                                    f"queued, its share of the queue is {self.max_client_queue_tokens}: wait for "
                                    "responses before sending more")
        if self.queued_tokens + tokens > self.max_queue_tokens:
            raise ResourceExhausted(f"the teacher's queue is full ({self.queued_tokens} tokens queued, limit "
                                    f"{self.max_queue_tokens}): retry later or on another replica")

    def push(self, item: Item) -> None:
        """Queue an admitted ``item``; it counts as in flight for its client until :meth:`finished`."""
        if item.client not in self._service:  # new, or forgotten: level with the best-served client
            self._service[item.client] = max(self._service.values(), default=0)
        self._queues.setdefault(item.client, deque()).append(item)
        if len(self._queues[item.client]) == 1:
            self._ring.append(item.client)
        self._inflight[item.client] += 1
        self._queued(item.client, item.tokens)
        self.queued_requests += 1

    def finished(self, item: Item) -> None:
        """``item`` was answered, failed or cancelled: it no longer counts as in flight (and leaves its
        queue if it was still waiting there)."""
        self.withdraw(item)
        self.release(item.client)

    def withdraw(self, item: Item) -> None:
        """``item`` leaves its queue if it is still waiting there; it keeps its in-flight slot until
        :meth:`release` (a caller that holds the slot until the response is sent)."""
        if item in self._queues.get(item.client, ()):
            self._queues[item.client].remove(item)
            self._left_queue(item)

    def release(self, client: str) -> None:
        """Free one in-flight slot of ``client`` (taken by :meth:`push`)."""
        self._inflight[client] -= 1
        if not self._inflight[client]:
            del self._inflight[client]

    # -- what to run ----------------------------------------------------------------------------------
    @property
    def saturated(self) -> bool:
        """True when the queue has no room left for a request of ``max_batch_tokens``."""
        return self.max_queue_tokens - self.queued_tokens < self.max_batch_tokens

    @property
    def oldest_arrival(self) -> float | None:
        """Arrival time of the oldest queued request (None when nothing is queued)."""
        return min((queue[0].arrived for queue in self._queues.values()), default=None)

    def inflight(self, client: str | None = None) -> int:
        """Requests in flight of ``client`` (of every client if None)."""
        return self._inflight[client] if client is not None else sum(self._inflight.values())

    def take_batch(self) -> list:
        """Deficit round-robin over the ring until the batch has no room for the next request due, or every
        client left in the ring has its share of the batch.

        Returns the requests taken whole (they leave their queues but stay in flight until
        :meth:`finished`) and parts of requests (``take_prefix``'s result; the request keeps the rest at the
        head of its queue): one where a client's share ends inside its head request, and one, last, where
        the batch's remaining room does."""
        batch: list = []
        room = self.max_batch_tokens
        active = len(set(self._ring) | self._recent)
        mine: Counter[str] = Counter()  # tokens of each client in this batch
        capped: set[str] = set()  # clients that have their share of this batch
        deferred = self._deferred()
        if deferred is not None and len(self._ring) > 1:
            capped.add(deferred)
        while self._ring:
            client = self._ring[0]
            queue = self._queues[client]
            head = queue[0]
            limit = room if not mine[client] else min(room, self._share(client, mine, active) - mine[client])
            whole = head.tokens <= limit
            tokens = head.tokens if whole else head.prefix_tokens(limit) if self.split_requests else 0
            if not tokens and limit == room:
                break  # full: the visit goes on in the next batch, and nobody is credited ahead of time
            if not tokens or client in capped:  # it has its share: the others go on
                capped.add(client)
                if capped.issuperset(self._ring):
                    break
                self._ring.rotate(-1)
                self._visiting = False
                continue
            if not self._visiting:
                self._deficit[client] += self.quantum
                self._visiting = True
            if tokens > self._deficit[client]:
                self._ring.rotate(-1)
                self._visiting = False
                continue
            self._deficit[client] -= tokens
            full = limit == room
            room -= tokens
            mine[client] += tokens
            if not whole:  # the room, or its share, is used up by a prefix of the head; the rest stays queued
                self._queued(client, -tokens)
                batch.append(head.take_prefix(tokens))
                if full:
                    break
                capped.add(client)
                continue
            self._left_queue(queue.popleft())
            batch.append(head)
        self._recent = set(mine)
        self._remember(mine)
        return batch

    def _deferred(self) -> str | None:
        """The client whose remembered service is above every other client's by more than a quantum (None if
        there is no such client, or with ``fair_share`` off)."""
        if not self.fair_share or len(self._service) < 2:
            return None
        first, second = heapq.nlargest(2, self._service.items(), key=lambda item: item[1])
        return first[0] if first[1] > second[1] + self.quantum else None

    def _remember(self, mine: Counter[str]) -> None:
        """Count what each client got in this batch, raise every count to the floor (one batch budget below the
        highest), and forget the clients on the floor with nothing queued or in flight."""
        for client, tokens in mine.items():
            self._service[client] += tokens
        floor = max(self._service.values(), default=0) - self.max_batch_tokens
        for client, count in list(self._service.items()):
            if count <= floor:
                if client in self._queues or self._inflight[client]:
                    self._service[client] = floor
                else:
                    del self._service[client]

    def _share(self, client: str, mine: Counter[str], active: int) -> int:
        """The most tokens of this batch ``client`` may hold beyond its first request, ``mine`` holding each
        client's tokens so far and ``active`` the number of active clients (see "Share of a batch" above)."""
        if not self.fair_share or active < 2:
            return self.max_batch_tokens
        share = self.max_batch_tokens // active
        if len(self._ring) == 1:  # the only one with queued work: no more than the others have on average
            others = [tokens for other, tokens in mine.items() if other != client]
            share = min(share, sum(others) // len(others) if others else self.quantum)
        return share

    def _left_queue(self, item: Item) -> None:
        """Bookkeeping of a request leaving its queue (the caller removed it from the deque)."""
        self._queued(item.client, -item.tokens)
        self.queued_requests -= 1
        client = item.client
        if not self._queues[client]:
            del self._queues[client]
            if self._ring[0] == client:
                self._visiting = False
            self._ring.remove(client)
            del self._deficit[client]


    def _queued(self, client: str, tokens: int) -> None:
        """Count ``tokens`` more (or fewer) tokens queued, in total and for ``client``."""
        self.queued_tokens += tokens
        self._client_queued_tokens[client] += tokens
        if not self._client_queued_tokens[client]:
            del self._client_queued_tokens[client]
