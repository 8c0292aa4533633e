"""The engine: a Hugging Face causal LM from a local directory, and its compressed signal for a batch of jobs.

One call of :meth:`TeacherEngine.score` runs one forward over the sequences of every job (right
padded to the longest: with causal attention, padding after a position cannot change it), then,
job by job, gathers the hidden states of the scored positions only and applies the LM head to
``chunk`` of them at a time, each block going through :func:`atkd.proto.signal.compress`. So neither
the cost of the head nor the memory of the logits grows with unscored (prompt, padding) positions,
and at most one ``[chunk, V]`` block of logits (plus compress's fp32 work on it) exists at once.

Applying the head to the base model's hidden states reproduces the model's logits for GPT-2, OPT,
GPT-NeoX and Llama; :meth:`TeacherEngine.load` checks this on a probe and otherwise (a model that
post-processes its logits, e.g. soft-capping) falls back to the full forward, gathering the scored
rows of the logits it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from atkd.proto.device import resolve_device
from atkd.proto.fingerprint import tokenizer_fingerprint, weights_digest
from atkd.proto.model_id import saved_model_id
from atkd.proto.signal import TeacherSignal, compress, concat_signals, rows_per_chunk

from .request import ScoreJob

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def directory_tokenizer_hash(directory: Path) -> str:
    """Fingerprint of the tokenizer saved in ``directory``, or "" if there is none (clients then check
    only the vocabulary size)."""
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        return ""
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if not hasattr(tokenizer, "backend_tokenizer"):
        log.warning("tokenizer in %s is not a fast tokenizer: publishing no tokenizer hash", directory)
        return ""
    return tokenizer_fingerprint(tokenizer)


class TeacherEngine:
    """A causal LM in inference mode that turns :class:`ScoreJob` batches into :class:`TeacherSignal` s."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        model_id: str,
        revision: str,
        tokenizer_hash: str,
        max_seq_len: int | None = None,
        chunk_size: int | None = None,
    ):
        self.model = model.eval()
        self.model_id = model_id
        self.revision = revision
        self.tokenizer_hash = tokenizer_hash
        self.vocab_size: int = model.config.vocab_size
        context = model.config.max_position_embeddings
        if max_seq_len is not None and max_seq_len > context:
            raise ValueError(f"max_seq_len = {max_seq_len} exceeds the model's context of {context} positions")
        self.max_seq_len: int = max_seq_len or context
        self.chunk_size = rows_per_chunk(self.vocab_size, chunk_size)
        self.head_on_hidden = self._head_reproduces_logits()
        if not self.head_on_hidden:
            log.warning("%s: the LM head on the hidden states does not reproduce the logits; "
                        "computing full logits for every position", model_id)

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        model_id: str | None = None,
        revision: str | None = None,
        max_seq_len: int | None = None,
        chunk_size: int | None = None,
    ) -> TeacherEngine:
        """Load the model (and the tokenizer's fingerprint) from a local directory, never from the hub."""
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model in {directory} (config.json missing)")
        torch_device = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=resolve_dtype(dtype, torch_device), local_files_only=True)
        return cls(
            model.to(torch_device),
            model_id=model_id or saved_model_id(directory),
            revision=revision or weights_digest(directory),
            tokenizer_hash=directory_tokenizer_hash(directory),
            max_seq_len=max_seq_len,
            chunk_size=chunk_size,
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def score(self, jobs: Sequence[ScoreJob]) -> list[TeacherSignal]:
        """One forward over every job's sequences; the signal of each job over its n scored positions
        (flat ``[n]`` positions, on the CPU)."""
        input_ids, first_rows = self._pad(jobs)
        states = self._forward(input_ids)
        return [self._signal(states[job.rows.to(self.device) + first, job.cols.to(self.device)], job)
                for job, first in zip(jobs, first_rows, strict=True)]

    def _pad(self, jobs: Sequence[ScoreJob]) -> tuple[torch.Tensor, list[int]]:
        """Right-padded ``[S, L_max]`` ids of all sequences (pad id 0) and each job's first row."""
        lengths = torch.tensor([n for job in jobs for n in job.lengths])
        rows = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        cols = torch.arange(rows.numel()) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        padded = torch.zeros(lengths.numel(), int(lengths.max()), dtype=torch.int64)
        padded[rows, cols] = torch.cat([job.token_ids for job in jobs])
        first_rows = torch.cumsum(torch.tensor([0] + [len(job.lengths) for job in jobs[:-1]]), 0).tolist()
        return padded.to(self.device), first_rows

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[S, L, H]`` (or logits ``[S, L, V]`` when the head cannot be split off)."""
        if self.head_on_hidden:
            return self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _signal(self, states: torch.Tensor, job: ScoreJob) -> TeacherSignal:
        """compress() of the scored positions' logits, ``chunk_size`` positions at a time."""
        head = self.model.get_output_embeddings() if self.head_on_hidden else torch.nn.Identity()
        targets = job.targets.to(self.device)
        offsets = job.tail_offsets
        parts = [
            compress(head(states[start:start + self.chunk_size]), targets[start:start + self.chunk_size],
                     job.top_k, job.temperature, tail_samples=job.tail_samples, chunk_size=self.chunk_size,
                     tail_estimator=job.tail_estimator, adaptive_tail=job.adaptive_tail,
                     tail_offsets=None if offsets is None else offsets[start:start + self.chunk_size])
            for start in range(0, max(1, job.num_positions), self.chunk_size)  # no positions: one empty chunk
        ]  # fmt: skip
        return concat_signals(parts).to("cpu")

    def _head_reproduces_logits(self) -> bool:
        """Whether head(base_model(x)) equals model(x).logits on a probe input."""
        head = self.model.get_output_embeddings()
        if head is None:
            return False
        probe = (torch.arange(min(8, self.max_seq_len)) % self.vocab_size).unsqueeze(0).to(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=probe, use_cache=False).logits
            hidden = self.model.base_model(input_ids=probe, use_cache=False).last_hidden_state
            split = head(hidden)
        tolerance = 1e-5 if self.dtype == torch.float32 else 1e-2
        return split.shape == logits.shape and torch.allclose(split.float(), logits.float(), rtol=tolerance,
                                                              atol=tolerance)

