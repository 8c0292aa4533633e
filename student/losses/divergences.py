"""Separable divergences between a teacher distribution p and a student distribution q.

Every divergence here is a sum over the support of an elementwise term,
    D(p, q) = sum_i phi(log p_i, log q_i),
which is what lets one code path apply it to the full vocabulary, to the coarsened buckets of a
compressed teacher signal, to the binary target/non-target distributions (TKD) and to the
renormalised non-target distributions (DKD). Arguments are log-probabilities; masked buckets hold a
large finite negative number, so their probability is exactly 0 and their term is exactly 0.

    forward KL        KL(p || q)                      phi = p (log p - log q)
    reverse KL        KL(q || p)                      phi = q (log q - log p)
    JSD(beta)         beta KL(p||m) + (1-beta) KL(q||m),  m = beta p + (1 - beta) q   (GKD)
    skew forward KL   KL(p || alpha p + (1 - alpha) q)                                 (DistiLLM)
    skew reverse KL   KL(q || alpha q + (1 - alpha) p)                                 (DistiLLM)
    TVD               1/2 sum |p - q|
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log a and log b."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


class Divergence:
    """phi(log p, log q) summed over buckets; ``name`` is the registry key."""

    name: str = ""

    def term(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    #: phi / p is a + log p with a independent of p (forward KL): a tail sample's own log p may be replaced by
    #: the tail's mean log p without changing the estimate's expectation or its gradient (tail_ids_only)
    linear_in_teacher_logprob = False

    def term_per_teacher_mass(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """phi / p: the importance-sampling integrand when buckets are drawn from p."""
        return self.term(log_p, log_q) * torch.exp(-log_p)

    def control_variate_slope(self) -> float:
        """beta = -f'(1) for f(r) = phi(p, r p) / p (every divergence here is an f-divergence, so f does
        not depend on p): the coefficient of the tail control variate r - 1 (buckets.bucket_sum).
        Forward KL: f = -log r, beta = 1; reverse KL: f = r log r, beta = -1; TVD: 0 (f has a kink at 1)."""
        h = 1e-5
        log_r = torch.tensor([math.log1p(h), math.log1p(-h)], dtype=torch.float64)
        f = self.term_per_teacher_mass(torch.zeros(2, dtype=torch.float64), log_r)
        slope = -((f[0] - f[1]) / (2 * h)).item()
        return 0.0 if abs(slope) < 1e-6 else slope

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ForwardKL(Divergence):
    name = "forward"
    linear_in_teacher_logprob = True

    def term(self, log_p, log_q):
        return log_p.exp() * (log_p - log_q)

    def term_per_teacher_mass(self, log_p, log_q):
        return log_p - log_q


class ReverseKL(Divergence):
    name = "reverse"

    def term(self, log_p, log_q):
        return log_q.exp() * (log_q - log_p)


@dataclass(repr=True)
class JSD(Divergence):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024); beta = 0.5 is JSD."""

    beta: float = 0.5
    name = "jsd"

    def __post_init__(self):
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"JSD beta must be in (0, 1), got {self.beta}")

    def term(self, log_p, log_q):
        log_m = _log_mix(log_p, log_q, self.beta)
        return self.beta * log_p.exp() * (log_p - log_m) + (1 - self.beta) * log_q.exp() * (log_q - log_m)


@dataclass(repr=True)
class SkewForwardKL(Divergence):
    """KL(p || alpha p + (1 - alpha) q), DistiLLM's skew KL (alpha = 0.1 there)."""

    alpha: float = 0.1
    name = "skew_forward"

    def __post_init__(self):
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"skew alpha must be in [0, 1), got {self.alpha}")

    def term(self, log_p, log_q):
        return log_p.exp() * (log_p - _log_mix(log_p, log_q, self.alpha))

    def term_per_teacher_mass(self, log_p, log_q):
        return log_p - _log_mix(log_p, log_q, self.alpha)


@dataclass(repr=True)
class SkewReverseKL(Divergence):
    """KL(q || alpha q + (1 - alpha) p), DistiLLM's skew reverse KL."""

    alpha: float = 0.1
    name = "skew_reverse"

    def __post_init__(self):
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"skew alpha must be in [0, 1), got {self.alpha}")

    def term(self, log_p, log_q):
        return log_q.exp() * (log_q - _log_mix(log_q, log_p, self.alpha))


class TVD(Divergence):
    """Total variation distance (f-distill); the 1/2 makes it a distance in [0, 1]."""

    name = "tvd"

    def term(self, log_p, log_q):
        return 0.5 * (log_p.exp() - log_q.exp()).abs()


DIVERGENCES: dict[str, type[Divergence]] = {
    cls.name: cls for cls in (ForwardKL, ReverseKL, JSD, SkewForwardKL, SkewReverseKL, TVD)
}


def get_divergence(base: str | Divergence) -> Divergence:
    """A divergence instance from its name (default parameters) or as given."""
    if isinstance(base, Divergence):
        return base
    try:
        return DIVERGENCES[base]()
    except KeyError:
        raise ValueError(f"unknown divergence {base!r}; choose one of {sorted(DIVERGENCES)}") from None
