"""``python -m experiments``: build the models, run every unfinished run of a grid, write the report.

Resumable: each finished run leaves ``<results>/runs/<run_id>.json`` (committed to the repository); a run
whose file exists with the same config hash is skipped, so the grid can be run in parts (``--only``) and an
interrupted sweep continues where it stopped. Runs of one (task, teacher) share one teacher server process
(``atkd-teacher serve`` on loopback), ``--jobs`` student processes at a time; SFT runs need none.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from atkd.student.demo.teacher_process import teacher_server

from .grid import GRIDS, Run, Scale, planned_runs
from .models import Assets, build_assets, write_model_results
from .run_one import write_atomic

log = logging.getLogger("experiments")
REPO = Path(__file__).resolve().parent.parent


def finished(run: Run, scale: Scale, results: Path) -> bool:
    path = results / "runs" / f"{run.run_id}.json"
    return path.is_file() and json.loads(path.read_text()).get("config_hash") == run.config_hash(scale)


def run_process(grid: str, run: Run, address: str | None, results: Path, work: Path) -> tuple[Run, int, str]:
    """One run as a child process (:mod:`experiments.run_one`); (run, exit status, tail of its log). A run
    starts from scratch: what an interrupted attempt left in its output directory is removed first."""
    output_dir = work / "runs" / run.run_id
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "experiments.run_one", "--grid", grid, "--run", json.dumps(asdict(run)),
               "--output-dir", str(output_dir), "--result", str(results / "runs" / f"{run.run_id}.json")]
    if address is not None:
        command += ["--teacher-address", address]
    log_path = output_dir / "run.log"
    with log_path.open("w") as handle:
        status = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    return run, status, log_path.read_text()[-2000:]


def run_group(grid: str, runs: list[Run], address: str | None, results: Path, work: Path, jobs: int) -> list[Run]:
    """The runs of one teacher, ``jobs`` at a time; the ones that failed."""
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        for run, status, tail in pool.map(lambda r: run_process(grid, r, address, results, work), runs):
            if status == 0:
                log.info("finished %s", run.run_id)
            else:
                failed.append(run)
                log.error("run %s failed (exit status %d); the end of its log:\n%s", run.run_id, status, tail)
    return failed


def sweep(scale: Scale, assets: Assets, runs: list[Run], results: Path, jobs: int) -> list[Run]:
    """Every run of ``runs``, grouped by (task, teacher): one teacher server per group; the failed runs."""
    failed = []
    work = assets.root / "work"
    for (task, teacher), group in itertools.groupby(runs, key=lambda r: (r.task, r.teacher)):
        group = list(group)
        log.info("%d runs of task %s with teacher %s", len(group), task, teacher or "none (sft)")
        if teacher is None:
            failed += run_group(scale.name, group, None, results, work, jobs)
            continue
        model_dir = assets.teachers[(task, teacher)]
        with teacher_server(model_dir, log_path=work / f"teacher-{task}-{teacher}.log",
                            extra_args=["--threads", "1"]) as address:
            failed += run_group(scale.name, group, address, results, work, jobs)
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="full", choices=sorted(GRIDS),
                        help="full: the whole grid; quick: under 10 minutes; smoke: a few steps (CI)")
    parser.add_argument("--quick", action="store_const", dest="grid", const="quick", help="same as --grid quick")
    parser.add_argument("--jobs", type=int, default=2, help="student processes at a time per teacher server")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="run only the runs whose id matches (e.g. 'instruction-t4-*'); repeatable")
    parser.add_argument("--results", type=Path, help="result files (default: experiments/results/<grid>)")
    parser.add_argument("--report", type=Path, help="the report to write (default: docs/results.md for the full "
                                                    "grid, <results>/report.md otherwise)")
    parser.add_argument("--list", action="store_true", help="print the planned runs and whether each is done")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    scale = GRIDS[args.grid]
    results = args.results or REPO / "experiments" / "results" / scale.name
    report = args.report or (REPO / "docs" / "results.md" if scale.name == "full" else results / "report.md")
    planned = planned_runs(scale)
    if args.list:
        for run in planned:
            print(f"{'done' if finished(run, scale, results) else '    '} {run.run_id}")
        return 0

    start = time.perf_counter()
    pending = [r for r in planned if not finished(r, scale, results)
               and (not args.only or any(fnmatch.fnmatch(r.run_id, pattern) for pattern in args.only))]
    assets = build_assets(scale, sizes=None if not args.only else {r.teacher for r in pending})
    write_model_results(scale, assets, results)
    log.info("%d of %d planned runs to do", len(pending), len(planned))
    failed = sweep(scale, assets, pending, results, args.jobs)
    seconds = time.perf_counter() - start
    timing_path = results / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"sweeps": []}
    timing["sweeps"].append({"runs": len(pending) - len(failed), "seconds": round(seconds, 1),
                             "command": shlex.join(["python", "-m", "experiments", *(argv or sys.argv[1:])])})
    write_atomic(timing_path, timing)

    from .report import write_report  # needs matplotlib (the report extra)

    write_report(results, report, planned=[r.run_id for r in planned],
                 command=f"python -m experiments --grid {scale.name}",
                 grid_seconds=sum(s["seconds"] for s in timing["sweeps"]))
    log.info("%d runs in %.0f s; report: %s", len(pending) - len(failed), seconds, report)
    if failed:
        log.error("%d runs failed: %s", len(failed), ", ".join(r.run_id for r in failed))
        return 1
    return 0
