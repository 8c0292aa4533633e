"""How many torch threads a training process uses when its config leaves ``threads`` unset, and when to warn.

torch's default, one intra-op thread per core, assumes the process has the machine to itself. On a small
machine shared with a teacher server, other ranks or other jobs, its threads wait on each other at every
parallel region: on 2 cores under load, 2 threads took 6-8 s a step where 1 thread took about 2 s. So with
``threads`` unset a rank takes its share of the cores that this job does not already give away:

    threads = max(1, (cores - 1 if a teacher server runs on this machine else cores) // ranks_here)

``cores`` are the CPUs this process may run on (its affinity), ``ranks_here`` the ranks of this job on the
machine (torchrun's ``LOCAL_WORLD_SIZE``), and a teacher server runs here when one of ``teacher.addresses``
is a loopback address, ``localhost`` or a unix socket. (A ``local`` teacher computes in the training thread,
one after the other with the student, and takes no core of its own.)

The choice depends on the job and the machine only, not on the moment: the thread count changes how float
sums are split, so a choice that followed the load would make two runs of one config differ in their last
bits, and a resumed run differ from an uninterrupted one. Other processes are judged by the load average
instead: when it says they keep fewer cores free than the threads asked for, the job warns and names the
count that fits (``threads`` set or not). The load average does not yet see jobs started at the same
moment: when you start several at once, give each a ``threads`` so that they add up to the cores.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """What the choice depends on: the usable ``cores``, this job's ``ranks_here`` and whether a teacher server
    computes on this machine (``teacher_here``); and, for the warning only, the 1-minute ``load`` average."""

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

    def share(self, busy: int) -> int:
        """Threads per rank when ``busy`` cores are taken by others (at least 1)."""
        return max(1, (self.cores - busy) // self.ranks_here)


def choose_threads(machine: Machine) -> int:
    """Torch threads per rank when none are configured: the cores less one for a teacher server here, shared by
    the ranks here, at least 1."""
    return machine.share(int(machine.teacher_here))


def plan_threads(configured: int | None, machine: Machine) -> tuple[int, str, bool]:
    """``(threads, message, is_warning)``: ``configured`` when set, else :func:`choose_threads`; a warning when
    the load average leaves fewer free cores than that, naming the count that fits."""
    threads = configured or choose_threads(machine)
    plural = "s" if machine.ranks_here > 1 else ""
    if configured is None:
        teacher = ", less one for the teacher server on this machine" if machine.teacher_here else ""
        message = (f"threads unset: {threads} torch thread{'s' if threads > 1 else ''} per rank ({machine.cores} "
                   f"cores{teacher}, {machine.ranks_here} rank{plural} here); set threads to choose")
    else:
        message = f"threads={threads} ({machine.cores} cores, {machine.ranks_here} rank{plural} here)"
    fits = machine.share(max(round(machine.load), int(machine.teacher_here)))
    if threads <= fits:
        return threads, message, False
    return threads, (f"{message}; but the load average ({machine.load:.1f}) says other processes keep only "
                     f"{max(0, machine.cores - round(machine.load))} of the cores free: torch threads that compete for "
                     f"cores make steps several times slower, set threads={fits} while they run"), True


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
