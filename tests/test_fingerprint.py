"""proto/fingerprint.py: the tokenizer hash teacher and student compare."""

from __future__ import annotations

from transformers import AutoTokenizer

from atkd.proto.fingerprint import tokenizer_fingerprint
from atkd.student.data.tokenizer import train_tokenizer


def test_fingerprint_is_stable_across_save_and_reload(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tiny_tokenizer)
    assert len(tokenizer_fingerprint(reloaded)) == 64


def test_fingerprint_differs_for_another_vocabulary(tiny_tokenizer, excerpt_paragraphs, tmp_path):
    smaller = train_tokenizer(excerpt_paragraphs, len(tiny_tokenizer) - 100, tmp_path / "smaller")
    other_text = train_tokenizer([p[::-1] for p in excerpt_paragraphs], len(tiny_tokenizer), tmp_path / "reversed")
    assert len(other_text) == len(tiny_tokenizer)
    fingerprints = {tokenizer_fingerprint(t) for t in (tiny_tokenizer, smaller, other_text)}
    assert len(fingerprints) == 3
