"""``python -m experiments.report --results DIR --out docs/results.md``: the grid's results as markdown and plots.

Reads what finished runs wrote (``<results>/runs/<run_id>.json``) and what the teachers scored
(``<results>/teachers/<task>-<size>.json``, and ``<task>-student_init.json``: the student before training)
and writes ``out_md`` plus PNG plots in the folder named after it (``docs/results/`` for
``docs/results.md``), linked by relative paths. Any subset of the grid works: every configuration that ran
is shown, and, given the planned run ids, the ones without a result are listed.

Scores. The primary metric is the instruction task's test ROUGE-L (shown ×100, higher is better) and the
lm task's test perplexity (lower is better). A *gain* of a run over a reference run is signed so that
positive is better: for ROUGE-L and accuracy the difference in points (×100), for perplexity the relative
reduction in percent, ``100 * (ppl_ref - ppl_new) / ppl_ref``. Comparisons are paired: two configurations
of one task are compared seed by seed (the same seed has the same data order and initialisation), and
``mean ± sd`` is over the per-seed gains (sample sd, n - 1).

The two claims (rules also written into the document):

- Claim 1, per task and vanilla KD method (fkl, rkl, gkd): the gain of the largest teacher's student over
  the smallest teacher's (and, shown, over the middle one's). *confirmed* when ``mean <= sd`` (the larger
  teacher is not better by more than the paired spread, or is worse); *not confirmed* when ``mean > sd``;
  *insufficient* with fewer than 2 paired seeds. Overall: confirmed / not confirmed when every decided
  (task, method) is, mixed otherwise.
- Claim 2, per task, base method and teacher size: the gain of ``X_atkd`` over ``X``. *improves* when
  ``mean > sd / sqrt(n)`` (about one standard error, mean > 0), *worse* when ``mean < -sd / sqrt(n)``,
  else *no clear difference*; *insufficient* with fewer than 2 paired seeds. Overall: confirmed when every
  decided cell improves, not confirmed when none does, mixed otherwise.

With three seeds none of this is a significance test; the document says so.

Plots are drawn with :class:`matplotlib.figure.Figure` on an Agg canvas (nothing global is touched); a plot
without data is not drawn (and a PNG of that name left by an earlier report is removed). The text between
``<!-- discussion -->`` and ``<!-- /discussion -->`` of an existing ``out_md`` is kept on a rewrite.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

METHOD_ORDER = ("sft", "fkl", "fkl_atkd", "rkl", "rkl_atkd", "gkd", "gkd_atkd")
VANILLA = ("fkl", "rkl", "gkd")  # claim 1; also the bases of claim 2
TASK_ORDER = ("instruction", "lm")
ATKD_DEFAULTS = {"hard_fraction": 0.5, "lam": 0.2}  # a main-grid X_atkd run is every ablation's default point
ABLATION_NAMES = {"hard_fraction": "hard fraction", "lam": "lambda"}
MISSING = "–"
DISCUSSION_OPEN, DISCUSSION_CLOSE = "<!-- discussion -->", "<!-- /discussion -->"
DISCUSSION_PLACEHOLDER = "_(Hand-written discussion goes here; `write_report` keeps this block when it rewrites.)_"
PNG_METADATA = {"Software": None}  # no matplotlib version in the file: the same results give the same bytes
NO_MATPLOTLIB = "- Plots: not drawn (matplotlib, the `report` extra, is not installed)."
MIN_PAIRS = 2  # paired seeds needed for any verdict
BASE_COLOURS = {"fkl": "tab:blue", "rkl": "tab:orange", "gkd": "tab:green"}
JITTER = 1.05  # factor between neighbouring methods' x positions on the log axis


# ----------------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """A test metric: ``key`` in a result's ``test``; shown ×``scale``; gains in points or relative %."""

    key: str
    name: str
    higher_is_better: bool
    scale: float = 1.0
    relative: bool = False  # gains as relative reduction in % (perplexity)

    def shown(self, raw: float) -> float:
        return raw * self.scale

    def gain(self, new: float, ref: float) -> float:
        """Improvement of ``new`` over ``ref``, positive = better: points, or % lower (``relative``)."""
        if self.relative:
            return 100.0 * (ref - new) / ref
        return (new - ref) * self.scale * (1 if self.higher_is_better else -1)

    @property
    def unit(self) -> str:
        return "% lower perplexity" if self.relative else f"{self.name} points"


ROUGE = Metric("rouge_l", "ROUGE-L", True, 100.0)
PERPLEXITY = Metric("perplexity", "perplexity", False, relative=True)
ACCURACY = Metric("accuracy", "accuracy", True, 100.0)
TASK_METRICS = {"instruction": (ROUGE, PERPLEXITY), "lm": (PERPLEXITY, ACCURACY)}


def metric_title(metric: Metric) -> str:
    scale = " ×100" if metric.scale == 100 else ""
    better = "higher" if metric.higher_is_better else "lower"
    return f"test {metric.name} ({better} is better{',' if scale else ''}{scale})"


# ----------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RunResult:
    """One finished run (``runs/<run_id>.json``)."""

    run_id: str
    grid: str
    task: str
    teacher: str | None
    teacher_params: int | None
    method: str
    ablation: tuple[tuple[str, float], ...]
    seed: int
    steps: int | None
    test: dict
    train: dict

    @classmethod
    def from_json(cls, data: dict) -> RunResult:
        return cls(run_id=data["run_id"], grid=data.get("grid") or MISSING, task=data["task"],
                   teacher=data.get("teacher"), teacher_params=data.get("teacher_params"), method=data["method"],
                   ablation=tuple(sorted((data.get("ablation") or {}).items())), seed=int(data["seed"]),
                   steps=data.get("steps"), test=data.get("test") or {}, train=data.get("train") or {})

    @property
    def config(self) -> tuple:
        """What the seeds of one configuration share."""
        return (self.task, self.teacher, self.method, self.ablation)

    def value(self, metric: Metric) -> float | None:
        value = self.test.get(metric.key)
        return None if value is None else float(value)


@dataclass(frozen=True)
class TeacherResult:
    """A teacher's (or, ``size == "student_init"``, the untrained student's) test scores and UnC histogram."""

    task: str
    size: str
    params: int | None
    test: dict
    unc: dict | None


@dataclass
class Results:
    runs: list[RunResult]
    teachers: list[TeacherResult]
    skipped: list[str]  # files that could not be read

    def tasks(self) -> list[str]:
        found = {run.task for run in self.runs} | {t.task for t in self.teachers}
        return sorted(found, key=lambda task: (TASK_ORDER.index(task) if task in TASK_ORDER else 99, task))

    def task_runs(self, task: str, *, ablations: bool = False) -> list[RunResult]:
        return [run for run in self.runs if run.task == task and bool(run.ablation) == ablations]

    def teacher(self, task: str, size: str) -> TeacherResult | None:
        return next((t for t in self.teachers if t.task == task and t.size == size), None)


def load_results(results_dir: Path) -> Results:
    """Every readable result under ``results_dir``; unreadable files are named in ``skipped``."""
    runs, teachers, skipped = [], [], []
    for path in sorted((Path(results_dir) / "runs").glob("*.json")):
        try:
            runs.append(RunResult.from_json(json.loads(path.read_text())))
        except (ValueError, KeyError, TypeError):
            skipped.append(str(path))
    for path in sorted((Path(results_dir) / "teachers").glob("*.json")):
        try:
            data = json.loads(path.read_text())
            task, _, size = path.stem.rpartition("-")
            teachers.append(TeacherResult(data.get("task", task), data.get("size", size), data.get("params"),
                                          data.get("test") or {}, data.get("unc")))
        except (ValueError, TypeError, AttributeError):
            skipped.append(str(path))
    return Results(runs, teachers, skipped)


def task_metrics(results: Results, task: str) -> tuple[Metric, ...]:
    """The task's metrics that some run has (first: the primary one). An unknown task: ROUGE-L if present."""
    candidates = TASK_METRICS.get(task, (ROUGE, PERPLEXITY, ACCURACY))
    runs = results.task_runs(task) + results.task_runs(task, ablations=True)
    return tuple(m for m in candidates if any(run.value(m) is not None for run in runs))


def teacher_sizes(results: Results, task: str) -> list[str]:
    """The task's teacher sizes, small to large by parameter count (then by the number in the name)."""
    params: dict[str, int | None] = {}
    for run in results.runs:
        if run.task == task and run.teacher is not None:
            params[run.teacher] = params.get(run.teacher) or run.teacher_params
    for teacher in results.teachers:
        if teacher.task == task and teacher.size != "student_init":
            params[teacher.size] = params.get(teacher.size) or teacher.params
    number = lambda size: int(re.sub(r"\D", "", size) or 0)  # noqa: E731
    return sorted(params, key=lambda size: (params[size] is None, params[size] or 0, number(size), size))


def size_params(results: Results, task: str, size: str) -> int | None:
    known = [run.teacher_params for run in results.runs if run.task == task and run.teacher == size]
    teacher = results.teacher(task, size)
    return next((p for p in [*known, teacher and teacher.params] if p), None)


def by_config(runs: Iterable[RunResult]) -> dict[tuple, dict[int, RunResult]]:
    """``{config: {seed: run}}``."""
    groups: dict[tuple, dict[int, RunResult]] = {}
    for run in runs:
        groups.setdefault(run.config, {})[run.seed] = run
    return groups


def method_order(methods: Iterable[str]) -> list[str]:
    return sorted(set(methods), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


# ----------------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean and sample sd (n - 1; ``None`` for n = 1) of some values."""

    n: int
    mean: float
    sd: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        if not values:
            return None
        return cls(len(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)

    @property
    def se(self) -> float | None:
        return None if self.sd is None else self.sd / math.sqrt(self.n)


def seed_stat(seeds: dict[int, RunResult] | None, metric: Metric) -> Stat | None:
    """Mean ± sd over seeds of ``metric`` as shown (×scale)."""
    values = [metric.shown(v) for run in (seeds or {}).values() if (v := run.value(metric)) is not None]
    return Stat.of(values)


def paired_gain(new: dict[int, RunResult] | None, ref: dict[int, RunResult] | None, metric: Metric) -> Stat | None:
    """Gains (:meth:`Metric.gain`) of ``new`` over ``ref`` seed by seed, over the seeds both have."""
    new, ref = new or {}, ref or {}
    gains = [metric.gain(a, b) for seed in sorted(set(new) & set(ref))
             if (a := new[seed].value(metric)) is not None and (b := ref[seed].value(metric)) is not None]
    return Stat.of(gains)


def format_stat(stat: Stat | None, digits: int = 2, *, signed: bool = False) -> str:
    """``mean ± sd``, with ``(n=k)`` when fewer than 3 values; ``–`` for none."""
    if stat is None:
        return MISSING
    number = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = number.format(stat.mean) + ("" if stat.sd is None else f" ± {stat.sd:.{digits}f}")
    return text + (f" (n={stat.n})" if stat.n < 3 else "")


def overall(verdicts: Sequence[str], yes: str) -> str:
    """confirmed when every decided verdict is ``yes``, not confirmed when none is, else mixed."""
    decided = [v for v in verdicts if v != "insufficient"]
    if not decided:
        return "insufficient data"
    if all(v == yes for v in decided):
        return "confirmed"
    if not any(v == yes for v in decided):
        return "not confirmed"
    return "mixed"


# ----------------------------------------------------------------------------------------------------- claim 1


CLAIM1_RULE = (
    "Rule: per task and vanilla KD method, the gain of the largest teacher's student over the smallest "
    "teacher's, seed by seed (positive = the larger teacher gives the better student; ROUGE-L/accuracy in "
    "points ×100, perplexity as % lower). **confirmed** when mean ≤ sd of the paired gains (the larger teacher "
    "is not better by more than the seed-to-seed spread, or is worse); **not confirmed** when mean > sd; "
    f"**insufficient** with fewer than {MIN_PAIRS} paired seeds. The gain over the middle teacher is shown but "
    "does not decide. Overall: confirmed (or not confirmed) when every decided row is, else mixed. With ≤ 3 "
    "seeds this is a description of the spread, not a significance test."
)


@dataclass(frozen=True)
class Claim1Row:
    task: str
    method: str
    sizes: tuple[str, ...]
    vs_smallest: Stat | None
    vs_middle: Stat | None
    verdict: str


def claim1_verdict(gain: Stat | None) -> str:
    """confirmed when mean ≤ sd; not confirmed when mean > sd; insufficient below ``MIN_PAIRS`` pairs."""
    if gain is None or gain.n < MIN_PAIRS or gain.sd is None:
        return "insufficient"
    return "not confirmed" if gain.mean > gain.sd else "confirmed"


def claim1_rows(results: Results) -> list[Claim1Row]:
    """One row per task and vanilla method that ran with at least two teacher sizes."""
    rows = []
    for task in results.tasks():
        metrics = task_metrics(results, task)
        groups = by_config(results.task_runs(task))
        for method in VANILLA:
            sizes = [s for s in teacher_sizes(results, task) if (task, s, method, ()) in groups]
            if len(sizes) < 2 or not metrics:
                continue
            largest = groups[(task, sizes[-1], method, ())]
            vs_smallest = paired_gain(largest, groups[(task, sizes[0], method, ())], metrics[0])
            vs_middle = paired_gain(largest, groups[(task, sizes[-2], method, ())], metrics[0]) if len(sizes) > 2 \
                else None
            rows.append(Claim1Row(task, method, tuple(sizes), vs_smallest, vs_middle, claim1_verdict(vs_smallest)))
    return rows


def claim1_section(results: Results) -> list[str]:
    rows = claim1_rows(results)
    lines = ["## Claim 1: a larger teacher does not give a better student (vanilla KD)", "", CLAIM1_RULE, ""]
    if not rows:
        return [*lines, "No vanilla KD method has results with two teacher sizes yet.", ""]
    lines += ["| task | method | metric | largest − smallest | largest − middle | verdict |",
              "|---|---|---|---:|---:|---|"]
    for row in rows:
        metric = task_metrics(results, row.task)[0]
        middle = f"{row.sizes[-1]} − {row.sizes[-2]}: {format_stat(row.vs_middle, signed=True)}" \
            if row.vs_middle else MISSING
        lines.append(f"| {row.task} | {row.method} | {metric.unit} | {row.sizes[-1]} − {row.sizes[0]}: "
                     f"{format_stat(row.vs_smallest, signed=True)} | {middle} | {_verdict1(row)} |")
    verdict = overall([row.verdict for row in rows], "confirmed")
    return [*lines, "", f"**Overall, claim 1: {verdict}.**", ""]


def _verdict1(row: Claim1Row) -> str:
    gain = row.vs_smallest
    if row.verdict == "confirmed" and gain.mean < -gain.sd:
        return "confirmed (the largest teacher's student is worse)"
    return row.verdict


# ----------------------------------------------------------------------------------------------------- claim 2


CLAIM2_RULE = (
    "Rule: per task, base method X and teacher size, the gain of X_atkd over X seed by seed (positive = "
    "ATKD better; ROUGE-L in points ×100, perplexity as % lower). With se = sd / √n of the paired gains: "
    "**improves** when mean > se (about one standard error above 0), **worse** when mean < −se, else **no "
    f"clear difference**; **insufficient** with fewer than {MIN_PAIRS} paired seeds. Overall: confirmed when "
    "every decided cell improves, not confirmed when none does, mixed otherwise. One standard error with ≤ 3 "
    "seeds is a weak bar: this is not a significance test."
)


@dataclass(frozen=True)
class Claim2Row:
    task: str
    base: str
    teacher: str
    base_stat: Stat | None
    atkd_stat: Stat | None
    gain: Stat | None
    secondary_gain: Stat | None
    verdict: str


def claim2_verdict(gain: Stat | None) -> str:
    """improves when mean > se; worse when mean < -se; else no clear difference (se = sd/√n)."""
    if gain is None or gain.n < MIN_PAIRS or gain.se is None:
        return "insufficient"
    if gain.mean > gain.se:
        return "improves"
    if gain.mean < -gain.se:
        return "worse"
    return "no clear difference"


def claim2_rows(results: Results) -> list[Claim2Row]:
    """One row per task, base method and teacher size where both the base and its ATKD variant ran."""
    rows = []
    for task in results.tasks():
        metrics = task_metrics(results, task)
        if not metrics:
            continue
        groups = by_config(results.task_runs(task))
        for base in VANILLA:
            for size in teacher_sizes(results, task):
                ref, new = groups.get((task, size, base, ())), groups.get((task, size, f"{base}_atkd", ()))
                if ref is None or new is None:
                    continue
                gain = paired_gain(new, ref, metrics[0])
                second = paired_gain(new, ref, metrics[1]) if len(metrics) > 1 else None
                rows.append(Claim2Row(task, base, size, seed_stat(ref, metrics[0]), seed_stat(new, metrics[0]), gain,
                                      second, claim2_verdict(gain)))
    return rows


def claim2_section(results: Results) -> list[str]:
    rows = claim2_rows(results)
    lines = ["## Claim 2: ATKD improves on its base KD method for every teacher size", "", CLAIM2_RULE, ""]
    if not rows:
        return [*lines, "No base method has results together with its ATKD variant yet.", ""]
    lines += ["| task | base | teacher | base | ATKD | ATKD − base | other metric: ATKD − base | verdict |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        metrics = task_metrics(results, row.task)
        second = f"{format_stat(row.secondary_gain, signed=True)} ({metrics[1].unit})" if len(metrics) > 1 \
            else MISSING
        lines.append(f"| {row.task} | {row.base} | {row.teacher} | {format_stat(row.base_stat)} | "
                     f"{format_stat(row.atkd_stat)} | {format_stat(row.gain, signed=True)} ({metrics[0].unit}) | "
                     f"{second} | {row.verdict} |")
    lines.append("")
    for (task, base), group in _group_rows(rows).items():
        improves = sum(row.verdict == "improves" for row in group)
        lines.append(f"- {task}, {base}: improves at {improves} of {len(group)} teacher sizes "
                     f"({overall([row.verdict for row in group], 'improves')}).")
    lines += ["", *claim2_effects(results, rows), "",
              f"**Overall, claim 2: {overall([row.verdict for row in rows], 'improves')}.**", ""]
    return lines


def claim2_effects(results: Results, rows: Sequence[Claim2Row]) -> list[str]:
    """Per task: the average and the largest mean gain of ATKD over its base (paper: up to +3 points)."""
    lines = []
    for task in results.tasks():
        gains = [row for row in rows if row.task == task and row.gain is not None]
        if gains:
            unit = task_metrics(results, task)[0].unit
            best = max(gains, key=lambda row: row.gain.mean)
            average = statistics.fmean(row.gain.mean for row in gains)
            lines.append(f"- {task}: average ATKD − base {average:+.2f} {unit} over {len(gains)} cells; largest "
                         f"{best.gain.mean:+.2f} ({best.base}, {best.teacher}).")
    return lines


def _group_rows(rows: Sequence[Claim2Row]) -> dict[tuple[str, str], list[Claim2Row]]:
    groups: dict[tuple[str, str], list[Claim2Row]] = {}
    for row in rows:
        groups.setdefault((row.task, row.base), []).append(row)
    return groups


# ----------------------------------------------------------------------------------------------------- tables


def header_section(results: Results, *, planned: Sequence[str] | None, command: str,
                   grid_seconds: float | None, notes: Sequence[str] = ()) -> list[str]:
    """What ran: grids, counts, seeds, steps, the command, the time, and what is missing."""
    runs = results.runs
    main = [run for run in runs if not run.ablation]
    seeds = sorted({run.seed for run in runs})
    steps = sorted({run.steps for run in runs if run.steps is not None})
    lines = ["# Results: ATKD at small scale", "",
             "<!-- Generated by `python -m experiments.report`; edit by hand only inside the discussion block. -->",
             "", "## What ran", ""]
    lines.append(f"- Grid: {', '.join(sorted({run.grid for run in runs})) or MISSING}; {len(runs)} runs "
                 f"({len(main)} main grid, {len(runs) - len(main)} ablation) of {len(by_config(runs))} "
                 f"configurations; seeds {', '.join(map(str, seeds)) or MISSING}; "
                 f"{', '.join(map(str, steps)) or MISSING} training steps per run.")
    for task in results.tasks():
        task_runs = [run for run in runs if run.task == task]
        lines.append(f"- Task {task}: {len(task_runs)} runs, methods "
                     f"{', '.join(method_order(run.method for run in task_runs)) or MISSING}, teachers "
                     f"{', '.join(teacher_sizes(results, task)) or MISSING}.")
    lines.append(f"- Command: `{command}`" if command else "- Command: not recorded.")
    train_s = sum(float(run.train.get("seconds") or 0.0) for run in runs)
    wall = f"grid wall time {_duration(grid_seconds)}; " if grid_seconds is not None else ""
    lines.append(f"- Time: {wall}training time summed over runs {_duration(train_s)}.")
    if results.skipped:
        lines.append(f"- Unreadable result files (skipped): {', '.join(f'`{p}`' for p in results.skipped)}.")
    return [*lines, *notes, *missing_lines(results, planned), ""]


def missing_lines(results: Results, planned: Sequence[str] | None) -> list[str]:
    """Planned runs without a result, one line per configuration with its missing seeds."""
    if planned is None:
        return []
    done = {run.run_id for run in results.runs}
    missing = [run_id for run_id in planned if run_id not in done]
    if not missing:
        return [f"- All {len(planned)} planned runs have results."]
    seeds: dict[str, list[str]] = {}
    for run_id in missing:
        config, match = run_id, re.fullmatch(r"(.*)-s(\d+)", run_id)
        if match:
            config = match.group(1)
        seeds.setdefault(config, []).append(match.group(2) if match else "")
    lines = [f"- Not yet run: {len(missing)} of {len(planned)} planned runs:"]
    for config, found in seeds.items():
        seed_text = f" (seeds {', '.join(found)})" if all(found) else ""
        lines.append(f"  - `{config}`{seed_text}")
    return lines


TEACHER_COLUMNS = (  # (title, attribute, key, scale, digits); a column no row has is left out
    ("test perplexity", "test", "perplexity", 1.0, 2), ("test accuracy (×100)", "test", "accuracy", 100.0, 2),
    ("test ROUGE-L (×100)", "test", "rouge_l", 100.0, 2), ("mean UnC, easy", "unc", "mean_easy", 1.0, 3),
    ("mean UnC, hard", "unc", "mean_hard", 1.0, 3), ("hard fraction", "unc", "hard_fraction", 1.0, 3),
)


def teachers_section(results: Results) -> list[str]:
    """Per task: each teacher's size, parameters, test scores and mean UnC of easy / hard tokens."""
    lines = ["## Teachers", ""]
    if not results.teachers:
        return [*lines, "No teacher results yet.", ""]
    for task in results.tasks():
        rows = [results.teacher(task, size) for size in teacher_sizes(results, task)]
        rows = [t for t in [*rows, results.teacher(task, "student_init")] if t is not None]
        if not rows:
            continue
        columns = [(title, where, key, scale, digits) for title, where, key, scale, digits in TEACHER_COLUMNS
                   if any((getattr(t, where) or {}).get(key) is not None for t in rows)]
        lines += [f"### {task}", "", "| model | params | " + " | ".join(c[0] for c in columns) + " |",
                  "|---|---:|" + "---:|" * len(columns)]
        for t in rows:
            name = "student, before training" if t.size == "student_init" else t.size
            cells = [_num((getattr(t, where) or {}).get(key), scale, digits) for _, where, key, scale, digits
                     in columns]
            lines.append(f"| {name} | {_params(t.params)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("UnC = 1 − p_teacher(target) on validation tokens; easy / hard by ATKD's median split.")
    return [*lines, ""]


def students_section(results: Results, plots: dict[str, Path], out_dir: Path) -> list[str]:
    """Per task and metric: rows = methods, columns = teacher sizes; SFT in its own column (no teacher)."""
    lines = ["## Students", "", "Cell: mean ± sd over seeds of the test metric (n shown when fewer than 3 seeds)."]
    for task in results.tasks():
        runs = results.task_runs(task)
        if not runs:
            continue
        groups, sizes = by_config(runs), teacher_sizes(results, task)
        methods = method_order(run.method for run in runs)
        has_sft = any(run.teacher is None for run in runs)
        columns = [f"{size} ({_params(size_params(results, task, size))})" for size in sizes]
        columns += ["no teacher"] if has_sft else []
        for metric in task_metrics(results, task):
            lines += ["", f"### {task}: {metric_title(metric)}", "", "| method | " + " | ".join(columns) + " |",
                      "|---|" + "---:|" * len(columns)]
            for method in methods:
                cells = [format_stat(seed_stat(groups.get((task, size, method, ())), metric)) for size in sizes]
                cells += [format_stat(seed_stat(groups.get((task, None, method, ())), metric))] if has_sft else []
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += _image(plots.get(f"students_{task}"), f"{task}: student vs teacher size", out_dir)
    return [*lines, ""]


def ablation_section(results: Results, plots: dict[str, Path], out_dir: Path) -> list[str]:
    """Per task and ablated option: option value → test metrics (mean ± sd), the default from the main grid."""
    lines = ["## Ablations", ""]
    found = False
    for task in results.tasks():
        metrics = task_metrics(results, task)
        for curve in ablation_curves(results, task):
            found = True
            name = ABLATION_NAMES.get(curve.option, curve.option)
            lines += [f"### {task}: {name} ({curve.method}, teacher {curve.teacher})", "",
                      f"| {name} | " + " | ".join(metric_title(m) for m in metrics) + " |",
                      "|---:|" + "---:|" * len(metrics)]
            for value, seeds in curve.points:
                default = " (default: main grid)" if value == ATKD_DEFAULTS.get(curve.option) else ""
                lines.append(f"| {value:g}{default} | " + " | ".join(format_stat(seed_stat(seeds, m)) for m in metrics)
                             + " |")
            lines.append("")
        lines += _image(plots.get(f"ablation_{task}"), f"{task}: ablations", out_dir)
    if found:
        lines.append("The default point is the main-grid run of the same method and teacher (median split, "
                     f"{', '.join(f'{k} {v:g}' for k, v in ATKD_DEFAULTS.items())}).")
    else:
        lines.append("No ablation results yet.")
    return [*lines, ""]


@dataclass(frozen=True)
class Curve:
    """An ablation: ``option`` of ATKD varied for ``method`` with ``teacher``; ``points`` = (value, seeds)."""

    option: str
    teacher: str
    method: str
    points: tuple[tuple[float, dict[int, RunResult]], ...]


def ablation_curves(results: Results, task: str) -> list[Curve]:
    """The task's ablations: runs varying one ATKD option (others at default) plus the main-grid run of the
    same method and teacher as the default point."""
    main = by_config(results.task_runs(task))
    points: dict[tuple[str, str, str], dict[float, dict[int, RunResult]]] = {}
    for run in results.task_runs(task, ablations=True):
        for option, value in run.ablation:
            others = [(k, v) for k, v in run.ablation if k != option]
            if all(ATKD_DEFAULTS.get(k) == v for k, v in others):
                points.setdefault((option, run.teacher, run.method), {}).setdefault(float(value), {})[run.seed] = run
    curves = []
    for (option, teacher, method), values in sorted(points.items(), key=lambda item: str(item[0])):
        default = main.get((task, teacher, method, ()))
        if default and option in ATKD_DEFAULTS:
            values.setdefault(ATKD_DEFAULTS[option], default)
        curves.append(Curve(option, teacher, method, tuple(sorted(values.items()))))
    return curves


def unc_section(results: Results, plots: dict[str, Path], out_dir: Path) -> list[str]:
    lines = ["## Teacher uncertainty of easy and hard tokens", ""]
    images = [line for task in results.tasks()
              for line in _image(plots.get(f"unc_{task}"), f"{task}: teacher UnC by size", out_dir)]
    return [*lines, *(images or ["No teacher UnC histograms yet.", ""])]


def explain_section(results: Results) -> list[str]:
    """Facts that may bear on the results (teacher perplexity gaps, UnC by size); the discussion block follows."""
    lines = ["## What might explain it", "", "Generated from the teacher results (facts only):", ""]
    for task in results.tasks():
        sizes = [t for s in teacher_sizes(results, task) if (t := results.teacher(task, s))]
        if not sizes:
            continue
        ppl = [f"{t.size} {_num(t.test.get('perplexity'))}" for t in sizes]
        text = f"- {task}: teacher test perplexity {', '.join(ppl)}"
        low, high = sizes[0].test.get("perplexity"), sizes[-1].test.get("perplexity")
        if low and high and len(sizes) > 1:
            text += f" (largest / smallest = {high / low:.2f})"
        uncs = [f"{t.size} {t.unc['mean_easy']:.3f} / {t.unc['mean_hard']:.3f}" for t in sizes
                if t.unc and t.unc.get("mean_easy") is not None and t.unc.get("mean_hard") is not None]
        if uncs:
            text += f"; mean UnC easy / hard: {', '.join(uncs)}"
        init = results.teacher(task, "student_init")
        if init and init.test.get("perplexity"):
            text += f"; student before training: perplexity {_num(init.test['perplexity'])}"
        lines.append(text + ".")
    return [*lines, ""]


# ----------------------------------------------------------------------------------------------------- plots


def write_plots(results: Results, out_dir: Path) -> dict[str, Path]:
    """``<out_dir>/<kind>_<task>.png`` of each plot with data; ``{name: path}``. The PNG of a plot without data
    is removed. Empty when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return {}
    written = {}
    for task in sorted(set(results.tasks()) | set(TASK_ORDER)):
        for kind, draw in (("students", draw_students), ("ablation", draw_ablation), ("unc", draw_unc)):
            name, path = f"{kind}_{task}", Path(out_dir) / f"{kind}_{task}.png"
            figure = draw(results, task)
            if figure is None:
                path.unlink(missing_ok=True)
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            FigureCanvasAgg(figure)
            figure.savefig(path, metadata=PNG_METADATA)
            written[name] = path
    return written


def draw_students(results: Results, task: str):
    """One panel per task metric: student score vs teacher parameters (log x) per method, error bars = sd over
    seeds; a base method and its ATKD variant share a colour (ATKD dashed); SFT a horizontal dotted line.
    Methods are nudged sideways a little so that their error bars do not hide each other."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    runs, metrics = results.task_runs(task), task_metrics(results, task)
    sizes = [s for s in teacher_sizes(results, task) if size_params(results, task, s)]
    methods = method_order(run.method for run in runs if run.teacher is not None)
    if not metrics or not sizes or not methods:
        return None
    groups, params = by_config(runs), [size_params(results, task, s) for s in sizes]
    figure = Figure(figsize=(5.4 * len(metrics), 4.8), layout="constrained", dpi=110)
    handles = []
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        handles = []
        for i, method in enumerate(methods):
            nudge = JITTER ** (i - (len(methods) - 1) / 2)
            points = [(x * nudge, stat) for x, size in zip(params, sizes, strict=True)
                      if (stat := seed_stat(groups.get((task, size, method, ())), metric))]
            if not points:
                continue
            style = dict(color=method_colour(method), linestyle="--" if method.endswith("_atkd") else "-",
                         marker="s" if method.endswith("_atkd") else "o")
            axes.errorbar([x for x, _ in points], [s.mean for _, s in points], yerr=[s.sd or 0.0 for _, s in points],
                          capsize=3, markersize=5, linewidth=1.4, **style)
            handles.append(Line2D([], [], label=method, **style))
        sft = seed_stat(groups.get((task, None, "sft", ())), metric)
        if sft is not None:
            style = dict(color="0.35", linestyle=":", linewidth=1.4)
            axes.axhline(sft.mean, **style)
            handles.append(Line2D([], [], label="sft (no teacher)", **style))
        axes.set_xscale("log")
        axes.set_xticks(params, [f"{s}\n{_params(p)}" for s, p in zip(sizes, params, strict=True)])
        axes.minorticks_off()
        axes.set_xlabel("teacher (parameters)")
        axes.set_ylabel(f"test {metric.name}" + (" ×100" if metric.scale == 100 else ""))
        axes.set_title(metric_title(metric))
        axes.grid(alpha=0.3)
    figure.suptitle(f"{task}: student score vs teacher size (mean ± sd over seeds)")
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4))
    return figure


def method_colour(method: str) -> str:
    """The colour of a method's base (X and X_atkd alike)."""
    return BASE_COLOURS.get(method.removesuffix("_atkd"), "tab:gray")


def draw_ablation(results: Results, task: str):
    """One panel per ablated option: primary test metric vs the option's value, error bars = sd over seeds."""
    from matplotlib.figure import Figure

    curves, metrics = ablation_curves(results, task), task_metrics(results, task)
    if not curves or not metrics:
        return None
    metric = metrics[0]
    figure = Figure(figsize=(4.8 * len(curves), 4.2), layout="constrained", dpi=110)
    for axes, curve in zip(figure.subplots(1, len(curves), squeeze=False)[0], curves, strict=True):
        points = [(value, stat) for value, seeds in curve.points if (stat := seed_stat(seeds, metric))]
        axes.errorbar([v for v, _ in points], [s.mean for _, s in points], yerr=[s.sd or 0.0 for _, s in points],
                      marker="o", capsize=3)
        if curve.option in ATKD_DEFAULTS:
            axes.axvline(ATKD_DEFAULTS[curve.option], color="0.6", linestyle=":", linewidth=1, label="default")
            axes.legend(fontsize="small")
        axes.set_xlabel(ABLATION_NAMES.get(curve.option, curve.option))
        axes.set_ylabel(f"test {metric.name}" + (" ×100" if metric.scale == 100 else ""))
        axes.set_title(f"{curve.method}, teacher {curve.teacher}")
        axes.grid(alpha=0.3)
    figure.suptitle(f"{task}: ATKD ablations (mean ± sd over seeds)")
    return figure


def draw_unc(results: Results, task: str):
    """One panel per teacher size: step histograms of UnC of the easy and the hard validation tokens."""
    from matplotlib.figure import Figure

    teachers = [t for s in teacher_sizes(results, task) if (t := results.teacher(task, s)) and t.unc
                and t.unc.get("edges")]
    if not teachers:
        return None
    figure = Figure(figsize=(4.4 * len(teachers), 3.8), layout="constrained", dpi=110)
    for axes, teacher in zip(figure.subplots(1, len(teachers), squeeze=False)[0], teachers, strict=True):
        unc = teacher.unc
        for group, colour in (("easy", "tab:blue"), ("hard", "tab:red")):
            if unc.get(group):
                axes.stairs(unc[group], unc["edges"], color=colour, linewidth=1.5, label=group)
            if unc.get(f"mean_{group}") is not None:
                axes.axvline(unc[f"mean_{group}"], color=colour, linestyle=":", linewidth=1)
        axes.set_title(f"{teacher.size} ({_params(teacher.params)})")
        axes.set_xlabel("UnC = 1 − p_teacher(target)")
        axes.set_ylabel("tokens")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(f"{task}: teacher uncertainty of easy and hard tokens (dotted: means)")
    return figure


# ----------------------------------------------------------------------------------------------------- document


def write_report(results_dir: Path, out_md: Path, *, planned: list[str] | None = None, command: str = "",
                 grid_seconds: float | None = None) -> None:
    """Write ``out_md`` and its plots (in ``<out_md without .md>/``) from the results under ``results_dir``,
    keeping the discussion block of an existing ``out_md``."""
    out_md = Path(out_md)
    results = load_results(Path(results_dir))
    plot_dir = out_md.with_suffix("")
    plots = write_plots(results, plot_dir)
    notes = [] if importlib.util.find_spec("matplotlib") else [NO_MATPLOTLIB]
    discussion = read_discussion(out_md)
    generated = [
        *header_section(results, planned=planned, command=command, grid_seconds=grid_seconds, notes=notes),
        *teachers_section(results),
        *students_section(results, plots, out_md.parent),
        *claim1_section(results),
        *claim2_section(results),
        *ablation_section(results, plots, out_md.parent),
        *unc_section(results, plots, out_md.parent),
        *explain_section(results),
    ]
    lines = [line for i, line in enumerate(generated) if line or (i and generated[i - 1])]  # no double blank lines
    lines += [DISCUSSION_OPEN, discussion, DISCUSSION_CLOSE]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines).rstrip("\n") + "\n")


def read_discussion(out_md: Path) -> str:
    """The text between the discussion markers of an existing ``out_md`` (everything after the opening marker
    when the closing one was deleted), else the placeholder."""
    text = out_md.read_text() if out_md.exists() else ""
    if DISCUSSION_OPEN not in text:
        return DISCUSSION_PLACEHOLDER
    kept = text.split(DISCUSSION_OPEN, 1)[1].split(DISCUSSION_CLOSE, 1)[0]
    return kept.removeprefix("\n").removesuffix("\n")


def _image(path: Path | None, title: str, base: Path) -> list[str]:
    if path is None:
        return []
    return ["", f"![{title}]({Path(os.path.relpath(path, base)).as_posix()})", ""]


def _params(params: int | None) -> str:
    if not params:
        return MISSING
    return f"{params / 1e6:.3g}M" if params >= 1e6 else f"{params / 1e3:.3g}k"


def _num(value, scale: float = 1.0, digits: int = 2) -> str:
    return MISSING if value is None else f"{float(value) * scale:.{digits}f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def read_planned(path: Path) -> list[str]:
    """Planned run ids from a file: a JSON list, or one run id per line."""
    text = Path(path).read_text()
    try:
        return [str(run_id) for run_id in json.loads(text)]
    except ValueError:
        return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.partition("\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="results folder (runs/, teachers/)")
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"), help="markdown file to write")
    parser.add_argument("--planned", type=Path, help="file of planned run ids (JSON list or one a line)")
    parser.add_argument("--grid", help="list the runs of this grid of experiments.grid as planned")
    parser.add_argument("--command", default="", help="the command that produced the results")
    parser.add_argument("--grid-seconds", type=float, help="wall time of the grid, in seconds")
    args = parser.parse_args(argv)
    planned = read_planned(args.planned) if args.planned else None
    if args.grid:
        from experiments.grid import GRIDS, planned_runs  # imports the trainer's config (torch): only on demand

        planned = [run.run_id for run in planned_runs(GRIDS[args.grid])]
    write_report(args.results, args.out, planned=planned, command=args.command, grid_seconds=args.grid_seconds)
    print(json.dumps({"report": str(args.out)}))


if __name__ == "__main__":
    main()
