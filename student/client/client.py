"""The student's side of the teacher service: batches of token ids out, :class:`TeacherSignal` s back.

:class:`TeacherClient` holds the replicas (:mod:`.replicas`: one channel per address, round robin over the
healthy ones, a failed one ejected for a while), packs each batch (:mod:`.batch`, with the alignment of
the teacher's signal), and sends it as a unary call with a deadline per attempt, failed over to another
replica or retried with backoff within a budget (:mod:`.pending`), or over a stream with several batches
in flight (:meth:`TeacherClient.score_stream`).

Before the first batch the client compares the teacher's ``Info`` with the student through the one
compatibility check, :func:`atkd.proto.fingerprint.check_same_tokenizer`: the vocabulary size, and the
tokenizer fingerprint (:func:`atkd.proto.fingerprint.tokenizer_fingerprint`) when both sides have one;
a teacher without a tokenizer publishes an empty hash and only its size is checked.

The client also pins the teacher's model revision: the one asked for (``revision``), else the one the
first ``Info`` (or the first response) publishes. Every response carries the revision of the replica
that computed it, and a response of another revision raises :class:`TeacherRevisionError` (one run,
one teacher) unless ``allow_revision_change`` is set.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto.codec import codec_name, codec_value, decode_signal
from atkd.proto.fingerprint import check_same_tokenizer, tokenizer_fingerprint
from atkd.proto.metadata import APPLICATION_KEY, AUTHORIZATION_KEY, CLIENT_ID_KEY, bearer
from atkd.proto.signal import TeacherSignal

from .batch import ScoreBatch
from .errors import TeacherRevisionError
from .pending import PendingCall
from .replicas import Endpoint, Replicas
from .stream import score_stream

log = logging.getLogger(__name__)


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
    """A connection to the replicas of one teacher (one address, or several; see :mod:`.replicas`).

    ``tokenizer`` / ``vocab_size`` describe the student: ``vocab_size`` is the width of its logits
    (default ``len(tokenizer)``; pass the model's ``config.vocab_size`` if it pads its vocabulary).
    ``token`` / ``token_file``: bearer token for a server started with auth. ``tls_root_cert``: PEM
    of the CA to trust (or True for the system roots) to connect over TLS. ``top_k``, ``codec``
    and ``timeout`` (deadline of one attempt of a unary call, seconds) are defaults that every call may
    override. ``address``: one endpoint, or a list of replicas (see :mod:`.replicas`). ``retry_budget``:
    seconds :class:`~.pending.PendingCall` keeps failing a batch over or retrying it on
    :data:`~.pending.FAILOVER` failures (a hung replica's deadline included); ``Info`` tries each replica
    once. ``revision``: the teacher revision this client requires (default: the first one it sees);
    ``allow_revision_change``: accept responses of another revision (logged once per revision).
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
        revision: str | None = None,
        allow_revision_change: bool = False,
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
        self.revision = revision or None  # pinned by check() or the first response when not given
        self.allow_revision_change = allow_revision_change
        self._revisions_seen = {revision} if revision else set()
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if token_file is not None:
            token = Path(token_file).read_text().strip()
        self._metadata = ((CLIENT_ID_KEY, self.client_id),) + (((AUTHORIZATION_KEY, bearer(token)),) if token else ())
        if application:
            self._metadata += ((APPLICATION_KEY, application),)
        self.replicas = Replicas(address, tls_root_cert=tls_root_cert, keepalive_s=keepalive_s, metadata=self._metadata,
                                 probe_timeout_s=min(timeout or 5.0, 5.0))

    def info(self) -> TeacherInfo:
        """The Info of a teacher replica (fetched on every call; each replica is tried once)."""
        reply = PendingCall(self.replicas, lambda endpoint: endpoint.stub.Info.future(
            pb.InfoRequest(), metadata=self._metadata, timeout=self.timeout), lambda reply, _: reply,
                            retry_budget=0.0, what="Info").result()
        return TeacherInfo(
            model_id=reply.model_id, model_revision=reply.model_revision, vocab_size=reply.vocab_size,
            tokenizer_hash=reply.tokenizer_hash, max_sequence_length=reply.max_sequence_length,
            max_batch_tokens=reply.max_batch_tokens, max_top_k=reply.max_top_k,
            max_tail_samples=reply.max_tail_samples, codecs=tuple(codec_name(c) for c in reply.codecs),
            dtype=reply.dtype, device=reply.device,
        )  # fmt: skip

    def check(self) -> TeacherInfo:
        """Fetch Info and refuse a teacher whose vocabulary or tokenizer differs from the student's
        (``TeacherMismatchError`` of :func:`~atkd.proto.fingerprint.check_same_tokenizer`), or whose
        revision is not the pinned one (:class:`TeacherRevisionError`); pins its revision otherwise."""
        info = self.info()
        check_same_tokenizer(f"{info.model_id} at {self.address}", info.vocab_size, info.tokenizer_hash,
                             self._expected_vocab, self._expected_hash)
        self.check_revision(info.model_revision, f"Info of {info.model_id} at {self.address}")
        self._info = info
        return info

    def check_revision(self, revision: str, source: str) -> None:
        """Pin ``revision`` if none is pinned yet, else refuse another one (unless ``allow_revision_change``).
        An empty revision (a server from before responses carried it) is not checked."""
        if not revision or revision in self._revisions_seen:
            return
        if self.revision is None:
            self.revision = revision
        elif not self.allow_revision_change:
            raise TeacherRevisionError(self.revision, revision, source)
        else:
            log.warning("teacher revision changed mid-run: %s answered with revision %s, this run started with %s "
                        "(allowed by allow_revision_change)", source, revision, self.revision)
        self._revisions_seen.add(revision)

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
    ) -> PendingCall[TeacherSignal]:
        """Send the batch now; the signal comes from ``.result()`` (arguments as in :meth:`score`).

        Several pending scores are in flight at once (spread over the replicas); each is retried on
        its own, so a failure delays only its batch and never reorders the caller's batches.
        """
        self._ensure_checked()
        batch = ScoreBatch.of(input_ids, lengths, score_mask)
        request = self._request(batch, "0", options)
        deadline = timeout or self.timeout

        def finish(response: pb.ScoreResponse, endpoint: Endpoint) -> TeacherSignal:
            self.check_revision(response.model_revision, f"the replica at {endpoint.address}")
            return batch.unpack(decode_signal(response.signal))

        return PendingCall(self.replicas, lambda endpoint: endpoint.stub.Score.future(
            request, metadata=self._metadata, timeout=deadline), finish, self.retry_budget)

    def score_stream(
        self, batches: Iterable[ScoreBatch | torch.Tensor], *, in_flight: int = 4, **options: Any
    ) -> Iterator[TeacherSignal]:
        """Signals ``[B, T]`` for ``batches``, in order, over one stream with up to ``in_flight`` requests out.

        A batch is a :class:`ScoreBatch` or an ``input_ids [B, T]`` tensor; ``options`` as in :meth:`score`.
        The next request goes out as soon as a response comes back, so the teacher works on batch
        n + 1 .. n + in_flight - 1 while the caller trains on batch n. When the replica fails (gone, draining,
        or silent for ``timeout`` while the caller waits), the stream moves to another one with the
        unanswered batches, under the same failover and ``retry_budget`` as :meth:`score`
        (:mod:`.stream`); the caller sees every signal once, in order. A failed batch raises its
        :class:`TeacherError` in its turn, after the signals of the batches before it.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self._ensure_checked()
        return score_stream(batches, replicas=self.replicas, metadata=self._metadata, in_flight=in_flight,
                            request=lambda batch, request_id: self._request(batch, request_id, options),
                            timeout=self.timeout, retry_budget=self.retry_budget, check_revision=self.check_revision)

    def close(self) -> None:
        self.replicas.close()

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
