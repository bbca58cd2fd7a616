"""PostgreSQL for tests: a fresh database per test, or a private server.

``postgresql_url`` gives each test an empty database of its own on the
server named by ``ESTD_TEST_POSTGRESQL`` (a libpq URL whose role may create
databases; ``.ci/run`` starts Debian's cluster and sets it) and drops it
afterwards.  ``private_postgresql`` starts a throw-away server of its own,
for tests that stop the database under a running ledger.

Test modules load these fixtures with ``pytest_plugins = ["tests.pg_support"]``.

On Debian, as root, a server for ``postgresql_url``::

    apt-get install postgresql
    pg_ctlcluster 15 main start
    runuser -u postgres -- psql -c \
        "CREATE ROLE estd_test LOGIN CREATEDB PASSWORD 'estd_test'"
    export ESTD_TEST_POSTGRESQL=postgresql://estd_test:estd_test@127.0.0.1/postgres
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

ENVIRONMENT = "ESTD_TEST_POSTGRESQL"
SKIP_MESSAGE = (
    "PostgreSQL tests need ESTD_TEST_POSTGRESQL=postgresql://... (.ci/run sets it)"
)
SUPERUSER = "estd"
"""The superuser a private server is initialised with (trust authentication)."""


def database_url(server_url: str, dbname: str) -> str:
    """``server_url`` with its database replaced by ``dbname``."""
    return urllib.parse.urlsplit(server_url)._replace(path="/" + dbname).geturl()


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    server_url = os.environ.get(ENVIRONMENT)
    if not server_url:
        pytest.skip(SKIP_MESSAGE)
    name = "estd_test_" + secrets.token_hex(6)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url(server_url, name)
    finally:
        drop_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop a test database, even with connections a failed test left open.

    FORCE terminates those; it may not terminate an autovacuum worker (a
    superuser process) that happens to be in the new database, so then the
    drop is tried again until the worker has left (bounded).
    """
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        sql.Identifier(name)
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(statement)
            return
        except psycopg.errors.InsufficientPrivilege:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # an autovacuum run takes moments


def server_binaries() -> str | None:
    """The directory holding initdb and pg_ctl (the newest Debian one), or None."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda path: int(path.split("/")[-3]),
    )
    if candidates:
        return os.path.dirname(candidates[-1])
    pg_ctl = shutil.which("pg_ctl")
    return os.path.dirname(pg_ctl) if pg_ctl else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivatePostgreSQL:
    """A PostgreSQL server of the test's own, in a temporary directory.

    PostgreSQL refuses to run as root, so under root its programs run as the
    ``postgres`` user (which owns the directory).
    """

    def __init__(self, bindir: str, directory: str, *, as_postgres: bool) -> None:
        self.bindir = bindir
        self.directory = directory
        self.data = os.path.join(directory, "data")
        self.log = os.path.join(directory, "server.log")
        self.port = free_port()
        self.as_postgres = as_postgres
        self.running = False

    @property
    def url(self) -> str:
        """A URL of the server's ``postgres`` database, as superuser."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *arguments: str) -> None:
        command = [os.path.join(self.bindir, program), *arguments]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            log = ""
            if os.path.exists(self.log):
                with open(self.log, encoding="utf-8", errors="replace") as handle:
                    log = handle.read()
            raise RuntimeError(
                f"{program} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                f"\n--- {self.log}:\n{log}"
            )

    def initdb(self) -> None:
        """Create the cluster (UTF-8, local trust authentication)."""
        self._run(
            "initdb",
            "--pgdata",
            self.data,
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
            " -c fsync=off"
        )
        # -w: pg_ctl polls until the server is ready (60 s at most).
        self._run(
            "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start"
        )
        self.running = True

    def stop(self) -> None:
        """Stop the server; connected clients are cut off (fast shutdown)."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        self.running = False


@pytest.fixture
def private_postgresql() -> Iterator[PrivatePostgreSQL]:
    """A running throw-away PostgreSQL server, removed after the test."""
    bindir = server_binaries()
    if bindir is None:
        pytest.skip(
            "the PostgreSQL server programs (initdb, pg_ctl) are not installed; "
            "apt-get install postgresql"
        )
    as_postgres = os.geteuid() == 0
    directory = tempfile.mkdtemp(prefix="estd-pg-")
    if as_postgres:
        account = pwd.getpwnam("postgres")
        os.chown(directory, account.pw_uid, account.pw_gid)
    server = PrivatePostgreSQL(bindir, directory, as_postgres=as_postgres)
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        if server.running:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


__all__ = [
    "PrivatePostgreSQL",
    "database_url",
    "postgresql_url",
    "private_postgresql",
]
