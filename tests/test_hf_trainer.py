"""The HF Trainer integration: HF batches -> aligned LMBatch, the loss it computes, and short training runs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, TrainingArguments
from transformers.utils import logging as hf_logging

from atkd.student.client import TeacherClient
from atkd.student.data.lm import LMBatch
from atkd.student.losses import atkd_loss
from atkd.student.teachers import LocalTeacher, RemoteTeacher
from atkd.student.trainer.hf import DistillationTrainer, lm_batch_from_hf

hf_logging.disable_progress_bar()
SEQ_LEN = 24


@pytest.fixture(scope="module")
def examples(tiny_tokenizer, excerpt_paragraphs) -> list[dict]:
    """48 tokenised paragraphs of 8 to SEQ_LEN tokens (varied lengths, so batches carry padding)."""
    encoded = tiny_tokenizer([p.strip() for p in excerpt_paragraphs], add_special_tokens=False)["input_ids"]
    return [{"input_ids": ids[:SEQ_LEN]} for ids in encoded if len(ids) >= 8][:48]


@pytest.fixture(scope="module")
def collator(tiny_tokenizer):
    return DataCollatorForLanguageModeling(tiny_tokenizer, mlm=False, return_tensors="pt")


@pytest.fixture(scope="module")
def local_teacher(tiny_model_dir) -> LocalTeacher:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    return LocalTeacher(model, top_k=16)


def fresh_student(tiny_model_factory):
    """A tiny GPT-2 student (a new copy each call: training changes it)."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_factory("gpt2"), local_files_only=True)


def make_trainer(tmp_path, model, teacher, examples, collator, **args) -> DistillationTrainer:
    options = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                   learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                   disable_tqdm=True, seed=0)
    return DistillationTrainer(model=model, args=TrainingArguments(**{**options, **args}), train_dataset=examples,
                               data_collator=collator, teacher=teacher, loss_options={"lam": 0.2})


def test_lm_batch_from_hf_shifts_labels_and_masks_padding():
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0], [3, 4, 11, 12]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]),
        # row 1 keeps labels on its padding (a collator with pad = eos does); row 2 has a 2-token prompt
        "labels": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0], [-100, -100, 11, 12]]),
    }
    batch = lm_batch_from_hf(inputs)
    assert torch.equal(batch.input_ids, inputs["input_ids"])
    assert batch.targets.tolist() == [[6, 7, 8, -100], [10, -100, -100, -100], [-100, 11, 12, -100]]


def test_lm_batch_from_hf_on_collated_examples(examples, collator):
    features = examples[:4]
    inputs = collator(features)
    batch = lm_batch_from_hf(inputs)
    for row, feature in enumerate(features):
        ids = feature["input_ids"]
        expected = ids[1:] + [-100] * (batch.targets.shape[1] - len(ids) + 1)
        assert batch.targets[row].tolist() == expected


def test_lm_batch_from_hf_rejects_left_padding():
    inputs = {"input_ids": torch.tensor([[0, 5, 6]]), "attention_mask": torch.tensor([[0, 1, 1]])}
    with pytest.raises(ValueError, match="right padding"):
        lm_batch_from_hf(inputs)


def test_compute_loss_equals_atkd_on_the_same_batch(tmp_path, tiny_model_factory, local_teacher, examples, collator):
    student = fresh_student(tiny_model_factory)
    trainer = make_trainer(tmp_path, student, local_teacher, examples, collator)
    features = examples[:4]
    inputs = collator(features)
    loss, outputs = trainer.compute_loss(student, inputs, return_outputs=True)

    # The expected loss from the project's own alignment, built by hand from the token lists.
    width = inputs["input_ids"].shape[1]
    targets = torch.tensor([f["input_ids"][1:] + [-100] * (width - len(f["input_ids"]) + 1) for f in features])
    batch = LMBatch(input_ids=inputs["input_ids"], targets=targets)
    logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = atkd_loss(logits, local_teacher(batch), targets, lam=0.2).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(outputs.logits, logits)
    assert loss.requires_grad


def test_gradient_accumulation_averages_micro_batch_losses(tmp_path, tiny_model_factory, local_teacher, examples,
                                                           collator):
    student = fresh_student(tiny_model_factory)
    trainer = make_trainer(tmp_path, student, local_teacher, examples, collator, gradient_accumulation_steps=2)
    trainer.current_gradient_accumulation_steps = 2  # set by train() per accumulated batch
    inputs = collator(examples[:4])
    with torch.no_grad():
        full = trainer.compute_loss(student, inputs).item()
    step = trainer.training_step(student, inputs, num_items_in_batch=torch.tensor(999))
    assert step.item() == pytest.approx(full / 2, rel=1e-5)


def fixed_batch_loss(trainer, inputs) -> float:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, inputs).item()


def test_short_training_run_lowers_the_distillation_loss(tmp_path, tiny_model_factory, local_teacher, examples,
                                                         collator):
    student = fresh_student(tiny_model_factory)
    trainer = make_trainer(tmp_path, student, local_teacher, examples, collator, max_steps=20, logging_steps=5)
    probe = collator(examples[:8])
    before = fixed_batch_loss(trainer, probe)
    trainer.train()
    after = fixed_batch_loss(trainer, probe)
    assert after < 0.8 * before
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and logs[-1]["loss"] < logs[0]["loss"]
    # ATKD diagnostics ride along: per-micro-batch means of the split (median rule: about half hard).
    first = logs[0]
    assert 0.0 < first["atkd/mean_uncertainty"] < 1.0
    assert first["atkd/n_hard"] >= first["atkd/n_easy"] > 0
    # Trainer.evaluate goes through the same compute_loss: one eval batch of the probe's 8 examples.
    metrics = trainer.evaluate(examples[:8])
    assert metrics["eval_loss"] == pytest.approx(after, rel=1e-5)


def test_training_with_a_remote_teacher(tmp_path, serve_teacher, tiny_tokenizer, tiny_model_factory, local_teacher,
                                        examples, collator):
    student = fresh_student(tiny_model_factory)
    probe = collator(examples[:4])
    with TeacherClient(serve_teacher().address, tokenizer=tiny_tokenizer) as client:
        trainer = make_trainer(tmp_path, student, RemoteTeacher(client, top_k=16), examples, collator, max_steps=3,
                               logging_steps=1)
        with torch.no_grad():
            remote = trainer.compute_loss(student, probe).item()
            trainer.teacher = local_teacher
            local = trainer.compute_loss(student, probe).item()
            trainer.teacher = RemoteTeacher(client, top_k=16)
        assert remote == pytest.approx(local, rel=1e-3)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert trainer.state.global_step == 3


def test_unknown_loss_name_fails_early(tmp_path, local_teacher):
    with pytest.raises(ValueError, match="unknown loss"):
        DistillationTrainer(model=None, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                            teacher=local_teacher, loss="nope")
