"""The engine: a Hugging Face causal LM from a local directory, and its compressed signal for a batch of jobs.

One call of :meth:`TeacherEngine.score` runs the sequences of every job through the model without
padding: packed back to back in one row, positions restarting per sequence, attention within each
sequence (:mod:`.packing`), so the forward costs what the batch's real tokens cost, the tokens
admission counted. It then, job by job, gathers the hidden states of the scored positions only and
applies the LM head to ``chunk`` of them at a time, each block going through
:func:`atkd.proto.signal.compress`. So neither the cost of the head nor the memory of the logits grows
with unscored (prompt) positions, and at most one ``[chunk, V]`` block of logits (plus compress's fp32
work on it) exists at once.

:meth:`TeacherEngine.__init__` checks two things on probe inputs and falls back where they fail:

* the head applied to the base model's hidden states reproduces the model's logits (GPT-2, OPT,
  GPT-NeoX, Llama); otherwise (a model that post-processes its logits, e.g. soft-capping) the engine
  runs the full forward and gathers the scored rows of the logits it returns;
* a packed forward of several sequences reproduces their forwards one at a time; otherwise (a model
  class that cannot pack, see :mod:`.packing`) the sequences run right-padded (with causal attention,
  padding after a position cannot change it), in groups of similar lengths so that at most
  :data:`~.packing.MAX_PADDING` of each sequence's length is padding (:func:`~.packing.length_groups`).

:attr:`TeacherEngine.forwarded_tokens` counts the tokens that went through the model, padding
included: equal to the admitted tokens when packed, at most ``1 + MAX_PADDING`` times them otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from atkd.proto.device import resolve_device
from atkd.proto.fingerprint import tokenizer_fingerprint, weights_digest
from atkd.proto.model_id import saved_model_id
from atkd.proto.signal import TeacherSignal, compress, concat_signals, rows_per_chunk

from .packing import VARLEN_ATTENTION, length_groups, pack
from .request import ScoreJob

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

Packing = Literal["auto", "off"]


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
    """A causal LM in inference mode that turns :class:`ScoreJob` batches into :class:`TeacherSignal` s.

    ``packing``: ``auto`` packs when the model reproduces its unpacked forward that way (see the module
    docstring), ``off`` always pads (grouped by length).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        model_id: str,
        revision: str,
        tokenizer_hash: str,
        max_seq_len: int | None = None,
        chunk_size: int | None = None,
        packing: Packing = "auto",
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
        self.forwarded_tokens = 0  # tokens through the model so far, padding included
        self.head_on_hidden = self._head_reproduces_logits()
        if not self.head_on_hidden:
            log.warning("%s: the LM head on the hidden states does not reproduce the logits; "
                        "computing full logits for every position", model_id)
        self.packed = packing == "auto" and self._packing_reproduces_forward()
        if packing == "auto" and not self.packed:
            log.warning("%s: a packed forward does not reproduce the unpacked one; padding sequences "
                        "(grouped by length)", model_id)

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
        packing: Packing = "auto",
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
            packing=packing,
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
        lengths = [n for job in jobs for n in job.lengths]
        token_ids = torch.cat([job.token_ids for job in jobs])
        states = self._scored_states(token_ids, lengths, self._scored_positions(jobs, lengths))
        parts = torch.tensor([job.num_positions for job in jobs]).cumsum(0).tolist()
        return [self._signal(states[end - job.num_positions:end], job) for job, end in zip(jobs, parts, strict=True)]

    @staticmethod
    def _scored_positions(jobs: Sequence[ScoreJob], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, position) of every job's scored positions, jobs back to back: ``[n_total]`` each,
        sequences numbered over the whole batch."""
        first_rows = torch.tensor([0] + [len(job.lengths) for job in jobs[:-1]]).cumsum(0)
        sequences = torch.cat([job.rows + first for job, first in zip(jobs, first_rows.tolist(), strict=True)])
        return sequences, torch.cat([job.cols for job in jobs])

    def _scored_states(self, token_ids: torch.Tensor, lengths: list[int],
                       scored: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Hidden states ``[n_total, H]`` (logits ``[n_total, V]`` when the head cannot be split off) of the
        scored positions ``scored`` of the sequences ``token_ids [T]`` (back to back, ``lengths``)."""
        sequences, positions = scored
        lengths_t = torch.tensor(lengths)
        if self.packed:
            row = pack(token_ids, lengths, self.device)
            self.forwarded_tokens += token_ids.numel()
            flat = (torch.cumsum(lengths_t, 0) - lengths_t)[sequences] + positions
            return self._forward(**row.model_inputs())[0, row.index[flat].to(self.device)]
        states = None
        starts = (torch.cumsum(lengths_t, 0) - lengths_t).tolist()
        for group in length_groups(lengths):
            padded = torch.zeros(len(group), lengths[group[0]], dtype=torch.int64)
            for row, index in enumerate(group):
                padded[row, :lengths[index]] = token_ids[starts[index]:starts[index] + lengths[index]]
            self.forwarded_tokens += padded.numel()
            row_of = torch.full((len(lengths),), -1)
            row_of[group] = torch.arange(len(group))
            wanted = torch.nonzero(row_of[sequences] >= 0).squeeze(1)
            out = self._forward(input_ids=padded.to(self.device), use_cache=False)
            if states is None:
                states = out.new_empty(sequences.numel(), out.shape[-1])
            states[wanted.to(self.device)] = out[row_of[sequences[wanted]].to(self.device),
                                                 positions[wanted].to(self.device)]
        return states

    def _forward(self, **inputs) -> torch.Tensor:
        """Hidden states ``[S, L, H]`` (or logits ``[S, L, V]`` when the head cannot be split off)."""
        if self.head_on_hidden:
            return self.model.base_model(**inputs).last_hidden_state
        return self.model(**inputs).logits

    def _signal(self, states: torch.Tensor, job: ScoreJob) -> TeacherSignal:
        """compress() of the scored positions' logits, ``chunk_size`` positions at a time."""
        head = self.model.get_output_embeddings() if self.head_on_hidden else torch.nn.Identity()
        targets = job.targets.to(self.device)
        offsets = job.tail_offsets
        parts = [
            compress(head(states[start:start + self.chunk_size]), targets[start:start + self.chunk_size],
                     job.top_k, job.temperature, tail_samples=job.tail_samples, chunk_size=self.chunk_size,
                     tail_estimator=job.tail_estimator, adaptive_tail=job.adaptive_tail,
                     tail_ids_only=job.tail_ids_only,
                     tail_offsets=None if offsets is None else offsets[start:start + self.chunk_size])
            for start in range(0, max(1, job.num_positions), self.chunk_size)  # no positions: one empty chunk
        ]  # fmt: skip
        return concat_signals(parts).to("cpu")

    @property
    def _tolerance(self) -> float:
        return 1e-5 if self.dtype == torch.float32 else 1e-2

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
        return split.shape == logits.shape and torch.allclose(split.float(), logits.float(), rtol=self._tolerance,
                                                              atol=self._tolerance)

    def _packing_reproduces_forward(self) -> bool:
        """Switch the model to packed attention if a packed forward of probe sequences reproduces their
        forwards one at a time; else leave the model as it was. The lengths 8, 5, 8, 3, 2 give every kind
        of attention call (equal lengths on a view, a single sequence, windows gathered up to the row's
        end). A model that positions a sequence after the previous one, or lets it attend to it, fails."""
        lengths = [min(n, self.max_seq_len) for n in (8, 5, 8, 3, 2)]
        token_ids = (torch.arange(sum(lengths)) * 7 + 3) % self.vocab_size
        original = self.model.config._attn_implementation
        with torch.inference_mode():
            alone = torch.cat([self._forward(input_ids=sequence.unsqueeze(0).to(self.device), use_cache=False)[0]
                               for sequence in token_ids.split(lengths)])
            try:
                self.model.set_attn_implementation(VARLEN_ATTENTION)
                row = pack(token_ids, lengths, self.device)
                packed = self._forward(**row.model_inputs())[0, row.index.to(self.device)]
            except Exception as error:  # any failure to pack means: do not pack
                log.info("%s: packed forward failed (%s: %s)", self.model_id, type(error).__name__, error)
                packed = None
        if packed is not None and torch.allclose(packed.float(), alone.float(), rtol=self._tolerance,
                                                 atol=self._tolerance):
            return True
        self.model.set_attn_implementation(original)
        return False
