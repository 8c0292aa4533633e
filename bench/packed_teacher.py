"""Packed teacher batches: mixed vs equal sequence lengths of the same tokens, packed vs padded, through the server.

    python -m bench.packed_teacher [--rounds 5 --requests 6 --threads 2]

One model (the random Llama of :mod:`bench.teacher_throughput`, V = 8192, 512 positions), two server
subprocesses started alike, one with ``--packing auto`` (the engine packs the batch's sequences into
one row, attention per sequence) and one with ``--packing off`` (the fallback: right-padded, in
groups of similar lengths). Each request is one batch of 16 sequences (``--max-batch-tokens`` =
2176, its size), all positions scored, top-64, sent over one ScoreStream with 2 requests in flight:

  * mixed: lengths 16, 32, .., 256 (shuffled per request), 2176 tokens;
  * equal: 16 x 136 tokens, the same 2176 tokens.

Tokens/s per (engine, workload) is measured ``--requests`` requests at a time; the four variants run
in turn within each of ``--rounds`` rounds (in a new order each round), and each ratio is the median
of the rounds' ratios, so load from other processes on the shared machine hits both sides alike.
``forwarded / real`` is the server's ``atkd_teacher_forwarded_tokens`` over ``atkd_teacher_tokens``
(padding included vs the requests' tokens).

Then the request of issue 11 (``[512] + 63 x [1]``, 575 tokens) against the same tokens as two
sequences (``[512, 63]``): median seconds per request on each server, interleaved, after a warm-up.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from atkd.student.client import ScoreBatch, TeacherClient
from atkd.student.demo.teacher_process import teacher_process

from .teacher_throughput import VOCAB, Server, build_model

SEQUENCES, TOP_K, CONTEXT = 16, 64, 512
MIXED = [16 * (i + 1) for i in range(SEQUENCES)]  # 16 .. 256
EQUAL = [sum(MIXED) // SEQUENCES] * SEQUENCES  # 16 x 136
BATCH_TOKENS = sum(MIXED)
ENGINES = ("packed", "padded")
WORKLOADS = {"mixed": MIXED, "equal": EQUAL}


class PackingServer(Server):
    """A server subprocess of the bench's model with ``--packing`` ``auto`` (packed) or ``off`` (padded)."""

    def __init__(self, model_dir: Path, threads: int, engine: str):
        args = ["--threads", str(threads), "--max-batch-tokens", str(BATCH_TOKENS), "--max-wait-ms", "5",
                "--top-k-max", str(TOP_K), "--max-queue-tokens", str(16 * BATCH_TOKENS),
                "--packing", "auto" if engine == "packed" else "off"]
        self._context = teacher_process(model_dir, extra_args=args)
        teacher = self._context.__enter__()
        self.address, self.http_port = teacher.address, teacher.http_port


def requests(lengths: list[int], count: int, rng: random.Random) -> list[ScoreBatch]:
    """``count`` batches of random ids with sequences of ``lengths`` (in a new order each)."""
    out = []
    for _ in range(count):
        order = rng.sample(lengths, len(lengths))
        out.append(ScoreBatch.of([[rng.randrange(VOCAB) for _ in range(n)] for n in order]))
    return out


def throughput(server: PackingServer, work: list[ScoreBatch]) -> tuple[float, float]:
    """(tokens/s, forwarded / real tokens) of streaming ``work`` with 2 requests in flight."""
    forwarded, real = server.metric("atkd_teacher_forwarded_tokens"), server.metric("atkd_teacher_tokens_total")
    with TeacherClient(server.address) as client:
        start = time.perf_counter()
        for _ in client.score_stream(work, in_flight=2, top_k=TOP_K):
            pass
        wall = time.perf_counter() - start
    forwarded = server.metric("atkd_teacher_forwarded_tokens") - forwarded
    real = server.metric("atkd_teacher_tokens_total") - real
    return len(work) * BATCH_TOKENS / wall, forwarded / real


def request_seconds(server: PackingServer, sequences: list[list[int]]) -> float:
    with TeacherClient(server.address) as client:
        start = time.perf_counter()
        client.score(sequences, top_k=TOP_K)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=6, help="requests per throughput measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--hidden", type=int, default=320)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(Path(tmp), args.hidden, args.layers, context=CONTEXT)
        print(f"model: Llama, {params / 1e6:.1f}M parameters, V = {VOCAB}; {SEQUENCES} sequences = {BATCH_TOKENS} "
              f"tokens per request, top-{TOP_K}; {args.rounds} rounds x {args.requests} requests; "
              f"{args.threads} torch threads per server")
        servers = {engine: PackingServer(Path(tmp), args.threads, engine) for engine in ENGINES}
        try:
            results = measure(servers, args.rounds, args.requests, rng)
            blowup = measure_blowup(servers, args.rounds, rng)
        finally:
            for server in servers.values():
                server.close()
    report(results, blowup)


def measure(servers: dict[str, PackingServer], rounds: int, count: int, rng: random.Random) -> dict:
    """``{(engine, workload): [(tokens/s, forwarded/real) per round]}``."""
    variants = [(engine, workload) for engine in ENGINES for workload in WORKLOADS]
    for engine, workload in variants:  # warm-up
        throughput(servers[engine], requests(WORKLOADS[workload], 1, rng))
    results: dict = {variant: [] for variant in variants}
    for _ in range(rounds):
        for engine, workload in rng.sample(variants, len(variants)):
            results[engine, workload].append(throughput(servers[engine], requests(WORKLOADS[workload], count, rng)))
    return results


def measure_blowup(servers: dict[str, PackingServer], rounds: int, rng: random.Random) -> dict:
    """``{(engine, shape): [seconds per round]}`` of the 575-token request as 1 + 63 or as 2 sequences."""
    long = [rng.randrange(VOCAB) for _ in range(CONTEXT)]
    shapes = {"[512] + 63 x [1]": [long] + [[rng.randrange(VOCAB)] for _ in range(63)],
              "[512, 63]": [long, [rng.randrange(VOCAB) for _ in range(63)]]}
    out: dict = {(engine, shape): [] for engine in ENGINES for shape in shapes}
    for engine, shape in out:  # warm-up
        request_seconds(servers[engine], shapes[shape])
    for _ in range(rounds):
        for engine, shape in rng.sample(list(out), len(out)):
            out[engine, shape].append(request_seconds(servers[engine], shapes[shape]))
    return out


def report(results: dict, blowup: dict) -> None:
    print("\n| engine | workload | tokens/s (median) | forwarded / real tokens |")
    print("|---|---|---:|---:|")
    for (engine, workload), runs in results.items():
        print(f"| {engine} | {workload} | {statistics.median(r[0] for r in runs):,.0f} | "
              f"{statistics.median(r[1] for r in runs):.3f} |")

    def ratio(a, b) -> float:
        return statistics.median(x[0] / y[0] for x, y in zip(results[a], results[b], strict=True))

    print("\n| ratio (median over rounds) | value |")
    print("|---|---:|")
    for engine in ENGINES:
        print(f"| {engine}: mixed / equal | {ratio((engine, 'mixed'), (engine, 'equal')):.2f}x |")
    print(f"| mixed: packed / padded | {ratio(('packed', 'mixed'), ('padded', 'mixed')):.2f}x |")
    print(f"| equal: packed / padded | {ratio(('packed', 'equal'), ('padded', 'equal')):.2f}x |")

    print("\n| engine | request (575 tokens) | seconds (median) |")
    print("|---|---|---:|")
    for (engine, shape), seconds in blowup.items():
        print(f"| {engine} | {shape} | {statistics.median(seconds):.3f} |")


if __name__ == "__main__":
    main()
