"""The machine-readable readiness record of ``atkd-teacher serve --ready-file PATH``.

Once a replica serves, it writes ``{"pid", "host", "grpc_port", "http_port", "model_id"}`` as JSON to
``PATH`` (a temporary file renamed over it, so a reader never sees half a record) and removes it when it
stops. Whatever starts a server with ``--port 0`` (the demo, the tests, the benchmarks, a supervisor)
polls for this file instead of parsing the log.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ready:
    pid: int
    host: str
    grpc_port: int
    http_port: int
    model_id: str

    @property
    def address(self) -> str:
        """``host:grpc_port`` to connect to (a wildcard bind is reached on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(self.host, self.host)
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"


def write_ready(path: Path, ready: Ready) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(ready), handle)
    os.replace(tmp, path)


def read_ready(path: Path) -> Ready | None:
    """The record at ``path``, or None while there is none."""
    try:
        return Ready(**json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return None


def remove_ready(path: Path | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)
