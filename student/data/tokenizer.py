"""Byte-level BPE tokenizers trained locally.

:func:`tokenizer_fingerprint` (the hash teacher and student compare) lives in ``atkd.proto.fingerprint``,
since the teacher service may not import ``student``; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from atkd.proto.fingerprint import tokenizer_fingerprint

__all__ = ["EOS_ID", "EOS_TOKEN", "PAD_ID", "PAD_TOKEN", "tokenizer_fingerprint", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOS_ID, PAD_ID = 0, 1
"""Ids of the special tokens in every tokenizer from :func:`train_tokenizer` (they come first)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on ``texts`` and save it to ``out_dir``.

    Special tokens: ``<|endoftext|>`` (id 0) is bos, eos and unk, as in GPT-2; it separates
    documents and is never added automatically. ``<|pad|>`` (id 1) is a distinct pad token because
    Llama and OPT build their input embedding with ``padding_idx=pad_token_id``: that row is
    zero-initialised and gets no gradient, so sharing it with eos would freeze the eos embedding.
    ``vocab_size`` counts the 256 byte symbols and both special tokens. Training is deterministic:
    the same texts and size give the same tokenizer. ``AutoTokenizer.from_pretrained(out_dir)``
    loads it back.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    wrapped.save_pretrained(out_dir)
    return wrapped
