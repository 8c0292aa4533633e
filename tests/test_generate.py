"""The Generate RPC through a real teacher server on loopback: KV-cache decoding against a plain reference,
seeds that repeat whatever shares the batch, streaming, validation and the limits Score has."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.metadata import AUTHORIZATION_KEY, CLIENT_ID_KEY, bearer
from atkd.student.client import TeacherClient
from atkd.student.client.generate import TeacherGenerator
from tests.teacher_harness import GatedEngine, wait_until

PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120], [300, 12, 9, 44, 61, 70, 81, 3, 11]]


def generate_request(prompts=PROMPTS, **options) -> pb.GenerateRequest:
    fields = dict(max_new_tokens=12, ignore_stop=True, prompt_ids=[t for p in prompts for t in p],
                  prompt_lengths=[len(p) for p in prompts])
    return pb.GenerateRequest(id="g", **{**fields, **options})


def call(address: str, request: pb.GenerateRequest, client: str = "test",
         token: str | None = None) -> list[pb.GenerateResponse]:
    metadata = ((CLIENT_ID_KEY, client),) + (((AUTHORIZATION_KEY, bearer(token)),) if token else ())
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.TeacherStub(channel).Generate(request, metadata=metadata, timeout=60))


def by_prompt(responses) -> list[list[int]]:
    return [list(r.token_ids) for r in sorted(responses, key=lambda r: r.index)]


def greedy_reference(model_dir, prompt: list[int], steps: int) -> list[int]:
    """Argmax decoding with a full forward per step (no cache, no padding, one prompt)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_with_the_cache_matches_plain_decoding(serve_teacher, tiny_model_dir):
    server = serve_teacher()
    responses = call(server.address, generate_request(greedy=True))
    assert sorted(r.index for r in responses) == [0, 1, 2]
    assert all(r.id == "g" and r.finish_reason == pb.FINISH_REASON_LENGTH for r in responses)
    assert all(r.timing.queue_ms >= 0 and r.timing.compute_ms > 0 and r.timing.batch_tokens == 18 + 3 * 12
               for r in responses)
    for prompt, tokens in zip(PROMPTS, by_prompt(responses), strict=True):
        assert tokens == greedy_reference(tiny_model_dir, prompt, 12)


def test_generation_stops_at_a_stop_token_and_reports_it(serve_teacher, tiny_model_dir):
    server = serve_teacher()
    first = greedy_reference(tiny_model_dir, PROMPTS[0], 3)
    (response,) = call(server.address, generate_request([PROMPTS[0]], greedy=True, ignore_stop=False,
                                                         stop_token_ids=[first[2]]))
    assert list(response.token_ids) == first[: first.index(first[2]) + 1]
    assert response.finish_reason == pb.FINISH_REASON_STOP


def test_a_seed_gives_the_same_samples_whatever_shares_the_batch(serve_teacher, tiny_teacher_engine):
    gated = GatedEngine(tiny_teacher_engine)
    server = serve_teacher(engine=gated, max_wait_ms=50)
    seeded = generate_request(seed=1234, temperature=1.5, top_p=0.9, top_k=50)
    alone = by_prompt(call(server.address, seeded))
    assert by_prompt(call(server.address, seeded)) == alone
    assert by_prompt(call(server.address, generate_request(seed=99, temperature=1.5))) != alone  # seeds matter

    # Now the same request while others (unseeded, seeded, a Score) are queued into the same batch.
    gated.gate.clear()
    gated.entered.clear()
    with TeacherClient(server.address, top_k=4) as scorer:
        blocker = scorer.score_async([list(range(20))])
        wait_until(gated.entered.is_set, what="the engine to start a batch")
        results: dict[str, list] = {}
        requests = {"seeded": seeded, "other": generate_request(temperature=1.5),
                    "other-seeded": generate_request(PROMPTS[::-1], seed=7)}
        threads = [threading.Thread(target=lambda n=name, r=request: results.__setitem__(n, call(server.address, r, n)))
                   for name, request in requests.items()]
        for thread in threads:
            thread.start()
        wait_until(lambda: server.server.replica.scheduler.queue.queued_requests == 3, what="three queued requests")
        scorer.score_async([list(range(10))])
        gated.gate.set()
        blocker.result()
        for thread in threads:
            thread.join(60)
    assert by_prompt(results["seeded"]) == alone


def test_client_generator_keeps_prompt_order_and_seeds_across_requests(serve_teacher, tiny_tokenizer):
    server = serve_teacher(max_batch_tokens=64)  # 3 prompts + 3 x 12 new tokens do not fit one request
    with TeacherClient(server.address, tokenizer=tiny_tokenizer) as client:
        generator = TeacherGenerator(client)
        options = dict(max_new_tokens=12, ignore_stop=True, seed=5, temperature=1.2)
        first = generator.generate(PROMPTS, **options)
        assert [len(g.token_ids) for g in first] == [12, 12, 12]
        assert generator.generate(PROMPTS, **options) == first
        # prompt 1 on its own, with the seed it had as the second prompt of the call (seed + 1)
        assert generator.generate(PROMPTS[1:2], **{**options, "seed": 6}) == first[1:2]


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), "max_new_tokens = 0"),
    (dict(max_new_tokens=201), "max_new_tokens = 201 must be in [1, 200]"),
    (dict(max_new_tokens=125), "maximum sequence length"),  # 9 + 125 > 128
    (dict(max_new_tokens=40), "max_batch_tokens"),  # 18 + 3 x 40 > 128
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=100_000), "top_k"),
    (dict(stop_token_ids=[512]), "stop_token_ids[0] = 512"),
    (dict(prompt_lengths=[3, 3]), "prompt_lengths sum"),
    (dict(prompt_ids=[1, 999] + [0] * 16), "prompt_ids[1] = 999"),
])
def test_bad_generate_requests_get_invalid_argument_naming_the_field(serve_teacher, options, message):
    server = serve_teacher(max_batch_tokens=128, max_new_tokens=200)
    with pytest.raises(grpc.RpcError) as raised:
        call(server.address, generate_request(**options))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert len(call(server.address, generate_request(max_new_tokens=4))) == 3  # the server still serves


def test_generate_shares_the_queue_bound_and_client_limits_with_score(serve_teacher, tiny_teacher_engine, tmp_path):
    tokens = tmp_path / "tokens.yaml"  # named tokens: each client is its token, whatever connection it uses
    tokens.write_text("alice: alice-secret\nbob: bob-secret\ncarol: carol-secret\n")
    gated = GatedEngine(tiny_teacher_engine)
    server = serve_teacher(engine=gated, max_queue_tokens=100, max_batch_tokens=64, max_client_queue_share=1.0,
                           max_inflight_per_client=1, auth_tokens_file=tokens)
    scheduler = server.server.replica.scheduler
    gated.gate.clear()
    with TeacherClient(server.address, top_k=4, token="alice-secret") as alice, \
            TeacherClient(server.address, top_k=4, token="bob-secret") as bob:
        computing = alice.score_async([list(range(60))])  # held in the engine by the gate
        wait_until(gated.entered.is_set, what="alice's Score in the engine")
        queued = bob.score_async([list(range(60))])  # 60 tokens waiting in the queue
        wait_until(lambda: scheduler.queue.queued_tokens >= 60, what="bob's Score queued")
        with pytest.raises(grpc.RpcError) as raised:  # 18 prompt tokens + 3 x 10 new ones: 60 + 48 > 100 queued
            call(server.address, generate_request(max_new_tokens=10), token="carol-secret")
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:  # alice already has her one request in flight
            call(server.address, generate_request(max_new_tokens=4), token="alice-secret")
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in raised.value.details()
        gated.gate.set()
        computing.result(), queued.result()
    assert len(call(server.address, generate_request(max_new_tokens=4), token="alice-secret")) == 3


def test_info_publishes_the_generation_limits(serve_teacher, tiny_model_dir):
    server = serve_teacher(max_new_tokens=77)
    with grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.TeacherStub(channel).Info(pb.InfoRequest())
    assert info.max_new_tokens == 77
    assert list(info.eos_token_ids) == [AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.eos_token_id]
