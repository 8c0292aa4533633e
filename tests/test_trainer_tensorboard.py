"""TensorBoard scalars of a training job (the ``tensorboard`` extra), read back with TensorBoard's own reader:
every number of ``metrics.jsonl``, at its step, once, also after a resume that replays steps."""

from __future__ import annotations

import json
import time

import pytest

from atkd.student.trainer.checkpoint import list_checkpoints
from atkd.student.trainer.loop import train
from tests.test_trainer import run_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="needs the tensorboard extra: pip install 'atkd-distill[tensorboard]'")


def board_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the event files in ``directory``, as TensorBoard shows them."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def jsonl_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """The same shape from ``metrics.jsonl``: ``{"<kind>/<key>": [(step, value), ...]}``."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for record in map(json.loads, path.read_text().splitlines()):
        for key, value in record.items():
            if key not in ("kind", "step"):
                scalars.setdefault(f"{record['kind']}/{key}", []).append((record["step"], value))
    return scalars


def test_tensorboard_scalars_match_metrics_jsonl_after_a_resume_that_replays_steps(tmp_path, corpus,  # noqa: F811
                                                                                    tiny_model_factory, tiny_model_dir):
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 16, "tail_samples": 4}
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), teacher, max_steps=6, save_every=3,
                        eval_every=3)
    stopped = train(config, stop_at=5)  # checkpoints at steps 3 and 5
    assert stopped.stopped_early
    # As after a crash past the last checkpoint: resume from step 3, so steps 4 and 5 are trained (and logged) again.
    # TensorBoard reads event files in name order, whose first varying part is the creation second.
    time.sleep(1.05 - time.time() % 1)
    resumed = train(config, resume=list_checkpoints(config.output_dir)[0])
    assert resumed.state.step == 6

    expected = jsonl_scalars(config.output_dir / "metrics.jsonl")
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in expected["eval/perplexity"]] == [3, 6]
    actual = board_scalars(config.output_dir / "tensorboard")
    assert actual.keys() == expected.keys()
    assert {"train/loss", "train/n_hard", "train/mean_uncertainty", "train/teacher_wait_s", "train/tokens_per_s",
            "eval/perplexity", "eval/accuracy"} <= actual.keys()
    for tag, points in expected.items():
        assert [step for step, _ in actual[tag]] == [step for step, _ in points], tag
        assert [value for _, value in actual[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag
