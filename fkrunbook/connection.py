"""Resolve the target database from the environment and connect to it.

The target is never a notebook parameter, because papermill writes every
parameter into the executed notebook. It comes from ``DATABASE_URL`` or
from libpq's own variables (``PGHOST``, ``PGSERVICE``, ...), the service
file and ``.pgpass``. With none of them set, the runbook starts a throwaway
embedded PostgreSQL loaded with the incident-state fixture (demo mode).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ParameterError, TargetError

logger = logging.getLogger(__name__)

# libpq variables that select a server or database; any of them set means
# the user chose a target. PGPASSWORD alone selects nothing.
TARGET_VARIABLES = (
    "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE",
    "PGSERVICEFILE",
)

# Set by the chain for the notebooks it runs on its own demo server.
DEMO_URL_VARIABLE = "FKRUNBOOK_DEMO_URL"

APPLICATION_NAME = "fkrunbook"

_URL_WITH_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/@\s:]*:[^@\s]+@", re.I)
# Also matches PGPASSWORD=..., db_password: ... and "password": "..." (JSON).
_KEYWORD_PASSWORD = re.compile(r"password[\"']?\s*[=:]", re.I)
# The password of a URL's user information, to mask it in messages.
_URL_USERINFO_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/@\s:]*:)[^@\s]+@", re.I)
_CONNINFO_PASSWORD = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)", re.I)
MASK = "********"

# Hints by libpq's message (the server's messages are those of lc_messages,
# English by default); the first matching pattern wins.
_CONNECT_HINTS = (
    (re.compile(r"password authentication failed|no password supplied|"
                r"SASL authentication|SCRAM", re.I),
     "The server did not accept the login: set the user's password in "
     "PGPASSWORD, .pgpass or the service file, and check the user name."),
    (re.compile(r'database "[^"]*" does not exist', re.I),
     "That database does not exist on the server: check PGDATABASE or the "
     "database name in DATABASE_URL, or create the database first."),
    (re.compile(r'role "[^"]*" does not exist', re.I),
     "That user does not exist on the server: check PGUSER or the user in "
     "DATABASE_URL."),
    (re.compile(r"Connection refused|could not translate host name|"
                r"No such file or directory|timeout expired|"
                r"Network is unreachable", re.I),
     "No server answered there: check the host and port (PGHOST, PGPORT or "
     "DATABASE_URL) and that the server is running and reachable."),
)
_DEFAULT_HINT = ("Check the host, port, database and user, and that the "
                 "password is in PGPASSWORD, .pgpass or the service file.")


@dataclass
class Target:
    """The database the runbook connects to; ``conninfo`` may contain a password."""

    conninfo: str = field(repr=False)
    is_demo: bool
    source: str
    server: Any = field(default=None, repr=False)


def resolve_target(demo_stage: str = "incident") -> Target:
    """Return the target chosen by the environment, or start a demo server.

    ``demo_stage`` is the state a demo database starts in when this call
    creates one: ``"incident"`` or ``"option1"``/``"option2"`` (fix applied).
    """
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return Target(url, is_demo=False, source="DATABASE_URL")

    chosen = [name for name in TARGET_VARIABLES if os.environ.get(name)]
    if chosen:
        return Target("", is_demo=False, source=", ".join(chosen))

    demo_url = os.environ.get(DEMO_URL_VARIABLE, "").strip()
    if demo_url:
        return Target(demo_url, is_demo=True, source="chain demo server")

    from . import demo

    server, conninfo = demo.start_demo_database(stage=demo_stage)
    return Target(conninfo, is_demo=True, source="embedded demo server",
                  server=server)


def connect(target: Target, *, autocommit: bool = True,
            connect_timeout: int = 10) -> psycopg.Connection:
    """Open a connection to ``target``; errors never show the password.

    Raises ``TargetError`` when the server cannot be reached or rejects the
    login, and when the connection string itself is invalid.
    """
    try:
        conn = psycopg.connect(
            target.conninfo,
            autocommit=autocommit,
            connect_timeout=connect_timeout,
            application_name=APPLICATION_NAME,
        )
    except psycopg.OperationalError as exc:
        detail = _one_line(scrub_secret(str(exc), target.conninfo))
        raise TargetError(
            f"Could not connect to {describe_conninfo(target.conninfo)} "
            f"(target from {target.source}): {detail} {_connect_hint(detail)}"
        ) from None
    except psycopg.Error as exc:
        # libpq rejects a malformed string before connecting, and its
        # message may quote the part that contains the password. A string
        # that does not parse hides its password from scrub_secret, so any
        # quoted part of the message that comes from it is dropped.
        detail = _one_line(scrub_secret(_drop_quoted_conninfo(str(exc), target.conninfo),
                                        target.conninfo))
        raise TargetError(
            f"The connection string in {target.source} is invalid: {detail} "
            f"Fix its syntax. In a URL, percent-encode @, :, / and % in the "
            f"user and password (@ as %40)."
        ) from None
    logger.debug("connected to %s", describe_conninfo(target.conninfo))
    return conn


def _one_line(text: str) -> str:
    # libpq's messages span lines and end with or without a full stop.
    text = " ".join(text.split())
    return text if text.endswith((".", "?", "!")) else f"{text}."


def _connect_hint(detail: str) -> str:
    for pattern, hint in _CONNECT_HINTS:
        if pattern.search(detail):
            return hint
    return _DEFAULT_HINT


def describe_conninfo(conninfo: str) -> str:
    """Return ``user@host:port/dbname`` for a conninfo, without the password."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "the configured target (connection string not parseable)"
    host = params.get("host") or os.environ.get("PGHOST") or "local socket"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or "(default)"
    user = params.get("user") or os.environ.get("PGUSER") or "(default)"
    return f"{user}@{host}:{port}/{dbname}"


def describe_target(conn: psycopg.Connection) -> dict:
    """Return host, port, database, user and server version of ``conn``."""
    info = conn.info
    major, rest = divmod(info.server_version, 10000)
    return {
        "host": info.host,
        "port": info.port,
        "database": info.dbname,
        "user": info.user,
        "server_version": f"{major}.{rest}",
    }


def _drop_quoted_conninfo(text: str, conninfo: str) -> str:
    """Replace each double-quoted part of ``text`` that is taken from ``conninfo``."""
    def replace(match: re.Match) -> str:
        quoted = match.group(1)
        return '"(part of the connection string)"' if quoted and quoted in conninfo \
            else match.group(0)
    return re.sub(r'"([^"]*)"', replace, text)


def scrub_secret(text: str, conninfo: str) -> str:
    """Replace the password of ``conninfo`` and of ``PGPASSWORD``, if any, in ``text``.

    Works on a conninfo that does not parse too, and masks the password of
    any URL in ``text`` as well.
    """
    for password in sorted(_passwords(conninfo), key=len, reverse=True):
        text = text.replace(password, MASK)
    return _URL_USERINFO_PASSWORD.sub(rf"\1{MASK}@", text)


def _passwords(conninfo: str) -> set[str]:
    """Return every form in which a password of ``conninfo`` may be quoted."""
    found = {os.environ.get("PGPASSWORD") or ""}
    try:
        found.add(conninfo_to_dict(conninfo).get("password") or "")
    except psycopg.ProgrammingError:
        pass
    if "://" in conninfo:
        # user:password@ ends at the last @, as libpq reads a URL.
        userinfo = conninfo.split("://", 1)[1].rpartition("@")[0]
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    for match in _CONNINFO_PASSWORD.finditer(conninfo):
        value = match.group(1)
        found.add(value)
        found.add(value.strip("'"))
    found |= {unquote(value) for value in found} | {quote(value) for value in found}
    return {value for value in found if value}


def reject_secret_parameter(name: str, value: Any) -> None:
    """Raise if a parameter value looks like a connection string with a password.

    The message never repeats the value, since it contains the password.
    """
    if not isinstance(value, str):
        return
    if _URL_WITH_PASSWORD.search(value) or _KEYWORD_PASSWORD.search(value):
        raise ParameterError(
            f"Parameter {name!r} looks like a connection string with a "
            f"password; its value is not shown. Remove it from the "
            f"parameters and set DATABASE_URL or PGPASSWORD in the "
            f"environment instead, so the password never reaches the "
            f"executed notebook."
        )
