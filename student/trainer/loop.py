"""The distillation training loop (``atkd-student train``).

Each optimizer step, in order:

1. for each of ``grad_accum`` micro-batches: take micro-batch m (examples from the seeded
   :class:`~atkd.student.data.examples.BatchOrder`, their responses from ``data.source``:
   :mod:`atkd.student.data.sources`) with its teacher signal, which was requested
   ``teacher.prefetch`` batches earlier; student forward (bf16 autocast if asked); loss / grad_accum;
   backward (under DDP the gradients are all-reduced on the last micro-batch only, under FSDP2
   reduce-scattered); with ``fused_head`` (the default, where the model allows it,
   :mod:`atkd.student.trainer.head`) the forward hands the loss the last hidden states and the head weight,
   and the loss computes the logits chunk by chunk instead of the model computing ``[B, T, V]`` at once;
2. clip the global gradient norm; AdamW step; LR schedule step (warmup, then cosine);
3. every ``log_every`` steps, a record of the steps since the last one (JSONL, progress bar, TensorBoard
   if installed; :mod:`atkd.student.trainer.metrics`): the loss, its stats and the gradient norm are
   summed on the device and copied to the host once per record; evaluate and checkpoint on schedule.

The ATKD split is taken per micro-batch and per rank, as in the paper. Data parallelism: under
``torchrun`` every rank trains on its own slice of each global batch and has its own teacher stream;
2 ranks x B examples see exactly the batches of 1 process x B examples x 2 accumulation steps. ``parallel``
picks how the student is spread over the ranks: replicated (``ddp``) or sharded with FSDP2 (``fsdp``,
:mod:`atkd.student.trainer.fsdp`: sharded checkpoints, every rank evaluates and saves, ``final/`` gathered).
SIGTERM / SIGINT, and ``max_time`` (before one more step would pass it), stop the run at a step boundary
with a checkpoint (all ranks agree on the step), and ``resume`` continues from the newest checkpoint as if
nothing had happened; resuming with another ``max_steps`` redraws the cosine and says so in a warning.
A teacher that fails for good (no replica answered within the client's retry budget) stops the run too:
the checkpoint of the last completed step is written (the step it failed in is dropped whole: weights,
optimizer and RNG are as they were at its start) and named in the raised ``TeacherError.checkpoint``. Under
``torchrun`` the ranks agree on it before each micro-batch's forward (one all-reduce of a flag), so a failure
of one rank's teacher stops every rank at the same step instead of leaving the others in the gradient all-reduce.

The teacher is built only for a loss that reads it (not for ``sft``), and asked for exactly the
micro-batches of the run: prefetch stops at the last step's. Torch threads: ``threads``, or a choice from
the free cores (:mod:`atkd.student.trainer.threads`). Checkpoints and ``final/`` are complete model
directories (tokenizer included) whose model id is the run's name (:attr:`TrainConfig.name`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from atkd.proto.device import resolve_device
from atkd.student.client import TeacherError
from atkd.student.data.examples import BatchOrder, Examples
from atkd.student.evaluation import LMEval, evaluate_examples
from atkd.student.losses import TeacherInput, get_loss, tail_divergence
from atkd.student.models import load_model, save_model
from atkd.student.optim import make_optimizer, schedule_change
from atkd.student.teachers import prefetched

from .checkpoint import PREFIX, TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .fsdp import full_state_dict, local_value, shard
from .head import deferred_head, fused_head_unsupported
from .metrics import LogWindow, MetricsLog
from .parts import build_sequence_source, build_teacher, init_distributed, load_examples, load_tokenizer
from .threads import Machine, plan_threads

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"


@dataclass
class TrainResult:
    state: TrainState
    final_dir: Path | None
    eval: LMEval | None
    stopped_early: bool


def teacher_seed(seed: int, micro_batch: int, world: int, rank: int) -> int:
    """Tail-sample seed of a micro-batch: a function of its global number only, so resumed runs and
    1 x accumulation vs N ranks draw the same samples."""
    return seed * 1_000_003 + micro_batch * world + rank


def total_steps(config: TrainConfig, order: BatchOrder) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * order.per_epoch / config.grad_accum))


def train(config: TrainConfig, *, resume: bool | Path = False, stop_at: int | None = None,
          train_data: Examples | None = None, eval_data: Examples | None = None) -> TrainResult:
    """Run the job of ``config``; ``resume``: True for the newest checkpoint in ``output_dir``, or a path.

    ``stop_at``: stop after this step with a checkpoint, as a preemption would (for tests and drills).
    ``train_data`` / ``eval_data``: examples built by the caller (e.g. the demo, from token ids it already
    holds) instead of the files of ``config.data``. Torch's thread count is restored on return.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _train(config, resume, stop_at, train_data, eval_data)
    finally:
        torch.set_num_threads(previous_threads)


def _train(config: TrainConfig, resume: bool | Path, stop_at: int | None, train_data: Examples | None,
           eval_data: Examples | None) -> TrainResult:
    started = time.monotonic()
    rank, world, local_rank = init_distributed()
    device = resolve_device(config.device, local_rank)
    is_main = rank == 0
    teacher_config = config.used_teacher
    if is_main and config.teacher is not None and teacher_config is None:
        log.info("loss %s reads no teacher: the teacher section (mode %s) is ignored", config.loss.name,
                 config.teacher.mode)
    remote = teacher_config.addresses if teacher_config is not None and teacher_config.mode == "remote" else ()
    threads, message, warn = plan_threads(config.threads, Machine.here(remote))
    torch.set_num_threads(threads)
    if is_main:
        log.log(logging.WARNING if warn else logging.INFO, message)
    output_dir = Path(config.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    tokenizer = load_tokenizer(config.tokenizer or config.student)
    if train_data is None:
        train_data = load_examples(config.data, tokenizer, "train")
    if eval_data is None:
        eval_data = load_examples(config.data, tokenizer, "eval")
    if eval_data is None and is_main:
        log.info("no data.eval: this run reports no held-out evaluation")
    order = BatchOrder(len(train_data), config.batch_size, config.seed, world, rank)
    steps = total_steps(config, order)

    torch.manual_seed(config.seed)
    model = load_model(config.student, device=str(device)).train()
    source = build_sequence_source(config, train_data, order, tokenizer, model, steps=steps, rank=rank,
                                   client_name=f"{output_dir.name}-rank{rank}")
    train_data = source.examples
    teacher = None if teacher_config is None else build_teacher(
        teacher_config, tokenizer, model, train_data, client_name=f"{output_dir.name}-rank{rank}")
    loss_fn = get_loss(config.loss.name, **config.loss.options)
    if is_main and teacher_config is not None and teacher_config.tail_samples and _reverse_tail(config.loss):
        log.warning("loss %s reads the teacher's tail samples with importance weights q/p, which are unbounded for a "
                    "reverse divergence: a student can drive the estimate down by putting mass where the teacher has "
                    "little (measured in experiments/grid.py: loss 0.0004 at a test perplexity of 5.7e6). Set "
                    "teacher.tail_samples=0 to read the tail as one exact bucket.", config.loss.name)
    fused = _fused_head_allowed(model, is_main) if config.fused_head else _fused_head_off(is_main)
    sharded = config.parallel == "fsdp" and world > 1
    if sharded:
        shard(model, config.precision)
    optimizer, schedule = make_optimizer(model, config.optim, steps)

    state = TrainState()
    checkpoint = _resume_from(resume, output_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, schedule)
        source.restore(checkpoint)
        log.info("resumed from %s at step %d", checkpoint, state.step)
        change = state.schedule_steps and schedule_change(state.step, state.schedule_steps, steps, config.optim)
        if change and is_main:
            log.warning(change)
    state.schedule_steps = steps
    metrics = MetricsLog(output_dir / METRICS_FILE, keep_until=state.step, enabled=is_main)
    trained = DistributedDataParallel(model) if world > 1 and not sharded else model

    # the run's micro-batches from the data position on, and no more (prefetch stops there); data.source
    # decides their responses and how far ahead they may be made (on-policy: data.source.staleness)
    batches = source.batches(state.micro_batch, steps * config.grad_accum,
                             lambda micro: teacher_seed(config.seed, micro, world, rank))
    stream = prefetched(teacher, batches, source.depth) if teacher else _no_teacher(batches)
    stop = _StopRequest()
    deadline = None if config.max_time is None else started + config.max_time
    bar = tqdm(total=steps, initial=state.step, desc=config.loss.name, disable=not (config.progress and is_main),
               dynamic_ncols=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16" and not sharded)
    result_eval, window = None, LogWindow()
    try:
        while state.step < steps:
            step_start, waited = time.perf_counter(), 0.0
            boundary = _StepBoundary(state)
            for micro in range(config.grad_accum):
                batch, teacher_output, wait_s = _next_agreed(stream, world if teacher else 1, device, rank)
                waited += wait_s
                sync = micro == config.grad_accum - 1 or world == 1
                with _gradient_sync(trained, sync):
                    with autocast, deferred_head(model) if fused else contextlib.nullcontext():
                        logits = trained(batch.input_ids.to(device)).logits  # fused: HeadLogits
                    result = loss_fn(logits, _to(teacher_output, device), batch.targets.to(device))
                    (result.loss / config.grad_accum).backward()
                window.add_micro_batch(result, tokens=batch.input_ids.numel() * world)
                state.micro_batch += 1
                state.tokens += batch.input_ids.numel() * world
            grad_norm = local_value(torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            state.step += 1
            step_s = time.perf_counter() - step_start
            window.add_step(grad_norm, teacher_wait_s=waited, step_s=step_s)

            if state.step % config.log_every == 0:
                record = {"step": state.step, "lr": schedule.get_last_lr()[0], **window.read(), "tokens": state.tokens}
                metrics.write("train", record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                wait=f"{record['teacher_wait_s']:.2f}s")
            bar.update(1)

            last = state.step == steps
            due_eval = last or config.eval_every and state.step % config.eval_every == 0
            if eval_data is not None and (is_main or sharded) and due_eval:  # sharded: a collective
                result_eval = evaluate_examples(model, eval_data, config.batch_size, config.data.eval_batches)
                metrics.write("eval", {"step": state.step, **asdict(result_eval)})
            out_of_time = deadline is not None and time.monotonic() + step_s > deadline
            stopping = stop.agreed(world, device, out_of_time) or (stop_at is not None and state.step >= stop_at)
            if (is_main or sharded) and (last or stopping or config.save_every and state.step % config.save_every == 0):
                saved = save_checkpoint(output_dir, model, optimizer, schedule, state, config.keep_checkpoints,
                                        tokenizer=tokenizer, run_name=config.name, sharded=sharded)
                if is_main:
                    source.save(saved, state.micro_batch)
            if stopping and not last:
                why = "stop requested"
                if out_of_time:
                    why = f"max_time ({config.max_time:g} s) would pass during the next step"
                log.info("%s: stopping at step %d (checkpoint saved): resume to continue", why, state.step)
                return TrainResult(state, None, result_eval, stopped_early=True)
    except TeacherError as error:
        boundary.restore(optimizer)
        if is_main or sharded:  # sharded: a collective, and every rank has agreed to stop (_next_agreed)
            found = list_checkpoints(output_dir)
            error.checkpoint = found[-1] if found and _step_of(found[-1]) == boundary.state.step else save_checkpoint(
                output_dir, model, optimizer, schedule, boundary.state, config.keep_checkpoints, tokenizer=tokenizer,
                run_name=config.name, sharded=sharded)
        if is_main:
            log.error("the teacher failed in step %d: %s. Checkpoint of step %d: %s; once the teacher serves again, "
                      "run the same command with --resume", boundary.state.step + 1, error, boundary.state.step,
                      error.checkpoint)
        raise
    finally:
        bar.close()
        stop.restore()
        metrics.close()
        if teacher is not None:
            teacher.close()
        source.close()
    final_dir = output_dir / FINAL_DIR
    if sharded:
        _save_gathered(model, config.student, final_dir, tokenizer, config.name, is_main)
    elif is_main:
        save_model(model, final_dir, tokenizer=tokenizer, model_id=config.name)
    if world > 1:
        dist.barrier()
    return TrainResult(state, final_dir, result_eval, stopped_early=False)


def _fused_head_allowed(model: torch.nn.Module, is_main: bool) -> bool:
    reason = fused_head_unsupported(model)
    if is_main and reason is None:
        log.info("fused_head: on (the loss computes %s's logits chunk by chunk)", type(model).__name__)
    elif is_main:
        log.info("fused_head: off, %s cannot (%s): the loss takes its full logits", type(model).__name__, reason)
    return reason is None


def _fused_head_off(is_main: bool) -> bool:
    if is_main:
        log.info("fused_head: off (config): the loss takes the model's full logits")
    return False


def _gradient_sync(trained: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Whether this micro-batch's backward reduces the gradients over the ranks (DDP's no_sync, FSDP2's flag)."""
    if isinstance(trained, FSDPModule):
        trained.set_requires_gradient_sync(sync)
    elif isinstance(trained, DistributedDataParallel) and not sync:
        return trained.no_sync()
    return contextlib.nullcontext()


def _save_gathered(model: torch.nn.Module, student: Path, directory: Path, tokenizer, model_id: str,
                   is_main: bool) -> None:
    """Gather a sharded student (a collective) and save it on rank 0 as a complete model directory."""
    state = full_state_dict(model)
    if is_main:
        plain = load_model(student)
        plain.load_state_dict(state)
        save_model(plain, directory, tokenizer=tokenizer, model_id=model_id)


def _resume_from(resume: bool | Path, output_dir: Path) -> Path | None:
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            log.info("no checkpoint in %s: starting from scratch", output_dir)
        return found[-1] if found else None
    return Path(resume) if resume else None


class _StepBoundary:
    """What a step changes before its optimizer step, as it was at its start: the run's position and the
    RNG states (a forward may draw, e.g. dropout). The weights, optimizer and schedule change only at the
    step's end, so restoring this puts the run back at the step's start."""

    def __init__(self, state: TrainState):
        self.state = dataclasses.replace(state)
        self._rng = torch.get_rng_state(), random.getstate()

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(self._rng[0])
        random.setstate(self._rng[1])


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(PREFIX))


def _next_agreed(stream, world: int, device: torch.device, rank: int):
    """``next(stream)``; under DDP / FSDP every rank learns whether any rank's teacher failed for good
    (an all-reduce of the flag per micro-batch, before the forward), so that all stop at the same step.

    Without it a rank whose teacher failed leaves the run alone while the others go on to the backward's
    gradient all-reduce, where they wait until torchrun kills them (or the process group's timeout), and
    rank 0, which writes the checkpoint, never learns why."""
    try:
        item, error = next(stream), None
    except TeacherError as failed:
        item, error = None, failed
    if world == 1:
        if error is not None:
            raise error
        return item
    failed_ranks = torch.zeros(world, device=device)
    failed_ranks[rank] = float(error is not None)
    dist.all_reduce(failed_ranks)
    failed = [r for r, flag in enumerate(failed_ranks.tolist()) if flag]
    if error is not None:
        raise error
    if failed:
        raise TeacherError(grpc.StatusCode.UNAVAILABLE,
                           f"the teacher of rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} "
                           "failed for good (its error is in that rank's log); every rank stops at this step")
    return item


def _reverse_tail(loss) -> bool:
    """Whether the loss weighs the tail's samples by q / p (reverse KL, as the loss or as ATKD's base)."""
    divergence = tail_divergence(loss.name, loss.options)
    return divergence is not None and divergence.name in ("reverse", "skew_reverse")


def _no_teacher(batches):
    for batch, _ in batches:
        yield batch, None, 0.0


def _to(teacher_output: TeacherInput, device: torch.device) -> TeacherInput:
    return None if teacher_output is None else teacher_output.to(device)


class _StopRequest:
    """SIGTERM / SIGINT ask the loop to stop at the next step boundary; under DDP the ranks agree (an
    all-reduce of the flag) so they stop at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, world: int, device: torch.device, also: bool = False) -> bool:
        """Whether any rank was asked to stop, or has ``also`` set (e.g. its time is up)."""
        if world == 1:
            return self.requested or also
        flag = torch.tensor([float(self.requested or also)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
