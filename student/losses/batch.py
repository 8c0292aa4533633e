"""Validated, flattened loss inputs and the chunked, memory-bounded loop every loss runs on.

A loss sees student logits ``[*P, V]`` (usually ``[B, T, V]``), a teacher (dense logits of the
same shape, or a :class:`TeacherSignal` over the positions ``P``, or None for SFT) and targets
``[*P]`` where ``logits[b, t]`` predicts ``targets[b, t]`` and -100 is ignored.

:func:`fused_chunked_sum` evaluates ``sum over chunks of chunk_loss(chunk)`` over the N valid
positions, ``rows_per_chunk`` at a time, and computes the gradient w.r.t. the student logits chunk
by chunk *during the forward*: it keeps one gradient buffer the size of the logits and the
temporaries of one chunk, so peak extra memory does not grow with the number of tokens (the plain
autograd graph would keep several fp32 ``[N, V]`` tensors alive until backward). The per-chunk
math is ordinary autograd code in fp32 (fp64 stays fp64), whatever the logits dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from atkd.proto.alignment import IGNORE_INDEX
from atkd.proto.signal import TeacherSignal, rows_per_chunk

from .buckets import Normalised, dense_buckets, signal_buckets, student_buckets_for_signal

TeacherInput = torch.Tensor | TeacherSignal | None
"""What a loss receives from the teacher, and what a teacher source returns: dense logits ``[*P, V]``, a
compressed :class:`TeacherSignal` over the positions ``P``, or None (no teacher: SFT)."""


@dataclass
class LossBatch:
    """Flattened inputs: logits ``[R, V]`` (a tensor, or a :class:`~atkd.student.losses.fused_head.HeadLogits`
    that computes them chunk by chunk), teacher ``[R, V]`` or signal ``[R]``, targets ``[R]``.

    ``valid_rows [N]`` indexes the R positions whose target is not ignored.
    """

    logits: torch.Tensor
    teacher: TeacherInput
    targets: torch.Tensor
    valid_rows: torch.Tensor

    @property
    def num_valid(self) -> int:
        return self.valid_rows.numel()

    @property
    def work_dtype(self) -> torch.dtype:
        return torch.promote_types(self.logits.dtype, torch.float32)

    @classmethod
    def from_inputs(cls, student_logits: torch.Tensor, teacher: TeacherInput, targets: torch.Tensor) -> LossBatch:
        if not student_logits.dtype.is_floating_point:
            raise TypeError(f"student_logits must be floating point, got {student_logits.dtype}")
        if len(student_logits.shape) < 2:
            raise ValueError(f"student_logits must be [..., V], got shape {tuple(student_logits.shape)}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"targets must be int64 token ids, got {targets.dtype}")
        if student_logits.shape[:-1] != targets.shape:
            raise ValueError(f"student_logits {tuple(student_logits.shape)} must be targets "
                             f"{tuple(targets.shape)} + [V]: logits[b, t] predicts targets[b, t]")
        vocab = student_logits.shape[-1]
        flat_targets = targets.reshape(-1).long()
        valid = flat_targets != IGNORE_INDEX
        bad = valid & ((flat_targets < 0) | (flat_targets >= vocab))
        if bad.any():
            value = flat_targets[bad][0].item()
            raise ValueError(f"targets hold token id {value} outside [0, {vocab}) (use -100 to ignore a position)")
        flat_teacher: TeacherInput
        if teacher is None:
            flat_teacher = None  # only the SFT loss accepts no teacher
        elif isinstance(teacher, TeacherSignal):
            if teacher.positions_shape != targets.shape:
                raise ValueError(f"teacher signal covers positions {tuple(teacher.positions_shape)}, "
                                 f"targets are {tuple(targets.shape)}")
            flat_teacher = teacher.flatten()
            for ids, what in ((flat_teacher.topk_ids, "topk_ids"), (flat_teacher.tail_sample_ids, "tail_sample_ids")):
                if ids is not None and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
                    raise ValueError(f"teacher signal {what} fall outside the student vocabulary [0, {vocab})")
        else:
            if teacher.shape != student_logits.shape:
                raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits "
                                 f"{tuple(student_logits.shape)} must have the same shape")
            flat_teacher = teacher.detach().reshape(-1, vocab)
        return cls(
            logits=student_logits.reshape(-1, vocab),
            teacher=flat_teacher,
            targets=flat_targets,
            valid_rows=valid.nonzero().squeeze(1),
        )

    def chunks(self, chunk_size: int | None) -> list[slice]:
        """Slices of the valid positions ``[0, N)``, each at most ``rows_per_chunk`` long."""
        step = rows_per_chunk(self.logits.shape[-1], chunk_size)
        return [slice(start, start + step) for start in range(0, self.num_valid, step)]

    def teacher_normalised(self, positions: slice) -> Normalised:
        """The teacher's distribution at valid positions ``positions`` (no grad)."""
        rows = self.valid_rows[positions]
        targets = self.targets[rows]
        with torch.no_grad():
            if isinstance(self.teacher, TeacherSignal):
                return signal_buckets(self.teacher.select(rows), targets, self.work_dtype).normalise()
            return dense_buckets(self.teacher.index_select(0, rows).to(self.work_dtype), targets).normalise()

    def student_normalised(self, positions: slice, logits: torch.Tensor) -> Normalised:
        """The student's distribution from its logits ``[n, V]`` at ``positions``, on the teacher's buckets."""
        targets = self.targets[self.valid_rows[positions]]
        if isinstance(self.teacher, TeacherSignal):
            signal = self.teacher.select(self.valid_rows[positions])
            return student_buckets_for_signal(logits, signal, targets).normalise()
        return dense_buckets(logits, targets).normalise()


ChunkLoss = Callable[[slice, torch.Tensor], torch.Tensor]


def fused_chunked_sum(batch: LossBatch, chunk_loss: ChunkLoss, chunk_size: int | None = None) -> torch.Tensor:
    """sum over chunks of ``chunk_loss(positions, student_logits_chunk)``, differentiable in the logits.

    ``chunk_loss`` receives a slice of the valid positions and the student logits there (``[n, V]``,
    in the work dtype) and returns a scalar. The result is a 0-dim tensor in the work dtype; it
    carries a graph to ``batch.logits`` when those require grad (even when N = 0: then it is 0).
    """
    if not isinstance(batch.logits, torch.Tensor):  # logits computed on demand: fused_head.HeadLogits
        return batch.logits.chunked_sum(batch, chunk_loss, chunk_size)
    chunks = batch.chunks(chunk_size)
    if batch.logits.requires_grad and torch.is_grad_enabled():
        return _FusedChunkedSum.apply(batch.logits, batch, chunk_loss, chunks)
    with torch.no_grad():
        return _accumulate(batch, chunk_loss, chunks, grad_out=None)


def _accumulate(batch: LossBatch, chunk_loss: ChunkLoss, chunks: list[slice], grad_out) -> torch.Tensor:
    total = torch.zeros((), dtype=batch.work_dtype, device=batch.logits.device)
    for positions in chunks:
        rows = batch.valid_rows[positions]
        logits = batch.logits.detach().index_select(0, rows).to(batch.work_dtype)
        if grad_out is None:
            total += chunk_loss(positions, logits)
            continue
        logits.requires_grad_(True)
        with torch.enable_grad():
            loss = chunk_loss(positions, logits)
        (grad,) = torch.autograd.grad(loss, logits)
        grad_out.index_copy_(0, rows, grad.to(grad_out.dtype))
        total += loss.detach()
    return total


class _FusedChunkedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, batch, chunk_loss, chunks):
        grad = torch.zeros_like(logits)
        total = _accumulate(batch, chunk_loss, chunks, grad_out=grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        if not bool(grad_total == 1):  # the usual case (loss.backward()) needs no second [R, V] buffer
            grad = (grad * grad_total).to(grad.dtype)
        return grad, None, None, None
