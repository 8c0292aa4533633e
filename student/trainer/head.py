"""The fused LM head inside a Hugging Face causal LM: its forward hands the loss hidden states, not logits.

While :func:`deferred_head` is active, the model's output embedding (``get_output_embeddings()``, an
``nn.Linear``) returns a :class:`~atkd.student.losses.HeadLogits` of its input instead of computing
``[B, T, V]`` logits, so ``model(input_ids).logits`` is what every loss takes, and the loss computes the
logits chunk by chunk (:mod:`atkd.student.losses.fused_head`). The model's own forward still runs: DDP's
and FSDP2's hooks see a forward as usual, and the head's weight (tied to the input embedding or not) is
the one that forward uses, unsharded under FSDP2.

A model allows it when its forward returns what its output embedding returned, untouched: no logit
soft-capping (Gemma 2), scaling (Cohere, Granite) or casting after the head. :func:`fused_head_unsupported`
checks exactly that with one probe forward on two tokens, and says why not otherwise (the trainer then
computes logits as before).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import MethodType

import torch
from torch import nn

from atkd.student.losses import HeadLogits


def _deferred_forward(self: nn.Linear, hidden: torch.Tensor) -> HeadLogits:
    return HeadLogits(hidden, self.weight, self.bias)


@contextlib.contextmanager
def deferred_head(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s output embedding returns :class:`HeadLogits` instead of logits."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the fused head needs an nn.Linear output embedding, {type(model).__name__} has "
                        f"{type(head).__name__}")
    head.forward = MethodType(_deferred_forward, head)  # an instance attribute: state_dict and hooks unchanged
    try:
        yield
    finally:
        del head.forward


def fused_head_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot use the fused head, or None when it can (see the module docstring).

    The probe runs in eval mode without gradients on ``[[0, 1]]`` and restores the training mode."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        return f"its output embedding is {type(head).__name__}, not an nn.Linear"
    device = head.weight.device
    probe = torch.tensor([[0, 1]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=probe).logits
            with deferred_head(model):
                try:
                    deferred = model(input_ids=probe).logits
                except (TypeError, AttributeError, RuntimeError) as error:  # e.g. soft-capping a HeadLogits
                    return f"its forward post-processes the logits ({type(error).__name__}: {error})"
    finally:
        model.train(was_training)
    if not isinstance(deferred, HeadLogits):
        return f"its forward post-processes the logits (returned {type(deferred).__name__})"
    if deferred.shape != logits.shape or not torch.allclose(deferred.materialise().to(logits.dtype), logits,
                                                             rtol=1e-4, atol=1e-5):
        return "its logits are not its output embedding of its last hidden states"
    return None
