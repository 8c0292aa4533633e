"""One teacher replica, whatever carries its calls: engine + scheduler + limits + Info + auth policy.

Built once from a :class:`TeacherConfig`; the plain gRPC server (:mod:`.server`) and the Ray Serve
deployment (:mod:`.ray_app`) are thin entry points around it that differ only in transport, so a
request's path is the same on both::

    transport -> auth policy -> TeacherServicer (parse, submit) -> Scheduler (fair queue, batch)
              -> TeacherEngine (forward + compress, worker thread) -> TeacherServicer (encode) -> transport

Generate takes the same path, its jobs queued and batched with Score's (:mod:`.generation`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

from atkd.proto import teacher_pb2 as pb
from atkd.proto.codec import CODECS

from .auth import BearerToken
from .config import TeacherConfig
from .engine import TeacherEngine
from .errors import ConfigError
from .faults import with_injected_delay
from .generation import GenerateService, Generator, eos_token_ids, with_generation
from .metrics import TeacherMetrics
from .request import Limits
from .scheduler import Scheduler
from .servicer import TeacherServicer


class Replica:
    """The parts of a serving replica (see the module docstring). ``metrics`` may be created earlier
    (the plain server exposes them while the model loads)."""

    def __init__(self, config: TeacherConfig, engine: TeacherEngine, metrics: TeacherMetrics | None = None):
        self.config = config
        self.engine = engine
        self.metrics = metrics or TeacherMetrics()
        self.metrics.forwarded_tokens.set_function(lambda: engine.forwarded_tokens)
        self.auth = BearerToken.from_config(config.auth_token_file, config.auth_token_env, config.auth_tokens_file)
        if config.top_k_max > engine.vocab_size:
            raise ConfigError(f"top_k_max = {config.top_k_max} is above the model's vocabulary of {engine.vocab_size}")
        self.limits = Limits(vocab_size=engine.vocab_size, max_seq_len=engine.max_seq_len,
                             max_batch_tokens=config.max_batch_tokens, max_top_k=config.top_k_max,
                             max_tail_samples=config.max_tail_samples)
        self.info = pb.InfoResponse(
            model_id=engine.model_id, model_revision=engine.revision, vocab_size=engine.vocab_size,
            tokenizer_hash=engine.tokenizer_hash, max_sequence_length=engine.max_seq_len,
            max_batch_tokens=config.max_batch_tokens, max_top_k=config.top_k_max,
            max_tail_samples=config.max_tail_samples, codecs=list(CODECS.values()),
            dtype=str(engine.dtype).removeprefix("torch."), device=str(engine.device),
            max_new_tokens=config.max_new_tokens, eos_token_ids=eos_token_ids(engine.model),
        )  # fmt: skip
        self.scheduler = Scheduler(
            with_injected_delay(with_generation(engine.score, Generator(engine))), self.metrics,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_s=config.max_wait_ms / 1000, max_queue_tokens=config.queue_tokens,
            max_inflight_per_client=config.max_inflight_per_client, split_requests=config.split_requests,
            max_client_queue_tokens=config.client_queue_tokens, fair_share=config.compute_share == "fair",
        )  # fmt: skip
        self.servicer = TeacherServicer(self.info, self.limits, self.scheduler, self.metrics, self.auth,
                                        stream_window=config.max_inflight_per_client,
                                        stream_compute_window=config.stream_compute_window)
        self.servicer.generation = GenerateService(self.limits, self.scheduler, self.metrics, config.max_new_tokens,
                                                   tuple(self.info.eos_token_ids))

    @classmethod
    async def load(cls, config: TeacherConfig, metrics: TeacherMetrics | None = None,
                   load_engine: Callable[[], TeacherEngine] | None = None) -> Replica:
        """Load the engine on a worker thread (the event loop keeps serving probes), then build the replica.
        ``load_engine`` replaces :meth:`TeacherEngine.load` from the config (tests inject engines)."""
        load_engine = load_engine or partial(
            TeacherEngine.load, config.model, dtype=config.dtype, device=config.device, model_id=config.model_id,
            revision=config.revision, max_seq_len=config.max_seq_len, chunk_size=config.chunk_size,
            packing=config.packing)
        return cls(config, await asyncio.to_thread(load_engine), metrics)

    def start(self) -> None:
        """Start batching (in the running event loop)."""
        self.scheduler.start()

    def close(self) -> None:
        """Refuse new work: new requests get UNAVAILABLE, queued ones run without waiting for full batches,
        and every ScoreStream ends once its requests in flight are answered."""
        self.scheduler.close()
        self.servicer.close()

    async def stop(self) -> None:
        """Stop the batching loop (after :meth:`close` and the transport's drain)."""
        await self.scheduler.stop()
