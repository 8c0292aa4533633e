"""Baseline KD losses the paper applies ATKD to, and plain SFT.

All take ``(student_logits [B, T, V], teacher, targets [B, T])`` with ``teacher`` dense logits
``[B, T, V]`` or a :class:`TeacherSignal`, ignore targets == -100, and return a :class:`LossResult`
whose loss is the mean over valid tokens of a per-token divergence of the full distributions (on a
signal: of the coarsened buckets {g} ∪ {top-k \\ g} ∪ {TAIL}, ATKD.md §7) and whose stats are empty:

    forward_kl       KL(p || q)                                  supervised KD
    reverse_kl       KL(q || p)                                  reverse KD / MiniLLM-style
    jsd              beta KL(p||m) + (1-beta) KL(q||m)           GKD's generalised JSD
    skew_forward_kl  KL(p || alpha p + (1-alpha) q)              DistiLLM
    skew_reverse_kl  KL(q || alpha q + (1-alpha) p)              DistiLLM
    tvd              1/2 sum |p - q|                             f-distill
    dkd              alpha * TCKD + beta * NCKD = alpha KL(b_p||b_q) + beta KL(p^||q^)   (Zhao et al. 2022)
    cross_entropy    -log q_g                                    SFT on the ground truth (teacher unused)
"""

from __future__ import annotations

import torch

from .atkd import target_and_diversity
from .batch import LossBatch, TeacherInput, fused_chunked_sum
from .buckets import bucket_sum
from .divergences import JSD, TVD, Divergence, ForwardKL, ReverseKL, SkewForwardKL, SkewReverseKL
from .result import LossResult


def full_divergence_loss(student_logits, teacher: TeacherInput, targets, divergence: Divergence,
                         *, chunk_size: int | None = None, tail_control_variate: bool = False) -> LossResult:
    """mean over valid tokens of D(p, q) = phi(p_g, q_g) + sum_{buckets i != g} phi(p_i, q_i).

    ``tail_control_variate``: see :func:`atkd.student.losses.buckets.bucket_sum`."""
    if teacher is None:
        raise ValueError(f"{divergence.name} KD needs a teacher (dense logits or a TeacherSignal), got None")
    batch = LossBatch.from_inputs(student_logits, teacher, targets)
    scale = 1.0 / max(batch.num_valid, 1)

    def chunk_loss(positions: slice, logits: torch.Tensor) -> torch.Tensor:
        p = batch.teacher_normalised(positions)
        q = batch.student_normalised(positions, logits)
        per_token = divergence.term(p.log_target, q.log_target) + bucket_sum(
            divergence, p.full, q.full, p.full_samples, q.full_samples,
            sample_weights=p.buckets.sample_weights, control_variate=tail_control_variate,
            sample_logprobs_exact=p.buckets.sample_logprobs_exact)
        return scale * per_token.sum()

    return LossResult(fused_chunked_sum(batch, chunk_loss, chunk_size))


def forward_kl(student_logits, teacher, targets, *, chunk_size=None, tail_control_variate=False) -> LossResult:
    return full_divergence_loss(student_logits, teacher, targets, ForwardKL(), chunk_size=chunk_size,
                                tail_control_variate=tail_control_variate)


def reverse_kl(student_logits, teacher, targets, *, chunk_size=None, tail_control_variate=False) -> LossResult:
    return full_divergence_loss(student_logits, teacher, targets, ReverseKL(), chunk_size=chunk_size,
                                tail_control_variate=tail_control_variate)


def jsd(student_logits, teacher, targets, *, beta: float = 0.5, chunk_size=None,
        tail_control_variate=False) -> LossResult:
    return full_divergence_loss(student_logits, teacher, targets, JSD(beta), chunk_size=chunk_size,
                                tail_control_variate=tail_control_variate)


def skew_forward_kl(student_logits, teacher, targets, *, alpha: float = 0.1, chunk_size=None,
                    tail_control_variate=False) -> LossResult:
    return full_divergence_loss(student_logits, teacher, targets, SkewForwardKL(alpha), chunk_size=chunk_size,
                                tail_control_variate=tail_control_variate)


def skew_reverse_kl(student_logits, teacher, targets, *, alpha: float = 0.1, chunk_size=None,
                    tail_control_variate=False) -> LossResult:
    return full_divergence_loss(student_logits, teacher, targets, SkewReverseKL(alpha), chunk_size=chunk_size,
                                tail_control_variate=tail_control_variate)


def tvd(student_logits, teacher, targets, *, chunk_size=None, tail_control_variate=False) -> LossResult:
    return full_divergence_loss(student_logits, teacher, targets, TVD(), chunk_size=chunk_size,
                                tail_control_variate=tail_control_variate)


def dkd(student_logits, teacher, targets, *, alpha: float = 1.0, beta: float = 8.0, chunk_size=None,
        tail_control_variate=False) -> LossResult:
    """Decoupled KD (Zhao et al. 2022; their defaults alpha = 1, beta = 8), at temperature 1."""
    if teacher is None:
        raise ValueError("dkd needs a teacher (dense logits or a TeacherSignal), got None")
    batch = LossBatch.from_inputs(student_logits, teacher, targets)
    scale = 1.0 / max(batch.num_valid, 1)
    divergence = ForwardKL()

    def chunk_loss(positions: slice, logits: torch.Tensor) -> torch.Tensor:
        tckd, nckd = target_and_diversity(divergence, batch.teacher_normalised(positions),
                                          batch.student_normalised(positions, logits),
                                          tail_control_variate=tail_control_variate)
        return scale * (alpha * tckd + beta * nckd).sum()

    return LossResult(fused_chunked_sum(batch, chunk_loss, chunk_size))


def cross_entropy(student_logits, teacher, targets, *, chunk_size=None) -> LossResult:
    """Token-mean -log q_g over valid targets; ``teacher`` is ignored (pass None)."""
    batch = LossBatch.from_inputs(student_logits, None, targets)
    scale = 1.0 / max(batch.num_valid, 1)

    def chunk_loss(positions: slice, logits: torch.Tensor) -> torch.Tensor:
        targets_here = batch.targets[batch.valid_rows[positions]].unsqueeze(1)
        log_q_target = logits.gather(1, targets_here).squeeze(1) - torch.logsumexp(logits, dim=1)
        return -scale * log_q_target.sum()

    return LossResult(fused_chunked_sum(batch, chunk_loss, chunk_size))
