"""What every loss of :data:`atkd.student.losses.LOSSES` returns: the loss and its statistics, on device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LossResult:
    """``loss``: the 0-dim loss to backpropagate (work dtype, on the logits' device).

    ``stats``: 0-dim tensors on the same device, detached, that describe the loss (ATKD: group sizes and
    means, see :func:`~atkd.student.losses.atkd.atkd_loss`; the baselines: none). Nothing here has been
    copied to the host: a caller reads them (``.item()``, one sync) only when it logs them.
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


LossFn = Callable[..., LossResult]
"""``fn(student_logits [B, T, V], teacher: TeacherInput, targets [B, T], **options) -> LossResult``."""
