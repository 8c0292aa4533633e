"""Load and abuse on one replica: N concurrent streaming students, and well-behaved students beside an abuser.

    python -m bench.teacher_load [--seconds 15 --rounds 2 --threads 1 --step-ms 400]

One ``atkd-teacher serve`` subprocess on loopback (a random Llama, V = 8192, 2 layers of 128, 512 positions;
``--threads`` torch threads) with named tokens, one per client (``--auth-tokens-file``), so that every
client is its own client for fairness and limits. A student streams batches of 4 x 128 tokens (top-16,
fp16) over one ScoreStream with 2 in flight and decodes every response, as the student client does;
latency is from a request's send to its decoded response.

* **Load**: N = 1, 4, 8 students for ``--seconds`` each: failures (any error: none was asked for),
  p50 / p99 latency, tokens/s; the server's RSS (``/proc/PID/status``) after a warm-up (3 s of each
  kind of phase below), after the load phases, and after the whole run (abuse included), and their ratios.
* **Abuse**: 4 well-behaved students for ``--seconds`` alone, then beside one abuser, interleaved per
  round (alone, case 1, alone, case 2, alone, case 6) so that the machine's noise hits both sides of a
  ratio; the ratio is the well-behaved tokens/s beside the abuser over alone just before, median over
  ``--rounds``. Two kinds of students, each compared alone and beside each abuser:
  *saturating* ones ask for the next batch as soon as one is answered (4 of them alone already keep the
  replica busy, so an exactly fair fifth for the abuser leaves them 0.80x, the bound of this kind), and
  *training* ones, which train ``--step-ms`` on each batch while 2 more are scored (the trainer's
  prefetch), so that together they ask for about 60% of the replica, as students sized to a shared
  teacher do. The abusers (issue 11's cases):
  1. padding blow-up: Score requests of one 512-token sequence and 63 one-token sequences (575 tokens
     that admission counts; the engine pads them to 64 x 512), 4 outstanding;
  2. a ScoreStream that sends 200 requests (4 x 128 tokens, top-256) and never reads;
  6. 32 concurrent Score calls, each with a new ``atkd-client-id`` and every other one spoofing a
     well-behaved student's id, resubmitted as soon as answered or refused.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, LlamaConfig

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.codec import decode_signal
from atkd.proto.metadata import AUTHORIZATION_KEY, CLIENT_ID_KEY, bearer
from atkd.student.client import ScoreBatch
from atkd.student.client.channel import open_channel
from atkd.student.demo.teacher_process import teacher_process

VOCAB, CONTEXT, HIDDEN, LAYERS = 8192, 512, 128, 2
BATCH, SEQ, TOP_K, IN_FLIGHT = 4, 128, 16, 2
STUDENTS = [f"student{i}" for i in range(8)]
ABUSER = "abuser"


def build_model(directory: Path) -> Path:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=4 * HIDDEN, max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def token_of(name: str) -> str:
    return f"{name}-secret"


def metadata(name: str, *extra: tuple[str, str]) -> tuple:
    return ((AUTHORIZATION_KEY, bearer(token_of(name))), *extra)


@dataclass
class Tally:
    """What one client got: latencies (s) of its answered requests, tokens scored, failures."""

    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: list[str] = field(default_factory=list)


def student(address: str, name: str, stop: threading.Event, tally: Tally, seed: int, step_s: float = 0.0) -> None:
    """Stream 4 x 128-token batches with 2 in flight until ``stop``; decode every response. With ``step_s``,
    a training student: it sends its next request when it takes a response (as the trainer's prefetch
    does), then trains on it for ``step_s`` (a sleep: its own accelerator's time) before it takes the next."""
    generator = torch.Generator().manual_seed(seed)
    work = [ScoreBatch.of(torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)) for _ in range(8)]
    slots = threading.Semaphore(IN_FLIGHT)
    sent: dict[str, float] = {}

    def requests() -> Iterator[pb.ScoreRequest]:
        for index in itertools.count():
            slots.acquire()
            if stop.is_set():
                return
            sent[str(index)] = time.perf_counter()
            yield work[index % len(work)].to_request(str(index), top_k=TOP_K)

    channel = open_channel(address)
    try:
        for response in pb_grpc.TeacherStub(channel).ScoreStream(requests(), metadata=metadata(name), timeout=600):
            if response.HasField("error"):
                tally.failures.append(f"{response.error.code}: {response.error.message}")
            else:
                decode_signal(response.signal, vocab_size=VOCAB)
                tally.latencies.append(time.perf_counter() - sent.pop(response.id))
                tally.tokens += BATCH * SEQ
            slots.release()
            if step_s:
                stop.wait(step_s)
    except grpc.RpcError as error:
        tally.failures.append(f"{error.code().name}: {error.details()}")
    finally:
        slots.release()
        channel.close()


def padding_abuser(address: str, stop: threading.Event, tally: Tally) -> None:
    """Case 1: [512] + 63 x [1] tokens per request, 4 outstanding."""
    sequences = [list(range(1, CONTEXT + 1))] + [[7]] * 63
    message = pb.ScoreRequest(id="pad", token_ids=[t for s in sequences for t in s],
                              lengths=[len(s) for s in sequences], top_k=TOP_K)
    channel = open_channel(address)
    stub = pb_grpc.TeacherStub(channel)

    def one() -> None:
        while not stop.is_set():
            try:
                stub.Score(message, metadata=metadata(ABUSER), timeout=600)
                tally.tokens += len(message.token_ids)
            except grpc.RpcError as error:
                tally.failures.append(error.code().name)

    workers = [threading.Thread(target=one, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    channel.close()


def unread_abuser(address: str, stop: threading.Event, tally: Tally) -> None:
    """Case 2: 200 requests on a stream that is never read; cancelled at ``stop``."""
    batch = ScoreBatch.of(torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(9)))
    channel = open_channel(address)
    call = pb_grpc.TeacherStub(channel).ScoreStream(iter([batch.to_request(str(i), top_k=256) for i in range(200)]),
                                                    metadata=metadata(ABUSER), timeout=600)
    stop.wait()
    call.cancel()
    channel.close()


def rotating_abuser(address: str, stop: threading.Event, tally: Tally) -> None:
    """Case 6: 32 concurrent Score calls, a new client id each, every other one a well-behaved student's."""
    batch = ScoreBatch.of(torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7)))
    message = batch.to_request("x", top_k=TOP_K)
    channel = open_channel(address)
    stub = pb_grpc.TeacherStub(channel)
    ids = itertools.count()

    def one() -> None:
        while not stop.is_set():
            n = next(ids)
            client_id = STUDENTS[n % 4] if n % 2 else f"fresh-{n}"
            try:
                stub.Score(message, metadata=metadata(ABUSER, (CLIENT_ID_KEY, client_id)), timeout=600)
                tally.tokens += BATCH * SEQ
            except grpc.RpcError as error:
                tally.failures.append(error.code().name)
                time.sleep(0.001)

    workers = [threading.Thread(target=one, daemon=True) for _ in range(32)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    channel.close()


ABUSERS: dict[str, Callable[[str, threading.Event, Tally], None]] = {
    "1 padding blow-up": padding_abuser, "2 unread stream": unread_abuser, "6 rotating / spoofed ids": rotating_abuser}


@dataclass
class Phase:
    students: list[Tally]
    abuser: Tally | None
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.students) / self.seconds

    @property
    def failures(self) -> list[str]:
        return [f for t in self.students for f in t.failures]

    def latency_ms(self, q: float) -> float:
        latencies = sorted(x for t in self.students for x in t.latencies)
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")


def run_phase(address: str, n: int, seconds: float, abuser=None, seed: int = 0, step_s: float = 0.0) -> Phase:
    """``n`` students (training for ``step_s`` a batch, and ``abuser``) for ``seconds``; everyone's tokens
    count only within the window."""
    stop = threading.Event()
    tallies = [Tally() for _ in range(n)]
    abuse = Tally() if abuser else None
    threads = [threading.Thread(target=student, args=(address, STUDENTS[i], stop, tallies[i], seed + i, step_s),
                                daemon=True) for i in range(n)]
    if abuser:
        threads.append(threading.Thread(target=abuser, args=(address, stop, abuse), daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # ramp-up, not counted
    start = [(t.tokens, len(t.latencies)) for t in tallies]
    abuse_start = (abuse.tokens, len(abuse.latencies)) if abuse else None
    begun = time.perf_counter()
    time.sleep(seconds)
    counted = [_since(t, s) for t, s in zip(tallies, start, strict=True)]
    abuse_counted = _since(abuse, abuse_start) if abuse else None
    elapsed = time.perf_counter() - begun
    stop.set()
    for thread in threads:
        thread.join(600)
    return Phase(counted, abuse_counted, elapsed)


def _since(tally: Tally, start: tuple[int, int]) -> Tally:
    """The part of ``tally`` after ``start`` (tokens, number of latencies) until now."""
    return Tally(latencies=tally.latencies[start[1]:], tokens=tally.tokens - start[0], failures=list(tally.failures))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_drained(http_port: int, token: str, timeout: float = 600) -> None:
    """Until the server's queue is empty (and a moment for the batch on the worker)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/metrics", headers={"Authorization": bearer(token)})
    while time.monotonic() < deadline:
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
        queued = next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                      if s.name == "atkd_teacher_queue_tokens")
        if queued == 0:
            time.sleep(1.0)
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="counted seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the abuse comparison")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--step-ms", type=float, default=400.0,
                        help="training students' step: 4 of them then ask for about 60%% of the replica")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atkd-load-") as tmp:
        model_dir = build_model(Path(tmp) / "model")
        tokens = Path(tmp) / "tokens.yaml"
        tokens.write_text("".join(f"{name}: {token_of(name)}\n" for name in [*STUDENTS, ABUSER]))
        flags = ["--threads", str(args.threads), "--auth-tokens-file", str(tokens), "--max-wait-ms", "5"]
        with teacher_process(model_dir, extra_args=flags) as teacher:
            address, pid = teacher.address, teacher.process.pid
            # warm-up, one short phase of each kind: the allocator's arenas and the thread pools reach the
            # sizes this load needs, so that the RSS before and after compares like with like
            for abuser in (None, *ABUSERS.values()):
                run_phase(address, 8 if abuser is None else 4, 3.0, abuser)
                wait_drained(teacher.http_port, token_of(ABUSER))
            before = rss_mb(pid)
            print(f"## Load ({args.seconds:g} s per N, server --threads {args.threads}, "
                  f"batches {BATCH} x {SEQ} tokens, top-{TOP_K}, {IN_FLIGHT} in flight per student)\n")
            print("| N | requests | failures | p50 latency ms | p99 latency ms | tokens/s |")
            print("|---|---|---|---|---|---|")
            for n in (1, 4, 8):
                phase = run_phase(address, n, args.seconds, seed=10 * n)
                wait_drained(teacher.http_port, token_of(ABUSER))
                requests = sum(len(t.latencies) for t in phase.students)
                print(f"| {n} | {requests} | {len(phase.failures)} | {phase.latency_ms(0.5):.0f} | "
                      f"{phase.latency_ms(0.99):.0f} | {phase.tokens_per_s:.0f} |", flush=True)
            after_load = rss_mb(pid)
            kinds = {"saturating": 0.0, f"training ({args.step_ms:g} ms a step)": args.step_ms / 1000}
            key = list(itertools.product(kinds, ABUSERS))
            ratios: dict[tuple, list[float]] = {k: [] for k in key}
            abuser_tokens: dict[tuple, list[float]] = {k: [] for k in key}
            shares: dict[tuple, list[float]] = {k: [] for k in key}
            failures: dict[tuple, int] = {k: 0 for k in key}
            for round_ in range(args.rounds):
                for kind, name in key:
                    step_s = kinds[kind]
                    alone = run_phase(address, 4, args.seconds, seed=100 + round_, step_s=step_s)
                    wait_drained(teacher.http_port, token_of(ABUSER))
                    beside = run_phase(address, 4, args.seconds, ABUSERS[name], seed=100 + round_, step_s=step_s)
                    wait_drained(teacher.http_port, token_of(ABUSER))
                    ratios[kind, name].append(beside.tokens_per_s / alone.tokens_per_s)
                    abuser_tokens[kind, name].append(beside.abuser.tokens / beside.seconds)
                    shares[kind, name].append(beside.abuser.tokens / (beside.abuser.tokens + beside.tokens_per_s
                                                                      * beside.seconds))
                    failures[kind, name] += len(alone.failures) + len(beside.failures)
                    print(f"  round {round_}: {kind} students, case {name}: alone {alone.tokens_per_s:.0f} tok/s, "
                          f"beside {beside.tokens_per_s:.0f} tok/s (p99 {alone.latency_ms(0.99):.0f} -> "
                          f"{beside.latency_ms(0.99):.0f} ms), abuser {abuser_tokens[kind, name][-1]:.0f} tok/s",
                          flush=True)
            time.sleep(2.0)
            after = rss_mb(pid)
        print(f"\n## Abuse (4 well-behaved students; median of {args.rounds} interleaved rounds)\n")
        print("| students | abuser (issue 11 case) | well-behaved tokens/s beside / alone | their failures | "
              "abuser's tokens/s (answered) | abuser's share of the tokens answered |")
        print("|---|---|---|---|---|---|")
        for kind, name in key:
            print(f"| {kind} | {name} | {statistics.median(ratios[kind, name]):.2f}x | {failures[kind, name]} | "
                  f"{statistics.median(abuser_tokens[kind, name]):.0f} | "
                  f"{statistics.median(shares[kind, name]):.1%} |")
        print(f"\nserver RSS: {before:.0f} MB after the warm-up, {after_load:.0f} MB after the load phases, "
              f"{after:.0f} MB after the whole run ({100 * (after / before - 1):+.1f}% since the warm-up, "
              f"{100 * (after / after_load - 1):+.1f}% over the {len(key) * args.rounds * 2} abuse phases)")


if __name__ == "__main__":
    main()
