"""On-policy training through the teacher server vs dataset training, with and without overlap; Generate throughput.

    python -m bench.onpolicy [--steps 14 --rounds 2 --batch 8 --seq 96 --new 32]

One run, the teacher server process pinned to core 0 with 1 torch thread, this process (the student, the
clients) to core 1 with 1 thread, as bench.student_pipeline does:

* step time of ``atkd-student train`` (ATKD loss, instruction data) with ``data.source`` = ``dataset``
  (prefetch 2), ``student`` (on-policy, ``staleness`` 0: sample, then wait for the teacher's score) and
  ``student`` with ``staleness`` 1 and 2 (the teacher scores micro-batch n + 1 while the student trains on n);
  median over the steps after the first 3 and over rounds that alternate the runs, with the part of the step
  spent waiting for the teacher's signal (what the overlap hides; the rest is the student's sampling and step);
* Generate throughput of the replica: new tokens per second with 1 client and with 4 concurrent clients
  (each sending requests of ``--prompts`` prompts x ``--new`` tokens, stop tokens ignored), seeded
  requests (decoded one request at a time, for reproducibility) and unseeded ones (batched together).
"""

from __future__ import annotations

import os

if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
    os.sched_setaffinity(0, {1})  # before torch starts its threads: the student owns core 1

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from atkd.student.client import TeacherClient
from atkd.student.client.generate import TeacherGenerator
from atkd.student.data.corpus import EXCERPT_PATH
from atkd.student.data.instructions import instruction_task
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.demo.teacher_process import teacher_server
from atkd.student.models import build_model
from atkd.student.trainer.config import load_config
from atkd.student.trainer.loop import METRICS_FILE, train

VOCAB = 4096
WARMUP_STEPS = 3


def build_assets(root: Path, teacher_dims: dict, student_dims: dict) -> dict[str, Path]:
    tokenizer = train_tokenizer(EXCERPT_PATH.read_text().split("\n\n"), VOCAB, root / "tokenizer")
    paths = dict(instruction_task(root / "data", max_chars=160))
    for name, family, dims in (("teacher", "llama", teacher_dims), ("student", "gpt2", student_dims)):
        model = build_model(family, VOCAB, dict(dims, max_len=512), seed=0)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def step_time(root: Path, paths: dict, name: str, address: str, source: dict, args) -> tuple[float, float]:
    """Median (step seconds, seconds of it waiting for the teacher's signal) after the warm-up steps."""
    values = {"student": str(paths["student"]), "output_dir": str(root / "runs" / name),
              "data": {"kind": "instruction", "train": str(paths["train"]), "seq_len": args.seq,
                       "source": {"max_new_tokens": args.new, **source}},
              "teacher": {"mode": "remote", "addresses": [address], "top_k": 64, "tail_samples": 16, "prefetch": 2},
              "batch_size": args.batch, "max_steps": args.steps, "save_every": 0, "progress": False, "threads": 1}
    path = root / f"{name}.json"
    path.write_text(json.dumps(values))
    train(load_config(path))
    records = [json.loads(line) for line in (root / "runs" / name / METRICS_FILE).read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"][WARMUP_STEPS:]
    return (statistics.median([r["step_s"] for r in steps]), statistics.median([r["teacher_wait_s"] for r in steps]))


def generate_throughput(address: str, tokenizer, prompts: list[list[int]], clients: int, seeded: bool, args) -> float:
    """New tokens per second of ``clients`` concurrent clients, each sending ``args.requests`` requests."""
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(number: int) -> None:
        try:
            with TeacherClient(address, tokenizer=tokenizer, client_id=f"bench-{number}") as connection:
                generator = TeacherGenerator(connection, in_flight=1)
                barrier.wait()
                for request in range(args.requests):
                    start = (number * args.requests + request) * args.prompts % (len(prompts) - args.prompts)
                    generator.generate(prompts[start:start + args.prompts], max_new_tokens=args.new,
                                       ignore_stop=True, seed=request if seeded else None)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return clients * args.requests * args.prompts * args.new / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--new", type=int, default=32, help="new tokens per sampled response")
    parser.add_argument("--prompts", type=int, default=8, help="Generate benchmark: prompts per request")
    parser.add_argument("--requests", type=int, default=4, help="Generate benchmark: requests per client")
    parser.add_argument("--teacher-dims", type=json.loads, default={"hidden": 256, "layers": 4, "heads": 4})
    parser.add_argument("--student-dims", type=json.loads, default={"hidden": 128, "layers": 2, "heads": 4})
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    pinned = len(os.sched_getaffinity(0)) == 1
    runs = {"dataset": {"name": "dataset"}, "on-policy, staleness 0": {"name": "student", "staleness": 0},
            "on-policy, staleness 1": {"name": "student", "staleness": 1},
            "on-policy, staleness 2": {"name": "student", "staleness": 2}}
    throughput_runs = {"1 client, seeded": (1, True), "4 clients, seeded": (4, True),
                       "1 client, unseeded": (1, False), "4 clients, unseeded": (4, False)}
    steps: dict[str, list[tuple[float, float]]] = {}
    tokens_s: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="atkd-bench-onpolicy-") as tmp:
        root = Path(tmp)
        paths = build_assets(root, args.teacher_dims, args.student_dims)
        tokenizer = AutoTokenizer.from_pretrained(paths["teacher"], local_files_only=True)
        prompts = [tokenizer(json.loads(line)["prompt"])["input_ids"]
                   for line in paths["train"].read_text().splitlines()]
        launcher = ["taskset", "-c", "0"] if pinned else []
        with teacher_server(paths["teacher"], launcher=launcher, extra_args=["--threads", "1"]) as address:
            for round_ in range(args.rounds):
                for name, source in runs.items():
                    label = f"{source['name']}-{source.get('staleness', 'x')}-{round_}"
                    steps.setdefault(name, []).append(step_time(root, paths, label, address, source, args))
                for name, (clients, seeded) in throughput_runs.items():
                    tokens_s.setdefault(name, []).append(
                        generate_throughput(address, tokenizer, prompts, clients, seeded, args))
    print(f"\nbatch {args.batch} x {args.seq} tokens, {args.new} new tokens per sampled response; teacher llama "
          f"{args.teacher_dims}, student gpt2 {args.student_dims}, V={VOCAB}; "
          f"{'pinned: teacher core 0, student core 1' if pinned else 'NOT pinned (fewer than 2 cores)'}; "
          f"{args.steps} steps x {args.rounds} rounds")
    step_s = {name: statistics.median(step for step, _ in values) for name, values in steps.items()}
    wait_s = {name: statistics.median(wait for _, wait in values) for name, values in steps.items()}
    dataset, staleness0 = step_s["dataset"], step_s["on-policy, staleness 0"]
    print(f"| {'training run':<24} | {'s/step':>7} | {'teacher wait s/step':>19} | {'/ dataset':>9} | "
          f"{'/ staleness 0':>13} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 21}|{'-' * 11}|{'-' * 15}|")
    for name, value in step_s.items():
        print(f"| {name:<24} | {value:7.3f} | {wait_s[name]:19.3f} | {value / dataset:9.2f} | "
              f"{value / staleness0:13.2f} |")
    one = {seeded: statistics.median(tokens_s[f"1 client, {seeded}"]) for seeded in ("seeded", "unseeded")}
    print(f"\nGenerate: {args.prompts} prompts x {args.new} new tokens per request, "
          f"{args.requests} requests per client")
    print(f"| {'clients':<20} | {'new tokens/s':>12} | {'/ 1 client':>10} |")
    print(f"|{'-' * 22}|{'-' * 14}|{'-' * 12}|")
    for name, values in tokens_s.items():
        value = statistics.median(values)
        print(f"| {name:<20} | {value:12.0f} | {value / one[name.split(', ')[1]]:10.2f} |")


if __name__ == "__main__":
    main()
