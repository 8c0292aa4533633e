"""Prometheus metrics of one replica, in a registry of its own (several replicas can share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Batch sizes in tokens: powers of two from 16 to 64k.
TOKEN_BUCKETS = tuple(float(1 << i) for i in range(4, 17))
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


#: Distinct client labels in the metrics at most; later ones are counted as "other" (labels come from callers).
MAX_CLIENT_LABELS = 256


def client_label(client: str, name: str | None = None) -> str:
    """The metrics label of a client: its identity when it is a named token's (``token:<name>``), else the
    name it gives (``atkd-client-id``, cut to 64 characters), else its connection's peer without the port
    (``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``) so that reconnecting clients do not grow the series.
    A given name is a label only: fairness and limits follow the identity."""
    if client.startswith("token:"):
        return client
    if name:
        return name[:64]
    if client.startswith(("ipv4:", "ipv6:")):
        return client.rpartition(":")[0]
    return client


class TeacherMetrics:
    """Counters, gauges and histograms of the teacher; names start with ``atkd_teacher_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._client_labels: set[str] = set()
        r = self.registry
        self.requests = Counter("atkd_teacher_requests", "Score requests answered, by RPC and status code",
                                ["rpc", "code"], registry=r)
        self.tokens = Counter("atkd_teacher_tokens", "Tokens in the Score requests that were computed", registry=r)
        self.client_tokens = Counter("atkd_teacher_client_tokens", "Tokens computed, by client (token name, or "
                                     "peer address without the port)", ["client"], registry=r)
        self.forwarded_tokens = Gauge("atkd_teacher_forwarded_tokens", "Tokens run through the model so far, "
                                      "padding included (atkd_teacher_tokens counts the requests' tokens)",
                                      registry=r)
        self.positions = Counter("atkd_teacher_scored_positions", "Positions scored", registry=r)
        self.response_bytes = Counter("atkd_teacher_response_bytes", "Bytes of Score responses sent, by codec",
                                      ["codec"], registry=r)
        self.queue_requests = Gauge("atkd_teacher_queue_requests", "Requests waiting for a batch", registry=r)
        self.queue_tokens = Gauge("atkd_teacher_queue_tokens", "Tokens waiting for a batch", registry=r)
        self.batch_tokens = Histogram("atkd_teacher_batch_tokens", "Tokens per batch", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("atkd_teacher_batch_requests", "Requests per batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_clients = Histogram("atkd_teacher_batch_clients", "Clients with work in a batch",
                                       buckets=(1, 2, 3, 4, 6, 8, 16, 32), registry=r)
        self.batch_fill = Histogram("atkd_teacher_batch_fill_ratio", "Tokens per batch / max_batch_tokens",
                                    buckets=FILL_BUCKETS, registry=r)
        self.forward_seconds = Histogram("atkd_teacher_forward_seconds",
                                         "Forward pass and compression of one batch", buckets=SECONDS_BUCKETS,
                                         registry=r)
        self.queue_seconds = Histogram("atkd_teacher_queue_seconds", "Time from arrival to the start of the batch",
                                       buckets=SECONDS_BUCKETS, registry=r)

    def count_client_tokens(self, label: str, tokens: int) -> None:
        """Add ``tokens`` to the series of ``label``; past :data:`MAX_CLIENT_LABELS` series, new labels go to
        ``other``, so that no caller can grow the metrics without bound."""
        if label not in self._client_labels:
            if len(self._client_labels) >= MAX_CLIENT_LABELS:
                label = "other"
            self._client_labels.add(label)
        self.client_tokens.labels(label).inc(tokens)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
