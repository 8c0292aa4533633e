"""The optimiser of every student loop: AdamW with a warmup-then-cosine learning rate, configured once.

Both loops build it here: the training job (:mod:`atkd.student.trainer.loop`, whose config section
``optim`` is an :class:`OptimConfig`) and the in-memory loop (:mod:`atkd.student.pretrain`).

    lr(s) = lr * s_w(s),   s_w(s) = (s + 1) / warmup                           for s < warmup
                           s_w(s) = r + (1 - r) * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2   after
with r = ``min_lr_ratio``. Weight decay applies to matrices (``p.dim() >= 2``) only; betas (0.9, 0.95).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field


class OptimConfig(BaseModel):
    """AdamW and its schedule; ``steps`` (the schedule's length) is the loop's, given to :func:`make_optimizer`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")
    warmup: int = Field(20, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine ends at lr * min_lr_ratio")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only)")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")


def cosine_with_warmup(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR multiplier of ``step`` (0-based): linear warmup to 1 over ``warmup`` steps, then cosine decay
    to ``min_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model: torch.nn.Module, optim: OptimConfig, steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """(AdamW over ``model``'s parameters, its LR schedule over ``steps`` optimizer steps)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, steps, optim.warmup, optim.min_lr_ratio))
    return optimizer, schedule


def schedule_change(step: int, old_steps: int, new_steps: int, optim: OptimConfig) -> str | None:
    """What resuming at ``step`` a run scheduled over ``old_steps`` with ``new_steps`` does to the learning
    rate, in words (None when the length is unchanged): the schedule is a function of the total, so the
    cosine is redrawn over the new length and the next step's rate jumps."""
    if old_steps == new_steps:
        return None
    if step >= new_steps:
        return (f"resuming at step {step} of a run scheduled over {old_steps} steps with {new_steps} steps: "
                "nothing is left to train; the model as it is becomes the final one")

    def rate(steps: int) -> float:
        return optim.lr * cosine_with_warmup(step, steps, optim.warmup, optim.min_lr_ratio)

    return (f"resuming at step {step} of a run scheduled over {old_steps} steps with {new_steps} steps: the "
            f"cosine is redrawn over {new_steps} steps, so the next step's learning rate is {rate(new_steps):.3g} "
            f"instead of {rate(old_steps):.3g}, and it decays to {optim.lr * optim.min_lr_ratio:.3g} at step "
            f"{new_steps}")
