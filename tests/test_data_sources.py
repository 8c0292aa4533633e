"""data.source through a real teacher server: SeqKD generations (offline, resumable; online), on-policy student
samples scored exactly as sampled (checked in the server's engine), mix, and exact resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atkd.proto.fingerprint import tokenizer_fingerprint
from atkd.student.data.generated import (
    MANIFEST,
    RECORDS,
    GenerationManifest,
    GenerationMismatchError,
    generated_examples,
)
from atkd.student.data.instructions import instruction_task
from atkd.student.data.sources import LambdaSchedule
from atkd.student.trainer.cli import generate_responses
from atkd.student.trainer.config import load_config
from atkd.student.trainer.loop import train
from atkd.student.trainer.parts import load_examples, load_tokenizer
from tests.teacher_harness import GatedEngine
from tests.test_trainer import final_weights

SEQ_LEN = 64


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    return instruction_task(tmp_path_factory.mktemp("instructions"))


def config_of(tmp_path: Path, task, student_dir: Path, address: str, name: str = "run", **overrides):
    values = {
        "student": str(student_dir), "output_dir": str(tmp_path / name),
        "data": {"kind": "instruction", "train": str(task["train"]), "seq_len": SEQ_LEN},
        "teacher": {"mode": "remote", "addresses": [address], "top_k": 8, "tail_samples": 2, "prefetch": 2},
        "loss": {"name": "atkd"}, "batch_size": 4, "max_steps": 4, "save_every": 2, "progress": False,
        "optim": {"lr": 1e-2, "warmup": 1},
    }  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(values))
    flags = [item for key, value in overrides.items() for item in (f"--{key}", json.dumps(value))]
    return load_config(path, flags)


def sequences_of(jobs) -> list[tuple[list[int], list[int]]]:
    """(tokens, scored targets) of every sequence the engine computed."""
    found = []
    for job in jobs:
        ends = torch.tensor(job.lengths).cumsum(0).tolist()
        for row, (end, length) in enumerate(zip(ends, job.lengths, strict=True)):
            targets = job.targets[job.rows == row].tolist()
            found.append((job.token_ids[end - length:end].tolist(), targets))
    return found


def test_seqkd_generations_repeat_with_their_seed_and_resume_to_the_same_file(tmp_path, task, tiny_model_factory,
                                                                              serve_teacher):
    server = serve_teacher()
    student = tiny_model_factory("gpt2")
    config = config_of(tmp_path, task, student, server.address, **{"data.source.max_new_tokens": 16,
                                                                    "data.source.temperature": 1.3})
    first = generate_responses(config, tmp_path / "first", block_size=32)
    assert first.complete and first.num_prompts == 231
    generate_responses(config, tmp_path / "second", block_size=32)
    records = (tmp_path / "first" / RECORDS).read_text()
    assert (tmp_path / "second" / RECORDS).read_text() == records

    # Cut short mid-block (a torn line), then resumed: the same file as the uninterrupted runs.
    lines = records.splitlines(keepends=True)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / RECORDS).write_text("".join(lines[:70]) + lines[70][:9])
    manifest = GenerationManifest.read(tmp_path / "first")
    (cut / MANIFEST).write_text(json.dumps({**manifest.__dict__, "complete": False}))
    generate_responses(config, cut, block_size=32)
    assert (cut / RECORDS).read_text() == records
    with pytest.raises(GenerationMismatchError, match="other settings"):  # other options: another directory
        generate_responses(config_of(tmp_path, task, student, server.address), cut, block_size=32)

    # Training on them (offline SeqKD): the examples are the prompts with the teacher's responses.
    offline = config_of(tmp_path, task, student, server.address, name="seqkd", **{
        "data.source.name": "teacher", "data.source.generations": str(tmp_path / "first"), "max_steps": 1})
    tokenizer = load_tokenizer(student)
    dataset = load_examples(offline.data, tokenizer)
    generated = generated_examples(dataset, tmp_path / "first", vocab_size=len(tokenizer),
                                   tokenizer_hash=tokenizer_fingerprint(tokenizer))
    record = json.loads(lines[5])
    prompt = int(dataset.prompt_lengths[5])
    response = record["response_ids"][: SEQ_LEN + 1 - prompt]
    padding = SEQ_LEN + 1 - prompt - len(response)
    assert generated.targets[5].tolist() == [-100] * (prompt - 1) + response + [-100] * padding
    assert generated.input_ids[5, :prompt].tolist() == dataset.input_ids[5, :prompt].tolist()
    assert train(offline).state.step == 1


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_sampled_sequences_are_exactly_what_the_teacher_scores(tmp_path, task, tiny_model_factory, serve_teacher,
                                                               tiny_teacher_engine, source):
    """On-policy (student) and online SeqKD (teacher): the sequences the server's engine scored are the prompts
    with the logged samples, and it scored exactly the response positions."""
    engine = GatedEngine(tiny_teacher_engine)
    server = serve_teacher(engine=engine)
    config = config_of(tmp_path, task, tiny_model_factory("gpt2"), server.address, max_steps=3, **{
        "data.source.name": source, "data.source.log_samples": True, "data.source.max_new_tokens": 12})
    train(config)
    samples = [json.loads(line) for line in (Path(config.output_dir) / "samples-rank0.jsonl").read_text().splitlines()]
    assert len(samples) >= 8 and {s["source"] for s in samples} == {source}  # of 12: prompts that fit a window
    computed = sequences_of(engine.computed)
    assert len(computed) == 3 * 4
    scored = [(tokens, targets) for tokens, targets in computed if targets]  # the others: prompts with no room
    assert len(scored) == len(samples)
    for sample, (tokens, targets) in zip(samples, scored, strict=True):  # one client: in order
        sequence = sample["prompt_ids"] + sample["response_ids"]
        assert tokens[: len(sequence)] == sequence
        assert targets == sample["response_ids"]  # every response token, and nothing of the prompt or padding


def test_mix_with_lambda_zero_equals_the_dataset_run(tmp_path, task, tiny_model_factory, serve_teacher):
    server = serve_teacher()
    student = tiny_model_factory("gpt2")
    dataset = train(config_of(tmp_path, task, student, server.address, name="dataset"))
    mixed = train(config_of(tmp_path, task, student, server.address, name="mix", **{
        "data.source.name": "mix", "data.source.lmbda": 0.0, "data.source.log_samples": True}))
    for name, tensor in final_weights(dataset).items():
        assert torch.equal(tensor, final_weights(mixed)[name]), name
    assert not (tmp_path / "mix" / "samples-rank0.jsonl").read_text()  # nothing was sampled


@pytest.mark.parametrize("staleness", [0, 1])
def test_resume_under_on_policy_sampling_gives_bit_identical_weights(tmp_path, task, tiny_model_factory,
                                                                      serve_teacher, staleness):
    server = serve_teacher()
    student = tiny_model_factory("gpt2")
    options = {"data.source.name": "mix", "data.source.lmbda": 0.8, "data.source.lmbda_start": 0.2,
               "data.source.staleness": staleness, "data.source.max_new_tokens": 12, "max_steps": 5}
    whole = train(config_of(tmp_path, task, student, server.address, name="whole", **options))
    interrupted = config_of(tmp_path, task, student, server.address, name="cut", **options)
    assert train(interrupted, stop_at=3).stopped_early
    resumed = train(interrupted, resume=True)
    for name, tensor in final_weights(whole).items():
        assert torch.equal(tensor, final_weights(resumed)[name]), name


def test_mix_draws_the_student_share_of_its_schedule(tmp_path, task, tiny_model_factory, serve_teacher):
    schedule = LambdaSchedule(0.9, start=0.1, steps=4)
    assert [schedule(step) for step in (0, 2, 4, 9)] == pytest.approx([0.1, 0.5, 0.9, 0.9])
    server = serve_teacher()
    config = config_of(tmp_path, task, tiny_model_factory("gpt2"), server.address, max_steps=2, batch_size=12, **{
        "data.source.name": "mix", "data.source.lmbda": 0.5, "data.source.log_samples": True,
        "data.source.max_new_tokens": 4, "loss.name": "jsd", "loss.options": {"beta": 0.9}})
    train(config)
    sampled = (Path(config.output_dir) / "samples-rank0.jsonl").read_text().splitlines()
    assert 5 <= len(sampled) <= 19  # of 24 examples (a few prompts have no room), each the student's with p = 0.5


@pytest.mark.parametrize("flags, message", [
    ({"data.source.name": "student", "data.kind": "text"}, "needs data.kind: instruction"),
    ({"data.source.name": "teacher", "teacher.mode": "local", "teacher.model": "x"}, "need teacher.mode remote"),
    ({"data.source.name": "mix", "data.source.lmbda": 1.5}, "data.source.lmbda"),
    ({"data.source.name": "student", "teacher.mode": "cache", "teacher.cache_dir": "x"}, "signal cache"),
])
def test_source_config_errors_name_the_field(tmp_path, task, tiny_model_factory, flags, message):
    with pytest.raises(ValueError, match=message):
        config_of(tmp_path, task, tiny_model_factory("gpt2"), "127.0.0.1:1", **flags)


def test_every_worked_config_of_the_docs_is_valid():
    """Each YAML block of docs/data-sources.md is a valid config (blocks without a student: on the first's)."""
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "data-sources.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    base = blocks[0]
    assert len(blocks) == 6
    for block in blocks:
        values = {**base, **block}
        config = load_config(None, [item for key, value in values.items() for item in (f"--{key}", json.dumps(value))])
        assert config.data.source.name in ("dataset", "teacher", "student", "mix")


@pytest.mark.slow
def test_two_rank_on_policy_run_samples_what_one_process_with_accumulation_samples(tmp_path, task,
                                                                                   tiny_model_factory, serve_teacher):
    """Seeds from the global micro-batch number: 2 ranks x 4 examples sample, for every prompt, the response that
    1 process x 4 examples x 2 accumulation steps samples (the same weights within a step), and train alike."""
    import subprocess
    import sys

    server = serve_teacher()
    student = tiny_model_factory("gpt2")
    options = {"data.source.name": "student", "data.source.log_samples": True, "data.source.max_new_tokens": 12,
               "max_steps": 3, "threads": 1}
    single = train(config_of(tmp_path, task, student, server.address, name="single", grad_accum=2, **options))
    config = config_of(tmp_path, task, student, server.address, name="ddp", **options)
    config_file = tmp_path / "ddp.json"
    config_file.write_text(config.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "atkd.student.trainer.cli", "train", "--config", str(config_file)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def samples(paths) -> dict[int, list[int]]:
        records = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
        return {record["example"]: record["response_ids"] for record in records}

    one = samples([tmp_path / "single" / "samples-rank0.jsonl"])
    two = samples([tmp_path / "ddp" / "samples-rank0.jsonl", tmp_path / "ddp" / "samples-rank1.jsonl"])
    assert len(one) >= 16 and one == two
    expected = final_weights(single)
    actual = final_weights(type("R", (), {"final_dir": tmp_path / "ddp" / "final"}))
    assert max((expected[name] - actual[name]).abs().max().item() for name in expected) < 1e-4
