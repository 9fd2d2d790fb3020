"""Validate notebook parameters and guard changes behind a named confirmation.

papermill's ``-p`` passes strings ("False", "1") and ``-y`` passes YAML
types, so every coercion accepts both and rejects anything else.
"""

from __future__ import annotations

import uuid

import psycopg

from .connection import reject_secret_parameter
from .errors import GateError, ParameterError

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def to_bool(name: str, value) -> bool:
    """Return ``value`` as a bool, accepting True/False and their spellings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ParameterError(
        f"{name} must be True or False, got {value!r}; with papermill use "
        f"-p {name} False or -y '{name}: false'."
    )


def to_int(name: str, value, minimum: int = 0) -> int:
    """Return ``value`` as an int of at least ``minimum``."""
    if isinstance(value, bool):
        raise ParameterError(f"{name} must be an integer, got {value!r}.")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ParameterError(f"{name} must be an integer, got {value!r}.") from None
    if number < minimum:
        raise ParameterError(f"{name} must be at least {minimum}, got {number}.")
    return number


def to_uuid(name: str, value) -> str:
    """Return ``value`` as a canonical uuid string."""
    try:
        return str(uuid.UUID(str(value).strip()))
    except ValueError:
        raise ParameterError(
            f"{name} must be a uuid such as 00000000-0000-0000-0000-000000000000, "
            f"got {value!r}."
        ) from None


def reject_secrets(parameters: dict) -> None:
    """Raise if any parameter carries a connection string with a password."""
    for name, value in parameters.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            reject_secret_parameter(name, item)


def check_gate(conn: psycopg.Connection, dry_run: bool, confirm) -> str:
    """Return ``"dry run"`` or ``"apply"``; raise ``GateError`` on a bad confirmation.

    A change needs ``dry_run=False`` and ``confirm`` equal to the target's
    ``current_database()``, so a run aimed at the wrong server stops here.
    """
    if dry_run:
        return "dry run"
    database = conn.execute("SELECT current_database()").fetchone()[0]
    if confirm != database:
        shown = "nothing" if confirm in (None, "") else repr(confirm)
        raise GateError(
            f"dry_run is False but confirm is {shown}, not the target "
            f"database {database!r}, so nothing was changed. Check that the "
            f"target is the database you mean to change, then set "
            f"confirm={database!r}."
        )
    return "apply"
