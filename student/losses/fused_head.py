"""The LM head fused with the loss: every loss of the library on hidden states, never on ``[N, V]`` logits.

The student's logits are ``z = h W^T + b``: final hidden states ``h [*P, H]``, the head weight ``W [V, H]``
(an output embedding tied to the input one is the same tensor) and a bias ``b [V]`` or None.
:class:`HeadLogits` stands for ``z`` without computing it, and every loss of
:data:`~atkd.student.losses.LOSSES` takes one where it takes logits, with the same value and gradients:

    atkd_loss(HeadLogits(hidden, weight), teacher, targets)  ==  atkd_loss(hidden @ weight.T, teacher, targets)

Nothing of a loss is re-derived here. A loss builds its :class:`~atkd.student.losses.batch.LossBatch`
and computes whatever is batch-global from the teacher alone (ATKD's split by the teacher's UnC) before
touching the student, then hands its per-chunk math to
:func:`~atkd.student.losses.batch.fused_chunked_sum`, which passes it to :meth:`HeadLogits.chunked_sum`.
That runs, block by block of ``block_rows`` valid positions (rows ``r``, ``n`` of them):

    Z = h_r W^T + b                       [n, V]  one matmul, in the compute dtype
    G = dL/dZ                             the loss's own chunks, each: logits in fp32 -> loss -> autograd,
                                          the chunk's gradient written over its rows of Z
    dL/dh_r = G W,   dL/dW += G^T h_r,   dL/db += sum_r G

all during the forward, as ``fused_chunked_sum`` does for logits; backward only scales the saved
gradients by the upstream one. The FLOPs are today's (three ``N x H x V`` matmuls, no recomputation);
the memory beyond the inputs is one ``[block_rows, V]`` buffer, one chunk's temporaries and the
gradients ``dW [V, H]``, ``dh [*P, H]`` that any path ends with, instead of the ``[N, V]`` logits and
their ``[N, V]`` gradient.

Compute dtype: under autocast (e.g. bf16) the matmuls run in the autocast dtype, as the model's own
``nn.Linear`` head would; otherwise in the promoted dtype of ``h`` and ``W``. The loss math is in fp32
(fp64 stays fp64) either way, and ``dW`` is summed over blocks in fp32.
"""

from __future__ import annotations

import torch

from atkd.proto.signal import rows_per_chunk

#: Valid positions per block matmul: enough rows that ``dW += G^T h_r`` is compute-bound, few enough that the
#: ``[block_rows, V]`` buffer stays small (V = 152k: 156 MB in fp32).
DEFAULT_BLOCK_ROWS = 256

#: Elements of one loss chunk ``[rows, V]`` when the loss gives no chunk size: a quarter of the logits path's
#: default, since here the chunks' temporaries (~6 of them), not an ``[N, V]`` gradient, set the peak.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


class HeadLogits:
    """Student logits ``hidden @ weight.T + bias`` (``[*P, V]``), computed chunk by chunk inside a loss.

    Args:
        hidden: final hidden states ``[*P, H]`` (e.g. ``[B, T, H]``, or ``[N, H]`` at the valid positions only,
            with targets ``[N]`` and a teacher over ``[N]``).
        weight: the head weight ``[V, H]`` (``model.get_output_embeddings().weight``).
        bias: the head bias ``[V]``, or None.
        block_rows: valid positions per block matmul (see the module docstring).

    Has the ``shape``, ``dtype``, ``device`` and ``requires_grad`` of the logits it stands for; ``dtype``
    is the compute dtype, fixed when it is made (the autocast state then counts).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 block_rows: int = DEFAULT_BLOCK_ROWS):
        if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"hidden [*P, H] and weight [V, H] do not fit: {tuple(hidden.shape)}, "
                             f"{tuple(weight.shape)}")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.hidden, self.weight, self.bias, self.block_rows = hidden, weight, bias, block_rows
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            self.dtype = torch.get_autocast_dtype(device_type)
        else:
            self.dtype = torch.promote_types(hidden.dtype, weight.dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def requires_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.hidden, self.weight, self.bias))

    def reshape(self, *shape: int) -> HeadLogits:
        """The same logits with positions flattened: only ``reshape(-1, V)`` is meaningful."""
        if len(shape) != 2 or shape[0] != -1 or shape[1] != self.weight.shape[0]:
            raise ValueError(f"HeadLogits can only be flattened to (-1, V), asked for {shape}")
        flat = HeadLogits(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias,
                          block_rows=self.block_rows)
        flat.dtype = self.dtype
        return flat

    def contiguous(self) -> HeadLogits:
        """Itself: a model that calls ``.contiguous()`` on its head's output (OPT) changes nothing by it."""
        return self

    def materialise(self) -> torch.Tensor:
        """The logits ``[*P, V]`` as one tensor (for checks and small inputs; the point of this class is not to)."""
        return _project(self.hidden.to(self.dtype), self.weight.to(self.dtype), _cast(self.bias, self.dtype))

    def chunked_sum(self, batch, chunk_loss, chunk_size: int | None) -> torch.Tensor:
        """``sum over the loss's chunks of chunk_loss(positions, logits chunk)`` for a flattened
        :class:`~atkd.student.losses.batch.LossBatch` whose ``logits`` is this object; differentiable in
        ``hidden``, ``weight`` and ``bias``."""
        if self.requires_grad and torch.is_grad_enabled():
            return _FusedHeadSum.apply(self.hidden, self.weight, self.bias, self, batch, chunk_loss, chunk_size)
        with torch.no_grad():
            return _head_sum(self, batch, chunk_loss, chunk_size, grads=None)


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _blocks(num_valid: int, block_rows: int, chunk_rows: int):
    """(block, its chunks): slices of the valid positions; a block holds whole chunks."""
    block_rows = max(block_rows, chunk_rows)
    for start in range(0, num_valid, block_rows):
        stop = min(start + block_rows, num_valid)
        yield slice(start, stop), [slice(c, min(c + chunk_rows, stop)) for c in range(start, stop, chunk_rows)]


class _Grads:
    """Gradient accumulators for the head's inputs; None where an input needs none."""

    def __init__(self, head: HeadLogits, needs: tuple[bool, bool, bool]):
        accumulate = torch.promote_types(head.weight.dtype, torch.float32)
        self.hidden = torch.zeros_like(head.hidden) if needs[0] else None
        self.weight = torch.zeros_like(head.weight, dtype=accumulate) if needs[1] else None
        self.bias = torch.zeros_like(head.bias, dtype=accumulate) if needs[2] else None


def _head_sum(head: HeadLogits, batch, chunk_loss, chunk_size: int | None, grads: _Grads | None) -> torch.Tensor:
    total = torch.zeros((), dtype=batch.work_dtype, device=head.device)
    weight, bias = head.weight.detach().to(head.dtype), _cast(head.bias, head.dtype)
    bias = None if bias is None else bias.detach()
    hidden = head.hidden.detach()
    vocab = head.shape[-1]
    chunk_rows = rows_per_chunk(vocab, chunk_size) if chunk_size else max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    with torch.autocast(head.device.type, enabled=False):
        for block, chunks in _blocks(batch.num_valid, head.block_rows, chunk_rows):
            rows = batch.valid_rows[block]
            block_hidden = hidden.index_select(0, rows).to(head.dtype)
            logits = _project(block_hidden, weight, bias)  # [n, V]; becomes dL/dlogits chunk by chunk
            for positions in chunks:
                local = slice(positions.start - block.start, positions.stop - block.start)
                chunk = logits[local].detach().to(batch.work_dtype)
                if grads is None:
                    total += chunk_loss(positions, chunk)
                    continue
                chunk.requires_grad_(True)
                with torch.enable_grad():
                    loss = chunk_loss(positions, chunk)
                (grad,) = torch.autograd.grad(loss, chunk)
                logits[local] = grad
                total += loss.detach()
            if grads is not None:
                _add_block_grads(grads, logits, rows, block_hidden, weight)
            del logits  # before the next block's is made: one [block_rows, V] buffer at a time
    return total


def _add_block_grads(grads: _Grads, grad_logits: torch.Tensor, rows: torch.Tensor, block_hidden: torch.Tensor,
                     weight: torch.Tensor) -> None:
    """dh_r = G W, dW += G^T h_r, db += sum_r G for one block's gradient ``G [n, V]``."""
    if grads.hidden is not None:
        grads.hidden.index_copy_(0, rows, (grad_logits @ weight).to(grads.hidden.dtype))
    if grads.weight is not None:
        if grads.weight.dtype == grad_logits.dtype:
            grads.weight.addmm_(grad_logits.t(), block_hidden)  # in place: no [V, H] temporary
        else:
            grads.weight += grad_logits.t() @ block_hidden  # low-precision block product, fp32 sum
    if grads.bias is not None:
        grads.bias += grad_logits.sum(0)


class _FusedHeadSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, head, batch, chunk_loss, chunk_size):
        grads = _Grads(head, tuple(ctx.needs_input_grad[:3]))
        total = _head_sum(head, batch, chunk_loss, chunk_size, grads)
        ctx.grads = grads
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads, (weight_dtype, bias_dtype) = ctx.grads, ctx.dtypes
        del ctx.grads  # a second backward through this graph has nothing left to return

        def scaled(grad, dtype):
            if grad is None:
                return None
            if not bool(grad_total == 1):  # the usual case (loss.backward()) needs no second buffer
                grad = grad * grad_total
            return grad.to(dtype)

        hidden_grad = scaled(grads.hidden, grads.hidden.dtype if grads.hidden is not None else None)
        return (hidden_grad, scaled(grads.weight, weight_dtype), scaled(grads.bias, bias_dtype),
                None, None, None, None)


def fused_head_loss(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, teacher, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, block_rows: int = DEFAULT_BLOCK_ROWS):
    """``loss_fn`` (a loss of :data:`~atkd.student.losses.LOSSES`, options bound) on the logits
    ``hidden @ weight.T + bias`` without materialising them: hidden ``[*P, H]`` (e.g. ``[N, H]`` at the valid
    positions), weight ``[V, H]``, targets ``[*P]``, teacher over ``P``. Returns its
    :class:`~atkd.student.losses.LossResult`; ``loss.backward()`` fills the gradients of hidden, weight, bias."""
    return loss_fn(HeadLogits(hidden, weight, bias, block_rows=block_rows), teacher, targets)
