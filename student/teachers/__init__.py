"""Teacher sources: one interface, three places the signal comes from.

- :class:`LocalTeacher` (:mod:`.local`): the teacher model in this process; dense logits ``[B, T, V]``
  or, with ``top_k`` set, the compressed :class:`~atkd.proto.signal.TeacherSignal`.
- :class:`RemoteTeacher` (:mod:`.remote`): a teacher server (one or more replicas) behind a
  :class:`~atkd.student.client.TeacherClient`.
- :class:`CachedTeacher` (:mod:`.cache`): signals exported to disk earlier by :func:`export_signals`.

Each is a :class:`TeacherSource` (:mod:`.source`), called as ``teacher(batch, seed=None)``, or
``teacher.submit(batch, seed=None).result()`` when the caller wants to start the work early (a remote
teacher computes while the student trains; the others compute or read when the result is asked for).
Each returns a :data:`~atkd.student.losses.TeacherInput`; the losses cannot tell the sources apart.
:func:`prefetched` (:mod:`.prefetch`) keeps a source busy on the next batches while the caller trains
on the current one.
"""

from .cache import CachedTeacher, CacheManifest, CacheMismatchError, SignalCache, export_signals
from .local import LocalTeacher
from .prefetch import prefetched
from .remote import RemoteTeacher
from .source import Deferred, Pending, TeacherSource

__all__ = [
    "CacheManifest", "CacheMismatchError", "CachedTeacher", "Deferred", "LocalTeacher", "Pending", "RemoteTeacher",
    "SignalCache", "TeacherSource", "export_signals", "prefetched",
]
