"""Evaluation: held-out perplexity and accuracy, ROUGE-L on hand-worked examples, greedy decoding, and the
reports of ``atkd-student eval``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from atkd.student.data.examples import InstructionData, PackedText
from atkd.student.data.instructions import dialogue_pairs
from atkd.student.data.lm import LMBatch
from atkd.student.evaluation import (
    evaluate_examples,
    evaluate_generation,
    evaluate_lm,
    evaluation_report,
    greedy_generate,
    rouge_l,
)
from atkd.student.models import build_model

VOCAB = 300
TINY = dict(hidden=32, layers=2, heads=2, max_len=64)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def prompts(excerpt_paragraphs) -> list[str]:
    """Five prompts of different lengths (so that batches are left padded)."""
    paragraphs = [p.strip() for p in excerpt_paragraphs if len(p.split()) >= 12]
    return [" ".join(p.split()[: 3 + 2 * i]) for i, p in enumerate(paragraphs[:5])]


def test_rouge_l_identical_disjoint_and_case():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("The CAT sat", "the cat  sat") == 1.0
    assert rouge_l("a b c", "d e f") == 0.0
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("a b", "") == 0.0


def test_rouge_l_worked_examples():
    # candidate "a b c d e" (n = 5), reference "a x c e" (m = 4): LCS = "a c e", L = 3;
    # R = 3/4, P = 3/5, F = 2RP / (R + P) = 0.9 / 1.35 = 2/3.
    assert rouge_l("a b c d e", "a x c e") == pytest.approx(2 / 3)
    # Order matters (a subsequence, not a bag of words): "b a" vs "a b" share LCS 1, so R = P = F = 1/2.
    assert rouge_l("b a", "a b") == pytest.approx(0.5)
    # "the cat sat on the mat" vs "on the mat the cat sat": LCS = "the cat sat" or "on the mat", L = 3,
    # m = n = 6, F = 3/6.
    assert rouge_l("the cat sat on the mat", "on the mat the cat sat") == pytest.approx(0.5)
    # Repeated words: "a a a" (n = 3) vs "a b a" (m = 3): LCS = "a a", F = 2/3.
    assert rouge_l("a a a", "a b a") == pytest.approx(2 / 3)


def test_greedy_generate_is_deterministic_and_batching_does_not_change_it(model, tiny_tokenizer, prompts):
    batched = greedy_generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    again = greedy_generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    one_by_one = greedy_generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert len(batched) == len(prompts) and all(isinstance(text, str) for text in batched)
    assert batched == again == one_by_one
    assert any(batched)  # a random model still writes something


def test_greedy_generate_respects_max_new_tokens_and_restores_state(model, tiny_tokenizer, prompts):
    model.train()
    side = tiny_tokenizer.padding_side
    short = greedy_generate(model, tiny_tokenizer, prompts, max_new_tokens=3, batch_size=2)
    assert model.training and tiny_tokenizer.padding_side == side
    model.eval()
    longer = greedy_generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=2)
    # Greedy: 3 new tokens are the start of 8; the cap bites (some continuation is strictly longer).
    assert all(full.startswith(start) for start, full in zip(short, longer, strict=True))
    assert any(len(full) > len(start) for start, full in zip(short, longer, strict=True))


def test_evaluate_generation_scores_in_percent(model, tiny_tokenizer, prompts):
    references = ["Enter the Duke of Ephesus"] * len(prompts)
    result = evaluate_generation(model, tiny_tokenizer, prompts, references, max_new_tokens=8, batch_size=4)
    assert result["examples"] == len(prompts) and len(result["generations"]) == len(prompts)
    assert 0.0 <= result["rouge_l"] <= 100.0
    # Scored against its own generations, every non-empty one is a perfect match.
    own = evaluate_generation(model, tiny_tokenizer, prompts, result["generations"], max_new_tokens=8, batch_size=4)
    non_empty = sum(bool(text.split()) for text in result["generations"])
    assert own["rouge_l"] == pytest.approx(100.0 * non_empty / len(prompts))
    assert non_empty > 0


def test_evaluate_lm_is_exp_of_the_token_mean_cross_entropy():
    model = build_model("gpt2", VOCAB, TINY, seed=0)
    gen = torch.Generator().manual_seed(1)
    batches = [
        LMBatch(torch.randint(0, VOCAB, (2, 8), generator=gen), torch.randint(0, VOCAB, (2, 8), generator=gen))
        for _ in range(2)
    ]
    batches[1].targets[0, :5] = -100  # ignored positions count neither in the loss nor in the tokens
    result = evaluate_lm(model, batches)

    with torch.no_grad():
        logits = torch.cat([model(b.input_ids).logits for b in batches]).flatten(0, 1)
    targets = torch.cat([b.targets for b in batches]).flatten()
    valid = targets != -100
    expected_ce = F.cross_entropy(logits[valid], targets[valid])
    assert result.tokens == 27
    assert result.perplexity == pytest.approx(math.exp(expected_ce.item()), rel=1e-5)
    assert result.accuracy == pytest.approx((logits[valid].argmax(-1) == targets[valid]).float().mean().item())


def test_evaluate_examples_reads_the_first_batches_in_order(model, tiny_tokenizer):
    examples = PackedText(torch.randint(0, len(tiny_tokenizer), (20 * 16 + 1,),
                                        generator=torch.Generator().manual_seed(2)), seq_len=16)
    result = evaluate_examples(model, examples, batch_size=3, max_batches=2)
    assert result == evaluate_lm(model, [examples.batch(range(0, 3)), examples.batch(range(3, 6))])
    assert result.tokens == 6 * 16
    assert evaluate_examples(model, examples, batch_size=8).tokens == 20 * 16  # None: every example


def test_evaluation_report_adds_rouge_l_for_instruction_data_only(model, tiny_tokenizer, excerpt_paragraphs):
    records = dialogue_pairs("\n\n".join(excerpt_paragraphs), max_chars=80)[:6]
    instructions = InstructionData(records, tiny_tokenizer, seq_len=32)
    report = evaluation_report(model, tiny_tokenizer, instructions, batch_size=4, max_new_tokens=4, max_generations=5)
    assert report.keys() == {"perplexity", "accuracy", "tokens", "rouge_l", "generated"}
    assert report["generated"] == 5 and 0.0 <= report["rouge_l"] <= 100.0
    assert report["tokens"] == evaluate_examples(model, instructions, batch_size=4).tokens
    text = PackedText(instructions.input_ids.flatten(), seq_len=16)
    assert evaluation_report(model, tiny_tokenizer, text, batch_size=4).keys() == {"perplexity", "accuracy", "tokens"}
