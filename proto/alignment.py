"""The alignment contract: position t of a sequence is scored with target t + 1. Defined here, once.

Every part of the project that pairs a prediction with its target goes through these functions:
the teacher server (which positions of the packed sequences of a ``ScoreRequest`` it scores), the
student's client (where the scored positions of a padded batch lie, and their targets), and the
student's batches (``logits[b, t]`` predicts ``targets[b, t]``; ``targets == IGNORE_INDEX`` is ignored).

Two forms of the same rule:

- **packed** (the wire): sequences back to back with their ``lengths``; :func:`scored_positions`
  gives each scored position's sequence, column and flat index; its target is the token at flat + 1.
- **windows** (the student's batches): a window of T + 1 tokens is T inputs and T targets
  (:func:`split_window`); :func:`join_window` turns inputs and targets back into the T + 1 tokens a
  teacher scores, with a score mask that leaves out ignored targets.

numpy for the packed form: the server runs it on its event loop, where a torch op would start an
OpenMP team of its own next to the forward's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
"""A target that no loss, metric or teacher scores (prompt tokens, padding, a sequence's last position)."""


def scored_positions(
    lengths: Sequence[int] | np.ndarray, score_mask: Sequence[bool] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence ``rows [n]``, position ``cols [n]``, flat index ``flat [n]``) of every scored position
    of sequences packed back to back with ``lengths [S]``: a position is scored when it is not the last
    of its sequence and, if a ``score_mask [sum(lengths)]`` is given, flagged. Its target is the token
    at ``flat + 1``. Ordered sequence by sequence, position ascending (the order of a response)."""
    sizes = np.asarray(lengths, dtype=np.int64)
    rows = np.repeat(np.arange(sizes.size), sizes)
    flat = np.arange(sizes.sum())
    cols = flat - (np.cumsum(sizes) - sizes)[rows]
    scored = cols < sizes[rows] - 1
    if score_mask is not None and len(score_mask):
        scored &= np.asarray(score_mask, dtype=bool)
    return rows[scored], cols[scored], flat[scored]


def split_window(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``window [..., T + 1]`` tokens -> (``input_ids [..., T]``, ``targets [..., T]``): the target of
    position t is token t + 1."""
    return window[..., :-1], window[..., 1:]


def join_window(input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`split_window` for a teacher: (``ids [B, T + 1]``, ``score_mask [B, T + 1]``).

    ``ids`` are the inputs followed by the last target (an ignored one becomes token 0, never
    scored); ``score_mask`` flags the positions whose target is not ignored, so the teacher scores
    exactly the student's targets and its signal for the first T positions lines up with ``targets``.
    """
    has_target = targets != IGNORE_INDEX
    ids = torch.cat([input_ids, targets[:, -1:].clamp(min=0)], dim=1)
    mask = torch.cat([has_target, torch.zeros_like(has_target[:, :1])], dim=1)
    return ids, mask
