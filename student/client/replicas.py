"""The teacher replicas a client knows, one channel each, and which of them is healthy now.

A client given several addresses opens one channel per address (:func:`~.channel.open_channel`) and picks
the replica of each call itself, round robin over the healthy ones. A replica whose call failed (gone,
restarting, hung past the call's deadline, shedding load: :data:`~.pending.FAILOVER`) is *ejected*: no
new call goes to it for ``eject_s`` seconds, doubling with each failure in a row up to ``max_eject_s``.
When the period ends, an ``Info`` call with a short deadline (``probe_timeout_s``) probes it in the
background: answered, the replica is readmitted; not, it stays ejected for the next, doubled period.
So a dead or hung replica costs the calls it held when it failed, not one attempt per call or per
period. (A replica that answers ``Info`` but is too slow for real work is readmitted and ejected again
after one more missed deadline, for a longer period each time.) A call that succeeds clears the record.
When every replica is ejected, calls go to the one whose period ends first (after the caller's backoff).

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

from atkd.proto import teacher_pb2 as pb
from atkd.proto import teacher_pb2_grpc as pb_grpc

from .channel import open_channel


@dataclass(eq=False)
class Endpoint:
    """One replica's address, its channel and stub, and its health: consecutive ``failures`` (ejected while
    > 0), the end of its ejection period ``ejected_until`` (monotonic s), and the ``probe`` in flight."""

    address: str
    channel: grpc.Channel = field(repr=False)
    stub: pb_grpc.TeacherStub = field(repr=False)
    failures: int = 0
    ejected_until: float = 0.0
    probe: grpc.Future | None = field(default=None, repr=False)


class Replicas:
    """The replicas of ``addresses`` (a list of ``host:port``, or one address of any form, see the module)."""

    def __init__(self, addresses: str | Sequence[str], *, tls_root_cert: Path | bytes | bool | None = None,
                 keepalive_s: float = 30.0, metadata: tuple[tuple[str, str], ...] = (), eject_s: float = 1.0,
                 max_eject_s: float = 30.0, probe_timeout_s: float = 5.0):
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
        self.metadata = metadata
        self.eject_s = eject_s
        self.max_eject_s = max_eject_s
        self.probe_timeout_s = probe_timeout_s
        self._turn = 0
        self._lock = threading.RLock()  # a probe that is done at once calls back under pick()

    def __str__(self) -> str:
        return ", ".join(endpoint.address for endpoint in self.all)

    def pick(self, avoid: Collection[Endpoint] = ()) -> tuple[Endpoint, bool]:
        """The next replica round robin that is healthy and not in ``avoid``, and True; when there is none,
        the one whose ejection ends first, and False (the caller should back off before using it)."""
        with self._lock:
            now = time.monotonic()
            count = len(self.all)
            for endpoint in self.all:
                if endpoint.failures and endpoint.ejected_until <= now and endpoint.probe is None:
                    self._start_probe(endpoint)
            for offset in range(count):
                endpoint = self.all[(self._turn + offset) % count]
                if not endpoint.failures and endpoint not in avoid:
                    self._turn = (self._turn + offset + 1) % count
                    return endpoint, True
            return min(self.all, key=lambda r: r.ejected_until), False

    def failed(self, endpoint: Endpoint) -> float:
        """Eject ``endpoint`` after a failed call; returns for how many seconds."""
        with self._lock:
            return self._eject(endpoint)

    def succeeded(self, endpoint: Endpoint) -> None:
        with self._lock:
            endpoint.failures, endpoint.ejected_until = 0, 0.0

    def _eject(self, endpoint: Endpoint) -> float:
        endpoint.failures += 1
        period = min(self.eject_s * 2 ** (endpoint.failures - 1), self.max_eject_s)
        endpoint.ejected_until = time.monotonic() + period
        return period

    def _start_probe(self, endpoint: Endpoint) -> None:
        endpoint.probe = endpoint.stub.Info.future(pb.InfoRequest(), metadata=self.metadata,
                                                   timeout=self.probe_timeout_s)
        endpoint.probe.add_done_callback(lambda probe: self._probed(endpoint, probe))

    def _probed(self, endpoint: Endpoint, probe: grpc.Future) -> None:
        """The probe's answer (on a gRPC thread): readmit the replica, or eject it for a longer period."""
        with self._lock:
            if endpoint.probe is not probe:
                return
            endpoint.probe = None
            if not endpoint.failures:  # a call succeeded meanwhile
                return
            if probe.cancelled() or probe.exception() is not None:
                self._eject(endpoint)
            else:
                endpoint.failures, endpoint.ejected_until = 0, 0.0

    def close(self) -> None:
        for endpoint in self.all:
            if endpoint.probe is not None:
                endpoint.probe.cancel()
            endpoint.channel.close()
