"""End to end: students distilled with ATKD from dense teacher logits vs from compressed signals.

    python -m bench.sparse_e2e [--teacher flat --signals dense,systematic@336,priority+cv@200/q8 --seeds 0,1,2
                                --steps 300 --batch-size 16 --seq-len 128 --out results.jsonl]
    python -m bench.sparse_e2e --report results.jsonl [more.jsonl ...] [--markdown]

All signals of a seed train in lockstep: every student starts from the same initialisation and sees the
same batches in the same order; at each step the teacher runs once and each signal is made from its
logits, sent through its codec (encode, serialise, decode: the quantisation is included) and trained
on. Only the teacher's representation differs. Per run: held-out perplexity, its ratio to the dense run
of the same seed, the payload bytes per token actually encoded, and the angle between the gradient of
the ATKD loss w.r.t. the student's parameters on the signal and on dense logits (the final dense
student, held-out batches, fresh draws). ``--report`` aggregates result files over seeds: mean +- std.

Signals: ``dense``; ``kK`` (top-K buckets) and ``kKmM`` (+ M systematic tail samples) as before; and
``ESTIMATOR[+adaptive][+cv][+ids]@BYTES[/CODEC]``: a tail estimator of :data:`atkd.proto.signal.TAIL_ESTIMATORS`
at a budget of BYTES per token (codec fp16 by default). The budget fixes k (64 from 300 bytes up, else
32; 0 for rskd) and the number of samples: the most that fit (for rskd, the most draws whose distinct
tail tokens fit on average, calibrated on the first batch). ``+adaptive`` splits the samples per position
by tail mass; ``+cv`` adds the student's tail as a control variate in the loss; ``+ids`` sends the samples'
ids without their log-probs, and one exact tail mean per position (``tail_ids_only``).

Teachers: ``flat`` (the demo teacher) or ``confident`` (bench.confident_teacher's; ``--temperature``
sharpens either).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers.utils import logging as hf_logging

from atkd.proto import teacher_pb2 as pb
from atkd.proto.codec import decode_signal, encode_signal, message_payload_bytes, payload_bytes
from atkd.proto.signal import TAIL_ESTIMATORS, compress
from atkd.student.data.lm import heldout_batches, random_batches
from atkd.student.demo.assets import prepare_demo_assets
from atkd.student.evaluation import evaluate_lm
from atkd.student.losses import atkd_loss
from atkd.student.models import load_model
from atkd.student.optim import OptimConfig, make_optimizer


@dataclass
class SignalSpec:
    """How one run's teacher signal is made (see the module docstring)."""

    name: str
    dense: bool = False
    k: int = 0
    samples: int = 0
    estimator: str = "systematic"
    adaptive: bool = False
    control_variate: bool = False
    ids_only: bool = False
    codec: str = "fp16"
    budget: int | None = None

    def compress_options(self) -> dict:
        return dict(tail_samples=self.samples, tail_estimator=self.estimator, adaptive_tail=self.adaptive,
                    tail_ids_only=self.ids_only)


def parse_spec(spec: str) -> SignalSpec:
    if spec == "dense":
        return SignalSpec(spec, dense=True)
    match = re.fullmatch(r"k(\d+)(?:m(\d+))?", spec)
    if match:
        return SignalSpec(spec, k=int(match[1]), samples=int(match[2] or 0))
    match = re.fullmatch(r"([a-z]+)((?:\+(?:adaptive|cv|ids))*)@(\d+)(?:/(fp16|q8))?", spec)
    if not match or match[1] not in TAIL_ESTIMATORS:
        raise ValueError(f"bad signal spec {spec!r}: use dense, kK, kKmM or "
                         f"ESTIMATOR[+adaptive][+cv][+ids]@BYTES[/CODEC] with ESTIMATOR in {TAIL_ESTIMATORS}")
    budget = int(match[3])
    estimator = match[1]
    return SignalSpec(spec, k=0 if estimator == "rskd" else 64 if budget >= 300 else 32, estimator=estimator,
                      adaptive="+adaptive" in match[2], control_variate="+cv" in match[2], ids_only="+ids" in match[2],
                      codec=match[4] or "fp16", budget=budget)


def fixed_bytes(spec: SignalSpec, vocab: int, samples: int) -> float:
    """Bytes per token of a fixed-size estimator with ``samples`` samples (the adaptive one: their mean)."""
    size = payload_bytes(spec.codec, spec.k, vocab, samples, tail_ids_only=spec.ids_only)
    if spec.estimator == "priority":
        size += 4 if spec.codec == "fp16" else 2  # the log-threshold per position
    elif spec.estimator == "gumbel":
        size += 2 * samples  # a float16 weight per sample
    if spec.adaptive:
        size += 1  # the count per position
    return size


def fit_budget(spec: SignalSpec, vocab: int, logits: torch.Tensor, targets: torch.Tensor) -> SignalSpec:
    """The spec with its number of samples set to the most that fit its byte budget."""
    if spec.budget is None:
        return spec
    if spec.estimator != "rskd":
        samples = 0
        while fixed_bytes(spec, vocab, samples + 1) <= spec.budget:
            samples += 1
        return SignalSpec(**{**spec.__dict__, "samples": samples})
    low, high = 1, 4096  # rskd: bisect the draws on the measured bytes of the first batch
    while low < high:
        mid = (low + high + 1) // 2
        trial = SignalSpec(**{**spec.__dict__, "samples": mid})
        _, size = encoded(trial, logits, targets, vocab, torch.Generator().manual_seed(0))
        low, high = (mid, high) if size <= spec.budget else (low, mid - 1)
    return SignalSpec(**{**spec.__dict__, "samples": low})


def encoded(spec: SignalSpec, logits, targets, vocab, generator):
    """The signal of ``spec`` after its codec (flattened positions, reshaped back) and its payload bytes per token."""
    signal = compress(logits, targets, spec.k, generator=generator, **spec.compress_options()).flatten()
    message = encode_signal(signal, spec.codec, vocab)
    decoded = decode_signal(pb.Signal.FromString(message.SerializeToString()))
    size = message_payload_bytes(message) / max(1, targets.numel())
    return decoded.map_tensors(lambda t: t.reshape(*targets.shape, *t.shape[1:])), size


@dataclass
class Run:
    spec: SignalSpec
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object
    generator: torch.Generator
    loss_fn: object
    bytes: list = field(default_factory=list)
    seconds: float = 0.0

    def teacher_input(self, logits, targets, vocab):
        if self.spec.dense:
            return logits
        signal, size = encoded(self.spec, logits, targets, vocab, self.generator)
        self.bytes.append(size)
        return signal


def train_seed(teacher, init, assets, specs, seed, args, temperature) -> list[dict]:
    """Train one student per spec in lockstep on the same batches; evaluate; measure gradient angles."""
    vocab = init.config.vocab_size
    batches = random_batches(assets.train_ids, args.batch_size, args.seq_len, seed=seed)
    first = next(random_batches(assets.train_ids, args.batch_size, args.seq_len, seed=seed))
    with torch.no_grad():
        first_logits = teacher(first.input_ids).logits.float() / temperature
    runs = []
    for spec in specs:
        spec = fit_budget(spec, vocab, first_logits, first.targets)
        student = copy.deepcopy(init).train()
        optimizer, schedule = make_optimizer(student, OptimConfig(lr=args.lr), args.steps)
        runs.append(Run(spec, student, optimizer, schedule, torch.Generator().manual_seed(seed),
                        partial(atkd_loss, tail_control_variate=spec.control_variate)))
    for step in range(args.steps):
        batch = next(batches)
        with torch.no_grad():
            logits = teacher(batch.input_ids).logits.float() / temperature
        for run in runs:
            start = time.perf_counter()
            teacher_input = run.teacher_input(logits, batch.targets, vocab)
            loss = run.loss_fn(run.student(batch.input_ids).logits, teacher_input, batch.targets).loss
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run.student.parameters(), 1.0)
            run.optimizer.step()
            run.schedule.step()
            run.seconds += time.perf_counter() - start
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  seed {seed} step {step + 1}/{args.steps}", flush=True)

    heldout = heldout_batches(assets.heldout_ids, args.batch_size, args.seq_len, max_batches=args.heldout_batches)
    reference = next((run.student for run in runs if run.spec.dense), runs[0].student)
    angles = gradient_angles(teacher, reference, runs, assets, args, temperature, seed)
    rows = []
    for run in runs:
        evaluation = evaluate_lm(run.student, heldout)
        rows.append({"signal": run.spec.name, "seed": seed, "k": run.spec.k, "samples": run.spec.samples,
                     "codec": run.spec.codec, "ppl": evaluation.perplexity, "acc": evaluation.accuracy,
                     "bytes": statistics.mean(run.bytes) if run.bytes else None,
                     "angle": angles.get(run.spec.name), "train_s": run.seconds, "tokens": evaluation.tokens})
    return rows


def gradient_angles(teacher, student, runs, assets, args, temperature, seed) -> dict[str, float]:
    """Mean angle (degrees) between the parameter gradients of ATKD on each signal and on dense logits.

    At ``student`` (the dense run's final weights), over ``--angle-batches`` held-out batches and
    ``--angle-draws`` fresh draws of each signal per batch."""
    vocab = student.config.vocab_size
    batches = heldout_batches(assets.heldout_ids, args.batch_size, args.seq_len,
                              max_batches=args.heldout_batches + args.angle_batches)[args.heldout_batches:]
    params = [p for p in student.parameters() if p.requires_grad]

    def grad(teacher_input, targets, logits_fn, loss_fn):
        loss = loss_fn(logits_fn(), teacher_input, targets).loss
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double()

    angles: dict[str, list[float]] = {}
    generator = torch.Generator().manual_seed(1000 + seed)
    for batch in batches:
        with torch.no_grad():
            logits = teacher(batch.input_ids).logits.float() / temperature
        dense = grad(logits, batch.targets, lambda b=batch: student(b.input_ids).logits, atkd_loss)
        for run in runs:
            if run.spec.dense:
                continue
            for _ in range(args.angle_draws):
                signal, _ = encoded(run.spec, logits, batch.targets, vocab, generator)
                g = grad(signal, batch.targets, lambda b=batch: student(b.input_ids).logits, run.loss_fn)
                cosine = torch.nn.functional.cosine_similarity(g, dense, dim=0).clamp(-1, 1).item()
                angles.setdefault(run.spec.name, []).append(math.degrees(math.acos(cosine)))
    return {name: statistics.mean(values) for name, values in angles.items()}


def load_teacher(name: str, assets):
    if name == "flat":
        return load_model(assets.teacher_dir)
    if name == "confident":
        from bench.confident_teacher import confident_teacher_dir

        return load_model(confident_teacher_dir(assets))
    raise ValueError(f"unknown teacher {name!r}: flat or confident")


def report(paths: list[str], markdown: bool = False) -> None:
    """Mean +- std over seeds of the perplexity ratio to dense, bytes and gradient angle, per teacher and signal."""
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    dense = {(r["teacher"], r["seed"]): r["ppl"] for r in rows if r["signal"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["signal"]), []).append(r)
    if markdown:
        print("| teacher | signal | k | m | B/token | seeds | ppl | vs dense (mean +- std) | grad angle (deg) |")
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print(f"{'teacher':22s} {'signal':24s} {'k':>3s} {'m':>5s} {'B/tok':>6s} {'seeds':>5s} {'ppl':>8s} "
              f"{'vs dense (mean +- std)':>23s} {'grad angle':>14s}")
    for (teacher, signal), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0]["bytes"] or -1)):
        ratios = [100 * (r["ppl"] / dense[teacher, r["seed"]] - 1) for r in group if (teacher, r["seed"]) in dense]
        angles = [r["angle"] for r in group if r["angle"] is not None]
        size = f"{statistics.mean(r['bytes'] for r in group):6.0f}" if group[0]["bytes"] else f"{'-':>6s}"
        ratio = (f"{statistics.mean(ratios):+7.2f}% +- {statistics.stdev(ratios) if len(ratios) > 1 else 0:5.2f}%"
                 if ratios and signal != "dense" else "-")
        angle = (f"{statistics.mean(angles):5.1f} +- {statistics.stdev(angles) if len(angles) > 1 else 0:4.1f}"
                 if angles else "-")
        ppl = statistics.mean(r["ppl"] for r in group)
        if markdown:
            print(f"| {teacher} | `{signal}` | {group[0]['k']} | {group[0]['samples']} | {size.strip()} | "
                  f"{len(group)} | {ppl:.2f} | {ratio} | {angle} |")
            continue
        print(f"{teacher:22s} {signal:24s} {group[0]['k']:3d} {group[0]['samples']:5d} {size} {len(group):5d} "
              f"{ppl:8.2f} {ratio:>23s} {angle:>14s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="flat", help="flat (the demo teacher) or confident")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the teacher")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--heldout-batches", type=int, default=25)
    parser.add_argument("--angle-batches", type=int, default=2, help="held-out batches for the gradient angle")
    parser.add_argument("--angle-draws", type=int, default=2, help="signal draws per batch for the gradient angle")
    parser.add_argument("--signals", default="dense,k64,k64m16,k8")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="append one JSON line per run to this file")
    parser.add_argument("--report", nargs="+", metavar="JSONL", help="only aggregate these result files")
    parser.add_argument("--markdown", action="store_true", help="--report as a markdown table")
    args = parser.parse_args()
    if args.report:
        report(args.report, args.markdown)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()

    assets = prepare_demo_assets()
    teacher = load_teacher(args.teacher, assets)
    init = load_model(assets.student_init_dir)
    specs = [parse_spec(spec) for spec in args.signals.split(",")]
    teacher_name = args.teacher + (f" T={args.temperature:g}" if args.temperature != 1 else "")
    print(f"ATKD, teacher {teacher_name}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"lr {args.lr}, held-out {args.heldout_batches} batches ({assets.source})", flush=True)
    rows = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for row in train_seed(teacher, init, assets, specs, seed, args, args.temperature):
            row["teacher"] = teacher_name
            rows.append(row)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(row) + "\n")
            dense = next((r for r in rows if r["signal"] == "dense" and r["seed"] == seed), None)
            ratio = f"{row['ppl'] / dense['ppl'] - 1:+9.2%}" if dense else f"{'-':>9s}"
            size = f"{row['bytes']:6.0f}" if row["bytes"] else f"{'-':>6s}"
            angle = f"{row['angle']:6.1f}" if row["angle"] is not None else f"{'-':>6s}"
            print(f"{row['signal']:24s} seed {seed} k {row['k']:3d} m {row['samples']:4d} B/tok {size} "
                  f"ppl {row['ppl']:8.2f} {ratio} angle {angle} train {row['train_s']:6.0f} s", flush=True)


if __name__ == "__main__":
    main()
