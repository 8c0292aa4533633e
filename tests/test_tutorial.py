"""docs/tutorial.md runs as written: its ``bash`` blocks, in order, in one shell, on a small corpus with tiny
settings, through the installed ``atkd-student`` and ``atkd-teacher``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"


def bash_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced blocks marked ```bash, in order."""
    return re.findall(r"^```bash\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path, corpus):
    markdown = TUTORIAL.read_text()
    script = "\n".join(bash_blocks(markdown))
    settings = {
        "TRAIN_TEXT": str(corpus["train"]), "EVAL_TEXT": str(corpus["eval"]), "VOCAB": "300",
        "TEACHER_SIZE": "32x2x2", "STUDENT_SIZE": "16x1x2", "SEQ_LEN": "32", "TEACHER_STEPS": "6",
        "STUDENT_STEPS": "4", "PORT": str(free_port()), "HTTP_PORT": str(free_port()),
    }  # fmt: skip
    for name in settings:
        assert f"{name}=${{{name}:-" in script, f"the tutorial no longer reads {name}: the test cannot shrink it"
    for command in ("atkd-student init", "--loss.name sft", "atkd-teacher serve", "--ready-file", "atkd-student eval",
                    "atkd-student report"):
        assert command in script, command
    (tmp_path / "tutorial.sh").write_text(script)
    env = {**os.environ, **settings, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(["bash", "-euo", "pipefail", "tutorial.sh"], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=240)
    finally:  # a server or a student left behind by a failure: end the script's process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err[-4000:]

    ready = next(json.loads(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith("teacher serving:"))
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert ready["grpc_port"] == int(settings["PORT"]) and ready["model_id"] == "teacher"
    evals = {Path(line["model"]).parent.name: line for line in lines if "perplexity" in line and "model" in line}
    assert evals.keys() == {"teacher", "student-atkd", "student-kd"}
    assert all(line["split"] == "eval" and line["tokens"] > 0 for line in evals.values())
    assert "loss sft reads no teacher: the teacher section (mode remote) is ignored" in err
    runs = tmp_path / "runs"
    for run, steps in (("teacher", 6), ("student-atkd", 4), ("student-kd", 4)):
        records = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1)), run
    assert "n_hard" in (runs / "student-atkd" / "metrics.jsonl").read_text()  # ATKD's split: a teacher signal
    assert not (runs / "teacher.ready").exists()  # the server stopped and cleaned up
    (report,) = [line for line in lines if "report" in line]
    summary = tmp_path / report["report"]  # relative to the script's working directory, as given
    assert summary == runs / "report" / "report.md" and (runs / "report" / "loss.png").is_file()
    assert "| student-atkd | atkd |" in summary.read_text()
