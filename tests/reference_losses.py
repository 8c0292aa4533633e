"""A slow, independent float64 reference of the losses: a Python loop over tokens, one at a time.

Written straight from ATKD.md (no chunking, no buckets, no shared code with atkd.student.losses) so that
parity tests compare two independent derivations.
"""

from __future__ import annotations

import math

import torch


def _token_dists(student_logits, teacher_logits, targets):
    """Yield (p, q, g) per valid token as float64 probability vectors."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).double()
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).double()
    for i, g in enumerate(targets.reshape(-1).tolist()):
        if g != -100:
            yield torch.softmax(t[i], 0), torch.softmax(s[i], 0), g


def kl(p, q):
    mask = p > 0
    return float((p[mask] * (p[mask].log() - q[mask].log())).sum())


def tkd_dkd(p, q, g):
    """(KL(b_p || b_q), KL(p^ || q^), UnC) for one token."""
    bp = torch.stack([p[g], 1 - p[g]])
    bq = torch.stack([q[g], 1 - q[g]])
    keep = torch.ones_like(p, dtype=torch.bool)
    keep[g] = False
    return kl(bp, bq), kl(p[keep] / p[keep].sum(), q[keep] / q[keep].sum()), float(1 - p[g])


def reference_hard_mask(uncertainties: list[float], split: str, hard_fraction: float = 0.5) -> list[bool]:
    n = len(uncertainties)
    if split == "none":
        return [True] * n
    ordered = sorted(uncertainties)
    if split == "median":
        threshold = ordered[(n - 1) // 2]  # the lower median
        return [u >= threshold for u in uncertainties]
    n_hard = math.ceil(hard_fraction * n)
    cut = ordered[n - n_hard] if n_hard else float("inf")
    return [u >= cut for u in uncertainties]


def reference_atkd(student_logits, teacher_logits, targets, *, lam=0.2, split="median", hard_fraction=0.5,
                   base="forward") -> float:
    rows = []
    for p, q, g in _token_dists(student_logits, teacher_logits, targets):
        if base == "forward":
            tkd, dkd, _ = tkd_dkd(p, q, g)
        else:
            tkd, dkd, _ = tkd_dkd(q, p, g)
        rows.append((tkd, dkd, float(1 - p[g])))
    if not rows:
        return 0.0
    hard = reference_hard_mask([r[2] for r in rows], split, hard_fraction)
    easy_rows = [r for r, h in zip(rows, hard, strict=True) if not h]
    hard_rows = [r for r, h in zip(rows, hard, strict=True) if h]
    l_easy = sum(r[1] for r in easy_rows) / len(easy_rows) if easy_rows else 0.0
    l_hard = (sum(r[0] + r[1] for r in hard_rows) / len(hard_rows)) if hard_rows else 0.0
    return lam * l_easy + (1 - lam) * l_hard


def reference_divergence(student_logits, teacher_logits, targets, name: str, param: float | None = None) -> float:
    values = []
    for p, q, _g in _token_dists(student_logits, teacher_logits, targets):
        if name == "forward_kl":
            values.append(kl(p, q))
        elif name == "reverse_kl":
            values.append(kl(q, p))
        elif name == "jsd":
            beta = 0.5 if param is None else param
            m = beta * p + (1 - beta) * q
            values.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
        elif name == "skew_forward_kl":
            alpha = 0.1 if param is None else param
            values.append(kl(p, alpha * p + (1 - alpha) * q))
        elif name == "skew_reverse_kl":
            alpha = 0.1 if param is None else param
            values.append(kl(q, alpha * q + (1 - alpha) * p))
        elif name == "tvd":
            values.append(float(0.5 * (p - q).abs().sum()))
        elif name == "sft":
            values.append(-math.log(float(q[_g])))
        elif name == "dkd":
            tkd, dkd, _ = tkd_dkd(p, q, _g)
            values.append(1.0 * tkd + 8.0 * dkd)
        else:
            raise ValueError(name)
    return sum(values) / len(values) if values else 0.0
