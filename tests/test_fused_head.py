"""The fused LM head + loss against the logits path: the same loss and gradients for hidden states, head weight
and bias, for every loss of the library, on dense teacher logits and on compressed signals, fp32 and bf16."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from atkd.proto.signal import compress
from atkd.student.losses import LOSSES, HeadLogits, fused_head_loss, get_loss
from atkd.student.models import FAMILIES, build_model
from atkd.student.trainer.head import deferred_head, fused_head_unsupported
from atkd.student.trainer.loop import train
from tests import test_hf_trainer
from tests.test_hf_trainer import fresh_student, make_trainer
from tests.test_trainer import final_weights, run_config

#: Every loss, and the ATKD variants whose batch-global split or coupling could differ between the paths.
CASES = [(name, {}) for name in LOSSES] + [
    ("atkd", {"split": "topk", "hard_fraction": 0.3}),
    ("atkd", {"base": "reverse", "decouple": False}),
    ("atkd", {"base": "jsd", "split": "none"}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in CASES]


def make_inputs(seed=0, b=3, t=9, h=16, v=40, dtype=torch.float32, with_bias=False):
    """Hidden states ``[B, T, H]``, head ``[V, H]`` (+ bias), dense teacher logits and targets with prompt and
    padding positions (-100)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    bias = (0.3 * torch.randn(v, generator=g)).to(dtype) if with_bias else None
    teacher = 3.0 * torch.randn(b, t, v, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[:, :2] = -100
    targets[-1, -3:] = -100
    return hidden, weight, bias, teacher, targets


def teacher_of(kind: str, teacher_logits: torch.Tensor, targets: torch.Tensor):
    if kind == "dense":
        return teacher_logits
    return compress(teacher_logits, targets, k=6, tail_samples=4 if kind == "samples" else 0,
                    generator=torch.Generator().manual_seed(1))


def both_paths(loss_fn, hidden, weight, bias, teacher, targets, **head_options):
    """(loss, stats, grads) of the logits path and of the fused head, each from fresh leaves."""
    results = []
    for fused in (False, True):
        leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (hidden, weight, bias)]
        h, w, b = leaves
        if fused:
            result = fused_head_loss(loss_fn, h, w, teacher, targets, bias=b, **head_options)
        else:
            logits = h @ w.t() if b is None else h @ w.t() + b
            result = loss_fn(logits, teacher, targets)
        result.loss.backward()
        results.append((result.loss.detach(), result.stats, [x.grad if x is not None else None for x in leaves]))
    return results


@pytest.mark.parametrize("teacher_kind", ["dense", "signal", "samples"])
@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_fused_head_equals_the_logits_path_in_fp32(name, options, teacher_kind):
    hidden, weight, bias, teacher_logits, targets = make_inputs(with_bias=name == "atkd" and not options)
    teacher = None if name == "sft" else teacher_of(teacher_kind, teacher_logits, targets)
    # Blocks of 5 valid positions, loss chunks of 2: blocks and chunks both end mid-batch and mid-sequence.
    (loss, stats, grads), (fused_loss, fused_stats, fused_grads) = both_paths(
        get_loss(name, chunk_size=2, **options), hidden, weight, bias, teacher, targets, block_rows=5)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert fused_stats.keys() == stats.keys()
    for key in stats:
        torch.testing.assert_close(fused_stats[key], stats[key], rtol=1e-5, atol=1e-6)
    for what, expected, actual in zip(("hidden", "weight", "bias"), grads, fused_grads, strict=True):
        if expected is None:
            assert actual is None, what
            continue
        assert expected.abs().sum() > 0, what  # a gradient that can fail the comparison
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=what)


@pytest.mark.parametrize("teacher_kind", ["dense", "signal"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fused_head_equals_the_logits_path_under_bf16_autocast(name, teacher_kind):
    """bf16 as a run with precision=bf16 has it: the head's matmuls under autocast, the loss math in fp32. Both
    paths round the logits and their gradient to bf16; the fused path sums dW over blocks in fp32."""
    hidden, weight, bias, teacher_logits, targets = make_inputs(b=4, t=16, h=32, v=64)
    teacher = None if name == "sft" else teacher_of(teacher_kind, teacher_logits, targets)
    results = []
    for fused in (False, True):
        h, w = (x.detach().clone().requires_grad_(True) for x in (hidden, weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = HeadLogits(h, w, block_rows=7) if fused else h @ w.t()
        assert logits.dtype == torch.bfloat16
        result = get_loss(name, chunk_size=3)(logits, teacher, targets)
        assert result.loss.dtype == torch.float32
        result.loss.backward()
        results.append((result.loss.detach(), h.grad, w.grad))
    (loss, grad_h, grad_w), (fused_loss, fused_grad_h, fused_grad_w) = results
    assert grad_h.dtype == fused_grad_h.dtype == torch.float32 and fused_grad_w.dtype == torch.float32
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)  # the same bf16 logits, fp32 math
    for expected, actual in ((grad_h, fused_grad_h), (grad_w, fused_grad_w)):
        scale = expected.abs().max()
        assert scale > 0
        assert (actual - expected).abs().max() <= 2e-2 * scale  # bf16 products: ~3 significant digits


@pytest.mark.parametrize("name", ["atkd", "forward_kl", "sft"])
def test_bf16_parameters_get_bf16_gradients_close_to_fp32(name):
    """A bf16 model (e.g. FSDP2's bf16 parameters): hidden and head in bf16, the gradients come back in bf16."""
    hidden, weight, _, teacher_logits, targets = make_inputs(b=4, t=16, h=32, v=64)
    teacher = None if name == "sft" else compress(teacher_logits, targets, k=8)
    loss_fn = get_loss(name)
    (loss, _, (grad_h, grad_w, _)), _ = both_paths(loss_fn, hidden, weight, None, teacher, targets)
    h, w = (x.to(torch.bfloat16).requires_grad_(True) for x in (hidden, weight))
    result = fused_head_loss(loss_fn, h, w, teacher, targets, block_rows=8)
    result.loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(result.loss, loss, rtol=2e-2, atol=2e-2)
    for expected, actual in ((grad_h, h.grad), (grad_w, w.grad)):
        assert (actual.float() - expected).abs().max() <= 3e-2 * expected.abs().max()


def test_hidden_at_the_valid_positions_only_gives_the_same_result():
    """The entry point of the issue: hidden ``[N, H]`` at the valid positions, targets ``[N]``, the signal there."""
    hidden, weight, _, teacher_logits, targets = make_inputs()
    signal = compress(teacher_logits, targets, k=6)
    valid = targets != -100
    (loss, _, (grad_h, grad_w, _)), _ = both_paths(get_loss("atkd"), hidden, weight, None, signal, targets)
    h, w = hidden[valid].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    rows = valid.reshape(-1).nonzero().squeeze(1)
    result = fused_head_loss(get_loss("atkd"), h, w, signal.flatten().select(rows), targets[valid])
    result.loss.backward()
    torch.testing.assert_close(result.loss, loss)
    torch.testing.assert_close(h.grad, grad_h[valid], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, grad_w, rtol=1e-5, atol=1e-7)


def test_tied_embedding_gets_both_gradients():
    """A head tied to the input embedding: the weight's gradient is the sum of the two uses, as with logits."""
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(30, 8, generator=g)
    input_ids = torch.randint(0, 30, (2, 6), generator=g)
    targets = torch.randint(0, 30, (2, 6), generator=g)
    teacher = compress(torch.randn(2, 6, 30, generator=g), targets, k=5)
    grads = []
    for fused in (False, True):
        weight = embedding.clone().requires_grad_(True)
        hidden = torch.tanh(weight[input_ids])
        logits = HeadLogits(hidden, weight) if fused else hidden @ weight.t()
        get_loss("atkd")(logits, teacher, targets).loss.backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_upstream_gradient_scales_and_no_grad_gives_the_value():
    hidden, weight, _, teacher_logits, targets = make_inputs()
    signal = compress(teacher_logits, targets, k=6)
    (loss, _, (grad_h, grad_w, _)), _ = both_paths(get_loss("forward_kl"), hidden, weight, None, signal, targets)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    (0.25 * fused_head_loss(get_loss("forward_kl"), h, w, signal, targets).loss).backward()
    torch.testing.assert_close(h.grad, 0.25 * grad_h)
    torch.testing.assert_close(w.grad, 0.25 * grad_w)
    with torch.no_grad():
        torch.testing.assert_close(fused_head_loss(get_loss("forward_kl"), hidden, weight, signal, targets).loss, loss)
    frozen_head = fused_head_loss(get_loss("forward_kl"), hidden.clone().requires_grad_(True), weight, signal, targets)
    frozen_head.loss.backward()  # only the hidden states need a gradient: no dW is formed
    torch.testing.assert_close(frozen_head.loss, loss)


def test_no_valid_token_gives_zero_with_a_graph():
    hidden, weight, _, teacher_logits, targets = make_inputs()
    targets = torch.full_like(targets, -100)
    h = hidden.clone().requires_grad_(True)
    result = fused_head_loss(get_loss("atkd"), h, weight, compress(teacher_logits, targets, k=4), targets)
    result.loss.backward()
    assert result.loss.item() == 0.0 and h.grad.abs().sum() == 0


def test_mismatched_shapes_get_clear_errors():
    hidden, weight, _, teacher_logits, targets = make_inputs()
    with pytest.raises(ValueError, match="do not fit"):
        HeadLogits(hidden, weight.t())
    with pytest.raises(ValueError, match="bias must be"):
        HeadLogits(hidden, weight, torch.zeros(3))
    with pytest.raises(ValueError, match="must be targets"):
        fused_head_loss(get_loss("atkd"), hidden, weight, teacher_logits, targets[:, 1:])


# The fused head in the models and the trainer -------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_hands_the_loss_its_head_and_equals_its_logits(family):
    """Under deferred_head the model's own forward returns HeadLogits whose logits are the model's logits."""
    model = build_model(family, 64, dict(hidden=16, layers=1, heads=2), seed=0)
    assert fused_head_unsupported(model) is None
    input_ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids).logits
    with deferred_head(model):
        deferred = model(input_ids).logits
    assert isinstance(deferred, HeadLogits) and deferred.weight is model.get_output_embeddings().weight
    torch.testing.assert_close(deferred.materialise(), logits)
    assert not isinstance(model(input_ids).logits, HeadLogits)  # restored after the block


def test_a_model_that_soft_caps_its_logits_is_refused():
    """Gemma 2 soft-caps its logits after the head: the fused head would change the loss, so the trainer falls back."""
    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    assert "post-processes the logits" in fused_head_unsupported(model)


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """GPT-2's attention bias [q | k | v] without its key third. The loss does not depend on the key bias (a
    query-wise constant under the softmax), so its gradient is rounding noise, which Adam's g / sqrt(v) turns
    into steps of size lr: it differs between any two summation orders (measured 6e-3 after 6 steps at
    lr 1e-2 between 2 FSDP ranks and 1 process, every other parameter within 2e-7)."""
    if not name.endswith("attn.c_attn.bias"):
        return value
    query, _, value_bias = value.chunk(3)
    return torch.cat([query, value_bias])


def test_training_with_the_fused_head_takes_the_steps_of_the_logits_path(tmp_path, corpus, tiny_model_factory,
                                                                        tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="atkd.student.trainer.loop")
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 16, "tail_samples": 4}
    runs = {}
    for fused in (False, True):
        config = run_config(tmp_path / str(fused), corpus, tiny_model_factory("gpt2"), teacher, max_steps=3,
                            save_every=0, fused_head=fused, **{"data.eval": []})
        runs[fused] = (train(config), [r["loss"] for r in map(json.loads, open(config.output_dir / "metrics.jsonl"))])
    assert [r.message.split(" ")[1] for r in caplog.records if r.message.startswith("fused_head")] == ["off", "on"]
    (logits_run, logits_losses), (fused_run, fused_losses) = runs[False], runs[True]
    assert fused_losses == pytest.approx(logits_losses, rel=1e-5)
    expected, actual = final_weights(logits_run), final_weights(fused_run)
    for name in expected:
        torch.testing.assert_close(without_key_bias(name, actual[name]), without_key_bias(name, expected[name]),
                                   rtol=1e-4, atol=1e-5, msg=name)


# The HF Trainer tests' fixtures, shared.
examples, collator, local_teacher = test_hf_trainer.examples, test_hf_trainer.collator, test_hf_trainer.local_teacher


def test_hf_trainer_step_with_the_fused_head_equals_the_logits_path(tmp_path, tiny_model_factory, local_teacher,
                                                                    examples, collator):
    """DistillationTrainer: a training step (padded batch, right padding) gives the same loss and gradients with the
    fused head as with logits; evaluation with return_outputs still gets real logits."""
    inputs = collator(examples[:4])
    steps = {}
    for fused in (False, True):
        student = fresh_student(tiny_model_factory)
        trainer = make_trainer(tmp_path / str(fused), student, local_teacher, examples, collator)
        trainer.fused_head = fused
        trainer.current_gradient_accumulation_steps = 1  # set by train() per accumulated batch
        loss = trainer.training_step(student, inputs)
        steps[fused] = (loss, {name: p.grad.clone() for name, p in student.named_parameters()})
    assert steps[True][0].item() == pytest.approx(steps[False][0].item(), rel=1e-5)
    for name, grad in steps[False][1].items():
        torch.testing.assert_close(steps[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert make_trainer(tmp_path / "probe", fresh_student(tiny_model_factory), local_teacher, examples,
                        collator).fused_head  # GPT-2 allows it: on by default
    _, outputs = trainer.compute_loss(student, inputs, return_outputs=True)
    assert isinstance(outputs.logits, torch.Tensor)
