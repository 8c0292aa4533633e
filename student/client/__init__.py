"""The student's client of the teacher logit service (``services/teacher``)."""

from .teacher_client import (
    PendingScore,
    ScoreBatch,
    TeacherClient,
    TeacherError,
    TeacherInfo,
    TeacherMismatchError,
    next_token_targets,
)

__all__ = [
    "PendingScore", "ScoreBatch", "TeacherClient", "TeacherError", "TeacherInfo", "TeacherMismatchError",
    "next_token_targets",
]
