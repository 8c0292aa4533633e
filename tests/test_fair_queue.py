"""services/teacher/fair_queue.py without an event loop: who goes into a batch, and who may queue."""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass

import pytest

from atkd.services.teacher.errors import ResourceExhausted
from atkd.services.teacher.fair_queue import FairQueue


@dataclass(eq=False)
class Request:
    """A request of one sequence, or of ``sequences`` (token counts) that may be split between them."""

    client: str
    tokens: int
    arrived: float = 0.0
    name: str = ""
    sequences: tuple[int, ...] = ()

    def prefix_tokens(self, room: int) -> int:
        fitting = [end for end in itertools.accumulate(self.sequences) if end <= room]
        return fitting[-1] if fitting else 0

    def take_prefix(self, tokens: int) -> Request:
        count = list(itertools.accumulate(self.sequences)).index(tokens) + 1
        part = Request(self.client, tokens, self.arrived, f"{self.name}[:{count}]", self.sequences[:count])
        self.sequences, self.tokens = self.sequences[count:], self.tokens - tokens
        return part


def queue(**overrides) -> FairQueue[Request]:
    options = dict(max_batch_tokens=128, max_queue_tokens=1024, max_inflight_per_client=16)
    return FairQueue(**{**options, **overrides})


def names(batch: list[Request]) -> list[str]:
    return [request.name for request in batch]


def test_backlogged_clients_share_a_batch_by_tokens():
    fair = queue()  # quantum 16 tokens
    for i in range(8):
        fair.push(Request("heavy", 16, name=f"h{i}"))
    for i in range(4):
        fair.push(Request("light", 16, name=f"l{i}"))
    batch = fair.take_batch()
    assert names(batch) == ["h0", "l0", "h1", "l1", "h2", "l2", "h3", "l3"]
    assert fair.queued_tokens == 4 * 16 and fair.queued_requests == 4


def test_a_request_larger_than_the_room_left_waits_for_the_next_batch():
    fair = queue(max_batch_tokens=100)
    fair.push(Request("a", 60, name="a0"))
    fair.push(Request("b", 60, name="b0"))
    assert names(fair.take_batch()) == ["a0"]
    assert names(fair.take_batch()) == ["b0"]
    assert fair.take_batch() == []


def test_admission_limits_per_client_and_in_total():
    fair = queue(max_inflight_per_client=2, max_queue_tokens=150, max_batch_tokens=100)
    first, second = Request("a", 50), Request("a", 50)
    fair.push(first)
    fair.push(second)
    with pytest.raises(ResourceExhausted, match="client 'a' already has 2 requests in flight"):
        fair.admit("a", 1)
    with pytest.raises(ResourceExhausted, match=r"queue is full \(100 tokens queued, limit 150\)"):
        fair.admit("b", 51)
    fair.admit("b", 50)  # fits exactly
    assert fair.saturated  # 50 tokens of room < one full batch of 100
    taken = fair.take_batch()
    assert taken == [first, second] and fair.inflight("a") == 2  # computing still counts as in flight
    fair.finished(first)
    assert fair.inflight("a") == 1
    fair.admit("a", 1)


def test_a_request_finished_while_queued_leaves_its_queue():
    fair = queue()
    cancelled, kept = Request("a", 10, name="cancelled"), Request("b", 10, name="kept")
    fair.push(cancelled)
    fair.push(kept)
    fair.finished(cancelled)
    assert fair.queued_requests == 1 and fair.inflight("a") == 0
    assert names(fair.take_batch()) == ["kept"]


def test_oldest_arrival_is_the_head_that_waited_longest():
    fair = queue()
    assert fair.oldest_arrival is None
    fair.push(Request("a", 1, arrived=5.0))
    fair.push(Request("b", 1, arrived=3.0))
    fair.push(Request("b", 1, arrived=1.0))  # behind b's head: not a head
    assert fair.oldest_arrival == 3.0


def test_a_split_request_fills_the_room_left_and_keeps_its_rest_at_the_head():
    fair = queue(max_batch_tokens=4096)  # two students of the example config: 16 x 129 = 2064 tokens each
    for client in ("a", "b"):
        fair.push(Request(client, 2064, name=client, sequences=(129,) * 16))
    first = fair.take_batch()
    assert names(first) == ["a", "b[:15]"] and sum(r.tokens for r in first) == 2064 + 15 * 129
    assert fair.queued_tokens == 129 and fair.queued_requests == 1 and fair.inflight("b") == 1
    fair.push(Request("a", 2064, name="a2", sequences=(129,) * 16))
    second = fair.take_batch()
    assert names(second) == ["b", "a2"]  # b's last sequence, then a's next request whole
    assert fair.queued_requests == 0


def test_a_request_of_one_sequence_is_never_split():
    fair = queue(max_batch_tokens=100)
    fair.push(Request("a", 60, name="a0"))
    fair.push(Request("b", 60, name="b0", sequences=(60,)))
    assert names(fair.take_batch()) == ["a0"]


def test_with_splitting_off_requests_are_taken_whole():
    fair = queue(max_batch_tokens=4096, split_requests=False)
    for client in ("a", "b"):
        fair.push(Request(client, 2064, name=client, sequences=(129,) * 16))
    assert names(fair.take_batch()) == ["a"]
    assert names(fair.take_batch()) == ["b"]


# -- share of a batch: a backlogged client beside light ones (issue 11, "Load", case 6) --------------------
def student_request(client: str, name: str = "") -> Request:
    return Request(client, 512, name=name or client, sequences=(128,) * 4)  # 4 x 128 tokens, as bench.teacher_load


def served(batch: list[Request], client: str) -> int:
    return sum(request.tokens for request in batch if request.client == client)


@pytest.mark.parametrize("fair_share", [True, False])
def test_a_backlogged_client_beside_light_ones_gets_its_share_of_each_batch_not_the_room_they_leave(fair_share):
    """4 students with a request each and one backlogged client: before, every batch took the students' 2048
    tokens and filled the other 2048 with the backlog (work-conserving), so every student waited for a batch
    of the whole budget; now the backlog adds what a student adds (512 tokens) while the students are active,
    also to a batch none of them is queued for (their answers are on their way back); alone, it fills every
    batch."""
    fair = queue(max_batch_tokens=4096, max_queue_tokens=1 << 20, fair_share=fair_share)
    students = [f"student{i}" for i in range(4)]
    for i in range(64):  # more than it can be served here: backlogged throughout
        fair.push(student_request("abuser", f"a{i}"))
    backlog = []
    for _ in range(4):  # each student's answer comes back and it sends its next request
        for name in students:
            fair.push(student_request(name))
        batch = fair.take_batch()
        assert all(served(batch, name) == 512 for name in students)
        backlog.append(served(batch, "abuser"))
    gap = served(fair.take_batch(), "abuser")  # the students' next requests not back yet
    alone = [served(fair.take_batch(), "abuser") for _ in range(2)]
    if fair_share:
        assert backlog == [512] * 4 and gap == 512
        assert alone == [4096, 4096]  # the students gone: one batch later it fills every batch
    else:  # the old, work-conserving rotation
        assert backlog == [2048] * 4 and gap == 4096 and alone == [4096, 4096]


@pytest.mark.parametrize("memory", [True, False])
def test_a_backlogged_client_gets_no_more_than_light_clients_that_sometimes_miss_a_batch(memory, monkeypatch):
    """Issue 11, cases 1 and 6 on the replica: a student with 2 in flight is sometimes between requests when a
    batch is taken, while a backlogged client always has one queued. Shares per batch alone let the backlog
    into every batch (it got 4/3 of what each student got here: 28% of the compute instead of 20%); with the
    memory of service it is deferred while it is ahead by more than a quantum, so it gets what they get.
    (Without it: the abuser's 48 x 512 tokens against 36 x 512 for each student.)"""
    if not memory:
        monkeypatch.setattr(FairQueue, "_deferred", lambda self: None)
    fair = queue(max_batch_tokens=4096, max_queue_tokens=1 << 20)
    students = [f"student{i}" for i in range(4)]
    for i in range(64):
        fair.push(student_request("abuser", f"a{i}"))
    got: Counter[str] = Counter()
    for t in range(48):
        for i, name in enumerate(students):
            if i != t % 4:  # student t % 4 is between requests for this batch
                fair.push(student_request(name))
        for part in fair.take_batch():
            got[part.client] += part.tokens
            fair.finished(part)
    assert {got[name] for name in students} == {36 * 512}  # each missed 12 of the 48 batches
    if memory:  # ahead by at most the quantum (512) and the request it had in the batch before
        assert got["student0"] <= got["abuser"] <= got["student0"] + 2 * 512
    else:
        assert got["abuser"] == 48 * 512  # into every batch


def test_a_light_client_that_turns_heavy_holds_the_others_back_for_about_one_batch_not_for_all_it_did_not_use():
    """The counts are kept within one batch budget of the highest: a client that kept one request in flight
    for 20 batches while another was served alone does not then take every batch until it has caught up."""
    fair = queue(max_batch_tokens=4096, max_queue_tokens=1 << 20)
    fair.push(student_request("light", "stuck"))
    fair.take_batch()  # its one request is computing (never answered here): it stays in flight, remembered
    for i in range(200):
        fair.push(student_request("heavy", f"h{i}"))
    alone = [served(fair.take_batch(), "heavy") for _ in range(20)]
    assert alone[1:] == [4096] * 19  # (the first batch after light's: a quantum, see the test above)
    for _ in range(64):
        fair.push(student_request("light"))
    shared = [fair.take_batch() for _ in range(8)]
    held_back = [served(batch, "heavy") for batch in shared].count(0)
    assert held_back <= 2  # 4096 - 512 tokens to catch up at 2048 a batch; 20 batches without the floor
    assert [(served(b, "heavy"), served(b, "light")) for b in shared[held_back:]] == \
        [(2048, 2048)] * (8 - held_back)


def test_a_single_client_still_fills_every_batch_and_two_backlogged_clients_share_them():
    fair = queue(max_batch_tokens=4096, max_queue_tokens=1 << 20)
    for i in range(32):
        fair.push(student_request("a", f"a{i}"))
    assert [served(fair.take_batch(), "a") for _ in range(2)] == [4096, 4096]
    for i in range(32):
        fair.push(student_request("b", f"b{i}"))
    batches = [fair.take_batch() for _ in range(3)]
    assert [(served(batch, "a"), served(batch, "b")) for batch in batches] == [(2048, 2048)] * 3


def test_a_request_larger_than_its_share_still_enters_a_batch_whole():
    """The share binds beyond a client's first request in a batch, so no request waits for ever."""
    fair = queue(max_batch_tokens=100, max_queue_tokens=1000, split_requests=False)
    for client in "abcd":
        fair.push(Request(client, 10, name=client))
    fair.take_batch()
    fair.push(Request("big", 60, name="big0"))
    fair.push(Request("big", 60, name="big1"))
    for client in "abcd":
        fair.push(Request(client, 10, name=client))
    batch = fair.take_batch()  # 5 active clients: a share of 20 tokens each, but big's first request is whole
    assert sorted(names(batch)) == ["a", "b", "big0", "c", "d"]


def closed_loop(fair: FairQueue, clients: dict[str, int], seconds: float = 20.0) -> Counter:
    """Tokens served per client in ``seconds`` of simulated time (no clock: a discrete-event loop): each client
    keeps ``clients[name]`` requests of 4 x 128 tokens in flight, sending the next 20 ms after an answer; a
    batch starts when the engine is free and takes ``fair.take_batch()``; it costs 4 ms + 0.1 ms a token."""
    events, order, served, busy = [], itertools.count(), Counter(), False
    for name, in_flight in clients.items():
        for _ in range(in_flight):
            heapq.heappush(events, (0.0, next(order), "send", name))
    while events and events[0][0] < seconds:
        now, _, kind, what = heapq.heappop(events)
        if kind == "send":
            fair.push(student_request(what))
        elif kind == "answer":
            fair.finished(what)
            heapq.heappush(events, (now + 0.02, next(order), "send", what.client))
        else:  # a batch is done
            busy = False
            for part in what:
                served[part.client] += part.tokens
        if not busy and fair.queued_requests:
            batch = fair.take_batch()
            done = now + 0.004 + 1e-4 * sum(part.tokens for part in batch)
            heapq.heappush(events, (done, next(order), "batch", batch))
            for part in batch:
                if "[" not in part.name:  # taken whole, or its last part: answered with this batch
                    heapq.heappush(events, (done, next(order), "answer", part))
            busy = True
    return served


def test_over_time_a_backlogged_client_gets_what_each_light_client_gets():
    """Issue 11, "Load", case 6 simulated: 4 students with 2 requests in flight and one client with 16. Before,
    the backlogged client got 4 times what each student got (work-conserving rotation); now the same."""
    clients = {**{f"student{i}": 2 for i in range(4)}, "abuser": 16}
    fair_share = closed_loop(queue(max_batch_tokens=4096, max_queue_tokens=1 << 20), clients)
    fill = closed_loop(queue(max_batch_tokens=4096, max_queue_tokens=1 << 20, fair_share=False), clients)
    for served in (fair_share, fill):
        assert len({served[f"student{i}"] for i in range(4)}) <= 2  # the students are served alike
    student = fair_share["student0"]
    assert fair_share["abuser"] <= 1.05 * student
    assert fill["abuser"] >= 3 * fill["student0"]  # the old rotation
    assert sum(fair_share.values()) >= 0.97 * sum(fill.values())  # the engine is not left idle for it
    # the acceptance's ratio on this model of the machine: 0.80 (the students alone nearly saturate the
    # engine, so an equal fifth for the abuser is about all they can lose); 0.50 before
    alone = closed_loop(queue(max_batch_tokens=4096, max_queue_tokens=1 << 20), {f"student{i}": 2 for i in range(4)})
    assert student >= 0.78 * alone["student0"] and fill["student0"] <= 0.55 * alone["student0"]
