"""Student step time with the teacher remote: prefetch 0 vs prefetch >= 2, next to each side alone.

    python -m bench.student_pipeline [--steps 30 --rounds 2 --batch 8 --seq 256]

One run, teacher and student pinned to different cores (the teacher server process with ``taskset -c 0``
and 1 torch thread, this process, which trains the student, on core 1 with 1 thread):
  * teacher alone: seconds per batch of ``TeacherClient.score`` one at a time (forward + compression +
    transport, what a student without prefetch waits for);
  * student alone: median step time of ``atkd-student train`` reading the same signals from an export
    cache (forward, ATKD loss, backward, AdamW: no teacher in the loop);
  * the real job through the server with ``teacher.prefetch`` 0, 2 and 4: median step time.
Every figure is the median over the steps after the first 3 (warm-up), and over ``--rounds`` rounds
that alternate the runs, so that noise from other processes hits all of them alike. Target: pipelined
step <= 1.15 x max(student, teacher); unpipelined is about their sum.
"""

from __future__ import annotations

import os

if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
    os.sched_setaffinity(0, {1})  # before torch starts its threads: the student owns core 1

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from atkd.student.client import TeacherClient
from atkd.student.data.corpus import EXCERPT_PATH
from atkd.student.data.examples import PackedText
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.demo.teacher_process import teacher_server
from atkd.student.models import build_model
from atkd.student.trainer.cli import export_cache
from atkd.student.trainer.config import load_config
from atkd.student.trainer.loop import METRICS_FILE, train

VOCAB = 4096
WARMUP_STEPS = 3


def build_assets(root: Path, teacher_dims: dict, student_dims: dict) -> dict[str, Path]:
    text = EXCERPT_PATH.read_text()
    tokenizer = train_tokenizer(text.split("\n\n"), VOCAB, root / "tokenizer")
    paths = {"train": root / "train.txt"}
    paths["train"].write_text(text)
    for name, family, dims in (("teacher", "llama", teacher_dims), ("student", "gpt2", student_dims)):
        model = build_model(family, VOCAB, dict(dims, max_len=1024), seed=0)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def median_step_s(output_dir: Path) -> float:
    records = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]
    steps = [r["step_s"] for r in records if r["kind"] == "train"][WARMUP_STEPS:]
    return statistics.median(steps)


def run_job(root: Path, paths: dict, name: str, teacher: dict, args) -> float:
    values = {"student": str(paths["student"]), "output_dir": str(root / "runs" / name),
              "data": {"train": str(paths["train"]), "seq_len": args.seq}, "teacher": teacher,
              "batch_size": args.batch, "max_steps": args.steps, "save_every": 0, "progress": False, "threads": 1}
    config_path = root / f"{name}.json"
    config_path.write_text(json.dumps(values))
    train(load_config(config_path))
    return median_step_s(root / "runs" / name)


def teacher_alone(address: str, paths: dict, args) -> float:
    tokenizer_dir = paths["teacher"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    examples = PackedText.from_files([paths["train"]], tokenizer, args.seq + 1)  # T + 1 tokens: T scored
    times = []
    with TeacherClient(address, tokenizer=tokenizer, top_k=args.top_k) as client:
        for step in range(args.steps):
            ids = examples.batch(range(step * args.batch, (step + 1) * args.batch)).input_ids
            start = time.perf_counter()
            client.score(ids, tail_samples=args.tail_samples)
            times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP_STEPS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--tail-samples", type=int, default=16)
    parser.add_argument("--teacher-dims", type=json.loads, default={"hidden": 256, "layers": 4, "heads": 4})
    parser.add_argument("--student-dims", type=json.loads, default={"hidden": 128, "layers": 2, "heads": 4})
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    pinned = len(os.sched_getaffinity(0)) == 1
    with tempfile.TemporaryDirectory(prefix="atkd-bench-pipeline-") as tmp:
        root = Path(tmp)
        paths = build_assets(root, args.teacher_dims, args.student_dims)
        launcher = ["taskset", "-c", "0"] if pinned else []
        with teacher_server(paths["teacher"], launcher=launcher, extra_args=["--threads", "1"]) as address:
            remote = {"mode": "remote", "addresses": [address], "top_k": args.top_k, "tail_samples": args.tail_samples}
            export_config = root / "export.json"
            export_config.write_text(json.dumps({
                "student": str(paths["student"]), "data": {"train": str(paths["train"]), "seq_len": args.seq},
                "teacher": {**remote, "prefetch": 4}, "batch_size": args.batch, "max_steps": 1, "progress": False}))
            export_cache(load_config(export_config), root / "cache", shard_size=1024)
            cached = {**remote, "mode": "cache", "cache_dir": str(root / "cache")}
            results: dict[str, list[float]] = {}
            for round_ in range(args.rounds):
                results.setdefault("teacher alone", []).append(teacher_alone(address, paths, args))
                results.setdefault("student alone", []).append(run_job(root, paths, f"cache{round_}", cached, args))
                for depth in (0, 2, 4):
                    run = run_job(root, paths, f"p{depth}-{round_}", {**remote, "prefetch": depth}, args)
                    results.setdefault(f"remote, prefetch {depth}", []).append(run)
    seconds = {name: statistics.median(values) for name, values in results.items()}
    teacher, student = seconds["teacher alone"], seconds["student alone"]
    print(f"\nbatch {args.batch} x {args.seq} tokens, top-{args.top_k} + {args.tail_samples} tail samples, "
          f"teacher llama {args.teacher_dims}, student gpt2 {args.student_dims}, V={VOCAB}; "
          f"{'pinned: teacher core 0, student core 1' if pinned else 'NOT pinned (fewer than 2 cores)'}; "
          f"{args.steps} steps x {args.rounds} rounds")
    print(f"| {'run':<20} | {'s/step':>7} | {'/ max(S,T)':>10} | {'/ (S+T)':>8} |")
    print(f"|{'-' * 22}|{'-' * 9}|{'-' * 12}|{'-' * 10}|")
    for name, value in seconds.items():
        ratio_max, ratio_sum = value / max(teacher, student), value / (teacher + student)
        print(f"| {name:<20} | {value:7.3f} | {ratio_max:10.2f} | {ratio_sum:8.2f} |")


if __name__ == "__main__":
    main()
