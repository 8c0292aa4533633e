"""Figures of training runs' metrics over steps, one colour per run, drawn with matplotlib.

Each :class:`Plot` is one PNG of a row of :class:`Panel` s; a panel shows some keys of the ``train`` or
``eval`` records of every run that has them (the run's colour; the key's line style), and a panel no run
has data for is left out, as is a plot with no panels left (an SFT run has no ATKD parts; a run without
eval data, no eval plot). Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas
directly, not ``pyplot``: nothing global (backend, open figures) is touched. Importing this module needs
matplotlib (the ``report`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .runs import Run

LINE_STYLES = ("-", "--", ":", "-.")
MARKERS_UP_TO = 30  # points per line; fewer get markers, so a 3-step run or a single evaluation is visible
LOG_SCALE_RANGE = 10.0  # a panel marked ``log`` uses a log axis when its values span at least this factor


@dataclass(frozen=True)
class Panel:
    """One axes: ``keys`` are ``(record key, name of that line)`` of records of ``kind`` (train / eval)."""

    title: str
    ylabel: str
    kind: str
    keys: tuple[tuple[str, str], ...]
    log: bool = False
    percent: bool = False

    def shows(self, run: Run) -> bool:
        return any(run.has(self.kind, key) for key, _ in self.keys)


@dataclass(frozen=True)
class Plot:
    """One PNG, ``<name>.png``: a titled row of panels."""

    name: str
    title: str
    panels: tuple[Panel, ...]

    def panels_for(self, runs: Sequence[Run]) -> list[Panel]:
        return [panel for panel in self.panels if any(panel.shows(run) for run in runs)]

    def shows(self, run: Run) -> bool:
        return any(panel.shows(run) for panel in self.panels)


PLOTS = (
    Plot("loss", "Training loss", (
        Panel("Train loss", "loss", "train", (("loss", "loss"),), log=True),
        Panel("ATKD loss by token group", "mean loss per token", "train",
              (("loss_easy", "easy: DKD"), ("loss_hard", "hard: TKD + DKD")), log=True),
        Panel("ATKD parts", "mean per token of the group", "train",
              (("tkd_hard", "TKD, hard"), ("dkd_hard", "DKD, hard"), ("dkd_easy", "DKD, easy")), log=True),
    )),
    Plot("atkd_split", "Teacher uncertainty and the easy/hard split", (
        Panel("Mean teacher uncertainty", "UnC = 1 - p_teacher(target)", "train", (("mean_uncertainty", "UnC"),)),
        Panel("Tokens per step by group", "tokens", "train", (("n_hard", "hard"), ("n_easy", "easy"))),
    )),
    Plot("speed", "Speed", (
        Panel("Time per step", "seconds", "train", (("step_s", "step"), ("teacher_wait_s", "waiting on the teacher"))),
        Panel("Throughput", "tokens / s (all ranks)", "train", (("tokens_per_s", "tokens/s"),)),
    )),
    Plot("eval", "Held-out evaluation", (
        Panel("Eval perplexity", "perplexity", "eval", (("perplexity", "perplexity"),), log=True),
        Panel("Eval accuracy", "next-token accuracy", "eval", (("accuracy", "accuracy"),), percent=True),
    )),
)  # fmt: skip


def run_colours(count: int) -> list:
    """One colour per run: tab10 up to 10 runs, tab20 up to 20, then tab20 again."""
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def draw(plot: Plot, runs: Sequence[Run], colours: Sequence | None = None) -> Figure | None:
    """The figure of ``plot`` for ``runs`` (``colours[i]`` for ``runs[i]``; default :func:`run_colours`), or
    ``None`` when no run has data for any of its panels."""
    panels = plot.panels_for(runs)
    if not panels:
        return None
    colours = list(colours) if colours is not None else run_colours(len(runs))
    last_step = max(record["step"] for run in runs for record in run.train + run.eval)
    figure = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained", dpi=110)
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        _draw_panel(axes, panel, runs, colours)
        axes.set_xlim(0, max(1, last_step) * 1.03)  # the same steps on every panel and plot
    figure.suptitle(plot.title, fontsize="x-large")
    shown = [i for i, run in enumerate(runs) if plot.shows(run)]
    handles = [Line2D([], [], color=colours[i], linewidth=2, label=runs[i].label) for i in shown]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), title="run")
    return figure


def write_plots(runs: Sequence[Run], out_dir: Path) -> dict[str, Path]:
    """``<out_dir>/<plot>.png`` of each plot of :data:`PLOTS` that has data; ``{plot name: path}``. The PNG of
    a plot without data is removed, so that none left by an earlier report passes for these runs'."""
    written, colours = {}, run_colours(len(runs))
    for plot in PLOTS:
        path = Path(out_dir) / f"{plot.name}.png"
        figure = draw(plot, runs, colours)
        if figure is None:
            path.unlink(missing_ok=True)
        else:
            figure.savefig(path)
            written[plot.name] = path
    return written


def _draw_panel(axes, panel: Panel, runs: Sequence[Run], colours: Sequence) -> None:
    values_shown = []
    for run, colour in zip(runs, colours, strict=True):
        for (key, _), style in zip(panel.keys, LINE_STYLES, strict=False):
            steps, values = run.series(panel.kind, key)
            if steps:
                marker = "o" if len(steps) <= MARKERS_UP_TO else None
                axes.plot(steps, values, color=colour, linestyle=style, marker=marker, markersize=4.5, linewidth=1.4)
                values_shown.extend(values)
    axes.set_title(panel.title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(panel.ylabel)
    axes.grid(alpha=0.3)
    low, high = min(values_shown, default=0.0), max(values_shown, default=0.0)
    if panel.log and low > 0 and high >= LOG_SCALE_RANGE * low:
        axes.set_yscale("log")
    if panel.percent:
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    if len(panel.keys) > 1:
        styles = [Line2D([], [], color="0.25", linestyle=style, label=name)
                  for (_, name), style in zip(panel.keys, LINE_STYLES, strict=False)]
        axes.legend(handles=styles, fontsize="small")
