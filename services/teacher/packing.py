"""Batches without padding: the sequences of a batch back to back in one row, attention within each sequence.

A packed batch of S sequences of lengths ``L_1 .. L_S`` (``T = sum L_i`` tokens) is one row ``[1, T]``
of token ids with ``position_ids`` that restart at 0 for every sequence, run through the model with
the attention implementation :data:`VARLEN_ATTENTION` and the keyword argument ``packed_segments`` (a
:class:`Segments`), which every layer's attention receives. :func:`varlen_attention` then computes,
for each sequence alone, ``softmax(q k^T * scale + causal) v`` over its own ``L_i`` positions, so

* every position sees exactly what it sees when its sequence runs alone (same positions, same keys):
  the packed forward reproduces the unpacked one (checked per model at load time, see
  :mod:`.engine`);
* the position-wise work (embeddings, projections, MLPs, norms) runs on ``T`` real tokens, none of
  padding, and attention costs ``sum L_i^2``, what the sequences cost alone: the row's length needs
  no bound of its own (a block-diagonal mask over a row of ``R`` tokens would cost ``R^2`` per row,
  hence rows of bounded length, plus the padding that ends every row but the fullest). ``T`` is
  bounded by admission (``max_batch_tokens``), so the cost of a batch follows the tokens admission
  counted.

Sequences of one length share a single ``scaled_dot_product_attention`` call (a batch ``[n, H, L, D]``
gathered by :attr:`Segments.groups`), so a layer makes one call per distinct length: at most
``sqrt(2 T)`` calls, since distinct lengths sum to at most ``T``.

transformers 5 can also derive a block-diagonal mask from restarting ``position_ids`` alone (sdpa,
eager), but it materialises a dense ``[T, T]`` mask, and OPT (which builds a padding mask of its
own) does not reproduce its unpacked forward that way; so the engine passes an all-ones attention
mask (no mask is built: sdpa's ``is_causal`` path) and the segments explicitly.

A model class that cannot pack (its attention bypasses transformers' attention interface, uses a
sliding window, soft-capping, sinks or a position bias, or ignores ``position_ids``) falls back to
padded batches grouped by length (:func:`length_groups`): each group is padded to its longest
sequence, and a sequence joins a group only if that pads it by at most :data:`MAX_PADDING` of its
length, so the padded batch forwards at most ``(1 + MAX_PADDING) x`` the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_ATTENTION = "atkd_varlen"
"""Name of :func:`varlen_attention` in transformers' attention (and mask) interfaces."""

MAX_PADDING = 0.25
"""Padding a sequence may receive in the padded fallback, as a fraction of its length."""


@dataclass(frozen=True)
class Segments:
    """Where the sequences of a packed row lie: ``groups`` holds, for every distinct length ``L``, the
    positions ``[n, L]`` (int64, on the model's device) of the ``n`` sequences of that length."""

    groups: tuple[tuple[int, torch.Tensor], ...]


@dataclass(frozen=True)
class PackedRow:
    """The model inputs of a packed batch: ``input_ids``, ``position_ids`` ``[1, T]`` and the segments."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: Segments

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward. The all-ones mask keeps transformers from deriving a
        dense ``[T, T]`` packed mask from the restarting positions (see the module docstring)."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    attention_mask=torch.ones_like(self.input_ids), packed_segments=self.segments, use_cache=False)


def pack(token_ids: torch.Tensor, lengths: Sequence[int], device: torch.device) -> PackedRow:
    """One row of the sequences ``token_ids [T]`` (back to back, ``lengths``), positions restarting per sequence."""
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    positions = torch.arange(int(lengths_t.sum())) - torch.repeat_interleave(starts, lengths_t)
    groups = []
    for length in torch.unique(lengths_t).tolist():
        group_starts = starts[lengths_t == length]
        groups.append((length, (group_starts[:, None] + torch.arange(length)).to(device)))
    return PackedRow(token_ids.unsqueeze(0).to(device), positions.unsqueeze(0).to(device), Segments(tuple(groups)))


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: Segments | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of a packed row; transformers' sdpa when there are no segments.

    ``query [1, H, T, D]``, ``key``/``value [1, H_kv, T, D]`` (grouped-query attention when
    ``H_kv < H``); returns ``[1, T, H, D_v]`` as transformers' attention functions do. Raises
    ``NotImplementedError`` for what it cannot reproduce (the engine's probe then falls back to padding).
    """
    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    unsupported = [name for name in ("softcap", "sliding_window", "s_aux", "position_bias")
                   if kwargs.get(name) is not None]
    if unsupported or attention_mask is not None or query.shape[0] != 1:
        raise NotImplementedError(f"packed attention cannot reproduce {unsupported or 'an explicit mask'}")
    gqa = key.shape[1] != query.shape[1]
    query, key, value = query[0], key[0], value[0]  # [H, T, D]
    output = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
    for length, positions in packed_segments.groups:  # positions [n, L]: a batch of n sequences
        attended = torch.nn.functional.scaled_dot_product_attention(
            query[:, positions].transpose(0, 1), key[:, positions].transpose(0, 1),
            value[:, positions].transpose(0, 1), dropout_p=dropout, is_causal=length > 1, scale=scaling,
            enable_gqa=gqa)  # [n, H, L, D_v]
        output[:, positions] = attended.transpose(0, 1)
    return output.transpose(0, 1).unsqueeze(0).contiguous(), None


def length_groups(lengths: Sequence[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of the sequences grouped for padded batches, longest first: a sequence of length ``L``
    joins the current group (padded to its first, longest, ``L_0``) iff ``L_0 - L <= max_padding * L``.
    So the group pads to at most ``(1 + max_padding) x`` its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups and lengths[groups[-1][0]] - lengths[index] <= max_padding * lengths[index]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
