"""Evaluation of a student: held-out perplexity and accuracy, and greedy generation scored by ROUGE-L.

- Language modelling (:func:`evaluate_lm`, :func:`evaluate_examples`): over every target that is not
  ignored, ``perplexity = exp(mean CE)`` and the next-token argmax ``accuracy``; what the training job
  logs as ``eval`` and the demo prints.
- Generation (:func:`greedy_generate`, :func:`rouge_l`, :func:`evaluate_generation`): the
  instruction-following benchmarks of the KD papers (ATKD, MiniLLM, DistiLLM) score a student's greedy
  response to each prompt by its ROUGE-L F1 against the reference response, averaged and reported in
  percent.
- :func:`evaluation_report`: both, as ``atkd-student eval`` prints them (generation for instruction
  data only), and each generation with its prompt, reference and score in a JSONL file if asked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from atkd.proto.alignment import IGNORE_INDEX
from atkd.student.data.examples import Examples, InstructionData
from atkd.student.data.lm import LMBatch


@dataclass
class LMEval:
    """Held-out language-modelling quality: ``perplexity = exp(mean CE)`` and next-token argmax
    ``accuracy``, both over the ``tokens`` valid targets."""

    perplexity: float
    accuracy: float
    tokens: int


def evaluate_lm(model: PreTrainedModel, batches: Iterable[LMBatch]) -> LMEval:
    """Token-mean cross entropy and argmax accuracy over all targets that are not ``-100``.

    The sums stay on the model's device and are read once at the end. The model is put in eval mode and
    restored after.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_ce = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for batch in batches:
            input_ids, targets = batch.input_ids.to(device), batch.targets.to(device)
            logits = model(input_ids).logits.float()
            total_ce += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).double()
            valid = targets != IGNORE_INDEX
            correct += (logits.argmax(-1).eq(targets) & valid).sum()
            count += valid.sum()
    model.train(was_training)
    total_ce, correct, count = torch.stack([total_ce, correct.double(), count.double()]).tolist()
    return LMEval(perplexity=math.exp(total_ce / count), accuracy=correct / count, tokens=int(count))


def evaluate_examples(model: PreTrainedModel, examples: Examples, batch_size: int,
                      max_batches: int | None = None) -> LMEval:
    """:func:`evaluate_lm` over ``examples`` in order, ``batch_size`` per batch, the first ``max_batches``
    batches only (all when None)."""
    count = len(examples)
    if max_batches is not None:
        count = min(count, max_batches * batch_size)
    batches = (examples.batch(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size))
    return evaluate_lm(model, batches)


def greedy_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                    max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """The greedy continuation of each prompt (the prompt itself excluded), decoded without special tokens.

    Prompts are tokenised without special tokens and decoded in batches of ``batch_size``, left padded
    (so that every row continues from its last token); a row stops at the tokenizer's eos, and
    everything from its first eos on is dropped. The model is put in eval mode and restored after.
    """
    if any(not prompt for prompt in prompts):
        raise ValueError("greedy_generate needs non-empty prompts")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    generations = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True,
                                return_tensors="pt").to(device)
            with torch.inference_mode():
                output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            for row in output[:, encoded["input_ids"].shape[1]:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                generations.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return generations


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` on lowercased whitespace-separated words.

    With L = the length of the longest common subsequence of the two word sequences, m = the
    reference length and n = the candidate length: recall R = L / m, precision P = L / n and
    F = (1 + b^2) R P / (R + b^2 P) with b = 1, i.e. F = 2 R P / (R + P) = 2 L / (m + n).
    0 when either side has no word or they share none.
    """
    cand, ref = candidate.lower().split(), reference.lower().split()
    if not cand or not ref:
        return 0.0
    # One row of the DP table at a time: after word i, lcs[j] = LCS length of cand[:i + 1] and ref[:j].
    lcs = [0] * (len(ref) + 1)
    for word in cand:
        above = lcs[:]
        for j, ref_word in enumerate(ref, 1):
            lcs[j] = above[j - 1] + 1 if word == ref_word else max(above[j], lcs[j - 1])
    common = lcs[-1]
    if common == 0:
        return 0.0
    recall, precision = common / len(ref), common / len(cand)
    return 2 * recall * precision / (recall + precision)


def evaluate_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                        references: list[str], max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Greedy responses to ``prompts`` scored against ``references``.

    Returns ``{"rouge_l": 100 * mean ROUGE-L F1, "examples": n, "generations": [str] * n,
    "scores": [100 * ROUGE-L F1] * n}``.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    generations = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    scores = [rouge_l(generation, reference) for generation, reference in zip(generations, references, strict=True)]
    return {
        "rouge_l": 100 * sum(scores) / len(scores) if scores else 0.0,
        "examples": len(scores),
        "generations": generations,
        "scores": [100 * score for score in scores],
    }


def evaluation_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Examples, *,
                      batch_size: int, max_batches: int | None = None, max_new_tokens: int = 64,
                      max_generations: int = 200, samples_path: Path | None = None) -> dict:
    """``{"perplexity", "accuracy", "tokens"}`` of :func:`evaluate_examples`; for :class:`InstructionData`
    also ``"rouge_l"`` and ``"generated"`` (the number of prompts) of :func:`evaluate_generation` on its
    first ``max_generations`` prompts and, with ``samples_path``, ``"samples"``: that path, where one JSON
    line per prompt holds ``prompt``, ``reference``, ``generation`` and its ``rouge_l``."""
    report = asdict(evaluate_examples(model, examples, batch_size, max_batches))
    if isinstance(examples, InstructionData):
        count = min(max_generations, len(examples.prompts))
        generated = evaluate_generation(model, tokenizer, examples.prompts[:count], examples.responses[:count],
                                        max_new_tokens=max_new_tokens, batch_size=batch_size)
        report["rouge_l"] = generated["rouge_l"]
        report["generated"] = generated["examples"]
        if samples_path is not None:
            write_samples(samples_path, zip(examples.prompts, examples.responses, generated["generations"],
                                            generated["scores"], strict=False))
            report["samples"] = str(samples_path)
    return report


def write_samples(path: Path, rows: Iterable[tuple[str, str, str, float]]) -> None:
    """One JSON line ``{"prompt", "reference", "generation", "rouge_l"}`` per row, to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for prompt, reference, generation, score in rows:
            record = {"prompt": prompt, "reference": reference, "generation": generation, "rouge_l": score}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
