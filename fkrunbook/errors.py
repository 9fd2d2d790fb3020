"""Exceptions raised by the runbook.

Each message names what failed, the value, and what to do next. Errors
from the server are not wrapped: they reach the caller as psycopg raised
them, with their SQLSTATE class and diagnostics.
"""


class RunbookError(Exception):
    """A runbook step could not go on; nothing was changed by this step."""


class ParameterError(RunbookError, ValueError):
    """A notebook or CLI parameter is invalid."""


class TargetError(RunbookError):
    """The target database could not be reached or is not the expected one."""


class GateError(RunbookError):
    """A change was requested without the confirmation that allows it."""


class PreflightError(RunbookError):
    """A pre-flight check found data or state that the change would break."""


class LockRetriesExhausted(RunbookError):
    """A DDL step timed out waiting for its lock on every attempt."""

    def __init__(self, message: str, blockers: list[dict], attempts: int):
        super().__init__(message)
        self.blockers = blockers
        self.attempts = attempts


class ConcurrentRunError(RunbookError):
    """Another run holds the runbook's advisory lock on this database."""


class VerificationError(RunbookError):
    """The app's insert still fails, or the history does not show the attempt."""
