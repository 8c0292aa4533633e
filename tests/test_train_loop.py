"""The training loop and the in-process teacher source, on tiny real HF models."""

from __future__ import annotations

import copy

import pytest
import torch

from atkd.proto.signal import TeacherSignal, compress
from atkd.student.data.lm import heldout_batches, random_batches
from atkd.student.losses import get_loss
from atkd.student.models import build_model, evaluate_lm
from atkd.student.teachers import LocalTeacher
from atkd.student.train_loop import OptimConfig, cosine_with_warmup, train

VOCAB = 64
TINY = dict(hidden=32, layers=1, heads=2)


@pytest.fixture(scope="module")
def stream():
    """A learnable token stream: a fixed random sequence of 40 tokens repeated."""
    pattern = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    return pattern.repeat(60)


@pytest.fixture(scope="module")
def teacher(stream):
    model = build_model("llama", VOCAB, dict(hidden=64, layers=2, heads=2), seed=1)
    train(model, random_batches(stream, 8, 32, seed=0), get_loss("sft"), OptimConfig(steps=60, lr=1e-2),
          progress=False)
    return model


def test_schedule_warms_up_then_decays_to_the_floor():
    values = [cosine_with_warmup(s, 100, 10, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[-1] == pytest.approx(0.1, abs=1e-3)


def test_pretrained_teacher_learned_the_stream(stream, teacher):
    evaluation = evaluate_lm(teacher, heldout_batches(stream, 4, 32, max_batches=2))
    assert evaluation.accuracy > 0.8


def test_local_teacher_signal_equals_compress_of_its_logits(stream, teacher):
    batch = next(random_batches(stream, 2, 16, seed=3))
    signal = LocalTeacher(teacher, top_k=5)(batch)
    assert isinstance(signal, TeacherSignal) and signal.positions_shape == batch.targets.shape
    with torch.no_grad():
        expected = compress(teacher(batch.input_ids).logits, batch.targets, 5)
    torch.testing.assert_close(signal.topk_logprobs, expected.topk_logprobs)
    torch.testing.assert_close(signal.uncertainty, expected.uncertainty)
    dense = LocalTeacher(teacher)(batch)
    assert dense.shape == (*batch.targets.shape, VOCAB)


@pytest.mark.parametrize("top_k", [None, 8])
@pytest.mark.parametrize("loss", ["atkd", "forward_kl"])
def test_distillation_moves_the_student_toward_the_teacher(stream, teacher, top_k, loss):
    student = build_model("llama", VOCAB, TINY, seed=2)
    source = LocalTeacher(teacher, top_k=top_k)
    probe = next(random_batches(stream, 8, 32, seed=99))
    loss_fn = get_loss(loss)
    with torch.no_grad():
        before = loss_fn(student(probe.input_ids).logits, source(probe), probe.targets).item()
    records = train(student, random_batches(stream, 8, 32, seed=0), loss_fn, OptimConfig(steps=30, lr=1e-2),
                    teacher=source, progress=False)
    with torch.no_grad():
        after = loss_fn(student(probe.input_ids).logits, source(probe), probe.targets).item()
    assert after < 0.7 * before
    assert len(records) == 30 and all(r["teacher_s"] >= 0 for r in records)


def test_training_is_deterministic_for_a_seed(stream, teacher):
    init = build_model("llama", VOCAB, TINY, seed=2)
    results = []
    for _ in range(2):
        student = copy.deepcopy(init)
        train(student, random_batches(stream, 4, 16, seed=5), get_loss("atkd"), OptimConfig(steps=5),
              teacher=LocalTeacher(teacher, top_k=4), progress=False)
        results.append(torch.cat([p.flatten() for p in student.parameters()]))
    assert torch.equal(results[0], results[1])
