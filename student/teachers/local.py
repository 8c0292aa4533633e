"""The teacher model in this process, as a teacher source."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from atkd.proto.signal import compress
from atkd.student.data.lm import LMBatch
from atkd.student.losses import TeacherInput

from .source import Deferred, TeacherSource


class LocalTeacher(TeacherSource):
    """The teacher model in this process: dense logits ``[B, T, V]`` or, with ``top_k``, the compressed
    :class:`~atkd.proto.signal.TeacherSignal` ``[B, T]`` for ``batch.targets``. It computes when the
    result is asked for.

    Args:
        model: a causal LM (eval mode, no grad).
        top_k: None for dense logits, else the k of the compressed signal.
        temperature: softmax temperature of the signal (dense logits are divided by it too).
        tail_samples: tokens drawn from the teacher's tail per position (compressed only).
        tail_ids_only: the samples without their log-probs, with the tail's mean (:func:`compress`).
        seed: seed of the tail-sampling generator used by calls that pass no seed of their own.
    """

    def __init__(self, model: PreTrainedModel, top_k: int | None = None, temperature: float = 1.0,
                 tail_samples: int = 0, seed: int = 0, tail_ids_only: bool = False):
        if tail_samples and top_k is None:
            raise ValueError("tail_samples needs a compressed signal (set top_k)")
        self.model = model.eval()
        self.top_k = top_k
        self.temperature = temperature
        self.tail_samples = tail_samples
        self.tail_ids_only = tail_ids_only
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def submit(self, batch: LMBatch, seed: int | None = None) -> Deferred:
        return Deferred(lambda: self.score(batch, seed))

    @torch.no_grad()
    def score(self, batch: LMBatch, seed: int | None = None) -> TeacherInput:
        logits = self.model(batch.input_ids.to(self.device)).logits
        if self.top_k is None:
            return logits.float() / self.temperature
        generator = self.generator if seed is None else torch.Generator(self.device).manual_seed(seed)
        return compress(logits, batch.targets.to(self.device), self.top_k, self.temperature,
                        tail_samples=self.tail_samples, generator=generator, tail_ids_only=self.tail_ids_only)
