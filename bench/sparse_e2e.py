"""End to end: a student distilled with ATKD from dense teacher logits vs from compressed signals.

    python -m bench.sparse_e2e [--steps 300 --signals dense,k64,k64m16,k8 --seeds 0]

Every run starts from the same student initialisation and sees the same batches in the same order
(same seed); only the teacher's representation differs. Reported: held-out perplexity and next-token
accuracy, and the perplexity ratio to the dense run of the same seed. Signals: ``dense`` (full
logits), ``kK`` (top-K buckets), ``kKmM`` (top-K plus M tail samples per position).
"""

from __future__ import annotations

import argparse
import copy
import re
import time

from transformers.utils import logging as hf_logging

from atkd.student.data.lm import heldout_batches, random_batches
from atkd.student.demo.assets import prepare_demo_assets
from atkd.student.evaluation import evaluate_lm
from atkd.student.losses import get_loss
from atkd.student.models import load_model
from atkd.student.optim import OptimConfig
from atkd.student.pretrain import pretrain
from atkd.student.teachers import LocalTeacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--signals", default="dense,k64,k64m16,k8")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    assets = prepare_demo_assets()
    teacher = load_model(assets.teacher_dir)
    init = load_model(assets.student_init_dir)
    heldout = heldout_batches(assets.heldout_ids, 16, 128, max_batches=25)
    loss_fn = get_loss("atkd")
    results = {}
    for seed in [int(x) for x in args.seeds.split(",")]:
        for spec in args.signals.split(","):
            student = copy.deepcopy(init)
            start = time.perf_counter()
            batches = random_batches(assets.train_ids, args.batch_size, args.seq_len, seed=seed)
            pretrain(student, batches, args.steps, OptimConfig(lr=3e-3), loss_fn=loss_fn,
                     teacher=teacher_source(teacher, spec, seed), desc=f"{spec} seed {seed}")
            results[spec, seed] = (evaluate_lm(student, heldout), time.perf_counter() - start)

    print(f"ATKD, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"held-out {next(iter(results.values()))[0].tokens} tokens ({assets.source})")
    print(f"{'teacher signal':16s} {'seed':>4s} {'ppl':>8s} {'vs dense':>9s} {'acc':>7s} {'train s':>8s}")
    for (spec, seed), (evaluation, seconds) in results.items():
        dense = results.get(("dense", seed))
        ratio = f"{evaluation.perplexity / dense[0].perplexity - 1:+9.2%}" if dense else f"{'-':>9s}"
        print(f"{spec:16s} {seed:4d} {evaluation.perplexity:8.2f} {ratio} {evaluation.accuracy:7.2%} {seconds:8.0f}")


def teacher_source(teacher, spec: str, seed: int) -> LocalTeacher:
    """``dense``, ``kK`` or ``kKmM`` (see the module docstring)."""
    if spec == "dense":
        return LocalTeacher(teacher)
    match = re.fullmatch(r"k(\d+)(?:m(\d+))?", spec)
    if not match:
        raise ValueError(f"bad signal spec {spec!r}: use dense, kK or kKmM")
    return LocalTeacher(teacher, top_k=int(match[1]), tail_samples=int(match[2] or 0), seed=seed)


if __name__ == "__main__":
    main()
