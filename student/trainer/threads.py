"""How many torch threads a training process uses when its config leaves ``threads`` unset.

torch's default, one intra-op thread per core, assumes the process has the machine to itself. On a small
machine shared with a teacher server, other ranks or other jobs, its threads wait on each other at every
parallel region: on 2 cores under load, 2 threads took 6-8 s a step where 1 thread took about 2 s. So with
``threads`` unset the job takes the cores that look free:

    threads = max(1, (cores - busy) // ranks_here)
    busy    = max(round(load average over the last minute), 1 if a teacher server runs on this machine)

``cores`` are the CPUs this process may run on (its affinity), ``ranks_here`` the ranks of this job on the
machine (torchrun's ``LOCAL_WORLD_SIZE``), and a teacher server runs here when one of ``teacher.addresses``
is a loopback address, ``localhost`` or a unix socket. (A ``local`` teacher runs in the training thread,
one after the other with the student, so it takes no core of its own.) The load average does not yet see
jobs started at the same moment: when you start several at once, give each a ``threads`` so that they add up
to the cores. A ``threads`` that is set is used as given, with a warning when it is more than the free cores.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """What the choice depends on: the usable ``cores``, the 1-minute ``load`` average, this job's
    ``ranks_here`` and whether a teacher server computes on this machine (``teacher_here``)."""

    cores: int
    load: float = 0.0
    ranks_here: int = 1
    teacher_here: bool = False

    @classmethod
    def here(cls, teacher_addresses: Sequence[str] = ()) -> Machine:
        """This machine, now, for a job whose teacher server is at ``teacher_addresses`` (none: no server)."""
        return cls(cores=len(os.sched_getaffinity(0)), load=os.getloadavg()[0],
                   ranks_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                   teacher_here=any(map(is_this_machine, teacher_addresses)))

    @property
    def busy(self) -> int:
        """Cores taken by others: the rounded load average, at least one for a teacher server here."""
        return max(round(self.load), int(self.teacher_here))

    @property
    def free(self) -> int:
        """Cores left to this job (at least one)."""
        return max(1, self.cores - self.busy)

    def describe(self) -> str:
        teacher = ", a teacher server on this machine" if self.teacher_here else ""
        return (f"{self.free} of {self.cores} cores free (load {self.load:.1f}{teacher}), "
                f"{self.ranks_here} rank{'s' if self.ranks_here > 1 else ''} of this job here")


def choose_threads(machine: Machine) -> int:
    """Torch threads per rank when none are configured: the free cores shared by the ranks, at least 1."""
    return max(1, machine.free // machine.ranks_here)


def plan_threads(configured: int | None, machine: Machine) -> tuple[int, str, bool]:
    """``(threads, message, is_warning)``: ``configured`` when set (a warning if it is more than this rank's
    share of the free cores), else :func:`choose_threads`."""
    share = choose_threads(machine)
    if configured is None:
        return share, (f"threads unset: {share} torch thread{'s' if share > 1 else ''} per rank "
                       f"({machine.describe()}); set threads to choose"), False
    if configured > share:
        return configured, (f"threads={configured} is more than this rank's {share} ({machine.describe()}): "
                            "torch threads on busy cores wait on each other and steps can take several times "
                            f"longer; threads={share} avoids it"), True
    return configured, f"threads={configured} ({machine.describe()})", False


def is_this_machine(address: str) -> bool:
    """Whether a gRPC target (``host:port``, ``[v6]:port``, ``dns:///host:port``, ``ipv4:...``, ``unix:...``)
    points at this machine by a loopback address or ``localhost``."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = address.split("///", 1)[-1] if "///" in address else address
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        target = target.removeprefix(scheme)
    target = target.split(",")[0]
    host = target[1:target.index("]")] if target.startswith("[") else target.rsplit(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
