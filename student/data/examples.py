"""Training examples of a fixed length, and the deterministic order in which batches draw them.

An *example* is a pair ``(input_ids [T], targets [T])`` aligned as everywhere in the project
(:mod:`atkd.proto.alignment`): a window of T + 1 tokens split by
:func:`~atkd.proto.alignment.split_window`, so ``targets[t]`` is the token after ``input_ids[t]``; -100
(``IGNORE_INDEX``) where nothing is learnt (prompt, padding).
Two kinds:

- :class:`PackedText`: plain text tokenised into one stream (documents joined by eos) and cut into
  non-overlapping windows of T + 1 tokens; example i is window i.
- :class:`InstructionData`: JSONL records with a prompt and a response; example = prompt + response +
  eos, truncated to T + 1 tokens, right padded; the prompt's targets are -100 (as in the paper, only
  the response is distilled).

Every example has an index, and a batch carries the indices of its examples (:attr:`LMBatch.example_ids`),
so signals exported once per example (:mod:`atkd.student.teachers.cache`) serve any batch size or shuffle.

:class:`BatchOrder` maps a micro-batch number m = 0, 1, 2, ... to example indices: epoch e = m // M
(M micro-batches per epoch) is a permutation drawn from ``seed + e``; under data parallelism the
global batch of ``world_size * B`` examples is split by rank. The data position of a checkpoint is
just m, and resuming at m replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from atkd.proto.alignment import IGNORE_INDEX, split_window
from atkd.student.data.corpus import DOC_SEP
from atkd.student.data.lm import LMBatch, encode_corpus


class Examples:
    """Fixed-length examples: ``len()``, ``batch(indices)`` and a ``fingerprint`` of the token data."""

    input_ids: torch.LongTensor  # [N, T]
    targets: torch.LongTensor  # [N, T]
    kind: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, indices: torch.Tensor | Sequence[int]) -> LMBatch:
        """The examples at ``indices [B]`` as an :class:`LMBatch` ``[B, T]`` that remembers them."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return LMBatch(input_ids=self.input_ids[indices], targets=self.targets[indices], example_ids=indices)

    @property
    def fingerprint(self) -> str:
        """sha256 over the kind, shape and every token and target: two datasets with the same
        fingerprint yield the same example i for every i (what an export cache is keyed on)."""
        digest = hashlib.sha256(f"{self.kind}:{tuple(self.input_ids.shape)}".encode())
        digest.update(self.input_ids.numpy().tobytes())
        digest.update(self.targets.numpy().tobytes())
        return digest.hexdigest()


class PackedText(Examples):
    """``ids [N]`` cut into ``(N - 1) // T`` non-overlapping windows; example i predicts tokens
    ``ids[i*T + 1 : (i+1)*T + 1]`` from ``ids[i*T : (i+1)*T]``."""

    kind = "packed"

    def __init__(self, ids: torch.LongTensor, seq_len: int):
        count = (ids.numel() - 1) // seq_len
        if count < 1:
            raise ValueError(f"need at least {seq_len + 1} tokens for seq_len={seq_len}, got {ids.numel()}")
        starts = torch.arange(count) * seq_len
        input_ids, targets = split_window(ids[starts[:, None] + torch.arange(seq_len + 1)])
        self.input_ids, self.targets = input_ids.contiguous(), targets.contiguous()

    @classmethod
    def from_files(cls, paths: Sequence[Path], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> PackedText:
        """Every text file in ``paths`` (a file, or a directory of ``*.txt`` in sorted order) is one
        document; paragraphs separated by :data:`~atkd.student.data.corpus.DOC_SEP` are documents too."""
        texts = [file.read_text(encoding="utf-8") for file in text_files(paths)]
        return cls(encode_corpus(DOC_SEP.join(texts), tokenizer), seq_len)


class InstructionData(Examples):
    """Prompt/response pairs from JSONL; see the module docstring. ``prompts`` and ``responses``
    keep the raw strings for generation-based evaluation."""

    kind = "instruction"

    def __init__(self, records: Sequence[dict], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                 prompt_field: str = "prompt", response_field: str = "response"):
        if not records:
            raise ValueError("no instruction records")
        self.prompts, self.responses = [], []
        for number, record in enumerate(records, 1):
            for field in (prompt_field, response_field):
                if not isinstance(record.get(field), str):
                    raise ValueError(f"record {number}: field {field!r} must be a string, got {record.get(field)!r}")
            self.prompts.append(record[prompt_field])
            self.responses.append(record[response_field])
        prompts = tokenizer(self.prompts, add_special_tokens=False)["input_ids"]
        responses = tokenizer(self.responses, add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.input_ids = torch.full((len(records), seq_len), self.pad_id, dtype=torch.long)
        self.targets = torch.full((len(records), seq_len), IGNORE_INDEX, dtype=torch.long)
        #: tokens of each example's prompt within its window (at most seq_len + 1)
        self.prompt_lengths = torch.tensor([min(len(prompt), seq_len + 1) for prompt in prompts], dtype=torch.long)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            self.input_ids[row], self.targets[row] = pair_window(prompt, [*response, self.eos_id], seq_len, self.pad_id)

    @classmethod
    def from_jsonl(cls, paths: Path | Sequence[Path], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                   **fields: str) -> InstructionData:
        """The records of one or more JSONL files, in order."""
        records = []
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        return cls(records, tokenizer, seq_len, **fields)


def pair_window(prompt: Sequence[int], response: Sequence[int], seq_len: int, pad_id: int
                ) -> tuple[torch.LongTensor, torch.LongTensor]:
    """``(input_ids [T], targets [T])`` of ``prompt + response`` cut to T + 1 tokens and right padded with
    ``pad_id``; targets are -100 on the prompt's positions (they predict prompt tokens) and on the padding.

    A window of n <= T tokens keeps all n in ``input_ids`` (its last token is a target only, but a teacher
    server reads each target from the next input id: :func:`~atkd.proto.alignment.join_window`)."""
    input_ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    targets = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    window = torch.tensor([*prompt, *response][: seq_len + 1], dtype=torch.long)
    _, shifted = split_window(window)
    input_ids[: min(window.numel(), seq_len)] = window[:seq_len]
    targets[: shifted.numel()] = shifted
    targets[: max(len(prompt) - 1, 0)] = IGNORE_INDEX  # the prompt predicts nothing
    return input_ids, targets


def text_files(paths: Sequence[Path]) -> list[Path]:
    """The text files of ``paths``: each file as given, each directory's ``*.txt`` in sorted order."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.glob("*.txt")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such text file or directory: {path}")
    if not files:
        raise FileNotFoundError(f"no .txt files in {', '.join(map(str, paths))}")
    return files


@dataclass(frozen=True)
class BatchOrder:
    """Which examples micro-batch ``m`` of rank ``rank`` holds (see the module docstring).

    Each epoch visits ``per_epoch * world_size * batch_size`` examples once; the remainder of the
    permutation (fewer than a global batch) is dropped for that epoch only.
    """

    num_examples: int
    batch_size: int
    seed: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self):
        if self.per_epoch < 1:
            raise ValueError(f"{self.num_examples} examples do not fill one global batch of "
                             f"{self.world_size} x {self.batch_size}")

    @property
    def per_epoch(self) -> int:
        """Micro-batches per epoch (per rank)."""
        return self.num_examples // (self.world_size * self.batch_size)

    def indices(self, micro_batch: int) -> torch.Tensor:
        """Example indices ``[batch_size]`` of micro-batch ``micro_batch`` on this rank."""
        epoch, within = divmod(micro_batch, self.per_epoch)
        permutation = _permutation(self.num_examples, self.seed + epoch)
        start = (within * self.world_size + self.rank) * self.batch_size
        return permutation[start : start + self.batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(size: int, seed: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))
