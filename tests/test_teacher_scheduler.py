"""services/teacher/scheduler.py on a fake engine: batching triggers, fairness, backpressure, deadlines."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import grpc
import pytest

from atkd.services.teacher.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from atkd.services.teacher.metrics import TeacherMetrics
from atkd.services.teacher.scheduler import Scheduler


@dataclass(eq=False)
class FakeJob:
    name: str
    tokens: int

    @property
    def num_positions(self) -> int:
        return self.tokens

    def prefix_tokens(self, room: int) -> int:
        return 0  # one sequence: never split


class FakeEngine:
    """Records the batches it computes (as job names); blocks while ``gate`` is clear; fails on demand."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_next = False

    def __call__(self, jobs):
        self.started.set()
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("out of memory")
        self.batches.append([job.name for job in jobs])
        return [f"signal of {job.name}" for job in jobs]


def make(engine, **overrides) -> Scheduler:
    options = dict(max_batch_tokens=128, max_wait_s=0.005, max_queue_tokens=1024, max_inflight_per_client=16)
    scheduler = Scheduler(engine, TeacherMetrics(), **{**options, **overrides})
    scheduler.start()
    return scheduler


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


def test_a_full_batch_starts_at_once_a_partial_one_after_max_wait():
    async def main():
        engine = FakeEngine()
        scheduler = make(engine, max_wait_s=0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(scheduler.submit("a", FakeJob(f"full{i}", 64)) for i in range(2)))
        full = loop.time() - start
        start = loop.time()
        scored = await scheduler.submit("a", FakeJob("small", 10))
        partial = loop.time() - start
        await scheduler.stop()
        return engine.batches, full, partial, scored

    batches, full, partial, scored = run(main())
    assert batches == [["full0", "full1"], ["small"]]
    assert full < 0.25 <= 0.3 <= partial + 0.01
    assert scored.signal == "signal of small" and scored.batch_tokens == 10 and scored.queue_s >= 0.29


def test_deficit_round_robin_serves_a_light_client_between_heavy_requests():
    async def main():
        engine = FakeEngine()
        scheduler = make(engine)
        heavy = [asyncio.create_task(scheduler.submit("heavy", FakeJob(f"H{i}", 64))) for i in range(8)]
        light = [asyncio.create_task(scheduler.submit("light", FakeJob(f"L{i}", 64))) for i in range(2)]
        await asyncio.gather(*heavy, *light)
        await scheduler.stop()
        return engine.batches

    # the batch after the light client's last one still counts it active (its answer is on its way back):
    # the heavy client gets its share, H2; alone from then on, it fills every batch
    assert run(main()) == [["H0", "L0"], ["H1", "L1"], ["H2"], ["H3", "H4"], ["H5", "H6"], ["H7"]]


def test_a_client_arriving_during_a_batch_is_served_in_the_next_one():
    """One request per batch; the light client's request arrives while the heavy backlog waits."""

    async def main():
        engine = FakeEngine()
        engine.gate.clear()
        scheduler = make(engine, max_batch_tokens=64)
        heavy = [asyncio.create_task(scheduler.submit("heavy", FakeJob(f"H{i}", 64))) for i in range(4)]
        await asyncio.to_thread(engine.started.wait, 5)
        light = asyncio.create_task(scheduler.submit("light", FakeJob("L0", 64)))
        await asyncio.sleep(0)
        engine.gate.set()
        await asyncio.gather(*heavy, light)
        await scheduler.stop()
        return engine.batches

    assert run(main()) == [["H0"], ["L0"], ["H1"], ["H2"], ["H3"]]


def test_equal_clients_share_every_batch():
    async def main():
        engine = FakeEngine()
        scheduler = make(engine, max_batch_tokens=96)
        tasks = [asyncio.create_task(scheduler.submit(client, FakeJob(f"{client}{i}", 32)))
                 for client in "abc" for i in range(4)]
        await asyncio.gather(*tasks)
        await scheduler.stop()
        return engine.batches

    assert [sorted(name[0] for name in batch) for batch in run(main())] == [["a", "b", "c"]] * 4


def test_backpressure_refuses_with_resource_exhausted():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()
        scheduler = make(engine, max_batch_tokens=200, max_inflight_per_client=2, max_queue_tokens=200)
        first = [asyncio.create_task(scheduler.submit("a", FakeJob(f"a{i}", 100))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="client 'a' already has 2 requests in flight, the limit is 2"):
            await scheduler.submit("a", FakeJob("a2", 1))
        await asyncio.to_thread(engine.started.wait, 5)  # a0 and a1 computing: the queue is empty again
        queued = [asyncio.create_task(scheduler.submit("b", FakeJob(f"b{i}", 100))) for i in range(2)]
        await asyncio.sleep(0)
        assert scheduler.saturated and scheduler.queue.queued_tokens == 200
        with pytest.raises(ResourceExhausted, match=r"queue is full \(200 tokens queued, limit 200\)"):
            await scheduler.submit("c", FakeJob("c0", 1))
        engine.gate.set()
        await asyncio.gather(*first, *queued)
        assert not scheduler.saturated and scheduler.inflight("a") == 0
        await scheduler.stop()

    run(main())
    assert ResourceExhausted.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cancelled_and_expired_requests_are_never_computed():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()
        scheduler = make(engine, max_batch_tokens=10)
        running = asyncio.create_task(scheduler.submit("a", FakeJob("running", 10)))
        await asyncio.to_thread(engine.started.wait, 5)
        cancelled = asyncio.create_task(scheduler.submit("b", FakeJob("cancelled", 10)))
        await asyncio.sleep(0)
        assert scheduler.queue.queued_requests == 1
        cancelled.cancel()
        with pytest.raises(DeadlineExceeded, match="without being scheduled"):
            await scheduler.submit("c", FakeJob("expired", 10), timeout_s=0.05)
        assert scheduler.queue.queued_requests == 0 and scheduler.queue.queued_tokens == 0
        engine.gate.set()
        await running
        await scheduler.submit("b", FakeJob("after", 10))
        assert scheduler.idle and (scheduler.inflight("b"), scheduler.inflight("c")) == (0, 0)
        await scheduler.stop()
        return engine.batches

    assert run(main()) == [["running"], ["after"]]


def test_an_engine_failure_fails_its_batch_only():
    async def main():
        engine = FakeEngine()
        engine.fail_next = True
        scheduler = make(engine)
        with pytest.raises(ServiceError, match="RuntimeError: out of memory") as failure:
            await scheduler.submit("a", FakeJob("doomed", 8))
        assert failure.value.code == grpc.StatusCode.INTERNAL
        scored = await scheduler.submit("a", FakeJob("fine", 8))
        await scheduler.stop()
        return scored.signal

    assert run(main()) == "signal of fine"


def test_closing_flushes_the_queue_and_refuses_new_requests():
    async def main():
        engine = FakeEngine()
        scheduler = make(engine, max_wait_s=30.0)
        waiting = asyncio.create_task(scheduler.submit("a", FakeJob("waiting", 8)))
        await asyncio.sleep(0)
        scheduler.close()  # no 30 s wait for a full batch
        await asyncio.wait_for(scheduler.drained(), 5)
        assert (await waiting).signal == "signal of waiting"
        with pytest.raises(Unavailable, match="shutting down"):
            await scheduler.submit("a", FakeJob("late", 8))
        await scheduler.stop()

    run(main())
