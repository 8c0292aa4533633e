"""Generation on a replica: :class:`GenerateJob` s share the scheduler, the fair queue and the worker thread
with Score, and stream each prompt's continuation back as soon as it is finished.

Path of a ``Generate`` call (the same as Score's, :mod:`.replica`)::

    servicer.Generate -> parse_generate -> Scheduler.submit (admission and fairness by prompt + new tokens)
        -> a batch on the engine's worker thread: score jobs through engine.score, generate jobs through
           Generator.run (atkd.proto.sampling.sample: prefill + KV-cache decoding)
        -> each finished prompt: on_finished on the worker -> the call's asyncio queue -> a GenerateResponse

Reproducibility: a seeded job is decoded as a batch of its own (its P prompts), so its tokens depend on the
request only, never on which other requests share the scheduler's batch (batching other rows in would change
the padding and the matmul shapes, and so the low bits of the logits). Unseeded jobs with the same sampling
options are decoded together, for throughput. A job counts its whole budget (prompts + new tokens) in the
scheduler's batch, so a batch holds at most ``max_batch_tokens`` of generation; Score jobs that share a batch
with generation are computed first but answered when the batch ends (the scheduler answers per batch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto.sampling import Continuation, row_generators, sample

from .errors import ServiceError
from .generate_request import GenerateJob, parse_generate
from .metrics import TeacherMetrics
from .request import Limits

log = logging.getLogger(__name__)

FINISH = {True: pb.FINISH_REASON_STOP, False: pb.FINISH_REASON_LENGTH}


def eos_token_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """The model's eos ids (generation config first, then model config); () when it names none."""
    for config in (getattr(model, "generation_config", None), model.config):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return ()


class Generator:
    """Runs :class:`GenerateJob` s on ``engine.model`` (looked up per call, so a wrapped engine works)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def run(self, jobs: Sequence[GenerateJob]) -> list[list[Continuation]]:
        """Every job's continuations, in prompt order (see the module docstring for the grouping)."""
        results: dict[int, list[Continuation]] = {}
        groups: dict[Any, list[int]] = {}
        for number, job in enumerate(jobs):
            groups.setdefault(("seeded", number) if job.seed is not None else job.options, []).append(number)
        for members in groups.values():
            self._run_group([jobs[number] for number in members], results, members)
        return [results[number] for number in range(len(jobs))]

    def _run_group(self, jobs: list[GenerateJob], results: dict[int, list[Continuation]], numbers: list[int]) -> None:
        model = self.engine.model
        device = next(model.parameters()).device
        owners = [(number, job, index) for number, job in zip(numbers, jobs, strict=True)
                  for index in range(len(job.prompts))]
        generators = [generator for job in jobs for generator in row_generators(job.seed, len(job.prompts), device)]
        prompts = [prompt for job in jobs for prompt in job.prompts]
        for number, job in zip(numbers, jobs, strict=True):
            results[number] = []
            job.started.append(time.monotonic())

        def finished(continuation: Continuation) -> None:
            number, job, index = owners[continuation.index]
            mine = dataclasses.replace(continuation, index=index)
            results[number].append(mine)
            if job.on_finished is not None:
                job.on_finished(mine)

        sample(model, prompts, jobs[0].options, generators, on_finished=finished,
               cancelled=lambda: all(job.cancelled.is_set() for job in jobs))
        for number in numbers:
            results[number].sort(key=lambda continuation: continuation.index)


def with_generation(score: Callable[[Sequence[Any]], list], generator: Generator) -> Callable[[Sequence[Any]], list]:
    """The scheduler's compute for batches of score and generate jobs: each kind to its engine, results in the
    batch's order (both on the calling thread, the engine's worker)."""

    def compute(jobs: Sequence[Any]) -> list:
        results: list = [None] * len(jobs)
        generate_at = [i for i, job in enumerate(jobs) if isinstance(job, GenerateJob)]
        score_at = [i for i, job in enumerate(jobs) if not isinstance(job, GenerateJob)]
        if score_at:
            for i, signal in zip(score_at, score([jobs[i] for i in score_at]), strict=True):
                results[i] = signal
        if generate_at:
            for i, continuations in zip(generate_at, generator.run([jobs[i] for i in generate_at]), strict=True):
                results[i] = continuations
        return results

    return compute


class GenerateService:
    """The ``Generate`` RPC's logic; the servicer's method only adapts errors to the transport."""

    def __init__(self, limits: Limits, scheduler: Any, metrics: TeacherMetrics, max_new_tokens: int,
                 eos_ids: tuple[int, ...]):
        self.limits = limits
        self.scheduler = scheduler
        self.metrics = metrics
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids

    async def stream(self, request: pb.GenerateRequest, client: str) -> AsyncIterator[pb.GenerateResponse]:
        """One response per prompt as it finishes; a :class:`ServiceError` (bad request, limits, deadline,
        closing, engine failure) is raised before or between responses."""
        loop = asyncio.get_running_loop()
        arrived = time.monotonic()
        try:
            job = parse_generate(request, self.limits, self.max_new_tokens, self.eos_ids)
        except ServiceError as error:
            self._count(error.code)
            raise
        finished: asyncio.Queue = asyncio.Queue()

        def on_finished(continuation: Continuation) -> None:  # on the engine's worker thread
            loop.call_soon_threadsafe(finished.put_nowait, (continuation, time.monotonic()))

        job = dataclasses.replace(job, on_finished=on_finished)
        submitted = asyncio.ensure_future(self.scheduler.submit(client, job, request.timeout_ms / 1000 or None))
        sent = 0
        try:
            while sent < len(job.prompts):
                waiting = asyncio.ensure_future(finished.get())
                await asyncio.wait({waiting, submitted}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    try:
                        submitted.result()  # raises the job's error; on success the rest is already queued
                    except ServiceError as error:
                        self._count(error.code)
                        raise
                    if finished.empty():
                        raise ServiceError(f"the engine returned {sent} of {len(job.prompts)} continuations")
                    continue
                continuation, at = waiting.result()
                sent += 1
                yield pb.GenerateResponse(
                    id=request.id, index=continuation.index, token_ids=continuation.token_ids,
                    finish_reason=FINISH[continuation.stopped],
                    timing=pb.Timing(queue_ms=(job.started[0] - arrived) * 1e3,
                                     compute_ms=(at - job.started[0]) * 1e3, batch_tokens=job.tokens),
                )  # fmt: skip
            self._count(grpc.StatusCode.OK)
        finally:
            job.cancelled.set()  # a caller that went away stops the decoding after its step
            if not submitted.done():
                submitted.cancel()

    def _count(self, code: grpc.StatusCode) -> None:
        self.metrics.requests.labels("Generate", code.name).inc()
