"""A throwaway PostgreSQL cluster for integration tests: Debian's ``initdb``/``pg_ctl`` on a free 127.0.0.1 port.

PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` system user (created by Debian's package), else ``nobody``. The
cluster lives in its own temporary folder with ``fsync`` off (nothing in it
outlives the test session) and password (SCRAM) authentication on TCP, so the
URLs the tests use carry a password, as a team's would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def postgres_bindir() -> Path | None:
    """Folder holding ``initdb`` and ``pg_ctl``: on PATH, or Debian's ``/usr/lib/postgresql/<v>/bin``."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """The user the server runs as: None (the current one) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


@dataclass(frozen=True)
class Cluster:
    """A running cluster: superuser ``postgres`` with ``password`` on ``127.0.0.1:port``."""

    port: int
    password: str
    folder: Path

    def url(self, database: str, user: str = "postgres", password: str | None = None,
            driver: str = "postgresql") -> str:
        """SQLAlchemy URL of ``database`` (``postgresql://user:password@127.0.0.1:port/database``)."""
        return f"{driver}://{user}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, owner: str, owner_password: str) -> str:
        """Create role ``owner`` (if new) and database ``name`` owned by it; returns the database's URL."""
        import psycopg
        from psycopg import sql

        conn = psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.password,
                               dbname="postgres", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,))
                if not cur.fetchone():
                    cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(owner), sql.Literal(owner_password)))
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(owner)))
        finally:
            conn.close()
        return self.url(name, owner, owner_password)


@contextlib.contextmanager
def cluster(bindir: Path | None = None):
    """Start a fresh cluster; yields a :class:`Cluster`; stops it and deletes its files on exit."""
    bindir = bindir or postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    user = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="cifarflow-pg-"))
    password = secrets.token_hex(8)
    (folder / "pwfile").write_text(password + "\n")
    if user:
        entry = pwd.getpwnam(user)
        for p in (folder, folder / "pwfile"):
            os.chown(p, entry.pw_uid, entry.pw_gid)
    run = lambda *cmd: subprocess.run(cmd, user=user, cwd=folder, check=True, capture_output=True,  # noqa: E731
                                      text=True, timeout=120)
    data = folder / "data"
    port = _free_port()
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(folder / "pwfile"),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "120",
            "-o", options, "start")
    except subprocess.CalledProcessError as exc:
        log = (folder / "server.log").read_text()[-2000:] if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr[-2000:]} {log}") from None
    try:
        yield Cluster(port=port, password=password, folder=folder)
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user=user,
                       cwd=folder, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
