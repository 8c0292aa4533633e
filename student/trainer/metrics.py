"""What the training job logs: the statistics of the steps since the last record, and the file they go to.

:class:`LogWindow` sums the loss, the loss's stats and the gradient norm *on the device* over the
micro-batches and steps since the last record, and copies them to the host once, in :meth:`LogWindow.read`,
when a record is written (every ``log_every`` steps): a step on a GPU never waits for a ``.item()``.
:class:`MetricsLog` appends the records to ``metrics.jsonl`` (and TensorBoard when installed).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from atkd.student.losses import LossResult


class LogWindow:
    """The steps since the last record.

    :meth:`read` gives, over the window: ``grad_norm``, ``teacher_wait_s`` and ``step_s`` as means per
    step; ``loss`` and every stat of the loss as means per micro-batch, except counts (stats named
    ``n_*``), which are summed over the micro-batches of a step and averaged over steps; ``tokens_per_s``
    (all ranks) over the window's wall time. With ``log_every=1`` a record describes its step alone.
    """

    def __init__(self):
        self._start()

    def _start(self) -> None:
        self._per_micro_batch: dict[str, torch.Tensor] = {}
        self._grad_norm: torch.Tensor | None = None
        self._seconds = {"teacher_wait_s": 0.0, "step_s": 0.0}
        self._micro_batches = self._steps = self._tokens = 0
        self._started_at = time.perf_counter()

    def add_micro_batch(self, result: LossResult, tokens: int) -> None:
        """One micro-batch's loss result (on device) and the tokens it trained on (all ranks)."""
        for name, value in {"loss": result.loss, **result.stats}.items():
            previous, value = self._per_micro_batch.get(name), value.detach()
            self._per_micro_batch[name] = value if previous is None else previous + value
        self._micro_batches += 1
        self._tokens += tokens

    def add_step(self, grad_norm: torch.Tensor, teacher_wait_s: float, step_s: float) -> None:
        """The end of an optimizer step: its gradient norm (on device) and its host-side timings."""
        grad_norm = grad_norm.detach()
        self._grad_norm = grad_norm if self._grad_norm is None else self._grad_norm + grad_norm
        self._seconds["teacher_wait_s"] += teacher_wait_s
        self._seconds["step_s"] += step_s
        self._steps += 1

    def read(self) -> dict[str, float]:
        """The window's record (see the class docstring), read with one host sync; starts a new window."""
        if self._steps == 0:
            raise RuntimeError("LogWindow.read() before any step")
        names = list(self._per_micro_batch)
        sums = torch.stack([self._grad_norm.double(), *(self._per_micro_batch[n].double() for n in names)]).tolist()
        record = {"grad_norm": sums[0] / self._steps}
        for name, total in zip(names, sums[1:], strict=True):
            record[name] = total / (self._steps if name.startswith("n_") else self._micro_batches)
        record.update({name: total / self._steps for name, total in self._seconds.items()})
        record["tokens_per_s"] = self._tokens / (time.perf_counter() - self._started_at)
        self._start()
        return record


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line with ``kind`` (train / eval) and ``step``; on resume, the
    records after the checkpoint's step are dropped, so the log reads as one uninterrupted run. Also
    writes TensorBoard scalars (``<kind>/<key>``, in ``tensorboard/`` beside the file) when ``tensorboard``
    is installed; their event files cannot be cut, so a new writer tells TensorBoard to hide the earlier
    files' events after the checkpoint's step (``purge_step``) instead."""

    def __init__(self, path: Path, keep_until: int, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._board = None
        if not enabled:
            return
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(path.parent / "tensorboard", purge_step=keep_until + 1)

    def write(self, kind: str, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"kind": kind, **record}) + "\n")
        self._file.flush()
        if self._board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._board is not None:
            self._board.close()
