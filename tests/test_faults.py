"""Faults during training, through the real client against real ``atkd-teacher serve`` processes: a replica
killed, hung (SIGSTOP), slow (fault injection), restarted, past the retry budget, or stopped with SIGTERM,
and the teacher and student in separate network namespaces. Each run must end with the weights of the
fault-free run of the same seed, bit for bit (CPU): no step lost, skipped or applied twice, and a retried
batch gets the signal its first attempt would have got (the tail samples' seed travels with the request).
The table of these cases is in docs/reliability.md, section "Faults".

The fault is triggered from inside the run, at a fixed micro-batch: :class:`FaultAt` wraps the teacher
source the trainer builds (the real :class:`RemoteTeacher` and client) and acts on the victim process
just before the micro-batch is submitted, while the batches before it are in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.fingerprint import weights_digest
from atkd.services.teacher.faults import FAULT_DELAY_ENV
from atkd.student.client import ScoreBatch, TeacherClient, TeacherRevisionError
from atkd.student.client.replicas import Replicas
from atkd.student.demo.teacher_process import TeacherProcess, teacher_process
from atkd.student.models import load_model
from atkd.student.teachers import CacheMismatchError, SignalCache
from atkd.student.trainer import cli, loop
from atkd.student.trainer.cli import export_cache
from atkd.student.trainer.loop import train
from atkd.student.trainer.parts import build_teacher, load_examples, load_tokenizer
from tests.teacher_harness import wait_until
from tests.test_fused_head import without_key_bias
from tests.test_trainer import REPO, run_config

STEPS = 12
FAULT_AT = 5  # the micro-batch before whose submission the fault happens (batches 3 and 4 are in flight)
TEACHER = {"mode": "remote", "top_k": 16, "tail_samples": 4, "prefetch": 2, "timeout_s": 30, "retry_budget_s": 60}
SERVE = ["--threads", "1"]
PENDING_LOG = "atkd.student.client.pending"


class FaultAt:
    """A teacher source that runs ``fault()`` once, just before submitting micro-batch ``at`` (0-based);
    ``submitted`` holds what the wrapped source returned for each micro-batch (a :class:`RemoteResult`)."""

    def __init__(self, source, at: int, fault: Callable[[], None]):
        self.source, self.at, self.fault, self.submitted = source, at, fault, []

    def submit(self, batch, seed=None):
        if len(self.submitted) == self.at:
            self.fault()
        self.submitted.append(self.source.submit(batch, seed))
        return self.submitted[-1]

    def close(self) -> None:
        self.source.close()


@pytest.fixture
def fault_at(monkeypatch):
    """``fault_at(at, fault)``: the next ``train`` in this test runs ``fault()`` before micro-batch ``at``."""

    def install(at: int, fault: Callable[[], None]) -> list[FaultAt]:
        build, sources = loop.build_teacher, []
        monkeypatch.setattr(loop, "build_teacher", lambda *args, **kwargs: sources.append(
            FaultAt(build(*args, **kwargs), at, fault)) or sources[-1])
        return sources

    return install


def fault_config(tmp_path: Path, corpus, student: Path, addresses: list[str], **teacher):
    """The run of every test here: 12 steps of 4 x 32 tokens, one torch thread (bit-identical sums), a
    checkpoint only at the end (or on a teacher failure), no held-out evaluation."""
    return run_config(tmp_path, corpus, student, {**TEACHER, "addresses": addresses, **teacher}, max_steps=STEPS,
                      save_every=0, threads=1, **{"data.eval": []})


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(next(Path(directory).glob("*.safetensors")))


def assert_same_weights(expected: dict[str, torch.Tensor], directory: Path) -> None:
    actual = weights_of(directory)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs from the fault-free run"


def assert_every_step_once(config, world: int = 1) -> None:
    """The run's metrics name each step 1..STEPS exactly once, and the tokens of exactly STEPS steps."""
    records = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["tokens"] == STEPS * world * 4 * 32


def assert_same_signal_from(first: str, second: str) -> None:
    """Two replicas answer a seeded request (tail samples included) with bit-identical signals."""
    batch = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(3))
    signals = []
    for address in (first, second):
        with TeacherClient(address, top_k=16) as client:
            signals.append(client.score(batch, tail_samples=4, seed=12345))
    for field in ("topk_ids", "topk_logprobs", "target_logprob", "entropy", "tail_sample_ids", "tail_sample_logprobs"):
        assert torch.equal(getattr(signals[0], field), getattr(signals[1], field)), field


def failovers(caplog, address: str) -> list[str]:
    """The client's warnings about failed attempts on the replica at ``address``."""
    messages = [record.getMessage() for record in caplog.records if record.name == PENDING_LOG]
    return [message for message in messages if f" on {address} failed" in message]


@pytest.fixture(scope="module")
def student(tiny_model_factory) -> Path:
    return tiny_model_factory("gpt2")


@pytest.fixture(scope="module")
def healthy(tiny_model_dir):
    """A replica that stays up for the whole module."""
    with teacher_process(tiny_model_dir, extra_args=SERVE) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, student, healthy) -> dict[str, torch.Tensor]:
    """The final weights of the fault-free run through the healthy replica."""
    result = train(fault_config(tmp_path_factory.mktemp("reference"), corpus, student, [healthy.address]))
    return weights_of(result.final_dir)


@contextlib.contextmanager
def victim(model_dir: Path, *, delay_s: float = 0.0, port: int = 0):
    """A replica to hurt; continued and killed at the end whatever was done to it."""
    env = {FAULT_DELAY_ENV: str(delay_s)} if delay_s else {}
    with _environ(env), teacher_process(model_dir, extra_args=[*SERVE, *(["--port", str(port)] if port else [])]) as t:
        try:
            yield t
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(t.process.pid, signal.SIGCONT)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``os.environ`` with ``values`` while a child process is started (it copies the environment)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def kill(process: TeacherProcess, signum: int) -> Callable[[], None]:
    return lambda: process.process.send_signal(signum)


# --- one of two replicas fails: the work moves to the other ---------------------------------------------

@pytest.mark.slow
def test_a_replica_sigkilled_mid_training_loses_no_step_and_weights_equal_the_fault_free_run(
        tmp_path, corpus, student, tiny_model_dir, healthy, reference, fault_at, caplog):
    with victim(tiny_model_dir) as doomed:
        assert_same_signal_from(doomed.address, healthy.address)
        config = fault_config(tmp_path, corpus, student, [doomed.address, healthy.address])
        fault_at(FAULT_AT, kill(doomed, signal.SIGKILL))
        with caplog.at_level(logging.WARNING, logger=PENDING_LOG):
            result = train(config)
        assert doomed.process.wait(10) == -signal.SIGKILL
    assert result.state.step == STEPS and not result.stopped_early
    assert failovers(caplog, doomed.address), "no batch went to the killed replica after the kill"
    assert_every_step_once(config)
    assert_same_weights(reference, result.final_dir)


@pytest.mark.slow
def test_a_hung_replica_sigstopped_mid_training_is_failed_over_when_the_deadline_fires(
        tmp_path, corpus, student, tiny_model_dir, healthy, reference, fault_at, caplog):
    """Today's failure (issue 11, item 7): the deadline fired and DEADLINE_EXCEEDED ended the run."""
    with victim(tiny_model_dir) as hung:
        config = fault_config(tmp_path, corpus, student, [hung.address, healthy.address], timeout_s=1.5)
        fault_at(FAULT_AT, kill(hung, signal.SIGSTOP))
        with caplog.at_level(logging.WARNING, logger=PENDING_LOG):
            result = train(config)
    assert result.state.step == STEPS
    assert any("DEADLINE_EXCEEDED" in message for message in failovers(caplog, hung.address))
    assert_every_step_once(config)
    assert_same_weights(reference, result.final_dir)


@pytest.mark.slow
def test_a_slow_replica_misses_its_deadlines_and_the_work_moves_to_the_healthy_one(
        tmp_path, corpus, student, tiny_model_dir, healthy, reference, caplog):
    with victim(tiny_model_dir, delay_s=5.0) as slow:
        config = fault_config(tmp_path, corpus, student, [slow.address, healthy.address], timeout_s=1.5)
        with caplog.at_level(logging.WARNING, logger=PENDING_LOG):
            result = train(config)
    assert result.state.step == STEPS
    assert any("DEADLINE_EXCEEDED" in message for message in failovers(caplog, slow.address))
    assert_same_weights(reference, result.final_dir)


@pytest.mark.slow
def test_sigterm_on_a_replica_drains_its_work_in_flight_without_a_client_error(
        tmp_path, corpus, student, tiny_model_dir, healthy, reference, fault_at, caplog):
    """The victim takes 0.5 s a batch, so the batch it holds when SIGTERM comes is still computing: it is
    answered there, in its first attempt; the calls that reach the victim after the SIGTERM are refused and
    go to the healthy replica; the victim exits 0."""
    in_flight = []

    def sigterm() -> None:
        in_flight.extend(result.call for result in sources[0].submitted
                         if result.call.endpoint.address == stopping.address and not result.call.done())
        stopping.process.send_signal(signal.SIGTERM)

    with victim(tiny_model_dir, delay_s=0.5) as stopping:
        config = fault_config(tmp_path, corpus, student, [stopping.address, healthy.address])
        sources = fault_at(FAULT_AT, sigterm)
        with caplog.at_level(logging.WARNING, logger=PENDING_LOG):
            result = train(config)
        assert stopping.process.wait(30) == 0
    assert result.state.step == STEPS
    assert in_flight, "nothing was in flight on the replica at its SIGTERM"
    assert all(call.attempts == 1 and call.endpoint.address == stopping.address for call in in_flight)
    assert failovers(caplog, stopping.address), "no call reached the replica after its SIGTERM"
    assert_same_weights(reference, result.final_dir)


# --- the only replica goes away -------------------------------------------------------------------------

@pytest.mark.slow
def test_the_only_replica_restarted_mid_training_is_waited_for_within_the_budget(
        tmp_path, corpus, student, tiny_model_dir, reference, fault_at, caplog):
    restarting: list[threading.Thread] = []
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(victim(tiny_model_dir))
        port = int(first.address.rsplit(":", 1)[1])

        def restart() -> None:  # killed now; back on the same port once the new process has loaded
            first.process.kill()
            first.process.wait()
            restarting.append(threading.Thread(target=lambda: stack.enter_context(victim(tiny_model_dir, port=port))))
            restarting[0].start()

        config = fault_config(tmp_path, corpus, student, [first.address])
        fault_at(FAULT_AT, restart)
        with caplog.at_level(logging.WARNING, logger=PENDING_LOG):
            result = train(config)
        restarting[0].join(60)
    assert result.state.step == STEPS
    assert any("no other replica is healthy: retrying in" in message for message in failovers(caplog, first.address))
    assert_every_step_once(config)
    assert_same_weights(reference, result.final_dir)


@pytest.mark.slow
def test_past_the_budget_the_run_stops_with_a_clear_error_and_a_checkpoint_that_resumes_to_equal_weights(
        tmp_path, corpus, student, tiny_model_dir, healthy, reference, fault_at, capsys):
    """``atkd-student train`` (in process, for the fault hook): exit status 4, an error that names the replica
    and the budget, and the checkpoint to resume from. Today's failure: the error left no checkpoint (only
    every save_every steps), so the steps since the last one were lost."""
    with victim(tiny_model_dir) as gone:
        config = fault_config(tmp_path, corpus, student, [gone.address], retry_budget_s=1.5)
        config_file = tmp_path / "run.json"
        config_file.write_text(config.model_dump_json())
        def kill_once_answered():  # batches 3 and 4 answered first, so the failure is always micro-batch 5's
            wait_until(lambda: all(result.call.done() for result in sources[0].submitted), what="batches 3 and 4")
            gone.process.send_signal(signal.SIGKILL)

        sources = fault_at(FAULT_AT, kill_once_answered)
        with pytest.raises(SystemExit) as stopped:
            cli.main(["train", "--config", str(config_file)])
    assert stopped.value.code == 4
    error = capsys.readouterr().err
    assert "teacher failed: UNAVAILABLE: no teacher replica answered the Score call within its retry budget of 1.5 s" \
        in error and f"(replicas: {gone.address};" in error
    # micro-batch 5 is the first of step 6 (one micro-batch a step): steps 1-5 are done, step 6 is dropped whole
    checkpoint = config.output_dir / "checkpoints" / "step-00000005"
    assert f"the run stopped at its checkpoint {checkpoint}" in error and "--resume" in error
    cli.main(["train", "--config", str(config_file), "--resume", "--teacher.addresses", healthy.address])
    assert_every_step_once(config)
    assert_same_weights(reference, config.output_dir / "final")



@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_under_torchrun_one_ranks_teacher_failing_stops_every_rank_at_one_step_with_a_checkpoint(
        tmp_path, corpus, student, tiny_model_dir, healthy, parallel):
    """Two torchrun ranks (DDP, FSDP2); rank 1's own replica is SIGKILLed before its micro-batch 5
    (tests/torchrun_teacher_fault.py), rank 0's stays healthy. Both ranks stop at step 6 with exit status 4,
    rank 0 names rank 1 and writes the checkpoint of step 5, and ``--resume`` on the healthy replica ends where
    a fault-free run does. Fails on the code before this change: rank 1 left alone, torchrun killed rank 0
    (which had gone on to the gradient all-reduce), and no checkpoint was written."""
    config = run_config(tmp_path, corpus, student, {**TEACHER, "addresses": [healthy.address], "retry_budget_s": 1.5},
                        max_steps=STEPS, save_every=0, threads=1, parallel=parallel, **{"data.eval": []})
    config_file = tmp_path / "run.json"
    config_file.write_text(config.model_dump_json())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    with victim(tiny_model_dir) as lost:
        env = {**os.environ, "ATKD_TEST_RANK1_TEACHER": lost.address, "ATKD_TEST_RANK1_PID": str(lost.process.pid),
               "ATKD_TEST_FAULT_AT": str(FAULT_AT)}
        failed = subprocess.run([*torchrun, "tests.torchrun_teacher_fault", "train", "--config", str(config_file)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert failed.returncode != 0
    assert ("teacher failed: UNAVAILABLE: no teacher replica answered the Score call within its retry budget of "
            f"1.5 s (replicas: {lost.address};") in failed.stderr  # rank 1
    assert "teacher failed: UNAVAILABLE: the teacher of rank 1 failed for good" in failed.stderr  # rank 0
    checkpoint = config.output_dir / "checkpoints" / "step-00000005"
    assert f"the run stopped at its checkpoint {checkpoint}" in failed.stderr and checkpoint.is_dir()

    resumed = subprocess.run([*torchrun, "atkd.student.trainer.cli", "train", "--config", str(config_file),
                              "--resume"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_every_step_once(config, world=2)
    # 2 ranks x 4 examples take the steps of 1 process x 4 examples x 2 accumulation steps (test_trainer)
    single = train(run_config(tmp_path / "single", corpus, student, {**TEACHER, "addresses": [healthy.address]},
                              max_steps=STEPS, save_every=0, threads=1, grad_accum=2, **{"data.eval": []}))
    expected, actual = weights_of(single.final_dir), weights_of(config.output_dir / "final")
    assert max((without_key_bias(name, expected[name]) - without_key_bias(name, actual[name])).abs().max().item()
               for name in expected) < 1e-4  # the key bias: rounding noise that Adam scales up (test_fused_head)

# --- replica health ------------------------------------------------------------------------------------

def test_an_ejected_replica_is_readmitted_only_once_a_probe_answers(serve_teacher):
    live = serve_teacher()
    replicas = Replicas([live.address, "127.0.0.1:1"], eject_s=0.2)  # nothing listens on port 1
    alive, dead = replicas.all
    try:
        for endpoint in (alive, dead):
            replicas.failed(endpoint)
        assert replicas.pick() == (alive, False)  # both ejected: the one whose period ends first, not fresh
        time.sleep(0.25)
        replicas.pick()  # the periods are over: both are probed in the background
        wait_until(lambda: alive.probe is None and dead.probe is None, what="the probes")
        assert alive.failures == 0 and dead.failures == 2  # readmitted; ejected again, for 0.4 s
        assert [replicas.pick(), replicas.pick()] == [(alive, True), (alive, True)]  # the dead one is skipped
    finally:
        replicas.close()


# --- revisions ------------------------------------------------------------------------------------------

def _with_revision(engine, revision: str):
    other = object.__new__(type(engine))
    other.__dict__.update(engine.__dict__, revision=revision)
    return other


def test_a_response_carries_the_revision_of_the_replica_that_computed_it(serve_teacher, tiny_teacher_engine):
    server = serve_teacher()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        response = stub.Score(ScoreBatch.of([[1, 2, 3, 4]]).to_request("0", top_k=4), timeout=30)
        assert response.model_revision == stub.Info(pb.InfoRequest(), timeout=30).model_revision
    assert response.model_revision == tiny_teacher_engine.revision != ""


def test_a_replica_of_another_revision_mid_run_is_refused_unless_allowed(serve_teacher, tiny_teacher_engine):
    pinned = serve_teacher()
    swapped = serve_teacher(engine=_with_revision(tiny_teacher_engine, "swapped-revision"))
    batch = [[1, 2, 3, 4, 5]]
    with TeacherClient([pinned.address, swapped.address], top_k=4) as client:
        client.check()  # the first replica's Info pins its revision
        assert client.revision == tiny_teacher_engine.revision
        with pytest.raises(TeacherRevisionError) as refused:
            for _ in range(2):  # round robin: one of two calls lands on the swapped replica
                client.score(batch)
    message = str(refused.value)
    assert f"the replica at {swapped.address} serves teacher revision swapped-revision" in message
    assert f"pinned to revision {tiny_teacher_engine.revision}" in message and "allow_revision_change" in message
    with TeacherClient([pinned.address, swapped.address], top_k=4, allow_revision_change=True) as client:
        assert all(client.score(batch).target_logprob.shape == (1, 5) for _ in range(4))


def test_a_required_revision_is_checked_before_the_first_batch(serve_teacher):
    server = serve_teacher()
    with TeacherClient(server.address, revision="not-served") as client, pytest.raises(TeacherRevisionError):
        client.check()


def test_a_cache_run_requiring_a_revision_refuses_a_cache_of_another(tmp_path, corpus, student, tiny_model_dir):
    small = tmp_path / "small.txt"  # a few dozen examples: the export is not what is tested here
    small.write_text(corpus["train"].read_text()[:4000])
    corpus = {"train": small, "eval": small}
    local = {"mode": "local", "model": str(tiny_model_dir), "top_k": 8, "tail_samples": 0}
    export_cache(run_config(tmp_path, corpus, student, local), tmp_path / "cache", shard_size=64)
    recorded = SignalCache(tmp_path / "cache").manifest.teacher_revision
    assert recorded == weights_digest(tiny_model_dir)
    tokenizer = load_tokenizer(student)

    def cache_run(revision: str):
        config = run_config(tmp_path, corpus, student, {"mode": "cache", "cache_dir": str(tmp_path / "cache"),
                                                        "top_k": 8, "tail_samples": 0, "revision": revision})
        return build_teacher(config.teacher, tokenizer, load_model(student), load_examples(config.data, tokenizer))

    cache_run(recorded).close()
    with pytest.raises(CacheMismatchError, match="teacher_revision='.*', this run needs 'another-revision'"):
        cache_run("another-revision")


# --- separate network namespaces ------------------------------------------------------------------------

def _netns_unavailable() -> str | None:
    if sys.platform != "linux" or shutil.which("ip") is None:
        return "needs Linux and the ip command (iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"atkd-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this machine cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


@pytest.mark.slow
def test_training_across_network_namespaces_equals_training_on_loopback(tmp_path, corpus, student, tiny_model_dir,
                                                                       reference):
    """The teacher in one namespace, the student (the CLI) in another, joined by a veth pair: two hosts as
    far as the network goes (neither reaches the other's loopback). Same weights as on loopback."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    teacher_ns, student_ns = f"atkd-teacher-{tag}", f"atkd-student-{tag}"
    teacher_if, student_if = f"atkdt{tag}", f"atkds{tag}"
    teacher_ip, student_ip = "10.231.0.1", "10.231.0.2"
    setup = [
        ["ip", "netns", "add", teacher_ns], ["ip", "netns", "add", student_ns],
        ["ip", "link", "add", teacher_if, "type", "veth", "peer", "name", student_if],
        ["ip", "link", "set", teacher_if, "netns", teacher_ns], ["ip", "link", "set", student_if, "netns", student_ns],
        ["ip", "-n", teacher_ns, "addr", "add", f"{teacher_ip}/24", "dev", teacher_if],
        ["ip", "-n", student_ns, "addr", "add", f"{student_ip}/24", "dev", student_if],
        *(["ip", "-n", ns, "link", "set", dev, "up"] for ns, dev in [(teacher_ns, teacher_if), (student_ns, student_if),
                                                                    (teacher_ns, "lo"), (student_ns, "lo")]),
    ]
    try:
        for command in setup:
            subprocess.run(command, check=True, capture_output=True)
        with teacher_process(tiny_model_dir, extra_args=[*SERVE, "--host", teacher_ip],
                             launcher=["ip", "netns", "exec", teacher_ns]) as teacher:
            address = f"{teacher_ip}:{teacher.address.rsplit(':', 1)[1]}"
            config = fault_config(tmp_path, corpus, student, [address])
            config_file = tmp_path / "run.json"
            config_file.write_text(config.model_dump_json())
            done = subprocess.run(["ip", "netns", "exec", student_ns, sys.executable, "-m", "atkd.student.trainer.cli",
                                   "train", "--config", str(config_file)],
                                  cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == STEPS
        assert_same_weights(reference, config.output_dir / "final")
    finally:
        for ns in (teacher_ns, student_ns):  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
