"""Tail-term estimators of the compressed signal: each is unbiased, in value and in gradient.

For every estimator of :data:`atkd.proto.signal.TAIL_ESTIMATORS` (with and without the adaptive budget,
with and without the student-side control variate), R independent signals of the same n positions are
drawn in one compress() call (the positions repeated R times). The per-position DKD term of ATKD and
its gradient w.r.t. the student logits are computed from each draw; their mean over the R draws must
equal the dense value within Monte-Carlo error: |mean - dense| <= Z * s.e. + 1e-9, s.e. = the sample
standard deviation over the draws / sqrt(R). Z = 5 for the n = 5 values and 5.5 for the n * V = 160
gradient entries (a correct estimator fails such a check with probability below 1e-5 per test).
The generators are seeded, so the outcome is fixed.
"""

from __future__ import annotations

import pytest
import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto.codec import decode_signal, encode_signal, message_payload_bytes, payload_bytes
from atkd.proto.signal import TAIL_ESTIMATORS, adaptive_counts, compress, priority_weights
from atkd.services.teacher.engine import TeacherEngine
from atkd.services.teacher.errors import InvalidArgument
from atkd.services.teacher.request import Limits, parse_request
from atkd.student.losses import atkd_loss, forward_kl
from atkd.student.losses.atkd import target_and_diversity
from atkd.student.losses.buckets import dense_buckets, signal_buckets, student_buckets_for_signal
from atkd.student.losses.divergences import ForwardKL, ReverseKL, get_divergence

VOCAB, K, M, DRAWS = 32, 6, 4, 3000
Z_VALUE, Z_GRAD = 5.0, 5.5


def _setup(seed: int = 0):
    """Teacher and student logits [5, V] (float64), flat to peaked, and targets [5]. Every tail token keeps a
    tail probability the R draws can resolve (a token never drawn would make the s.e. of its gradient look 0)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.5, 1.5, 1.2, 1.0, 0.8], dtype=torch.float64).unsqueeze(1)
    teacher = torch.randn(5, VOCAB, generator=gen, dtype=torch.float64) * scales
    student = teacher + 0.7 * torch.randn(5, VOCAB, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (5,), generator=gen)
    targets[1] = teacher[1].argmax()  # a confident position whose target is the top-1
    return teacher, student, targets


def _per_draw_dkd(teacher, student, targets, *, estimator, adaptive, control_variate, divergence="forward",
                  ids_only=False):
    """DKD per draw and position [R, 5] and its gradient w.r.t. the student logits [R, 5, V]; dense [5], [5, V]."""
    n = teacher.shape[0]
    gen = torch.Generator().manual_seed(1)
    signal = compress(teacher.repeat(DRAWS, 1), targets.repeat(DRAWS), K,
                      tail_samples=M, generator=gen, tail_estimator=estimator, adaptive_tail=adaptive,
                      tail_ids_only=ids_only)
    divergence = get_divergence(divergence)
    logits = student.repeat(DRAWS, 1).requires_grad_()
    reps = targets.repeat(DRAWS)
    t = signal_buckets(signal, reps, torch.float64).normalise()
    s = student_buckets_for_signal(logits, signal, reps).normalise()
    _, dkd = target_and_diversity(divergence, t, s, tail_control_variate=control_variate)
    (grad,) = torch.autograd.grad(dkd.sum(), logits)

    dense_logits = student.clone().requires_grad_()
    _, dense = target_and_diversity(divergence, dense_buckets(teacher, targets).normalise(),
                                    dense_buckets(dense_logits, targets).normalise())
    (dense_grad,) = torch.autograd.grad(dense.sum(), dense_logits)
    return dkd.detach().reshape(DRAWS, n), grad.reshape(DRAWS, n, VOCAB), dense.detach(), dense_grad


def _assert_unbiased(draws: torch.Tensor, dense: torch.Tensor, z: float) -> torch.Tensor:
    """Check |mean - dense| <= z s.e. + 1e-9 elementwise; returns the s.e."""
    mean, stderr = draws.mean(0), draws.std(0) / DRAWS**0.5
    excess = (mean - dense).abs() - (z * stderr + 1e-9)
    assert (excess <= 0).all(), f"bias beyond {z} s.e.: worst {excess.max().item():.3g} (mean {mean}, dense {dense})"
    return stderr


CASES = [(name, False, False) for name in TAIL_ESTIMATORS]
CASES += [(name, True, False) for name in TAIL_ESTIMATORS if name != "rskd"]
CASES += [("systematic", False, True), ("priority", False, True), ("rskd", False, True)]


@pytest.mark.parametrize(("estimator", "adaptive", "control_variate"), CASES)
def test_tail_estimate_is_unbiased_in_value_and_gradient(estimator, adaptive, control_variate):
    teacher, student, targets = _setup()
    dkd, grad, dense, dense_grad = _per_draw_dkd(teacher, student, targets, estimator=estimator,
                                                 adaptive=adaptive, control_variate=control_variate)
    stderr = _assert_unbiased(dkd, dense, Z_VALUE)
    _assert_unbiased(grad, dense_grad, Z_GRAD)
    assert stderr.max() > 0  # the tail is really sampled: a deterministic value would make the check empty


IDS_ONLY_CASES = [("systematic", False), ("systematic", True), ("iid", False), ("gumbel", False), ("rskd", False)]


@pytest.mark.parametrize(("estimator", "adaptive"), IDS_ONLY_CASES)
def test_ids_only_samples_keep_the_estimate_unbiased_and_each_draws_gradient(estimator, adaptive):
    """tail_ids_only: the same draws (same ids and weights) with the tail's mean log p in place of each sample's.
    Forward-KL DKD stays unbiased, and every draw's gradient equals the one with the exact log-probs (it never
    depended on them), so the student learns exactly what it would from the full samples, for half the bytes."""
    teacher, student, targets = _setup()
    options = dict(estimator=estimator, adaptive=adaptive, control_variate=False)
    dkd, grad, dense, _ = _per_draw_dkd(teacher, student, targets, ids_only=True, **options)
    _, exact_grad, _, _ = _per_draw_dkd(teacher, student, targets, **options)
    assert _assert_unbiased(dkd, dense, Z_VALUE).max() > 0
    torch.testing.assert_close(grad, exact_grad, rtol=0, atol=1e-12)


def test_ids_only_samples_carry_the_exact_tail_mean_and_other_divergences_refuse_them():
    teacher, student, targets = _setup()
    signal = compress(teacher, targets, K, tail_samples=M, tail_ids_only=True,
                      generator=torch.Generator().manual_seed(0))
    log_p = teacher.log_softmax(-1)
    outside = torch.ones_like(log_p, dtype=torch.bool).scatter(1, signal.topk_ids, False).scatter(
        1, targets.unsqueeze(1), False)
    within = torch.where(outside, log_p, float("-inf")).softmax(-1)  # p_i / P_tail on the tail
    expected = (within * torch.where(outside, log_p, 0.0)).sum(-1)
    torch.testing.assert_close(signal.tail_mean_logprob, expected)
    assert torch.equal(signal.tail_sample_logprobs, signal.tail_mean_logprob.unsqueeze(1).expand(-1, M))
    args = (student.unsqueeze(0), signal.map_tensors(lambda t: t.unsqueeze(0)), targets.unsqueeze(0))
    assert torch.isfinite(atkd_loss(*args).loss) and torch.isfinite(forward_kl(*args).loss)
    for kwargs in (dict(base="reverse"), dict(base="jsd"), dict(tail_control_variate=True)):
        with pytest.raises(ValueError, match="tail_ids_only"):
            atkd_loss(*args, **kwargs)
    with pytest.raises(ValueError, match="priority"):
        compress(teacher, targets, K, tail_samples=M, tail_estimator="priority", tail_ids_only=True)


@pytest.mark.parametrize("codec", ["fp16", "q8"])
@pytest.mark.parametrize(("estimator", "adaptive"), IDS_ONLY_CASES)
def test_ids_only_samples_survive_the_codec_at_two_bytes_a_sample(codec, estimator, adaptive):
    teacher, _, targets = _setup()
    options = dict(tail_samples=M, tail_estimator=estimator, adaptive_tail=adaptive)
    k = 0 if estimator == "rskd" else K
    full = compress(teacher.float(), targets, k, generator=torch.Generator().manual_seed(5), **options)
    signal = compress(teacher.float(), targets, k, generator=torch.Generator().manual_seed(5), tail_ids_only=True,
                      **options)
    message = encode_signal(signal, codec, VOCAB)
    decoded = decode_signal(pb.Signal.FromString(message.SerializeToString()))
    assert torch.equal(decoded.tail_sample_ids, signal.tail_sample_ids[:, :decoded.num_tail_samples])
    tolerance = dict(rtol=1e-3, atol=1e-3) if codec == "q8" else dict(rtol=0, atol=0)
    torch.testing.assert_close(decoded.tail_mean_logprob, signal.tail_mean_logprob, **tolerance)
    assert torch.equal(decoded.tail_sample_logprobs,
                       decoded.tail_mean_logprob.unsqueeze(1).expand_as(decoded.tail_sample_ids))
    if signal.sample_weights() is not None:
        torch.testing.assert_close(decoded.sample_weights(), signal.sample_weights()[:, :decoded.num_tail_samples],
                                   rtol=2e-2, atol=1e-3)
    # the samples' log-probs are not sent: 2 bytes a sample less, one mean a position more
    counts = signal.tail_sample_counts  # ragged (adaptive, RS-KD): only the used samples travel
    samples = signal.tail_sample_ids.numel() if counts is None else int(counts.sum())
    mean_bytes = (4 if codec == "fp16" else 2) * teacher.shape[0]
    with_logprobs = encode_signal(full, codec, VOCAB).tail_samples
    sent = message_payload_bytes(message.tail_samples)
    assert sent == message_payload_bytes(with_logprobs) - 2 * samples + mean_bytes


def test_control_variate_is_unbiased_for_reverse_kl_and_cuts_noise_near_the_teacher():
    teacher, _, targets = _setup()
    near = teacher + 0.05 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plain, *_ = _per_draw_dkd(teacher, near, targets, estimator="systematic", adaptive=False, control_variate=False,
                              divergence="reverse")
    with_cv, _, dense, _ = _per_draw_dkd(teacher, near, targets, estimator="systematic", adaptive=False,
                                         control_variate=True, divergence="reverse")
    _assert_unbiased(with_cv, dense, Z_VALUE)
    assert (with_cv.std(0) < 0.2 * plain.std(0) + 1e-12).all()


def test_control_variate_slopes():
    assert ForwardKL().control_variate_slope() == pytest.approx(1.0, abs=1e-6)
    assert ReverseKL().control_variate_slope() == pytest.approx(-1.0, abs=1e-6)
    assert get_divergence("tvd").control_variate_slope() == 0.0


def test_adaptive_budget_keeps_the_mean_and_follows_the_tail_mass():
    share = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.2, 0.3])
    counts = adaptive_counts(share, 8, torch.full((6,), 1000))
    assert counts.sum().item() == 8 * 6 and counts.min().item() >= 1
    assert torch.equal(counts.argsort(stable=True), share.argsort(stable=True))
    teacher, _, targets = _setup()
    signal = compress(teacher, targets, K, tail_samples=M, generator=torch.Generator().manual_seed(0),
                      adaptive_tail=True)
    assert signal.tail_sample_counts.sum().item() == M * teacher.shape[0]
    assert signal.tail_sample_ids.shape[1] == signal.tail_sample_counts.max().item()


@pytest.mark.parametrize("estimator", ["iid", "priority", "gumbel", "rskd"])
def test_samples_lie_in_the_tail_and_do_not_depend_on_batching(estimator):
    teacher, _, targets = _setup()
    offsets = torch.rand(5, generator=torch.Generator().manual_seed(4))
    whole = compress(teacher, targets, K, tail_samples=M, tail_offsets=offsets, tail_estimator=estimator)
    chunked = compress(teacher, targets, K, tail_samples=M, tail_offsets=offsets, tail_estimator=estimator,
                       chunk_size=2)
    width = min(whole.tail_sample_ids.shape[1], chunked.tail_sample_ids.shape[1])
    used = (whole.tail_sample_weights if whole.tail_sample_weights is not None
            else torch.ones_like(whole.tail_sample_logprobs))[:, :width] > 0
    assert torch.equal(whole.tail_sample_ids[:, :width][used], chunked.tail_sample_ids[:, :width][used])
    ids = whole.tail_sample_ids.masked_fill(~used, -1)
    excluded = torch.cat([whole.topk_ids, targets.unsqueeze(1)], dim=1)
    assert not (ids.unsqueeze(2) == excluded.unsqueeze(1)).any()


def test_without_replacement_draws_are_distinct():
    teacher, _, targets = _setup()
    for estimator in ("priority", "gumbel"):
        signal = compress(teacher, targets, K, tail_samples=8, generator=torch.Generator().manual_seed(2),
                          tail_estimator=estimator)
        for row in signal.tail_sample_ids:
            assert len(set(row.tolist())) == row.numel()


def test_losses_take_the_weights_and_the_control_variate():
    """atkd_loss and forward_kl on a weighted signal: finite, and the control variate changes the value."""
    teacher, student, targets = _setup()
    signal = compress(teacher.unsqueeze(0), targets.unsqueeze(0), K, tail_samples=M, tail_estimator="priority",
                      generator=torch.Generator().manual_seed(0))
    for loss in (atkd_loss, forward_kl):
        plain = loss(student.unsqueeze(0), signal, targets.unsqueeze(0)).loss
        with_cv = loss(student.unsqueeze(0), signal, targets.unsqueeze(0), tail_control_variate=True).loss
        assert torch.isfinite(plain) and torch.isfinite(with_cv) and plain != with_cv


def test_bad_estimator_options_are_refused():
    teacher, _, targets = _setup()
    with pytest.raises(ValueError, match="tail_estimator"):
        compress(teacher, targets, K, tail_samples=M, tail_estimator="bogus")
    with pytest.raises(ValueError, match="adaptive_tail"):
        compress(teacher, targets, K, tail_samples=M, tail_estimator="rskd", adaptive_tail=True)


@pytest.mark.parametrize("codec", ["fp16", "q8"])
@pytest.mark.parametrize(("estimator", "adaptive"), [("priority", False), ("priority", True), ("gumbel", False),
                                                     ("rskd", False), ("systematic", True)])
def test_estimator_fields_survive_the_codec(codec, estimator, adaptive):
    """Weights, counts and the priority threshold travel; the decoded weights are the sent ones (fp16 error)."""
    teacher, _, targets = _setup()
    signal = compress(teacher.float(), targets, 0 if estimator == "rskd" else K, tail_samples=M,
                      tail_estimator=estimator, adaptive_tail=adaptive, generator=torch.Generator().manual_seed(5))
    message = encode_signal(signal, codec, VOCAB)
    decoded = decode_signal(pb.Signal.FromString(message.SerializeToString()))
    width = signal.num_tail_samples
    assert decoded.num_tail_samples == width
    assert torch.equal(decoded.tail_sample_ids, signal.tail_sample_ids)
    torch.testing.assert_close(decoded.sample_weights(), signal.sample_weights().float(), rtol=2e-2, atol=1e-3)
    if signal.tail_sample_counts is not None:
        assert torch.equal(decoded.tail_sample_counts, signal.tail_sample_counts)
        # ragged: only the used samples travel (ids + log-probs + weights when explicit)
        per_sample = 2 + 2 + (2 if message.tail_samples.HasField("weights") else 0)
        assert message.tail_samples.ids.shape == [int(signal.tail_sample_counts.sum())]
        threshold = (4 if codec == "fp16" else 2) if message.tail_samples.HasField("log_threshold") else 0
        per_position = 1 + threshold  # the uint8 count, the log-threshold of priority sampling
        expected = per_sample * int(signal.tail_sample_counts.sum()) + per_position * teacher.shape[0]
        assert message_payload_bytes(message.tail_samples) == expected


def test_requests_choose_the_estimator_and_bad_combinations_are_refused():
    limits = Limits(vocab_size=512, max_seq_len=128, max_batch_tokens=1024, max_top_k=64, max_tail_samples=8)

    def parse(**fields):
        request = pb.ScoreRequest(token_ids=list(range(10)), lengths=[10], **fields)
        return parse_request(request, limits)[0]

    job = parse(top_k=8, tail_samples=4, tail_estimator=pb.TAIL_PRIORITY, adaptive_tail=True, seed=3)
    assert (job.tail_estimator, job.adaptive_tail, job.tail_ids_only) == ("priority", True, False)
    assert parse(top_k=8, tail_samples=4, tail_ids_only=True).tail_ids_only
    assert parse(top_k=0, tail_samples=8, tail_estimator=pb.TAIL_RSKD).top_k == 0
    for fields, message in [(dict(top_k=0, tail_samples=4), "top_k"),
                            (dict(top_k=8, tail_estimator=pb.TAIL_RSKD), "TAIL_RSKD"),
                            (dict(top_k=8, tail_samples=4, tail_estimator=pb.TAIL_RSKD, adaptive_tail=True),
                             "adaptive_tail"),
                            (dict(top_k=8, adaptive_tail=True), "adaptive_tail"),
                            (dict(top_k=8, tail_samples=4, tail_estimator=17), "tail_estimator"),
                            (dict(top_k=8, tail_samples=4, tail_estimator=pb.TAIL_PRIORITY, tail_ids_only=True),
                             "tail_ids_only"),
                            (dict(top_k=8, tail_ids_only=True), "tail_ids_only")]:
        with pytest.raises(InvalidArgument, match=message):
            parse(**fields)


def test_engine_draws_with_the_requested_estimator(tiny_model_dir):
    """A real engine on a tiny model: seeded priority samples are reproducible and carry their threshold."""
    engine = TeacherEngine.load(tiny_model_dir, chunk_size=7)
    limits = Limits(vocab_size=512, max_seq_len=128, max_batch_tokens=1024, max_top_k=64, max_tail_samples=8)
    request = pb.ScoreRequest(token_ids=list(range(30)), lengths=[30], top_k=8, tail_samples=4, seed=11,
                              tail_estimator=pb.TAIL_PRIORITY)
    job = parse_request(request, limits)[0]
    a, b = engine.score([job, job])
    assert torch.equal(a.tail_sample_ids, b.tail_sample_ids) and a.tail_log_threshold.shape == (29,)
    expected = priority_weights(a.tail_sample_logprobs, a.tail_logprob, a.tail_log_threshold)
    torch.testing.assert_close(a.tail_sample_weights, expected)
    ids_only = parse_request(pb.ScoreRequest(token_ids=list(range(30)), lengths=[30], top_k=8, tail_samples=4,
                                             seed=11, tail_ids_only=True), limits)[0]
    plain = parse_request(pb.ScoreRequest(token_ids=list(range(30)), lengths=[30], top_k=8, tail_samples=4,
                                          seed=11), limits)[0]
    c, d = engine.score([ids_only, plain])
    assert torch.equal(c.tail_sample_ids, d.tail_sample_ids) and c.tail_mean_logprob.shape == (29,)
    assert d.tail_mean_logprob is None
    message = encode_signal(c, "q8", 512)
    assert message_payload_bytes(message) == 29 * payload_bytes("q8", 8, 512, 4, tail_ids_only=True)


@pytest.mark.parametrize("estimator", ["priority", "gumbel"])
def test_a_tail_smaller_than_m_is_sent_whole_and_exact(estimator):
    """V = 10, k = 4: a tail of 5 tokens (or 6 past an ignored target) with m = 8 is taken whole, with weights
    p_j / P_tail (the exact tail mean); the placeholders travel as padding and weigh 0 after the codec."""
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.tensor([9, 0, -100])
    signal = compress(logits, targets, 4, tail_samples=8, tail_estimator=estimator,
                      generator=torch.Generator().manual_seed(1))
    assert signal.tail_sample_counts.tolist() == [5 if t >= 0 and t not in top else 6 for t, top in
                                                 zip(targets.tolist(), signal.topk_ids.tolist(), strict=True)]
    exact = (signal.tail_sample_logprobs - signal.tail_logprob.unsqueeze(1)).exp()
    used = signal.sample_weights() > 0
    torch.testing.assert_close(signal.sample_weights()[used], exact[used])
    decoded = decode_signal(pb.Signal.FromString(encode_signal(signal, "fp16", 10).SerializeToString()))
    assert torch.isfinite(decoded.sample_weights()).all()
    width = decoded.num_tail_samples  # the widest count: the padding past it is not sent
    assert width == int(signal.tail_sample_counts.max()) and not signal.sample_weights()[:, width:].any()
    torch.testing.assert_close(decoded.sample_weights(), signal.sample_weights()[:, :width].float(),
                               rtol=2e-3, atol=1e-4)
