"""Distillation inside the Hugging Face ``Trainer``: keep an HF training script, swap the loss for KD.

``DistillationTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` asks a teacher for its
signal on the batch and returns a loss of :data:`atkd.student.losses.LOSSES` (ATKD by default) instead of
the model's cross entropy. Everything else (optimizer, schedule, accumulation, mixed precision,
logging, checkpoints, evaluation) is the Trainer's own.

Inputs are HF causal-LM batches as ``DataCollatorForLanguageModeling(mlm=False)`` produces them:
``input_ids [B, T]``, ``attention_mask [B, T]`` and *unshifted* ``labels [B, T]`` (``labels[b, t]`` is
the token at position t, -100 on padding and prompt). :func:`lm_batch_from_hf` turns them into the
project's aligned :class:`~atkd.student.data.lm.LMBatch` (``targets[b, t] = labels[b, t + 1]``) through
the alignment contract, :func:`atkd.proto.alignment.split_window`.

Gradient accumulation: the ATKD split (median / top-k of the teacher's UnC) is taken per micro-batch,
as in the paper's code, so each micro-batch loss is a mix of group means over its own tokens. The
Trainer divides each micro-batch loss by the number of accumulation steps, so the update follows the
mean of the micro-batch losses; ``num_items_in_batch`` (a token count over the whole accumulated
batch) is not used, since a mix of per-group means has no per-token sum to renormalise.

Fused head: training steps hand the loss the student's last hidden states and head weight instead of
``[B, T, V]`` logits (:mod:`atkd.student.trainer.head`), where the model allows it; evaluation and
prediction (``return_outputs``) compute logits as before, since the Trainer reads them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from atkd.proto.alignment import IGNORE_INDEX, split_window
from atkd.student.data.lm import LMBatch
from atkd.student.losses import LossResult, TeacherInput, get_loss
from atkd.student.teachers import TeacherSource

from .head import deferred_head, fused_head_unsupported

log = logging.getLogger(__name__)

#: Loss stats (ATKD's) averaged over the micro-batches since the last log and added to the training logs.
LOGGED_DIAGNOSTICS = ("mean_uncertainty", "n_easy", "n_hard", "loss_easy", "loss_hard")


def lm_batch_from_hf(inputs: Mapping[str, torch.Tensor]) -> LMBatch:
    """The aligned :class:`LMBatch` of an HF causal-LM batch.

    ``targets[b, t] = labels[b, t + 1]`` for ``t < T - 1`` and ``targets[b, T - 1] = -100``; a target is
    also -100 where ``attention_mask`` is 0 at ``t`` or ``t + 1`` (padding, even when the collator left
    labels there, e.g. with pad = eos). Without ``labels``, the labels are ``input_ids``. All tensors
    ``[B, T]``.

    Raises ValueError on left or inner padding: the teachers see ``input_ids`` only (no mask), so the
    padding must come after the tokens, where a causal model never looks.
    """
    input_ids = inputs["input_ids"]
    labels = inputs.get("labels")
    labels = input_ids if labels is None else labels
    _, targets = split_window(_append_column(labels, IGNORE_INDEX))
    mask = inputs.get("attention_mask")
    if mask is not None:
        mask = mask.bool()
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("DistillationTrainer needs right padding (tokenizer.padding_side = 'right'): "
                             "the teacher does not see the attention mask")
        # The same window rule on the mask: a target counts where its position and the next are tokens.
        seen, next_seen = split_window(_append_column(mask, False))
        targets = targets.masked_fill(~(seen & next_seen), IGNORE_INDEX)
    return LMBatch(input_ids=input_ids, targets=targets)


def _append_column(values: torch.Tensor, fill: int | bool) -> torch.Tensor:
    """``values [B, T]`` followed by a column of ``fill``: ``[B, T + 1]``."""
    return torch.cat([values, torch.full_like(values[:, :1], fill)], dim=1)


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` that distils from ``teacher`` with a loss of :data:`atkd.student.losses.LOSSES`.

    Args (besides the Trainer's own):
        teacher: a :class:`~atkd.student.teachers.TeacherSource` (e.g. :class:`~atkd.student.teachers.LocalTeacher`,
            :class:`~atkd.student.teachers.RemoteTeacher`). It gets the batch on the CPU; its output is moved to
            the student's device.
        loss: a name of :data:`atkd.student.losses.LOSSES` (default "atkd").
        loss_options: keyword options of that loss (e.g. ``{"lam": 0.2, "split": "median"}``).
        log_diagnostics: add the loss's stats named in :data:`LOGGED_DIAGNOSTICS` (ATKD's; the baselines
            have none) to each training log as ``atkd/<name>``: means over the training micro-batches since
            the last log, this process only. They are summed on the device and read when the Trainer logs.
        fused_head: compute the training loss from the last hidden states and the head weight, chunk by chunk,
            never all ``[B, T, V]`` logits (default; falls back, with a log line, where the model does not allow it).

    The loss per micro-batch is ``loss_fn(student_logits [B, T, V], teacher, targets [B, T])`` on
    :func:`lm_batch_from_hf` of the inputs; the student gets ``input_ids`` and ``attention_mask`` only.
    """

    # Each micro-batch loss is a mean over its own tokens: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher: TeacherSource, loss: str = "atkd", loss_options: dict[str, Any] | None = None,
                 log_diagnostics: bool = True, fused_head: bool = True, **kwargs):
        loss_fn = get_loss(loss, **(loss_options or {}))  # an unknown name fails before the Trainer is built
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.loss_fn = loss_fn
        self.log_diagnostics = log_diagnostics
        self._diagnostic_sums: dict[str, torch.Tensor] = {}
        self._diagnostic_count = 0
        # Nothing here uses num_items_in_batch: skip counting (and gathering) it every step.
        self.model_accepts_loss_kwargs = False
        reason = fused_head_unsupported(self.model) if fused_head else "off in the arguments"
        if reason is not None and fused_head:
            log.info("fused_head: off, %s cannot (%s)", type(self.model).__name__, reason)
        self.fused_head = reason is None

    def teacher_signal(self, batch: LMBatch, device: torch.device) -> TeacherInput:
        """The teacher's output on ``batch`` (sent on the CPU), on ``device``."""
        cpu_batch = LMBatch(input_ids=batch.input_ids.cpu(), targets=batch.targets.cpu())
        with torch.no_grad():
            signal = self.teacher(cpu_batch)
        return signal.to(device)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The distillation loss of one micro-batch (and the student's outputs with ``return_outputs``)."""
        batch = lm_batch_from_hf(inputs)
        teacher = self.teacher_signal(batch, batch.input_ids.device)
        fused = self.fused_head and model.training and not return_outputs
        with deferred_head(self.model) if fused else contextlib.nullcontext():  # self.model: unwrapped (DDP)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        result = self.loss_fn(outputs.logits, teacher, batch.targets)
        if self.log_diagnostics and model.training:
            self._add_diagnostics(result)
        return (result.loss, outputs) if return_outputs else result.loss

    def _add_diagnostics(self, result: LossResult) -> None:
        logged = {name: value for name, value in result.stats.items() if name in LOGGED_DIAGNOSTICS}
        if not logged:
            return
        for name, value in logged.items():
            previous = self._diagnostic_sums.get(name)
            self._diagnostic_sums[name] = value if previous is None else previous + value
        self._diagnostic_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer logging, with the mean diagnostics since the last training log added (one host sync)."""
        if "loss" in logs and self._diagnostic_sums:
            names = list(self._diagnostic_sums)
            sums = torch.stack([self._diagnostic_sums[name].double() for name in names]).tolist()
            means = {f"atkd/{name}": total / self._diagnostic_count for name, total in zip(names, sums, strict=True)}
            logs = {**logs, **means}
            self._diagnostic_sums.clear()
            self._diagnostic_count = 0
        super().log(logs, start_time)
