"""Corpus, tokenizer and batching: all on the shipped excerpt, no download."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from atkd.student.data import corpus as corpus_module
from atkd.student.data.corpus import DOC_SEP, cache_dir, clean_text, load_corpus
from atkd.student.data.lm import encode_corpus, heldout_batches, random_batches
from atkd.student.data.tokenizer import EOS_ID, PAD_ID, tokenizer_fingerprint, train_tokenizer


@pytest.fixture(scope="module")
def excerpt():
    return load_corpus("excerpt")


@pytest.fixture(scope="module")
def tokenizer_dir(excerpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(excerpt.train.split(DOC_SEP), 512, out)
    return out


def test_excerpt_splits_deterministically(excerpt):
    again = load_corpus("excerpt")
    assert (again.train, again.heldout) == (excerpt.train, excerpt.heldout)
    assert excerpt.source == "excerpt"
    assert excerpt.train.count(DOC_SEP) == 1 and DOC_SEP not in excerpt.heldout
    assert excerpt.heldout.startswith("THE TEMPEST")
    assert 0.1 < len(excerpt.heldout) / (len(excerpt.train) + len(excerpt.heldout)) < 0.2


def test_auto_falls_back_to_excerpt_with_a_warning(monkeypatch):
    def offline(cache=None):
        raise RuntimeError("no network")

    monkeypatch.setattr(corpus_module, "fetch_shakespeare", offline)
    with pytest.warns(UserWarning, match="no network"):
        corpus = load_corpus("auto")
    assert corpus.source == "excerpt"


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="unknown corpus source"):
        load_corpus("wikipedia")


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATKD_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir().is_dir()


def test_clean_text_strips_gutenberg_and_normalises_lines():
    raw = "header\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n\r\nTo be,  \r\nor not\f\r\n" \
          "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n"  # fmt: skip
    assert clean_text(raw) == "To be,\nor not\n"
    assert clean_text("no markers\r\n\r\n") == "no markers\n"


def test_tokenizer_reloads_with_identical_ids_and_fingerprint(excerpt, tokenizer_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hub access attempted, no deprecation noise
        reloaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    fresh = train_tokenizer(excerpt.train.split(DOC_SEP), 512, tokenizer_dir.parent / "again")
    text = excerpt.heldout[:2000]
    assert len(reloaded) == 512
    assert (reloaded.eos_token_id, reloaded.bos_token_id, reloaded.pad_token_id) == (EOS_ID, EOS_ID, PAD_ID)
    assert reloaded(text).input_ids == fresh(text).input_ids
    assert reloaded.decode(reloaded(text).input_ids) == text
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(fresh)


def test_fingerprint_changes_with_vocab_size_or_text(excerpt, tokenizer_dir, tmp_path):
    reference = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer_dir))
    bigger = train_tokenizer(excerpt.train.split(DOC_SEP), 600, tmp_path / "bigger")
    other_text = train_tokenizer([excerpt.heldout], 512, tmp_path / "other")
    assert len({reference, tokenizer_fingerprint(bigger), tokenizer_fingerprint(other_text)}) == 3


def test_encode_corpus_ends_every_document_with_eos(excerpt, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = encode_corpus(excerpt.train, tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert (ids == EOS_ID).sum() == 2 and ids[-1] == EOS_ID
    first_doc = excerpt.train.split(DOC_SEP)[0]
    assert tokenizer.decode(ids[: (ids == EOS_ID).nonzero()[0, 0]]) == first_doc


def test_random_batches_are_shifted_windows_and_deterministic():
    ids = torch.arange(1000)
    stream = random_batches(ids, batch_size=4, seq_len=16, seed=7)
    batches = [next(stream) for _ in range(3)]
    for batch in batches:
        assert batch.input_ids.shape == batch.targets.shape == (4, 16)
        assert torch.equal(batch.targets, batch.input_ids + 1)  # ids are consecutive: target = next token
    again = random_batches(ids, batch_size=4, seq_len=16, seed=7)
    assert all(torch.equal(b.input_ids, next(again).input_ids) for b in batches)
    other = next(random_batches(ids, batch_size=4, seq_len=16, seed=8))
    assert not torch.equal(other.input_ids, batches[0].input_ids)


def test_random_batches_reach_both_ends():
    stream = random_batches(torch.arange(20), batch_size=64, seq_len=4, seed=0)
    seen = torch.cat([next(stream).targets for _ in range(4)])
    assert seen.min() == 1 and seen.max() == 19


def test_heldout_batches_tile_the_stream():
    ids = torch.arange(1003)
    batches = heldout_batches(ids, batch_size=4, seq_len=10)
    assert [b.input_ids.shape[0] for b in batches] == [4] * 25
    inputs = torch.cat([b.input_ids.flatten() for b in batches])
    targets = torch.cat([b.targets.flatten() for b in batches])
    assert torch.equal(inputs, ids[:1000]) and torch.equal(targets, ids[1:1001])
    ragged = heldout_batches(ids[:95], batch_size=4, seq_len=10)
    assert [b.input_ids.shape[0] for b in ragged] == [4, 4, 1]
    assert len(heldout_batches(ids, batch_size=4, seq_len=10, max_batches=3)) == 3
