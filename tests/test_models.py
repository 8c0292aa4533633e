"""Tiny models of every family: build, save/reload, pre-train, evaluate. No download."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from atkd.student.assets import prepare_demo_assets
from atkd.student.data.corpus import DOC_SEP, load_corpus
from atkd.student.data.lm import LMBatch, encode_corpus, heldout_batches, random_batches
from atkd.student.data.tokenizer import EOS_ID, PAD_ID, tokenizer_fingerprint, train_tokenizer
from atkd.student.models import FAMILIES, build_model, evaluate_lm, load_model, pretrain, save_model, tiny_config

TINY = dict(hidden=32, layers=2, heads=2, max_len=64)
VOCAB = 300


@pytest.fixture(scope="module")
def excerpt_ids(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    corpus = load_corpus("excerpt")
    tokenizer = train_tokenizer(corpus.train.split(DOC_SEP), 512, tmp_path_factory.mktemp("tok"))
    return encode_corpus(corpus.train, tokenizer), encode_corpus(corpus.heldout, tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_saves_and_reloads_with_identical_logits(family, tmp_path):
    model = build_model(family, VOCAB, TINY, seed=0)
    config = model.config
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        VOCAB, EOS_ID, EOS_ID, PAD_ID
    )  # fmt: skip
    save_model(model, tmp_path)
    reloaded = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model.eval()(ids).logits
        assert logits.shape == (2, 16, VOCAB)
        assert torch.equal(logits, reloaded(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic_in_the_seed(family):
    def weights(seed: int) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in build_model(family, VOCAB, TINY, seed).parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_unknown_family_and_missing_directory_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        tiny_config("mamba", VOCAB, **TINY)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing-here")


def test_pretrain_lowers_the_loss(excerpt_ids):
    train_ids, heldout_ids = excerpt_ids
    model = build_model("llama", 512, dict(hidden=64, layers=2, heads=2), seed=0)
    before = evaluate_lm(model, heldout_batches(heldout_ids, 8, 64, max_batches=4))
    losses = pretrain(model, random_batches(train_ids, 8, 64, seed=0), steps=30, warmup=5, progress=False)
    after = evaluate_lm(model, heldout_batches(heldout_ids, 8, 64, max_batches=4))
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert after.perplexity < before.perplexity / 2
    assert not model.training


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


def test_demo_assets_are_built_once_and_keyed_by_settings(tmp_path):
    settings = dict(family="gpt2", vocab_size=400, teacher_steps=2, batch_size=2, seq_len=16, source="excerpt")
    first = prepare_demo_assets(tmp_path, **settings)
    weights = first.teacher_dir / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    again = prepare_demo_assets(tmp_path, **settings)
    assert again.root == first.root and weights.stat().st_mtime_ns == built_at
    assert torch.equal(again.train_ids, first.train_ids) and again.source == "excerpt"
    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(first.tokenizer_dir))
    for model_dir in (first.teacher_dir, first.student_init_dir):
        assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir)) == fingerprint
    teacher, student = load_model(first.teacher_dir), load_model(first.student_init_dir)
    assert teacher.config.vocab_size == student.config.vocab_size == 400
    assert student.num_parameters() < teacher.num_parameters() / 2

    changed = prepare_demo_assets(tmp_path, **{**settings, "teacher_steps": 3})
    assert changed.root != first.root
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"
