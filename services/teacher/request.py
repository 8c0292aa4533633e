"""A ``ScoreRequest`` checked against the replica's limits and turned into a :class:`ScoreJob`.

Every rule names the field it checks in its message; a broken request raises
:class:`~atkd.services.teacher.errors.InvalidArgument` and never reaches the scheduler. The work is done
in numpy: it runs on the event loop next to the engine's forward, and torch would start an OpenMP
team of its own for it that competes with the forward's (milliseconds per request on a busy CPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto.alignment import scored_positions
from atkd.proto.codec import codec_name

from .errors import InvalidArgument

#: Temperatures a request may ask for: outside, logits / T overflows or flattens the distribution to noise
#: (and a subnormal T turned every signal into NaN and -inf).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this replica."""

    vocab_size: int
    max_seq_len: int
    max_batch_tokens: int
    max_top_k: int
    max_tail_samples: int


@dataclass(frozen=True, eq=False)
class ScoreJob:
    """S sequences to run through the teacher and the n positions to score.

    ``token_ids [total]`` holds the sequences back to back (``lengths``, S ints). Scored position j
    is position ``cols[j]`` of sequence ``rows[j]``, with target ``targets[j]`` (the next token);
    they are ordered sequence by sequence, position ascending, as the response lists them.
    ``tail_offsets [n]``: the uniforms of the tail sampling, one per scored position, drawn from the
    request's seed when it has one (None: unseeded, the engine draws them), so that a job's signal does
    not depend on how it is split into batches.
    """

    token_ids: torch.Tensor
    lengths: tuple[int, ...]
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    top_k: int
    temperature: float
    tail_samples: int
    tail_offsets: torch.Tensor | None = None
    tail_estimator: str = "systematic"
    adaptive_tail: bool = False  # the split of the samples is per compress() chunk: it follows the batching
    tail_ids_only: bool = False

    @property
    def tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def num_positions(self) -> int:
        return self.targets.numel()

    def prefix_tokens(self, max_tokens: int) -> int:
        """Tokens of the longest prefix of whole sequences that fits ``max_tokens`` (0: not even the first)."""
        fitting = np.flatnonzero(np.cumsum(self.lengths) <= max_tokens)
        return 0 if fitting.size == 0 else int(np.cumsum(self.lengths)[fitting[-1]])

    def split(self, tokens: int) -> tuple[ScoreJob, ScoreJob]:
        """(the first sequences, holding ``tokens`` tokens; the rest), both jobs of their own whose signals,
        concatenated, are this job's signal. ``tokens`` must end at a sequence boundary, strictly inside."""
        ends = np.cumsum(self.lengths)
        count = int(np.searchsorted(ends, tokens)) + 1
        if not 0 < count < len(self.lengths) or ends[count - 1] != tokens:
            raise ValueError(f"cannot split a job of sequences {self.lengths} after {tokens} tokens")
        head = int(np.searchsorted(self.rows.numpy(), count))  # scored positions of the first sequences
        offsets = (None, None) if self.tail_offsets is None else (self.tail_offsets[:head], self.tail_offsets[head:])
        first = dataclasses.replace(self, token_ids=self.token_ids[:tokens], lengths=self.lengths[:count],
                                    rows=self.rows[:head], cols=self.cols[:head], targets=self.targets[:head],
                                    tail_offsets=offsets[0])
        rest = dataclasses.replace(self, token_ids=self.token_ids[tokens:], lengths=self.lengths[count:],
                                   rows=self.rows[head:] - count, cols=self.cols[head:], targets=self.targets[head:],
                                   tail_offsets=offsets[1])
        return first, rest


def parse_request(request: pb.ScoreRequest, limits: Limits) -> tuple[ScoreJob, str]:
    """Validate ``request`` against ``limits``: (the job for the engine, the codec name of its response).
    Raises :class:`InvalidArgument` naming the bad field. The codec is the servicer's business (it
    encodes the response), so it travels beside the job, not through the scheduler and the engine."""
    lengths = tuple(request.lengths)
    ids = np.asarray(request.token_ids, dtype=np.int64)
    _check_lengths(lengths, ids.size, limits)
    bad = np.flatnonzero((ids < 0) | (ids >= limits.vocab_size))
    if bad.size:
        raise InvalidArgument(f"token_ids[{bad[0]}] = {ids[bad[0]]} is outside the vocabulary [0, {limits.vocab_size})")
    if request.score_mask and len(request.score_mask) != ids.size:
        raise InvalidArgument(f"score_mask has {len(request.score_mask)} flags for {ids.size} token_ids "
                              "(give one per token, or none to score every position)")
    tail_estimator = _tail_estimator(request)
    top_k_max = min(limits.max_top_k, limits.vocab_size)
    if not (0 if tail_estimator == "rskd" else 1) <= request.top_k <= top_k_max:
        raise InvalidArgument(f"top_k = {request.top_k} must be in [1, {top_k_max}] (0 only with TAIL_RSKD)")
    try:
        codec = codec_name(request.codec)
    except ValueError as error:
        raise InvalidArgument(f"codec: {error}") from None
    temperature = request.temperature or 1.0
    if not (math.isfinite(temperature) and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise InvalidArgument(f"temperature = {temperature} must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] "
                              "(0 means 1)")
    if request.tail_samples > limits.max_tail_samples:
        raise InvalidArgument(f"tail_samples = {request.tail_samples} is above this teacher's maximum "
                              f"{limits.max_tail_samples}")

    rows, cols, flat = scored_positions(lengths, request.score_mask)
    offsets = None
    if request.HasField("seed") and request.tail_samples:  # torch's CPU uniform_ is a serial kernel: no OpenMP team
        offsets = torch.rand(rows.size, generator=torch.Generator().manual_seed(request.seed))
    job = ScoreJob(
        token_ids=torch.from_numpy(ids), lengths=lengths, rows=torch.from_numpy(rows), cols=torch.from_numpy(cols),
        targets=torch.from_numpy(ids[flat + 1]), top_k=request.top_k, temperature=temperature,
        tail_samples=request.tail_samples, tail_offsets=offsets, tail_estimator=tail_estimator,
        adaptive_tail=request.adaptive_tail, tail_ids_only=request.tail_ids_only,
    )  # fmt: skip
    return job, codec


#: Wire values of the tail estimators (``ScoreRequest.tail_estimator``), by name.
TAIL_ESTIMATOR_VALUES = {"systematic": pb.TAIL_SYSTEMATIC, "iid": pb.TAIL_IID, "priority": pb.TAIL_PRIORITY,
                         "gumbel": pb.TAIL_GUMBEL, "rskd": pb.TAIL_RSKD}


def _tail_estimator(request: pb.ScoreRequest) -> str:
    """The request's tail estimator by name, checked together with ``adaptive_tail`` and ``tail_ids_only``."""
    names = {value: name for name, value in TAIL_ESTIMATOR_VALUES.items()}
    if request.tail_estimator not in names:
        raise InvalidArgument(f"tail_estimator = {request.tail_estimator} is unknown; known: {sorted(names)}")
    name = names[request.tail_estimator]
    if request.adaptive_tail and (name == "rskd" or not request.tail_samples):
        raise InvalidArgument("adaptive_tail needs tail_samples > 0 and a tail estimator other than TAIL_RSKD")
    if request.tail_ids_only and (name == "priority" or not request.tail_samples):
        raise InvalidArgument("tail_ids_only needs tail_samples > 0 and a tail estimator other than TAIL_PRIORITY "
                              "(whose weights need the samples' log-probs)")
    if name == "rskd" and not request.tail_samples:
        raise InvalidArgument("tail_estimator = TAIL_RSKD needs tail_samples > 0 (the number of draws)")
    return name


def _check_lengths(lengths: tuple[int, ...], total: int, limits: Limits) -> None:
    if not lengths:
        raise InvalidArgument("lengths is empty: give the length of every sequence packed in token_ids")
    for i, length in enumerate(lengths):
        if length < 1:
            raise InvalidArgument(f"lengths[{i}] = {length}: sequences must not be empty")
        if length > limits.max_seq_len:
            raise InvalidArgument(f"lengths[{i}] = {length} is longer than this teacher's maximum sequence length "
                                  f"{limits.max_seq_len}")
    if sum(lengths) != total:
        raise InvalidArgument(f"lengths sum to {sum(lengths)} but token_ids holds {total} ids")
    if total > limits.max_batch_tokens:
        raise InvalidArgument(f"token_ids holds {total} tokens, more than max_batch_tokens = "
                              f"{limits.max_batch_tokens}: split the batch into several requests")
