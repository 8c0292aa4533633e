"""``atkd-student report RUN_DIR... [--out DIR]``: look at the results of training runs.

Reads ``metrics.jsonl`` (and the loss name of ``config.json``) of each run directory and writes into
``--out`` (default ``report/``) the PNG plots of :mod:`atkd.student.trainer.plots` (loss and its ATKD parts,
mean teacher uncertainty and the easy/hard counts, time per step and teacher wait, tokens/s, eval
perplexity and accuracy; all runs side by side, one colour each) and ``report.md``: one table row per
run (:func:`atkd.student.trainer.runs.summarize`) with links to the plots that show it, then the plots.

Exit status 2 for a missing or unreadable run (the message names the file), 1 when matplotlib (the
``report`` extra) is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .runs import Run, Summary, read_runs, summarize

SUMMARY_FILE = "report.md"
MISSING = "–"
MISSING_MATPLOTLIB = ("atkd-student report needs matplotlib, which is not installed: "
                      "pip install 'atkd-distill[report]' (in a checkout: pip install -e '.[report]')")


class MissingExtraError(ImportError):
    """An optional dependency of the command is not installed (the message names the extra)."""


@dataclass
class PlotFile:
    """A written PNG, its title and the labels of the runs it shows."""

    title: str
    path: Path
    labels: list[str]


@dataclass
class Report:
    """What :func:`write_report` wrote: ``report.md``, the plots, and the runs as read."""

    summary: Path
    plots: list[PlotFile]
    runs: list[Run]


def write_report(run_dirs: Sequence[Path | str], out_dir: Path | str) -> Report:
    """Plots and ``report.md`` of the runs in ``run_dirs`` written into ``out_dir`` (created if needed)."""
    plots = _plots_module()
    runs = read_runs(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = plots.write_plots(runs, out_dir)
    files = [PlotFile(plot.title, written[plot.name], [run.label for run in runs if plot.shows(run)])
             for plot in plots.PLOTS if plot.name in written]
    summary = out_dir / SUMMARY_FILE
    summary.write_text(summary_markdown(runs, [summarize(run) for run in runs], files))
    return Report(summary, files, runs)


def summary_markdown(runs: Sequence[Run], summaries: Sequence[Summary], plots: Sequence[PlotFile]) -> str:
    """``report.md``: the runs' table (links to the plots that show each run), its notes, then the plots."""
    header = ["run", "loss", "steps", "tokens", "final train loss", "eval ppl (final)", "eval ppl (best)",
              "eval acc (final)", "eval acc (best)", "teacher wait (s/step)", "tokens/s", "plots"]
    lines = ["# Training report", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---", *["---:"] * (len(header) - 3), "---"]) + "|"]
    for s in summaries:
        links = " · ".join(f"[{p.path.stem}]({p.path.name})" for p in plots if s.label in p.labels) or MISSING
        cells = [_cell(s.label), _cell(s.loss_name or MISSING), str(s.steps), _number(s.tokens, "{:,}"),
                 _number(s.final_loss, "{:.4g}"), _number(s.final_perplexity, "{:.2f}"),
                 _number(s.best_perplexity, "{:.2f}"), _number(s.final_accuracy, "{:.2%}"),
                 _number(s.best_accuracy, "{:.2%}"), _number(s.teacher_wait_s, "{:.3f}"),
                 _number(s.tokens_per_s, "{:,.0f}"), links]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Final train loss: the last train record's (each loss is its own objective: compare runs of one loss, or "
        "their eval perplexity). Best eval: the lowest perplexity and the highest accuracy of any evaluation. "
        "Teacher wait: mean seconds per step the student waited for its teacher signal. Tokens/s: tokens "
        f"trained on (all ranks) over the wall time of the logged steps. {MISSING}: no such records.",
        "",
        "Runs:",
        *(f"- {_cell(run.label)}: `{run.directory}`" for run in runs),
    ]
    for plot in plots:
        lines += ["", f"## {plot.title}", "", f"![{plot.title}]({plot.path.name})"]
    return "\n".join(lines) + "\n"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``report`` subcommand of ``atkd-student``."""
    parser = commands.add_parser("report", help="plots (PNG) and a markdown summary of training runs")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="output_dir of an `atkd-student train` run (several: side by side)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder to write into (default: report/)")
    return parser


def main(args: argparse.Namespace, unknown: Sequence[str], parser: argparse.ArgumentParser) -> None:
    """Run ``atkd-student report`` with its parsed ``args``; prints where the files went, as JSON."""
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        report = write_report(args.run_dirs, args.out)
    except MissingExtraError as error:
        parser.exit(1, f"{error}\n")
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"atkd-student: {error}\n")
    print(json.dumps({"report": str(report.summary), "plots": [str(plot.path) for plot in report.plots]}))


def _plots_module():
    try:
        return importlib.import_module("atkd.student.trainer.plots")
    except ImportError as error:
        if (error.name or "").partition(".")[0] == "matplotlib":
            raise MissingExtraError(MISSING_MATPLOTLIB) from None
        raise


def _number(value, spec: str) -> str:
    return MISSING if value is None else spec.format(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
