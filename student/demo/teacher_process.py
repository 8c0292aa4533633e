"""Run a teacher server (``atkd-teacher serve``) as a child process on loopback, for the demo, tests and benchmarks.

The student never imports ``atkd.services``: it starts the server's CLI in a subprocess with
``--port 0 --http-port 0 --ready-file F``, waits for the readiness record the server writes to ``F`` once
it serves (pid and the ports it bound, :mod:`atkd.services.teacher.ready`'s JSON), and stops it with
SIGTERM (graceful: in-flight work finishes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TeacherProcess:
    """A running ``atkd-teacher serve`` child: its ports, the process and the last lines of its log."""

    address: str
    http_port: int
    process: subprocess.Popen
    log: list[str]
    _reader: threading.Thread

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), wait for the exit and the end of its log; returns the exit code."""
        self.process.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reader.join(5)
        return code


@contextmanager
def teacher_server(model_dir: Path, *, log_path: Path | None = None, extra_args: Sequence[str] = (),
                   start_timeout_s: float = 120.0, launcher: Sequence[str] = ()) -> Iterator[str]:
    """Start ``atkd-teacher serve --model DIR`` on free loopback ports; yield its gRPC address
    ``127.0.0.1:PORT`` once it serves. Its log goes to ``log_path`` (or is dropped); ``launcher`` prefixes
    the command (e.g. ``["taskset", "-c", "0"]`` to pin the teacher to a core)."""
    with teacher_process(model_dir, log_path=log_path, extra_args=extra_args, start_timeout_s=start_timeout_s,
                         launcher=launcher) as teacher:
        yield teacher.address


@contextmanager
def teacher_process(
    model_dir: Path, *, log_path: Path | None = None, extra_args: Sequence[str] = (), start_timeout_s: float = 120.0,
    launcher: Sequence[str] = (),
) -> Iterator[TeacherProcess]:
    """:func:`teacher_server` yielding the whole :class:`TeacherProcess` (to signal or kill it in a drill)."""
    with tempfile.TemporaryDirectory(prefix="atkd-teacher-") as tmp:
        ready_file = Path(tmp) / "ready.json"
        command = [*launcher, sys.executable, "-m", "atkd.services.teacher.cli", "serve", "--model", str(model_dir),
                   "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--ready-file", str(ready_file),
                   *extra_args]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        lines: list[str] = []

        def read_log() -> None:
            with open(log_path or os.devnull, "w") as sink:
                for line in process.stderr:
                    sink.write(line)
                    sink.flush()
                    lines.append(line)
                    del lines[:-50]

        reader = threading.Thread(target=read_log, daemon=True)
        reader.start()
        teacher = None
        try:
            ready = _wait_for(ready_file, process, start_timeout_s)
            if ready is None:
                reader.join(5)
                raise RuntimeError(f"the teacher server did not start (exit code {process.poll()}):\n{''.join(lines)}")
            teacher = TeacherProcess(f"127.0.0.1:{ready['grpc_port']}", ready["http_port"], process, lines, reader)
            yield teacher
        finally:
            if teacher is not None:
                teacher.stop()
            else:
                process.kill()
                process.wait()
                reader.join(5)


def _wait_for(ready_file: Path, process: subprocess.Popen, timeout_s: float) -> dict | None:
    """The readiness record once ``process`` wrote it; None if it exited or ``timeout_s`` ran out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if ready_file.is_file():  # written atomically (renamed into place): complete when it exists
            return json.loads(ready_file.read_text())
        time.sleep(0.05)
    return None
