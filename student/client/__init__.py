"""The student's client of the teacher logit service (``services/teacher``).

:mod:`.client` (:class:`TeacherClient`, :class:`TeacherInfo`), :mod:`.replicas` (one channel per replica,
health and ejection), :mod:`.channel` (one channel: target, balancing, gRPC retries, keepalive, TLS),
:mod:`.batch` (:class:`ScoreBatch`: packing, alignment, unpacking), :mod:`.pending` (:class:`PendingCall`:
deadline per attempt, failover and backoff within a budget), :mod:`.errors` (:class:`TeacherError`,
:class:`TeacherRevisionError`).
"""

from atkd.proto.fingerprint import TeacherMismatchError

from .batch import ScoreBatch, next_token_targets
from .client import TeacherClient, TeacherInfo
from .errors import TeacherError, TeacherRevisionError
from .pending import PendingCall

__all__ = [
    "PendingCall", "ScoreBatch", "TeacherClient", "TeacherError", "TeacherInfo", "TeacherMismatchError",
    "TeacherRevisionError",
    "next_token_targets",
]
