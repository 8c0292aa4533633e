"""experiments/report.py on synthetic result files: tables, the two claims' verdicts, missing runs, plots, the
kept discussion block, and an lm-only result set. No torch, no training."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from experiments.report import (
    DISCUSSION_CLOSE,
    DISCUSSION_OPEN,
    ROUGE,
    Stat,
    claim1_rows,
    claim1_verdict,
    claim2_rows,
    claim2_verdict,
    load_results,
    main,
    paired_gain,
    write_report,
)

PARAMS = {"t1": 1_050_000, "t4": 4_330_000, "t16": 14_400_000}
SEEDS = (0, 1, 2)
NOISE = {0: -0.002, 1: 0.0, 2: 0.002}  # per seed, shared by all methods (paired)


def write_run(root: Path, task: str, teacher: str | None, method: str, seed: int, *, rouge: float | None = None,
              ppl: float = 40.0, acc: float = 0.3, ablation: dict | None = None) -> str:
    """One ``runs/<run_id>.json`` as experiments.run_one writes it; returns the run id."""
    parts = [task, teacher or "none", method, *(f"{k}{v:g}" for k, v in (ablation or {}).items()), f"s{seed}"]
    run_id = "-".join(parts)
    record = {"run_id": run_id, "grid": "full", "task": task, "teacher": teacher,
              "teacher_params": PARAMS.get(teacher), "method": method, "ablation": ablation, "seed": seed,
              "steps": 150, "test": {"perplexity": ppl, "accuracy": acc, "rouge_l": rouge, "tokens": 1000,
                                     "examples": 30},
              "validation": {"perplexity": ppl, "accuracy": acc, "rouge_l": None},
              "train": {"seconds": 30.0, "final_loss": 2.0, "teacher_wait_s": 1.0}, "config_hash": "ab12cd34"}
    (root / "runs").mkdir(parents=True, exist_ok=True)
    (root / "runs" / f"{run_id}.json").write_text(json.dumps(record))
    return run_id


def write_teacher(root: Path, task: str, size: str, ppl: float, *, rouge: float | None = None) -> None:
    edges = [i / 10 for i in range(11)]
    record = {"task": task, "size": size, "params": PARAMS.get(size),
              "test": {"perplexity": ppl, "accuracy": 0.4, "rouge_l": rouge}}
    if size != "student_init":
        record["unc"] = {"edges": edges, "easy": [50, 30, 10, 5, 5, 0, 0, 0, 0, 0],
                         "hard": [0, 0, 0, 0, 5, 10, 20, 25, 20, 20], "mean_easy": 0.12, "mean_hard": 0.74,
                         "hard_fraction": 0.5}
    (root / "teachers").mkdir(parents=True, exist_ok=True)
    (root / "teachers" / f"{task}-{size}.json").write_text(json.dumps(record))


Score = Callable[[str | None, str, int], float]


def write_instruction_grid(root: Path, rouge: Score, *, methods=("sft", "fkl", "fkl_atkd"), seeds=SEEDS) -> None:
    """Instruction runs of ``methods`` for every teacher and seed; ROUGE-L from ``rouge(teacher, method, seed)``."""
    for size in PARAMS:
        write_teacher(root, "instruction", size, ppl=30.0 - PARAMS[size] / 1e6, rouge=0.4)
    for seed in seeds:
        for method in methods:
            for teacher in [None] if method == "sft" else PARAMS:
                write_run(root, "instruction", teacher, method, seed, rouge=rouge(teacher, method, seed))


def flat(teacher, method, seed) -> float:
    """ATKD +2 ROUGE-L points over its base at every size; no effect of the teacher's size."""
    return 0.20 + (0.02 if method.endswith("_atkd") else 0.0) + NOISE[seed]


def report(root: Path, tmp_path: Path, **kwargs) -> str:
    out = tmp_path / "docs" / "results.md"
    write_report(root, out, **kwargs)
    return out.read_text()


def test_main_table_shows_mean_and_sd_over_seeds(tmp_path):
    root = tmp_path / "results"
    for seed, rouge in zip(SEEDS, (0.20, 0.22, 0.24), strict=True):
        write_run(root, "instruction", "t1", "fkl", seed, rouge=rouge, ppl=40.0 + seed)
    write_run(root, "instruction", "t4", "fkl", 0, rouge=0.30)
    write_run(root, "instruction", "t4", "fkl", 1, rouge=0.31)
    write_run(root, "instruction", None, "sft", 0, rouge=0.10)
    text = report(root, tmp_path)
    rouge_table = text.split("### instruction: test ROUGE-L")[1].split("###")[0]
    row = next(line for line in rouge_table.splitlines() if line.startswith("| fkl |"))
    assert row.split(" | ")[1:] == ["22.00 ± 2.00", "30.50 ± 0.71 (n=2)", "– |"]
    assert "| sft | – | – | 10.00 (n=1) |" in rouge_table
    assert "t1 (1.05M)" in rouge_table and "t4 (4.33M)" in rouge_table
    ppl_table = text.split("### instruction: test perplexity")[1].split("###")[0]
    assert "| fkl | 41.00 ± 1.00 |" in ppl_table


def test_teachers_are_ordered_by_parameters_not_by_name(tmp_path):
    root = tmp_path / "results"
    write_instruction_grid(root, flat)
    write_teacher(root, "instruction", "student_init", ppl=90.0, rouge=0.05)
    text = report(root, tmp_path)
    header = next(line for line in text.splitlines() if line.startswith("| method | "))
    assert header.index("t1 ") < header.index("t4 ") < header.index("t16 ")
    teachers = text.split("## Teachers")[1].split("## Students")[0]
    assert re.search(r"\| t1 \| 1\.05M \| 28\.95 \|.*\| 0\.120 \| 0\.740 \| 0\.500 \|", teachers)
    assert "| student, before training | – | 90.00 |" in teachers


def test_missing_planned_runs_are_listed_by_configuration(tmp_path):
    root = tmp_path / "results"
    done = [write_run(root, "instruction", "t1", "fkl", seed, rouge=0.2) for seed in SEEDS]
    planned = [*done, "instruction-t16-fkl-s1", "instruction-t16-fkl-s2", "instruction-t4-fkl_atkd-lam0.9-s0"]
    text = report(root, tmp_path, planned=planned, command="python -m experiments --grid full", grid_seconds=3725)
    assert "Not yet run: 3 of 6 planned runs" in text
    assert "`instruction-t16-fkl` (seeds 1, 2)" in text
    assert "`instruction-t4-fkl_atkd-lam0.9` (seeds 0)" in text
    assert "`python -m experiments --grid full`" in text and "1 h 02 min" in text
    assert "All 3 planned runs have results" in report(root, tmp_path, planned=done)


def test_claim2_confirmed_when_atkd_beats_base_at_every_size(tmp_path):
    root = tmp_path / "results"
    write_instruction_grid(root, flat)
    rows = claim2_rows(load_results(root))
    assert [(row.teacher, row.verdict) for row in rows] == [("t1", "improves"), ("t4", "improves"),
                                                            ("t16", "improves")]
    assert rows[0].gain.mean == pytest.approx(2.0) and rows[0].gain.sd == pytest.approx(0.0, abs=1e-9)
    text = report(root, tmp_path)
    assert "**Overall, claim 2: confirmed.**" in text
    assert "- instruction, fkl: improves at 3 of 3 teacher sizes" in text
    assert "average ATKD − base +2.00 ROUGE-L points over 3 cells; largest +2.00" in text


def test_claim2_mixed_when_atkd_wins_at_one_size_only(tmp_path):
    def one_win(teacher, method, seed):
        gain = 0.03 if method == "fkl_atkd" and teacher == "t16" else 0.0
        spread = 0.01 * (seed - 1) if method == "fkl_atkd" and teacher == "t4" else 0.0  # noise, mean 0
        return 0.20 + gain + spread + NOISE[seed]

    root = tmp_path / "results"
    write_instruction_grid(root, one_win)
    assert [row.verdict for row in claim2_rows(load_results(root))] == ["no clear difference", "no clear difference",
                                                                        "improves"]
    assert "**Overall, claim 2: mixed.**" in report(root, tmp_path)


def test_claim2_not_confirmed_when_atkd_is_worse_everywhere(tmp_path):
    root = tmp_path / "results"
    write_instruction_grid(root, lambda teacher, method, seed: 0.2 - (0.01 if "_atkd" in method else 0) + NOISE[seed])
    assert {row.verdict for row in claim2_rows(load_results(root))} == {"worse"}
    assert "**Overall, claim 2: not confirmed.**" in report(root, tmp_path)


def test_claim1_not_confirmed_when_scores_rise_with_teacher_size(tmp_path):
    def rising(teacher, method, seed):
        return 0.15 + {"t1": 0.0, "t4": 0.03, "t16": 0.06}.get(teacher, 0.0) + NOISE[seed] * (seed + 1)

    root = tmp_path / "results"
    write_instruction_grid(root, rising, methods=("fkl", "rkl"))
    rows = claim1_rows(load_results(root))
    assert [(row.method, row.verdict) for row in rows] == [("fkl", "not confirmed"), ("rkl", "not confirmed")]
    assert rows[0].vs_smallest.mean == pytest.approx(6.0, abs=0.5)
    assert rows[0].vs_middle.mean == pytest.approx(3.0, abs=0.5)
    assert "**Overall, claim 1: not confirmed.**" in report(root, tmp_path)


def test_claim1_confirmed_when_the_largest_teacher_is_worse_and_mixed_across_methods(tmp_path):
    def falling_for_fkl(teacher, method, seed):
        slope = {"fkl": -0.02, "rkl": 0.02}[method]
        return 0.2 + slope * list(PARAMS).index(teacher) + NOISE[seed]

    root = tmp_path / "results"
    write_instruction_grid(root, falling_for_fkl, methods=("fkl", "rkl"))
    text = report(root, tmp_path)
    assert "| instruction | fkl | ROUGE-L points | t16 − t1: -4.00 ± 0.00 |" in text
    assert "confirmed (the largest teacher's student is worse)" in text
    assert "**Overall, claim 1: mixed.**" in text


def test_verdict_rules_at_their_boundaries():
    assert claim1_verdict(Stat(3, 1.0, 1.0)) == "confirmed"  # within one paired sd
    assert claim1_verdict(Stat(3, 1.01, 1.0)) == "not confirmed"
    assert claim1_verdict(Stat(1, 5.0, None)) == "insufficient"
    assert claim2_verdict(Stat(3, 0.6, 1.0)) == "improves"  # se = 0.577
    assert claim2_verdict(Stat(3, 0.5, 1.0)) == "no clear difference"
    assert claim2_verdict(Stat(3, -0.6, 1.0)) == "worse"
    assert claim2_verdict(None) == "insufficient"


def test_single_seed_gives_no_verdict(tmp_path):
    root = tmp_path / "results"
    write_instruction_grid(root, flat, seeds=(0,))
    text = report(root, tmp_path)
    assert "**Overall, claim 2: insufficient data.**" in text
    assert "**Overall, claim 1: insufficient data.**" in text


def test_gains_are_paired_by_seed(tmp_path):
    root = tmp_path / "results"
    for seed, (base, atkd) in enumerate([(0.1, 0.12), (0.3, 0.32), (0.5, 0.52)]):
        write_run(root, "instruction", "t4", "fkl", seed, rouge=base)
        write_run(root, "instruction", "t4", "fkl_atkd", seed, rouge=atkd)
    write_run(root, "instruction", "t4", "fkl_atkd", 5, rouge=0.9)  # no partner: left out
    gain = claim2_rows(load_results(root))[0].gain
    assert (gain.n, gain.mean, gain.sd) == (3, pytest.approx(2.0), pytest.approx(0.0, abs=1e-9))


def test_ablation_tables_include_the_main_grid_default(tmp_path):
    root = tmp_path / "results"
    for seed in SEEDS:
        write_run(root, "instruction", "t4", "fkl_atkd", seed, rouge=0.25 + NOISE[seed])
        for lam, rouge in ((0.5, 0.23), (0.9, 0.20)):
            write_run(root, "instruction", "t4", "fkl_atkd", seed, rouge=rouge, ablation={"lam": lam})
        write_run(root, "instruction", "t4", "fkl_atkd", seed, rouge=0.22, ablation={"hard_fraction": 0.3})
    text = report(root, tmp_path)
    lam = text.split("### instruction: lambda (fkl_atkd, teacher t4)")[1].split("###")[0]
    values = [line.split(" | ")[0] for line in lam.splitlines() if re.match(r"\| \d", line)]
    assert values == ["| 0.2 (default: main grid)", "| 0.5", "| 0.9"]
    assert "| 0.2 (default: main grid) | 25.00 ± 0.20 |" in lam
    assert "### instruction: hard fraction (fkl_atkd, teacher t4)" in text
    assert (tmp_path / "docs" / "results" / "ablation_instruction.png").exists()


def test_plots_are_written_referenced_and_deterministic(tmp_path):
    pytest.importorskip("matplotlib")
    root = tmp_path / "results"
    write_instruction_grid(root, flat)
    text = report(root, tmp_path)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["results/students_instruction.png", "results/unc_instruction.png"]
    for link in links:
        assert (tmp_path / "docs" / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = (tmp_path / "docs" / links[0]).read_bytes()
    report(root, tmp_path)
    assert (tmp_path / "docs" / links[0]).read_bytes() == first


def test_discussion_block_survives_a_rewrite(tmp_path):
    root = tmp_path / "results"
    write_instruction_grid(root, flat)
    out = tmp_path / "docs" / "results.md"
    write_report(root, out)
    text = out.read_text()
    assert DISCUSSION_OPEN in text and DISCUSSION_CLOSE in text
    prose = "The t16 teacher is over-confident.\n\n| a | hand table |\n"
    start, end = text.index(DISCUSSION_OPEN) + len(DISCUSSION_OPEN), text.index(DISCUSSION_CLOSE)
    out.write_text(text[:start] + "\n" + prose + text[end:])
    write_run(root, "instruction", "t1", "rkl", 0, rouge=0.2)  # new results arrive
    write_report(root, out)
    rewritten = out.read_text()
    assert f"{DISCUSSION_OPEN}\n{prose}{DISCUSSION_CLOSE}" in rewritten
    assert "| rkl |" in rewritten and rewritten.count(DISCUSSION_OPEN) == 1


def test_lm_only_results_use_perplexity(tmp_path):
    root = tmp_path / "results"
    write_teacher(root, "lm", "t1", 30.0)
    write_teacher(root, "lm", "t16", 20.0)
    for seed in SEEDS:
        write_run(root, "lm", None, "sft", seed, ppl=60.0 + seed)
        for teacher, base in (("t1", 50.0), ("t16", 52.0)):
            write_run(root, "lm", teacher, "fkl", seed, ppl=base + seed, acc=0.3)
            write_run(root, "lm", teacher, "fkl_atkd", seed, ppl=(base + seed) * 0.9, acc=0.31)
    text = report(root, tmp_path)
    assert "ROUGE" not in text.split("## Students")[1].split("## Claim 1")[0]
    assert "### lm: test perplexity (lower is better)" in text and "### lm: test accuracy" in text
    assert "| fkl | 51.00 ± 1.00 | 53.00 ± 1.00 | – |" in text
    assert "| sft | – | – | 61.00 ± 1.00 |" in text
    assert "% lower perplexity" in text
    assert "**Overall, claim 2: confirmed.**" in text  # 10 % lower perplexity at both sizes
    assert "average ATKD − base +10.00 % lower perplexity" in text
    assert "**Overall, claim 1: confirmed.**" in text  # t16's student has the higher perplexity
    assert "largest / smallest = 0.67" in text
    assert (tmp_path / "docs" / "results" / "students_lm.png").exists()


def test_gain_sign_for_perplexity_is_positive_when_lower():
    class Run:
        def __init__(self, value):
            self.value = lambda metric: value

    from experiments.report import PERPLEXITY

    assert paired_gain({0: Run(45.0)}, {0: Run(50.0)}, PERPLEXITY).mean == pytest.approx(10.0)
    assert paired_gain({0: Run(0.25)}, {0: Run(0.20)}, ROUGE).mean == pytest.approx(5.0)


def test_unreadable_file_is_skipped_and_named(tmp_path):
    root = tmp_path / "results"
    write_run(root, "instruction", "t1", "fkl", 0, rouge=0.2)
    (root / "runs" / "partial.json").write_text('{"run_id": ')
    text = report(root, tmp_path)
    assert "partial.json" in text and "| fkl | 20.00 (n=1) |" in text


def test_empty_results_and_the_command_line(tmp_path, capsys):
    out = tmp_path / "results.md"
    main(["--results", str(tmp_path / "none"), "--out", str(out), "--command", "make grid"])
    text = out.read_text()
    assert "`make grid`" in text and "No teacher results yet." in text
    assert json.loads(capsys.readouterr().out) == {"report": str(out)}


def test_discussion_is_kept_when_its_closing_marker_was_deleted(tmp_path):
    root = tmp_path / "results"
    write_run(root, "instruction", "t1", "fkl", 0, rouge=0.2)
    out = tmp_path / "results.md"
    write_report(root, out)
    out.write_text(out.read_text().split(DISCUSSION_OPEN)[0] + DISCUSSION_OPEN + "\nMy notes.\n")
    write_report(root, out)
    assert f"{DISCUSSION_OPEN}\nMy notes.\n{DISCUSSION_CLOSE}" in out.read_text()
