"""The teacher replica's configuration: one typed object, loadable from YAML, every field a CLI flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    max_new_tokens: int = Field(256, ge=0, description="most new tokens one prompt of a Generate request may ask "
                                                       "for (0: refuse Generate)")
    max_inflight_per_client: int = Field(16, ge=1, description="requests one client may have queued or computing")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    device: str = Field("auto", description="torch device, e.g. cpu, cuda, cuda:1 (auto: cuda if available)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    chunk_size: int | None = Field(None, ge=1, description="positions per [positions, V] block of the compression "
                                                           "(default: 16 MiB of fp32 logits)")
    auth_token_file: Path | None = Field(None, description="file holding the bearer token clients must send")
    auth_token_env: str | None = Field(None, description="environment variable holding the bearer token")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve gRPC over TLS")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    grace_s: float = Field(30.0, ge=0, description="on SIGTERM, seconds to finish in-flight work before exiting")
    ready_file: Path | None = Field(None, description="once serving, write {pid, host, grpc_port, http_port, "
                                                       "model_id} as JSON here (atomically); removed on stop")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="logging level")

    @model_validator(mode="after")
    def _check_pairs(self) -> TeacherConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.auth_token_file is not None and self.auth_token_env is not None:
            raise ValueError("give auth_token_file or auth_token_env, not both")
        return self

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
