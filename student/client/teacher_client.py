"""The student's side of the teacher service: batches of token ids out, :class:`TeacherSignal` s back.

Alignment: for a batch ``input_ids [B, T]`` the signal covers positions ``[B, T]`` and position
``(b, t)`` is scored with target ``input_ids[b, t + 1]`` (the teacher shifts), exactly like the
student's ``logits[b, t]``; so ``atkd_loss(student_logits, signal, next_token_targets(batch))`` works
as is. The last position of each sequence, padding and positions masked out by ``score_mask`` are
not scored: their signal fields are zeros and their target is -100. To score every one of T
positions, send T + 1 tokens and drop the last position.

Several replicas: ``address`` may be a list of ``host:port`` (the client balances calls over them
with gRPC's ``round_robin`` policy) or one ``dns:///name:port`` whose resolver returns every replica
behind the name (a Kubernetes headless Service). Idempotent calls (all of them: a score is a pure
function of the request, tail samples included when a seed is sent) are retried by gRPC itself on
UNAVAILABLE and RESOURCE_EXHAUSTED, through the channel's service config, and land on another replica
when one is down; on top of that :class:`PendingScore` keeps retrying with backoff for
``retry_budget`` seconds, so a student outlives a teacher restart and fails with a clear error only when
no replica came back.

Packing and unpacking use numpy, not torch: small torch ops start OpenMP teams that compete with
the training step's for the CPU.

Before the first batch the client compares the teacher's ``Info`` with the student: the vocabulary
size, and the tokenizer fingerprint (:func:`atkd.proto.fingerprint.tokenizer_fingerprint`) when both sides
have one; a teacher without a tokenizer publishes an empty hash and only its size is checked.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.codec import codec_name, codec_value, decode_signal
from atkd.proto.fingerprint import tokenizer_fingerprint
from atkd.proto.metadata import APPLICATION_KEY, AUTHORIZATION_KEY, CLIENT_ID_KEY, bearer
from atkd.proto.signal import IGNORE_INDEX, TeacherSignal

_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}
TEACHER_SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
#: Failures worth another attempt: the replica is gone or restarting, or it sheds load.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def service_config(max_attempts: int = 5) -> dict:
    """The channel's service config: round_robin over every resolved replica, and gRPC retries (at most
    5 attempts, gRPC's cap; exponential backoff from 0.1 s to 2 s) of every Teacher method on
    :data:`RETRYABLE` codes. A retry picks the next replica, so a dead one costs one failed attempt."""
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": TEACHER_SERVICE}],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                            "backoffMultiplier": 2, "retryableStatusCodes": sorted(c.name for c in RETRYABLE)},
        }],
    }  # fmt: skip


def channel_target(address: str | Sequence[str]) -> str:
    """The gRPC target for one or more replicas.

    One address is used as given (``host:port``, ``dns:///name:port``, ``unix:...``). Several become
    one ``ipv4:`` or ``ipv6:`` target listing them all; host names among them are resolved here, once.
    """
    addresses = [address] if isinstance(address, str) else list(address)
    if not addresses:
        raise ValueError("no teacher address given")
    if len(addresses) == 1:
        return addresses[0]
    resolved = []
    for entry in addresses:
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"teacher address {entry!r} must be host:port when several are given")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0])
        resolved.append((ip, int(port)))
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ValueError(f"teacher addresses mix IPv4 and IPv6: {addresses}")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in resolved)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in resolved)


class TeacherError(RuntimeError):
    """A teacher call failed; ``code`` is its gRPC status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class TeacherMismatchError(ValueError):
    """The teacher's vocabulary or tokenizer is not the student's."""


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


@dataclass(frozen=True)
class ScoreBatch:
    """Sequences to score: ``input_ids [B, T]`` (right padded), ``lengths [B]``, optional ``score_mask [B, T]``."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    score_mask: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        sequences: torch.Tensor | Sequence[Sequence[int]],
        lengths: torch.Tensor | Sequence[int] | None = None,
        score_mask: torch.Tensor | None = None,
    ) -> ScoreBatch:
        """From ``input_ids [B, T]`` (+ ``lengths``, default all T) or a list of id lists."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise ValueError(f"input_ids must be [B, T], got shape {tuple(sequences.shape)}")
            input_ids = sequences.long().cpu()
            full = torch.full((input_ids.shape[0],), input_ids.shape[1])
            sizes = full if lengths is None else torch.as_tensor(lengths)
        else:
            if lengths is not None:
                raise ValueError("lengths come from the sequences when a list of sequences is given")
            if not sequences:
                raise ValueError("no sequences to score")
            sizes = torch.tensor([len(seq) for seq in sequences])
            input_ids = torch.zeros(len(sequences), int(sizes.max()), dtype=torch.long)
            for row, seq in enumerate(sequences):
                input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        if sizes.shape != (input_ids.shape[0],) or (sizes < 0).any() or (sizes > input_ids.shape[1]).any():
            raise ValueError(f"lengths must be [B] = [{input_ids.shape[0]}] ints in [0, {input_ids.shape[1]}]")
        if score_mask is not None and score_mask.shape != input_ids.shape:
            raise ValueError(f"score_mask {tuple(score_mask.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        return cls(input_ids, sizes.long().cpu(), None if score_mask is None else score_mask.bool().cpu())

    @property
    def scored(self) -> torch.Tensor:
        """Boolean ``[B, T]``: the positions the teacher scores (flagged, and not last of their sequence)."""
        positions = torch.arange(self.input_ids.shape[1])
        scored = positions < (self.lengths - 1).unsqueeze(1)
        return scored if self.score_mask is None else scored & self.score_mask

    def to_request(self, request_id: str, **options: Any) -> pb.ScoreRequest:
        """The wire request (sequences packed without padding); ``options`` are ScoreRequest fields."""
        tokens = (np.arange(self.input_ids.shape[1]) < self.lengths.numpy()[:, None])
        request = pb.ScoreRequest(id=request_id, token_ids=self.input_ids.numpy()[tokens].tolist(),
                                  lengths=self.lengths.tolist(), **options)
        if self.score_mask is not None:
            request.score_mask.extend(self.score_mask.numpy()[tokens].tolist())
        return request

    def unpack(self, flat: TeacherSignal) -> TeacherSignal:
        """Scatter a signal over the scored positions ``[n]`` onto ``[B, T]`` (zeros elsewhere)."""
        scored = self.scored
        rows = np.flatnonzero(scored.numpy())
        if flat.target_logprob.shape[0] != rows.size:
            raise TeacherError(grpc.StatusCode.INTERNAL, f"the teacher scored {flat.target_logprob.shape[0]} "
                                                          f"positions, expected {rows.size}")

        def dense(values: torch.Tensor | None) -> torch.Tensor | None:
            if values is None:
                return None
            out = np.zeros((scored.numel(), *values.shape[1:]), dtype=values.numpy().dtype)
            out[rows] = values.numpy()
            return torch.from_numpy(out).view(*scored.shape, *values.shape[1:])

        return TeacherSignal(**{f.name: dense(getattr(flat, f.name)) for f in dataclasses.fields(TeacherSignal)})


def next_token_targets(batch: ScoreBatch) -> torch.Tensor:
    """Targets ``[B, T]`` of the student's loss: ``input_ids[b, t + 1]`` where scored, -100 elsewhere."""
    return torch.where(batch.scored, batch.input_ids.roll(-1, dims=1), IGNORE_INDEX)


class TeacherClient:
    """A connection to one teacher endpoint (a replica or a load balancer in front of replicas).

    ``tokenizer`` / ``vocab_size`` describe the student: ``vocab_size`` is the width of its logits
    (default ``len(tokenizer)``; pass the model's ``config.vocab_size`` if it pads its vocabulary).
    ``token`` / ``token_file``: bearer token for a server started with auth. ``tls_root_cert``: PEM
    of the CA to trust (or True for the system roots) to connect over TLS. ``top_k``, ``codec``
    and ``timeout`` (seconds per unary call) are defaults that every call may override.
    ``address``: one endpoint, or a list of replicas (see the module docstring). ``retry_budget``: seconds
    :class:`PendingScore` keeps retrying a batch on :data:`RETRYABLE` failures. ``keepalive_s``: HTTP/2
    ping interval, so that a replica that vanished without closing its connection is noticed.
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
        target = channel_target(address)
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                   ("grpc.service_config", json.dumps(service_config())), ("grpc.enable_retries", 1),
                   ("grpc.keepalive_time_ms", int(keepalive_s * 1000)), ("grpc.keepalive_timeout_ms", 10_000)]
        if tls_root_cert:
            roots = None if tls_root_cert is True else (
                tls_root_cert if isinstance(tls_root_cert, bytes) else Path(tls_root_cert).read_bytes())
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = pb_grpc.TeacherStub(self._channel)

    def info(self) -> TeacherInfo:
        """The teacher's Info (fetched on every call)."""
        with _teacher_errors():
            reply = self._stub.Info(pb.InfoRequest(), metadata=self._metadata, timeout=self.timeout)
        return TeacherInfo(
            model_id=reply.model_id, model_revision=reply.model_revision, vocab_size=reply.vocab_size,
            tokenizer_hash=reply.tokenizer_hash, max_sequence_length=reply.max_sequence_length,
            max_batch_tokens=reply.max_batch_tokens, max_top_k=reply.max_top_k,
            max_tail_samples=reply.max_tail_samples, codecs=tuple(codec_name(c) for c in reply.codecs),
            dtype=reply.dtype, device=reply.device,
        )  # fmt: skip

    def check(self) -> TeacherInfo:
        """Fetch Info and refuse a teacher whose vocabulary or tokenizer differs from the student's."""
        info = self.info()
        if self._expected_vocab is not None and info.vocab_size != self._expected_vocab:
            raise TeacherMismatchError(
                f"teacher {info.model_id} at {self.address} scores a vocabulary of {info.vocab_size} tokens, the "
                f"student's has {self._expected_vocab}: teacher and student must share a tokenizer")
        if self._expected_hash and info.tokenizer_hash and info.tokenizer_hash != self._expected_hash:
            raise TeacherMismatchError(
                f"teacher {info.model_id} at {self.address} uses another tokenizer (fingerprint "
                f"{info.tokenizer_hash[:12]}..., the student's is {self._expected_hash[:12]}...): "
                "teacher and student must share a tokenizer")
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
            with _teacher_errors():
                for response in call:
                    slots.release()
                    batch = sent.pop(response.id)
                    if response.HasField("error"):
                        code = _STATUS_BY_VALUE.get(response.error.code, grpc.StatusCode.UNKNOWN)
                        ready[int(response.id)] = TeacherError(code, response.error.message)
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


class PendingScore:
    """A Score call in flight; :meth:`result` waits for it, retrying :data:`RETRYABLE` failures."""

    def __init__(self, call: Any, batch: ScoreBatch, retry_budget: float, address: str):
        self._call = call
        self._batch = batch
        self._budget = retry_budget
        self._address = address
        self._future = call()
        self.attempts = 1

    def result(self) -> TeacherSignal:
        """The signal ``[B, T]``; retries with backoff (0.2 s doubling to 5 s) until ``retry_budget`` s
        after the first failure, then raises :class:`TeacherError` with the last status."""
        give_up_at, backoff = None, 0.2
        while True:
            try:
                response = self._future.result()
                return self._batch.unpack(decode_signal(response.signal))
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
            now = time.monotonic()
            give_up_at = give_up_at or now + self._budget
            if code not in RETRYABLE or now + backoff > give_up_at:
                if code in RETRYABLE:
                    details = (f"no teacher replica at {self._address} answered for {self._budget:.0f} s "
                               f"({self.attempts} attempts); last error: {details}")
                raise TeacherError(code, details)
            time.sleep(backoff)
            backoff = min(2 * backoff, 5.0)
            self._future = self._call()
            self.attempts += 1

    def cancel(self) -> None:
        self._future.cancel()


@contextmanager
def _teacher_errors() -> Iterator[None]:
    """gRPC errors as :class:`TeacherError` with the same status code."""
    try:
        yield
    except grpc.RpcError as error:
        raise TeacherError(error.code(), error.details() or "") from None
