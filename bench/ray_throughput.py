"""Teacher on Ray Serve vs the plain gRPC server: tokens/s at saturation, Serve batching vs the Scheduler, latency.

    python -m bench.ray_throughput [--rounds 3 --requests 6 --clients 4 --threads 2]

The model, request shape and server flags of ``bench.teacher_throughput`` (a random Llama, V = 8192,
sequences of 256 tokens, top-64 fp16, batches of up to 2048 tokens, 5 ms batch wait, ``--threads``
torch threads); each request holds 4 sequences (1024 tokens), so a batch holds two requests. Variants,
all up at once on the same machine, measured in turn in every round:
  * plain: ``python -m atkd.services.teacher.cli serve`` in a subprocess (``bench.teacher_throughput.Server``);
  * serve/scheduler: the Ray Serve app of ``atkd.services.teacher.ray_app`` (one replica, the Scheduler inside);
  * serve/@serve.batch: the same replica with ``@serve.batch(max_batch_size=2)`` in place of the Scheduler.
Saturation: ``--clients`` student clients with 2 ``score_async`` calls each in flight (the student's
prefetch; 8 requests, four batches' worth, at the defaults), and the same clients on ``ScoreStream`` with 2
in flight. The ratio of a variant is the median over the rounds of its tokens/s over plain unary's of the
same round.
Where the time goes, one request at a time: the replica's compute (forward + compression, from the
response's ``timing``), and the latency of the same request through the plain server, through a Serve
``DeploymentHandle`` from this process (Ray actor call and object transfer, no proxy) and through Serve's
gRPC proxy (proxy hop on top); the same for ``Info`` (no compute, a small message).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch
from ray import serve

from atkd.proto import teacher_pb2 as pb
from atkd.services.teacher.config import TeacherConfig
from atkd.services.teacher.engine import TeacherEngine
from atkd.services.teacher.ray_app import GRPC_SERVICER_FUNCTIONS, TeacherReplica, application, free_port
from atkd.services.teacher.request import ScoreJob
from atkd.services.teacher.scheduler import Scored
from atkd.services.teacher.servicer import TeacherServicer
from atkd.student.client import ScoreBatch, TeacherClient
from bench.teacher_throughput import BATCH_TOKENS, SEQ, TOP_K, VOCAB, Server, build_model

SEQUENCES_PER_REQUEST = 4
REQUEST_TOKENS = SEQUENCES_PER_REQUEST * SEQ
IN_FLIGHT = 2


class ServeBatcher:
    """``@serve.batch`` behind the Scheduler's ``submit``: up to 2 requests (2048 tokens) per batch, 5 ms wait.

    The engine runs on one dedicated thread, as in the Scheduler: with ``asyncio.to_thread`` the forwards
    rotate over the default executor's threads, each with an OpenMP team of its own, and the replica used
    about a third more CPU per token on this machine."""

    def __init__(self, engine: TeacherEngine):
        self._engine = engine
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="teacher-engine")

    @serve.batch(max_batch_size=BATCH_TOKENS // REQUEST_TOKENS, batch_wait_timeout_s=0.005)
    async def _score(self, jobs: list[ScoreJob]) -> list[Scored]:
        started = time.perf_counter()
        signals = await asyncio.get_running_loop().run_in_executor(self._thread, self._engine.score, jobs)
        compute = time.perf_counter() - started
        return [Scored(signal, 0.0, compute, sum(job.tokens for job in jobs)) for signal in signals]

    async def submit(self, client: str, job: ScoreJob, timeout_s: float | None = None) -> Scored:
        return await self._score(job)

    async def stop(self) -> None:
        self._thread.shutdown(wait=False)


class ServeBatchReplica(TeacherReplica):
    """The teacher replica with ``@serve.batch`` in place of the Scheduler (and none of its limits)."""

    async def __init__(self, config: dict):
        await super().__init__(config)
        replica = self.replica
        await replica.scheduler.stop()
        replica.servicer = TeacherServicer(replica.info, replica.limits, ServeBatcher(replica.engine), replica.metrics)


def request_batches(count: int, seed: int) -> list[ScoreBatch]:
    g = torch.Generator().manual_seed(seed)
    return [ScoreBatch.of(torch.randint(0, VOCAB, (SEQUENCES_PER_REQUEST, SEQ), generator=g)) for _ in range(count)]


def saturate(address: str, application: str | None, clients: int, requests: int, stream: bool,
             seed: int) -> tuple[float, Counter[str]]:
    """tokens/s of ``clients`` clients with IN_FLIGHT requests each in flight, ``requests`` requests per client,
    and the CPU seconds each role used meanwhile."""
    work = [request_batches(requests, seed + c) for c in range(clients)]
    barrier = threading.Barrier(clients + 1)
    finished: list[float] = []

    def unary(client: TeacherClient, batches: list[ScoreBatch]) -> None:
        """The student's prefetch: IN_FLIGHT ``score_async`` calls out, the oldest collected first."""
        barrier.wait()
        pending: deque = deque()
        for batch in batches:
            pending.append(client.score_async(batch.input_ids, top_k=TOP_K))
            if len(pending) == IN_FLIGHT:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
        finished.append(time.perf_counter())

    def streaming(client: TeacherClient, batches: list[ScoreBatch]) -> None:
        barrier.wait()
        for _ in client.score_stream(batches, in_flight=IN_FLIGHT, top_k=TOP_K):
            pass
        finished.append(time.perf_counter())

    connections = [TeacherClient(address, client_id=f"client{c}", application=application) for c in range(clients)]
    threads = []
    for client, batches in zip(connections, work, strict=True):
        client.score(batches[0].input_ids[:1], top_k=TOP_K)  # connect and check before the clock starts
        threads.append(threading.Thread(target=streaming if stream else unary, args=(client, batches)))
    for thread in threads:
        thread.start()
    barrier.wait()
    start, cpu_before = time.perf_counter(), cpu_seconds()
    for thread in threads:
        thread.join()
    cpu = cpu_seconds()
    cpu.subtract(cpu_before)
    cpu["others on the machine"] = cpu["machine"] - sum(value for role, value in cpu.items() if role != "machine")
    for client in connections:
        client.close()
    return clients * requests * REQUEST_TOKENS / (max(finished) - start), cpu


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds() -> Counter[str]:
    """CPU seconds (user + system) so far of this process and its descendants by role, and of the whole machine
    (``machine``), from /proc: the plain server and Ray's processes (raylet, GCS, proxy, replicas) are all
    started from this process."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # exited meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # fields[1] is the parent, fields[11:13] utime and stime
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, title)
    ours = {os.getpid()}
    for _ in range(4):  # raylet and GCS are children of this process, Ray's workers children of the raylet
        ours |= {pid for pid, (parent, _, _) in stats.items() if parent in ours}
    seconds: Counter[str] = Counter()
    for pid in ours & stats.keys():
        seconds[_role(pid, stats[pid][2])] += stats[pid][1]
    with open("/proc/stat") as machine:
        jiffies = [int(value) for value in machine.readline().split()[1:]]
    seconds["machine"] = (sum(jiffies) - jiffies[3] - jiffies[4]) / ticks  # all but idle and iowait
    return seconds


def _role(pid: int, title: str) -> str:
    if pid == os.getpid():
        return "bench (clients)"
    if "atkd.services.teacher.cli" in title:
        return "plain server"
    if title.startswith("ray::ServeReplica"):
        return "replica " + title.split(":")[3]  # ray::ServeReplica:APP:DEPLOYMENT
    if title.startswith("ray::ProxyActor"):
        return "serve proxy"
    return "other Ray processes"


ROLES = ("plain server", "replica scheduler", "replica serve-batch", "serve proxy", "other Ray processes",
         "bench (clients)", "others on the machine")


def latencies(plain: str, serve_address: str, handle, application: str) -> list[tuple[str, float, float, float]]:
    """(call, plain ms, via handle ms, via gRPC proxy ms) of Info and of one Score request at a time."""
    batch = request_batches(1, seed=999)[0]
    message = batch.to_request("0", top_k=TOP_K)
    with TeacherClient(plain) as direct, TeacherClient(serve_address, application=application) as proxied:
        rows = [("Info", *(1e3 * median_seconds(call, 30) for call in (
            direct.info, lambda: handle.Info.remote(pb.InfoRequest()).result(), proxied.info)))]  # fmt: skip
        rows.append((f"Score ({REQUEST_TOKENS} tokens)", *(1e3 * median_seconds(call, 7) for call in (
            lambda: direct.score(batch.input_ids, top_k=TOP_K), lambda: handle.Score.remote(message).result(),
            lambda: proxied.score(batch.input_ids, top_k=TOP_K)))))  # fmt: skip
        compute = [handle.Score.remote(message).result().timing.compute_ms for _ in range(5)]
    rows.append(("  of which the replica's compute", *[statistics.median(compute)] * 3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="requests per client per measurement")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every teacher")
    parser.add_argument("--hidden", type=int, default=320)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    params = build_model(workdir, args.hidden, args.layers)
    plain = Server(workdir, args.threads)
    # Two replicas of --threads CPUs each; Ray's own processes take no CPU resources but do use the cores.
    ray.init(address="local", num_cpus=2 * args.threads, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False)
    try:
        port = free_port("127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": free_port("127.0.0.1")},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        config = TeacherConfig(model=workdir, max_batch_tokens=BATCH_TOKENS, max_wait_ms=5, top_k_max=256,
                               max_queue_tokens=16 * BATCH_TOKENS, threads=args.threads)
        actor = {"num_cpus": args.threads}
        handle = serve.run(application(config, ray_actor_options=actor), name="scheduler", route_prefix="/scheduler")
        batched = serve.deployment(ServeBatchReplica, name="TeacherServeBatch", max_ongoing_requests=32,
                                   ray_actor_options=actor).bind(config.model_dump(mode="json"))
        serve.run(batched, name="serve-batch", route_prefix="/serve-batch")
        serve_address = f"127.0.0.1:{port}"
        print(f"Llama {params / 1e6:.1f}M params, V={VOCAB}, requests of {SEQUENCES_PER_REQUEST}x{SEQ} tokens, "
              f"batches of up to {BATCH_TOKENS} tokens, top-{TOP_K} fp16, {args.threads} torch threads per teacher, "
              f"{args.clients} clients x {IN_FLIGHT} in flight, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at start")

        variants = {
            "plain, unary Score": (plain.address, None, False),
            "plain, ScoreStream": (plain.address, None, True),
            "serve/scheduler, unary Score": (serve_address, "scheduler", False),
            "serve/scheduler, ScoreStream": (serve_address, "scheduler", True),
            "serve/@serve.batch, unary Score": (serve_address, "serve-batch", False),
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, Counter[str]] = {name: Counter() for name in variants}
        for round_ in range(args.rounds):
            for name, (address, app, stream) in variants.items():
                rate, used = saturate(address, app, args.clients, args.requests, stream, seed=100 * round_)
                results[name].append(rate)
                cpu[name].update(used)
        baseline = results["plain, unary Score"]
        print(f"\nThroughput at saturation ({args.rounds} rounds; ratio: median of the per-round ratios to plain "
              "unary)")
        print(f"{'variant':<34} {'tok/s':>7} {'ratio':>6}  per-round ratios")
        for name, runs in results.items():
            ratios = [run / base for run, base in zip(runs, baseline, strict=True)]
            print(f"{name:<34} {statistics.median(runs):>7.0f} {statistics.median(ratios):>6.2f}  "
                  + " ".join(f"{r:.2f}" for r in ratios))
        tokens = args.rounds * args.clients * args.requests * REQUEST_TOKENS / 1000
        print("\nCPU ms per 1000 tokens, by process, over all rounds (2 cores: the teacher's forward competes with "
              "everything else)")
        print(f"{'variant':<34} " + " ".join(f"{role:>{max(9, len(role))}}" for role in ROLES))
        for name, used in cpu.items():
            print(f"{name:<34} " + " ".join(f"{1e3 * used[role] / tokens:>{max(9, len(role))}.0f}" for role in ROLES))

        print("\nOne call at a time, median ms")
        print(f"{'call':<34} {'plain':>8} {'handle':>8} {'proxy':>8}")
        for name, *values in latencies(plain.address, serve_address, handle, "scheduler"):
            print(f"{name:<34} " + " ".join(f"{v:>8.1f}" for v in values))
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    finally:
        serve.shutdown()
        ray.shutdown()
        plain.close()


if __name__ == "__main__":
    main()
