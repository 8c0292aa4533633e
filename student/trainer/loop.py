"""The distillation training loop (``atkd-student train``).

Each optimizer step, in order:

1. for each of ``grad_accum`` micro-batches: take micro-batch m (examples from the seeded
   :class:`~atkd.student.data.examples.BatchOrder`) with its teacher signal, which was requested
   ``teacher.prefetch`` batches earlier; student forward (bf16 autocast if asked); loss / grad_accum;
   backward (under DDP the gradients are all-reduced on the last micro-batch only);
2. clip the global gradient norm; AdamW step; LR schedule step (warmup, then cosine);
3. log the step (JSONL, progress bar, TensorBoard if installed); evaluate and checkpoint on schedule.

The ATKD split is taken per micro-batch and per rank, as in the paper. Data parallelism: under
``torchrun`` every rank trains on its own slice of each global batch and has its own teacher stream;
2 ranks x B examples see exactly the batches of 1 process x B examples x 2 accumulation steps.
SIGTERM / SIGINT stop the run at the next step boundary with a checkpoint (all ranks agree on the step),
and ``resume`` continues from the newest checkpoint as if nothing had happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from atkd.student.data.examples import BatchOrder, Examples
from atkd.student.losses import get_loss
from atkd.student.models import LMEval, evaluate_lm, load_model
from atkd.student.teachers import prefetched
from atkd.student.train_loop import OptimConfig as LoopOptim
from atkd.student.train_loop import make_optimizer

from .checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .parts import build_teacher, init_distributed, load_examples, load_tokenizer, resolve_device

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
    holds) instead of the files of ``config.data``.
    """
    rank, world, local_rank = init_distributed()
    device = resolve_device(config.device, local_rank)
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    is_main = rank == 0
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    tokenizer = load_tokenizer(config.tokenizer or config.student)
    if train_data is None:
        train_data = load_examples(config.data, tokenizer, "train")
    if eval_data is None:
        eval_data = load_examples(config.data, tokenizer, "eval")
    order = BatchOrder(len(train_data), config.batch_size, config.seed, world, rank)
    steps = total_steps(config, order)

    torch.manual_seed(config.seed)
    model = load_model(config.student, device=str(device)).train()
    teacher = None if config.teacher is None else build_teacher(
        config.teacher, tokenizer, model, train_data, client_name=f"{output_dir.name}-rank{rank}")
    loss_options = dict(config.loss.options)
    diagnostics = config.loss.name == "atkd"
    if diagnostics:
        loss_options["return_diagnostics"] = True
    loss_fn = get_loss(config.loss.name, **loss_options)
    optim = config.optim
    optimizer, schedule = make_optimizer(model, LoopOptim(
        steps=steps, lr=optim.lr, warmup=optim.warmup, weight_decay=optim.weight_decay,
        min_lr_ratio=optim.min_lr_ratio, grad_clip=optim.grad_clip))

    state = TrainState()
    checkpoint = _resume_from(resume, output_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, schedule)
        log.info("resumed from %s at step %d", checkpoint, state.step)
    metrics = MetricsLog(output_dir / METRICS_FILE, keep_until=state.step, enabled=is_main)
    trained = DistributedDataParallel(model) if world > 1 else model

    def batches():
        micro = state.micro_batch
        while True:
            yield train_data.batch(order.indices(micro)), teacher_seed(config.seed, micro, world, rank)
            micro += 1

    stream = prefetched(teacher, batches(), config.teacher.prefetch) if teacher else _no_teacher(batches())
    stop = _StopRequest()
    bar = tqdm(total=steps, initial=state.step, desc="distil", disable=not (config.progress and is_main),
               dynamic_ncols=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    result_eval, window_start, window_tokens = None, time.perf_counter(), 0
    try:
        while state.step < steps:
            step_start, waited, parts = time.perf_counter(), 0.0, []
            for micro in range(config.grad_accum):
                batch, signal_out, wait_s = next(stream)
                waited += wait_s
                sync = micro == config.grad_accum - 1 or world == 1
                with contextlib.nullcontext() if sync else trained.no_sync():
                    with autocast:
                        logits = trained(batch.input_ids.to(device)).logits
                    out = loss_fn(logits, _to(signal_out, device), batch.targets.to(device))
                    loss, info = out if diagnostics else (out, {})
                    (loss / config.grad_accum).backward()
                parts.append({"loss": loss.item(), **info})
                state.micro_batch += 1
                state.tokens += int(batch.input_ids.numel()) * world
                window_tokens += int(batch.input_ids.numel()) * world
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            state.step += 1

            record = {"step": state.step, "lr": schedule.get_last_lr()[0], "grad_norm": float(grad_norm),
                      **_mean(parts), "teacher_wait_s": waited, "step_s": time.perf_counter() - step_start,
                      "tokens": state.tokens}
            record["tokens_per_s"] = window_tokens / (time.perf_counter() - window_start)
            if state.step % config.log_every == 0:
                metrics.write("train", record)
                window_start, window_tokens = time.perf_counter(), 0
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            wait=f"{waited:.2f}s")

            last = state.step == steps
            due_eval = last or config.eval_every and state.step % config.eval_every == 0
            if eval_data is not None and is_main and due_eval:
                result_eval = evaluate(model, eval_data, config)
                metrics.write("eval", {"step": state.step, **asdict(result_eval)})
            stopping = stop.agreed(world, device) or (stop_at is not None and state.step >= stop_at)
            if is_main and (last or stopping or config.save_every and state.step % config.save_every == 0):
                save_checkpoint(output_dir, model, optimizer, schedule, state, config.keep_checkpoints)
            if stopping and not last:
                log.info("stopping at step %d (checkpoint saved): resume to continue", state.step)
                return TrainResult(state, None, result_eval, stopped_early=True)
    finally:
        bar.close()
        stop.restore()
        metrics.close()
        if teacher is not None:
            teacher.close()
    final_dir = output_dir / FINAL_DIR
    if is_main:
        model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
    if world > 1:
        dist.barrier()
    return TrainResult(state, final_dir, result_eval, stopped_early=False)


def evaluate(model, examples: Examples, config: TrainConfig) -> LMEval:
    """Held-out perplexity and next-token accuracy over the first ``data.eval_batches`` batches."""
    size = config.batch_size
    count = len(examples)
    if config.data.eval_batches is not None:
        count = min(count, config.data.eval_batches * size)
    batches = (examples.batch(range(start, min(start + size, count))) for start in range(0, count, size))
    return evaluate_lm(model, batches)


def _resume_from(resume: bool | Path, output_dir: Path) -> Path | None:
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            log.info("no checkpoint in %s: starting from scratch", output_dir)
        return found[-1] if found else None
    return Path(resume) if resume else None


def _no_teacher(batches):
    for batch, _ in batches:
        yield batch, None, 0.0


def _to(teacher_output, device: torch.device):
    return None if teacher_output is None else teacher_output.to(device)


def _mean(parts: list[dict]) -> dict:
    """Per-key mean over the micro-batches of a step (counts are summed)."""
    keys = parts[0].keys()
    return {k: sum(p[k] for p in parts) / (1 if k.startswith("n_") else len(parts)) for k in keys}


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line with ``kind`` (train / eval) and ``step``; on resume, the
    records after the checkpoint's step are dropped, so the log reads as one uninterrupted run. Also
    writes TensorBoard scalars when ``tensorboard`` is installed."""

    def __init__(self, path: Path, keep_until: int, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._board = None
        if not enabled:
            return
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(path.parent / "tensorboard")

    def write(self, kind: str, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"kind": kind, **record}) + "\n")
        self._file.flush()
        if self._board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._board is not None:
            self._board.close()


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

    def agreed(self, world: int, device: torch.device) -> bool:
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
