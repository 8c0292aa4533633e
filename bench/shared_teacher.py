"""Several student jobs on one teacher replica: batch fill and per-student time per batch, whole requests vs sequences.

    python -m bench.shared_teacher [--requests 8] [--students 1,2,4] [--threads 2]

Each student is a client with the request shape of ``docs/examples/train.yaml`` (16 windows of 128 + 1
tokens = 2,064 tokens, over half of the default ``max_batch_tokens`` of 4,096) and the training job's
prefetch of 2 (3 requests out: the batch being trained on and the next two). A fresh ``atkd-teacher serve``
(the demo teacher's size, random weights) runs each configuration, with ``--split-requests true`` (a
request's sequences may run in several batches, the default) or ``false`` (whole requests only: two
students' requests never fit one batch). Reported per configuration: seconds per batch per student
(wall time / requests, the time a student whose own step is free would take per step), the mean batch
fill (tokens / 4,096) and mean clients per batch from the server's metrics, and total tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

from atkd.student.client import ScoreBatch, TeacherClient
from atkd.student.demo.teacher_process import teacher_process
from atkd.student.models import build_model, save_model

VOCAB, BATCH, WINDOW, PREFETCH = 4096, 16, 129, 2


def histogram_totals(http_port: int) -> dict[str, float]:
    """``_sum`` and ``_count`` of every histogram of the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics") as reply:
        text = reply.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.endswith(("_sum", "_count"))}


def mean_since(before: dict[str, float], after: dict[str, float], histogram: str) -> float:
    count = after[f"{histogram}_count"] - before.get(f"{histogram}_count", 0.0)
    return (after[f"{histogram}_sum"] - before.get(f"{histogram}_sum", 0.0)) / count


def student(address: str, name: str, requests: int, seed: int, barrier: threading.Barrier, out: dict) -> None:
    generator = torch.Generator().manual_seed(seed)
    work = [ScoreBatch.of(torch.randint(0, VOCAB, (BATCH, WINDOW), generator=generator)) for _ in range(requests)]
    with TeacherClient(address, client_id=name, timeout=300) as client:
        client.score(work[0].input_ids[:1], top_k=64)  # connect and check before the clock starts
        barrier.wait()
        start, pending = time.perf_counter(), deque()
        for batch in work:
            pending.append(client.score_async(batch.input_ids, top_k=64, tail_samples=16))
            if len(pending) > PREFETCH:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
        out[name] = time.perf_counter() - start


def run(model_dir: Path, students: int, split: bool, requests: int, threads: int) -> dict:
    args = ["--threads", str(threads), "--split-requests", str(split).lower(), "--top-k-max", "64",
            "--max-tail-samples", "16"]
    with teacher_process(model_dir, extra_args=args) as teacher:
        barrier, seconds = threading.Barrier(students + 1), {}
        workers = [threading.Thread(target=student, args=(teacher.address, f"student{i}", requests, i, barrier,
                                                          seconds)) for i in range(students)]
        for worker in workers:
            worker.start()
        barrier.wait()  # every student has made its warm-up call
        before, start = histogram_totals(teacher.http_port), time.perf_counter()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - start
        after = histogram_totals(teacher.http_port)
    return {"s/batch": sum(seconds.values()) / len(seconds) / requests,
            "fill": mean_since(before, after, "atkd_teacher_batch_fill_ratio"),
            "clients": mean_since(before, after, "atkd_teacher_batch_clients"),
            "tok/s": students * requests * BATCH * WINDOW / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per student")
    parser.add_argument("--students", default="1,2,4")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the teacher")
    args = parser.parse_args()
    model_dir = Path(tempfile.mkdtemp(prefix="shared-teacher-"))
    model = build_model("llama", VOCAB, "teacher", seed=0)
    save_model(model, model_dir)
    print(f"teacher: Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M (random), max_batch_tokens 4096, "
          f"{args.threads} threads; students: {BATCH} x {WINDOW} tokens per request, top-64 + 16 tail samples, "
          f"{PREFETCH + 1} requests out, {args.requests} requests each")
    print(f"{'students':>8s} {'batching':>15s} {'s/batch/student':>16s} {'vs 1 alone':>10s} {'batch fill':>10s} "
          f"{'clients/batch':>13s} {'tokens/s':>9s}")
    alone = None
    for count in (int(n) for n in args.students.split(",")):
        for split in (False, True):
            result = run(model_dir, count, split, args.requests, args.threads)
            alone = alone or result["s/batch"]
            print(f"{count:8d} {'sequences' if split else 'whole requests':>15s} {result['s/batch']:16.2f} "
                  f"{result['s/batch'] / alone:10.2f} {result['fill']:10.2f} {result['clients']:13.2f} "
                  f"{result['tok/s']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
