"""Generation-based evaluation for instruction data: greedy decoding and ROUGE-L against references.

The instruction-following benchmarks of the KD papers (ATKD, MiniLLM, DistiLLM) score a student's
greedy response to each prompt by its ROUGE-L F1 against the reference response, averaged and
reported in percent.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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

    Returns ``{"rouge_l": 100 * mean ROUGE-L F1, "examples": n, "generations": [str] * n}``.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    generations = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    scores = [rouge_l(generation, reference) for generation, reference in zip(generations, references, strict=True)]
    return {
        "rouge_l": 100 * sum(scores) / len(scores) if scores else 0.0,
        "examples": len(scores),
        "generations": generations,
    }
