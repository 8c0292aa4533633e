"""The minimal in-memory training loop: a model, an iterator of batches, a loss; no files, no network.

It pre-trains the demo's teacher (:func:`atkd.student.models.pretrain`) and drives the research benchmarks
(``bench/sparse_e2e.py``), where only the loss and the signal vary. The training *job* (config file,
teacher sources with prefetch, checkpoints and resume, DDP, metrics log) is
:mod:`atkd.student.trainer.loop`, which shares this module's optimizer and LR schedule.

Each step, in order: take the next batch; ask the teacher for its signal on it (dense logits or a
compressed :class:`TeacherSignal`; none for SFT); run the student forward; compute the loss; backward;
clip; AdamW step; LR schedule step. Nothing else happens behind the caller's back, so the progress
bar's ``teacher_s`` (time waiting on the teacher) and ``tok/s`` say where the time goes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from atkd.proto.signal import TeacherSignal
from atkd.student.data.lm import LMBatch

TeacherFn = Callable[[LMBatch], "torch.Tensor | TeacherSignal"]
LossFn = Callable[..., torch.Tensor]


@dataclass
class OptimConfig:
    """AdamW (betas 0.9/0.95, weight decay on matrices only), warmup then cosine to lr * min_lr_ratio."""

    steps: int
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


def cosine_with_warmup(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: PreTrainedModel, config: OptimConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.steps, config.warmup, config.min_lr_ratio))
    return optimizer, schedule


def train(
    model: PreTrainedModel,
    batches: Iterator[LMBatch],
    loss_fn: LossFn,
    config: OptimConfig,
    teacher: TeacherFn | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` for ``config.steps`` batches; returns one record per step.

    ``loss_fn(student_logits [B, T, V], teacher_output, targets [B, T])`` is any loss of
    :mod:`atkd.student.losses` (``teacher_output`` is None without a teacher).
    Record: step, loss, lr, teacher_s (seconds in the teacher call), step_s.
    """
    device = next(model.parameters()).device
    optimizer, schedule = make_optimizer(model, config)
    model.train()
    records: list[dict] = []
    tokens, start = 0, time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        step_start = time.perf_counter()
        batch = next(batches)
        teacher_output = teacher(batch) if teacher is not None else None
        teacher_s = time.perf_counter() - step_start
        logits = model(batch.input_ids.to(device)).logits
        loss = loss_fn(logits, teacher_output, batch.targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        tokens += batch.input_ids.numel()
        records.append({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0],
                        "teacher_s": teacher_s, "step_s": time.perf_counter() - step_start})
        bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
                        teacher_s=f"{teacher_s:.3f}")
    model.eval()
    return records
