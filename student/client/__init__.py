"""The student's client of the teacher logit service (``services/teacher``).

:mod:`.client` (:class:`TeacherClient`, :class:`TeacherInfo`), :mod:`.channel` (target, balancing and
retries over replicas), :mod:`.batch` (:class:`ScoreBatch`: packing, alignment, unpacking),
:mod:`.pending` (:class:`PendingScore`: retries with backoff), :mod:`.errors` (:class:`TeacherError`).
"""

from atkd.proto.fingerprint import TeacherMismatchError

from .batch import ScoreBatch, next_token_targets
from .client import TeacherClient, TeacherInfo
from .errors import TeacherError
from .pending import PendingScore

__all__ = [
    "PendingScore", "ScoreBatch", "TeacherClient", "TeacherError", "TeacherInfo", "TeacherMismatchError",
    "next_token_targets",
]
