"""The fused LM head + loss vs today's path (logits = hidden @ W.T, then the loss): peak memory and time.

    python -m bench.fused_head [--tokens 4096 --hidden 1024 --vocab 32000 152064 --rounds 3 --loss atkd --threads 1]

Both variants compute the same ATKD loss (median split) on a compressed teacher signal (top-64 log-probs,
target, tail mass and 16 tail samples per position, made once by :func:`atkd.proto.signal.compress`) from
student hidden states ``[N, H]`` and a head ``[V, H]``, forward and backward, gradients for both:

    logits   logits = hidden @ W.T ([N, V] fp32), loss(logits), backward through the matmul (what the
             trainer did before: the model's nn.Linear head, then the loss)
    fused    loss(HeadLogits(hidden, W)): logits block by block, never [N, V] (atkd.student.losses.fused_head)

Each (variant, round) runs in a fresh subprocess: the inputs are built, one step on 64 tokens warms the
kernels, the RSS high-water mark is reset (/proc/self/clear_refs) and one full step is timed; the peak RSS
above the RSS before it is its extra memory, in units of one fp32 ``[N, V]`` tensor. "less grads" also
subtracts the gradients dW ``[V, H]`` and dh ``[N, H]`` that both variants end with (``.grad``). Variants
alternate within a round and the order flips each round; times are medians over rounds, memory the maximum.
Torch threads: 1 by default; on a shared, loaded machine two threads spend most of their time waiting for
each other at every op's barrier (measured: the same fused step 6x the CPU time of one thread), which
measures the neighbours, not the code. Process CPU seconds are shown beside the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from atkd.proto.signal import TeacherSignal, compress
from atkd.student.losses import HeadLogits, get_loss

from .loss_speed import _rss_kib

VARIANTS = ("logits", "fused")
TOP_K, TAIL_SAMPLES = 64, 16


def make_signal(tokens: int, vocab: int, path: Path, seed: int = 0) -> None:
    """Targets ``[N]`` (the first 5% ignored, a prompt) and a teacher signal over them, saved to ``path``;
    the teacher's logits ``3 * randn`` are made 256 rows at a time."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[: tokens // 20] = -100
    parts = []
    for start in range(0, tokens, 256):
        rows = targets[start:start + 256]
        parts.append(compress(3 * torch.randn(len(rows), vocab, generator=g), rows, TOP_K, tail_samples=TAIL_SAMPLES,
                              generator=g))
    fields = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(TeacherSignal)}
    torch.save({"targets": targets, "signal": fields, "vocab": vocab}, path)


def step(variant: str, loss_fn, hidden, weight, signal, targets) -> None:
    """One forward + backward; leaves ``.grad`` on hidden and weight."""
    logits = hidden @ weight.t() if variant == "logits" else HeadLogits(hidden, weight)
    loss_fn(logits, signal, targets).loss.backward()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(variant: str, loss: str, hidden_size: int, signal_path: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    saved = torch.load(signal_path, weights_only=True)
    targets, signal = saved["targets"], TeacherSignal(**saved["signal"])
    tokens, vocab = targets.numel(), saved["vocab"]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, hidden_size, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).requires_grad_()
    loss_fn = get_loss(loss)
    rows = torch.arange(64)
    step(variant, loss_fn, hidden[:64].detach().requires_grad_(), weight, signal.select(rows), targets[:64])
    weight.grad = None
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    start, cpu_start = time.perf_counter(), cpu_seconds()
    step(variant, loss_fn, hidden, weight, signal, targets)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = _rss_kib("VmHWM")
    logits_kib = tokens * vocab * 4 / 1024
    grads_kib = (hidden.grad.numel() + weight.grad.numel()) * 4 / 1024
    return {"seconds": seconds, "cpu": cpu, "extra": (peak - before) / logits_kib,
            "extra_less_grads": (peak - before - grads_kib) / logits_kib, "peak_gib": peak / 2**20}


def run_size(tokens: int, hidden: int, vocab: int, rounds: int, loss: str, threads: int) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "signal.pt"
        make_signal(tokens, vocab, path)
        results = {variant: [] for variant in VARIANTS}
        for round_ in range(rounds):
            for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                out = subprocess.run([sys.executable, "-m", "bench.fused_head", "--worker", variant, "--loss", loss,
                                      "--hidden", str(hidden), "--signal", str(path), "--threads", str(threads)],
                                     check=True, capture_output=True, text=True).stdout
                results[variant].append(json.loads(out.splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loss", default="atkd")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--signal", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.loss, args.hidden, args.signal, args.threads)))
        return

    print(f"loss {args.loss} on top-{TOP_K} + {TAIL_SAMPLES} tail samples, N = {args.tokens} tokens, H = {args.hidden},"
          f" fp32, torch threads {args.threads}, {args.rounds} interleaved rounds")
    print(f"{'V':>7s} {'variant':8s} {'median s':>9s} {'x logits':>9s} {'CPU s':>7s} {'x logits':>9s} "
          f"{'peak extra (x [N,V])':>21s} {'less grads':>11s} {'peak RSS GiB':>13s}")
    for vocab in args.vocab:
        results = run_size(args.tokens, args.hidden, vocab, args.rounds, args.loss, args.threads)
        base = statistics.median(r["seconds"] for r in results["logits"])
        cpu_base = statistics.median(r["cpu"] for r in results["logits"])
        for variant in VARIANTS:
            runs = results[variant]
            seconds, cpu = statistics.median(r["seconds"] for r in runs), statistics.median(r["cpu"] for r in runs)
            print(f"{vocab:7d} {variant:8s} {seconds:9.2f} {seconds / base:9.2f} {cpu:7.2f} {cpu / cpu_base:9.2f} "
                  f"{max(r['extra'] for r in runs):21.3f} {max(r['extra_less_grads'] for r in runs):11.3f} "
                  f"{max(r['peak_gib'] for r in runs):13.2f}", flush=True)


if __name__ == "__main__":
    main()
