"""Teacher sources: callables that turn a batch into what the losses take as ``teacher``.

``LocalTeacher`` runs the teacher model in this process and returns either dense logits
``[B, T, V]`` or, with ``top_k`` set, the same compressed :class:`TeacherSignal` a teacher server
sends. The losses cannot tell where the signal came from.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from proto.signal import TeacherSignal, compress
from student.data.lm import LMBatch


class LocalTeacher:
    """The teacher model in this process.

    Args:
        model: a causal LM (eval mode, no grad).
        top_k: None for dense logits, else the k of the compressed signal.
        temperature: softmax temperature of the signal (dense logits are divided by it too).
        tail_samples: tokens drawn from the teacher's tail per position (compressed only).
        seed: seed of the tail-sampling generator.
    """

    def __init__(self, model: PreTrainedModel, top_k: int | None = None, temperature: float = 1.0,
                 tail_samples: int = 0, seed: int = 0):
        if tail_samples and top_k is None:
            raise ValueError("tail_samples needs a compressed signal (set top_k)")
        self.model = model.eval()
        self.top_k = top_k
        self.temperature = temperature
        self.tail_samples = tail_samples
        self.generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, batch: LMBatch) -> torch.Tensor | TeacherSignal:
        device = next(self.model.parameters()).device
        logits = self.model(batch.input_ids.to(device)).logits
        if self.top_k is None:
            return logits.float() / self.temperature
        return compress(logits, batch.targets.to(device), self.top_k, self.temperature,
                        tail_samples=self.tail_samples, generator=self.generator)
