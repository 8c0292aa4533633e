"""Fault injection for drills and tests, off by default: a replica made slow on purpose.

``ATKD_TEACHER_FAULT_DELAY_S=2.5 atkd-teacher serve ...`` sleeps 2.5 s on the engine's worker thread
before every batch, so that a test can show what a client does with a slow (not dead, not hung) replica:
its per-attempt deadline fires and the batch moves to another replica. Never set it in production; the
replica logs a warning at start when it is set.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

#: Seconds every batch is delayed by (a test / fault-injection knob; unset or 0: no delay).
FAULT_DELAY_ENV = "ATKD_TEACHER_FAULT_DELAY_S"

Compute = TypeVar("Compute", bound=Callable)


def with_injected_delay(compute: Compute) -> Compute:
    """``compute`` itself, or, when :data:`FAULT_DELAY_ENV` is set > 0, ``compute`` delayed by that many seconds."""
    delay = float(os.environ.get(FAULT_DELAY_ENV) or 0)
    if delay <= 0:
        return compute
    log.warning("fault injection: every batch is delayed by %g s (%s is set)", delay, FAULT_DELAY_ENV)

    def delayed(*args, **kwargs):
        time.sleep(delay)
        return compute(*args, **kwargs)

    return delayed  # type: ignore[return-value]
