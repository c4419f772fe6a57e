"""Errors the user can fix. The CLI prints their message (one paragraph: the problem and the fix) and exits 2.

Every check that can run before heavy work raises one of these, so a bad flag, path or file stops a job
in seconds with advice instead of a traceback minutes later.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input or files; ``str(err)`` says what is wrong and how to fix it."""


class TrainingDivergedError(UserError, RuntimeError):
    """A training loss became NaN or infinite; the message names the stage, layer and step."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, truncated, corrupt, or was written with different settings."""


class MissingPathError(UserError, FileNotFoundError):
    """A model or data path that does not exist or is not what the command needs."""
