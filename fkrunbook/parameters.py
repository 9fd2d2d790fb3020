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

# lock_timeout and statement_timeout are int4 server settings, so a larger
# value would fail only at SET LOCAL, after the pre-flight. No other integer
# parameter has a use for a value that large either.
MAX_INTEGER = 2_147_483_647


def to_bool(name: str, value) -> bool:
    """Return ``value`` as a bool, accepting True/False and their spellings."""
    reject_secret_parameter(name, value)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ParameterError(
        f"{name} must be True or False, got {value!r}; with papermill use "
        f"-p {name} False or -y '{name}: false'."
    )


def to_int(name: str, value, minimum: int = 0) -> int:
    """Return ``value`` as an int from ``minimum`` to ``MAX_INTEGER``."""
    reject_secret_parameter(name, value)
    if isinstance(value, bool):
        raise ParameterError(f"{name} must be an integer, got {value!r}.")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ParameterError(f"{name} must be an integer, got {value!r}.") from None
    if number < minimum:
        raise ParameterError(f"{name} must be at least {minimum}, got {number}.")
    if number > MAX_INTEGER:
        raise ParameterError(
            f"{name} must be at most {MAX_INTEGER} (PostgreSQL's integer "
            f"maximum), got {number}."
        )
    return number


def to_uuid(name: str, value) -> str:
    """Return ``value`` as a canonical uuid string."""
    reject_secret_parameter(name, value)
    try:
        return str(uuid.UUID(str(value).strip()))
    except ValueError:
        raise ParameterError(
            f"{name} must be a uuid such as 00000000-0000-0000-0000-000000000000, "
            f"got {value!r}."
        ) from None


def reject_secrets(parameters: dict) -> None:
    """Raise if any parameter carries a connection string with a password.

    Lists, tuples, sets and dicts (keys and values) are searched at any
    depth, since error messages may repeat any part of a parameter.
    """
    for name, value in parameters.items():
        for item in _leaves(value):
            reject_secret_parameter(name, item)


def _leaves(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(key)
            yield from _leaves(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, (bytes, bytearray)):
        yield value.decode("utf-8", errors="replace")
    else:
        yield value


def check_gate(conn: psycopg.Connection, dry_run: bool, confirm) -> str:
    """Return ``"dry run"`` or ``"apply"``; raise ``GateError`` on a bad confirmation.

    A change needs ``dry_run=False`` and ``confirm`` equal to the target's
    ``current_database()``, so a run aimed at the wrong server stops here.
    """
    # The message below repeats confirm, so it must not contain a password.
    reject_secret_parameter("confirm", confirm)
    if dry_run:
        return "dry run"
    database = conn.execute("SELECT current_database()").fetchone()[0]
    if confirm != database:
        given = "nothing" if confirm in (None, "") else repr(confirm)
        raise GateError(
            f"A change needs confirmation, but confirm is {given}, not the "
            f"target database {database!r}, so nothing was changed. Check "
            f"that the target is the database you mean to change, then set "
            f"confirm={database!r} (--confirm {database} on the command line)."
        )
    return "apply"
