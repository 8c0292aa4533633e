"""The training job end to end on loopback: through a real teacher server, from a local teacher and from an
exported cache; resume exactness; config and tokenizer errors before the first step."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atkd.student.client import TeacherMismatchError
from atkd.student.data.instructions import dialogue_pairs, write_jsonl
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.losses import atkd_loss
from atkd.student.models import load_model
from atkd.student.teachers import CacheMismatchError, LocalTeacher, SignalCache
from atkd.student.trainer.cli import export_cache, run_eval
from atkd.student.trainer.config import load_config
from atkd.student.trainer.loop import train
from atkd.student.trainer.parts import build_teacher, load_examples, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def run_config(tmp_path: Path, corpus, student_dir: Path, teacher: dict, **overrides):
    """A small job: GPT-2 student, 32-token windows, 4 per batch; ``overrides`` as dotted CLI flags."""
    values = {
        "student": str(student_dir), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(corpus.get("train")), "eval": str(corpus.get("eval")), "seq_len": 32, "eval_batches": 4},
        "teacher": teacher, "batch_size": 4, "max_steps": 8, "save_every": 3, "progress": False,
        "optim": {"lr": 1e-2, "warmup": 2},
    }  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    flags = [item for key, value in overrides.items() for item in (f"--{key}", json.dumps(value))]
    return load_config(path, flags)


def final_weights(result) -> dict[str, torch.Tensor]:
    return load_file(next(Path(result.final_dir).glob("*.safetensors")))


def heldout_atkd(model_dir: Path, teacher_dir: Path, config) -> float:
    """ATKD loss of a student on the first held-out batch, with the dense local teacher as reference."""
    tokenizer = load_tokenizer(model_dir)
    batch = load_examples(config.data, tokenizer, "eval").batch(range(8))
    teacher = LocalTeacher(load_model(teacher_dir))
    with torch.no_grad():
        logits = load_model(model_dir)(batch.input_ids).logits
        return atkd_loss(logits, teacher(batch), batch.targets).loss.item()


def test_student_distilled_through_the_server_lowers_its_loss(tmp_path, corpus, tiny_model_factory, tiny_model_dir,
                                                               serve_teacher):
    server = serve_teacher()
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"),
                        {"mode": "remote", "addresses": [server.address], "top_k": 16, "tail_samples": 4},
                        max_steps=30, save_every=0)
    result = train(config)
    assert result.state.step == 30 and not result.stopped_early
    before = heldout_atkd(tiny_model_factory("gpt2"), tiny_model_dir, config)
    after = heldout_atkd(result.final_dir, tiny_model_dir, config)
    assert after < 0.8 * before, (before, after)
    records = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert {"loss", "n_easy", "n_hard", "mean_uncertainty", "teacher_wait_s", "tokens_per_s"} <= train_records[0].keys()
    assert train_records[0]["n_easy"] + train_records[0]["n_hard"] == 4 * 32
    assert records[-1]["kind"] == "eval" and records[-1]["step"] == 30


def three_sources(tmp_path, corpus, tiny_model_factory, tiny_model_dir, server, codec: str, **options):
    """Run configs whose teacher is the server (``codec``), the same model in process, and a cache exported from
    the server, with the signal ``options``: {"remote": ..., "local": ..., "cache": ...}."""
    remote = run_config(tmp_path, corpus, tiny_model_factory("gpt2"),
                        {"mode": "remote", "addresses": [server.address], "codec": codec, **options})
    local = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), {"mode": "local", "model": str(tiny_model_dir),
                                                                      **options})
    export_cache(remote, tmp_path / "cache", shard_size=16)
    cached = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), {"mode": "cache",
                                                                       "cache_dir": str(tmp_path / "cache"), **options})
    return {"remote": remote, "local": local, "cache": cached}


def build_parts(config):
    """The tokenizer, training examples and student a run config's teacher source is built against."""
    tokenizer = load_tokenizer(config.student)
    return tokenizer, load_examples(config.data, tokenizer), load_model(config.student)


def test_remote_local_and_cache_give_the_same_loss(tmp_path, corpus, tiny_model_factory, tiny_model_dir,
                                                   serve_teacher):
    configs = three_sources(tmp_path, corpus, tiny_model_factory, tiny_model_dir, serve_teacher(), "fp16",
                            top_k=16, tail_samples=0, prefetch=0)
    tokenizer, examples, student = build_parts(configs["remote"])
    batch = examples.batch([5, 40, 17, 33])  # two shards, out of order
    logits = torch.randn(4, 32, student.config.vocab_size, generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, config in configs.items():
        source = build_teacher(config.teacher, tokenizer, student, examples)
        losses[name] = atkd_loss(logits, source(batch), batch.targets).loss.item()
        source.close()
    assert losses["cache"] == pytest.approx(losses["remote"], rel=1e-6)  # the same fp16 values, stored
    assert losses["remote"] == pytest.approx(losses["local"], rel=2e-3)  # fp16 codec vs fp32 in process


def test_tail_ids_only_reaches_every_teacher_source_and_the_cache_records_it(tmp_path, corpus, tiny_model_factory,
                                                                            tiny_model_dir, serve_teacher):
    """teacher.tail_ids_only: remote (the request field), local (compress) and a cache exported from the remote
    source all give samples without log-probs and the tail's mean in their place; a run without the option
    refuses that cache."""
    options = {"top_k": 16, "tail_samples": 8, "tail_ids_only": True, "prefetch": 0}
    configs = three_sources(tmp_path, corpus, tiny_model_factory, tiny_model_dir, serve_teacher(), "q8", **options)
    tokenizer, examples, student = build_parts(configs["remote"])
    batch = examples.batch([5, 40, 17, 33])
    means = {}
    for name, config in configs.items():
        source = build_teacher(config.teacher, tokenizer, student, examples)
        signal = source(batch)
        source.close()
        assert signal.tail_sample_ids.shape == (4, 32, 8)
        assert torch.equal(signal.tail_sample_logprobs, signal.tail_mean_logprob.unsqueeze(-1).expand(-1, -1, 8))
        means[name] = signal.tail_mean_logprob
    assert torch.equal(means["cache"], means["remote"])  # stored as received
    torch.testing.assert_close(means["remote"], means["local"], rtol=2e-3, atol=2e-3)  # q8 (float16) vs fp32
    plain = run_config(tmp_path, corpus, tiny_model_factory("gpt2"),
                       {"mode": "cache", "cache_dir": str(tmp_path / "cache"), **options, "tail_ids_only": False})
    with pytest.raises(CacheMismatchError, match="tail_ids_only"):
        build_teacher(plain.teacher, tokenizer, student, examples)


@pytest.mark.parametrize(("loss", "warned"), [({"name": "reverse_kl"}, True),
                                              ({"name": "atkd", "options": {"base": "reverse"}}, True),
                                              ({"name": "atkd"}, False)])
def test_a_reverse_divergence_on_tail_samples_is_warned_about(tmp_path, corpus, tiny_model_factory, tiny_model_dir,
                                                              caplog, loss, warned):
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 8, "tail_samples": 4}
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), teacher, max_steps=1, save_every=0,
                        loss=loss, **{"data.eval": []})
    with caplog.at_level(logging.WARNING, logger="atkd.student.trainer.loop"):
        train(config)
    assert ("unbounded for a reverse divergence" in caplog.text) == warned


def test_a_record_every_log_every_steps_describes_the_steps_since_the_last(tmp_path, corpus, tiny_model_factory,
                                                                          tiny_model_dir):
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 16, "tail_samples": 0}
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), teacher, max_steps=4, log_every=2, grad_accum=2,
                        save_every=0)
    train(config)
    records = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4]
    assert train_records[0].keys() == {"kind", "step", "lr", "grad_norm", "loss", "mean_uncertainty", "n_easy",
                                       "n_hard", "tkd_hard", "dkd_easy", "dkd_hard", "loss_easy", "loss_hard",
                                       "teacher_wait_s", "step_s", "tokens", "tokens_per_s"}
    assert all(r["n_easy"] + r["n_hard"] == 2 * 4 * 32 for r in train_records)  # per step: 2 micro-batches
    assert train_records[-1]["tokens"] == 4 * 2 * 4 * 32


def test_cache_refuses_another_dataset_or_other_options(tmp_path, corpus, tiny_model_factory, tiny_model_dir):
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 8, "tail_samples": 0}
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), teacher)
    export_cache(config, tmp_path / "cache", shard_size=64)
    assert SignalCache(tmp_path / "cache").manifest.num_examples == len(load_examples(config.data,
                                                                                      load_tokenizer(config.student)))
    for change, field in [({"data.seq_len": 16}, "dataset_fingerprint"), ({"teacher.top_k": 16}, "top_k")]:
        other = run_config(tmp_path, corpus, tiny_model_factory("gpt2"),
                           {"mode": "cache", "cache_dir": str(tmp_path / "cache"), "top_k": 8, "tail_samples": 0},
                           **change)
        with pytest.raises(CacheMismatchError, match=field):
            train(other)
        assert not (other.output_dir / "checkpoints").exists()


def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, corpus, tiny_model_factory,
                                                                   tiny_model_dir):
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 16, "tail_samples": 4, "prefetch": 2}
    student = tiny_model_factory("gpt2")
    straight = train(run_config(tmp_path / "a", corpus, student, teacher, grad_accum=2))
    interrupted_config = run_config(tmp_path / "b", corpus, student, teacher, grad_accum=2)
    stopped = train(interrupted_config, stop_at=4)  # not a multiple of save_every: a checkpoint is written anyway
    assert stopped.stopped_early and stopped.state.step == 4 and stopped.final_dir is None
    resumed = train(interrupted_config, resume=True)
    assert resumed.state.step == 8 and resumed.state.micro_batch == 16
    expected, actual = final_weights(straight), final_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    log = [json.loads(line) for line in (interrupted_config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 9))


def test_sft_needs_no_teacher_and_distillation_does(tmp_path, corpus, tiny_model_factory):
    with pytest.raises(ValueError, match="needs a teacher"):
        run_config(tmp_path, corpus, tiny_model_factory("gpt2"), None)
    result = train(run_config(tmp_path, corpus, tiny_model_factory("gpt2"), None, **{"loss.name": "sft"}))
    assert result.state.step == 8


@pytest.mark.parametrize(("flags", "ids_only"), [
    ({}, True),  # ATKD, forward base: the default signal sends the samples' ids only
    ({"loss.name": "forward_kl"}, True),
    ({"loss.name": "reverse_kl"}, False),
    ({"loss.options": {"base": "jsd"}}, False),
    ({"loss.options": {"tail_control_variate": True}}, False),
    ({"teacher.tail_samples": 0}, False),
    ({"loss.name": "reverse_kl", "teacher.tail_ids_only": True}, True),  # as asked (its loss will refuse it)
])  # fmt: skip
def test_tail_ids_only_defaults_to_the_losses_that_read_the_tail_by_forward_kl(tmp_path, corpus, tiny_model_factory,
                                                                             flags, ids_only):
    teacher = {"mode": "remote", "addresses": ["127.0.0.1:1"]}
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), teacher, **flags)
    assert config.teacher.tail_ids_only is ids_only
    assert (config.teacher.codec, config.teacher.top_k) == ("q8", 64)
    assert config.teacher.tail_samples == flags.get("teacher.tail_samples", 64)


@pytest.mark.parametrize("flags, message", [
    ({"teacher.top_k": -1}, "teacher.top_k: Input should be greater than or equal to 0"),
    ({"teacher.top_k": 0, "teacher.tail_samples": 4}, "teacher.top_k=0 (dense logits) needs"),
    ({"teacher.tail_samples": 0, "teacher.tail_ids_only": True}, "teacher.tail_ids_only needs teacher.tail_samples"),
    ({"teacher.modee": "local"}, "teacher.modee: Extra inputs are not permitted"),
    ({"teacher.mode": "remote"}, "teacher.mode='remote' needs teacher.addresses"),
    ({"loss.name": "klx"}, "loss.name: Value error, unknown loss 'klx'"),
    ({"optim.lr": -1}, "optim.lr: Input should be greater than 0"),
    ({"precision": "fp8"}, "precision: Input should be 'fp32' or 'bf16'"),
])  # fmt: skip
def test_config_errors_name_the_field(tmp_path, corpus, tiny_model_factory, tiny_model_dir, flags, message):
    teacher = {"mode": "local", "model": str(tiny_model_dir)}
    with pytest.raises(ValueError) as error:
        run_config(tmp_path, corpus, tiny_model_factory("gpt2"), teacher, **flags)
    assert message in str(error.value)


def test_cli_reports_a_config_error_with_the_field_and_exit_status_2(tmp_path, corpus, tiny_model_factory):
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"student": str(tiny_model_factory("gpt2")), "data": {"train": str(corpus["train"])},
                                  "max_steps": 2, "batch_size": "four", "loss": {"name": "sft"}}))
    done = subprocess.run([sys.executable, "-m", "atkd.student.trainer.cli", "train", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "batch_size: Input should be a valid integer" in done.stderr


@pytest.fixture(scope="module")
def other_tokenizer_student(tmp_path_factory, excerpt_paragraphs, tiny_model_factory) -> Path:
    """The tiny GPT-2 with a tokenizer of the same size trained on other text: same vocab width, other ids."""
    directory = tmp_path_factory.mktemp("other_tokenizer_student")
    load_model(tiny_model_factory("gpt2")).save_pretrained(directory)
    reversed_text = [paragraph[::-1] for paragraph in excerpt_paragraphs]
    train_tokenizer(reversed_text, 512, directory)
    return directory


def test_a_tokenizer_mismatch_fails_before_the_first_step(tmp_path, corpus, other_tokenizer_student, tiny_model_dir,
                                                          serve_teacher):
    server = serve_teacher()
    for teacher in ({"mode": "remote", "addresses": [server.address]}, {"mode": "local", "model": str(tiny_model_dir)}):
        config = run_config(tmp_path / teacher["mode"], corpus, other_tokenizer_student, teacher)
        with pytest.raises(TeacherMismatchError, match="must share a tokenizer"):
            train(config)
        assert not (config.output_dir / "checkpoints").exists()
        assert not (config.output_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_and_resume_matches_an_uninterrupted_run(tmp_path, corpus,
                                                                                  tiny_model_factory, tiny_model_dir):
    """A real preemption: the CLI in a subprocess gets SIGTERM at an arbitrary step, and resumes. Both runs
    use the same number of torch threads (bit-identical float sums need the same reduction order; this
    process's count may have been changed by an earlier in-process run)."""
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 16, "tail_samples": 4}
    student = tiny_model_factory("gpt2")
    straight = train(run_config(tmp_path / "a", corpus, student, teacher, max_steps=60, save_every=0, threads=2))
    config = run_config(tmp_path / "b", corpus, student, teacher, max_steps=60, save_every=0, threads=2)
    config_file = tmp_path / "b" / "run.json"
    config_file.write_text(config.model_dump_json())
    command = [sys.executable, "-m", "atkd.student.trainer.cli", "train", "--config", str(config_file)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics = config.output_dir / "metrics.jsonl"
    import time

    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or never started"
        time.sleep(0.02)
    process.terminate()
    summary = json.loads(process.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert process.returncode == 0 and summary["stopped_early"], summary
    assert 5 <= summary["step"] < 60
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 60
    expected = final_weights(straight)
    actual = load_file(next((config.output_dir / "final").glob("*.safetensors")))
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.slow
def test_two_rank_torchrun_matches_one_process_with_gradient_accumulation(tmp_path, corpus, tiny_model_factory,
                                                                          serve_teacher):
    """DDP on CPU (gloo), each rank with its own stream to the teacher server: 2 ranks x 4 examples take the
    steps of 1 process x 4 examples x 2 accumulation steps (the same batches, the ATKD split per micro-batch)."""
    server = serve_teacher()
    teacher = {"mode": "remote", "addresses": [server.address], "top_k": 16, "tail_samples": 4}
    student = tiny_model_factory("gpt2")
    single = train(run_config(tmp_path / "single", corpus, student, teacher, max_steps=6, grad_accum=2, threads=1))
    config = run_config(tmp_path / "ddp", corpus, student, teacher, max_steps=6, threads=1)
    config_file = tmp_path / "ddp.json"
    config_file.write_text(config.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "atkd.student.trainer.cli", "train", "--config", str(config_file)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_log = [r for r in log if r["kind"] == "train"]
    assert len(train_log) == 6 and train_log[-1]["tokens"] == 6 * 2 * 4 * 32
    expected, actual = final_weights(single), load_file(next((config.output_dir / "final").glob("*.safetensors")))
    worst = max((expected[name] - actual[name]).abs().max().item() for name in expected)
    assert worst < 1e-4, worst


def test_instruction_data_trains_on_responses_and_evaluates_with_rouge_l(tmp_path, excerpt_paragraphs,
                                                                          tiny_model_factory, tiny_model_dir):
    records = dialogue_pairs("\n\n".join(excerpt_paragraphs), max_chars=80)
    data = {"kind": "instruction", "seq_len": 48, "eval_batches": 2,
            "train": str(write_jsonl(records[:-16], tmp_path / "train.jsonl")),
            "eval": str(write_jsonl(records[-16:], tmp_path / "eval.jsonl"))}
    config = run_config(tmp_path, {}, tiny_model_factory("gpt2"),
                        {"mode": "local", "model": str(tiny_model_dir), "top_k": 16}, max_steps=6, data=data)
    result = train(config)
    assert result.eval is not None and result.eval.tokens < 2 * 4 * 47  # response tokens only
    report = run_eval(config, None, max_new_tokens=6, max_examples=8)
    assert report["model"] == str(result.final_dir) and report["generated"] == 8
    assert 0.0 <= report["rouge_l"] <= 100.0
    assert report["perplexity"] == pytest.approx(result.eval.perplexity)


def test_the_example_config_is_valid():
    config = load_config(REPO / "docs" / "examples" / "train.yaml")
    assert config.teacher.mode == "remote" and config.loss.name == "atkd" and config.data.train


def test_epochs_set_the_length_and_bf16_autocast_trains(tmp_path, corpus, tiny_model_factory, tiny_model_dir):
    teacher = {"mode": "local", "model": str(tiny_model_dir), "top_k": 16, "tail_samples": 0}
    config = run_config(tmp_path, corpus, tiny_model_factory("gpt2"), teacher, max_steps=None, epochs=0.05,
                        precision="bf16", grad_accum=2, batch_size=8)
    examples = load_examples(config.data, load_tokenizer(config.student))
    result = train(config)
    assert result.state.step == math.ceil(0.05 * (len(examples) // 8) / 2)  # micro-batches of 8, 2 per step
    losses = [json.loads(line)["loss"] for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_help_lists_every_config_field_as_a_flag():
    done = subprocess.run([sys.executable, "-m", "atkd.student.trainer.cli", "train", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0
    for flag in ("--student", "--data.seq_len", "--teacher.prefetch", "--loss.options", "--optim.lr", "--grad_accum"):
        assert f"  {flag} " in done.stdout
