"""The experiments' pipeline (``experiments/``): the dictionary task's parsing and splits, the grid's runs and
their configs, and the smoke grid end to end (real teacher servers, real student processes, the report),
resumed and partly rerun. The claims themselves are checked by the full grid (docs/results.md), not here."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import grid
from experiments.data import instruction_record, parse_entry, split_of
from experiments.grid import GRIDS, METHODS, Run, planned_runs

REPO = Path(__file__).resolve().parents[1]

ENTRY = """Abdominal \\Ab*dom"i*nal\\, a. [Cf. F. abdominal.]
   1. Of or pertaining to the abdomen; ventral; as, the
      abdominal regions, muscles, cavity.
      [1913 Webster]

   2. (Zool.) Having abdominal fins; belonging to the
      Abdominales; as, abdominal fishes.
      [1913 Webster]
"""

MULTILINE_HEADER = """Cockle \\Coc"kle\\, v. t. [imp. & p. p. {Cockled}; p. pr. & vb. n.
   {Cockling}.] [Of uncertian origin.]
   To cause to contract into wrinkles or ridges, as some kinds
   of cloth after a wetting.
   [1913 Webster]
"""


def test_a_dictionary_entry_gives_its_first_sense_without_marks():
    assert parse_entry("Abdominal", ENTRY) == {
        "word": "Abdominal", "pos": "a.",
        "definition": "Of or pertaining to the abdomen; ventral; as, the abdominal regions, muscles, cavity."}
    cockle = parse_entry("Cockle", MULTILINE_HEADER)  # the etymology bracket spans two lines
    assert cockle["pos"] == "v. t." and cockle["definition"].startswith("To cause to contract into wrinkles")
    record = instruction_record(cockle)
    assert record["prompt"] == "Define the word: Cockle (v. t.)\nDefinition:" and record["response"][0] == " "


def test_cross_references_and_sub_entries_are_skipped():
    assert parse_entry("Wier", "Wier \\Wier\\, n.\n   Same as {Weir}.\n   [1913 Webster]\n") is None
    assert parse_entry("Cockling sea", MULTILINE_HEADER) is None  # an index line pointing into another entry


def test_a_word_has_one_split_whatever_its_case_and_the_splits_are_sized():
    words = [f"word{i}" for i in range(5000)]
    splits = [split_of(w) for w in words]
    assert [split_of(w.upper()) for w in words] == splits
    share = {name: splits.count(name) / len(words) for name in ("train", "validation", "test")}
    assert 0.01 < share["test"] < 0.03 and 0.01 < share["validation"] < 0.03 and share["train"] > 0.94


def test_the_full_grid_has_every_method_teacher_seed_and_ablation_once():
    scale = GRIDS["full"]
    runs = planned_runs(scale)
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids))
    main = [r for r in runs if not r.ablation]
    # per seed: lm: sft + 4 teacher methods x 3 sizes; instruction: sft + 6 x 3
    assert len(main) == 3 * ((1 + 4 * 3) + (1 + 6 * 3))
    assert not [r for r in runs if r.method.startswith("gkd") and r.task == "lm"]
    assert {r.method for r in main} == set(METHODS) and {r.seed for r in runs} == {0, 1, 2}
    assert all(r.teacher is None for r in runs if r.method == "sft")
    ablations = [r for r in runs if r.ablation]
    assert len(ablations) == 4 * 3 and {r.teacher for r in ablations} == {"t4"}
    # runs of one teacher and seed are adjacent (one server for them); seed 0 is complete before seed 1 starts
    groups = [(r.seed, r.task, r.teacher) for r in runs]
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)
    assert len(set(groups)) == sum(1 for a, b in zip([None, *groups[:-1]], groups, strict=True) if a != b)


def test_runs_differ_only_in_loss_teacher_and_source():
    scale = GRIDS["full"]
    common = dict(student=Path("s"), data={"train": Path("t"), "validation": Path("v")}, output_dir=Path("o"))
    configs = {method: Run("instruction", None if method == "sft" else "t4", method, 1).config(
        scale, teacher_address="127.0.0.1:1", **common).model_dump() for method in METHODS}
    varying = {"loss", "teacher", "run_name"}  # teacher: none for sft, and the tail samples (below)
    for config in configs.values():
        assert {k: v for k, v in config.items() if k not in varying and k != "data"} == \
            {k: v for k, v in configs["sft"].items() if k not in varying and k != "data"}
        assert {**config["data"], "source": None} == {**configs["sft"]["data"], "source": None}
    assert configs["fkl_atkd"]["loss"] == {"name": "atkd", "options": {
        "base": "forward", "lam": 0.2, "split": "median", "hard_fraction": 0.5}}
    assert configs["fkl"]["teacher"]["tail_samples"] == scale.tail_samples > 0
    assert configs["rkl"]["loss"] == {"name": "reverse_kl", "options": {}}
    # the tail as one exact bucket
    assert configs["rkl"]["teacher"]["tail_samples"] == configs["gkd_atkd"]["teacher"]["tail_samples"] == 0
    assert configs["gkd"]["data"]["source"]["name"] == "mix" and configs["gkd"]["loss"]["name"] == "jsd"
    assert configs["rkl_atkd"]["loss"]["options"]["base"] == "reverse"
    hard = Run("instruction", "t4", "fkl_atkd", 0, (("hard_fraction", 0.3),)).loss()
    assert hard.options["split"] == "topk" and hard.options["hard_fraction"] == 0.3


def sweep(tmp_path: Path, *args: str) -> str:
    environment = {**os.environ, "ATKD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "experiments", "--grid", "smoke", "--results",
                           str(tmp_path / "results"), "--report", str(tmp_path / "results.md"), *args],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_the_smoke_grid_runs_end_to_end_resumes_and_reruns_only_a_changed_run(tmp_path):
    """Real parts: dict-gcide from Debian's archive, a teacher server per (task, teacher), student processes."""
    planned = planned_runs(GRIDS["smoke"])
    log = sweep(tmp_path)
    assert f"{len(planned)} of {len(planned)} planned runs to do" in log
    results = tmp_path / "results"
    for run in planned:
        record = json.loads((results / "runs" / f"{run.run_id}.json").read_text())
        assert record["steps"] == GRIDS["smoke"].steps and record["method"] == run.method
        assert record["test"]["perplexity"] > 1 and 0 <= record["test"]["accuracy"] <= 1
        assert (record["test"]["rouge_l"] is None) == (run.task == "lm")
    for path in (results / "teachers").glob("*-t*.json"):
        teacher = json.loads(path.read_text())
        unc = teacher["unc"]
        assert len(unc["edges"]) == len(unc["easy"]) + 1 and sum(unc["easy"]) + sum(unc["hard"]) > 0
        assert unc["mean_hard"] >= unc["mean_easy"]
    data = next((tmp_path / "cache" / "experiments").glob("smoke-*/data"))
    words = {split: {re.match(r"Define the word: (.*) \(", json.loads(line)["prompt"])[1].lower()
                     for line in (data / "instruction" / f"{split}.jsonl").read_text().splitlines()}
             for split in ("train", "test")}
    assert words["test"] and not words["test"] & words["train"]
    report = (tmp_path / "results.md").read_text()
    assert "fkl_atkd" in report

    written = {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")}
    assert "0 of" in sweep(tmp_path)  # a rerun finds every run finished
    assert {p: p.stat().st_mtime_ns for p in written} == written

    changed = results / "runs" / f"{planned[-1].run_id}.json"
    record = json.loads(changed.read_text())
    changed.write_text(json.dumps({**record, "config_hash": "another grid"}))
    assert f"1 of {len(planned)} planned runs to do" in sweep(tmp_path)
    assert json.loads(changed.read_text())["config_hash"] == record["config_hash"]


def test_a_teachers_recipe_reruns_its_runs_only_and_the_grids_extent_reruns_none():
    scale = GRIDS["full"]
    runs = planned_runs(scale)
    hashes = {r.run_id: r.config_hash(scale) for r in runs}
    slower = dataclasses.replace(scale, teacher_lr={**scale.teacher_lr, "t16": 5e-4})
    changed = {r.run_id for r in runs if r.config_hash(slower) != hashes[r.run_id]}
    assert changed == {r.run_id for r in runs if r.teacher == "t16"}
    fewer = dataclasses.replace(scale, seeds=(0,), methods=("sft", "fkl"), ablations=())
    assert all(r.config_hash(fewer) == hashes[r.run_id] for r in planned_runs(fewer))
    longer = dataclasses.replace(scale, steps=scale.steps + 1)
    assert all(r.config_hash(longer) != hashes[r.run_id] for r in runs)


def test_a_change_to_a_methods_loss_options_reruns_its_runs(monkeypatch):
    scale = GRIDS["full"]
    runs = planned_runs(scale)
    hashes = {r.run_id: r.config_hash(scale) for r in runs}
    monkeypatch.setattr(grid, "ATKD_DEFAULTS", {**grid.ATKD_DEFAULTS, "lam": 0.3})
    changed = {r.run_id for r in runs if r.config_hash(scale) != hashes[r.run_id]}
    assert changed == {r.run_id for r in runs if r.method.endswith("_atkd") and not dict(r.ablation).get("lam")}
