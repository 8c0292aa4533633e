"""A ``GenerateRequest`` checked against the replica's limits and turned into a :class:`GenerateJob`.

As for Score (:mod:`.request`), every rule names the field it checks and a broken request raises
:class:`~atkd.services.teacher.errors.InvalidArgument` before it reaches the scheduler. A job's size in the
scheduler's token budget is what its batch will hold at the end: every prompt plus ``max_new_tokens`` new
tokens, so admission (queue bound, per-client limits) and fairness (deficit round-robin by tokens) count a
generation by the cache it fills, like a Score request of the same length.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from atkd.proto import teacher_pb2 as pb
from atkd.proto.sampling import Continuation, SamplingOptions

from .errors import InvalidArgument
from .request import Limits


@dataclass(frozen=True, eq=False)
class GenerateJob:
    """P prompts to continue with ``options``; ``seed``: prompt i's generator seed is ``seed + i`` (None:
    random). ``on_finished`` is called on the engine's worker thread with each finished
    :class:`~atkd.proto.sampling.Continuation`; setting ``cancelled`` stops the decoding after its step;
    ``started`` receives the ``time.monotonic()`` at which its decoding began."""

    prompts: tuple[tuple[int, ...], ...]
    options: SamplingOptions
    seed: int | None
    on_finished: Callable[[Continuation], None] | None = field(default=None, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    started: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens(self) -> int:
        """Budget of the job: all prompt tokens plus ``max_new_tokens`` per prompt."""
        return sum(len(prompt) for prompt in self.prompts) + len(self.prompts) * self.options.max_new_tokens

    @property
    def num_positions(self) -> int:
        """Scored positions (the scheduler's metric): a generation scores none."""
        return 0

    def prefix_tokens(self, max_tokens: int) -> int:
        """A generation is never split across batches: its prompts share one decoding loop."""
        return 0


def parse_generate(request: pb.GenerateRequest, limits: Limits, max_new_tokens: int,
                   eos_token_ids: tuple[int, ...]) -> GenerateJob:
    """Validate ``request``: the job for the engine. Raises :class:`InvalidArgument` naming the bad field.
    ``max_new_tokens``: this replica's most new tokens per prompt (0: no generation);
    ``eos_token_ids``: the stop tokens of a request that names none."""
    if max_new_tokens < 1:
        raise InvalidArgument("this teacher does not generate (its max_new_tokens is 0)")
    if not 1 <= request.max_new_tokens <= max_new_tokens:
        raise InvalidArgument(f"max_new_tokens = {request.max_new_tokens} must be in [1, {max_new_tokens}]")
    new = request.max_new_tokens
    lengths = tuple(request.prompt_lengths)
    ids = np.asarray(request.prompt_ids, dtype=np.int64)
    if not lengths:
        raise InvalidArgument("prompt_lengths is empty: give the length of every prompt packed in prompt_ids")
    for i, length in enumerate(lengths):
        if length < 1:
            raise InvalidArgument(f"prompt_lengths[{i}] = {length}: prompts must not be empty")
        if length + new > limits.max_seq_len:
            raise InvalidArgument(f"prompt_lengths[{i}] = {length} plus max_new_tokens = {new} is longer than this "
                                  f"teacher's maximum sequence length {limits.max_seq_len}")
    if sum(lengths) != ids.size:
        raise InvalidArgument(f"prompt_lengths sum to {sum(lengths)} but prompt_ids holds {ids.size} ids")
    total = ids.size + len(lengths) * new
    if total > limits.max_batch_tokens:
        raise InvalidArgument(f"the prompts ({ids.size} tokens) plus {len(lengths)} x max_new_tokens = {new} make "
                              f"{total} tokens, more than max_batch_tokens = {limits.max_batch_tokens}: split the "
                              "prompts into several requests")
    _check_ids("prompt_ids", ids, limits.vocab_size)
    stop = tuple(request.stop_token_ids) or eos_token_ids
    _check_ids("stop_token_ids", np.asarray(stop, dtype=np.int64), limits.vocab_size)
    temperature = request.temperature or 1.0
    if not (math.isfinite(temperature) and temperature > 0):
        raise InvalidArgument(f"temperature = {temperature} must be a finite number > 0 (0 means 1)")
    top_p = request.top_p or 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgument(f"top_p = {request.top_p} must be in (0, 1] (0 means 1)")
    if request.top_k > limits.vocab_size:
        raise InvalidArgument(f"top_k = {request.top_k} is above the vocabulary size {limits.vocab_size} (0: no cut)")
    options = SamplingOptions(max_new_tokens=new, temperature=temperature, top_p=top_p, top_k=request.top_k,
                              greedy=request.greedy, stop_token_ids=() if request.ignore_stop else stop)
    ends = np.cumsum(lengths)
    prompts = tuple(tuple(ids[end - length:end].tolist()) for end, length in zip(ends, lengths, strict=True))
    return GenerateJob(prompts, options, request.seed if request.HasField("seed") else None)


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise InvalidArgument(f"{name}[{bad[0]}] = {ids[bad[0]]} is outside the vocabulary [0, {vocab_size})")
