"""Finished or running training jobs read back from their ``output_dir``: the records of ``metrics.jsonl``,
the loss named in ``config.json``, a label per run, and the numbers a summary table shows.

This module knows the record format of :mod:`atkd.student.trainer.metrics` and nothing about plotting.
A record of ``metrics.jsonl`` describes the window of steps since the previous record (``log_every``
steps): ``teacher_wait_s`` and ``step_s`` are means per step of that window, ``tokens_per_s`` is the
window's token rate and ``tokens`` is cumulative. :func:`summarize` weighs the windows accordingly, so
the summary of a run does not depend on ``log_every``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"  # the name train() writes (atkd.student.trainer.loop.METRICS_FILE)
CONFIG_FILE = "config.json"


@dataclass
class Run:
    """One run directory: its ``train`` and ``eval`` records (each sorted by step, one per step) and the
    loss named in its ``config.json`` (``None`` when there is no readable config)."""

    directory: Path
    train: list[dict]
    eval: list[dict]
    loss_name: str | None
    label: str = ""

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` over the records of ``kind`` (``train`` / ``eval``) that have it."""
        records = [r for r in (self.train if kind == "train" else self.eval) if _is_number(r.get(key))]
        return [r["step"] for r in records], [float(r[key]) for r in records]

    def has(self, kind: str, key: str) -> bool:
        return any(_is_number(r.get(key)) for r in (self.train if kind == "train" else self.eval))


def read_run(directory: Path | str) -> Run:
    """The :class:`Run` in ``directory`` (the ``output_dir`` of ``atkd-student train``).

    Raises ``FileNotFoundError`` when the directory or its ``metrics.jsonl`` is missing, and ``ValueError``
    naming the file (and line) when the file holds no records or a line that is not a record. A last line
    without its newline that does not parse is a record being written, and is skipped. Should a step occur
    twice, its last record wins (``train()`` already drops the records a resume replays).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such run directory")
    path = directory / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {directory} the output_dir of `atkd-student train`?)")
    text = path.read_text()
    lines = text.split("\n")
    by_step: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the writer is still on this line
                continue
            raise ValueError(f"{path}:{number}: not a JSON record") from None
        if not isinstance(record, dict) or record.get("kind") not in by_step or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected a record with kind 'train' or 'eval' and an integer step")
        by_step[record["kind"]][record["step"]] = record
    if not by_step["train"] and not by_step["eval"]:
        raise ValueError(f"{path}: no records (the run has not logged a step yet)")
    train, evals = (sorted(by_step[kind].values(), key=lambda r: r["step"]) for kind in ("train", "eval"))
    return Run(directory, train, evals, _loss_name(directory / CONFIG_FILE))


def read_runs(directories: Sequence[Path | str]) -> list[Run]:
    """:func:`read_run` of each directory, labelled with :func:`label_runs`."""
    runs = [read_run(directory) for directory in directories]
    for run, label in zip(runs, label_runs(runs), strict=True):
        run.label = label
    return runs


def label_runs(runs: Sequence[Run]) -> list[str]:
    """A unique label per run: its directory's name; where names clash, the loss of ``config.json``; where
    those clash too, the directory's last two path parts, then the path as given, then a number."""
    paths = [Path(os.path.abspath(run.directory)) for run in runs]  # `.` and `../x` have names too
    labels = [path.name or str(path) for path in paths]
    fallbacks = [
        lambda i: runs[i].loss_name,
        lambda i: "/".join(paths[i].parts[-2:]),
        lambda i: str(runs[i].directory),
    ]
    for fallback in fallbacks:
        clashing = _clashing(labels)
        if not clashing:
            return labels
        for i in clashing:
            labels[i] = fallback(i) or labels[i]
    seen: dict[str, int] = {}
    for i in _clashing(labels):
        seen[labels[i]] = seen.get(labels[i], 0) + 1
        labels[i] = f"{labels[i]} #{seen[labels[i]]}"
    return labels


@dataclass
class Summary:
    """The numbers of one run for the summary table (``None``: the run has no such records).

    ``teacher_wait_s``: mean seconds per step spent waiting on the teacher; ``tokens_per_s``: tokens over
    the wall time of all logged windows (both weigh each record by the steps / tokens it covers).
    """

    label: str
    loss_name: str | None
    steps: int
    tokens: int | None
    final_loss: float | None
    final_perplexity: float | None
    best_perplexity: float | None
    final_accuracy: float | None
    best_accuracy: float | None
    teacher_wait_s: float | None
    tokens_per_s: float | None


def summarize(run: Run) -> Summary:
    """The :class:`Summary` of ``run``."""
    last = run.train[-1] if run.train else {}
    steps = max([r["step"] for r in run.train + run.eval])
    _, perplexity = run.series("eval", "perplexity")
    _, accuracy = run.series("eval", "accuracy")
    return Summary(
        label=run.label, loss_name=run.loss_name, steps=steps, tokens=last.get("tokens"),
        final_loss=last.get("loss"),
        final_perplexity=perplexity[-1] if perplexity else None, best_perplexity=min(perplexity, default=None),
        final_accuracy=accuracy[-1] if accuracy else None, best_accuracy=max(accuracy, default=None),
        teacher_wait_s=_mean_per_step(run.train, "teacher_wait_s"), tokens_per_s=_overall_rate(run.train),
    )  # fmt: skip


def _mean_per_step(records: list[dict], key: str) -> float | None:
    """Mean of a per-step mean ``key`` over all steps: each record weighted by the steps of its window."""
    total = steps = 0
    previous = 0
    for record in records:
        window, previous = record["step"] - previous, record["step"]
        if _is_number(record.get(key)):
            total += record[key] * window
            steps += window
    return total / steps if steps else None


def _overall_rate(records: list[dict]) -> float | None:
    """Tokens per second over all windows: their tokens over their wall time (tokens / tokens_per_s each)."""
    tokens = seconds = 0.0
    previous = 0
    for record in records:
        if not _is_number(record.get("tokens")):
            continue
        window, previous, rate = record["tokens"] - previous, record["tokens"], record.get("tokens_per_s")
        if _is_number(rate) and rate > 0:
            tokens += window
            seconds += window / rate
    return tokens / seconds if seconds else None


def _loss_name(path: Path) -> str | None:
    try:
        name = json.loads(path.read_text())["loss"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def _clashing(labels: list[str]) -> list[int]:
    return [i for i, label in enumerate(labels) if labels.count(label) > 1]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
