"""A batch of sequences to score, packed for the wire and unpacked from the teacher's answer.

Alignment (:mod:`atkd.proto.alignment`): for ``input_ids [B, T]`` the signal covers positions
``[B, T]``, and position ``(b, t)`` is scored with target ``input_ids[b, t + 1]`` (the teacher shifts),
exactly like the student's ``logits[b, t]``; so ``atkd_loss(student_logits, signal,
next_token_targets(batch))`` works as is. Which positions are scored is
:func:`~atkd.proto.alignment.scored_positions` of the packed sequences, as on the server: not the last
of a sequence, not padding, and flagged by ``score_mask`` if one is given. The others hold zeros in the
signal and -100 as target. To score every one of T positions, send T + 1 tokens and drop the last.

numpy, not torch: small torch ops start OpenMP teams that compete with the training step's for the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import grpc
import numpy as np
import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto.alignment import IGNORE_INDEX, scored_positions
from atkd.proto.signal import TeacherSignal

from .errors import TeacherError


@dataclass(frozen=True)
class ScoreBatch:
    """Sequences to score: ``input_ids [B, T]`` (right padded), ``lengths [B]``, optional ``score_mask [B, T]``."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    score_mask: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        sequences: torch.Tensor | Sequence[Sequence[int]],
        lengths: torch.Tensor | Sequence[int] | None = None,
        score_mask: torch.Tensor | None = None,
    ) -> ScoreBatch:
        """From ``input_ids [B, T]`` (+ ``lengths``, default all T) or a list of id lists."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise ValueError(f"input_ids must be [B, T], got shape {tuple(sequences.shape)}")
            input_ids = sequences.long().cpu()
            full = torch.full((input_ids.shape[0],), input_ids.shape[1])
            sizes = full if lengths is None else torch.as_tensor(lengths)
        else:
            if lengths is not None:
                raise ValueError("lengths come from the sequences when a list of sequences is given")
            if not sequences:
                raise ValueError("no sequences to score")
            sizes = torch.tensor([len(seq) for seq in sequences])
            input_ids = torch.zeros(len(sequences), int(sizes.max()), dtype=torch.long)
            for row, seq in enumerate(sequences):
                input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        if sizes.shape != (input_ids.shape[0],) or (sizes < 0).any() or (sizes > input_ids.shape[1]).any():
            raise ValueError(f"lengths must be [B] = [{input_ids.shape[0]}] ints in [0, {input_ids.shape[1]}]")
        if score_mask is not None and score_mask.shape != input_ids.shape:
            raise ValueError(f"score_mask {tuple(score_mask.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        return cls(input_ids, sizes.long().cpu(), None if score_mask is None else score_mask.bool().cpu())

    @cached_property
    def _in_sequence(self) -> np.ndarray:
        """Boolean ``[B, T]``: the tokens of the sequences (not padding); selecting with it packs them."""
        return np.arange(self.input_ids.shape[1]) < self.lengths.numpy()[:, None]

    @property
    def packed_ids(self) -> np.ndarray:
        """The sequences back to back without padding, ``[sum(lengths)]`` (what the request carries)."""
        return self.input_ids.numpy()[self._in_sequence]

    @cached_property
    def positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(``rows [n]``, ``cols [n]``, ``flat [n]``) of the n scored positions, in the order of a response:
        :func:`~atkd.proto.alignment.scored_positions` of the packed sequences; ``flat`` indexes
        :attr:`packed_ids`, and ``packed_ids[flat + 1]`` are the targets."""
        mask = None if self.score_mask is None else self.score_mask.numpy()[self._in_sequence]
        return scored_positions(self.lengths.numpy(), mask)

    @property
    def scored(self) -> torch.Tensor:
        """Boolean ``[B, T]``: the positions the teacher scores."""
        rows, cols, _ = self.positions
        scored = np.zeros(self.input_ids.shape, dtype=bool)
        scored[rows, cols] = True
        return torch.from_numpy(scored)

    def to_request(self, request_id: str, **options: Any) -> pb.ScoreRequest:
        """The wire request (sequences packed without padding); ``options`` are ScoreRequest fields."""
        request = pb.ScoreRequest(id=request_id, token_ids=self.packed_ids.tolist(), lengths=self.lengths.tolist(),
                                  **options)
        if self.score_mask is not None:
            request.score_mask.extend(self.score_mask.numpy()[self._in_sequence].tolist())
        return request

    def unpack(self, flat: TeacherSignal) -> TeacherSignal:
        """Scatter a signal over the scored positions ``[n]`` onto ``[B, T]`` (zeros elsewhere)."""
        rows, cols, _ = self.positions
        if flat.target_logprob.shape[0] != rows.size:
            raise TeacherError(grpc.StatusCode.INTERNAL, f"the teacher scored {flat.target_logprob.shape[0]} "
                                                          f"positions, expected {rows.size}")

        def dense(values: torch.Tensor | None) -> torch.Tensor | None:
            if values is None:
                return None
            out = np.zeros((*self.input_ids.shape, *values.shape[1:]), dtype=values.numpy().dtype)
            out[rows, cols] = values.numpy()
            return torch.from_numpy(out)

        return TeacherSignal(**{f.name: dense(getattr(flat, f.name)) for f in dataclasses.fields(TeacherSignal)})


def next_token_targets(batch: ScoreBatch) -> torch.Tensor:
    """Targets ``[B, T]`` of the student's loss: ``input_ids[b, t + 1]`` where scored, -100 elsewhere."""
    rows, cols, flat = batch.positions
    targets = np.full(batch.input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    targets[rows, cols] = batch.packed_ids[flat + 1]
    return torch.from_numpy(targets)
