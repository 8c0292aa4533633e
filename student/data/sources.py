"""Where the sequences of each micro-batch come from (``data.source`` of the training config).

    dataset  the dataset's responses (Supervised KD, ATKD): today's behaviour
    teacher  the teacher's responses (SeqKD): offline from ``generations``, a directory written once by
             ``atkd-student generate`` (:mod:`.generated`); online (no ``generations``): generated for each
             micro-batch through the Generate RPC
    student  the student's own samples with its current weights (on-policy: ImitKD, GKD with lmbda = 1)
    mix      per example, the student's sample with probability lambda (GKD's ``lmbda``; ImitKD's annealed
             schedule: lambda goes linearly from ``lmbda_start`` to ``lmbda`` over ``anneal_steps``), else
             the dataset's or the teacher's response (``mix_with``)

Whatever the source, a micro-batch is an :class:`~.lm.LMBatch` of prompt + response windows built like the
instruction dataset's (:func:`~.examples.pair_window`: targets -100 on the prompt and the padding), and the
teacher scores it like any other batch, so any loss works with any source (GKD = ``mix`` + the ``jsd`` loss
with its ``beta``). Instruction data only: a source needs prompts.

Determinism: micro-batch m of rank r has the global number g = m * world + r (as the teacher's tail-sample
seed); its coin flips come from seed(g) and its k-th sampled row from seed(g) + offset + k, so a resumed run
and N ranks versus N accumulation steps draw the same samples (the weights they are drawn with are the same
too: within an optimizer step the weights do not change).

Overlap: on-policy samples cannot be drawn before the weights they need exist. With ``staleness = 0`` micro-
batch m is sampled after step m - 1's update and scored before its step can start (no prefetch); with
``staleness = s`` it is sampled s micro-batches ahead (with the weights of step m - 1 - s, as a one-step
off-policy trainer does for s = 1) and the teacher scores it while the student trains. The sampled batches
still in flight at a checkpoint are saved in it, so a resume stays exact for any staleness (single process).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atkd.proto.sampling import SamplingOptions, row_generators, sample

from .examples import BatchOrder, Examples, InstructionData, pair_window
from .lm import LMBatch

if TYPE_CHECKING:
    from atkd.student.client.generate import TeacherGenerator

log = logging.getLogger(__name__)

SAMPLED_FILE = "sampled-batches.pt"
#: offsets of the row seeds of the two samplers of a micro-batch (below them: the coin flips)
_STUDENT_OFFSET, _TEACHER_OFFSET, _SEED_STRIDE = 1 << 12, 1 << 13, 1 << 14

#: ``sampler(prompts, max_new_tokens, seed)`` -> one object with ``token_ids`` and ``stopped`` per prompt,
#: prompt k drawn with seed ``seed + k``
Sampler = Callable[[Sequence[Sequence[int]], int, int], list]


def generation_seed(seed: int, micro_batch: int, world: int, rank: int) -> int:
    """Base seed of micro-batch ``micro_batch`` of ``rank``: a function of its global number only."""
    return ((seed * 1_000_003 + micro_batch * world + rank) * _SEED_STRIDE) % 2**63


class StudentSampler:
    """Samples from the student as it is now (eval mode, no grad, fp32; training mode restored)."""

    def __init__(self, model: torch.nn.Module, eos_id: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0):
        self.model = model
        self.options = dict(temperature=temperature, top_p=top_p, top_k=top_k, stop_token_ids=(eos_id,))

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int) -> list:
        training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            return sample(self.model, prompts, SamplingOptions(max_new_tokens, **self.options),
                          row_generators(seed, len(prompts), device))
        finally:
            self.model.train(training)


class TeacherSampler:
    """Samples from the teacher through the Generate RPC (:class:`~atkd.student.client.generate.TeacherGenerator`)."""

    def __init__(self, generator: TeacherGenerator, eos_id: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0):
        self.generator = generator
        self.options = dict(temperature=temperature, top_p=top_p, top_k=top_k, stop_token_ids=[eos_id])

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int) -> list:
        return self.generator.generate(prompts, max_new_tokens=max_new_tokens, seed=seed, **self.options)


class LambdaSchedule:
    """Probability that an example of optimizer step ``step`` is the student's: ``end``, or with ``start``
    linear from ``start`` at step 0 to ``end`` at ``steps`` and constant after (ImitKD's annealing)."""

    def __init__(self, end: float, start: float | None = None, steps: int = 0):
        self.end, self.start, self.steps = end, start, max(1, steps)

    def __call__(self, step: int) -> float:
        if self.start is None:
            return self.end
        return self.start + (self.end - self.start) * min(1.0, step / self.steps)


class SequenceSource:
    """The run's micro-batches: ``batches(start, end, teacher_seed)`` yields ``(LMBatch, teacher seed)``.

    ``student`` / ``teacher``: the samplers (None: not used); ``lmbda``: per-step probability that a row is the
    student's (rows that are not go to ``teacher`` when it is set, else keep the dataset's response).
    ``depth``: the prefetch depth the loop should use (see the module docstring).
    """

    def __init__(self, examples: Examples, order: BatchOrder, *, seed: int, grad_accum: int = 1,
                 student: Sampler | None = None, teacher: Sampler | None = None,
                 lmbda: Callable[[int], float] = lambda step: 0.0, max_new_tokens: int | None = None,
                 depth: int = 0, samples_log: Path | None = None, close: Callable[[], None] | None = None):
        self.examples, self.order, self.seed, self.grad_accum = examples, order, seed, grad_accum
        self.student, self.teacher, self.lmbda = student, teacher, lmbda
        self.max_new_tokens = max_new_tokens or examples.seq_len
        self.depth = depth
        self._samples_log = None if samples_log is None else Path(samples_log).open("a", encoding="utf-8")
        self._close = close
        self._produced: dict[int, LMBatch] = {}  # the newest micro-batches made, for checkpoints
        self._restored: dict[int, LMBatch] = {}

    @property
    def resamples(self) -> bool:
        return self.student is not None or self.teacher is not None

    def batches(self, start: int, end: int, teacher_seed: Callable[[int], int]) -> Iterator[tuple[LMBatch, int]]:
        """Micro-batches ``start .. end - 1``, each made when the consumer asks for it (on-policy: with the
        weights of that moment). Without a student sampler the teacher's generations run ahead on a thread."""
        if self.student is None and self.teacher is not None and self.depth:
            with ThreadPoolExecutor(1, thread_name_prefix="teacher-generate") as pool:
                ahead = [pool.submit(self.batch, m) for m in range(start, min(end, start + self.depth + 1))]
                for m in range(start, end):
                    batch = ahead.pop(0).result()
                    if m + self.depth + 1 < end:
                        ahead.append(pool.submit(self.batch, m + self.depth + 1))
                    yield batch, teacher_seed(m)
            return
        for m in range(start, end):
            yield self.batch(m), teacher_seed(m)

    def batch(self, micro_batch: int) -> LMBatch:
        """Micro-batch ``micro_batch``: the dataset's examples, their responses resampled as configured."""
        if micro_batch in self._restored:
            batch = self._restored.pop(micro_batch)
        else:
            batch = self.examples.batch(self.order.indices(micro_batch))
            if self.resamples:
                self._resample(batch, micro_batch)
        self._produced[micro_batch] = batch
        for old in [m for m in self._produced if m < micro_batch - self.depth - 1]:
            del self._produced[old]
        return batch

    def _resample(self, batch: LMBatch, micro_batch: int) -> None:
        order = self.order
        base = generation_seed(self.seed, micro_batch, order.world_size, order.rank)
        rows = range(batch.input_ids.shape[0])
        lengths = self.examples.prompt_lengths[batch.example_ids]
        room = self.examples.seq_len + 1 - lengths
        coins = torch.rand(len(rows), generator=torch.Generator().manual_seed(base))
        lam = self.lmbda(micro_batch // self.grad_accum) if self.student is not None else 0.0
        to_student = [row for row in rows if room[row] >= 1 and coins[row] < lam]
        to_teacher = [row for row in rows if room[row] >= 1 and row not in to_student] if self.teacher else []
        for who, chosen, sampler, offset in (("student", to_student, self.student, _STUDENT_OFFSET),
                                             ("teacher", to_teacher, self.teacher, _TEACHER_OFFSET)):
            if not chosen:
                continue
            prompts = [batch.input_ids[row, : int(lengths[row])].tolist() for row in chosen]
            new = max(1, min(self.max_new_tokens, int(room[chosen].max())))
            for row, prompt, generation in zip(chosen, prompts, sampler(prompts, new, base + offset), strict=True):
                response = list(generation.token_ids)
                batch.input_ids[row], batch.targets[row] = pair_window(prompt, response, self.examples.seq_len,
                                                                       self.examples.pad_id)
                self._log(micro_batch, row, int(batch.example_ids[row]), who, prompt, response)

    def _log(self, micro_batch: int, row: int, example: int, who: str, prompt: list[int], response: list[int]) -> None:
        if self._samples_log is not None:
            room = self.examples.seq_len + 1 - len(prompt)
            self._samples_log.write(json.dumps({"micro_batch": micro_batch, "row": row, "example": example,
                                                "source": who, "prompt_ids": prompt,
                                                "response_ids": response[:room]}) + "\n")
            self._samples_log.flush()

    # -- checkpoints: on-policy batches made ahead (staleness > 0) with weights a resumed run no longer has --
    def save(self, checkpoint: Path, next_micro_batch: int) -> None:
        """Store the batches already made for micro-batches >= ``next_micro_batch`` in ``checkpoint``."""
        ahead = {m: batch for m, batch in self._produced.items() if m >= next_micro_batch}
        if self.student is not None and ahead:
            torch.save({m: (b.input_ids, b.targets, b.example_ids) for m, b in ahead.items()},
                       Path(checkpoint) / SAMPLED_FILE)

    def restore(self, checkpoint: Path) -> None:
        """Replay the batches :meth:`save` stored (if any) instead of sampling them again."""
        path = Path(checkpoint) / SAMPLED_FILE
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            self._restored = {m: LMBatch(*tensors) for m, tensors in saved.items()}

    def close(self) -> None:
        if self._samples_log is not None:
            self._samples_log.close()
        if self._close is not None:
            self._close()


def build_source(source: Any, examples: Examples, order: BatchOrder, *, seed: int, grad_accum: int, steps: int,
                 student_model: torch.nn.Module, eos_id: int, teacher_generator: Callable[[], TeacherGenerator],
                 prefetch: int, generated: Callable[[Path], Examples],
                 samples_log: Path | None = None) -> SequenceSource:
    """The :class:`SequenceSource` of the config section ``source`` (``data.source``).

    ``teacher_generator()`` connects to the teacher for online generation; ``generated(directory)`` loads
    offline generations over ``examples`` (:func:`~.generated.generated_examples`); ``prefetch``: the teacher
    section's depth (used when no student samples are involved)."""
    if source.name == "dataset":
        return SequenceSource(examples, order, seed=seed, depth=prefetch)
    if not isinstance(examples, InstructionData):
        raise ValueError(f"data.source.name={source.name!r} needs instruction data (data.kind: instruction): it "
                         "samples responses to prompts")
    sampling = dict(eos_id=eos_id, temperature=source.temperature, top_p=source.top_p, top_k=source.top_k)
    uses_teacher = source.name == "teacher" or (source.name == "mix" and source.mix_with == "teacher")
    teacher = close = None
    if uses_teacher and source.generations is not None:
        examples = generated(source.generations)
    elif uses_teacher:
        client = teacher_generator()
        teacher, close = TeacherSampler(client, **sampling), client.client.close
    student = StudentSampler(student_model, **sampling) if source.name in ("student", "mix") else None
    lmbda = LambdaSchedule(1.0 if source.name == "student" else source.lmbda, source.lmbda_start,
                           source.anneal_steps or steps)
    depth = source.staleness if student is not None else prefetch
    return SequenceSource(examples, order, seed=seed, grad_accum=grad_accum, student=student, teacher=teacher,
                          lmbda=lmbda, max_new_tokens=source.max_new_tokens, depth=depth,
                          samples_log=samples_log if source.log_samples else None, close=close)


__all__ = ["LambdaSchedule", "SequenceSource", "StudentSampler", "TeacherSampler", "build_source",
           "generation_seed"]
