"""The in-memory loop (pre-training and the research benches' distillation) and the in-process teacher
source, on tiny real HF models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from atkd.proto.signal import TeacherSignal, compress
from atkd.student.data.corpus import DOC_SEP, load_corpus
from atkd.student.data.lm import encode_corpus, heldout_batches, random_batches
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.evaluation import evaluate_lm
from atkd.student.losses import get_loss
from atkd.student.models import build_model
from atkd.student.optim import OptimConfig
from atkd.student.pretrain import pretrain
from atkd.student.teachers import LocalTeacher

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
    pretrain(model, random_batches(stream, 8, 32, seed=0), 60, OptimConfig(lr=1e-2), loss_fn=get_loss("sft"),
             progress=False)
    return model


@pytest.fixture(scope="module")
def excerpt_ids(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    corpus = load_corpus("excerpt")
    tokenizer = train_tokenizer(corpus.train.split(DOC_SEP), 512, tmp_path_factory.mktemp("tok"))
    return encode_corpus(corpus.train, tokenizer), encode_corpus(corpus.heldout, tokenizer)


def test_pretrain_lowers_the_loss(excerpt_ids):
    train_ids, heldout_ids = excerpt_ids
    model = build_model("llama", 512, dict(hidden=64, layers=2, heads=2), seed=0)
    before = evaluate_lm(model, heldout_batches(heldout_ids, 8, 64, max_batches=4))
    records = pretrain(model, random_batches(train_ids, 8, 64, seed=0), steps=30, optim=OptimConfig(lr=2e-3, warmup=5),
                       progress=False)
    losses = [record["loss"] for record in records]
    after = evaluate_lm(model, heldout_batches(heldout_ids, 8, 64, max_batches=4))
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert after.perplexity < before.perplexity / 2
    assert not model.training


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
        before = loss_fn(student(probe.input_ids).logits, source(probe), probe.targets).loss.item()
    records = pretrain(student, random_batches(stream, 8, 32, seed=0), 30, OptimConfig(lr=1e-2), loss_fn=loss_fn,
                       teacher=source, progress=False)
    with torch.no_grad():
        after = loss_fn(student(probe.input_ids).logits, source(probe), probe.targets).loss.item()
    assert after < 0.7 * before
    assert len(records) == 30 and all(r["teacher_s"] >= 0 for r in records)


def test_training_is_deterministic_for_a_seed(stream, teacher):
    init = build_model("llama", VOCAB, TINY, seed=2)
    results = []
    for _ in range(2):
        student = copy.deepcopy(init)
        pretrain(student, random_batches(stream, 4, 16, seed=5), 5, OptimConfig(lr=3e-3), loss_fn=get_loss("atkd"),
                 teacher=LocalTeacher(teacher, top_k=4), progress=False)
        results.append(torch.cat([p.flatten() for p in student.parameters()]))
    assert torch.equal(results[0], results[1])


def test_records_carry_every_step_and_the_default_loss_is_cross_entropy(stream):
    """Without a teacher and a loss the loop pre-trains with cross entropy; each record's loss is the
    step's (read from the device at the end), and the LR follows the schedule of the optimiser config."""
    model = build_model("llama", VOCAB, TINY, seed=3)
    probe = next(random_batches(stream, 8, 32, seed=7))
    with torch.no_grad():
        first_loss = get_loss("sft")(model(probe.input_ids).logits, None, probe.targets).loss.item()
    records = pretrain(model, iter([probe] * 4), 4, OptimConfig(lr=1e-2, warmup=2), progress=False, log_every=3)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(isinstance(r["loss"], float) for r in records)
    assert records[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    assert records[0]["lr"] == pytest.approx(1e-2)  # after step 0 the schedule is at step 1: end of warmup
