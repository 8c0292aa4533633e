"""The export cache on its own: signals written per example read back as they were scored, and a cache
refused when it was not made for the run (the tokenizer part through the one compatibility check)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from atkd.proto.fingerprint import TeacherMismatchError
from atkd.proto.signal import compress
from atkd.student.data.examples import PackedText
from atkd.student.teachers import (
    CachedTeacher,
    CacheManifest,
    CacheMismatchError,
    Deferred,
    SignalCache,
    TeacherSource,
    export_signals,
)

VOCAB = 32


class RandomTeacher(TeacherSource):
    """A top-4 signal of logits drawn from each batch's first example id (so that a signal names its example)."""

    def submit(self, batch, seed=None):
        generator = torch.Generator().manual_seed(int(batch.example_ids[0]))
        logits = 3 * torch.randn(*batch.targets.shape, VOCAB, generator=generator)
        return Deferred(lambda: compress(logits, batch.targets, k=4, tail_samples=2, generator=generator))


@pytest.fixture
def cache(tmp_path) -> tuple[PackedText, CacheManifest, SignalCache]:
    examples = PackedText(torch.randint(0, VOCAB, (10 * 8 + 1,), generator=torch.Generator().manual_seed(0)), 8)
    manifest = CacheManifest(
        teacher_model_id="random", teacher_revision="r0", tokenizer_hash="abc123", vocab_size=VOCAB,
        dataset_fingerprint=examples.fingerprint, dataset_kind=examples.kind, num_examples=len(examples),
        seq_len=examples.seq_len, top_k=4, tail_samples=2, temperature=1.0, codec="fp32", shard_size=4,
    )  # fmt: skip
    export_signals(RandomTeacher(), examples, tmp_path / "cache", manifest, batch_size=2, prefetch=1, progress=False)
    return examples, manifest, SignalCache(tmp_path / "cache")


def test_signals_read_back_per_example_across_shards(cache):
    examples, manifest, opened = cache
    assert opened.manifest == manifest and manifest.num_shards == 3
    teacher = RandomTeacher()
    batch = examples.batch([9, 2, 5])  # three shards, out of order
    got = CachedTeacher(opened)(batch)
    for row, example in enumerate([9, 2, 5]):
        pair = examples.batch([example - example % 2, example - example % 2 + 1])  # the batch it was exported in
        expected = teacher(pair).map_tensors(lambda t, i=example % 2: t[i])
        torch.testing.assert_close(asdict(got.map_tensors(lambda t, r=row: t[r])), asdict(expected), rtol=0, atol=0)


def test_check_refuses_another_tokenizer_and_names_the_first_other_field_that_differs(cache):
    _, _, opened = cache
    opened.check(vocab_size=VOCAB, tokenizer_hash="abc123", top_k=4, tail_samples=2)
    with pytest.raises(TeacherMismatchError, match="vocabulary of 32 tokens, the student's has 33"):
        opened.check(vocab_size=VOCAB + 1, tokenizer_hash="abc123")
    with pytest.raises(TeacherMismatchError, match="uses another tokenizer"):
        opened.check(vocab_size=VOCAB, tokenizer_hash="def456")
    with pytest.raises(CacheMismatchError, match="exported with top_k=4, this run needs 8"):
        opened.check(vocab_size=VOCAB, tokenizer_hash="abc123", tail_samples=2, top_k=8)


def test_a_cached_teacher_needs_example_ids(cache):
    examples, _, opened = cache
    batch = examples.batch([0, 1])
    batch.example_ids = None
    with pytest.raises(ValueError, match="example_ids"):
        CachedTeacher(opened)(batch)
