"""The teacher replica's configuration: one typed object, loadable from YAML, every field a CLI flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: gRPC's largest message (a signed 32-bit length).
MAX_MESSAGE_BYTES = (1 << 31) - 1


def message_limits(config: TeacherConfig) -> tuple[int, int]:
    """(receive, send) gRPC message limits in bytes that fit the largest request and response the
    config allows: per token at most 16 request bytes (id, mask flag, length), and at most 6 bytes per
    top-k entry (int32 id, fp16 log-prob), 8 per tail sample (with a fp16 weight) plus 21 of scalars
    (with a tail count and a log-threshold) in the response."""
    slack = 1 << 16
    receive = 16 * config.max_batch_tokens + slack
    send = config.max_batch_tokens * (6 * config.top_k_max + 8 * config.max_tail_samples + 21) + slack
    return receive, send


class TeacherConfig(BaseModel):
    """Everything ``atkd-teacher serve`` needs. Field ``foo_bar`` is the flag ``--foo-bar`` and the YAML key
    ``foo_bar``; defaults work on a laptop CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path = Field(description="directory of a Hugging Face causal LM (config.json, weights, tokenizer)")
    model_id: str | None = Field(None, description="name published in Info (default: the id atkd-student saved in "
                                                       "config.json, else the directory's name)")
    revision: str | None = Field(None, description="revision published in Info (default: sha256 of the weights)")
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 or :: for every interface)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    http_host: str | None = Field(None, description="address the HTTP side binds (default: --host)")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port: /healthz, /readyz, /metrics, /v1/info")
    max_batch_tokens: int = Field(4096, ge=1, description="token budget of a batch; also the most one request may hold")
    max_wait_ms: float = Field(5.0, ge=0, description="start a batch before it is full once its oldest request "
                                                      "waited this long")
    top_k_max: int = Field(256, ge=1, description="largest top-k a request may ask for")
    max_tail_samples: int = Field(64, ge=0, description="largest number of tail samples a request may ask for")
    max_seq_len: int | None = Field(None, ge=2, description="longest sequence accepted (default: the model's context)")
    max_queue_tokens: int | None = Field(
        None, ge=1, description="tokens queued over all clients before RESOURCE_EXHAUSTED (default: 8 x batch)")
    split_requests: bool = Field(True, description="let a request's sequences run in several batches, so that "
                                                   "requests of several clients fill one batch (false: whole requests)")
    compute_share: Literal["fair", "fill"] = Field(
        "fair", description="fair: while other clients are active, a backlogged client gets about what each of them "
                            "gets of a batch, not the room they leave (see fair_queue.py); fill: deficit round-robin "
                            "alone, work-conserving: a backlogged client fills every batch")
    max_new_tokens: int = Field(256, ge=0, description="most new tokens one prompt of a Generate request may ask "
                                                       "for (0: refuse Generate)")
    max_inflight_per_client: int = Field(16, ge=1, description="requests one client may have queued, computing or "
                                                               "waiting to be sent")
    stream_compute_window: int = Field(
        4, ge=1, description="requests of one ScoreStream computing or computed whose responses gRPC has not yet "
                             "taken: a stream that is not read gets no more computed ahead of its reader")
    max_client_queue_share: float = Field(0.5, gt=0, le=1, description="fraction of the queue's tokens one client "
                                                                       "may hold, so that no client fills it alone")
    packing: Literal["auto", "off"] = Field(
        "auto", description="auto: run a batch's sequences packed without padding where the model reproduces its "
                            "unpacked forward that way (checked at load); off: pad them, grouped by length")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    device: str = Field("auto", description="torch device, e.g. cpu, cuda, cuda:1 (auto: cuda if available)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    chunk_size: int | None = Field(None, ge=1, description="positions per [positions, V] block of the compression "
                                                           "(default: 16 MiB of fp32 logits)")
    auth_token_file: Path | None = Field(None, description="file holding the bearer token clients must send")
    auth_token_env: str | None = Field(None, description="environment variable holding the bearer token")
    auth_tokens_file: Path | None = Field(None, description="YAML mapping of client name: bearer token; each "
                                                            "client's fairness and limits follow its token")
    metrics_public: bool = Field(False, description="serve /metrics without auth when auth is on")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve gRPC over TLS")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA: require client certificates it signed (mTLS)")
    grace_s: float = Field(30.0, ge=0, description="on SIGTERM, seconds to finish in-flight work before exiting")
    ready_file: Path | None = Field(None, description="once serving, write {pid, host, grpc_port, http_port, "
                                                       "model_id} as JSON here (atomically); removed on stop")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="logging level")

    @model_validator(mode="after")
    def _check_pairs(self) -> TeacherConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        sources = [self.auth_token_file, self.auth_token_env, self.auth_tokens_file]
        if sum(source is not None for source in sources) > 1:
            raise ValueError("give one of auth_token_file, auth_token_env and auth_tokens_file")
        return self

    @model_validator(mode="after")
    def _check_limits(self) -> TeacherConfig:
        """Refuse limits that no replica can honour (the model's vocabulary is checked when it loads)."""
        if self.client_queue_tokens < self.max_batch_tokens:
            raise ValueError(f"max_client_queue_share x the queue ({self.client_queue_tokens} tokens) must hold at "
                             f"least one request of max_batch_tokens = {self.max_batch_tokens}")
        receive, send = message_limits(self)
        if max(receive, send) > MAX_MESSAGE_BYTES:
            raise ValueError(f"a response may reach {send} bytes with max_batch_tokens = {self.max_batch_tokens}, "
                             f"top_k_max = {self.top_k_max} and max_tail_samples = {self.max_tail_samples}, above "
                             f"gRPC's message limit of {MAX_MESSAGE_BYTES} bytes: lower one of them")
        return self

    @property
    def client_queue_tokens(self) -> int:
        """The most tokens one client may have queued."""
        return int(self.max_client_queue_share * self.queue_tokens)

    @property
    def queue_tokens(self) -> int:
        """The queue bound in tokens (``max_queue_tokens`` or its default)."""
        return self.max_queue_tokens or 8 * self.max_batch_tokens

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> TeacherConfig:
        """Values from the YAML file at ``path`` (if any), then ``overrides`` on top."""
        values = {}
        if path is not None:
            values = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
        return cls(**{**values, **overrides})
