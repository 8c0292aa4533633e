"""The student distilling through a real teacher server: same signal as in-process, same loss."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from atkd.services.teacher.ready import read_ready
from atkd.student.client import TeacherClient
from atkd.student.data.lm import LMBatch
from atkd.student.demo.teacher_process import teacher_server
from atkd.student.losses import atkd_loss
from atkd.student.teachers import LocalTeacher, RemoteTeacher
from tests.conftest import TINY_VOCAB
from tests.teacher_harness import http_get, wait_until


def lm_batch(seed: int, b: int = 3, t: int = 20, prompt: int = 0) -> LMBatch:
    window = torch.randint(0, TINY_VOCAB, (b, t + 1), generator=torch.Generator().manual_seed(seed))
    targets = window[:, 1:].clone()
    targets[:, :prompt] = -100
    return LMBatch(input_ids=window[:, :-1], targets=targets)


@pytest.mark.parametrize("prompt", [0, 5])
def test_remote_signal_and_loss_match_the_in_process_teacher(serve_teacher, tiny_model_dir, tiny_tokenizer, prompt):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    batch = lm_batch(seed=prompt, prompt=prompt)
    server = serve_teacher()
    with TeacherClient(server.address, tokenizer=tiny_tokenizer) as client:
        remote = RemoteTeacher(client, top_k=16)(batch)
    local = LocalTeacher(model, top_k=16)(batch)
    valid = batch.targets != -100
    assert remote.positions_shape == batch.targets.shape
    assert torch.equal(remote.topk_ids[valid], local.topk_ids[valid])
    torch.testing.assert_close(remote.target_logprob[valid], local.target_logprob[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(remote.topk_logprobs[valid], local.topk_logprobs[valid], rtol=1e-3, atol=2e-3)
    assert (remote.target_logprob[~valid] == 0).all()
    student_logits = torch.randn(*batch.targets.shape, TINY_VOCAB, generator=torch.Generator().manual_seed(1))
    remote_loss = atkd_loss(student_logits, remote, batch.targets).loss
    local_loss = atkd_loss(student_logits, local, batch.targets).loss
    assert remote_loss.item() == pytest.approx(local_loss.item(), rel=1e-3)


def test_remote_teacher_with_tail_samples_returns_tail_tokens(serve_teacher):
    batch = lm_batch(seed=2)
    with TeacherClient(serve_teacher().address) as client:
        signal = RemoteTeacher(client, top_k=8, tail_samples=4)(batch)
    assert signal.tail_sample_ids.shape == (*batch.targets.shape, 4)
    topk = signal.topk_ids.unsqueeze(-1)
    assert not (signal.tail_sample_ids.unsqueeze(-2) == topk).any()


def test_teacher_server_subprocess_serves_and_stops(tiny_model_dir, tmp_path):
    log = tmp_path / "teacher.log"
    with teacher_server(tiny_model_dir, log_path=log, extra_args=["--threads", "1"]) as address:
        with TeacherClient(address) as client:
            assert client.info().vocab_size == TINY_VOCAB
    assert "atkd-teacher stopped" in log.read_text()


def test_ready_file_names_the_serving_process_and_its_ports_and_goes_away_on_stop(tiny_model_dir, tmp_path):
    ready_file = tmp_path / "run" / "ready.json"
    command = [sys.executable, "-m", "atkd.services.teacher.cli", "serve", "--model", str(tiny_model_dir), "--port",
               "0", "--http-port", "0", "--threads", "1", "--ready-file", str(ready_file)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        ready = wait_until(lambda: read_ready(ready_file), timeout=60, what="the readiness file")
        assert ready.pid == process.pid and ready.model_id == tiny_model_dir.name
        assert http_get(ready.http_port, "/readyz")[0] == 200
        with TeacherClient(ready.address) as client:
            assert client.info().vocab_size == TINY_VOCAB
        process.terminate()
        assert process.wait(30) == 0
        assert not ready_file.exists()
    finally:
        process.kill()
