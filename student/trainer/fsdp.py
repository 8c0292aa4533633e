"""Sharded students: FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``parallel: fsdp`` under torchrun.

Each transformer block (the classes a model lists in ``_no_split_modules``) is one FSDP2 group and the model
itself the root group (embeddings, final norm and the head, tied or not, which the fused head uses inside
the root's forward). Parameters, gradients and AdamW state are sharded over the ranks on dim 0 (DTensors);
a forward all-gathers a group's parameters just before it needs them and the backward reduce-scatters the
gradients (averaged over the ranks, as DDP's all-reduce). ``precision: bf16`` becomes FSDP2's
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: bf16 compute on bf16 copies of the
parameters, fp32 gradient reduction, fp32 sharded parameters and optimizer state (no autocast).

Checkpoints are sharded with ``torch.distributed.checkpoint`` (each rank writes its own shards of model and
optimizer, :func:`save_sharded` / :func:`load_sharded`, collectives on every rank); the final model is
gathered once into a complete Hugging Face directory (:func:`full_state_dict`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def shard(model: nn.Module, precision: str = "fp32") -> FSDPModule:
    """Shard ``model`` in place over the default process group: one group per transformer block, the rest in
    the root. Raises ValueError for a model that names no block classes (``_no_split_modules``)."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ValueError(f"parallel=fsdp: {type(model).__name__} names no transformer block classes "
                         "(_no_split_modules) to shard by")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. the global gradient norm) as a plain tensor; a tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state to ``directory`` (a collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank reads its shards from ``directory`` into the sharded model and optimizer (a collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete model state on the CPU, gathered from the shards: a collective, rank 0 gets the state and
    the other ranks an empty dict."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
