"""What a new user of ``atkd-student`` ran into (issue 16), each fixed: SFT without a teacher, eval without
held-out data, checkpoints as models, model ids, resuming with another length, generations on disk, the
progress label, the example's learning rate, a wall-time bound and prefetch past the last step."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import yaml

from atkd.proto.fingerprint import tokenizer_fingerprint
from atkd.services.teacher.cli import parse_config
from atkd.services.teacher.engine import TeacherEngine
from atkd.student.data.instructions import dialogue_pairs, write_jsonl
from atkd.student.optim import OptimConfig, cosine_with_warmup
from atkd.student.trainer import loop
from atkd.student.trainer.checkpoint import list_checkpoints
from atkd.student.trainer.cli import main, run_eval
from atkd.student.trainer.config import describe_fields, load_config, parse_duration
from atkd.student.trainer.loop import train
from atkd.student.trainer.parts import load_tokenizer
from tests.test_trainer import REPO, run_config

SFT = {"loss.name": "sft"}


def records(config, kind: str = "train") -> list[dict]:
    lines = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# 3. SFT with a teacher section: the section is ignored, never built; --teacher null unsets it.

def test_sft_never_builds_the_teacher_of_its_config(tmp_path, corpus, tiny_model_factory, caplog):
    down = {"mode": "remote", "addresses": ["127.0.0.1:1"], "timeout_s": 1, "retry_budget_s": 0}  # nothing listens
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), down, max_steps=2, **SFT)
    with caplog.at_level(logging.INFO, logger="atkd.student.trainer.loop"):
        result = train(config)
    assert result.state.step == 2 and not result.stopped_early
    assert "loss sft reads no teacher: the teacher section (mode remote) is ignored" in caplog.text


def test_teacher_null_unsets_the_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"student": "s", "data": {"train": ["t.txt"]}, "max_steps": 1,
                                    "teacher": {"mode": "remote", "addresses": ["127.0.0.1:50051"]}}))
    config = load_config(path, ["--loss.name", "sft", "--teacher", "null"])
    assert config.teacher is None and config.used_teacher is None
    kept = load_config(path, ["--loss.name", "sft"])
    assert kept.teacher is not None and kept.used_teacher is None  # set, but sft reads none
    assert load_config(path).used_teacher == load_config(path).teacher
    with pytest.raises(ValueError, match="loss 'atkd' needs a teacher section"):
        load_config(path, ["--teacher", "null"])


# 4. eval without data.eval: an error naming it, unless --split train asks for the training data.

def test_eval_without_held_out_data_fails_naming_data_eval(tmp_path, corpus, tiny_model_factory, capsys):
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), None, max_steps=1, **SFT, **{"data.eval": []})
    train(config)
    config_file = tmp_path / "run.json"
    config_file.write_text(config.model_dump_json())
    with pytest.raises(SystemExit) as done:
        main(["eval", "--config", str(config_file)])
    assert done.value.code == 2 and "data.eval is not set" in capsys.readouterr().err
    main(["eval", "--config", str(config_file), "--split", "train"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["split"] == "train" and report["tokens"] > 0


# 5, 6. Checkpoints and final/ are complete model directories, each with its own model id.

def test_checkpoints_are_servable_models_with_the_runs_model_id(tmp_path, corpus, tiny_model_factory):
    student = tiny_model_factory("gpt2")
    config = run_config(tmp_path, corpus, student, None, max_steps=4, save_every=2, keep_checkpoints=3, **SFT)
    result = train(config)
    first, last = list_checkpoints(config.output_dir)
    assert first.name == "step-00000002" and {"tokenizer.json", "tokenizer_config.json"} <= set(
        p.name for p in first.iterdir())
    fingerprint = tokenizer_fingerprint(load_tokenizer(student))
    for directory, model_id in [(first, "run-step-2"), (last, "run-step-4"), (result.final_dir, "run")]:
        engine = TeacherEngine.load(parse_config(["serve", "--model", str(directory)]).model)
        assert (engine.model_id, engine.tokenizer_hash) == (model_id, fingerprint)
    report = run_eval(config, first, max_new_tokens=4, max_examples=2)
    assert report["model"] == str(first) and math.isfinite(report["perplexity"])

    named = run_config(tmp_path / "named", corpus, student, None, max_steps=1, run_name="shakespeare-sft", **SFT)
    assert TeacherEngine.load(train(named).final_dir).model_id == "shakespeare-sft"


# 7. Resuming with another max_steps warns, stating the new schedule.

def test_resuming_with_another_max_steps_warns_with_the_new_schedule(tmp_path, corpus, tiny_model_factory, caplog):
    student = tiny_model_factory("gpt2")
    train(run_config(tmp_path, corpus, student, None, max_steps=8, **SFT), stop_at=4)
    with caplog.at_level(logging.WARNING, logger="atkd.student.trainer.loop"):
        train(run_config(tmp_path, corpus, student, None, max_steps=8, **SFT), resume=True)
    assert "resuming" not in caplog.text  # the same length: nothing to say

    train(run_config(tmp_path / "longer", corpus, student, None, max_steps=8, **SFT), stop_at=4)
    longer = run_config(tmp_path / "longer", corpus, student, None, max_steps=12, **SFT)
    with caplog.at_level(logging.WARNING, logger="atkd.student.trainer.loop"):
        train(longer, resume=True)
    optim = longer.optim  # lr 1e-2, warmup 2 (run_config)
    old, new = (optim.lr * cosine_with_warmup(4, steps, optim.warmup, optim.min_lr_ratio) for steps in (8, 12))
    assert (f"resuming at step 4 of a run scheduled over 8 steps with 12 steps: the cosine is redrawn over 12 "
            f"steps, so the next step's learning rate is {new:.3g} instead of {old:.3g}") in caplog.text
    assert [r["step"] for r in records(longer)] == list(range(1, 13))


# 9a. The generations of an instruction eval are written beside the metrics.

def test_eval_writes_each_generation_beside_the_metrics(tmp_path, excerpt_paragraphs, tiny_model_factory):
    pairs = dialogue_pairs("\n\n".join(excerpt_paragraphs), max_chars=80)
    data = {"kind": "instruction", "seq_len": 48, "eval_batches": 1,
            "train": str(write_jsonl(pairs[:-8], tmp_path / "train.jsonl")),
            "eval": str(write_jsonl(pairs[-8:], tmp_path / "eval.jsonl"))}
    config = run_config(tmp_path, {}, tiny_model_factory("gpt2"), None, max_steps=1, data=data, **SFT)
    train(config)
    report = run_eval(config, None, max_new_tokens=5, max_examples=6)
    samples = Path(report["samples"])
    assert samples == config.output_dir / "generations-final.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == report["generated"] == 6
    assert [(r["prompt"], r["reference"]) for r in rows] == [(p["prompt"], p["response"]) for p in pairs[-8:-2]]
    assert sum(r["rouge_l"] for r in rows) / 6 == pytest.approx(report["rouge_l"])
    assert all(isinstance(r["generation"], str) for r in rows)


# 9b. The progress bar names the loss, not "distil" for SFT.

def test_the_progress_bar_names_the_loss(tmp_path, corpus, tiny_model_factory, capfd):
    train(run_config(tmp_path, corpus, tiny_model_factory("gpt2"), None, max_steps=2, progress=True, **SFT))
    bar = capfd.readouterr().err
    assert "sft: 100%" in bar and "distil" not in bar


# 9c. The example config and --help agree on the optimiser.

def test_the_example_optimiser_is_the_one_help_lists_as_default():
    example = yaml.safe_load((REPO / "docs" / "examples" / "train.yaml").read_text())["optim"]
    for key, value in example.items():
        assert value == OptimConfig.model_fields[key].default, key
    help_line = next(line for line in describe_fields() if line.strip().startswith("--optim.lr "))
    assert help_line.endswith(f"(default: {example['lr']})")


# 9d. max_time bounds a run by wall time: it stops at a step boundary with a checkpoint, as SIGTERM does.

def test_durations_read_as_seconds():
    assert [parse_duration(t) for t in ("1h30m", "90m", "45s", "1.5h", "3600", "1m30s")] == [
        5400, 5400, 45, 5400, 3600, 90]
    for bad in ("", "soon", "1x", "m30"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    assert load_config(None, ["--student", "s", "--data.train", "t", "--max_steps", "1", "--loss.name", "sft",
                              "--max_time", "1h30m"]).max_time == 5400


def test_max_time_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, corpus, tiny_model_factory):
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), None, max_steps=100_000, save_every=0,
                        max_time=2.0, **SFT)
    result = train(config)
    assert result.stopped_early and result.final_dir is None and 1 <= result.state.step < 100_000
    assert list_checkpoints(config.output_dir)[-1].name == f"step-{result.state.step:08d}"
    assert records(config)[-1]["step"] == result.state.step
    resumed = train(config.model_copy(update={"max_steps": result.state.step + 2, "max_time": None}), resume=True)
    assert resumed.state.step == result.state.step + 2 and not resumed.stopped_early


# 9e. The prefetch asks the teacher for the run's batches and none past the last step.

def test_the_teacher_scores_no_batch_past_the_last_step(tmp_path, corpus, tiny_model_factory, tiny_model_dir,
                                                         monkeypatch):
    submitted = []

    def counting(*args, **kwargs):
        teacher = build_teacher(*args, **kwargs)
        submit = teacher.submit
        teacher.submit = lambda batch, seed=None: submitted.append(seed) or submit(batch, seed)
        return teacher

    build_teacher = loop.build_teacher
    monkeypatch.setattr(loop, "build_teacher", counting)
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 8, "prefetch": 3}
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), teacher, max_steps=3, grad_accum=2)
    train(config, stop_at=2)  # on micro-batch 3, a prefetch of 3 reaches 6: past the run's 6 (0..5)
    assert len(submitted) == 6
    submitted.clear()
    train(config, resume=True)
    assert len(submitted) == 2  # step 3's two micro-batches, nothing after
