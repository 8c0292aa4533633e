"""Helpers of the teacher-service tests: a replica on a background event loop, a gated engine, HTTP and polling."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from atkd.proto.signal import TeacherSignal, compress
from atkd.services.teacher.config import TeacherConfig
from atkd.services.teacher.engine import TeacherEngine
from atkd.services.teacher.request import ScoreJob
from atkd.services.teacher.server import TeacherServer

_loop: asyncio.AbstractEventLoop | None = None


def server_loop() -> asyncio.AbstractEventLoop:
    """The event loop, running in a daemon thread, of every in-process server of the test session.

    One loop for all, as grpc.aio expects a single event loop per process.
    """
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, name="test-servers", daemon=True).start()
    return _loop


class ServerThread:
    """A :class:`TeacherServer` on the shared :func:`server_loop`, driven from a synchronous test."""

    def __init__(self, config: TeacherConfig, load_engine: Callable[[], Any] | None = None):
        self.loop = server_loop()
        self.server = TeacherServer(config, load_engine)

    def run(self, coroutine: Coroutine, timeout: float = 30.0) -> Any:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start_soon(self, coroutine: Coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def start(self) -> ServerThread:
        self.run(self.server.start())
        return self

    def close(self, grace: float = 0.0) -> None:
        self.run(self.server.stop(grace))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def http(self, path: str) -> tuple[int, Any]:
        return http_get(self.server.http_port, path)


def http_get(port: int, path: str) -> tuple[int, Any]:
    """(status, body) of ``GET path`` on 127.0.0.1:port (the body JSON-decoded when it is JSON)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            status, body, kind = reply.status, reply.read(), reply.headers.get_content_type()
    except urllib.error.HTTPError as error:
        status, body, kind = error.code, error.read(), error.headers.get_content_type()
    return status, json.loads(body) if kind == "application/json" else body.decode()


class GatedEngine:
    """A :class:`TeacherEngine` whose ``score`` waits for ``gate`` and records every job it computed."""

    def __init__(self, engine: TeacherEngine):
        self.engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.computed: list[ScoreJob] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def score(self, jobs: Sequence[ScoreJob]) -> list[TeacherSignal]:
        self.entered.set()
        self.gate.wait(30)
        self.computed.extend(jobs)
        return self.engine.score(jobs)


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` every 5 ms until it is truthy; its value, or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return value


def reference_signals(model_dir, sequences: Sequence[Sequence[int]], k: int, temperature: float = 1.0):
    """compress() run locally, sequence by sequence: per sequence (log_softmax [L-1, V], signal [L-1])."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for seq in sequences:
            ids = torch.tensor(seq).unsqueeze(0)
            logits = model(ids).logits[0, :-1]
            targets = ids[0, 1:]
            out.append(((logits / temperature).log_softmax(-1), compress(logits, targets, k, temperature)))
    return out
