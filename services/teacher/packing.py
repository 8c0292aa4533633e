"""Batches without padding: the sequences of a batch back to back in one row, attention within each sequence.

A packed batch of S sequences of lengths ``L_1 .. L_S`` (``T = sum L_i`` tokens) is one row ``[1, T]``
of token ids with ``position_ids`` that restart at 0 for every sequence, run through the model with
the attention implementation :data:`VARLEN_ATTENTION` and the keyword argument ``packed_segments`` (a
:class:`Segments`), which every layer's attention receives. :func:`varlen_attention` then computes,
for each sequence alone, ``softmax(q k^T * scale + causal) v`` over its own positions, so

* every position sees exactly what it sees when its sequence runs alone (same positions, same keys):
  the packed forward reproduces the unpacked one (checked per model at load time, see
  :mod:`.engine`);
* the position-wise work (embeddings, projections, MLPs, norms: nearly all of a forward) runs on
  the ``T`` real tokens, none of padding. ``T`` is bounded by admission (``max_batch_tokens``), so
  the cost of a batch follows the tokens admission counted.

Row length. All sequences go into one row: attention never spans the row (a block-diagonal mask over
a row of ``R`` tokens would cost ``R^2`` per row, whence rows of bounded length, each ending in
padding; here attention is computed per sequence), so the row's length costs nothing by itself.

Attention windows. Attention runs as few ``scaled_dot_product_attention`` calls as possible (each
call is a parallel region: on a loaded CPU, 16 calls of one short sequence each cost several times one
call of 16 sequences). The row holds the sequences longest first; :func:`length_groups` cuts it
into groups in which every length ``L`` is within ``1 + ATTENTION_PADDING`` of the group's longest
``W``, and each group is one call on a batch ``[n, H, W, D]`` of windows of ``W`` positions starting
where each sequence starts. A window runs past its sequence into the next ones; with causal
attention, positions of the sequence never see those keys, and what the extra positions compute is
dropped. So a sequence's attention costs at most ``(1 + ATTENTION_PADDING)^2`` times its own
``L^2`` (2.25x; attention is a small part of the forward at these lengths) and a layer makes at most
``1 + log(L_max / L_min) / log(1 + ATTENTION_PADDING)`` calls (5 for lengths 16 .. 256).

transformers 5 can also derive a block-diagonal mask from restarting ``position_ids`` alone (sdpa,
eager), but it materialises a dense ``[T, T]`` mask, and OPT (which builds a padding mask of its
own) does not reproduce its unpacked forward that way; so the engine passes an all-ones attention
mask (no mask is built: sdpa's ``is_causal`` path) and the segments explicitly.

A model class that cannot pack (its attention bypasses transformers' attention interface, uses a
sliding window, soft-capping, sinks or a position bias, or ignores ``position_ids``) falls back to
padded batches grouped by length (:func:`length_groups` again): each group is padded to its longest
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

ATTENTION_PADDING = 0.5
"""How far past its sequence an attention window may reach, as a fraction of the sequence's length."""


@dataclass(frozen=True)
class Window:
    """One attention call of a packed row: ``n`` windows of ``width`` positions. ``gather [n * width]``:
    the row positions of the windows, one after the other (clamped to the row); ``keep``: the positions
    of that ``[n * width]`` batch that belong to their sequence, in row order. Both are None when the
    ``n`` sequences all have length ``width``: the windows are then the row's positions ``start`` to
    ``start + n * width``, a view (no copy)."""

    width: int
    start: int
    n: int
    gather: torch.Tensor | None = None
    keep: torch.Tensor | None = None


@dataclass(frozen=True)
class Segments:
    """The attention calls of a packed row, covering its positions in order."""

    windows: tuple[Window, ...]


@dataclass(frozen=True)
class PackedRow:
    """A packed batch: ``input_ids`` and ``position_ids`` ``[1, T]``, the segments, and ``index [T]``:
    where each of the caller's tokens (back to back, in the caller's order) lies in the row."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: Segments
    index: torch.Tensor

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward. The all-ones mask keeps transformers from deriving a
        dense ``[T, T]`` packed mask from the restarting positions (see the module docstring)."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    attention_mask=torch.ones_like(self.input_ids), packed_segments=self.segments, use_cache=False)


def pack(token_ids: torch.Tensor, lengths: Sequence[int], device: torch.device) -> PackedRow:
    """One row of the sequences ``token_ids [T]`` (back to back, ``lengths``): longest first, positions
    restarting per sequence, one :class:`Window` per group of :func:`length_groups` (``ATTENTION_PADDING``)."""
    groups = length_groups(lengths, ATTENTION_PADDING)
    order = torch.tensor([i for group in groups for i in group])
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    row_lengths = lengths_t[order]
    starts_in, starts_row = torch.cumsum(lengths_t, 0) - lengths_t, torch.cumsum(row_lengths, 0) - row_lengths
    total = int(lengths_t.sum())
    positions = torch.arange(total) - torch.repeat_interleave(starts_row, row_lengths)
    source = torch.repeat_interleave(starts_in[order] - starts_row, row_lengths) + torch.arange(total)
    index = torch.empty_like(source)
    index[source] = torch.arange(total)
    windows, first = [], 0
    for group in groups:
        width, group_starts = lengths[group[0]], starts_row[first:first + len(group)]
        group_lengths = row_lengths[first:first + len(group)]
        if (group_lengths == width).all():
            windows.append(Window(width, int(group_starts[0]), len(group)))
        else:
            gather = (group_starts[:, None] + torch.arange(width)).clamp(max=total - 1).flatten()
            keep = (torch.arange(len(group))[:, None] * width + torch.arange(width))[
                torch.arange(width) < group_lengths[:, None]]
            windows.append(Window(width, int(group_starts[0]), len(group), gather.to(device), keep.to(device)))
        first += len(group)
    return PackedRow(token_ids[source].unsqueeze(0).to(device), positions.unsqueeze(0).to(device),
                     Segments(tuple(windows)), index)


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
    """Causal attention within each sequence of a packed row; transformers' sdpa when there are no segments.

    ``query [1, H, T, D]``, ``key``/``value [1, H_kv, T, D]`` (grouped-query attention when
    ``H_kv < H``); returns ``[1, T, H, D_v]`` as transformers' attention functions do. Each window
    group is one ``scaled_dot_product_attention`` call on ``[n, H, width, D]``, laid out as an unpadded
    batch would be. Raises ``NotImplementedError`` for what it cannot reproduce (the engine's probe
    then falls back to padding).
    """
    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    unsupported = [name for name in ("softcap", "sliding_window", "s_aux", "position_bias")
                   if kwargs.get(name) is not None]
    if unsupported or attention_mask is not None or query.shape[0] != 1:
        raise NotImplementedError(f"packed attention cannot reproduce {unsupported or 'an explicit mask'}")
    gqa = key.shape[1] != query.shape[1]
    query, key, value = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]

    def windows(x: torch.Tensor, window: Window) -> torch.Tensor:  # [n, H, width, D]
        if window.gather is None:
            rows = x[window.start:window.start + window.n * window.width]
        else:
            rows = x.index_select(0, window.gather)
        return rows.unflatten(0, (window.n, window.width)).transpose(1, 2)

    parts = []  # [tokens of the group, H, D_v] per window group, in row order
    for window in packed_segments.windows:
        attended = torch.nn.functional.scaled_dot_product_attention(
            windows(query, window), windows(key, window), windows(value, window), dropout_p=dropout,
            is_causal=window.width > 1, scale=scaling, enable_gqa=gqa).transpose(1, 2).flatten(0, 1)
        parts.append(attended if window.keep is None else attended.index_select(0, window.keep))
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).unsqueeze(0), None


def length_groups(lengths: Sequence[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of the sequences grouped longest first: a sequence of length ``L`` joins the current group
    (whose first, longest, sequence has ``L_0``) iff ``L_0 - L <= max_padding * L``. Padded to ``L_0``,
    a group holds at most ``(1 + max_padding) x`` its real tokens."""
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
