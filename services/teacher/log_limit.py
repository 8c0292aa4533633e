"""Log a recurring cause once per interval: hostile or broken callers must not flood the replica's log.

The first occurrence of a cause is logged at once; the repeats within ``interval_s`` are counted and
reported with the next one logged after the interval (``... (37 more since the last report)``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """``warning(cause, message, *args)``: logs through ``logger`` at most once per ``cause`` per ``interval_s``."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_causes: int = 1024):
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._max_causes = max_causes
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, cause: str) -> tuple[bool, int]:
        """(whether to log this occurrence of ``cause`` now, repeats held back since its last report)."""
        now = self._clock()
        last = self._last.get(cause)
        if last is not None and now - last < self._interval_s:
            self._held[cause] = self._held.get(cause, 0) + 1
            return False, 0
        if last is None and len(self._last) >= self._max_causes:  # bounded memory whatever the causes
            self._last.clear()
            self._held.clear()
        self._last[cause] = now
        return True, self._held.pop(cause, 0)

    def warning(self, cause: str, message: str, *args) -> None:
        log_now, held = self.allow(cause)
        if log_now:
            suffix = f" ({held} more since the last report)" if held else ""
            self._logger.warning(message + suffix, *args)


class RateLimitFilter(logging.Filter):
    """A :class:`logging.Filter` that lets each message template through once per ``interval_s`` (for a
    library's logger whose messages we do not write, e.g. uvicorn's "Invalid HTTP request received.")."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._limit = RateLimitedLog(logging.getLogger(__name__), interval_s, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        log_now, held = self._limit.allow(f"{record.name}:{record.msg}")
        if log_now and held:
            record.msg = f"{record.msg} ({held} more since the last report)"
        return log_now
