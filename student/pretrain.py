"""The minimal in-memory training loop: a model, an iterator of batches, a loss; no files, no network.

By default it pre-trains a causal LM with cross entropy (the demo's teacher,
:func:`atkd.student.demo.assets.prepare_demo_assets`); given a teacher source and a KD loss it is the
loop of the research benchmarks (``bench/sparse_e2e.py``), where only the loss and the signal vary. The
training *job* (config file, prefetching teacher sources, checkpoints and resume, DDP, metrics log) is
:mod:`atkd.student.trainer.loop`; both build their optimiser with :func:`atkd.student.optim.make_optimizer`.

Each step, in order: take the next batch; ask the teacher for its output on it (none for SFT); run the
student forward; compute the loss; backward; clip; AdamW step; LR schedule step. Nothing else happens
behind the caller's back. The losses stay on the device: the progress bar reads one every ``log_every``
steps, and the records get theirs in one copy at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from atkd.student.data.lm import LMBatch
from atkd.student.losses import LossFn, cross_entropy
from atkd.student.optim import OptimConfig, make_optimizer
from atkd.student.teachers import TeacherSource


def pretrain(
    model: PreTrainedModel,
    batches: Iterator[LMBatch],
    steps: int,
    optim: OptimConfig | None = None,
    *,
    loss_fn: LossFn = cross_entropy,
    teacher: TeacherSource | None = None,
    desc: str = "pretrain",
    progress: bool = True,
    log_every: int = 10,
) -> list[dict]:
    """Train ``model`` on the next ``steps`` batches of ``batches``; returns one record per step.

    ``optim``: AdamW and its schedule (default :class:`OptimConfig`'s). ``loss_fn(student_logits [B, T, V],
    teacher(batch), targets [B, T])`` is any loss of :mod:`atkd.student.losses` (its ``.loss`` is trained;
    the teacher's output is None without a teacher). Record: step, loss, lr, teacher_s (seconds in the
    teacher call), step_s. The model is left in eval mode.
    """
    optim = optim or OptimConfig()
    device = next(model.parameters()).device
    optimizer, schedule = make_optimizer(model, optim, steps)
    model.train()
    records: list[dict] = []
    losses: list[torch.Tensor] = []  # on the device until the end
    tokens, start = 0, time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        step_start = time.perf_counter()
        batch = next(batches)
        teacher_output = teacher(batch) if teacher is not None else None
        teacher_s = time.perf_counter() - step_start
        logits = model(batch.input_ids.to(device)).logits
        loss = loss_fn(logits, teacher_output, batch.targets.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        schedule.step()
        tokens += batch.input_ids.numel()
        losses.append(loss.detach())
        records.append({"step": step, "lr": schedule.get_last_lr()[0], "teacher_s": teacher_s,
                        "step_s": time.perf_counter() - step_start})
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
                            teacher_s=f"{teacher_s:.3f}")
    model.eval()
    for record, value in zip(records, torch.stack(losses).tolist() if losses else [], strict=True):
        record["loss"] = value
    return records
