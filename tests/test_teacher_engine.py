"""services/teacher/engine.py and request.py: validated jobs in, compress() of the model's logits out."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from atkd.proto import teacher_pb2 as pb
from atkd.proto.fingerprint import weights_digest
from atkd.proto.signal import compress, concat_signals
from atkd.services.teacher.engine import TeacherEngine, resolve_device, resolve_dtype
from atkd.services.teacher.errors import InvalidArgument
from atkd.services.teacher.request import Limits, parse_request

LIMITS = Limits(vocab_size=512, max_seq_len=128, max_batch_tokens=1024, max_top_k=64, max_tail_samples=8)


def job(sequences, top_k=8, **fields):
    request = pb.ScoreRequest(token_ids=[t for s in sequences for t in s], lengths=[len(s) for s in sequences],
                              top_k=top_k, **fields)
    return parse_request(request, LIMITS)[0]


def local_signal(model, sequence, k, **options):
    """compress() of the model's own logits for one sequence, positions 0 .. L-2."""
    with torch.inference_mode():
        ids = torch.tensor([sequence])
        return compress(model(ids).logits[0, :-1], ids[0, 1:], k, **options)


def assert_signals_close(got, want, atol=1e-5):
    for name in ("target_logprob", "topk_logprobs", "tail_logprob", "uncertainty", "entropy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=atol, rtol=1e-5, msg=name)
    assert torch.equal(got.topk_ids, want.topk_ids)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_engine_equals_compress_of_model_logits(tiny_model_factory, family):
    directory = tiny_model_factory(family)
    engine = TeacherEngine.load(directory, chunk_size=5)  # several chunks per job
    assert engine.head_on_hidden  # the head applied to the hidden states reproduces the logits
    assert (engine.dtype, engine.device.type, engine.vocab_size, engine.max_seq_len) == (torch.float32, "cpu", 512, 128)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    sequences = [list(range(3, 23)), list(range(100, 111)), [7, 8, 9]]
    jobs = [job(sequences[:2]), job(sequences[2:], top_k=4)]
    first, second = engine.score(jobs)
    assert first.target_logprob.shape == (19 + 10,) and second.topk_ids.shape == (2, 4)
    assert_signals_close(first, _cat(local_signal(model, sequences[0], 8), local_signal(model, sequences[1], 8)))
    assert_signals_close(second, local_signal(model, sequences[2], 4))


def test_only_masked_positions_are_scored_and_padding_changes_nothing(tiny_model_dir):
    engine = TeacherEngine.load(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sequence = list(range(10, 30))
    mask = [t >= 12 for t in range(20)]  # a 12-token prompt is not scored
    masked = job([sequence], score_mask=mask)
    assert masked.cols.tolist() == list(range(12, 19))
    assert masked.targets.tolist() == sequence[13:]
    # batched with a longer sequence, so this one is padded on the right
    signal, _ = engine.score([masked, job([list(range(200, 260))])])
    assert_signals_close(signal, local_signal(model, sequence, 8).select(torch.arange(12, 19)))


def test_tail_samples_are_reproducible_with_a_seed(tiny_model_dir):
    engine = TeacherEngine.load(tiny_model_dir)
    seeded = job([list(range(40))], tail_samples=4, seed=7)
    a, b = engine.score([seeded, seeded])
    assert torch.equal(a.tail_sample_ids, b.tail_sample_ids) and a.tail_sample_ids.shape == (39, 4)
    outside = (a.tail_sample_ids.unsqueeze(2) != a.topk_ids.unsqueeze(1)).all(2)
    assert outside.all()


def test_a_job_without_scored_positions_gets_an_empty_signal(tiny_model_dir):
    engine = TeacherEngine.load(tiny_model_dir)
    (signal,) = engine.score([job([[5]], tail_samples=2)])
    assert signal.target_logprob.shape == (0,) and signal.topk_ids.shape == (0, 8)
    assert signal.tail_sample_ids.shape == (0, 2)


class SoftCappedLlama(LlamaForCausalLM):
    """Post-processes its logits (like Gemma 2): the head alone no longer gives them."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = 5.0 * torch.tanh(output.logits / 5.0)
        return output


def test_engine_falls_back_to_full_logits_when_the_head_cannot_be_split(tiny_model_dir):
    model = SoftCappedLlama.from_pretrained(tiny_model_dir).eval()
    engine = TeacherEngine(model, model_id="capped", revision="r", tokenizer_hash="")
    assert not engine.head_on_hidden
    sequence = list(range(30, 50))
    (signal,) = engine.score([job([sequence])])
    assert_signals_close(signal, local_signal(model, sequence, 8))


def test_revision_hashes_the_weights_and_devices_resolve(tiny_model_factory):
    llama, gpt2 = tiny_model_factory("llama"), tiny_model_factory("gpt2")
    assert weights_digest(llama) == weights_digest(llama) != weights_digest(gpt2)
    assert TeacherEngine.load(llama, revision="v1", model_id="teacher").revision == "v1"
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        TeacherEngine.load(llama, max_seq_len=129)


@pytest.mark.parametrize("fields, message", [
    (dict(token_ids=[1, 512], lengths=[2]), r"token_ids\[1\] = 512 is outside the vocabulary \[0, 512\)"),
    (dict(token_ids=[1, -3], lengths=[2]), r"token_ids\[1\] = -3"),
    (dict(token_ids=[1, 2], lengths=[2, 0]), r"lengths\[1\] = 0: sequences must not be empty"),
    (dict(token_ids=[1, 2], lengths=[]), "lengths is empty"),
    (dict(token_ids=[1, 2, 3], lengths=[2]), "lengths sum to 2 but token_ids holds 3"),
    (dict(token_ids=[1] * 129, lengths=[129]), r"lengths\[0\] = 129 is longer than .* 128"),
    (dict(token_ids=[1] * 1100, lengths=[100] * 11), "more than max_batch_tokens = 1024"),
    (dict(top_k=65), r"top_k = 65 must be in \[1, 64\]"),
    (dict(top_k=0), r"top_k = 0 must be in \[1, 64\]"),
    (dict(codec=9), "codec: unknown codec value 9"),
    (dict(temperature=-1.0), "temperature = -1.0 must be"),
    (dict(temperature=float("nan")), "temperature = nan must be"),
    (dict(tail_samples=9), "tail_samples = 9 is above this teacher's maximum 8"),
    (dict(score_mask=[True]), "score_mask has 1 flags for 2 token_ids"),
])  # fmt: skip
def test_invalid_requests_name_the_field(fields, message):
    request = pb.ScoreRequest(**{"token_ids": [1, 2], "lengths": [2], "top_k": 4, **fields})
    with pytest.raises(InvalidArgument, match=message):
        parse_request(request, LIMITS)


def _cat(a, b):
    return type(a)(**{name: torch.cat([getattr(a, name), getattr(b, name)]) for name in (
        "target_logprob", "topk_ids", "topk_logprobs", "tail_logprob", "uncertainty", "entropy")})


def test_a_job_split_between_sequences_scores_as_the_whole(tiny_model_dir):
    """The scheduler may compute a request's sequences in several batches: the parts' signals, back to
    back, are the whole job's signal, tail samples of a seeded request included."""
    engine = TeacherEngine.load(tiny_model_dir)
    whole = job([list(range(1, 30)), list(range(40, 50)), list(range(60, 81))], tail_samples=4, seed=7)
    assert whole.prefix_tokens(38) == 29 and whole.prefix_tokens(28) == 0 and whole.prefix_tokens(100) == 60
    first, rest = whole.split(39)
    assert (first.lengths, rest.lengths) == ((29, 10), (21,)) and first.tokens + rest.tokens == whole.tokens
    (expected,) = engine.score([whole])
    got = concat_signals([engine.score([first])[0], *engine.score([rest, job([[5, 6, 7]])])[:1]])
    assert torch.equal(got.tail_sample_ids, expected.tail_sample_ids)
    assert torch.equal(got.topk_ids, expected.topk_ids)
    torch.testing.assert_close(got.target_logprob, expected.target_logprob, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot split"):
        whole.split(30)
