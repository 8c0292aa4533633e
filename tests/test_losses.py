"""The loss library against ATKD.md §8 and an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from atkd.proto.signal import compress
from atkd.student.losses import LOSSES, ForwardKL, LossResult, ReverseKL, atkd_loss, forward_kl, split_hard
from atkd.student.losses.atkd import target_and_diversity
from atkd.student.losses.buckets import dense_buckets
from tests.reference_losses import reference_atkd, reference_divergence, tkd_dkd

BASELINES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "dkd", "sft"]


def make_batch(seed=0, b=3, t=7, v=13, teacher_scale=3.0, dtype=torch.float64, prompt=2, pad=2):
    """Random logits with prompt positions (leading -100) and padding (trailing -100)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=dtype)
    teacher = teacher_scale * torch.randn(b, t, v, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[:, :prompt] = -100
    targets[-1, t - pad:] = -100
    return student, teacher, targets


# 1. Identity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher_scale", [1.0, 4.0, 20.0])
def test_forward_and_reverse_identities_per_token(teacher_scale):
    student, teacher, targets = make_batch(teacher_scale=teacher_scale)
    valid = targets != -100
    s, t, y = student[valid], teacher[valid], targets[valid]
    p_dist = dense_buckets(t, y).normalise()
    q_dist = dense_buckets(s, y).normalise()
    tkd, dkd = target_and_diversity(ForwardKL(), p_dist, q_dist)
    log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
    full_forward = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(tkd + p_dist.uncertainty * dkd, full_forward, rtol=0, atol=1e-10)

    rtkd, rdkd = target_and_diversity(ReverseKL(), p_dist, q_dist)
    full_reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
    torch.testing.assert_close(rtkd + q_dist.uncertainty * rdkd, full_reverse, rtol=0, atol=1e-10)


def test_dkd_stays_accurate_for_a_confident_teacher_in_fp32():
    """UnC ~ 1e-9: DKD must come from the masked non-target logits, not from KL - TKD (ATKD.md §6)."""
    v = 50
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(1, v, generator=g, dtype=torch.float64)
    teacher[0, 3] = 30.0  # p_g ~ 1 - 1e-12
    student = torch.randn(1, v, generator=g, dtype=torch.float64)
    y = torch.tensor([3])
    _, expected_dkd, unc = tkd_dkd(torch.softmax(teacher[0], 0), torch.softmax(student[0], 0), 3)
    assert unc < 1e-9
    p32 = dense_buckets(teacher.float(), y).normalise()
    q32 = dense_buckets(student.float(), y).normalise()
    _, dkd32 = target_and_diversity(ForwardKL(), p32, q32)
    assert float(dkd32) == pytest.approx(expected_dkd, rel=1e-4)
    assert float(p32.uncertainty) == pytest.approx(unc, rel=1e-4)


# 2. Split disabled + coupled DKD = (1 - lambda) * FKL ------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.2, 0.7])
def test_atkd_without_split_and_with_coupled_dkd_is_scaled_forward_kl(lam):
    student, teacher, targets = make_batch()
    atkd = atkd_loss(student, teacher, targets, lam=lam, split="none", decouple=False).loss
    assert float(atkd) == pytest.approx((1 - lam) * float(forward_kl(student, teacher, targets).loss), abs=1e-12)


# 3. Padding invariance ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name", ["atkd", *BASELINES])
def test_appending_ignored_positions_changes_neither_loss_nor_gradient(loss_name):
    student, teacher, targets = make_batch()
    extra = 5
    g = torch.Generator().manual_seed(9)
    padded_student = torch.cat([student, torch.randn(3, extra, 13, generator=g, dtype=torch.float64)], 1)
    padded_teacher = torch.cat([teacher, torch.randn(3, extra, 13, generator=g, dtype=torch.float64)], 1)
    padded_targets = torch.cat([targets, torch.full((3, extra), -100)], 1)
    fn = LOSSES[loss_name]
    a = student.clone().requires_grad_()
    b = padded_student.clone().requires_grad_()
    loss_a = fn(a, teacher, targets).loss
    loss_b = fn(b, padded_teacher, padded_targets).loss
    loss_a.backward()
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-12)
    torch.testing.assert_close(b.grad[:, :7], a.grad, rtol=0, atol=1e-12)
    assert torch.count_nonzero(b.grad[:, 7:]) == 0


# 4. gradcheck ------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["forward", "reverse", "jsd", "skew_forward", "skew_reverse"])
@pytest.mark.parametrize("split", ["median", "topk"])
def test_atkd_gradcheck(base, split):
    student, teacher, targets = make_batch(b=2, t=4, v=5, prompt=1, pad=1)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: atkd_loss(s, teacher, targets, split=split, base=base, chunk_size=2).loss, (student,))


@pytest.mark.parametrize("loss_name", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "dkd", "sft"])
def test_baseline_gradcheck_on_dense_and_on_signal(loss_name):
    student, teacher, targets = make_batch(b=2, t=4, v=6, prompt=1, pad=1)
    student.requires_grad_()
    signal = compress(teacher, targets, k=3)
    fn = LOSSES[loss_name]
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher, targets, chunk_size=3).loss, (student,))
    assert torch.autograd.gradcheck(lambda s: fn(s, signal, targets, chunk_size=3).loss, (student,))


# 5. Group sizes ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "easy", "hard"), [(4, 1, 3), (10, 4, 6), (101, 50, 51), (1, 0, 1)])
def test_median_rule_group_sizes(n, easy, hard):
    unc = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    mask = split_hard(unc, "median")
    assert int((~mask).sum()) == easy and int(mask.sum()) == hard
    assert int(mask.sum()) == n - int((unc < unc.median()).sum())


def test_median_rule_sends_ties_to_hard_and_topk_takes_the_largest():
    unc = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.9])
    assert split_hard(unc, "median").tolist() == [False, True, True, True, True]
    unc = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5])
    assert split_hard(unc, "topk", 0.4).tolist() == [False, True, False, True, False]
    assert split_hard(unc, "topk", 0.5).tolist() == [False, True, False, True, True]


def test_atkd_reports_group_sizes_and_means():
    student, teacher, targets = make_batch()
    n_valid = int((targets != -100).sum())
    diag = atkd_loss(student, teacher, targets).stats
    assert diag["n_easy"] + diag["n_hard"] == n_valid
    assert diag["n_hard"] >= diag["n_easy"]
    assert 0.0 < diag["mean_uncertainty"] < 1.0


@pytest.mark.parametrize("loss_name", ["atkd", *BASELINES])
def test_every_loss_returns_a_loss_result_with_detached_0_dim_stats(loss_name):
    student, teacher, targets = make_batch()
    result = LOSSES[loss_name](student.clone().requires_grad_(), teacher, targets)
    assert isinstance(result, LossResult) and result.loss.dim() == 0 and result.loss.requires_grad
    assert all(value.dim() == 0 and not value.requires_grad for value in result.stats.values())
    expected = {"mean_uncertainty", "n_easy", "n_hard", "tkd_hard", "dkd_easy", "dkd_hard", "loss_easy", "loss_hard"}
    assert result.stats.keys() == (expected if loss_name == "atkd" else set())


@pytest.mark.parametrize("teacher_kind", ["dense", "signal"])
def test_atkd_stats_are_the_group_means_of_tkd_and_dkd_whatever_the_chunking(teacher_kind):
    student, teacher, targets = make_batch(seed=2, b=4, t=9, v=17)
    valid = targets != -100
    s, t, y = student[valid], teacher[valid], targets[valid]
    p_dist, q_dist = dense_buckets(t, y).normalise(), dense_buckets(s, y).normalise()
    tkd, dkd = target_and_diversity(ForwardKL(), p_dist, q_dist)
    hard = split_hard(p_dist.uncertainty, "median")
    expected = {"mean_uncertainty": p_dist.uncertainty.mean(), "n_easy": (~hard).sum(), "n_hard": hard.sum(),
                "tkd_hard": tkd[hard].mean(), "dkd_easy": dkd[~hard].mean(), "dkd_hard": dkd[hard].mean()}
    expected["loss_easy"], expected["loss_hard"] = expected["dkd_easy"], expected["tkd_hard"] + expected["dkd_hard"]
    teacher_input = teacher if teacher_kind == "dense" else compress(teacher, targets, k=17)
    for chunk_size in (1, 5, None):
        stats = atkd_loss(student, teacher_input, targets, chunk_size=chunk_size).stats
        for name, value in expected.items():
            torch.testing.assert_close(stats[name], value, rtol=1e-9, atol=1e-12, check_dtype=False, msg=name)
        assert stats["n_hard"].dtype == torch.int64


@pytest.mark.parametrize("split", ["median", "topk", "none"])
@pytest.mark.parametrize("teacher_kind", ["dense", "signal"])
def test_atkd_loss_never_copies_a_value_to_the_host(monkeypatch, split, teacher_kind):
    """No ``.item()`` / ``float()`` / ``int()`` anywhere in the loss (on a GPU each is a sync per call)."""
    student, teacher, targets = make_batch(seed=3)
    teacher_input = teacher if teacher_kind == "dense" else compress(teacher, targets, k=5, tail_samples=2)

    def refuse(*args):
        raise AssertionError("the loss read a tensor value on the host")

    for name in ("item", "tolist", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    result = atkd_loss(student.clone().requires_grad_(), teacher_input, targets, split=split, chunk_size=4)
    monkeypatch.undo()
    assert math.isfinite(result.loss.item()) and result.stats["n_hard"].item() > 0


# 6. Parity with the slow reference -------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("split", ["median", "topk"])
@pytest.mark.parametrize("base", ["forward", "reverse"])
@pytest.mark.parametrize("teacher", ["dense", "signal_k_eq_v"])
def test_atkd_matches_reference(seed, split, base, teacher):
    student, teacher_logits, targets = make_batch(seed=seed, b=4, t=9, v=17)
    teacher_input = teacher_logits if teacher == "dense" else compress(teacher_logits, targets, k=17)
    for lam, fraction in [(0.2, 0.5), (0.5, 0.3)]:
        got = atkd_loss(student, teacher_input, targets, lam=lam, split=split, hard_fraction=fraction,
                        base=base, chunk_size=5).loss
        expected = reference_atkd(student, teacher_logits, targets, lam=lam, split=split,
                                  hard_fraction=fraction, base=base)
        assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("loss_name", BASELINES)
def test_baselines_match_reference(loss_name):
    student, teacher, targets = make_batch(seed=3, b=4, t=9, v=17)
    got = LOSSES[loss_name](student, teacher, targets, chunk_size=4).loss
    assert float(got) == pytest.approx(reference_divergence(student, teacher, targets, loss_name), rel=1e-9)


# 7. Sparse signal ---------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name", ["atkd", *BASELINES])
def test_signal_with_k_equal_vocab_equals_dense_loss_and_gradient(loss_name):
    student, teacher, targets = make_batch(seed=4)
    fn = LOSSES[loss_name]
    a = student.clone().requires_grad_()
    b = student.clone().requires_grad_()
    fn(a, teacher, targets).loss.backward()
    fn(b, compress(teacher, targets, k=13), targets).loss.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 8, 12])
def test_sparse_dkd_is_a_lower_bound_of_dense_dkd(k):
    student, teacher, targets = make_batch(seed=5, v=13)
    valid = targets != -100
    s, t, y = student[valid], teacher[valid], targets[valid]
    _, dense = target_and_diversity(ForwardKL(), dense_buckets(t, y).normalise(), dense_buckets(s, y).normalise())
    signal = compress(t, y, k=k)
    _, _, sparse_atkd_parts = _sparse_parts(s, signal, y)
    assert torch.all(sparse_atkd_parts <= dense + 1e-12)
    if k < 12:
        assert torch.any(sparse_atkd_parts < dense - 1e-6)


def _sparse_parts(s, signal, y):
    from atkd.student.losses.buckets import signal_buckets, student_buckets_for_signal

    p = signal_buckets(signal, y, s.dtype).normalise()
    q = student_buckets_for_signal(s, signal, y).normalise()
    tkd, dkd = target_and_diversity(ForwardKL(), p, q)
    return p, tkd, dkd


def test_sparse_tkd_and_uncertainty_are_exact():
    student, teacher, targets = make_batch(seed=6, v=13)
    valid = targets != -100
    s, t, y = student[valid], teacher[valid], targets[valid]
    dense_tkd, _ = target_and_diversity(ForwardKL(), dense_buckets(t, y).normalise(), dense_buckets(s, y).normalise())
    p, sparse_tkd, _ = _sparse_parts(s, compress(t, y, k=4), y)
    torch.testing.assert_close(sparse_tkd, dense_tkd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.uncertainty, 1 - torch.softmax(t, -1).gather(1, y[:, None]).squeeze(1))


@pytest.mark.parametrize("loss_name", ["atkd", "forward_kl", "reverse_kl", "tvd"])
def test_tail_samples_estimate_the_dense_loss_without_bias(loss_name):
    """Averaged over many draws, the tail-sampled sparse loss approaches the dense one; the bucketed
    signal with the same k stays biased low (a flat teacher gives a heavy tail)."""
    student, teacher, targets = make_batch(seed=7, b=2, t=6, v=40, teacher_scale=1.0, prompt=0, pad=0)
    fn = LOSSES[loss_name]
    dense = float(fn(student, teacher, targets).loss)
    bucketed = float(fn(student, compress(teacher, targets, k=4), targets).loss)
    gen = torch.Generator().manual_seed(0)
    draws = [float(fn(student, compress(teacher, targets, k=4, tail_samples=8, generator=gen), targets).loss)
             for _ in range(300)]
    mean = sum(draws) / len(draws)
    stderr = (sum((d - mean) ** 2 for d in draws) / (len(draws) - 1) / len(draws)) ** 0.5
    assert abs(mean - dense) < 4 * stderr + 1e-9
    assert abs(bucketed - dense) > 4 * stderr


# Numerics, chunking, edge cases ------------------------------------------------------------------

def test_chunk_size_does_not_change_loss_or_gradient():
    student, teacher, targets = make_batch(seed=8, b=4, t=9, v=17)
    grads = []
    for chunk in (1, 7, None):
        s = student.clone().requires_grad_()
        loss = atkd_loss(s, teacher, targets, chunk_size=chunk).loss
        loss.backward()
        grads.append((loss.item(), s.grad))
    for loss, grad in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-12)
        torch.testing.assert_close(grad, grads[0][1])


def test_fused_gradient_matches_plain_autograd_and_scales_with_the_upstream_gradient():
    student, teacher, targets = make_batch(seed=10)
    s1 = student.clone().requires_grad_()
    (3.0 * forward_kl(s1, teacher, targets).loss).backward()
    s2 = student.clone().requires_grad_()
    valid = targets != -100
    log_p, log_q = teacher.log_softmax(-1), s2.log_softmax(-1)
    (3.0 * (log_p.exp() * (log_p - log_q)).sum(-1)[valid].mean()).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["atkd", "forward_kl", "reverse_kl", "jsd", "tvd"])
def test_half_precision_logits_give_finite_fp32_losses_and_gradients(dtype, loss_name):
    student, teacher, targets = make_batch(seed=11, dtype=torch.float32, v=64, teacher_scale=8.0)
    s = student.to(dtype).requires_grad_()
    loss = LOSSES[loss_name](s, teacher.to(dtype), targets).loss
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()
    reference = LOSSES[loss_name](student.to(dtype).float(), teacher.to(dtype).float(), targets).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("loss_name", ["atkd", *BASELINES])
def test_a_batch_without_valid_tokens_gives_zero_with_a_graph(loss_name):
    student, teacher, _ = make_batch()
    targets = torch.full(student.shape[:-1], -100)
    s = student.clone().requires_grad_()
    loss = LOSSES[loss_name](s, teacher, targets).loss
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(s.grad) == 0


def test_empty_easy_group_is_not_nan():
    student, teacher, targets = make_batch()
    targets = torch.full_like(targets, -100)
    targets[0, 3] = 2  # a single token: the median rule makes it hard, the easy group is empty
    loss = atkd_loss(student, teacher, targets).loss
    assert math.isfinite(float(loss)) and float(loss) > 0


def test_extreme_logit_gaps_stay_finite():
    student, teacher, targets = make_batch(dtype=torch.float32)
    teacher = teacher * 1e4
    student = (student * 1e4).requires_grad_()
    for name in ("atkd", "forward_kl", "reverse_kl", "jsd"):
        loss = LOSSES[name](student, teacher, targets).loss
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(student.grad).all(), name
        student.grad = None


def test_no_grad_and_eval_inputs_work():
    student, teacher, targets = make_batch()
    with torch.no_grad():
        a = atkd_loss(student.clone().requires_grad_(), teacher, targets).loss
    b = atkd_loss(student, teacher, targets).loss
    assert not a.requires_grad and float(a) == pytest.approx(float(b))


# Bad input -------------------------------------------------------------------------------------

def test_bad_inputs_get_clear_errors():
    student, teacher, targets = make_batch()
    with pytest.raises(ValueError, match="outside \\[0, 13\\)"):
        bad = targets.clone()
        bad[0, 4] = 13
        atkd_loss(student, teacher, bad)
    with pytest.raises(ValueError, match="must be targets"):
        atkd_loss(student[:, :-1], teacher, targets)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(student, teacher[..., :-1], targets)
    with pytest.raises(ValueError, match="signal covers positions"):
        atkd_loss(student, compress(teacher[:, :-1], targets[:, :-1], k=3), targets)
    with pytest.raises(ValueError, match="unknown split rule"):
        atkd_loss(student, teacher, targets, split="mean")
    with pytest.raises(ValueError, match="unknown divergence"):
        atkd_loss(student, teacher, targets, base="hellinger")
    with pytest.raises(ValueError, match="needs a teacher"):
        atkd_loss(student, None, targets)
    with pytest.raises(TypeError, match="int64"):
        forward_kl(student, teacher, targets.double())


# compress ---------------------------------------------------------------------------------------

def test_compress_matches_float64_computation():
    g = torch.Generator().manual_seed(12)
    logits = 4 * torch.randn(3, 5, 50, generator=g)
    targets = torch.randint(0, 50, (3, 5), generator=g)
    targets[0, 0] = -100
    signal = compress(logits, targets, k=8, temperature=1.5, chunk_size=4)
    p = torch.softmax(logits.double() / 1.5, -1)
    valid = targets != -100
    y = targets.clamp(min=0)
    p_g = p.gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(signal.target_logprob[valid].double(), p_g.log()[valid], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(signal.uncertainty[valid].double(), (1 - p_g)[valid], rtol=1e-5, atol=1e-7)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(signal.entropy.double(), entropy, rtol=1e-5, atol=1e-6)
    top = p.topk(8, -1)
    assert torch.equal(signal.topk_ids, top.indices)
    outside = p.scatter(-1, top.indices, 0.0)
    outside = torch.where(valid[..., None], outside.scatter(-1, y[..., None], 0.0), outside)
    torch.testing.assert_close(signal.tail_logprob.double(), outside.sum(-1).log(), rtol=1e-5, atol=1e-6)
    assert signal.target_logprob[0, 0] == 0 and signal.uncertainty[0, 0] == 0


def test_compress_tail_is_empty_when_k_covers_the_vocabulary():
    logits = torch.randn(4, 6)
    signal = compress(logits, torch.tensor([0, 1, 2, 3]), k=6, tail_samples=3)
    assert torch.isneginf(signal.tail_logprob).all()
    assert (signal.tail_sample_logprobs == 0).all()


def test_compress_tail_samples_come_from_the_tail():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 30, generator=g)
    targets = torch.randint(0, 30, (6,), generator=g)
    signal = compress(logits, targets, k=5, tail_samples=64, generator=g)
    logp = logits.log_softmax(-1)
    for row in range(6):
        excluded = set(signal.topk_ids[row].tolist()) | {int(targets[row])}
        assert not excluded & set(signal.tail_sample_ids[row].tolist())
    torch.testing.assert_close(signal.tail_sample_logprobs, logp.gather(1, signal.tail_sample_ids))


def test_compress_of_no_positions_gives_empty_fields():
    signal = compress(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), k=3, tail_samples=2)
    assert signal.topk_ids.shape == (0, 3) and signal.target_logprob.shape == (0,)
    assert signal.tail_sample_ids.shape == (0, 2)
