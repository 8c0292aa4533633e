"""`make demo` end to end at toy size: assets from the shipped excerpt, a teacher server subprocess, two students;
the cached assets; ``--prepare-only`` for a deployment; the module and console-script entry points."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from atkd.student.data.tokenizer import tokenizer_fingerprint
from atkd.student.demo.assets import prepare_demo_assets
from atkd.student.demo.cli import main
from atkd.student.models import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_distils_through_a_teacher_server_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATKD_CACHE", str(tmp_path))
    main(["--source", "excerpt", "--teacher-steps", "20", "--steps", "4", "--batch-size", "4",
          "--seq-len", "32", "--eval-batches", "2", "--tail-samples", "4", "--output-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "teacher server on 127.0.0.1:" in out
    rows = dict(re.findall(r"^(student after 4 steps of \w+)\s+[\d.]+M\s+([\d.]+)", out, re.MULTILINE))
    assert set(rows) == {f"student after 4 steps of {loss}" for loss in ("atkd", "forward_kl", "sft")}
    before = float(re.search(r"^student before training\s+[\d.]+M\s+([\d.]+)", out, re.MULTILINE)[1])
    assert all(float(ppl) < before for ppl in rows.values())
    assert "atkd-teacher stopped" in next(tmp_path.glob("demo-*/teacher-server.log")).read_text()


def test_demo_assets_are_built_once_and_keyed_by_settings(tmp_path):
    settings = dict(family="gpt2", vocab_size=400, teacher_steps=2, batch_size=2, seq_len=16, source="excerpt")
    first = prepare_demo_assets(tmp_path, **settings)
    weights = first.teacher_dir / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    again = prepare_demo_assets(tmp_path, **settings)
    assert again.root == first.root and weights.stat().st_mtime_ns == built_at
    assert torch.equal(again.train_ids, first.train_ids) and again.source == "excerpt"
    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(first.tokenizer_dir))
    for model_dir in (first.teacher_dir, first.student_init_dir):
        assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir)) == fingerprint
    teacher, student = load_model(first.teacher_dir), load_model(first.student_init_dir)
    assert teacher.config.vocab_size == student.config.vocab_size == 400
    assert student.num_parameters() < teacher.num_parameters() / 2

    changed = prepare_demo_assets(tmp_path, **{**settings, "teacher_steps": 3})
    assert changed.root != first.root
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


def test_prepare_only_writes_what_a_deployment_starts_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATKD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "deploy"
    main(["--source", "excerpt", "--teacher-steps", "2", "--prepare-only", str(out)])
    assert f"demo assets written to {out}" in capsys.readouterr().out
    for model_dir in (out / "teacher", out / "student_init"):
        assert load_model(model_dir).config.vocab_size == len(AutoTokenizer.from_pretrained(model_dir))
    assert (out / "data" / "train.txt").stat().st_size > (out / "data" / "eval.txt").stat().st_size > 0


@pytest.mark.parametrize("command", [[sys.executable, "-m", "atkd.student.demo"],
                                     [str(Path(sys.executable).with_name("atkd-demo"))]])  # the console script
def test_the_module_and_the_console_script_run_the_demo(command):
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--prepare-only DIR" in done.stdout and "make demo" in done.stdout
