"""The compressed teacher signal: what a teacher replica sends per scored position.

Shipping |V| floats per token is too much for a network, so the teacher sends, for every position
whose next token g (the *target*) is known:

- ``target_logprob``  log p_g, exact (from the full distribution on the teacher)
- ``topk_ids``, ``topk_logprobs``  the k most likely tokens and their exact log-probabilities
- ``tail_logprob``  log of the exact probability mass outside top-k ∪ {g} (``-inf`` if empty)
- ``uncertainty``  UnC = 1 - p_g, exact (computed as a sum over the non-target tokens, never as
  ``1 - exp(log p_g)``, which rounds to 0 for confident tokens)
- ``entropy``  H(p) of the full distribution
- optionally ``tail_sample_ids`` / ``tail_sample_logprobs``: m tokens drawn from the teacher's tail
  (i outside top-k ∪ {g}, mass P_tail) with their exact log p_i, and ``tail_sample_weights`` a_j such
  that  sum_j a_j f(j)  is an unbiased estimate of the tail mean  E_{i ~ p/P_tail} f(i)  for any f
  (None: a_j = 1/m). They let the student estimate tail terms without bias (see TAIL_ESTIMATORS).
- or the samples' ids alone and ``tail_mean_logprob``  E_{i ~ p/P_tail} log p_i, exact
  (``compress(..., tail_ids_only=True)``): ``tail_sample_logprobs`` then holds that mean at every
  sample. A term linear in log p_i (forward KL: p_i (log p_i - log q_i)) keeps its expectation and its
  gradient w.r.t. the student, which needs only which tokens were drawn; a sample costs half the bytes.

This module is the contract between the teacher server and the student: both import it, it
imports nothing of the project. Tensors carry the positions' shape ``P`` (usually ``[B, T]``) as
their leading dimensions; positions whose target is ignored (-100) hold zeros in the target fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .alignment import IGNORE_INDEX

#: Elements of fp32 [rows, V] work per chunk when no chunk size is given (16 MiB per buffer).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def rows_per_chunk(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows of a ``[rows, V]`` working buffer processed at once: bounds temporary memory."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))


@dataclass(frozen=True)
class TeacherSignal:
    """Compressed teacher output for positions of shape ``P`` (see the module docstring).

    Shapes: ``target_logprob, tail_logprob, uncertainty, entropy: [*P]`` float;
    ``topk_ids: [*P, k]`` int64, ``topk_logprobs: [*P, k]`` float;
    ``tail_sample_ids: [*P, m]`` int64 and ``tail_sample_logprobs: [*P, m]`` float, or None.
    With samples, optionally: ``tail_sample_weights [*P, m]`` (the a_j of the module docstring; 0 marks
    padding), ``tail_sample_counts [*P]`` int64 (samples actually used per position, the first ones:
    a ragged layout, e.g. the adaptive budget) and ``tail_log_threshold [*P]`` (log tau of priority
    sampling, from which the weights follow: :func:`priority_weights`).
    Floats are float32 (float64 when compressed from float64 logits, for exact tests).
    """

    target_logprob: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    uncertainty: torch.Tensor
    entropy: torch.Tensor
    tail_sample_ids: torch.Tensor | None = None
    tail_sample_logprobs: torch.Tensor | None = None
    tail_sample_weights: torch.Tensor | None = None
    tail_sample_counts: torch.Tensor | None = None
    tail_log_threshold: torch.Tensor | None = None
    tail_mean_logprob: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.target_logprob.shape
        for name in ("tail_logprob", "uncertainty", "entropy"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"TeacherSignal.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected {tuple(shape)} like target_logprob")
        for ids, values, what in ((self.topk_ids, self.topk_logprobs, "topk"),
                                  (self.tail_sample_ids, self.tail_sample_logprobs, "tail_sample")):
            if (ids is None) != (values is None):
                raise ValueError(f"TeacherSignal.{what}_ids and {what}_logprobs must be given together")
            if ids is None:
                continue
            if ids.shape != values.shape or ids.shape[:-1] != shape:
                raise ValueError(f"TeacherSignal.{what}_ids {tuple(ids.shape)} and {what}_logprobs "
                                 f"{tuple(values.shape)} must both be {tuple(shape)} + [n]")
        for name, expected in (("tail_sample_weights", None if self.tail_sample_ids is None else
                                self.tail_sample_ids.shape), ("tail_sample_counts", shape),
                               ("tail_log_threshold", shape), ("tail_mean_logprob", shape)):
            value = getattr(self, name)
            if value is None:
                continue
            if self.tail_sample_ids is None:
                raise ValueError(f"TeacherSignal.{name} needs tail samples")
            if value.shape != expected:
                raise ValueError(f"TeacherSignal.{name} has shape {tuple(value.shape)}, expected {tuple(expected)}")

    @property
    def positions_shape(self) -> torch.Size:
        return self.target_logprob.shape

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    @property
    def num_tail_samples(self) -> int:
        return 0 if self.tail_sample_ids is None else self.tail_sample_ids.shape[-1]

    def sample_weights(self) -> torch.Tensor | None:
        """The weights a_j ``[*P, m]`` of the tail samples: given, or 1/count for each position's first
        ``tail_sample_counts`` samples (0 past them), or None when every sample weighs 1/m."""
        if self.tail_sample_weights is not None or self.tail_sample_counts is None:
            return self.tail_sample_weights
        counts = self.tail_sample_counts.unsqueeze(-1)
        used = torch.arange(self.num_tail_samples, device=counts.device) < counts
        return used.to(self.tail_sample_logprobs.dtype) / counts.clamp(min=1).to(self.tail_sample_logprobs.dtype)

    def map_tensors(self, fn) -> TeacherSignal:
        """The signal with ``fn`` applied to every tensor field (positions are the leading dims)."""
        return TeacherSignal(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in dataclasses.fields(self)})

    def flatten(self) -> TeacherSignal:
        """The same signal with the positions flattened to one dimension ``[N]``."""
        n = self.target_logprob.numel()
        return self.map_tensors(lambda t: t.reshape(n, *t.shape[self.target_logprob.dim():]))

    def select(self, rows: torch.Tensor) -> TeacherSignal:
        """Rows of a flattened signal: ``rows`` is a 1-D index tensor into ``[N]``."""
        return self.map_tensors(lambda t: t.index_select(0, rows))

    def to(self, device: torch.device | str) -> TeacherSignal:
        return self.map_tensors(lambda t: t.to(device))


#: Tail estimators of :func:`compress` (``tail_estimator``); each returns ids, log-probs and weights a_j.
#:   systematic  m points (u + j) / m on the tail's CDF, one uniform per position (the default)
#:   iid         m independent draws from the tail (with replacement), a_j = 1/m
#:   priority    priority sampling without replacement (Duffield, Lund & Thorup 2007): keys p_i / u_i,
#:               the m largest kept, tau = the (m+1)-th key; a_j = max(p_j, tau) / P_tail
#:   gumbel      Gumbel-top-m without replacement (keys log p_i + G_i) with Horvitz-Thompson weights
#:               conditional on the (m+1)-th key kappa: pi_j = 1 - exp(-p_j e^-kappa), a_j = p_j / (P_tail pi_j)
#:   rskd        Random-Sampling KD (Anshumann et al., ACL 2025): m draws with replacement from the whole
#:               distribution p, kept once per distinct tail token with a_j = count_j / (m P_tail)
#: Every a_j makes  sum_j a_j f(j)  unbiased for  E_{i ~ p / P_tail} f(i)  (tests/test_tail_estimators.py).
TAIL_ESTIMATORS = ("systematic", "iid", "priority", "gumbel", "rskd")

#: Largest number of tail samples of one position under the adaptive budget (its count travels as uint8).
MAX_ADAPTIVE_SAMPLES = 255


@torch.no_grad()
def compress(
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    *,
    tail_samples: int = 0,
    generator: torch.Generator | None = None,
    tail_offsets: torch.Tensor | None = None,
    chunk_size: int | None = None,
    tail_estimator: str = "systematic",
    adaptive_tail: bool = False,
    tail_ids_only: bool = False,
) -> TeacherSignal:
    """Compress teacher logits ``[*P, V]`` into a :class:`TeacherSignal` for targets ``[*P]``.

    The distribution is p = softmax(logits / temperature), computed in fp32 (fp64 stays fp64) chunk
    by chunk over positions so that at most ``chunk_size`` rows of ``[rows, V]`` work exist at once.
    For a position with target g:
        target_logprob = log p_g,  uncertainty = sum_{i != g} p_i,
        tail_logprob = log sum_{i not in topk ∪ {g}} p_i,  entropy = -sum_i p_i log p_i.
    Positions whose target is -100 get zeros in target_logprob/uncertainty and a tail outside the
    top-k only. ``k`` may be 0 (no top-k: the RS-KD signal). ``tail_samples`` = m > 0 also draws tail
    tokens with ``tail_estimator`` (see :data:`TAIL_ESTIMATORS`; "systematic" by default). The
    randomness comes from ``generator``, or from ``tail_offsets`` (``[n]`` uniforms in [0, 1), one per
    position in order: the systematic offset itself, or the seed of the position's own generator),
    which makes the samples of a position independent of how positions are batched or chunked.

    ``adaptive_tail``: the m * n samples of the n positions of a chunk are split unevenly, position i
    getting m_i = 1 + its share of (m - 1) * n in proportion to its renormalised tail mass
    P_tail / (1 - p_g) (the mass the DKD term sees), capped at :data:`MAX_ADAPTIVE_SAMPLES`; the
    signal then carries ``tail_sample_counts`` and zero-weight padding up to max m_i. The split depends
    on the chunk's positions (not on the samples' randomness).

    ``tail_ids_only``: the samples' own log-probs are replaced by ``tail_mean_logprob`` = sum_{i in tail}
    p_i log p_i / P_tail (0 where the tail is empty), the same at every sample of a position; not with
    "priority" (its weights follow from the log-probs).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits.shape[:-1] != targets.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be targets "
                         f"{tuple(targets.shape)} + [V]")
    vocab = teacher_logits.shape[-1]
    if not 0 <= k <= vocab:
        raise ValueError(f"k must be in [0, {vocab}], got {k}")
    if tail_estimator not in TAIL_ESTIMATORS:
        raise ValueError(f"unknown tail_estimator {tail_estimator!r}; choose one of {TAIL_ESTIMATORS}")
    if tail_samples < 0:
        raise ValueError(f"tail_samples must be >= 0, got {tail_samples}")
    if tail_ids_only and tail_estimator == "priority":
        raise ValueError("tail_ids_only does not apply to priority sampling (its weights need the samples' log-probs)")
    if adaptive_tail and tail_estimator == "rskd":
        raise ValueError("adaptive_tail does not apply to rskd (its draws cover the whole distribution)")
    positions = targets.shape
    logits = teacher_logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1)
    work_dtype = torch.promote_types(logits.dtype, torch.float32)

    out = {f.name: [] for f in dataclasses.fields(TeacherSignal)}
    step = rows_per_chunk(vocab, chunk_size)
    for start in range(0, max(1, logits.shape[0]), step):  # one (empty) chunk when there are no positions
        z = logits[start:start + step].to(work_dtype) / temperature
        tgt = flat_targets[start:start + z.shape[0]]
        has_target = tgt != IGNORE_INDEX
        tgt_col = tgt.clamp(min=0).unsqueeze(1)

        log_norm = torch.logsumexp(z, dim=1, keepdim=True)
        logp = z - log_norm
        p = logp.exp()
        out["entropy"].append(-(p * logp).sum(1))
        topk_logprobs, topk_ids = logp.topk(k, dim=1)
        out["topk_ids"].append(topk_ids)
        out["topk_logprobs"].append(topk_logprobs)

        masked = z.clone()
        rows_with_target = has_target.nonzero().squeeze(1)
        masked[rows_with_target, tgt[rows_with_target]] = float("-inf")
        non_target = torch.logsumexp(masked, dim=1) - log_norm.squeeze(1)
        out["target_logprob"].append(torch.where(has_target, logp.gather(1, tgt_col).squeeze(1), 0.0))
        uncertainty = torch.where(has_target, non_target.exp(), 0.0)
        out["uncertainty"].append(uncertainty)
        masked.scatter_(1, topk_ids, float("-inf"))
        tail = torch.logsumexp(masked, dim=1) - log_norm.squeeze(1)
        out["tail_logprob"].append(tail)

        if tail_samples:
            offsets = None if tail_offsets is None else tail_offsets[start:start + z.shape[0]]
            if adaptive_tail:
                share = torch.where(has_target, tail.exp() / uncertainty.clamp_min(1e-30), tail.exp())
                counts = adaptive_counts(share, tail_samples, (~torch.isinf(masked)).sum(1))
            else:
                counts = None
            draws = TailDraws.sample(tail_estimator, masked, logp, tail, tail_samples, counts, generator, offsets)
            fields = draws.fields()
            if tail_ids_only:
                mean = tail_mean_logprob(masked - log_norm, tail)
                fields["tail_sample_logprobs"] = mean.unsqueeze(1).expand_as(fields["tail_sample_ids"]).clone()
                fields["tail_mean_logprob"] = mean
            for name, value in fields.items():
                out[name].append(value)

    fields = {}
    for name, parts in out.items():
        if parts:
            if name in _SAMPLE_COLUMNS:
                parts = _pad_columns(parts)
            flat = torch.cat(parts)
            fields[name] = flat.reshape(*positions, *flat.shape[1:])
    return TeacherSignal(**fields)


def tail_mean_logprob(tail_logp: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """E_{i ~ p/P_tail} log p_i ``[n]`` from the log-probs ``[n, V]`` (-inf outside the tail) and log P_tail ``[n]``;
    0 where the tail is empty."""
    inside = torch.isfinite(tail_logp) & torch.isfinite(tail).unsqueeze(1)
    within = (tail_logp - tail.unsqueeze(1)).exp()  # p_i / P_tail, without underflow for a small tail
    return torch.where(inside, within * tail_logp, 0.0).sum(1)


def adaptive_counts(share: torch.Tensor, mean_samples: int, tail_sizes: torch.Tensor) -> torch.Tensor:
    """Samples per position ``[n]`` (int64) averaging ``mean_samples``: 1 each, the rest in proportion to ``share``.

    Largest-remainder rounding of (m - 1) * n * share_i / sum(share); a position gets at most
    min(MAX_ADAPTIVE_SAMPLES, its tail size) (with-replacement draws need no cap by tail size, but
    more draws than tail tokens would only repeat tokens). What a cap cuts off is not re-spread.
    """
    n = share.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=share.device)
    share = share.double().clamp_min(0)
    total = share.sum()
    weights = share / total if total > 0 else torch.full_like(share, 1.0 / n)
    extra = (mean_samples - 1) * n * weights
    base = extra.floor()
    left = int((mean_samples - 1) * n - base.sum().item())
    if left > 0:
        base[(extra - base).topk(min(left, n)).indices] += 1
    cap = tail_sizes.clamp(min=1, max=MAX_ADAPTIVE_SAMPLES)
    return torch.minimum(1 + base.long(), cap)


#: The ``[*P, m]`` fields, whose width m may differ between signals under the adaptive budget.
_SAMPLE_COLUMNS = ("tail_sample_ids", "tail_sample_logprobs", "tail_sample_weights")


def _pad_columns(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Chunks ``[n_c, m_c]`` padded with zeros to the widest m (adaptive budgets differ per chunk)."""
    width = max(part.shape[1] for part in parts)
    return [torch.nn.functional.pad(part, (0, width - part.shape[1])) for part in parts]


def _row_uniforms(rows: int, count: int, generator, offsets, like: torch.Tensor) -> torch.Tensor:
    """Uniforms ``[rows, count]`` in [0, 1): from ``generator``, or per row from a generator seeded by its offset."""
    if offsets is None:
        return torch.rand(rows, count, generator=generator, device=like.device, dtype=like.dtype)
    out = torch.empty(rows, count, dtype=like.dtype)
    for row, offset in enumerate(offsets.reshape(-1).tolist()):
        row_generator = torch.Generator().manual_seed(int(offset * 2**53))
        out[row] = torch.rand(count, generator=row_generator, dtype=like.dtype)
    return out.to(like.device)


@dataclass
class TailDraws:
    """Tail samples of n rows: ids, log p and weights ``[n, w]``; counts ``[n]`` or None; log tau ``[n]`` or None.

    ``weights`` None means a_j = 1/m for all m columns (1/m_i for the first m_i with counts). Rows with
    an empty tail (tail mass 0) get id 0,
    log-prob 0 and weight 0: the student multiplies every tail estimate by the tail mass, so these
    placeholders never contribute; padding columns past a row's count look the same.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    weights: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    log_threshold: torch.Tensor | None = None

    def fields(self) -> dict[str, torch.Tensor]:
        names = {"tail_sample_ids": self.ids, "tail_sample_logprobs": self.logprobs,
                 "tail_sample_weights": self.weights, "tail_sample_counts": self.counts,
                 "tail_log_threshold": self.log_threshold}
        return {name: value for name, value in names.items() if value is not None}

    @staticmethod
    def sample(estimator, masked_logits, logp, tail_logprob, m, counts, generator, offsets) -> TailDraws:
        """Draw with ``estimator`` from softmax(masked_logits) (the tail; -inf outside it).

        ``counts [n]`` (adaptive budget) gives each row its own number of samples, else m each.
        """
        empty = torch.isneginf(tail_logprob)
        n = masked_logits.shape[0]
        width = m if counts is None else int(counts.max().item()) if n else 0
        used = torch.full((n,), m, dtype=torch.int64, device=logp.device) if counts is None else counts
        in_row = torch.arange(width, device=logp.device) < used.unsqueeze(1)  # [n, width]
        keep = in_row & ~empty.unsqueeze(1)
        if estimator == "systematic":
            ids = _systematic(masked_logits, empty, used, width, generator, offsets)
            weights = threshold = None  # 1/m, or 1/m_i from the counts (TeacherSignal.sample_weights)
        elif estimator == "iid":
            probs = torch.softmax(masked_logits.masked_fill(empty.unsqueeze(1), 0.0), dim=1)
            points = _row_uniforms(n, width, generator, offsets, probs) * probs.sum(1, keepdim=True)
            ids = _inverse_cdf(probs.cumsum(1), points)
            weights = threshold = None
        elif estimator in ("priority", "gumbel"):
            ids, weights, threshold, keep = _without_replacement(estimator, masked_logits, logp, tail_logprob,
                                                                 used, width, generator, offsets, keep)
            if counts is None and not keep.all():  # a tail of fewer than m tokens: say which samples are real
                counts = keep.sum(1)
        else:  # rskd
            return _rskd(masked_logits, logp, tail_logprob, m, generator, offsets)
        ids = ids.masked_fill(~keep, 0)
        lps = logp.gather(1, ids).masked_fill(~keep, 0.0)
        if weights is not None:
            weights = weights.masked_fill(~keep, 0.0)
        return TailDraws(ids, lps, weights, counts, threshold)


def _inverse_cdf(cdf: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(cdf, points.contiguous(), side="right").clamp_(max=cdf.shape[1] - 1)


def _systematic(masked_logits, empty, used, width, generator, offsets):
    """Systematic sampling: one uniform offset u per row and the m_i points (u + j) / m_i, j < m_i, on the
    tail's CDF. Each draw is marginally distributed as the tail, so the mean of any per-token quantity
    over the m_i draws is unbiased, and its variance is lower than with independent draws (a token with
    tail probability >= 1/m_i is drawn at least once)."""
    probs = torch.softmax(masked_logits.masked_fill(empty.unsqueeze(1), 0.0), dim=1)
    cdf = probs.cumsum(dim=1)
    if offsets is None:
        offset = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    else:
        offset = offsets.reshape(-1, 1).to(device=probs.device, dtype=probs.dtype)
    step = torch.arange(width, device=probs.device, dtype=probs.dtype)
    points = ((offset + step) / used.clamp(min=1).unsqueeze(1).to(probs.dtype)).clamp(max=1) * cdf[:, -1:]
    return _inverse_cdf(cdf, points)


def priority_weights(sample_logprobs, tail_logprob, log_threshold) -> torch.Tensor:
    """Priority-sampling weights a_j = max(p_j, tau) / P_tail ``[n, m]``.

    From the samples' log p_j ``[n, m]``, log P_tail ``[n]`` and log tau ``[n]``."""
    return (torch.maximum(sample_logprobs, log_threshold.unsqueeze(1)) - tail_logprob.unsqueeze(1)).exp()


def _without_replacement(estimator, masked_logits, logp, tail_logprob, used, width, generator, offsets, keep):
    """The m_i tail tokens of largest random key, and their inclusion weights given the (m_i+1)-th key.

    Priority keys log p_i - log u_i; Gumbel keys log p_i - log(-log u_i) (= Gumbel-top-m, i.e.
    successive sampling without replacement). Given the threshold key t (the (m_i+1)-th largest, -inf
    when the tail has at most m_i tokens), token i is kept with probability P(key_i > t): min(1, p_i/tau)
    with tau = e^t for priority, 1 - exp(-p_i e^-t) for Gumbel; the Horvitz-Thompson weight is p_i / that
    probability, divided by P_tail to estimate a mean over the tail.
    """
    n, vocab = masked_logits.shape
    uniforms = _row_uniforms(n, vocab, generator, offsets, logp).clamp_min(torch.finfo(logp.dtype).tiny)
    noise = -uniforms.log() if estimator == "priority" else -(-uniforms.log()).log()
    keys = torch.where(torch.isinf(masked_logits), float("-inf"), logp + noise)
    top_keys, ids = keys.topk(min(width + 1, vocab), dim=1)
    if top_keys.shape[1] <= width:  # the vocabulary is smaller than m + 1
        top_keys = torch.nn.functional.pad(top_keys, (0, width + 1 - top_keys.shape[1]), value=float("-inf"))
    ids = ids[:, :width]
    threshold = top_keys.gather(1, used.clamp(max=width).unsqueeze(1)).squeeze(1)
    keep = keep & torch.isfinite(top_keys[:, :width])
    lps = logp.gather(1, ids)
    if estimator == "priority":
        weights = priority_weights(lps, tail_logprob, threshold)
        return ids, weights, threshold.masked_fill(torch.isneginf(tail_logprob), 0.0), keep
    inclusion = -torch.expm1(-(lps - threshold.unsqueeze(1)).exp())
    weights = (lps - tail_logprob.unsqueeze(1)).exp() / inclusion
    return ids, weights, None, keep


def _rskd(masked_logits, logp, tail_logprob, draws, generator, offsets):
    """RS-KD: ``draws`` tokens with replacement from the whole distribution; the distinct tail tokens
    among them, first, with a_j = count_j / (draws P_tail); a draw of the target or of a top-k token
    is dropped (those are sent exactly). ``counts`` = distinct tail tokens per row."""
    n, vocab = logp.shape
    cdf = logp.exp().cumsum(1)
    points = _row_uniforms(n, draws, generator, offsets, logp) * cdf[:, -1:]
    drawn = _inverse_cdf(cdf, points)
    hits = torch.zeros_like(logp).scatter_add_(1, drawn, torch.ones_like(points))
    hits = hits.masked_fill(torch.isinf(masked_logits), 0.0)
    counts = (hits > 0).sum(1)
    width = int(counts.max().item()) if n else 0
    top_hits, ids = hits.topk(width, dim=1)  # distinct tail tokens first, most drawn first
    keep = top_hits > 0
    ids = ids.masked_fill(~keep, 0)
    weights = top_hits / (draws * tail_logprob.exp().unsqueeze(1))
    weights = weights.masked_fill(~keep, 0.0)
    lps = logp.gather(1, ids).masked_fill(~keep, 0.0)
    return TailDraws(ids, lps, weights, counts, None)


def concat_signals(parts: list[TeacherSignal]) -> TeacherSignal:
    """Signals over flat positions ``[n_i]`` back to back: one signal over ``[sum n_i]``."""
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for field in dataclasses.fields(TeacherSignal):
        values = [getattr(part, field.name) for part in parts]
        if values[0] is not None and field.name in _SAMPLE_COLUMNS:
            values = _pad_columns(values)
        fields[field.name] = None if values[0] is None else torch.cat(values)
    return TeacherSignal(**fields)
