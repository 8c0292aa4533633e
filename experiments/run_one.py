"""One run of the grid, in its own process (``python -m experiments.run_one``): train, evaluate, write the result.

The sweep starts one such process per run, several at a time against one teacher server, so the student
jobs are separate processes sharing an endpoint, as users run them. The run's training is the training
job of ``atkd-student train`` (:func:`atkd.student.trainer.loop.train`); its result file (the format is in
:mod:`experiments.report`) is written atomically, last, so a file that exists is a finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from atkd.student.models import load_model
from atkd.student.trainer.loop import train

from .grid import GRIDS, Run
from .models import build_assets, evaluate_model


def write_atomic(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(record, indent=1) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def run_one(grid: str, run: Run, *, teacher_address: str | None, output_dir: Path, result_path: Path) -> dict:
    scale = GRIDS[grid]
    assets = build_assets(scale, sizes=[run.teacher] if run.teacher else [])  # built by the sweep: only found
    config = run.config(scale, student=assets.student_init, data=assets.data.files(run.task), output_dir=output_dir,
                        teacher_address=teacher_address)
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    model = load_model(result.final_dir)
    record = {
        "run_id": run.run_id, "grid": grid, "task": run.task, "teacher": run.teacher,
        "teacher_params": None if run.teacher is None else assets.params(run.teacher), "method": run.method,
        "ablation": dict(run.ablation) or None, "seed": run.seed, "steps": result.state.step,
        "test": evaluate_model(model, tokenizer, scale, run.task, assets.data),
        "validation": {"perplexity": result.eval.perplexity, "accuracy": result.eval.accuracy, "rouge_l": None},
        "train": {"seconds": round(seconds, 1), "final_loss": steps[-1].get("loss") if steps else None,
                  "teacher_wait_s": round(sum(r.get("teacher_wait_s", 0.0) for r in steps), 2)},
        "config_hash": run.config_hash(scale),
    }  # fmt: skip
    write_atomic(result_path, record)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grid", required=True, choices=sorted(GRIDS))
    parser.add_argument("--run", required=True, help="the run as JSON: task, teacher, method, seed, ablation")
    parser.add_argument("--teacher-address")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    fields = json.loads(args.run)
    run = Run(**{**fields, "ablation": tuple(tuple(pair) for pair in fields.get("ablation", ()))})
    record = run_one(args.grid, run, teacher_address=args.teacher_address, output_dir=args.output_dir,
                     result_path=args.result)
    print(json.dumps({"run_id": record["run_id"], "test": record["test"], "seconds": record["train"]["seconds"]}))


if __name__ == "__main__":
    main()
