"""Teacher sources: callables that turn a batch into what the losses take as ``teacher``.

``LocalTeacher`` runs the teacher model in this process and returns either dense logits
``[B, T, V]`` or, with ``top_k`` set, the compressed :class:`TeacherSignal`; ``RemoteTeacher`` asks
a teacher server for the same signal. The losses cannot tell where the signal came from.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from proto.signal import IGNORE_INDEX, TeacherSignal, compress
from student.client import TeacherClient
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


class RemoteTeacher:
    """A teacher server behind a :class:`~student.client.TeacherClient`.

    The server scores position t of a sequence with target ``ids[t + 1]``, so the batch goes out as
    ``input_ids`` plus the window's last target (T + 1 tokens) with ``score_mask`` = targets != -100,
    and the signal of the first T positions comes back aligned with ``targets [B, T]``.
    """

    def __init__(self, client: TeacherClient, top_k: int = 64, codec: str = "fp16", temperature: float = 1.0,
                 tail_samples: int = 0):
        self.client = client
        self.options = dict(top_k=top_k, codec=codec, temperature=temperature, tail_samples=tail_samples)

    def request_of(self, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids ``[B, T + 1]``, score_mask ``[B, T + 1]``) of the request for ``batch``."""
        has_target = batch.targets != IGNORE_INDEX
        last = batch.targets[:, -1:].clamp(min=0)  # an ignored last target is never scored
        ids = torch.cat([batch.input_ids, last], dim=1)
        mask = torch.cat([has_target, torch.zeros_like(has_target[:, :1])], dim=1)
        return ids, mask

    def __call__(self, batch: LMBatch) -> TeacherSignal:
        ids, mask = self.request_of(batch)
        signal = self.client.score(ids, score_mask=mask, **self.options)
        length = batch.targets.shape[1]
        return signal.map_tensors(lambda t: t[:, :length])
