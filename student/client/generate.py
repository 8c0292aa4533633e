"""Teacher generations through the ``Generate`` RPC, on the connection of a :class:`~.client.TeacherClient`.

:meth:`TeacherGenerator.generate` takes any number of prompts: it cuts them, in order, into requests that fit
the replica's ``max_batch_tokens`` (prompt tokens plus ``max_new_tokens`` per prompt), sends up to
``in_flight`` requests at once and puts the continuations back in prompt order. Seeds: prompt i of the whole
call is sampled with seed ``seed + i`` whatever request it travels in (a request starting at prompt j carries
``seed + j``; the server seeds its prompt r with ``seed + j + r``), so the same call gives the same tokens.
A request that fails with a retryable status (UNAVAILABLE, RESOURCE_EXHAUSTED) is sent again whole, with
backoff, for up to the client's ``retry_budget`` seconds; a seeded request gives the same tokens again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from atkd.proto import teacher_pb2 as pb

from .channel import RETRYABLE
from .client import TeacherClient
from .errors import TeacherError


@dataclass(frozen=True)
class Generation:
    """The new tokens of one prompt; ``stopped``: they end with a stop token (else max_new_tokens ran out)."""

    token_ids: list[int]
    stopped: bool


class TeacherGenerator:
    """Generate with the teacher behind ``client`` (its address, auth, client id and application)."""

    def __init__(self, client: TeacherClient, in_flight: int = 4):
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self.client = client
        self.in_flight = in_flight

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        stop_token_ids: Sequence[int] = (),
        ignore_stop: bool = False,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> list[Generation]:
        """The continuation of every prompt, in prompt order (see the module docstring)."""
        info = self.client.check() if self.client._info is None else self.client._info
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       greedy=greedy, stop_token_ids=list(stop_token_ids), ignore_stop=ignore_stop,
                       timeout_ms=0)
        chunks = _chunks([len(prompt) for prompt in prompts], max_new_tokens, info.max_batch_tokens)
        requests = []
        for number, (start, end) in enumerate(chunks):
            ids = [token for prompt in prompts[start:end] for token in prompt]
            request = pb.GenerateRequest(id=str(number), prompt_ids=ids,
                                         prompt_lengths=[len(prompt) for prompt in prompts[start:end]], **options)
            if seed is not None:
                request.seed = (seed + start) % 2**64
            requests.append(request)
        with ThreadPoolExecutor(min(self.in_flight, max(1, len(requests)))) as pool:
            parts = list(pool.map(lambda request: self._call(request, timeout), requests))
        return [generation for part in parts for generation in part]

    def _call(self, request: pb.GenerateRequest, timeout: float | None) -> list[Generation]:
        """One request's continuations in prompt order, retried whole on another healthy replica (or the same
        one after a backoff) on retryable failures, within the client's retry budget."""
        client, give_up_at, backoff = self.client, None, 0.2
        while True:
            endpoint, healthy = client.replicas.pick()
            try:
                found: dict[int, Generation] = {}
                for response in endpoint.stub.Generate(request, metadata=client._metadata,
                                                       timeout=timeout or client.timeout):
                    found[response.index] = Generation(list(response.token_ids),
                                                       response.finish_reason == pb.FINISH_REASON_STOP)
                if len(found) != len(request.prompt_lengths):
                    raise TeacherError(grpc.StatusCode.UNAVAILABLE, f"the teacher answered {len(found)} of "
                                       f"{len(request.prompt_lengths)} prompts (shutting down?)")
                client.replicas.succeeded(endpoint)
                return [found[index] for index in range(len(request.prompt_lengths))]
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
            except TeacherError as error:
                code, details = error.code, error.message
            now = time.monotonic()
            give_up_at = give_up_at or now + client.retry_budget
            if code not in RETRYABLE or now + backoff > give_up_at:
                raise TeacherError(code, f"{details} (replicas {client.replicas})")
            client.replicas.failed(endpoint)
            if not healthy:
                time.sleep(backoff)
                backoff = min(2 * backoff, 5.0)


def _chunks(lengths: Sequence[int], max_new_tokens: int, budget: int) -> list[tuple[int, int]]:
    """``(start, end)`` of consecutive prompts whose lengths plus ``max_new_tokens`` each fit ``budget``."""
    chunks, start, used = [], 0, 0
    for index, length in enumerate(lengths):
        size = length + max_new_tokens
        if size > budget:
            raise ValueError(f"prompt {index} ({length} tokens) plus max_new_tokens = {max_new_tokens} exceeds the "
                             f"teacher's max_batch_tokens = {budget}")
        if used + size > budget:
            chunks.append((start, index))
            start, used = index, 0
        used += size
    if start < len(lengths):
        chunks.append((start, len(lengths)))
    return chunks
