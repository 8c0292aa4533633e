"""The compressed teacher signal: what a teacher replica sends per scored position.

Shipping |V| floats per token is too much for a network, so the teacher sends, for every position
whose next token g (the *target*) is known:

- ``target_logprob``  log p_g, exact (from the full distribution on the teacher)
- ``topk_ids``, ``topk_logprobs``  the k most likely tokens and their exact log-probabilities
- ``tail_logprob``  log of the exact probability mass outside top-k ∪ {g} (``-inf`` if empty)
- ``uncertainty``  UnC = 1 - p_g, exact (computed as a sum over the non-target tokens, never as
  ``1 - exp(log p_g)``, which rounds to 0 for confident tokens)
- ``entropy``  H(p) of the full distribution
- optionally ``tail_sample_ids`` / ``tail_sample_logprobs``: m tokens drawn with replacement from
  the teacher's tail distribution p_i / P_tail (i outside top-k ∪ {g}) with their exact log p_i,
  which let the student estimate tail terms without bias.

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

    @property
    def positions_shape(self) -> torch.Size:
        return self.target_logprob.shape

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    @property
    def num_tail_samples(self) -> int:
        return 0 if self.tail_sample_ids is None else self.tail_sample_ids.shape[-1]

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
) -> TeacherSignal:
    """Compress teacher logits ``[*P, V]`` into a :class:`TeacherSignal` for targets ``[*P]``.

    The distribution is p = softmax(logits / temperature), computed in fp32 (fp64 stays fp64) chunk
    by chunk over positions so that at most ``chunk_size`` rows of ``[rows, V]`` work exist at once.
    For a position with target g:
        target_logprob = log p_g,  uncertainty = sum_{i != g} p_i,
        tail_logprob = log sum_{i not in topk ∪ {g}} p_i,  entropy = -sum_i p_i log p_i.
    Positions whose target is -100 get zeros in target_logprob/uncertainty and a tail outside the
    top-k only. ``tail_samples`` = m > 0 also draws m tail tokens per position (systematic sampling, one
    uniform offset per position): the offsets come from ``generator``, or are given as ``tail_offsets``
    (``[n]`` uniforms in [0, 1), one per position in order), which makes the samples of a position
    independent of how positions are batched or chunked.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits.shape[:-1] != targets.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be targets "
                         f"{tuple(targets.shape)} + [V]")
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    positions = targets.shape
    logits = teacher_logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1)
    work_dtype = torch.promote_types(logits.dtype, torch.float32)

    out = {name: [] for name in ("target_logprob", "topk_ids", "topk_logprobs", "tail_logprob",
                                 "uncertainty", "entropy", "tail_sample_ids", "tail_sample_logprobs")}
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
        out["uncertainty"].append(torch.where(has_target, non_target.exp(), 0.0))
        masked.scatter_(1, topk_ids, float("-inf"))
        tail = torch.logsumexp(masked, dim=1) - log_norm.squeeze(1)
        out["tail_logprob"].append(tail)

        if tail_samples:
            offsets = None if tail_offsets is None else tail_offsets[start:start + z.shape[0]]
            ids, lps = _sample_tail(masked, logp, tail, tail_samples, generator, offsets)
            out["tail_sample_ids"].append(ids)
            out["tail_sample_logprobs"].append(lps)

    fields = {}
    for name, parts in out.items():
        if parts:
            flat = torch.cat(parts)
            fields[name] = flat.reshape(*positions, *flat.shape[1:])
    return TeacherSignal(**fields)


def _sample_tail(masked_logits, logp, tail_logprob, m, generator, offsets=None):
    """Draw m ids per row from softmax(masked_logits) (the tail distribution) with their log p.

    Systematic sampling: one uniform offset u per row and the m points (u + j) / m, j < m, on the
    tail's CDF. Each draw is marginally distributed as the tail, so the mean of any per-token
    quantity over the m draws is unbiased, and its variance is lower than with independent draws
    (a token with tail probability >= 1/m is drawn at least once).
    Rows with an empty tail (tail mass 0) get id 0 and log-prob 0: the student multiplies every
    tail estimate by the tail mass, so these placeholders never contribute.
    """
    empty = torch.isneginf(tail_logprob)
    probs = torch.softmax(masked_logits.masked_fill(empty.unsqueeze(1), 0.0), dim=1)
    cdf = probs.cumsum(dim=1)
    if offsets is None:
        offset = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    else:
        offset = offsets.reshape(-1, 1).to(device=probs.device, dtype=probs.dtype)
    points = (offset + torch.arange(m, device=probs.device, dtype=probs.dtype)) / m * cdf[:, -1:]
    ids = torch.searchsorted(cdf, points, side="right").clamp_(max=probs.shape[1] - 1)
    lps = logp.gather(1, ids)
    ids = ids.masked_fill(empty.unsqueeze(1), 0)
    return ids, lps.masked_fill(empty.unsqueeze(1), 0.0)


def concat_signals(parts: list[TeacherSignal]) -> TeacherSignal:
    """Signals over flat positions ``[n_i]`` back to back: one signal over ``[sum n_i]``."""
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for field in dataclasses.fields(TeacherSignal):
        values = [getattr(part, field.name) for part in parts]
        fields[field.name] = None if values[0] is None else torch.cat(values)
    return TeacherSignal(**fields)
