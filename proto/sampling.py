"""Sampling continuations of prompts with a causal LM and its KV cache: the one loop that the teacher's
``Generate`` RPC (:mod:`atkd.services.teacher.generation`) and the student's on-policy sampling
(:mod:`atkd.student.data.sources`) share, so that both sides draw tokens by the same rule.

P prompts are left padded to the longest L (pad id 0, attention mask 0 there; the position ids count each
prompt's own tokens from 0, so padding shifts nothing) and run through the model once (prefill, the cache
filled with ``[P, L]``); then every step feeds the P tokens just drawn and appends one column to the cache.

Drawing row r's next token from its logits ``z [V]`` (float32)::

    greedy:  argmax z
    else:    z / temperature -> keep the top_k largest (0: all) -> softmax -> keep the smallest set of the most
             likely tokens whose mass reaches top_p (the token that crosses top_p is kept) -> renormalise
             -> one torch.multinomial draw from row r's own torch.Generator

so a row's tokens depend on its generator and its logits only, never on the other rows' draws. A row is
finished when it drew a stop token (kept in its continuation) or ``max_new_tokens`` tokens; finished rows
leave the decoding batch (their cache rows are dropped), and the loop ends when no row is left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingOptions:
    """How to draw (see the module docstring); ``stop_token_ids`` empty: never stop early."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k} must be >= 0")


@dataclass(frozen=True)
class Continuation:
    """The new tokens of prompt ``index``; ``stopped``: it ends with a stop token (else it ran out of tokens)."""

    index: int
    token_ids: list[int]
    stopped: bool


def row_generators(seed: int | None, count: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per prompt: prompt i seeded with ``(seed + i) mod 2^64``, or at random when ``seed`` is None."""
    generators = []
    for i in range(count):
        generator = torch.Generator(device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed((seed + i) % 2**64)
        generators.append(generator)
    return generators


def draw(logits: torch.Tensor, options: SamplingOptions, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token of every row of ``logits [R, V]`` (``generators``: one per row); returns ``[R]`` int64."""
    logits = logits.float()
    if options.greedy:
        return logits.argmax(-1)
    logits = logits / options.temperature
    if 0 < options.top_k < logits.shape[-1]:
        kth = logits.topk(options.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if options.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= options.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.cat([torch.multinomial(row, 1, generator=generator)
                      for row, generator in zip(probs, generators, strict=True)])


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    options: SamplingOptions,
    generators: Sequence[torch.Generator],
    *,
    on_finished: Callable[[Continuation], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[Continuation]:
    """Continuations of ``prompts`` (P lists of ids, each non-empty) in prompt order; ``on_finished`` is called
    with each as soon as it is finished (finishing order). ``cancelled()`` true: stop after the current step
    (the unfinished rows come back unstopped, as if out of tokens). The caller checks that every prompt plus
    ``max_new_tokens`` fits the model's context."""
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    count, longest = len(prompts), max(len(prompt) for prompt in prompts)
    input_ids = torch.zeros(count, longest, dtype=torch.long)
    mask = torch.zeros(count, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, next_position = output.cache, positions[:, -1] + 1
    stop = set(options.stop_token_ids)
    rows = list(range(count))  # prompt index of each row still decoding
    tokens: list[list[int]] = [[] for _ in range(count)]
    finished: list[Continuation | None] = [None] * count

    def finish(index: int, stopped: bool) -> None:
        finished[index] = Continuation(index, tokens[index], stopped)
        if on_finished is not None:
            on_finished(finished[index])

    logits = output.logits[:, -1]
    for step in range(options.max_new_tokens):
        drawn = draw(logits, options, [generators[index] for index in rows]).tolist()
        keep = []
        for row, (index, token) in enumerate(zip(rows, drawn, strict=True)):
            tokens[index].append(token)
            if token in stop:
                finish(index, stopped=True)
            elif step + 1 < options.max_new_tokens:
                keep.append(row)
            else:
                finish(index, stopped=False)
        if not keep or (cancelled is not None and cancelled()):
            break
        if len(keep) < len(rows):  # drop the finished rows from the batch and its cache
            selected = torch.tensor(keep, device=device)
            cache.batch_select_indices(selected)
            mask, next_position = mask[selected], next_position[selected]
            drawn = [drawn[row] for row in keep]
            rows = [rows[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        step_ids = torch.tensor(drawn, device=device).unsqueeze(1)
        output = model(input_ids=step_ids, attention_mask=mask, position_ids=next_position.unsqueeze(1),
                       cache=cache, use_cache=True)
        cache, next_position = output.cache, next_position + 1
        logits = output.logits[:, -1]
    for index in range(count):
        if finished[index] is None:
            finish(index, stopped=False)
    return finished
