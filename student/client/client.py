"""The student's side of the teacher service: batches of token ids out, :class:`TeacherSignal` s back.

:class:`TeacherClient` holds the channel (:mod:`.channel`: one or several replicas, load balancing,
gRPC retries), packs each batch (:mod:`.batch`, with the alignment of the teacher's signal), and sends
it as a unary call retried with backoff (:mod:`.pending`) or over a stream with several batches in
flight (:meth:`TeacherClient.score_stream`).

Before the first batch the client compares the teacher's ``Info`` with the student through the one
compatibility check, :func:`atkd.proto.fingerprint.check_same_tokenizer`: the vocabulary size, and the
tokenizer fingerprint (:func:`atkd.proto.fingerprint.tokenizer_fingerprint`) when both sides have one;
a teacher without a tokenizer publishes an empty hash and only its size is checked.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.codec import codec_name, codec_value, decode_signal
from atkd.proto.fingerprint import check_same_tokenizer, tokenizer_fingerprint
from atkd.proto.metadata import APPLICATION_KEY, AUTHORIZATION_KEY, CLIENT_ID_KEY, bearer
from atkd.proto.signal import TeacherSignal

from .batch import ScoreBatch
from .channel import open_channel
from .errors import TeacherError, status_code, teacher_errors
from .pending import PendingScore


@dataclass(frozen=True)
class TeacherInfo:
    """What a teacher replica serves (the ``Info`` RPC)."""

    model_id: str
    model_revision: str
    vocab_size: int
    tokenizer_hash: str
    max_sequence_length: int
    max_batch_tokens: int
    max_top_k: int
    max_tail_samples: int
    codecs: tuple[str, ...]
    dtype: str
    device: str


class TeacherClient:
    """A connection to one teacher endpoint (a replica or a load balancer in front of replicas).

    ``tokenizer`` / ``vocab_size`` describe the student: ``vocab_size`` is the width of its logits
    (default ``len(tokenizer)``; pass the model's ``config.vocab_size`` if it pads its vocabulary).
    ``token`` / ``token_file``: bearer token for a server started with auth. ``tls_root_cert``: PEM
    of the CA to trust (or True for the system roots) to connect over TLS. ``top_k``, ``codec``
    and ``timeout`` (seconds per unary call) are defaults that every call may override.
    ``address``: one endpoint, or a list of replicas (see :mod:`.channel`). ``retry_budget``: seconds
    :class:`~.pending.PendingScore` keeps retrying a batch on :data:`~.channel.RETRYABLE` failures.
    ``keepalive_s``: HTTP/2 ping interval, so that a replica that vanished without closing its connection
    is noticed.
    ``application``: the Ray Serve application to route to (sent as the ``application`` metadata that
    Serve's gRPC proxy routes on); leave it None for a plain teacher server.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        token: str | None = None,
        token_file: Path | None = None,
        tls_root_cert: Path | bytes | bool | None = None,
        client_id: str | None = None,
        application: str | None = None,
        top_k: int = 64,
        codec: str = "fp16",
        timeout: float | None = 60.0,
        retry_budget: float = 60.0,
        keepalive_s: float = 30.0,
    ):
        codec_value(codec)  # fail early on a typo
        self.address = address if isinstance(address, str) else ",".join(address)
        self.retry_budget = retry_budget
        self.top_k = top_k
        self.codec = codec
        self.timeout = timeout
        self._expected_vocab = vocab_size if vocab_size is not None or tokenizer is None else len(tokenizer)
        self._expected_hash = tokenizer_fingerprint(tokenizer) if tokenizer is not None else ""
        self._info: TeacherInfo | None = None
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if token_file is not None:
            token = Path(token_file).read_text().strip()
        self._metadata = ((CLIENT_ID_KEY, self.client_id),) + (((AUTHORIZATION_KEY, bearer(token)),) if token else ())
        if application:
            self._metadata += ((APPLICATION_KEY, application),)
        self._channel = open_channel(address, tls_root_cert=tls_root_cert, keepalive_s=keepalive_s)
        self._stub = pb_grpc.TeacherStub(self._channel)

    def info(self) -> TeacherInfo:
        """The teacher's Info (fetched on every call)."""
        with teacher_errors():
            reply = self._stub.Info(pb.InfoRequest(), metadata=self._metadata, timeout=self.timeout)
        return TeacherInfo(
            model_id=reply.model_id, model_revision=reply.model_revision, vocab_size=reply.vocab_size,
            tokenizer_hash=reply.tokenizer_hash, max_sequence_length=reply.max_sequence_length,
            max_batch_tokens=reply.max_batch_tokens, max_top_k=reply.max_top_k,
            max_tail_samples=reply.max_tail_samples, codecs=tuple(codec_name(c) for c in reply.codecs),
            dtype=reply.dtype, device=reply.device,
        )  # fmt: skip

    def check(self) -> TeacherInfo:
        """Fetch Info and refuse a teacher whose vocabulary or tokenizer differs from the student's
        (``TeacherMismatchError`` of :func:`~atkd.proto.fingerprint.check_same_tokenizer`)."""
        info = self.info()
        check_same_tokenizer(f"{info.model_id} at {self.address}", info.vocab_size, info.tokenizer_hash,
                             self._expected_vocab, self._expected_hash)
        self._info = info
        return info

    def score(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        lengths: torch.Tensor | Sequence[int] | None = None,
        score_mask: torch.Tensor | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> TeacherSignal:
        """The teacher's signal ``[B, T]`` for one batch (see :meth:`ScoreBatch.of` for the inputs).

        ``options``: ``top_k``, ``codec``, ``temperature``, ``tail_samples``, ``seed``, ``timeout_ms``.
        """
        return self.score_async(input_ids, lengths, score_mask, timeout=timeout, **options).result()

    def score_async(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        lengths: torch.Tensor | Sequence[int] | None = None,
        score_mask: torch.Tensor | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> PendingScore:
        """Send the batch now; the signal comes from ``.result()`` (arguments as in :meth:`score`).

        Several pending scores are in flight at once (spread over the replicas); each is retried on
        its own, so a failure delays only its batch and never reorders the caller's batches.
        """
        self._ensure_checked()
        batch = ScoreBatch.of(input_ids, lengths, score_mask)
        request = self._request(batch, "0", options)
        return PendingScore(lambda: self._stub.Score.future(request, metadata=self._metadata,
                                                            timeout=timeout or self.timeout),
                            batch, self.retry_budget, self.address)

    def score_stream(
        self, batches: Iterable[ScoreBatch | torch.Tensor], *, in_flight: int = 4, **options: Any
    ) -> Iterator[TeacherSignal]:
        """Signals ``[B, T]`` for ``batches``, in order, over one stream with up to ``in_flight`` requests out.

        A batch is a :class:`ScoreBatch` or an ``input_ids [B, T]`` tensor; ``options`` as in :meth:`score`.
        The next request goes out as soon as a response comes back, so the teacher works on batch
        n + 1 .. n + in_flight - 1 while the caller trains on batch n. A failed batch raises its
        :class:`TeacherError` in its turn, after the signals of the batches before it.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self._ensure_checked()
        slots = threading.Semaphore(in_flight)
        sent: dict[str, ScoreBatch] = {}
        closing, exhausted = threading.Event(), threading.Event()
        failure: list[BaseException] = []

        def requests() -> Iterator[pb.ScoreRequest]:
            try:
                for index, batch in enumerate(batches):
                    slots.acquire()
                    if closing.is_set():
                        return
                    batch = batch if isinstance(batch, ScoreBatch) else ScoreBatch.of(batch)
                    sent[str(index)] = batch
                    yield self._request(batch, str(index), options)
                exhausted.set()
            except Exception as error:  # surfaced in the caller's thread below
                failure.append(error)
                raise

        call = self._stub.ScoreStream(requests(), metadata=self._metadata)
        ready: dict[int, TeacherSignal | TeacherError] = {}  # arrived out of order, waiting for their turn
        next_index = 0
        try:
            with teacher_errors():
                for response in call:
                    slots.release()
                    batch = sent.pop(response.id)
                    if response.HasField("error"):
                        ready[int(response.id)] = TeacherError(status_code(response.error.code),
                                                               response.error.message)
                    else:
                        ready[int(response.id)] = batch.unpack(decode_signal(response.signal))
                    while next_index in ready:
                        result = ready.pop(next_index)
                        if isinstance(result, TeacherError):
                            raise result
                        yield result
                        next_index += 1
            if sent or not exhausted.is_set():
                raise TeacherError(grpc.StatusCode.UNAVAILABLE, f"the teacher ended the stream after {next_index} "
                                   "batches with more to score (shutting down?): retry on another replica")
        except TeacherError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            closing.set()
            slots.release()
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ensure_checked(self) -> None:
        if self._info is None:
            self.check()

    def _request(self, batch: ScoreBatch, request_id: str, options: dict[str, Any]) -> pb.ScoreRequest:
        options = {"top_k": self.top_k, "codec": self.codec, **options}
        options["codec"] = codec_value(options["codec"])
        return batch.to_request(request_id, **options)
