"""Tiny models of every family: build, save/reload. No download."""

from __future__ import annotations

import pytest
import torch

from atkd.student.data.tokenizer import EOS_ID, PAD_ID
from atkd.student.models import FAMILIES, build_model, load_model, save_model, tiny_config

TINY = dict(hidden=32, layers=2, heads=2, max_len=64)
VOCAB = 300


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
