"""The student's client of the teacher logit service (``services/teacher``)."""

from .teacher_client import (
    ScoreBatch,
    TeacherClient,
    TeacherError,
    TeacherInfo,
    TeacherMismatchError,
    next_token_targets,
)

__all__ = ["ScoreBatch", "TeacherClient", "TeacherError", "TeacherInfo", "TeacherMismatchError", "next_token_targets"]
