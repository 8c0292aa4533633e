"""Time and peak extra memory of atkd_loss vs forward_kl (forward + backward) on the same dense inputs.

    python -m bench.loss_speed [--batch 4 --seq 512 --vocab 32000 --repeats 5]

Each variant runs in its own subprocess for memory (peak RSS above the RSS right after the inputs
are built, read from /proc/self/status after resetting the high-water mark), and all variants are
timed in one process, interleaved, for the time ratios. A plain-autograd forward KL (log_softmax on
the whole [B, T, V] tensor) is shown for reference. Memory is in units of one logits tensor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from atkd.student.losses import atkd_loss, forward_kl


def plain_forward_kl(student, teacher, targets):
    valid = targets != -100
    log_p, log_q = teacher.log_softmax(-1), student.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)[valid].mean()


def chunked(loss_fn, **options):
    """The ``.loss`` of a loss of :mod:`atkd.student.losses` (a tensor, like the plain variant's)."""
    return lambda s, t, y: loss_fn(s, t, y, **options).loss


VARIANTS = {
    "forward_kl (chunked)": chunked(forward_kl),
    "atkd median (chunked)": chunked(atkd_loss),
    "atkd topk (chunked)": chunked(atkd_loss, split="topk"),
    "atkd reverse (chunked)": chunked(atkd_loss, base="reverse"),
    "forward_kl (plain autograd)": plain_forward_kl,
}


def make_inputs(batch, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=g).requires_grad_()
    teacher = 3 * torch.randn(batch, seq, vocab, generator=g)
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[:, :16] = -100  # a prompt, as in instruction data
    return student, teacher, targets


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(name, batch, seq, vocab) -> dict:
    """Run in a fresh process: peak RSS growth of one forward+backward, in logits-tensor units."""
    student, teacher, targets = make_inputs(batch, seq, vocab)
    VARIANTS[name](student, teacher, targets).backward()  # warm allocator and kernels once
    student.grad = None
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    VARIANTS[name](student, teacher, targets).backward()
    peak = _rss_kib("VmHWM")
    logits_kib = student.numel() * student.element_size() / 1024
    return {"extra_peak_logits": (peak - before) / logits_kib}


def measure_times(batch, seq, vocab, repeats) -> dict[str, float]:
    student, teacher, targets = make_inputs(batch, seq, vocab)
    times = {name: [] for name in VARIANTS}
    for _ in range(repeats + 1):  # the first round is warm-up
        for name, fn in VARIANTS.items():
            start = time.perf_counter()
            fn(student, teacher, targets).backward()
            times[name].append(time.perf_counter() - start)
            student.grad = None
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.batch, args.seq, args.vocab)))
        return

    memory = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "bench.loss_speed", "--memory-of", name, "--batch", str(args.batch),
                              "--seq", str(args.seq), "--vocab", str(args.vocab)],
                             check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.splitlines()[-1])["extra_peak_logits"]
    times = measure_times(args.batch, args.seq, args.vocab, args.repeats)
    base = times["forward_kl (chunked)"]
    print(f"fp32 logits [{args.batch}, {args.seq}, {args.vocab}] = "
          f"{args.batch * args.seq * args.vocab * 4 / 2**20:.0f} MiB, torch threads {torch.get_num_threads()}")
    print(f"{'loss (forward + backward)':30s} {'median s':>9s} {'x fwd KL':>9s} {'peak extra mem (x logits)':>26s}")
    for name in VARIANTS:
        print(f"{name:30s} {times[name]:9.3f} {times[name] / base:9.2f} {memory[name]:26.2f}")


if __name__ == "__main__":
    main()
