"""``torchrun ... -m tests.torchrun_teacher_fault train --config RUN.json``: ``atkd-student train`` under torchrun
where rank 1 alone loses its teacher (the fault of ``test_faults.test_under_torchrun_...``).

Rank 1 is pointed at its own replica, ``$ATKD_TEST_RANK1_TEACHER`` (``host:port``, process id
``$ATKD_TEST_RANK1_PID``), which is SIGKILLed just before rank 1 submits micro-batch ``$ATKD_TEST_FAULT_AT``,
once the batches before it are answered; rank 0 keeps the config's replicas, which stay healthy.
"""

from __future__ import annotations

import os
import signal
import sys

from atkd.student.trainer import cli, loop
from tests.teacher_harness import wait_until
from tests.test_faults import FaultAt


def _rank1_loses_its_teacher() -> None:
    address, pid, at = (os.environ["ATKD_TEST_RANK1_TEACHER"], int(os.environ["ATKD_TEST_RANK1_PID"]),
                        int(os.environ["ATKD_TEST_FAULT_AT"]))
    build = loop.build_teacher

    def kill_once_answered():
        wait_until(lambda: all(result.call.done() for result in source.submitted), what="the batches in flight")
        os.kill(pid, signal.SIGKILL)

    def rank1_teacher(config, *args, **kwargs):
        nonlocal source
        source = FaultAt(build(config.model_copy(update={"addresses": [address]}), *args, **kwargs), at,
                         kill_once_answered)
        return source

    source = None
    loop.build_teacher = rank1_teacher


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        _rank1_loses_its_teacher()
    cli.main(sys.argv[1:])
