"""A throwaway PostgreSQL cluster: initdb + pg_ctl on a free port in a temp dir.

Used by the tests (conftest.py), `make demo` and the benchmark.  When run as
root (CI is), the server runs as the `postgres` system user, because initdb
refuses root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pg8000.native

SUPERUSER = "backfill_admin"
SUPERUSER_PASSWORD = "admin-pw"
APP_USER = "backfill_app"
# Every URL-special character, to prove percent-decoding and that the password
# never shows up in output.
APP_PASSWORD = "s3cr3t p@ss:w/rd%?#&="


def pg_bindir() -> Path:
    """Where initdb is: on PATH, where pg_config says, or Debian's versioned folder."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True
        ).stdout.strip()
        if (Path(bindir) / "initdb").exists():
            return Path(bindir)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb) not found; install postgresql or set "
        "MEMORY_BACKFILL_TEST_DSN"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _can_bind_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class Cluster:
    host: str
    port: int
    user: str
    password: str
    workdir: Path = None  # None: a server we did not start
    options: str = ""  # the server's command-line options, to start it again

    def login(self, database: str = "postgres") -> dict:
        """How to reach `database` as the superuser (what the plugin stand-ins are given)."""
        return dict(
            user=self.user,
            password=self.password,
            host=self.host,
            port=self.port,
            database=database,
        )

    def connect(self, database: str = "postgres", **kwargs) -> pg8000.native.Connection:
        return pg8000.native.Connection(**self.login(database), **kwargs)

    def url(
        self,
        database: str,
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        host: str = None,
        query: str = "sslmode=disable",
    ) -> str:
        return "postgres://%s:%s@%s:%d/%s%s" % (
            quote(user, safe=""),
            quote(password, safe=""),
            host or self.host,
            self.port,
            database,
            "?" + query if query else "",
        )

    def create_database(self, name: str) -> str:
        admin = self.connect()
        admin.run("CREATE DATABASE %s" % name)
        admin.close()
        return name

    def pg_ctl(self, *args: str, check: bool = True) -> None:
        """pg_ctl on this cluster (`stop -m fast`, `start`, `restart`), waiting until it is done."""
        if args[0] in ("start", "restart"):  # the server's output to its log, not to this pipe
            args += ("-o", self.options, "-l", str(self.workdir / "log"))
        command = [str(pg_bindir() / "pg_ctl"), "-D", str(self.workdir / "data"), "-w", "-t", "60"]
        subprocess.run(
            command + list(args), check=check, capture_output=True, cwd=self.workdir, **_run_as()
        )

    def stop(self) -> None:
        if self.workdir is None:
            return
        self.pg_ctl("stop", "-m", "immediate", check=False)
        # A test session leaves a gigabyte of databases: removed in the background, not waited for.
        subprocess.Popen(
            ["rm", "-rf", str(self.workdir)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _run_as() -> dict:
    if os.geteuid() != 0:
        return {}
    postgres = pwd.getpwnam("postgres")
    return {"user": postgres.pw_uid, "group": postgres.pw_gid}


def start_cluster(durable: bool = False) -> Cluster:
    """Start a fresh cluster with a superuser and a read-only application role; `durable`: each
    commit waits for its WAL to reach the disk (fsync, synchronous_commit), as in production,
    instead of not."""
    bindir = pg_bindir()
    workdir = Path(tempfile.mkdtemp(prefix="memory-backfill-pg-"))
    os.chmod(workdir, 0o755)
    run_as = _run_as()
    pwfile = workdir / "pw"
    pwfile.write_text(SUPERUSER_PASSWORD + "\n")
    if run_as:
        os.chown(workdir, run_as["user"], run_as["group"])
        os.chown(pwfile, run_as["user"], run_as["group"])
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(workdir / "data"),
            "-U",
            SUPERUSER,
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ],
        check=True,
        capture_output=True,
        cwd=workdir,
        **run_as,
    )
    port = free_port()
    options = (
        "-c listen_addresses='127.0.0.1%s' -p %d -c unix_socket_directories='%s' -c "
        "max_connections=200" % (",::1" if _can_bind_ipv6() else "", port, workdir)
    )
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    subprocess.run(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(workdir / "data"),
            "-l",
            str(workdir / "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        check=True,
        capture_output=True,
        cwd=workdir,
        **run_as,
    )
    cluster = Cluster("127.0.0.1", port, SUPERUSER, SUPERUSER_PASSWORD, workdir, options)
    ensure_app_role(cluster)
    return cluster


def ensure_app_role(cluster: Cluster) -> None:
    """The role the tool logs in as: may read everything, owns nothing."""
    admin = cluster.connect()
    if not admin.run("SELECT 1 FROM pg_roles WHERE rolname = :name", name=APP_USER):
        admin.run(
            "CREATE ROLE %s LOGIN PASSWORD '%s'" % (APP_USER, APP_PASSWORD.replace("'", "''"))
        )
        admin.run("GRANT pg_read_all_data TO %s" % APP_USER)
    admin.close()
