"""services/teacher/packing.py and the engine's batches: packed (or padded by length groups) batches give
the signal of one sequence at a time, and a batch forwards the tokens admission counted, not more."""

from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, GPT2Model, LlamaConfig, MistralConfig

from atkd.services.teacher.engine import TeacherEngine
from atkd.services.teacher.packing import MAX_PADDING, VARLEN_ATTENTION, length_groups, pack
from atkd.student.client import TeacherClient
from tests.test_teacher_engine import assert_signals_close, job, local_signal

# lengths 1 (nothing scored), equal lengths (one attention call on a view), 20 and 15 (one call on gathered
# windows), the context's 128
SEQUENCES = [list(range(3, 23)), [9], list(range(100, 111)), list(range(200, 211)), [(7 * t) % 512 for t in range(128)],
             [40, 41, 42], list(range(300, 315))]


def tokens_into_model(model) -> list[int]:
    """Records the number of token ids each forward of ``model`` receives (padding included), by a hook
    on its input embeddings: a count that does not rely on the engine's own."""
    counts: list[int] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda _, args: counts.append(args[0].numel()))
    return counts


def assert_scores_one_sequence_at_a_time(engine, reference_model):
    jobs = [job(SEQUENCES[:3]), job(SEQUENCES[3:5], top_k=4), job(SEQUENCES[5:], tail_samples=2, seed=3)]
    signals = engine.score(jobs)
    for got, sequences, k in zip(signals, (SEQUENCES[:3], SEQUENCES[3:5], SEQUENCES[5:]), (8, 4, 8), strict=True):
        alone = [local_signal(reference_model, s, k) for s in sequences if len(s) > 1]
        want = type(alone[0])(**{name: torch.cat([getattr(a, name) for a in alone]) for name in (
            "target_logprob", "topk_ids", "topk_logprobs", "tail_logprob", "uncertainty", "entropy")})
        assert_signals_close(got, want)
    (alone_tail,) = engine.score([jobs[2]])  # seeded tail samples do not depend on the batch
    assert torch.equal(signals[2].tail_sample_ids, alone_tail.tail_sample_ids)


@pytest.mark.parametrize("packing", ["auto", "off"])
@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "llama"])
def test_packed_and_padded_batches_score_as_one_sequence_at_a_time(tiny_model_factory, family, packing):
    directory = tiny_model_factory(family)
    engine = TeacherEngine.load(directory, packing=packing, chunk_size=7)
    assert engine.packed == (packing == "auto")
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert_scores_one_sequence_at_a_time(engine, reference)
    counts, before = tokens_into_model(engine.model), engine.forwarded_tokens
    engine.score([job(SEQUENCES)])
    tokens = sum(len(s) for s in SEQUENCES)
    if packing == "auto":
        assert counts == [tokens] and engine.model.config._attn_implementation == VARLEN_ATTENTION
    else:  # one forward per length group: [128], [20], [15], [11, 11], [3], [1]
        assert counts == [128, 20, 15, 22, 3, 1]
    assert engine.forwarded_tokens - before == sum(counts)


def test_grouped_query_attention_packs(tiny_model_factory):
    config = LlamaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    engine = TeacherEngine(model, model_id="gqa", revision="r", tokenizer_hash="")
    assert engine.packed
    assert_scores_one_sequence_at_a_time(engine, model)  # the model, now packing, also runs unpacked


def test_a_sliding_window_model_falls_back_to_padding():
    """Mistral's attention takes a sliding window, which packed attention refuses: the probe's packed
    forward fails and the engine pads instead, leaving the model's attention as it was."""
    config = MistralConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128, sliding_window=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    engine = TeacherEngine(model, model_id="mistral", revision="r", tokenizer_hash="")
    assert not engine.packed and model.config._attn_implementation == "sdpa"
    assert_scores_one_sequence_at_a_time(engine, model)


class PositionBlindGPT2Model(GPT2Model):
    """Ignores the ``position_ids`` it is given (numbers positions 0..T-1 along the row), as a model class
    that cannot pack might: packed, its second sequence would sit at the wrong positions."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_whose_packed_forward_differs_falls_back_to_padding(tiny_model_factory):
    model = GPT2LMHeadModel.from_pretrained(tiny_model_factory("gpt2")).eval()
    blind = PositionBlindGPT2Model(model.config)
    blind.load_state_dict(model.transformer.state_dict())
    model.transformer = blind.eval()
    engine = TeacherEngine(model, model_id="blind", revision="r", tokenizer_hash="")
    assert engine.head_on_hidden and not engine.packed
    assert_scores_one_sequence_at_a_time(engine, model)


@pytest.mark.parametrize("options", [{}, {"packing": "off"}], ids=["default", "padded"])
def test_one_long_and_many_one_token_sequences_forward_their_admitted_tokens(tiny_model_dir, options):
    """issue 11, 1: a request of [max_seq_len] + 63 x [1] tokens (575 tokens at 512; here 128 + 63) ran
    64 x max_seq_len tokens through the model, padded to the longest. Its cost is now bounded by the
    tokens admission counts: exactly those when packed, at most (1 + MAX_PADDING) x when padded."""
    engine = TeacherEngine.load(tiny_model_dir, **options)
    counts = tokens_into_model(engine.model)
    request = job([list(range(128))] + [[5]] * 63)
    (signal,) = engine.score([request])
    assert request.tokens == 191 and signal.target_logprob.shape == (127,)
    assert sum(counts) <= (1 + MAX_PADDING if options else 1) * request.tokens
    assert engine.forwarded_tokens == sum(counts)


def test_the_server_reports_the_tokens_it_forwarded(serve_teacher, tiny_teacher_engine):
    server = serve_teacher()

    def forwarded() -> float:
        samples = {s.name: s.value for family in text_string_to_metric_families(server.http("/metrics")[1])
                   for s in family.samples}
        return samples["atkd_teacher_forwarded_tokens"]

    before = forwarded()
    with TeacherClient(server.address) as client:
        client.score([list(range(128))] + [[5]] * 63, top_k=4)
    assert forwarded() - before == 191


def test_length_groups_bound_the_padding():
    lengths = [128] + [1] * 63 + [100, 120, 30, 29, 25, 2]
    groups = length_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        longest = lengths[group[0]]
        assert all(longest - lengths[i] <= MAX_PADDING * lengths[i] for i in group)
    assert [[lengths[i] for i in group] for group in groups] == [[128, 120], [100], [30, 29, 25], [2], [1] * 63]
    padded = sum(len(group) * lengths[group[0]] for group in groups)
    assert padded <= (1 + MAX_PADDING) * sum(lengths)


def test_pack_lays_out_sequences_longest_first_with_restarting_positions():
    lengths = [3, 20, 1, 15, 11, 11]
    token_ids = torch.arange(sum(lengths))
    row = pack(token_ids, lengths, torch.device("cpu"))
    sequences = token_ids.split(lengths)
    in_row = [1, 3, 4, 5, 0, 2]  # longest first, ties in the caller's order
    assert torch.equal(row.input_ids[0], torch.cat([sequences[i] for i in in_row]))
    assert torch.equal(row.position_ids[0], torch.cat([torch.arange(lengths[i]) for i in in_row]))
    assert torch.equal(row.input_ids[0, row.index], token_ids)
    windows = row.segments.windows  # [20, 15] gathered in windows of 20, [11, 11] a view, [3], [1]
    assert [(w.width, w.start, w.n, w.gather is None) for w in windows] == [
        (20, 0, 2, False), (11, 35, 2, True), (3, 57, 1, True), (1, 60, 1, True)]
    assert windows[0].gather.tolist() == list(range(20)) + list(range(20, 40))
    assert windows[0].keep.tolist() == list(range(20)) + list(range(20, 35))
    (window,) = pack(torch.arange(7), [4, 3], torch.device("cpu")).segments.windows  # windows clamped to the row
    assert window.gather.tolist() == [0, 1, 2, 3, 4, 5, 6, 6] and window.keep.tolist() == [0, 1, 2, 3, 4, 5, 6]
