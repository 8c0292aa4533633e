"""End to end: a student distilled with ATKD from dense teacher logits vs from compressed signals.

    python -m bench.sparse_e2e [--steps 300 --k 64 --tail-samples 16]

Every run starts from the same student initialisation and sees the same batches in the same order
(same seed); only the teacher's representation differs. Reported: held-out perplexity and next-token
accuracy, and the perplexity ratio to the dense run.
"""

from __future__ import annotations

import argparse
import copy
import time

from transformers.utils import logging as hf_logging

from student.assets import prepare_demo_assets
from student.data.lm import heldout_batches, random_batches
from student.losses import get_loss
from student.models import evaluate_lm, load_model
from student.teachers import LocalTeacher
from student.train_loop import OptimConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--tail-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    assets = prepare_demo_assets()
    teacher = load_model(assets.teacher_dir)
    init = load_model(assets.student_init_dir)
    heldout = heldout_batches(assets.heldout_ids, 16, 128, max_batches=25)
    variants = {
        "dense logits": LocalTeacher(teacher),
        f"k={args.k} buckets (default)": LocalTeacher(teacher, top_k=args.k),
        f"k={args.k} + {args.tail_samples} tail samples": LocalTeacher(teacher, top_k=args.k,
                                                                        tail_samples=args.tail_samples),
        "k=8 buckets": LocalTeacher(teacher, top_k=8),
    }
    loss_fn = get_loss("atkd")
    results = {}
    for name, source in variants.items():
        student = copy.deepcopy(init)
        start = time.perf_counter()
        train(student, random_batches(assets.train_ids, args.batch_size, args.seq_len, seed=args.seed), loss_fn,
              OptimConfig(steps=args.steps), teacher=source, desc=name)
        results[name] = (evaluate_lm(student, heldout), time.perf_counter() - start)

    dense_ppl = results["dense logits"][0].perplexity
    print(f"ATKD, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, seed {args.seed}, "
          f"held-out {results['dense logits'][0].tokens} tokens ({assets.source})")
    print(f"{'teacher signal':32s} {'ppl':>8s} {'vs dense':>9s} {'acc':>7s} {'train s':>8s}")
    for name, (evaluation, seconds) in results.items():
        print(f"{name:32s} {evaluation.perplexity:8.2f} {evaluation.perplexity / dense_ppl - 1:+9.2%} "
              f"{evaluation.accuracy:7.2%} {seconds:8.0f}")


if __name__ == "__main__":
    main()
