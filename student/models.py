"""Tiny causal LMs of the paper's families, built from configs, saved to and loaded from local directories.

Families: GPT-2, OPT, GPT-NeoX (Pythia) and Llama. Models are built with
``AutoModelForCausalLM.from_config`` and saved to / loaded from local directories only (no hub).
Pre-training is :func:`atkd.student.pretrain.pretrain`, evaluation :mod:`atkd.student.evaluation`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from atkd.proto.model_id import MODEL_ID_KEY
from atkd.student.data.tokenizer import EOS_ID, PAD_ID

FAMILIES = ("gpt2", "opt", "gpt_neox", "llama")

SIZES = {
    "teacher": dict(hidden=256, layers=4, heads=4),
    "student": dict(hidden=128, layers=2, heads=4),
}
"""Named dimensions. With a 4096-token vocabulary the teacher has 4.3M parameters (GPT-2, OPT), 5.3M
(GPT-NeoX) or 6.3M (Llama: untied embeddings, gated MLP); the student 1.0M to 1.6M."""


def tiny_config(
    family: str,
    vocab_size: int,
    *,
    hidden: int,
    layers: int,
    heads: int,
    max_len: int = 512,
    intermediate: int | None = None,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
) -> PretrainedConfig:
    """Config of a small ``family`` model. bos = eos = ``eos_id`` and pad = ``pad_id`` (the layout of
    :func:`atkd.student.data.tokenizer.train_tokenizer`); the MLP width defaults to ``4 * hidden``;
    dropout is off; embeddings are tied as in each family's released models (GPT-2, OPT: tied;
    Pythia, Llama: untied)."""
    intermediate = intermediate or 4 * hidden
    ids = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_len, n_embd=hidden, n_layer=layers, n_head=heads,
            n_inner=intermediate, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )  # fmt: skip
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            ffn_dim=intermediate, max_position_embeddings=max_len, word_embed_proj_dim=hidden,
            dropout=0.0, attention_dropout=0.0, **ids,
        )  # fmt: skip
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate, max_position_embeddings=max_len, **ids,
        )  # fmt: skip
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate, max_position_embeddings=max_len, **ids,
        )  # fmt: skip
    raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")


def build_model(family: str, vocab_size: int, size_or_dims: str | dict, seed: int) -> PreTrainedModel:
    """A freshly initialised model: ``size_or_dims`` names an entry of :data:`SIZES` or gives
    :func:`tiny_config` keywords. The same seed gives the same weights; the global RNG is untouched."""
    dims = SIZES[size_or_dims] if isinstance(size_or_dims, str) else size_or_dims
    config = tiny_config(family, vocab_size, **dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def save_model(model: PreTrainedModel, directory: Path, *, tokenizer: PreTrainedTokenizerBase | None = None,
               model_id: str | None = None) -> None:
    """Write config and safetensors weights to ``directory``; with ``tokenizer``, its files too (a complete
    model directory, what ``atkd-teacher serve --model`` and a training config's ``student:`` load), and with
    ``model_id``, the id a teacher serving it publishes (:mod:`atkd.proto.model_id`)."""
    if model_id is not None:
        setattr(model.config, MODEL_ID_KEY, model_id)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_model(directory: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> PreTrainedModel:
    """Load a model saved by :func:`save_model`, in eval mode, from a local directory only (a missing
    directory raises rather than being read as a hub repo id)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no saved model in {directory} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    return model.to(device).eval()
