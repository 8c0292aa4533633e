"""Teacher and student distributions at a chunk of n positions, split into target / non-target.

Both a dense teacher (logits ``[n, V]``) and a compressed one (:class:`atkd.proto.signal.TeacherSignal`)
become the same :class:`Buckets`: the log-weight of the target token g and the log-weights of the
non-target buckets, with any per-row offset (raw logits are fine). For a dense teacher the buckets
are the V vocabulary entries with column g masked; for a signal they are
    {i in top-k, i != g} ∪ {TAIL},     TAIL = everything outside top-k ∪ {g},
and the student, which has its full logits, is coarsened onto the same buckets with an exact TAIL
mass. Masking uses a large finite negative number rather than -inf (0 * (-inf - -inf) is NaN), and
the target column is removed by masking, never by subtraction from the full KL (ATKD.md §6).

:meth:`Buckets.normalise` gives every quantity the losses need (all in log space):
    log_target = log p_g,  log_uncertainty = log(1 - p_g) = logsumexp(rest) - logsumexp(all),
    hat  = log p^_i  = rest_i - logsumexp(rest)         (renormalised non-target distribution)
    full = log p_i   = rest_i - logsumexp(all)          (non-target part of the full distribution)
Optional tail samples (tokens drawn from the teacher's tail) are carried at the same offsets, with
their weights a_j (see :mod:`atkd.proto.signal`; None: 1/m each).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from atkd.proto.signal import TeacherSignal

#: Log-weight of a masked bucket: exp() of it is exactly 0 in fp32 and fp64, and it stays finite.
MASKED = -1e30


class Normalised:
    """Normalised log-probabilities at n positions over C non-target buckets (+ m tail samples).

    ``log_target [n]`` = log p_g and ``log_uncertainty [n]`` = log(1 - p_g) are computed at once;
    the ``[n, C]`` views ``hat`` (log p^, renormalised non-target) and ``full`` (log p_i of the
    non-target buckets) only when a loss asks for them.
    """

    def __init__(self, buckets: Buckets):
        self.buckets = buckets
        self.log_rest = torch.logsumexp(buckets.rest, dim=1)
        log_all = torch.logaddexp(buckets.target, self.log_rest)
        self.log_all = log_all
        self.log_target = buckets.target - log_all
        self.log_uncertainty = self.log_rest - log_all

    @property
    def uncertainty(self) -> torch.Tensor:
        return self.log_uncertainty.exp()

    @cached_property
    def hat(self) -> torch.Tensor:
        return self.buckets.rest - self.log_rest.unsqueeze(1)

    @cached_property
    def full(self) -> torch.Tensor:
        return self.buckets.rest - self.log_all.unsqueeze(1)

    @cached_property
    def hat_samples(self) -> torch.Tensor | None:
        samples = self.buckets.samples
        return None if samples is None else samples - self.log_rest.unsqueeze(1)

    @cached_property
    def full_samples(self) -> torch.Tensor | None:
        samples = self.buckets.samples
        return None if samples is None else samples - self.log_all.unsqueeze(1)


@dataclass
class Buckets:
    """Unnormalised log-weights: target ``[n]``, non-target buckets ``[n, C]``, samples ``[n, m]``.

    When ``samples`` is given, the last bucket of ``rest`` is the TAIL bucket the samples were
    drawn from (see :func:`bucket_sum`).
    """

    target: torch.Tensor
    rest: torch.Tensor
    samples: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    sample_logprobs_exact: bool = True  # False: each sample holds its position's tail mean (tail_ids_only)

    def normalise(self) -> Normalised:
        return Normalised(self)


def dense_buckets(logits: torch.Tensor, targets: torch.Tensor) -> Buckets:
    """Vocabulary buckets from logits ``[n, V]`` and targets ``[n]`` (all valid)."""
    cols = targets.unsqueeze(1)
    return Buckets(target=logits.gather(1, cols).squeeze(1), rest=logits.scatter(1, cols, MASKED))


def signal_buckets(signal: TeacherSignal, targets: torch.Tensor, dtype: torch.dtype) -> Buckets:
    """Coarsened teacher buckets from a flattened signal at n valid positions."""
    is_target = signal.topk_ids == targets.unsqueeze(1)
    topk = signal.topk_logprobs.to(dtype).masked_fill(is_target, MASKED)
    tail = signal.tail_logprob.to(dtype).clamp_min(MASKED).unsqueeze(1)
    samples, weights = signal.tail_sample_logprobs, signal.sample_weights()
    return Buckets(
        target=signal.target_logprob.to(dtype),
        rest=torch.cat([topk, tail], dim=1),
        samples=None if samples is None else samples.to(dtype),
        sample_weights=None if weights is None else weights.to(dtype),
        sample_logprobs_exact=signal.tail_mean_logprob is None,
    )


def student_buckets_for_signal(logits: torch.Tensor, signal: TeacherSignal, targets: torch.Tensor) -> Buckets:
    """Student logits ``[n, V]`` coarsened onto the buckets of ``signal``; its TAIL mass is exact."""
    cols = targets.unsqueeze(1)
    is_target = signal.topk_ids == cols
    outside = logits.scatter(1, signal.topk_ids, MASKED).scatter(1, cols, MASKED)
    tail = torch.logsumexp(outside, dim=1, keepdim=True)
    samples = signal.tail_sample_ids
    return Buckets(
        target=logits.gather(1, cols).squeeze(1),
        rest=torch.cat([logits.gather(1, signal.topk_ids).masked_fill(is_target, MASKED), tail], dim=1),
        samples=None if samples is None else logits.gather(1, samples),
    )


def bucket_sum(divergence, log_p, log_q, log_p_samples=None, log_q_samples=None, *,
               sample_weights=None, control_variate: bool = False,
               sample_logprobs_exact: bool = True) -> torch.Tensor:
    """sum_i phi(log p_i, log q_i) over the buckets ``[n, C]`` -> ``[n]``.

    With tail samples ``[n, m]`` (drawn from p restricted to the last bucket, the TAIL, of mass P_T),
    the last bucket's term is replaced by an unbiased estimate of the per-token sum over the tokens it
    holds, S = sum_{i in T} phi(p_i, q_i) = P_T E_{i ~ p/P_T}[phi_i / p_i]:
        S^ = P_T sum_j a_j phi_j / p_j          (a_j = ``sample_weights``, default 1/m)
    ``control_variate`` subtracts the student's own tail, known exactly: with r = q / p and the slope
    beta = -f'(1) of the divergence's f(r) = phi / p (:meth:`Divergence.control_variate_slope`),
        S^_cv = P_T sum_j a_j [phi_j / p_j + beta (r_j - 1)] - beta (Q_T - P_T),
    unbiased for any beta since E[P_T sum_j a_j (r_j - 1)] = Q_T - P_T (Q_T: the student's exact TAIL
    mass). The integrand f(r) + beta (r - 1) has no first-order term at r = 1 (for forward KL it is
    r - 1 - log r >= 0), so the noise vanishes as the student approaches the teacher on its tail.

    ``sample_logprobs_exact`` False (a ``tail_ids_only`` signal): every sample's log p is its position's
    exact tail mean E[log p_i]. Only an integrand linear in log p (forward KL: log p - log q) keeps its
    expectation, and its gradient w.r.t. the student never needed log p; anything else raises.
    """
    if log_p_samples is None:
        return divergence.term(log_p, log_q).sum(1)
    if not sample_logprobs_exact and (control_variate or not divergence.linear_in_teacher_logprob):
        raise ValueError(f"a tail_ids_only signal carries no per-sample teacher log-probs, which the "
                         f"{divergence.name} divergence{' with the tail control variate' if control_variate else ''} "
                         "needs: request the samples' log-probs (tail_ids_only false) or use the forward divergence")
    head = divergence.term(log_p[:, :-1], log_q[:, :-1]).sum(1)
    integrand = divergence.term_per_teacher_mass(log_p_samples, log_q_samples)
    beta = divergence.control_variate_slope() if control_variate else 0.0
    if beta:
        integrand = integrand + beta * torch.expm1(log_q_samples - log_p_samples)
    if sample_weights is None:
        per_mass = integrand.mean(1)
    else:
        per_mass = (sample_weights * integrand).sum(1)
    tail_p = log_p[:, -1].exp()
    estimate = tail_p * per_mass
    if beta:
        estimate = estimate - beta * (log_q[:, -1].exp() - tail_p)
    return head + estimate
