"""student/client: the tokenizer check, batch layout and alignment, and streaming with N batches in flight."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from atkd.proto.signal import compress
from atkd.services.teacher.config import TeacherConfig
from atkd.services.teacher.engine import TeacherEngine
from atkd.student.client import ScoreBatch, TeacherClient, TeacherError, TeacherMismatchError, next_token_targets
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.losses import atkd_loss
from tests.teacher_harness import GatedEngine, ServerThread, wait_until


def score_requests(server: ServerThread) -> str:
    return "\n".join(line for line in server.http("/metrics")[1].splitlines()
                     if line.startswith("atkd_teacher_requests_total"))


def test_a_teacher_with_another_tokenizer_is_refused_before_the_first_batch(
    serve_teacher, tiny_tokenizer, excerpt_paragraphs, tmp_path
):
    server = serve_teacher()
    other = train_tokenizer([p[::-1] for p in excerpt_paragraphs], len(tiny_tokenizer), tmp_path)
    with TeacherClient(server.address, tokenizer=other) as client:
        with pytest.raises(TeacherMismatchError, match="uses another tokenizer"):
            client.score([[1, 2, 3]])
        with pytest.raises(TeacherMismatchError, match="uses another tokenizer"):
            next(client.score_stream([torch.ones(1, 3, dtype=torch.long)]))
    with TeacherClient(server.address, vocab_size=1000) as client:
        with pytest.raises(TeacherMismatchError, match="vocabulary of 512 tokens, the student's has 1000"):
            client.score([[1, 2, 3]])
    assert score_requests(server) == ""  # no batch ever reached the teacher
    with TeacherClient(server.address, tokenizer=tiny_tokenizer) as client:
        assert client.check().vocab_size == 512
        assert client.score([[1, 2, 3]]).target_logprob.shape == (1, 3)


def test_a_teacher_without_tokenizer_is_checked_on_its_vocabulary_only(tiny_model_dir, tiny_tokenizer, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    engine = TeacherEngine.load(bare)
    assert engine.tokenizer_hash == ""
    server = ServerThread(TeacherConfig(model=bare, port=0, http_port=0), lambda: engine).start()
    try:
        with TeacherClient(server.address, tokenizer=tiny_tokenizer) as client:
            assert client.check().tokenizer_hash == ""
        with TeacherClient(server.address, vocab_size=511) as client, pytest.raises(TeacherMismatchError):
            client.check()
    finally:
        server.close()


def test_signal_lines_up_with_student_logits_and_feeds_the_loss(serve_teacher, tiny_model_dir):
    """logits[b, t] predicts targets[b, t] = input_ids[b, t + 1]: the loss takes the signal as it comes."""
    server = serve_teacher()
    input_ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([20, 14, 9])
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[:, :4] = False  # prompts
    batch = ScoreBatch.of(input_ids, lengths, mask)
    with TeacherClient(server.address) as client:
        signal = client.score(input_ids, lengths, mask, top_k=32)
        as_lists = client.score([row[:n].tolist() for row, n in zip(input_ids, lengths, strict=True)],
                                score_mask=mask, top_k=32)
    torch.testing.assert_close(signal.target_logprob, as_lists.target_logprob)
    targets = next_token_targets(batch)
    assert targets[0, :4].eq(-100).all() and targets[0, 19:].eq(-100).all() and targets[1, 13:].eq(-100).all()
    assert torch.equal(targets[0, 4:19], input_ids[0, 5:20])
    assert (signal.target_logprob[targets == -100] == 0).all() and (signal.target_logprob[targets != -100] < 0).all()

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():
        local = compress(teacher(input_ids).logits, targets, 32)  # right padding cannot change earlier positions
    student = torch.randn(3, 20, 512, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(atkd_loss(student, signal, targets).loss, atkd_loss(student, local, targets).loss,
                               rtol=1e-3, atol=0)


def test_stream_keeps_n_batches_in_flight_and_yields_them_in_order(serve_teacher, tiny_teacher_engine):
    gated = GatedEngine(tiny_teacher_engine)
    gated.gate.clear()
    server = serve_teacher(gated, max_wait_ms=0)
    batches = [torch.full((1, 6), i + 1) for i in range(6)]
    results = []
    with TeacherClient(server.address, client_id="streamer") as client:
        worker = threading.Thread(target=lambda: results.extend(client.score_stream(batches, in_flight=3, top_k=4)))
        worker.start()
        wait_until(lambda: server.server.replica.scheduler.inflight() == 3, what="3 requests in flight")
        time.sleep(0.2)  # not a synchronisation: the 4th request must not go out while 3 are unanswered
        assert server.server.replica.scheduler.inflight() == 3
        gated.gate.set()
        worker.join(20)
        assert len(results) == 6
        for batch, signal in zip(batches, results, strict=True):
            torch.testing.assert_close(signal.target_logprob, client.score(batch, top_k=4).target_logprob)
    assert [job.token_ids[0].item() for job in gated.computed[:6]] == [1, 2, 3, 4, 5, 6]


def test_stream_raises_the_status_of_a_failed_request(serve_teacher):
    server = serve_teacher()
    with TeacherClient(server.address) as client:
        stream = client.score_stream([torch.ones(1, 4, dtype=torch.long), torch.full((1, 4), 600)], top_k=4)
        assert next(stream).topk_ids.shape == (1, 4, 4)
        with pytest.raises(TeacherError) as failure:
            next(stream)
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_ids[0] = 600 is outside the vocabulary" in failure.value.message


def test_score_batch_packs_and_unpacks_the_scored_positions_of_the_contract():
    """Which positions are scored and their targets come from atkd.proto.alignment.scored_positions, as on the
    server: not the last of a sequence, not padding, and flagged by the score mask."""
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    batch = ScoreBatch.of([[5, 6, 7, 8], [9, 10]], score_mask=mask)
    assert batch.scored.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert next_token_targets(batch).tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    request = batch.to_request("7", top_k=2)
    assert list(request.token_ids) == [5, 6, 7, 8, 9, 10] and list(request.lengths) == [4, 2]
    assert list(request.score_mask) == [False, True, True, True, True, True]
    flat = compress(torch.randn(3, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([7, 8, 10]), k=2)
    dense = batch.unpack(flat)
    assert dense.positions_shape == (2, 4)
    torch.testing.assert_close(dense.target_logprob[batch.scored], flat.target_logprob)
    assert (dense.target_logprob[~batch.scored] == 0).all()
    with pytest.raises(TeacherError, match="scored 2 positions, expected 3"):
        batch.unpack(flat.select(torch.tensor([0, 1])))


def test_batches_are_validated_on_the_client():
    with pytest.raises(ValueError, match=r"lengths must be \[B\] = \[2\] ints in \[0, 3\]"):
        ScoreBatch.of(torch.zeros(2, 3, dtype=torch.long), [4, 1])
    with pytest.raises(ValueError, match="score_mask"):
        ScoreBatch.of(torch.zeros(2, 3, dtype=torch.long), score_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="no sequences"):
        ScoreBatch.of([])
    with pytest.raises(ValueError, match="unknown codec"):
        TeacherClient("127.0.0.1:1", codec="int4")
