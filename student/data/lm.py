"""Token streams and causal-LM batches.

Alignment convention of the whole project (:mod:`atkd.proto.alignment`): ``logits[b, t]`` predicts
``targets[b, t]``, and ``targets == IGNORE_INDEX`` (-100) is ignored. Here a window of T + 1 tokens of
the stream is split into inputs and targets (:func:`~atkd.proto.alignment.split_window`), so
``targets[b, t]`` is the token that follows ``input_ids[b, t]`` and a model's logits line up with the
targets without shifting.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from atkd.proto.alignment import split_window
from atkd.student.data.corpus import DOC_SEP


def encode_corpus(text: str, tokenizer: PreTrainedTokenizerBase) -> torch.LongTensor:
    """Tokenise a corpus string into one 1-D id stream ``[N]``: every document (``text`` split on
    :data:`~atkd.student.data.corpus.DOC_SEP`) followed by the tokenizer's eos id."""
    docs = text.split(DOC_SEP)
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    ids = [token for doc in encoded for token in (*doc, tokenizer.eos_token_id)]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class LMBatch:
    """A causal-LM batch: ``input_ids [B, T]`` and ``targets [B, T]``, where ``targets[b, t]`` is the
    token after ``input_ids[b, t]`` (``-100``: ignored); ``example_ids [B]``: the dataset indices of
    its rows when it was drawn from a :class:`~atkd.student.data.examples.Examples`."""

    input_ids: torch.LongTensor
    targets: torch.LongTensor
    example_ids: torch.LongTensor | None = None


def _windows(ids: torch.LongTensor, starts: torch.Tensor, seq_len: int) -> LMBatch:
    """Cut windows of ``seq_len + 1`` tokens at ``starts [B]`` into an aligned :class:`LMBatch`."""
    input_ids, targets = split_window(ids[starts[:, None] + torch.arange(seq_len + 1)])
    return LMBatch(input_ids=input_ids, targets=targets)


def random_batches(ids: torch.LongTensor, batch_size: int, seq_len: int, seed: int) -> Iterator[LMBatch]:
    """Infinite stream of ``[batch_size, seq_len]`` batches at uniformly random offsets of ``ids [N]``,
    drawn from ``torch.Generator`` seeded with ``seed``: the same seed gives the same stream."""
    if ids.numel() < seq_len + 1:
        raise ValueError(f"need at least {seq_len + 1} tokens for seq_len={seq_len}, got {ids.numel()}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
        yield _windows(ids, starts, seq_len)


def heldout_batches(
    ids: torch.LongTensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[LMBatch]:
    """Contiguous non-overlapping windows of ``ids [N]`` in order, ``batch_size`` per batch (the last
    batch may be smaller). Every token after the first is a target exactly once, up to the tail that
    does not fill a window; ``max_batches`` keeps only the first batches."""
    starts = torch.arange(0, ids.numel() - seq_len, seq_len)
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    return [_windows(ids, chunk, seq_len) for chunk in starts.split(batch_size)]
