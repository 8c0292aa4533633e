"""Bad input and abuse: every malformed or hostile request tried against one replica, the status it got, and a
well-behaved client served throughout.

    python -m bench.teacher_abuse          # builds a tiny model, starts `atkd-teacher serve`, prints the table

The replica runs with named tokens (``good``, ``abuser``), ``max_inflight_per_client = 4``, ``max_batch_tokens
= 1024``, ``top_k_max = 64``, ``max_tail_samples = 8`` on a tiny Llama (V = 512, 128 positions). Beside the
cases, a :class:`WellBehaved` client streams its batches the whole time (2 in flight) and checks every signal
against the first it got for the same batch; after each case the table waits for it to get at least one
more response, and records how many it got while the case ran. tests/test_teacher_badinput.py runs every
case (on an in-process replica) and asserts the expected status of each and that the well-behaved client
saw no error; docs/reliability.md ("Bad input") records this script's table.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.metadata import AUTHORIZATION_KEY, CLIENT_ID_KEY, bearer
from atkd.student.client import TeacherClient, TeacherError

TOKENS = {"good": "good-secret", "abuser": "abuser-secret"}
#: The replica's limits the cases probe (the server must be started with them: :func:`serve_args`).
VOCAB, MAX_LEN, MAX_BATCH_TOKENS, TOP_K_MAX, MAX_TAIL, MAX_INFLIGHT = 512, 128, 1024, 64, 8, 4
SCORE, STREAM = "/atkd.teacher.v1.Teacher/Score", "/atkd.teacher.v1.Teacher/ScoreStream"


def serve_config(tokens_file: Path) -> dict:
    """The :class:`~atkd.services.teacher.config.TeacherConfig` fields of the replica under test."""
    return dict(auth_tokens_file=tokens_file, max_inflight_per_client=MAX_INFLIGHT, max_batch_tokens=MAX_BATCH_TOKENS,
                top_k_max=TOP_K_MAX, max_tail_samples=MAX_TAIL)


def write_tokens(directory: Path) -> Path:
    path = Path(directory) / "tokens.yaml"
    path.write_text("".join(f"{name}: {token}\n" for name, token in TOKENS.items()))
    return path


@dataclass
class Target:
    """The replica under test: its gRPC address and HTTP port."""

    address: str
    http_port: int

    def channel(self) -> grpc.Channel:
        """A plaintext channel on a connection of its own."""
        return grpc.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                            ("grpc.max_send_message_length", -1)])

    def tokens_computed(self, client: str) -> int:
        """Tokens computed so far for ``client`` (a metrics label, e.g. ``token:abuser``; from /metrics)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/metrics",
                                         headers={"Authorization": bearer(TOKENS["abuser"])})
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
        return int(sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                       if sample.name == "atkd_teacher_client_tokens_total" and sample.labels["client"] == client))


ABUSER = ((AUTHORIZATION_KEY, bearer(TOKENS["abuser"])),)


def request(request_id: str = "r", sequences=((1, 2, 3, 4),), **fields) -> pb.ScoreRequest:
    return pb.ScoreRequest(id=request_id, token_ids=[t for s in sequences for t in s],
                           lengths=[len(s) for s in sequences], top_k=fields.pop("top_k", 4), **fields)


def _code(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


def unary(message: pb.ScoreRequest | bytes, metadata=ABUSER) -> Callable[[Target], str]:
    """A case: one Score call (raw bytes are sent as they are)."""

    def run(target: Target) -> str:
        with target.channel() as channel:
            if isinstance(message, bytes):
                call = channel.unary_unary(SCORE)
                return _code(lambda: call(message, metadata=metadata, timeout=30))
            return _code(lambda: pb_grpc.TeacherStub(channel).Score(message, metadata=metadata, timeout=30))

    return run


def stream_codes(messages: list[pb.ScoreRequest], metadata=ABUSER) -> Callable[[Target], str]:
    """A case: the messages on one ScoreStream; the codes of the responses (in order, OK for a signal)."""

    def run(target: Target) -> str:
        with target.channel() as channel:
            responses = pb_grpc.TeacherStub(channel).ScoreStream(iter(messages), metadata=metadata, timeout=30)
            codes = [grpc.StatusCode.OK.name if response.HasField("signal") else _status_name(response.error.code)
                     for response in responses]
        return ", ".join(codes)

    return run


def _status_name(value: int) -> str:
    return next(code.name for code in grpc.StatusCode if code.value[0] == value)


def concurrent(messages: list[pb.ScoreRequest], metadata_of: Callable[[int], tuple]) -> Callable[[Target], str]:
    """A case: the messages as concurrent Score calls (each on the same connection); the codes received, counted."""

    def run(target: Target) -> str:
        with target.channel() as channel:
            stub = pb_grpc.TeacherStub(channel)
            futures = [stub.Score.future(message, metadata=metadata_of(i), timeout=60)
                       for i, message in enumerate(messages)]
            codes = [_code(future.result) for future in futures]
        return ", ".join(f"{code} x{codes.count(code)}" for code in sorted(set(codes)))

    return run


def raw_tcp(port_of: Callable[[Target], int], payload: bytes) -> Callable[[Target], str]:
    """A case: ``payload`` written to a TCP port; what came back."""

    def run(target: Target) -> str:
        with socket.create_connection(("127.0.0.1", port_of(target)), timeout=10) as sock:
            sock.sendall(payload)
            try:
                reply = sock.recv(4096)
            except (ConnectionResetError, TimeoutError):
                reply = b""
        if reply.startswith(b"HTTP/1.1 "):
            return f"HTTP {reply.split()[1].decode()}"
        return "closed by the server" + (f" ({len(reply)} bytes back: an HTTP/2 GOAWAY)" if reply else "")

    return run


def http_status(path: str, token: str | None = None) -> Callable[[Target], str]:
    def run(target: Target) -> str:
        headers = {"Authorization": bearer(token)} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{target.http_port}{path}",
                                                               headers=headers), timeout=10) as reply:
                return f"HTTP {reply.status}"
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}"

    return run


def unread_stream(target: Target) -> str:
    """60 requests of 1000 tokens (top-64: ~270 KB per response) on a stream that is never read."""
    before = target.tokens_computed("token:abuser")
    sequences = [[(i * 7 + j) % VOCAB for j in range(100)] for i in range(10)]
    with target.channel() as channel:
        call = pb_grpc.TeacherStub(channel).ScoreStream(
            iter([request(str(i), sequences, top_k=64) for i in range(60)]), metadata=ABUSER, timeout=60)
        computed, deadline = -1, time.monotonic() + 30
        while time.monotonic() < deadline:  # until the server stops computing for it
            time.sleep(1.0)
            now = (target.tokens_computed("token:abuser") - before) // 1000
            if now == computed:
                break
            computed = now
        call.cancel()
    return f"flow-controlled: {computed} of 60 computed, then nothing"


def wrong_tokenizer(target: Target) -> str:
    """A student whose tokenizer is another one (trained here on other text; the vocabulary size given as
    the teacher's): refused by the client before its first batch, by the tokenizer hash."""
    from atkd.student.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        other = train_tokenizer(["a rose by any other name would smell as sweet"] * 20, 300, Path(tmp))
    try:
        with TeacherClient(target.address, tokenizer=other, vocab_size=VOCAB, token=TOKENS["abuser"]) as client:
            client.score([[1, 2, 3]], top_k=4)
    except (TeacherError, ValueError) as error:
        return f"refused by the client ({type(error).__name__}: {str(error)[:60]}...)"
    return "OK"


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field: key varint then payload (already encoded for ``wire_type``)."""
    return bytes([number << 3 | wire_type]) + payload


@dataclass
class Case:
    name: str
    expected: str  # the status (or outcome prefix) the case must get
    run: Callable[[Target], str]


def cases() -> list[Case]:
    ok = request()
    flood = [request(f"f{i}", [[(i + j) % VOCAB for j in range(100)] for _ in range(10)]) for i in range(12)]
    big = [[1] * MAX_LEN]
    return [
        Case("garbage bytes as the message (64 random bytes)", "INVALID_ARGUMENT",
             unary(bytes(torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0)).tolist()))),
        Case("truncated message (a field cut short)", "INVALID_ARGUMENT", unary(ok.SerializeToString()[:-3])),
        Case("wrong field type: id (a string) not UTF-8", "INVALID_ARGUMENT",
             unary(_field(1, 2, b"\x02\xff\xfe") + ok.SerializeToString()[len(_field(1, 2, b"\x01r")):])),
        Case("wrong field type: token_ids sent as a fixed64", "INVALID_ARGUMENT",
             unary(_field(2, 1, b"\x01" * 8) + _field(3, 0, b"\x04") + _field(5, 0, b"\x04"))),
        Case("lengths sum != len(token_ids)", "INVALID_ARGUMENT",
             unary(pb.ScoreRequest(id="r", token_ids=[1, 2, 3], lengths=[4], top_k=4))),
        Case("score_mask length != len(token_ids)", "INVALID_ARGUMENT", unary(request(score_mask=[True]))),
        Case("no lengths", "INVALID_ARGUMENT", unary(pb.ScoreRequest(id="r", token_ids=[1, 2], top_k=4))),
        Case("zero-length sequence", "INVALID_ARGUMENT", unary(request(sequences=[[1, 2], []]))),
        Case("negative length", "INVALID_ARGUMENT",
             unary(pb.ScoreRequest(id="r", token_ids=[1, 2], lengths=[3, -1], top_k=4))),
        Case("negative token id", "INVALID_ARGUMENT", unary(request(sequences=[[1, -5, 3]]))),
        Case(f"token id = V ({VOCAB})", "INVALID_ARGUMENT", unary(request(sequences=[[1, VOCAB, 3]]))),
        Case("token id = 2^31 - 1", "INVALID_ARGUMENT", unary(request(sequences=[[1, 2**31 - 1]]))),
        Case(f"over-long sequence ({MAX_LEN + 1} > {MAX_LEN} positions)", "INVALID_ARGUMENT",
             unary(request(sequences=[[1] * (MAX_LEN + 1)]))),
        Case(f"over the batch budget ({MAX_BATCH_TOKENS + MAX_LEN} tokens)", "INVALID_ARGUMENT",
             unary(request(sequences=big * (MAX_BATCH_TOKENS // MAX_LEN + 1)))),
        Case("top_k = 0", "INVALID_ARGUMENT", unary(request(top_k=0))),
        Case(f"top_k = V + 1 ({VOCAB + 1})", "INVALID_ARGUMENT", unary(request(top_k=VOCAB + 1))),
        Case("huge k: top_k = 2^32 - 1", "INVALID_ARGUMENT", unary(request(top_k=2**32 - 1))),
        Case("huge m: tail_samples = 2^32 - 1", "INVALID_ARGUMENT", unary(request(tail_samples=2**32 - 1))),
        Case("unknown codec (99)", "INVALID_ARGUMENT", unary(request(codec=99))),
        *[Case(f"temperature = {t}", "INVALID_ARGUMENT", unary(request(temperature=t)))
          for t in (1e-45, float("nan"), float("inf"), -1.0, 1e30)],
        Case("seed = 2^64 - 1, timeout_ms = 2^32 - 1 (valid extremes)", "OK",
             unary(request(seed=2**64 - 1, timeout_ms=2**32 - 1, tail_samples=MAX_TAIL))),
        Case("oversize message (4 MB of token ids)", "RESOURCE_EXHAUSTED",
             unary(request(sequences=[[1] * (1 << 20)]))),
        Case("ScoreStream: empty id, then a good one", "INVALID_ARGUMENT, OK",
             stream_codes([request(""), request("fine")])),
        Case("ScoreStream: the same id twice in flight (the error comes first)", "INVALID_ARGUMENT, OK",
             stream_codes([request("same", big), request("same")])),
        Case("ScoreStream: garbage, then a good request", "INVALID_ARGUMENT, OK", _stream_with_garbage),
        Case("no token", "UNAUTHENTICATED", unary(ok, metadata=())),
        Case("wrong token", "UNAUTHENTICATED", unary(ok, metadata=((AUTHORIZATION_KEY, bearer("guess")),))),
        Case("garbage bytes without a token (never parsed)", "UNAUTHENTICATED", unary(b"\xff" * 64, metadata=())),
        Case("GET /v1/info without a token", "HTTP 401", http_status("/v1/info")),
        Case("GET /metrics with a wrong token", "HTTP 401", http_status("/metrics", "guess")),
        Case("garbage bytes on the gRPC port (not HTTP/2)", "closed by the server",
             raw_tcp(lambda t: int(t.address.rpartition(":")[2]), b"\x16\x03\x01\x00garbage" * 8)),
        Case("garbage bytes on the HTTP port", "HTTP 400", raw_tcp(lambda t: t.http_port, b"\x00\xff garbage\r\n\r\n")),
        Case(f"too many in flight: 12 concurrent calls (limit {MAX_INFLIGHT})", "OK x<=4, RESOURCE_EXHAUSTED",
             concurrent(flood, lambda i: ABUSER)),
        Case("a new atkd-client-id per call, 12 concurrent calls", "OK x<=4, RESOURCE_EXHAUSTED",
             concurrent(flood, lambda i: ABUSER + ((CLIENT_ID_KEY, f"fresh-{i}"),))),
        Case("spoofing the good client's atkd-client-id", "OK",
             unary(ok, metadata=ABUSER + ((CLIENT_ID_KEY, "good"),))),
        Case("a stream that is never read (60 x 1000 tokens)", "flow-controlled", unread_stream),
        Case("padding shape: [128] + 63 x [1] tokens", "OK",
             unary(request(sequences=[list(range(1, MAX_LEN + 1))] + [[7]] * 63))),
        Case("wrong tokenizer hash", "refused by the client", wrong_tokenizer),
    ]


def _stream_with_garbage(target: Target) -> str:
    """A garbage message, then a good request, on one stream (raw bytes both)."""
    with target.channel() as channel:
        call = channel.stream_stream(STREAM)
        replies = call(iter([b"\x0a\x02\xff\xfe", request("fine").SerializeToString()]), metadata=ABUSER, timeout=30)
        responses = [pb.ScoreResponse.FromString(reply) for reply in replies]
    return ", ".join("OK" if r.HasField("signal") else _status_name(r.error.code) for r in responses)


@dataclass
class WellBehaved:
    """A client with its own token streaming 4 batches over and over (2 in flight), checking each signal
    against the first it got for that batch; ``served`` counts its responses, ``errors`` its failures."""

    target: Target
    served: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> WellBehaved:
        self._thread = threading.Thread(target=self._run, name="well-behaved", daemon=True)
        self._thread.start()
        return self

    def _batches(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, VOCAB, (2, 48), generator=generator) for _ in range(4)]
        while not self._stop.is_set():
            yield from batches

    def _run(self) -> None:
        reference: dict[int, torch.Tensor] = {}
        try:
            with TeacherClient(self.target.address, token=TOKENS["good"], client_id="good", timeout=60) as client:
                for index, signal in enumerate(client.score_stream(self._batches(), in_flight=2, top_k=8)):
                    want = reference.setdefault(index % 4, signal.target_logprob)
                    if not torch.allclose(signal.target_logprob, want, atol=1e-4):
                        self.errors.append(f"batch {index}: a signal differs from the first for the same batch")
                    self.served += 1
        except Exception as error:  # noqa: BLE001 -- recorded: any failure of the good client is the finding
            self.errors.append(f"{type(error).__name__}: {error}")

    def wait_for_more(self, than: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.served <= than and not self.errors and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)


@dataclass
class Row:
    case: Case
    received: str
    served: int  # responses of the well-behaved client while the case ran (and until its next response)

    @property
    def as_expected(self) -> bool:
        if self.case.expected.startswith("OK x"):  # some served (timing decides how many), the rest refused
            return self.received.startswith("OK x") and "RESOURCE_EXHAUSTED" in self.received
        return self.received.startswith(self.case.expected)


def run_cases(target: Target, selected: list[Case] | None = None) -> tuple[list[Row], WellBehaved]:
    """Every case in turn beside a :class:`WellBehaved` client; (the rows, the client, stopped)."""
    good = WellBehaved(target).start()
    good.wait_for_more(0)
    rows = []
    for case in selected or cases():
        before = good.served
        received = case.run(target)
        good.wait_for_more(before)
        rows.append(Row(case, received, good.served - before))
    good.stop()
    return rows, good


def table(rows: list[Row], good: WellBehaved) -> str:
    lines = ["| # | request | expected | received | well-behaved client's responses meanwhile |",
             "|---|---|---|---|---|"]
    for number, row in enumerate(rows, 1):
        mark = "" if row.as_expected else " **(unexpected)**"
        lines.append(f"| {number} | {row.case.name} | {row.case.expected} | {row.received}{mark} | {row.served} |")
    lines.append(f"\nwell-behaved client: {good.served} responses, {len(good.errors)} errors"
                 + (f" ({good.errors[:3]})" if good.errors else ""))
    return "\n".join(lines)


def build_tiny_model(directory: Path) -> Path:
    """The tests' tiny Llama (V = 512, 128 positions) with a tokenizer trained on the shipped excerpt."""
    from transformers import AutoModelForCausalLM

    from atkd.student.data.corpus import EXCERPT_PATH
    from atkd.student.data.tokenizer import train_tokenizer
    from atkd.student.models import tiny_config

    tokenizer = train_tokenizer(EXCERPT_PATH.read_text().split("\n\n"), VOCAB, directory / "tokenizer")
    config = tiny_config("llama", VOCAB, hidden=32, layers=2, heads=2, max_len=MAX_LEN)
    torch.manual_seed(0)
    model_dir = directory / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    from atkd.student.demo.teacher_process import teacher_process

    with tempfile.TemporaryDirectory(prefix="atkd-abuse-") as tmp:
        model_dir = build_tiny_model(Path(tmp))
        config = serve_config(write_tokens(Path(tmp)))
        flags = [arg for name, value in config.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
        with teacher_process(model_dir, extra_args=flags) as teacher:
            rows, good = run_cases(Target(teacher.address, teacher.http_port))
            tracebacks = sum("Traceback" in line for line in teacher.log)
        print(table(rows, good))
        print(f"server log: {tracebacks} tracebacks in its last {len(teacher.log)} lines")


if __name__ == "__main__":
    main()
