"""``atkd-student report``: runs read back from their output_dir, the summary's numbers, the plots' panels and
files, and clear errors; on real runs of the tiny models (ATKD from a local teacher, resumed once, and SFT)
and on hand-written metrics.jsonl files."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from atkd.student.trainer.cli import main
from atkd.student.trainer.loop import train
from atkd.student.trainer.plots import PLOTS, draw
from atkd.student.trainer.report import MISSING, write_report
from atkd.student.trainer.runs import read_run, read_runs, summarize
from tests.test_trainer import run_config

PLOT = {plot.name: plot for plot in PLOTS}


def write_run(directory, records, loss: str | None = "atkd"):
    """A run directory with ``records`` as metrics.jsonl and a config.json naming ``loss`` (None: no config)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if loss is not None:
        (directory / "config.json").write_text(json.dumps({"loss": {"name": loss, "options": {}}}))
    return directory


def train_record(step, **values):
    return {"kind": "train", "step": step, "loss": 1.0 / step, "teacher_wait_s": 0.1, "step_s": 0.5,
            "tokens": 100 * step, "tokens_per_s": 200.0, **values}


def eval_record(step, perplexity, accuracy):
    return {"kind": "eval", "step": step, "perplexity": perplexity, "accuracy": accuracy, "tokens": 64}


def table(markdown: str) -> dict[str, dict[str, str]]:
    """The summary table of report.md as ``{run: {column: cell}}``."""
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in markdown.splitlines()
            if line.startswith("| ")]
    header, *body = rows
    return {row[0]: dict(zip(header, row, strict=True)) for row in body}


# --- real runs --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, corpus, tiny_model_factory, tiny_model_dir):  # noqa: F811
    """Two 4-step runs whose directories are both named ``run``: ATKD from the local teacher (evaluated at steps
    2 and 4; stopped at step 2 and resumed) and SFT (evaluated at the end)."""
    root = tmp_path_factory.mktemp("runs")
    student = tiny_model_factory("gpt2")
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 16, "tail_samples": 4}
    atkd = run_config(root / "a", corpus, student, teacher, max_steps=4, eval_every=2, save_every=2)
    assert train(atkd, stop_at=2).stopped_early
    assert train(atkd, resume=True).state.step == 4
    sft = run_config(root / "b", corpus, student, None, max_steps=4, **{"loss.name": "sft"})
    train(sft)
    return [atkd.output_dir, sft.output_dir]


def test_report_of_real_runs_writes_valid_pngs_and_the_numbers_of_their_metrics(real_runs, tmp_path, capsys):
    main(["report", *map(str, real_runs), "--out", str(tmp_path / "out")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str(tmp_path / "out" / "report.md")
    names = ["loss.png", "atkd_split.png", "speed.png", "eval.png"]
    assert printed["plots"] == [str(tmp_path / "out" / name) for name in names]
    for name in names:
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "PNG" and image.width > 500 and image.height > 300
            image.verify()

    rows = table((tmp_path / "out" / "report.md").read_text())
    assert list(rows) == ["atkd", "sft"]  # both directories are named "run": labelled by their loss
    for label, directory in zip(rows, real_runs, strict=True):
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        trains = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        assert [r["step"] for r in trains] == [1, 2, 3, 4]  # the resumed run logged each step once
        assert len(evals) == {"atkd": 2, "sft": 1}[label]
        before = [0] + [r["tokens"] for r in trains[:-1]]
        seconds = sum((r["tokens"] - b) / r["tokens_per_s"] for b, r in zip(before, trains, strict=True))
        row = rows[label]
        assert row["loss"] == label and row["steps"] == "4" and row["tokens"] == f"{trains[-1]['tokens']:,}"
        assert row["final train loss"] == f"{trains[-1]['loss']:.4g}"
        assert row["eval ppl (final)"] == f"{evals[-1]['perplexity']:.2f}"
        assert row["eval ppl (best)"] == f"{min(r['perplexity'] for r in evals):.2f}"
        assert row["eval acc (final)"] == f"{evals[-1]['accuracy']:.2%}"
        assert row["eval acc (best)"] == f"{max(r['accuracy'] for r in evals):.2%}"
        assert row["teacher wait (s/step)"] == f"{sum(r['teacher_wait_s'] for r in trains) / 4:.3f}"
        assert row["tokens/s"] == f"{trains[-1]['tokens'] / seconds:,.0f}"
    assert rows["atkd"]["plots"] == ("[loss](loss.png) · [atkd_split](atkd_split.png) · [speed](speed.png) · "
                                     "[eval](eval.png)")
    assert rows["sft"]["plots"] == "[loss](loss.png) · [speed](speed.png) · [eval](eval.png)"


def test_the_figures_of_real_runs_have_the_panels_their_records_allow(real_runs):
    runs = read_runs(real_runs)
    titles = {name: [axes.get_title() for axes in draw(plot, runs).axes] for name, plot in PLOT.items()}
    assert titles == {
        "loss": ["Train loss", "ATKD loss by token group", "ATKD parts"],
        "atkd_split": ["Mean teacher uncertainty", "Tokens per step by group"],
        "speed": ["Time per step", "Throughput"],
        "eval": ["Eval perplexity", "Eval accuracy"],
    }
    loss = draw(PLOT["loss"], runs)
    assert [text.get_text() for text in loss.legends[0].get_texts()] == ["atkd", "sft"]
    train_loss, by_group, parts = loss.axes
    assert [line.get_color() for line in train_loss.lines][0] != train_loss.lines[1].get_color()  # a colour per run
    assert len(by_group.lines) == 2 and len(parts.lines) == 3  # the ATKD run only: one line per part
    assert all(axes.get_xlabel() == "step" and axes.get_ylabel() for axes in loss.axes)
    split = draw(PLOT["atkd_split"], runs)
    assert [text.get_text() for text in split.legends[0].get_texts()] == ["atkd"]
    eval_perplexity = draw(PLOT["eval"], runs).axes[0]
    assert [list(line.get_xdata()) for line in eval_perplexity.lines] == [[2, 4], [4]]


# --- summaries and labels from hand-written records -------------------------------------------------------------


def test_summary_weighs_each_record_by_the_steps_and_tokens_it_covers(tmp_path):
    """Records every 2, 1 and 3 steps (log_every changes): wait (0.5*2 + 0.2*1 + 0.1*3) / 6 = 0.25 s per step;
    200, 100 and 300 tokens in 2 s, 2 s and 1 s: 600 tokens / 5 s = 120 tokens/s."""
    records = [
        train_record(2, teacher_wait_s=0.5, tokens=200, tokens_per_s=100.0),
        train_record(3, teacher_wait_s=0.2, tokens=300, tokens_per_s=50.0),
        eval_record(3, 50.0, 0.25),
        train_record(6, teacher_wait_s=0.1, tokens=600, tokens_per_s=300.0, loss=0.75),
        eval_record(6, 60.0, 0.20),
    ]
    [run] = read_runs([write_run(tmp_path / "run", records)])
    summary = summarize(run)
    assert (summary.label, summary.loss_name, summary.steps, summary.tokens, summary.final_loss) == (
        "run", "atkd", 6, 600, 0.75)
    assert summary.teacher_wait_s == pytest.approx(0.25) and summary.tokens_per_s == pytest.approx(120.0)
    assert (summary.final_perplexity, summary.best_perplexity) == (60.0, 50.0)
    assert (summary.final_accuracy, summary.best_accuracy) == (0.20, 0.25)


def test_a_run_without_eval_or_atkd_fields_gets_the_plots_it_has_and_dashes(tmp_path):
    run = write_run(tmp_path / "sft", [train_record(1), train_record(2)], loss="sft")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "eval.png").write_bytes(b"an earlier report's")
    report = write_report([run], tmp_path / "out")
    assert [plot.path.name for plot in report.plots] == ["loss.png", "speed.png"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["loss.png", "report.md", "speed.png"]
    row = table(report.summary.read_text())["sft"]
    assert [row[c] for c in ("eval ppl (final)", "eval ppl (best)", "eval acc (final)", "eval acc (best)")] == [
        MISSING] * 4
    assert row["final train loss"] == "0.5" and row["plots"] == "[loss](loss.png) · [speed](speed.png)"
    assert draw(PLOT["atkd_split"], read_runs([run])) is None


def test_labels_are_directory_names_then_loss_names_then_two_path_parts(tmp_path):
    def run(path, loss):
        return write_run(tmp_path / path, [train_record(1)], loss=loss)

    assert [r.label for r in read_runs([run("x/atkd", "atkd"), run("y/kd", "forward_kl")])] == ["atkd", "kd"]
    assert [r.label for r in read_runs([run("a/run", "atkd"), run("b/run", "sft")])] == ["atkd", "sft"]
    assert [r.label for r in read_runs([run("c/run", "atkd"), run("d/run", "atkd"), run("e/other", "atkd")])] == [
        "c/run", "d/run", "other"]


def test_a_step_logged_twice_keeps_its_last_record_and_a_half_written_last_line_is_skipped(tmp_path):
    directory = write_run(tmp_path / "run", [train_record(1), train_record(2, loss=9.0), train_record(2, loss=3.0),
                                             eval_record(2, 10.0, 0.5)])
    with (directory / "metrics.jsonl").open("a") as file:
        file.write('{"kind": "train", "step": 3, "lo')  # the writer is still on this line
    run = read_run(directory)
    assert run.series("train", "loss") == ([1, 2], [1.0, 3.0])
    assert run.series("eval", "perplexity") == ([2], [10.0])


# --- errors -----------------------------------------------------------------------------------------------------


def test_missing_empty_or_broken_metrics_are_errors_that_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such run directory"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "no_metrics").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'no_metrics' / 'metrics.jsonl'}: no such file"):
        read_run(tmp_path / "no_metrics")
    empty = write_run(tmp_path / "empty", [])
    with pytest.raises(ValueError, match=f"{empty / 'metrics.jsonl'}: no records"):
        read_run(empty)
    broken = write_run(tmp_path / "broken", [train_record(1)])
    (broken / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=f"{broken / 'metrics.jsonl'}:2: not a JSON record"):
        read_run(broken)


def test_the_cli_reports_a_bad_run_in_one_line_with_exit_status_2(tmp_path, capsys):
    good = write_run(tmp_path / "good", [train_record(1)])
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(good), str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"atkd-student: {tmp_path / 'missing'}: no such run directory\n"
    assert not (tmp_path / "out").exists()


def test_without_matplotlib_the_cli_names_the_extra_in_one_line(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", [train_record(1)])
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    monkeypatch.delitem(sys.modules, "atkd.student.trainer.plots")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.endswith("\n")
    assert error.startswith("atkd-student report needs matplotlib, which is not installed: ")
    assert "pip install 'atkd-distill[report]'" in error
