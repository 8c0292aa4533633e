"""ATKD: adaptive teaching KD (Zhong et al., ACL 2024), on dense teacher logits or compressed signals.

Per position, with teacher p, student q and target g (ATKD.md §2):
    KL(p || q) = TKD + UnC * DKD,   TKD = KL(b_p || b_q),  DKD = KL(p^ || q^),  UnC = 1 - p_g
where b = [p_g, 1 - p_g] and p^ is the renormalised non-target distribution. ATKD (§3):
    1. score the N valid tokens of the micro-batch by the teacher's UnC (detached);
    2. split them into hard tokens H (large UnC) and easy tokens E;
    3. L_easy = mean_E DKD,  L_hard = mean_H TKD + mean_H DKD   (DKD *not* weighted by UnC);
    4. L = lam * L_easy + (1 - lam) * L_hard.
Split rules: "median" (the official code, the default): thr = lower median of UnC, easy = UnC < thr,
every other token hard (ties go to hard); "topk" (the paper): the ceil(hard_fraction * N) tokens of
largest UnC are hard; "none": every token hard (for ablations).

Other base divergences (our choice, documented in README): for a separable divergence D (reverse KL,
JSD, skew KLs, TVD) TKD := D(b_p, b_q) and DKD := D(p^, q^), i.e. the same split and decoupling
applied to D on the binary and the renormalised non-target distributions. For reverse KL this is the
exact reverse decomposition KL(q||p) = KL(b_q||b_p) + (1 - q_g) KL(q^||p^); for the others it is a
decomposition by construction, not an identity. The split always uses the teacher's UnC.

``decouple=False`` weights DKD by the coupling factor of the identity (teacher UnC for every base but
reverse KL, student 1 - q_g for reverse KL): with split="none" it recovers (1 - lam) * mean KL.
"""

from __future__ import annotations

import math

import torch

from atkd.proto.signal import TeacherSignal

from .batch import LossBatch, TeacherInput, fused_chunked_sum
from .buckets import Normalised, bucket_sum
from .divergences import Divergence, ReverseKL, get_divergence
from .result import LossResult

SPLIT_RULES = ("median", "topk", "none")


def teacher_uncertainty(batch: LossBatch, chunk_size: int | None = None) -> torch.Tensor:
    """UnC = 1 - p_g of the teacher at the N valid positions, ``[N]`` (no grad)."""
    if isinstance(batch.teacher, TeacherSignal):
        return batch.teacher.uncertainty.index_select(0, batch.valid_rows).to(batch.work_dtype)
    if batch.num_valid == 0:
        return torch.zeros(0, dtype=batch.work_dtype, device=batch.logits.device)
    return torch.cat([batch.teacher_normalised(chunk).uncertainty for chunk in batch.chunks(chunk_size)])


def split_hard(uncertainty: torch.Tensor, split: str = "median", hard_fraction: float = 0.5) -> torch.Tensor:
    """Boolean ``[N]`` mask of hard tokens under a split rule (see the module docstring)."""
    n = uncertainty.numel()
    if split == "none" or n == 0:
        return torch.ones(n, dtype=torch.bool, device=uncertainty.device)
    if split == "median":
        return ~(uncertainty < uncertainty.median())
    if split == "topk":
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
        hard = torch.zeros(n, dtype=torch.bool, device=uncertainty.device)
        hard[uncertainty.topk(math.ceil(hard_fraction * n)).indices] = True
        return hard
    raise ValueError(f"unknown split rule {split!r}; choose one of {SPLIT_RULES}")


def target_and_diversity(divergence: Divergence, teacher: Normalised, student: Normalised, *,
                         tail_control_variate: bool = False):
    """Per-token TKD = D(b_p, b_q) and DKD = D(p^, q^), each ``[n]`` (tail samples: see bucket_sum)."""
    tkd = divergence.term(teacher.log_target, student.log_target) + divergence.term(
        teacher.log_uncertainty, student.log_uncertainty)
    dkd = bucket_sum(divergence, teacher.hat, student.hat, teacher.hat_samples, student.hat_samples,
                     sample_weights=teacher.buckets.sample_weights, control_variate=tail_control_variate,
                     sample_logprobs_exact=teacher.buckets.sample_logprobs_exact)
    return tkd, dkd


def atkd_loss(
    student_logits: torch.Tensor,
    teacher: TeacherInput,
    targets: torch.Tensor,
    *,
    lam: float = 0.2,
    split: str = "median",
    hard_fraction: float = 0.5,
    base: str | Divergence = "forward",
    decouple: bool = True,
    chunk_size: int | None = None,
    tail_control_variate: bool = False,
) -> LossResult:
    """The ATKD loss (module docstring) and its statistics.

    Args:
        student_logits: ``[B, T, V]`` (any float dtype; computed in fp32), ``logits[b, t]`` predicts
            ``targets[b, t]``.
        teacher: dense teacher logits ``[B, T, V]`` or a :class:`TeacherSignal` over ``[B, T]``.
        targets: ``[B, T]`` token ids, -100 = ignored (prompt, padding).
        lam: weight of the easy-token loss (paper: 0.2).
        split, hard_fraction: split rule and the hard fraction of the "topk" rule.
        base: "forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tvd" or a Divergence.
        decouple: False multiplies DKD by the coupling factor (for ablations and identity checks).
        chunk_size: valid tokens per chunk of ``[tokens, V]`` work (default: ~4M elements).
        tail_control_variate: with a signal's tail samples, estimate the tail term with the student's
            own tail as a control variate (:func:`atkd.student.losses.buckets.bucket_sum`); the
            weights of the samples always come with the signal.

    Returns:
        :class:`LossResult`; ``stats`` (0-dim tensors, accumulated on device: the loss never syncs
        with the host): ``mean_uncertainty`` (mean teacher UnC over the N valid tokens), ``n_easy`` and
        ``n_hard`` (group sizes, int64), the group means ``tkd_hard`` = mean_H TKD, ``dkd_easy`` =
        mean_E DKD, ``dkd_hard`` = mean_H DKD, and ``loss_easy`` = dkd_easy, ``loss_hard`` =
        tkd_hard + dkd_hard (an empty group's means are 0).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if teacher is None:
        raise ValueError("atkd_loss needs a teacher (dense logits or a TeacherSignal), got None")
    divergence = get_divergence(base)
    batch = LossBatch.from_inputs(student_logits, teacher, targets)
    uncertainty = teacher_uncertainty(batch, chunk_size)
    hard = split_hard(uncertainty, split, hard_fraction)
    n_hard = hard.sum()
    n_easy = batch.num_valid - n_hard
    # Group sizes as divisors in the work dtype, clamped so that an empty group contributes 0, not NaN.
    hard_size = n_hard.to(batch.work_dtype).clamp(min=1)
    easy_size = n_easy.to(batch.work_dtype).clamp(min=1)
    hard_weight, easy_weight = (1.0 - lam) / hard_size, lam / easy_size
    zero = torch.zeros((), dtype=batch.work_dtype, device=batch.logits.device)
    sums = {"tkd_hard": zero, "dkd_easy": zero, "dkd_hard": zero}

    def chunk_loss(positions: slice, logits: torch.Tensor) -> torch.Tensor:
        teacher_dist = batch.teacher_normalised(positions)
        student_dist = batch.student_normalised(positions, logits)
        tkd, dkd = target_and_diversity(divergence, teacher_dist, student_dist,
                                        tail_control_variate=tail_control_variate)
        if not decouple:
            coupling = student_dist if isinstance(divergence, ReverseKL) else teacher_dist
            dkd = coupling.uncertainty * dkd
        is_hard = hard[positions]
        tkd_of_hard = torch.where(is_hard, tkd, 0.0)  # a mask, not an index: no host sync for the group's size
        sums["tkd_hard"] = sums["tkd_hard"] + tkd_of_hard.detach().sum()
        sums["dkd_easy"] = sums["dkd_easy"] + torch.where(is_hard, 0.0, dkd.detach()).sum()
        sums["dkd_hard"] = sums["dkd_hard"] + torch.where(is_hard, dkd.detach(), 0.0).sum()
        dkd_weight = torch.where(is_hard, hard_weight, easy_weight)
        return hard_weight * tkd_of_hard.sum() + (dkd_weight * dkd).sum()

    loss = fused_chunked_sum(batch, chunk_loss, chunk_size)
    means = {
        "tkd_hard": sums["tkd_hard"] / hard_size,
        "dkd_easy": sums["dkd_easy"] / easy_size,
        "dkd_hard": sums["dkd_hard"] / hard_size,
    }
    stats = {
        "mean_uncertainty": uncertainty.mean() if batch.num_valid else zero,
        "n_easy": n_easy,
        "n_hard": n_hard,
        **means,
        "loss_easy": means["dkd_easy"],
        "loss_hard": means["tkd_hard"] + means["dkd_hard"],
    }
    return LossResult(loss, stats)
