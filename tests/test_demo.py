"""`make demo` end to end at toy size: assets from the shipped excerpt, a teacher server subprocess, two students."""

from __future__ import annotations

import re

import pytest

from atkd.student import demo


@pytest.mark.slow
def test_demo_distils_through_a_teacher_server_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATKD_CACHE", str(tmp_path))
    demo.main(["--source", "excerpt", "--teacher-steps", "20", "--steps", "4", "--batch-size", "4",
               "--seq-len", "32", "--eval-batches", "2", "--tail-samples", "4", "--output-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "teacher server on 127.0.0.1:" in out
    rows = dict(re.findall(r"^(student after 4 steps of \w+)\s+[\d.]+M\s+([\d.]+)", out, re.MULTILINE))
    assert set(rows) == {"student after 4 steps of atkd", "student after 4 steps of sft"}
    before = float(re.search(r"^student before training\s+[\d.]+M\s+([\d.]+)", out, re.MULTILINE)[1])
    assert all(float(ppl) < before for ppl in rows.values())
    assert "atkd-teacher stopped" in next(tmp_path.glob("demo-*/teacher-server.log")).read_text()
