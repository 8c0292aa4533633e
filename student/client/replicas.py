"""The teacher replicas a client knows, one channel each, and which of them is healthy now.

A client given several addresses opens one channel per address (:func:`~.channel.open_channel`) and picks
the replica of each call itself, round robin over the healthy ones. A replica whose call failed with a
:data:`~.channel.RETRYABLE` status (gone, restarting, hung past the call's deadline, shedding load) is
*ejected*: no new call goes to it for ``eject_s`` seconds, doubling with each failure in a row up to
``max_eject_s``; its next call after that is the probe that readmits it (a success clears its record).
So a dead or hung replica costs one failed attempt per ejection period, not one per call.

One address (``host:port``, ``unix:...`` or ``dns:///name:port`` whose resolver returns every replica
behind the name) is one channel, balanced and retried by gRPC itself across what the name resolves to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from atkd.proto import teacher_pb2_grpc as pb_grpc

from .channel import open_channel


@dataclass(eq=False)
class Endpoint:
    """One replica's address, its channel and stub, and its health (consecutive ``failures``, ``ejected_until``)."""

    address: str
    channel: grpc.Channel = field(repr=False)
    stub: pb_grpc.TeacherStub = field(repr=False)
    failures: int = 0
    ejected_until: float = 0.0

    def healthy(self, now: float) -> bool:
        return self.ejected_until <= now


class Replicas:
    """The replicas of ``addresses`` (a list of ``host:port``, or one address of any form, see the module)."""

    def __init__(self, addresses: str | Sequence[str], *, tls_root_cert: Path | bytes | bool | None = None,
                 keepalive_s: float = 30.0, eject_s: float = 1.0, max_eject_s: float = 30.0):
        addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not addresses:
            raise ValueError("no teacher address given")
        # One replica: gRPC's own retries stay on (they span what a dns:/// name resolves to); several:
        # the client fails over itself, so a dead replica costs one attempt, not gRPC's five.
        retries = len(addresses) == 1
        self.all = [Endpoint(address, channel, pb_grpc.TeacherStub(channel))
                    for address in addresses
                    for channel in [open_channel(address, tls_root_cert=tls_root_cert, keepalive_s=keepalive_s,
                                                 retries=retries)]]
        self.eject_s = eject_s
        self.max_eject_s = max_eject_s
        self._turn = 0
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return ", ".join(replica.address for replica in self.all)

    def pick(self, avoid: Collection[Endpoint] = ()) -> tuple[Endpoint, bool]:
        """The next replica round robin that is healthy and not in ``avoid``, and True; when there is none,
        the one whose ejection ends first, and False (the caller should back off before using it)."""
        with self._lock:
            now = time.monotonic()
            count = len(self.all)
            for offset in range(count):
                replica = self.all[(self._turn + offset) % count]
                if replica.healthy(now) and replica not in avoid:
                    self._turn = (self._turn + offset + 1) % count
                    return replica, True
            return min(self.all, key=lambda r: r.ejected_until), False

    def failed(self, endpoint: Endpoint) -> float:
        """Eject ``endpoint`` after a failed call; returns for how many seconds."""
        with self._lock:
            endpoint.failures += 1
            period = min(self.eject_s * 2 ** (endpoint.failures - 1), self.max_eject_s)
            endpoint.ejected_until = time.monotonic() + period
            return period

    def succeeded(self, endpoint: Endpoint) -> None:
        with self._lock:
            endpoint.failures, endpoint.ejected_until = 0, 0.0

    def close(self) -> None:
        for replica in self.all:
            replica.channel.close()
