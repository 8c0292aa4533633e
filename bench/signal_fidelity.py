"""Fidelity of the compressed teacher signal on the demo teacher's real outputs over held-out text.

    python -m bench.signal_fidelity [--batches 4 --draws 50 --tail-samples 16]
    python -m bench.signal_fidelity --ks "" --signals systematic@336,priority@336,priority+cv@336 [--temperature 0.5]

For each k: the top-k mass coverage of the teacher, the relative error of the ATKD loss computed
from the signal vs from the dense teacher logits, and the cosine between the two gradients w.r.t.
the student logits. The tail-sampling variant (m tokens drawn from the teacher's tail with their
exact log-probs) is reported as its bias averaged over many draws, with the standard error of that
average, and its mean per-draw gradient cosine. The student is the demo's student after a short
SFT warm-up (an untrained student's near-uniform predictions would flatter every codec).

``--signals`` (specs of bench.sparse_e2e: ``ESTIMATOR[+adaptive][+cv]@BYTES[/CODEC]``) adds a table of
the tail estimators at equal bytes: each signal drawn ``--draws`` times per batch and sent through its
codec; the bias of the ATKD loss (mean over draws vs dense, with its s.e.), the per-draw noise (std of
the loss over draws, relative to dense) and the mean per-draw angle between the gradients w.r.t. the
student logits.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from transformers.utils import logging as hf_logging

from atkd.proto.signal import compress
from atkd.student.data.lm import heldout_batches, random_batches
from atkd.student.demo.assets import prepare_demo_assets
from atkd.student.losses import atkd_loss
from atkd.student.models import load_model
from atkd.student.optim import OptimConfig
from atkd.student.pretrain import pretrain
from bench.sparse_e2e import encoded, fit_budget, parse_spec

KS = (8, 16, 32, 64, 128, 256)


def loss_and_grad(student_logits, teacher, targets, control_variate=False):
    logits = student_logits.detach().clone().requires_grad_()
    loss = atkd_loss(logits, teacher, targets, tail_control_variate=control_variate).loss
    loss.backward()
    return loss.item(), logits.grad.flatten()


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="held-out batches of 8 x 128 tokens")
    parser.add_argument("--draws", type=int, default=50, help="tail-sampling draws per k")
    parser.add_argument("--tail-samples", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=100, help="SFT steps of the student first")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="top-k sizes of the first table ('' skips it)")
    parser.add_argument("--signals", default="", help="estimator specs of the second table (see the docstring)")
    parser.add_argument("--temperature", type=float, default=1.0, help="teacher softmax temperature")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",") if k]
    hf_logging.disable_progress_bar()

    assets = prepare_demo_assets()
    teacher = load_model(assets.teacher_dir)
    student = load_model(assets.student_init_dir)
    pretrain(student, random_batches(assets.train_ids, 16, 128, seed=1), args.warmup_steps, OptimConfig(lr=3e-3),
             desc="student SFT warm-up")
    batches = heldout_batches(assets.heldout_ids, 8, 128, max_batches=args.batches)
    generator = torch.Generator().manual_seed(0)

    rows = {k: {"coverage": [], "err": [], "cos": [], "s_err": [], "s_cos": []} for k in ks}
    specs = [parse_spec(spec) for spec in args.signals.split(",") if spec]
    estimates = {spec.name: {"bias": [], "noise": [], "angle": []} for spec in specs}
    for batch in batches:
        with torch.no_grad():
            teacher_logits = teacher(batch.input_ids).logits.float() / args.temperature
            student_logits = student(batch.input_ids).logits.float()
        dense_loss, dense_grad = loss_and_grad(student_logits, teacher_logits, batch.targets)
        for spec in specs:
            spec = fit_budget(spec, teacher_logits.shape[-1], teacher_logits, batch.targets)
            losses = []
            for _ in range(args.draws):
                signal, _ = encoded(spec, teacher_logits, batch.targets, teacher_logits.shape[-1], generator)
                loss, grad = loss_and_grad(student_logits, signal, batch.targets, spec.control_variate)
                losses.append(loss / dense_loss - 1)
                estimates[spec.name]["angle"].append(math.degrees(math.acos(min(1.0, cosine(grad, dense_grad)))))
            estimates[spec.name]["bias"].extend(losses)
            estimates[spec.name]["noise"].append(statistics.stdev(losses))
        for k in ks:
            signal = compress(teacher_logits, batch.targets, k)
            rows[k]["coverage"].append(torch.logsumexp(signal.topk_logprobs, -1).exp().mean().item())
            loss, grad = loss_and_grad(student_logits, signal, batch.targets)
            rows[k]["err"].append(loss / dense_loss - 1)
            rows[k]["cos"].append(cosine(grad, dense_grad))
            for _ in range(args.draws):
                sampled = compress(teacher_logits, batch.targets, k, tail_samples=args.tail_samples,
                                   generator=generator)
                loss, grad = loss_and_grad(student_logits, sampled, batch.targets)
                rows[k]["s_err"].append(loss / dense_loss - 1)
                rows[k]["s_cos"].append(cosine(grad, dense_grad))

    if specs:
        print(f"tail estimators at equal bytes, ATKD loss, {args.draws} draws per batch, {len(batches)} batches"
              f"{f', teacher T = {args.temperature:g}' if args.temperature != 1 else ''}")
        print(f"{'signal':24s} {'loss bias':>10s} {'+- s.e.':>8s} {'noise (std/draw)':>17s} {'grad angle':>11s}")
        for name, r in estimates.items():
            stderr = statistics.stdev(r["bias"]) / math.sqrt(len(r["bias"]))
            print(f"{name:24s} {statistics.mean(r['bias']):+10.3%} {stderr:8.3%} {statistics.mean(r['noise']):17.3%} "
                  f"{statistics.mean(r['angle']):10.2f}°")
    if not ks:
        return
    print(f"demo teacher ({assets.source} held-out, {len(batches)} x 8 x 128 tokens), ATKD loss, "
          f"tail sampling m = {args.tail_samples}, {args.draws} draws per batch")
    print(f"{'k':>4s} {'top-k mass':>10s} {'loss err':>9s} {'grad cos':>9s}   "
          f"{'sampled bias':>12s} {'+- s.e.':>8s} {'per-draw cos':>12s}")
    for k in ks:
        r = rows[k]
        s_err = r["s_err"]
        stderr = statistics.stdev(s_err) / math.sqrt(len(s_err))
        print(f"{k:4d} {statistics.mean(r['coverage']):10.1%} {statistics.mean(r['err']):+9.1%} "
              f"{statistics.mean(r['cos']):9.4f}   {statistics.mean(s_err):+12.2%} {stderr:8.2%} "
              f"{statistics.mean(r['s_cos']):12.4f}")


if __name__ == "__main__":
    main()
