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

from .batch import LossBatch, Teacher, fused_chunked_sum
from .buckets import Normalised, bucket_sum
from .divergences import Divergence, ReverseKL, get_divergence

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


def target_and_diversity(divergence: Divergence, teacher: Normalised, student: Normalised):
    """Per-token TKD = D(b_p, b_q) and DKD = D(p^, q^), each ``[n]``."""
    tkd = divergence.term(teacher.log_target, student.log_target) + divergence.term(
        teacher.log_uncertainty, student.log_uncertainty)
    dkd = bucket_sum(divergence, teacher.hat, student.hat, teacher.hat_samples, student.hat_samples)
    return tkd, dkd


def atkd_loss(
    student_logits: torch.Tensor,
    teacher: Teacher,
    targets: torch.Tensor,
    *,
    lam: float = 0.2,
    split: str = "median",
    hard_fraction: float = 0.5,
    base: str | Divergence = "forward",
    decouple: bool = True,
    chunk_size: int | None = None,
    return_diagnostics: bool = False,
):
    """The ATKD loss (module docstring) as a scalar; with diagnostics, ``(loss, dict)``.

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
    Diagnostics: mean_uncertainty, n_easy, n_hard, tkd_hard, dkd_easy, dkd_hard (group means),
        loss_easy, loss_hard.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if teacher is None:
        raise ValueError("atkd_loss needs a teacher (dense logits or a TeacherSignal), got None")
    divergence = get_divergence(base)
    batch = LossBatch.from_inputs(student_logits, teacher, targets)
    uncertainty = teacher_uncertainty(batch, chunk_size)
    hard = split_hard(uncertainty, split, hard_fraction)
    n_hard = int(hard.sum())
    n_easy = batch.num_valid - n_hard
    hard_weight = (1.0 - lam) / max(n_hard, 1)
    easy_weight = lam / max(n_easy, 1)
    sums = {"tkd_hard": 0.0, "dkd_easy": 0.0, "dkd_hard": 0.0}

    def chunk_loss(positions: slice, logits: torch.Tensor) -> torch.Tensor:
        teacher_dist = batch.teacher_normalised(positions)
        student_dist = batch.student_normalised(positions, logits)
        tkd, dkd = target_and_diversity(divergence, teacher_dist, student_dist)
        if not decouple:
            coupling = student_dist if isinstance(divergence, ReverseKL) else teacher_dist
            dkd = coupling.uncertainty * dkd
        is_hard = hard[positions]
        if return_diagnostics:
            sums["tkd_hard"] += float(tkd.detach()[is_hard].sum())
            sums["dkd_easy"] += float(dkd.detach()[~is_hard].sum())
            sums["dkd_hard"] += float(dkd.detach()[is_hard].sum())
        dkd_weight = torch.full_like(dkd, easy_weight).masked_fill(is_hard, hard_weight)
        return (hard_weight * tkd[is_hard]).sum() + (dkd_weight * dkd).sum()

    loss = fused_chunked_sum(batch, chunk_loss, chunk_size)
    if not return_diagnostics:
        return loss
    means = {
        "tkd_hard": sums["tkd_hard"] / max(n_hard, 1),
        "dkd_easy": sums["dkd_easy"] / max(n_easy, 1),
        "dkd_hard": sums["dkd_hard"] / max(n_hard, 1),
    }
    return loss, {
        "mean_uncertainty": float(uncertainty.mean()) if batch.num_valid else 0.0,
        "n_easy": n_easy,
        "n_hard": n_hard,
        **means,
        "loss_easy": means["dkd_easy"],
        "loss_hard": means["tkd_hard"] + means["dkd_hard"],
    }
