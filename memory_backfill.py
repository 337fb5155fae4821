#!/usr/bin/env python3
"""memory-backfill: copy legacy agent memories into the memory plugin, and back out.

Reads every row of the platform's legacy ``agent_memories`` table (read only) and writes it to the
memory plugin over HTTP exactly as the live platform would have: same namespace (the scope rule),
same secret redaction and delimiter guard, the row's UUID as the idempotency key, so a re-run never
duplicates anything.

Usage:
    memory-backfill -dry-run  [options]   decide everything, write nothing
    memory-backfill -apply    [options]   copy the rows into the plugin
    memory-backfill -verify   [options]   prove the plugin holds what it should
    memory-backfill -rollback [options] --yes
                                          delete exactly what a backfill wrote, by id

Configuration comes from DATABASE_URL and MEMORY_PLUGIN_URL (or --database-url / --plugin-url;
the plugin defaults to the tenant image's http://localhost:9100).  --help lists every option.

The facts it relies on (the legacy tables, the scope rule, the plugin's API, SAFE-T1201) are
stated, with their sources, in docs/contract.md; "contract §N" below cites its sections.

The module reads top to bottom, each section using only those above it: the core (what the live
platform would write, decided without I/O); the adapters (PostgreSQL, the plugin over urllib3, the
write stream, the record finder, local files, progress and signals); one section per mode
(-dry-run and -apply, -verify, -rollback), each report beside its formatter; the command line.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import difflib
import fcntl
import functools
import http.client
import json
import math
import os
import pwd
import random
import re
import select
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import traceback
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from enum import Enum, IntEnum
from importlib import metadata
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence, Union
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from uuid import UUID

__version__ = "0.2.0"
__all__ = [  # what a caller may use: the command line, and the pieces the bench drives
    "__version__",
    "main",
    "run",
    "parse_settings",
    "Settings",
    "ExitStatus",
    "BackfillError",
    "UsageError",
    "DependencyError",
    "Incomplete",
    "Interrupted",
    "parse_database_url",
    "parse_plugin_url",
    "LegacyDatabase",
    "resolve_target",
    "redact",
    "platform_content",
    "plan_row",
    "write_request",
]

PROG = "memory-backfill"
# contract §1: 3.9 reached its end of life in October 2025, and the urllib3
# releases that fix its 2026 advisories need 3.10.
MIN_PYTHON = (3, 10)
PYTHON_TOO_OLD = (
    PROG + ": needs Python %d.%d or newer, this is %%s; run it with a newer python3: in the tenant "
    "image, Alpine's python3 package; on RHEL-family 9 hosts (whose python3 is 3.9), python3.11 or "
    "python3.12 (dnf install python3.12); elsewhere, your distribution's newer python3 package.\n"
) % MIN_PYTHON


# ===========================================================================
# The core: what the live platform would write, decided without I/O
# ===========================================================================


# ---------------------------------------------------------------------------
# Errors and exit statuses
# ---------------------------------------------------------------------------


class ExitStatus(IntEnum):
    OK = 0
    INCOMPLETE = 1  # finished, but rows failed or verification found problems
    USAGE = 2  # usage or configuration error (or -rollback without --yes): nothing was touched
    UNAVAILABLE = 3  # a dependency (database, plugin) is unusable
    INTERRUPTED = 130  # SIGINT: 128 + 2
    TERMINATED = 143  # SIGTERM: 128 + 15


class BackfillError(Exception):
    """An error that ends the run; its text is the one sentence shown."""

    status = ExitStatus.UNAVAILABLE
    report = None  # the report so far, when a mode stopped part-way
    advise_rerun = True  # whether running the same command again is the way on
    shown_as_json = False  # run() printed it in the --json object already
    traceback: Optional[str] = None  # a defect's, shown with -v


class UsageError(BackfillError):
    status = ExitStatus.USAGE


class DependencyError(BackfillError):
    status = ExitStatus.UNAVAILABLE


class PluginIgnoresIds(DependencyError):
    """The plugin stored a write under an id of its own: every run would duplicate every row."""

    advise_rerun = False


class Incomplete(BackfillError):
    """The mode ran to its end, but not everything went through (exit 1)."""

    status = ExitStatus.INCOMPLETE


class Interrupted(BackfillError):
    """SIGINT or SIGTERM: the run wound down cleanly."""

    def __init__(self, signum: int):
        name = signal.Signals(signum).name
        super().__init__(
            "Interrupted by %s: stopped taking rows and finished the requests in flight; re-run "
            "the same command to resume." % name
        )
        self.status = ExitStatus.INTERRUPTED if name == "SIGINT" else ExitStatus.TERMINATED


class RowSkipped(Exception):
    """A row the live platform would not write, and why (its text, `reason`): the one form of a
    skip, raised by the scope rule and returned by plan_row as the row's outcome, row attached."""

    def __init__(self, reason: str, row: Optional[LegacyRow] = None):
        super().__init__(reason)
        self.reason, self.row = reason, row


class RowFailed(Exception):
    """One row could not be written (or deleted); the run goes on.  Returned by plan_row, row
    attached, for a row that no write can carry (its text is not UTF-8)."""

    def __init__(self, reason: str, row: Optional[LegacyRow] = None):
        super().__init__(reason)
        self.row = row


class PluginRejected(RowFailed):
    """The plugin answered a single request with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__("HTTP %d: %s" % (status, message))
        self.status = status


class ProtocolError(Exception):
    """Bytes that are not an HTTP/1.x response: never retried, never guessed at."""


class ConnectionLost(Exception):
    """The connection ended (or an answer did not come in time) before every request on it was
    answered."""


# ---------------------------------------------------------------------------
# Vocabularies: the words a run is told in (modes here; skip reasons with the scope rule, -verify's
# classes with -verify, where a lookup puts a record with the finder)
# ---------------------------------------------------------------------------


class Word(str, Enum):
    """A word of a fixed vocabulary: compares, hashes and prints as its text (in JSON, too)."""

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


class Mode(Word):
    DRY_RUN = "dry-run"
    APPLY = "apply"
    VERIFY = "verify"
    ROLLBACK = "rollback"


# ---------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to connect to the database, unless the URL says
DEFAULT_STATEMENT_TIMEOUT = 60.0  # seconds a database statement (a lock wait included) may take


@dataclass(frozen=True)
class DatabaseConfig:
    """A parsed DATABASE_URL.  The password never appears in repr()."""

    user: str
    host: str
    port: int
    database: str
    password: Optional[str] = field(default=None, repr=False)
    sslmode: str = "prefer"
    sslrootcert: Optional[str] = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # the URL's connect_timeout: connecting only
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT  # each statement, lock waits included
    application_name: str = PROG
    startup_params: dict[str, str] = field(default_factory=dict)
    password_from: Optional[str] = None  # DATABASE_URL, PGPASSWORD or "the password file PATH"
    password_file: Optional[str] = None  # with no password: the password file libpq would read ...
    password_file_unused: Optional[str] = None  # ... and why it gave none

    def describe(self) -> str:
        """Where the database is, for messages: never includes the password."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s@%s:%d/%s" % (self.user, host, self.port, self.database)

    def describe_login(self) -> str:
        """Where the password came from (never the password), for the target line."""
        return "password from %s" % self.password_from if self.password_from else "no password"

    def no_password(self) -> DependencyError:
        """The server asks for a password, and none was given: where one may come from."""
        unused = "; %s" % self.password_file_unused if self.password_file_unused else ""
        return DependencyError(
            "The legacy database %s asks for a password and none was given; put it in DATABASE_URL "
            "(postgres://USER:PASSWORD@HOST/DB), in PGPASSWORD, or in the password file (%s, or "
            "PGPASSFILE; mode 0600)%s."
            % (self.describe(), self.password_file or "~/.pgpass", unused)
        )


@dataclass(frozen=True)
class PluginAddress:
    """MEMORY_PLUGIN_URL, parsed once: the urllib3 client and the write stream both use it."""

    url: str  # as shown in messages: no userinfo, no trailing slash
    host: str
    port: int
    tls: bool
    prefix: str  # the URL's path, before /v1/...
    host_header: str
    default: bool = False  # no MEMORY_PLUGIN_URL or --plugin-url: the tenant image's constant
    named_by: str = "MEMORY_PLUGIN_URL"  # or --plugin-url

    def describe(self) -> str:
        return self.url + (" (the default: MEMORY_PLUGIN_URL is not set)" if self.default else "")


DEFAULT_VERIFY_SAMPLE = 50
DEFAULT_SEED = 20261126
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 8  # backoff 0.2 s doubling to at most 4 s: about 18 s before giving up
# connections to the plugin at most; the limiter finds the working point below
DEFAULT_WRITE_CONNECTIONS = 64
DEFAULT_SEARCHES = 8  # -verify's and -rollback's searches at once
DEFAULT_MAX_CONSECUTIVE_FAILURES = 20
SHOWN_PROBLEMS = 20  # per-row errors / problems listed in the text summary


@dataclass(frozen=True)
class Settings:
    mode: Mode
    database: DatabaseConfig
    plugin: PluginAddress
    workspace: Optional[str] = None
    limit: Optional[int] = None
    verify_sample: int = DEFAULT_VERIFY_SAMPLE
    seed: int = DEFAULT_SEED
    redact: bool = True
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    concurrency: Optional[int] = None  # None: the mode's default
    max_rate: float = 0  # writes (deletes) per second; 0 = no cap
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    checkpoint: Optional[str] = None
    failures: Optional[str] = None
    yes: bool = False
    json_output: bool = False
    verbose: bool = False
    quiet: bool = False
    # -verify: windows of the memories' (redacted) text around a difference
    show_content: bool = False

    @property
    def workspaces(self) -> Optional[list[str]]:
        """-workspace as the list of workspaces to read (None: all)."""
        return [self.workspace] if self.workspace else None

    @property
    def write_connections(self) -> int:
        return self.concurrency or DEFAULT_WRITE_CONNECTIONS

    @property
    def searches(self) -> int:
        return self.concurrency or DEFAULT_SEARCHES


@dataclass(slots=True)
class LegacyRow:
    id: str
    workspace_id: Optional[str]
    content: str
    scope: str
    legacy: dict[str, object]  # what goes to propagation["legacy"]
    embedding: Optional[list[float]] = None
    unreadable: Optional[str] = None  # why its text cannot be copied (bytes that are not UTF-8)


@dataclass(frozen=True)
class Target:
    namespace: str
    kind: str  # workspace | team | org


@dataclass(slots=True)
class PlannedWrite:
    row: LegacyRow
    target: Target
    body: dict[str, object]  # the MemoryWrite sent to the plugin
    redactions: Counter


Outcome = Union[PlannedWrite, RowSkipped, RowFailed]


@dataclass
class RunReport:
    """What a mode that writes (-dry-run, -apply, -rollback) reports: the common part."""

    settings: Settings
    scanned: int = 0
    errors: int = 0
    problems: list[str] = field(default_factory=list)  # "id: message", the first SHOWN_PROBLEMS
    plugin_status: Optional[str] = None
    load: Optional[dict[str, object]] = None  # the write stream's, at the end
    stopped: Optional[BackfillError] = None  # what stopped it early

    def count_error(self, row_id: str, error: object) -> None:
        self.errors += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append("%s: %s" % (row_id, error))

    def stop(self, stopped: Optional[BackfillError]) -> None:
        """Raise what stopped the run, carrying this report (it is shown before the sentence)."""
        if stopped is not None:
            self.stopped, stopped.report = stopped, self
            raise stopped

    def failed_rows(self) -> str:
        """What to do about the rows counted as errors (the sentence of exit 1)."""
        raise NotImplementedError

    def verdict(self) -> Optional[BackfillError]:
        """How the run ended, when not well: what stopped it, or the rows that failed."""
        if self.stopped is None and self.errors:
            return Incomplete(self.failed_rows())
        return self.stopped

    def listed(self) -> str:
        return " and in " + self.settings.failures if self.settings.failures else ""

    def to_json(self) -> dict[str, object]:
        return {
            "scanned": self.scanned,
            "errors": self.errors,
            "error_rows": self.problems,
            "plugin": self.plugin_status,
            "failures_file": self.settings.failures,
            "stream": self.load,
            "retries": self.load["retries"] if self.load else 0,
            "stopped": None if self.stopped is None else str(self.stopped),
        }


# ---------------------------------------------------------------------------
# Configuration (pure)
# ---------------------------------------------------------------------------

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DEFAULT_PLUGIN_URL = "http://localhost:9100"  # contract §1: the tenant image's bundled plugin


# libpq's habits (contract §1; https://www.postgresql.org/docs/current/libpq-envars.html): where the
# URL is silent, these name the database, as they do for psql.  DATABASE_URL unset and none of
# LIBPQ_NAMES set: nothing is named.
LIBPQ_NAMES = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE")
# Where libpq builds look for the server's socket when no host is named (Debian, Alpine, upstream).
DEFAULT_SOCKET_DIRS = ("/var/run/postgresql", "/run/postgresql", "/tmp")
MAX_PASSWORD_FILE = 1024 * 1024


def parse_database_url(
    url: Optional[str], environ: Optional[dict[str, str]] = None
) -> DatabaseConfig:
    """A libpq-style postgres:// URL, completed as libpq completes it (`environ`'s PG* variables
    where the URL is silent, the login name as the user, the password file); UsageError if it is not
    one."""
    environ = {} if environ is None else environ
    if not url and not any(environ.get(name) for name in LIBPQ_NAMES):
        raise UsageError(
            "DATABASE_URL is not set; set it (or pass --database-url) to the platform's PostgreSQL "
            "URL, postgres://USER:PASSWORD@HOST/DB, or name the database as for psql (PGHOST, "
            "PGUSER, PGDATABASE)."
        )
    # Never echo the URL: it may hold the password.
    bad = "DATABASE_URL is malformed: %s; expected postgres://USER:PASSWORD@HOST:PORT/DB."
    try:
        parts = urlsplit(url or "postgres://")
        port = parts.port
    except ValueError as exc:
        raise UsageError(bad % _strip_secrets(str(exc), url)) from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise UsageError(bad % "the scheme must be postgres:// or postgresql://")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    # libpq also accepts these as query parameters; the URL's own parts win, then the environment's.
    named = {key: params.pop(key, "") for key in ("host", "port", "user", "password", "dbname")}
    host = unquote(parts.hostname or "") or named["host"] or environ.get("PGHOST", "")
    if port is None:
        port_text = named["port"] or environ.get("PGPORT") or "5432"
        port = _whole_number(port_text, "the DATABASE_URL port" if named["port"] else "PGPORT", 1)
    host = host or default_socket_dir(port)
    user = unquote(parts.username or "") or named["user"] or environ.get("PGUSER") or login_name()
    database = (
        unquote(parts.path.lstrip("/")) or named["dbname"] or environ.get("PGDATABASE") or user
    )
    sslmode = params.pop("sslmode", None) or environ.get("PGSSLMODE") or "prefer"
    if sslmode not in SSL_MODES:
        raise UsageError(bad % ("sslmode must be one of " + ", ".join(SSL_MODES)))
    timeout = params.pop("connect_timeout", None) or environ.get("PGCONNECT_TIMEOUT")
    try:
        # libpq reads 0 as "wait for ever"; here every wait is bounded, so 0 is the default.
        connect_timeout = (
            float(timeout) if timeout and float(timeout) > 0 else DEFAULT_CONNECT_TIMEOUT
        )
    except ValueError:
        raise UsageError(bad % "connect_timeout must be a number of seconds") from None
    for bound in ("statement_timeout", "lock_timeout"):  # --statement-timeout sets both
        params.pop(bound, None)
    config = DatabaseConfig(
        user=user,
        host=host,
        port=port,
        database=database,
        sslmode=sslmode,
        sslrootcert=params.pop("sslrootcert", None),
        connect_timeout=connect_timeout,
        application_name=params.pop("application_name", PROG),
        startup_params=params,
    )
    password = unquote(parts.password) if parts.password else named["password"]
    if password:
        return replace(config, password=password, password_from="DATABASE_URL")
    if environ.get("PGPASSWORD"):
        return replace(config, password=environ["PGPASSWORD"], password_from="PGPASSWORD")
    path = password_file_path(environ)
    if path is None:
        return config
    found, unused = read_password_file(path, config)
    if found is not None:
        return replace(config, password=found, password_from="the password file " + path)
    return replace(config, password_file=path, password_file_unused=unused)


def login_name() -> str:
    """The user libpq logs in as when none is named: this process's (effective) user."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise UsageError(
            "DATABASE_URL names no user, and this process's user id %d has no name to use instead; "
            "name one in DATABASE_URL (postgres://USER@HOST/DB) or PGUSER." % os.geteuid()
        ) from None


def default_socket_dir(port: int) -> str:
    """libpq's default host: the local server's socket folder (`localhost` when none holds one)."""
    for folder in DEFAULT_SOCKET_DIRS:
        if os.path.exists("%s/.s.PGSQL.%d" % (folder, port)):
            return folder
    return "localhost"


def password_file_path(environ: dict[str, str]) -> Optional[str]:
    """PGPASSFILE, else ~/.pgpass (HOME, else the user's home folder), as libpq finds it."""
    if environ.get("PGPASSFILE"):
        return environ["PGPASSFILE"]
    home = environ.get("HOME")
    if not home:
        with contextlib.suppress(KeyError):
            home = pwd.getpwuid(os.geteuid()).pw_dir
    return os.path.join(home, ".pgpass") if home else None


class FileRefused(Exception):
    """Why a file the tool reads cannot be used, in words ("is a directory")."""


def read_regular_file(path: str, limit: int, private: bool = False) -> Optional[bytes]:
    """The bytes of a plain file of at most `limit` bytes, or None when there is no such file;
    FileRefused for anything else, `private`: readable by its owner only.  Opened without blocking:
    a FIFO cannot hang the run."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FileRefused("cannot be read (%s)" % (exc.strerror or "error").lower()) from None
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise FileRefused("is a directory")
        if not stat.S_ISREG(mode):
            raise FileRefused("is not a plain file")
        if private and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise FileRefused(
                "has group or world access (libpq, too, ignores it until it is chmod 0600)"
            )
        data = os.read(descriptor, limit + 1)
    except OSError as exc:
        raise FileRefused("cannot be read (%s)" % (exc.strerror or "error").lower()) from None
    finally:
        os.close(descriptor)
    if len(data) > limit:
        raise FileRefused("is larger than %d bytes" % limit)
    return data


def read_password_file(path: str, config: DatabaseConfig) -> tuple[Optional[str], Optional[str]]:
    """The password of the first line of libpq's password file that matches the connection
    (host:port:database:user:password, `*` for any, `\\:` and `\\\\` escaped), or (None, why the
    file was not used).  Its rules are libpq's: only a plain file that its owner alone may read is
    used."""
    try:
        data = read_regular_file(path, MAX_PASSWORD_FILE, private=True)
    except FileRefused as refused:
        return None, "the password file %s was not used: it %s" % (path, refused)
    if data is None:
        return None, "there is no password file %s" % path
    host = "localhost" if config.host in DEFAULT_SOCKET_DIRS else config.host  # as libpq matches it
    wanted = [
        value.encode("utf-8") for value in (host, str(config.port), config.database, config.user)
    ]
    for line in data.split(b"\n"):
        fields = _password_file_fields(line.rstrip(b"\r"))
        if line.startswith(b"#") or len(fields) < 5:
            continue
        pairs = zip(fields[:4], wanted, strict=True)
        if all(raw == b"*" or value == expected for (raw, value), expected in pairs):
            try:
                return fields[4][1].decode("utf-8"), None
            except UnicodeDecodeError:
                return (
                    None,
                    "the password file %s was not used: its matching line is not UTF-8" % path,
                )
    return None, "no line of the password file %s matches %s" % (path, config.describe())


def _password_file_fields(line: bytes) -> list[tuple[bytes, bytes]]:
    """A password file line cut at its unescaped colons (the password, the fifth field, ends at
    one): each field as written, and unescaped (a backslash takes the next byte as it is)."""
    fields: list[tuple[bytes, bytes]] = []
    start, value, escaped = 0, bytearray(), False
    for at, byte in enumerate(line):
        if escaped:
            value.append(byte)
            escaped = False
        elif byte == 0x5C:  # a backslash
            escaped = True
        elif byte == 0x3A:  # a colon
            fields.append((line[start:at], bytes(value)))
            start, value = at + 1, bytearray()
            if len(fields) == 5:
                return fields
        else:
            value.append(byte)
    return fields + [(line[start:], bytes(value))]


def _strip_secrets(text: str, url: str) -> str:
    """Remove anything of the URL's userinfo from a parser's message."""
    userinfo = urlsplit(url).netloc.rpartition("@")[0] if "@" in url else ""
    for secret in filter(None, (userinfo, *userinfo.split(":"))):
        text = text.replace(secret, "***")
    return text


def parse_plugin_url(url: Optional[str], named_by: str = "MEMORY_PLUGIN_URL") -> PluginAddress:
    """MEMORY_PLUGIN_URL (or --plugin-url) as an address; with none, the tenant image's constant
    (contract §1)."""
    default = not url
    url = url or DEFAULT_PLUGIN_URL
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise UsageError(
            "%s is malformed: the port is not a number; expected http://HOST:PORT." % named_by
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            "%s is malformed: expected http://HOST:PORT (for example %s)."
            % (named_by, DEFAULT_PLUGIN_URL)
        )
    tls = parts.scheme == "https"
    default_port = 443 if tls else 80
    host = parts.hostname
    shown = "[%s]" % host if ":" in host else host.encode("idna").decode("ascii")
    if port not in (None, default_port):
        shown += ":%d" % port
    prefix = parts.path.rstrip("/")
    netloc = parts.netloc.rpartition("@")[2]  # never show userinfo
    return PluginAddress(
        "%s://%s%s" % (parts.scheme, netloc, prefix),
        host,
        port or default_port,
        tls,
        prefix,
        shown,
        default,
        named_by,
    )


def parse_uuid(value: str) -> str:
    try:
        return str(UUID(value))
    except ValueError:
        raise UsageError("-workspace must be a workspace UUID, not %r." % value[:60]) from None


def parse_embedding(text: Optional[str]) -> Optional[list[float]]:
    """pgvector's '[1,2,3]' (or an array's '{1,2,3}') as a list of numbers."""
    if text is None:
        return None
    inner = text.strip()[1:-1].strip()
    return [float(x) for x in inner.split(",")] if inner else []


def _whole_number(text: str, option: str, minimum: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = minimum - 1
    if value < minimum:
        kind = "a positive whole number" if minimum > 0 else "a whole number, 0 or more"
        raise UsageError("%s must be %s, not %r." % (option, kind, str(text)[:40]))
    return value


def _seconds(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value < float("inf"):
        raise UsageError("%s must be a positive number of seconds, not %r." % (option, text[:40]))
    return value


# ---------------------------------------------------------------------------
# The scope rule: contract §3, the platform's namespace resolver
# ---------------------------------------------------------------------------

MAX_PARENT_HOPS = 50


class SkipReason(Word):
    """Why the live platform would not write a row."""

    NO_WORKSPACE = "workspace_id is NULL"
    WORKSPACE_NOT_FOUND = "workspace not found"
    UNKNOWN_SCOPE = "unknown scope"
    GLOBAL_NOT_ROOT = "GLOBAL memory on a non-root workspace (no writable namespace)"
    EMPTY_CONTENT = "content is empty after trimming whitespace"


# contract §3's table: scope -> namespace kind.  Whose id names the namespace
# is WorkspaceTree.owner's rule, the same for writing and for reading.
SCOPE_KINDS = {"LOCAL": "workspace", "TEAM": "team", "GLOBAL": "org"}
NAMESPACE_KINDS = tuple(SCOPE_KINDS.values())


class WorkspaceTree:
    """All workspaces of the tenant (id -> parent_id, status), read once."""

    def __init__(self, workspaces: Iterable[tuple[str, Optional[str], Optional[str]]]):
        self.parent: dict[str, Optional[str]] = {}
        self.status: dict[str, Optional[str]] = {}
        for workspace_id, parent_id, status in workspaces:
            self.parent[workspace_id] = parent_id
            self.status[workspace_id] = status

    def __contains__(self, workspace_id: str) -> bool:
        return workspace_id in self.parent

    def is_removed(self, workspace_id: str) -> bool:
        return self.status.get(workspace_id) == "removed"

    def top(self, workspace_id: str) -> str:
        """The last workspace reached walking up at most 50 hops: the root; or, in a cycle or
        a longer chain, the one 50 hops up; or, when a parent row is gone, the last that exists."""
        current = workspace_id
        for _ in range(MAX_PARENT_HOPS):
            parent = self.parent[current]
            if parent is None or parent not in self.parent:
                break
            current = parent
        return current

    def owner(self, kind: str, workspace_id: str) -> str:
        """Whose id names the namespace of this kind that the workspace reads (and writes)."""
        if kind == "workspace":
            return workspace_id
        if kind == "team":
            # as it stands, even if that row is gone
            return self.parent[workspace_id] or workspace_id
        return self.top(workspace_id)

    def reading_order(self) -> list[str]:
        """The workspaces in an order that keeps the writers of each shared namespace together: by
        their top, then by the workspace whose team: namespace they write, then themselves.  A
        finder that reads a namespace once can then forget it soon after (memory stays flat)."""
        return sorted(
            self.parent,
            key=lambda workspace: (self.top(workspace), self.owner("team", workspace), workspace),
        )

    def readable_namespaces(self, workspace_id: str) -> list[str]:
        """The workspace:, team: and org: namespaces the workspace reads."""
        return ["%s:%s" % (kind, self.owner(kind, workspace_id)) for kind in NAMESPACE_KINDS]

    def namespaces(self) -> list[str]:
        """Every namespace of the tenant's tree: each kind, named after each workspace (a
        misplaced record may sit where the scope rule would never write)."""
        return sorted(
            kind + ":" + workspace_id for workspace_id in self.parent for kind in NAMESPACE_KINDS
        )


def namespace_kind(namespace: str) -> str:
    return namespace.partition(":")[0]


def resolve_target(workspace_id: Optional[str], scope: str, tree: WorkspaceTree) -> Target:
    """The namespace the live platform writes a memory of this scope to; RowSkipped if none."""
    if workspace_id is None:
        raise RowSkipped(SkipReason.NO_WORKSPACE)
    if workspace_id not in tree:
        raise RowSkipped(SkipReason.WORKSPACE_NOT_FOUND)
    kind = SCOPE_KINDS.get(scope)
    if kind is None:
        raise RowSkipped(SkipReason.UNKNOWN_SCOPE)
    if kind == "org" and tree.parent[workspace_id] is not None:  # only a root writes GLOBAL
        raise RowSkipped(SkipReason.GLOBAL_NOT_ROOT)
    return Target("%s:%s" % (kind, tree.owner(kind, workspace_id)), kind)


# ---------------------------------------------------------------------------
# Redaction and the delimiter guard: contract §5
# ---------------------------------------------------------------------------

# SAFE-T1201, applied in this order, each over the output of the previous one.
# The platform's patterns are RE2: its \b, \s, \w are ASCII-only, hence re.ASCII.
_I = re.IGNORECASE
REDACTION_PATTERNS: tuple[tuple[str, str, int], ...] = (
    ("API_KEY", r"\b[A-Z][A-Z0-9_]*_API_KEY\s*=\s*\S+", _I),
    ("TOKEN", r"\b[A-Z][A-Z0-9_]*_TOKEN\s*=\s*\S+", _I),
    ("SECRET", r"\b[A-Z][A-Z0-9_]*_SECRET\s*=\s*\S+", _I),
    ("BEARER_TOKEN", r"Bearer\s+\S+", 0),
    (
        "OPENSSH_PRIVATE_KEY",
        r"-----BEGIN OPENSSH PRIVATE KEY-----[\s\S]*?-----END OPENSSH PRIVATE KEY-----",
        0,
    ),
    ("PRIVATE_KEY", r"-----BEGIN[ A-Z]+PRIVATE KEY-----[\s\S]*?-----END[ A-Z]+PRIVATE KEY-----", 0),
    (
        "DB_URL_WITH_CREDENTIALS",
        r"\b(?:postgres(?:ql)?|mysql|mongodb(?:\+srv)?|redis|amqp|amqps)://(?:[^\s/@:]*:[^\s/@]+)@[^\s/]+",
        _I,
    ),
    ("GITHUB_PAT", r"\bghp_[A-Za-z0-9]{16,}", 0),
    ("GITHUB_OAUTH", r"\bgho_[A-Za-z0-9]{16,}", 0),
    ("GITHUB_APP_SERVER_TOKEN", r"\bghs_[A-Za-z0-9]{16,}", 0),
    ("GITHUB_USER_TOKEN", r"\bghu_[A-Za-z0-9]{16,}", 0),
    ("GITHUB_REFRESH_TOKEN", r"\bghr_[A-Za-z0-9]{16,}", 0),
    ("GITHUB_FINEGRAINED_PAT", r"\bgithub_pat_[A-Za-z0-9_]{16,}", 0),
    ("VERCEL_TOKEN", r"\bvc_[A-Za-z0-9]{16,}", 0),
    ("AWS_ACCESS_KEY_ID", r"\bAKIA[A-Z0-9]{16}", 0),
    ("PERPLEXITY_API_KEY", r"\bpplx-[A-Za-z0-9]{20,}", 0),
    ("SK_TOKEN", r"sk-[A-Za-z0-9\-_]{16,}", 0),
    ("CTX7_TOKEN", r"ctx7_[A-Za-z0-9]+", 0),
    ("BASE64_BLOB", r"[A-Za-z0-9+/]{33,}={0,2}", 0),
)
# The guard against forged memory delimiters, in GLOBAL (org) memories only.
MEMORY_DELIMITER, GUARDED_DELIMITER = "[MEMORY ", "[_MEMORY "


@functools.cache
def redaction_rules() -> tuple[tuple[str, re.Pattern, str], ...]:
    """The compiled patterns (compiled on first use: --help need not pay for them)."""
    return tuple(
        (label, re.compile(pattern, flags | re.ASCII), "[REDACTED:%s]" % label)
        for label, pattern, flags in REDACTION_PATTERNS
    )


# Every match of every pattern above contains one of these literals (the
# first three in any case) or a run of 33 base64 characters.  Text with none
# of them (most memories) is returned as it is, after a few cheap scans.
PREFILTER_ANY_CASE = ("_api_key", "_token", "_secret")
PREFILTER_LITERALS = (
    "://",
    "Bearer",
    "-----BEGIN",
    "ghp_",
    "gho_",
    "ghs_",
    "ghu_",
    "ghr_",
    "github_pat_",
    "vc_",
    "AKIA",
    "pplx-",
    "sk-",
    "ctx7_",
)
NO_REDACTIONS: Counter = Counter()  # shared: never mutated


@functools.cache
def base64_run() -> re.Pattern:
    return re.compile(r"[A-Za-z0-9+/]{33}")


def may_hold_secret(text: str) -> bool:
    return (
        any(map(text.lower().__contains__, PREFILTER_ANY_CASE))
        or any(map(text.__contains__, PREFILTER_LITERALS))
        or base64_run().search(text) is not None
    )


def redact(text: str) -> tuple[str, Counter]:
    """Apply SAFE-T1201; return the redacted text and the matches per label."""
    if not may_hold_secret(text):
        return text, NO_REDACTIONS
    counts: Counter = Counter()
    for label, pattern, replacement in redaction_rules():
        text, n = pattern.subn(replacement, text)
        if n:
            counts[label] += n
    return text, counts


def platform_content(content: str, kind: str, redaction: bool = True) -> tuple[str, Counter]:
    """What the live platform stores for a memory written to a namespace of this kind:
    redacted (unless --no-redact), then, in org namespaces, with the delimiter guard."""
    text, counts = redact(content) if redaction else (content, NO_REDACTIONS)
    if kind == "org":
        text = text.replace(MEMORY_DELIMITER, GUARDED_DELIMITER)
    return text, counts


# ---------------------------------------------------------------------------
# Planning a row: what the live platform would have written for it
# ---------------------------------------------------------------------------


def plan_row(row: LegacyRow, tree: WorkspaceTree, redaction: bool = True) -> Outcome:
    try:
        target = resolve_target(row.workspace_id, row.scope, tree)
    except RowSkipped as skip:
        skip.row = row
        return skip
    if row.unreadable:
        return RowFailed(row.unreadable, row)
    if not row.content.strip():
        return RowSkipped(SkipReason.EMPTY_CONTENT, row)
    content, counts = platform_content(row.content, target.kind, redaction)
    body: dict[str, object] = {
        "id": row.id,
        "content": content,
        "kind": "fact",
        "source": "agent",
        "propagation": {"legacy": row.legacy},
    }
    if row.embedding is not None:
        body["embedding"] = row.embedding
    return PlannedWrite(row, target, body, counts)


# ===========================================================================
# The adapters: PostgreSQL, the plugin, local files and the terminal, for every mode
# ===========================================================================


# ---------------------------------------------------------------------------
# A failed connection, in words (exception reprs end up in tickets and chats)
# ---------------------------------------------------------------------------

NOT_TLS_REASONS = (
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
)
URLLIB3_TIMEOUTS = ("ConnectTimeoutError", "ReadTimeoutError")  # not TimeoutError subclasses


def network_problem(
    error: BaseException, timeout: Optional[float] = None, waiting: str = "an answer"
) -> str:
    """What went wrong with a connection, said plainly: from the error or what caused it."""
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "its TLS certificate was not accepted: %s" % cause.verify_message
        if isinstance(cause, ssl.SSLError):
            if cause.reason in NOT_TLS_REASONS:
                return (
                    "it does not speak TLS there: is the URL https:// where the server speaks "
                    "plain http://?"
                )
            reason = str(cause.reason or "no reason given")
            return "the TLS handshake failed (%s)" % reason.lower().replace("_", " ")
        if isinstance(cause, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused: nothing listens on that port"
        if isinstance(cause, TimeoutError) or type(cause).__name__ in URLLIB3_TIMEOUTS:
            return (
                "no answer within %g s of %s" % (timeout, waiting)
                if timeout
                else "no answer in time"
            )
        if isinstance(cause, http.client.RemoteDisconnected):
            return "it closed the connection without an HTTP answer: does that port speak HTTP?"
        if isinstance(cause, http.client.BadStatusLine):
            return "it answered with something that is not HTTP: does that port speak HTTP?"
        if isinstance(cause, ConnectionResetError):
            return "the connection was reset"
        if isinstance(cause, ConnectionLost):
            return str(cause)
    strerror = getattr(error, "strerror", None) or getattr(error.__cause__, "strerror", None)
    return strerror.lower() if strerror else "the connection failed"


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error, and every error it names as its cause or carries (urllib3 wraps them)."""
    pending, seen = [error], set()
    while pending:
        cause = pending.pop(0)
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        yield cause
        named = (cause.__cause__, cause.__context__, getattr(cause, "reason", None), *cause.args)
        pending += [c for c in named if isinstance(c, BaseException)]


# ---------------------------------------------------------------------------
# The legacy database (pg8000, read only): contract §2
# ---------------------------------------------------------------------------

OPTIONAL_COLUMNS = ("namespace", "updated_at", "embedding")
FETCH_ROWS = 1000  # rows per FETCH from the server-side cursor
READ_ORDER = (
    "created_at ASC NULLS FIRST, id"  # -apply's order: oldest first, rows without a time first
)
# Timestamps are read as RFC 3339 text in UTC, formatted by the server:
# parsing them into datetimes only to print them again dominated -dry-run.
RFC3339_UTC = (
    "CASE WHEN isfinite({0}) THEN to_char({0} AT TIME ZONE 'UTC', "
    "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') ELSE {0}::text END"
)


class LegacyDatabase:
    """A read-only session on the platform's PostgreSQL, in one snapshot."""

    def __init__(self, config: DatabaseConfig):
        self.config = config
        self.connection = None
        self._columns: tuple[str, ...] = ()
        # A SQL_ASCII database (contract §2) holds any bytes, which the server sends as they are:
        # its text is read as bytes and decoded row by row (a row that is not UTF-8 is that row's
        # error, not the batch's).
        self.raw_text = False

    def __enter__(self) -> LegacyDatabase:
        self.connection = _connect(self.config)
        with self._errors():
            # One snapshot for the whole run; the session refuses writes.
            self.connection.run("START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            found = self.connection.run(
                "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = "
                "to_regclass('agent_memories') AND a.attnum > 0 AND NOT a.attisdropped"
            )
        if not found:
            raise DependencyError(
                "The legacy table agent_memories does not exist in %s (already migrated, or the "
                "wrong database); check DATABASE_URL." % self.config.describe()
            )
        self._columns = tuple(name for (name,) in found)
        with self._errors():
            [[encoding]] = self.connection.run("SELECT current_setting('server_encoding')")
        self.raw_text = encoding == "SQL_ASCII"
        return self

    def __exit__(self, *exc_info) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self.connection.close()

    def _errors(self):
        return _database_errors(self.config, connected=True)

    def read_workspaces(self) -> WorkspaceTree:
        with self._errors():
            has_status = self.connection.run(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('workspaces') AND attname "
                "= 'status' AND NOT attisdropped"
            )
            # Only whether it is 'removed' matters, and a status of any other bytes reads as NULL.
            status = (
                "CASE WHEN status::text = 'removed' THEN 'removed' END" if has_status else "NULL"
            )
            sql = "SELECT id::text, parent_id::text, %s FROM workspaces" % status  # noqa: S608
            return WorkspaceTree(self.connection.run(sql))

    def count_rows(
        self,
        workspaces: Optional[list[str]] = None,
        limit: Optional[int] = None,
        after: Optional[dict] = None,
    ) -> int:
        """How many rows rows() will yield (same snapshot, so exact)."""
        where, params = _row_filter(workspaces, after)
        sql = "SELECT count(*) FROM agent_memories" + where  # noqa: S608 - fixed text, bound values
        with self._errors():
            [[count]] = self.connection.run(sql, **params)
        return count if limit is None else min(count, limit)

    def rows(
        self,
        workspaces: Optional[list[str]] = None,
        limit: Optional[int] = None,
        after: Optional[dict] = None,
        tree: Optional[WorkspaceTree] = None,
    ) -> Iterator[LegacyRow]:
        """The rows of these workspaces (None: all), oldest first, after a checkpoint position,
        at most `limit`; with the `tree`: that same selection, one workspace after another in its
        reading order (WorkspaceTree.reading_order)."""
        if tree is not None:
            where, params = _selection(workspaces, limit, after)
            where = (
                " LEFT JOIN unnest(CAST(:tree_order AS uuid[])) WITH ORDINALITY AS "
                "tree_order(workspace, place) ON tree_order.workspace = workspace_id" + where
            )
            params["tree_order"] = tree.reading_order()
            order = " ORDER BY tree_order.place NULLS LAST, workspace_id, " + READ_ORDER
        else:  # only fixed text is spliced in
            where, params = _row_filter(workspaces, after)
            order = " ORDER BY " + READ_ORDER
            if limit is not None:
                order += " LIMIT :limit"
                params["limit"] = limit
        return self._stream(self._select() + where + order, params)

    def _select(self) -> str:
        """The columns of a LegacyRow; an optional column the tenant lacks reads as NULL."""
        as_text = {
            "namespace": self._text("namespace"),
            "updated_at": RFC3339_UTC.format("updated_at"),
            "embedding": "embedding::text",
        }
        select = [
            "id::text",
            "workspace_id::text",
            self._text("content"),
            self._text("scope"),
            RFC3339_UTC.format("created_at"),
        ]
        select += [as_text[name] if name in self._columns else "NULL" for name in OPTIONAL_COLUMNS]
        return "SELECT %s FROM agent_memories" % ", ".join(select)  # noqa: S608 - fixed column text

    def _stream(self, sql: str, params: dict) -> Iterator[LegacyRow]:
        """The rows of a query, through a server-side cursor, FETCH_ROWS at a time."""
        with self._errors():
            self.connection.run("DECLARE legacy_rows NO SCROLL CURSOR FOR " + sql, **params)
        while True:
            with self._errors():
                batch = self.connection.run("FETCH FORWARD %d FROM legacy_rows" % FETCH_ROWS)
            for record in batch:
                yield self._legacy_row(record)
            if len(batch) < FETCH_ROWS:
                break
        with self._errors():
            self.connection.run("CLOSE legacy_rows")

    def _text(self, column: str) -> str:
        return "convert_to(%s::text, 'SQL_ASCII')" % column if self.raw_text else column + "::text"

    def _legacy_row(self, record: Sequence) -> LegacyRow:
        row_id, workspace_id, content, scope, created_at, namespace, updated_at, embedding = record
        unreadable = None
        if self.raw_text:
            (content, scope, namespace), unreadable = _decoded(
                (("content", content), ("scope", scope), ("namespace", namespace))
            )
        legacy: dict[str, object] = {
            "workspace_id": workspace_id,
            "scope": scope,
            "created_at": created_at,
        }
        if "updated_at" in self._columns:
            legacy["updated_at"] = updated_at
        if "namespace" in self._columns:
            legacy["namespace"] = namespace
        return LegacyRow(
            row_id, workspace_id, content, scope, legacy, parse_embedding(embedding), unreadable
        )

    def workspaces_of(
        self, workspaces: Optional[list[str]] = None, limit: Optional[int] = None
    ) -> list[str]:
        """The workspaces that hold rows of that selection (as rows() makes it)."""
        where, params = _selection(workspaces, limit)
        with self._errors():
            sql = "SELECT DISTINCT workspace_id::text FROM agent_memories%s" % where  # noqa: S608
            return [w for (w,) in self.connection.run(sql, **params) if w is not None]

    def rows_per_namespace(self, tree: WorkspaceTree) -> Counter:
        """How many rows of the whole table -apply writes to each namespace (the finder's
        expectation).
        """
        counts: Counter = Counter()
        with self._errors():
            sql = "SELECT workspace_id::text, %s, count(*) FROM agent_memories GROUP BY 1, 2"
            found = self.connection.run(sql % self._text("scope"))  # noqa: S608 - a fixed column
        for workspace_id, scope, count in found:
            with contextlib.suppress(RowSkipped):
                counts[resolve_target(workspace_id, _as_text(scope), tree).namespace] += count
        return counts

    def targets_of(self, ids: list[str], tree: WorkspaceTree) -> dict[str, Optional[str]]:
        """For the ids of legacy rows: the namespace -apply writes each to (None: it skips it)."""
        if not ids:
            return {}
        with self._errors():
            found = self.connection.run(
                "SELECT id::text, workspace_id::text, %s FROM agent_memories "  # noqa: S608
                "WHERE id = ANY(CAST(:ids AS uuid[]))" % self._text("scope"),  # a fixed column
                ids=ids,
            )
        targets: dict[str, Optional[str]] = {}
        for row_id, workspace_id, scope in found:
            try:
                targets[row_id] = resolve_target(workspace_id, _as_text(scope), tree).namespace
            except RowSkipped:
                targets[row_id] = None
        return targets

    def have_search_words(self, texts: list[str]) -> list[bool]:
        """Whether PostgreSQL's English full-text parser finds any word in each text."""
        if not texts:
            return []
        with self._errors():
            return [
                found
                for (found,) in self.connection.run(
                    "SELECT numnode(plainto_tsquery('english', text)) > 0 FROM unnest(CAST(:texts "
                    "AS text[])) WITH ORDINALITY AS t(text, n) ORDER BY n",
                    texts=texts,
                )
            ]


def _as_text(value) -> str:
    """A text column as read: bytes from a SQL_ASCII database (LegacyDatabase.raw_text)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _decoded(
    columns: Iterable[tuple[str, Optional[bytes]]],
) -> tuple[list[Optional[str]], Optional[str]]:
    """Each column's bytes as UTF-8 text (undecodable bytes as U+FFFD), and why the row cannot be
    copied if any column is not UTF-8 (never its text)."""
    texts, unreadable = [], None
    for name, value in columns:
        try:
            texts.append(None if value is None else value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            texts.append(value.decode("utf-8", "replace"))
            unreadable = unreadable or (
                "its %s is not UTF-8 (byte %d of %d is 0x%02x); the live platform stores UTF-8 "
                "only: fix the row in the legacy database"
                % (name, exc.start + 1, len(value), value[exc.start])
            )
    return texts, unreadable


def _row_filter(
    workspaces: Optional[list[str]], after: Optional[dict]
) -> tuple[str, dict[str, object]]:
    """WHERE clause for the workspaces and a checkpoint position (in READ_ORDER)."""
    conditions, params = [], {}
    if workspaces is not None:
        conditions.append("workspace_id = ANY(CAST(:workspaces AS uuid[]))")
        params["workspaces"] = workspaces
    if after is not None:
        conditions.append(
            "(CASE WHEN CAST(:after_at AS timestamptz) IS NULL THEN created_at IS NOT NULL OR id > "
            "CAST(:after_id AS uuid) ELSE created_at > CAST(:after_at AS timestamptz) OR "
            "(created_at = CAST(:after_at AS timestamptz) AND id > CAST(:after_id AS uuid)) END)"
        )
        params["after_at"] = after["created_at"]
        params["after_id"] = after["id"]
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


def _selection(
    workspaces: Optional[list[str]], limit: Optional[int], after: Optional[dict] = None
) -> tuple[str, dict[str, object]]:
    """WHERE clause for the rows -apply selects, in any order: these workspaces' rows (after a
    checkpoint position), and with a limit only the first `limit` of them in READ_ORDER."""
    where, params = _row_filter(workspaces, after)
    if limit is None:
        return where, params
    params["limit"] = limit
    return (
        " WHERE id IN (SELECT id FROM agent_memories%s ORDER BY %s LIMIT :limit)"  # noqa: S608
        % (where, READ_ORDER)
    ), params


def _ssl_context(config: DatabaseConfig):
    """pg8000's ssl_context for a libpq sslmode (None = try TLS, else plain)."""
    mode = config.sslmode
    if mode == "require" and config.sslrootcert:
        mode = "verify-ca"  # libpq: require with a root certificate verifies it
    if mode in ("disable", "allow"):
        return False
    if mode == "prefer":
        return None
    if mode == "require":
        return True
    context = ssl.create_default_context(cadata=_root_certificates(config.sslrootcert))
    context.check_hostname = mode == "verify-full"
    return context


MAX_CERTIFICATE_FILE = 16 * 1024 * 1024


def _root_certificates(path: Optional[str]) -> Optional[str]:
    """The PEM text of sslrootcert (None: the system's certificates); UsageError if it is none."""
    if path is None:
        return None
    try:
        data = read_regular_file(path, MAX_CERTIFICATE_FILE)
        if data is None:
            raise FileRefused("does not exist")
        text = data.decode("ascii")
        ssl.create_default_context(cadata=text)
    except FileRefused as refused:
        problem = str(refused)
    except (UnicodeDecodeError, ssl.SSLError):
        problem = "holds no PEM certificate"
    else:
        return text
    raise UsageError(
        "The sslrootcert file %s %s; name a file of PEM CA certificates in DATABASE_URL."
        % (path, problem)
    )


READ_MARGIN_SECONDS = 10.0  # a statement's answer may take this much longer than the server's bound


def _connect(config: DatabaseConfig):
    """A read-only session whose every wait is bounded: connecting by connect_timeout; each
    statement, lock waits included, by the server (statement_timeout, lock_timeout); each read of an
    answer by the socket, a little later, for a server or network gone silent."""
    import pg8000.native

    bound = "%d" % (config.statement_timeout * 1000)  # milliseconds
    params = {
        **config.startup_params,
        "statement_timeout": bound,
        "lock_timeout": bound,
        "default_transaction_read_only": "on",  # the session refuses writes
        "client_encoding": "UTF8",  # a SQL_ASCII database would otherwise talk ASCII
    }
    unix_sock = None
    if config.host.startswith("/"):
        unix_sock = "%s/.s.PGSQL.%d" % (config.host, config.port)
    kwargs = dict(
        user=config.user,
        host=config.host,
        port=config.port,
        database=config.database,
        password=config.password,
        unix_sock=unix_sock,
        timeout=config.connect_timeout,
        application_name=config.application_name,
        startup_params=params,
    )
    with _database_errors(config):
        try:
            connection = pg8000.native.Connection(ssl_context=_ssl_context(config), **kwargs)
        except pg8000.native.DatabaseError as exc:
            # sslmode=allow: plain first, TLS when the server insists on it.
            if config.sslmode != "allow" or _sqlstate(exc) != "28000":
                raise
            connection = pg8000.native.Connection(ssl_context=True, **kwargs)
        except (AttributeError, pg8000.native.InterfaceError) as exc:
            # Asked for a password it was not given, pg8000 says so (or, for SCRAM, fails on None).
            if config.password is None and (
                isinstance(exc, AttributeError) or "password" in str(exc)
            ):
                raise config.no_password() from None
            raise
    # pg8000 keeps its connect timeout on the socket for good; connect_timeout bounds connecting
    # only.
    connection._usock.settimeout(config.statement_timeout + READ_MARGIN_SECONDS)
    return connection


def _sqlstate(exc: Exception) -> str:
    details = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return details.get("C", "")


class _database_errors:
    """Turn pg8000 and socket errors into one clear DependencyError sentence that names the
    database (never its password), what went wrong and what to check."""

    def __init__(self, config: DatabaseConfig, connected: bool = False):
        self.config = config
        self._connected = connected

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (BackfillError, GeneratorExit)):
            return False
        import pg8000.exceptions

        if isinstance(exc, pg8000.exceptions.DatabaseError):
            raise self._refused(
                _sqlstate(exc),
                exc.args[0].get("M", "") if isinstance(exc.args[0], dict) else str(exc),
            ) from None
        if isinstance(exc, (pg8000.exceptions.InterfaceError, OSError)):
            cause = exc.__cause__ or exc
            raise self._unreachable(
                cause,
                str(exc)
                if cause is exc and not isinstance(exc, OSError)
                else network_problem(
                    cause, self.config.connect_timeout, "connecting (connect_timeout in the URL)"
                ),
            ) from None
        return False

    def _refused(self, code: str, message: str) -> DependencyError:
        where, bound = self.config.describe(), self.config.statement_timeout
        if code in ("28P01", "28000"):
            return DependencyError(
                "The legacy database refused the login for %s (%s); check the user and password in "
                "DATABASE_URL." % (where, message)
            )
        if code in ("57014", "55P03"):  # statement_timeout, lock_timeout
            return DependencyError(
                "The legacy database %s did not finish a statement within %g s "
                "(--statement-timeout): another session may hold a lock on agent_memories (a "
                "migration takes ACCESS EXCLUSIVE), or the server is overloaded; check "
                "pg_stat_activity and pg_locks there, then run the same command again (with a "
                "larger --statement-timeout SECONDS if it is only slow)." % (where, bound)
            )
        if code.startswith(("57P", "08")) and self._connected:
            return self._lost(message)
        if code == "3D000":
            return DependencyError(
                "The legacy database %s does not exist; check the database name in DATABASE_URL."
                % where
            )
        return DependencyError(
            "The legacy database %s failed (SQLSTATE %s: %s); the run stopped, nothing further was "
            "written." % (where, code, message)
        )

    def _unreachable(self, cause: BaseException, detail: str) -> DependencyError:
        """`detail`: the driver's own words, or the cause's (network_problem)."""
        where = self.config.describe()
        if not self._connected:
            return DependencyError(
                "Cannot reach the legacy database %s (%s); check that it is running and that "
                "DATABASE_URL is right." % (where, detail)
            )
        if isinstance(cause, TimeoutError):
            return DependencyError(
                "The legacy database %s did not answer for %g s after a statement "
                "(--statement-timeout, plus %g s); check the network to it and its load, then run "
                "the same command again."
                % (where, self.config.statement_timeout + READ_MARGIN_SECONDS, READ_MARGIN_SECONDS)
            )
        return self._lost(detail)

    def _lost(self, detail: str) -> DependencyError:
        return DependencyError(
            "The connection to the legacy database %s was lost (%s); check that it is running, "
            "then run the same command again." % (self.config.describe(), detail)
        )


# ---------------------------------------------------------------------------
# The plugin over urllib3 (health, namespaces, searches), and the one retry rule: contract §4
# ---------------------------------------------------------------------------

RETRY_STATUSES = (429, 502, 503, 504)
OVERLOAD_STATUSES = (429, 503)  # the plugin says it has too much to do
BACKOFF_FACTOR, BACKOFF_MAX, BACKOFF_JITTER = 0.2, 4.0, 0.1  # seconds
RETRY_AFTER_MAX = 60.0  # a longer Retry-After is shortened to this
HEALTH_RETRIES = 2  # a plugin that is down at the start should fail the run fast


class RetryRule:
    """Every plugin request, through urllib3 or the write stream, is retried by this rule: after a
    lost connection or a timeout, and after an answer that says the plugin, not the request, failed
    (unwell()), up to `retries` times.  The first retry goes at once, the second after 0.4 s, and
    the wait doubles from there to at most 4 s, plus up to 0.1 s of jitter; a Retry-After from the
    plugin replaces that wait.  Every request is safe to repeat: writes carry the row's id, deletes
    name it.  It counts the retries it grants, and the last reason, for the progress line and the
    summary."""

    def __init__(self, retries: int):
        self.retries = retries
        self.granted = 0
        self.last_reason: Optional[str] = None
        self.lock = threading.Lock()  # -verify's searches ask from several threads

    @staticmethod
    def unwell(status: int, body: bytes = b"") -> Optional[str]:
        """Why an answer says the plugin was unwell, as a retry's reason; None when it answers the
        request. A 429/502/503/504, a status outside 100-599 (RFC 9110 §15: a server error), or a
        500 that says the plugin's own database is unavailable (store_unavailable)."""
        if status in RETRY_STATUSES or not 100 <= status <= 599:
            return "HTTP %d" % status
        if status == 500 and store_unavailable(body):
            return "HTTP 500, its database unavailable"
        return None

    @classmethod
    def retryable(cls, status: int, body: bytes = b"") -> bool:
        return cls.unwell(status, body) is not None

    def delay(
        self, attempt: int, retry_after: Optional[bytes] = None, reason: str = ""
    ) -> Optional[float]:
        """Seconds to wait before retry number `attempt` (from 1) of a request that failed for
        `reason`, or None: no retry left."""
        if attempt > self.retries:
            return None
        with self.lock:
            self.granted += 1
            self.last_reason = reason
        asked = parse_retry_after(retry_after) if retry_after is not None else None
        if asked is not None:
            return asked
        if attempt <= 1:
            return 0.0
        return min(
            BACKOFF_MAX, BACKOFF_FACTOR * 2 ** (attempt - 1) + random.random() * BACKOFF_JITTER
        )

    def describe(self) -> str:
        return (
            "retries %d (last: %s)" % (self.granted, self.last_reason)
            if self.granted
            else "retries 0"
        )


def parse_retry_after(value: bytes) -> Optional[float]:
    """Retry-After (RFC 9110 §10.2.3) in seconds from now: delay-seconds or an HTTP-date;
    None when it is neither."""
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return min(float(text), RETRY_AFTER_MAX)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - time.time()), RETRY_AFTER_MAX)


SEARCH_CAP = 100  # the plugin returns at most this many rows per search (contract §4)
USER_AGENT = "%s/%s" % (PROG, __version__)


class PluginClient:
    """The memory plugin's HTTP API, over one urllib3 pool of keep-alive connections,
    every request retried by RetryRule."""

    def __init__(
        self,
        address: PluginAddress,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        connections: int = 1,
    ):
        import urllib3

        self.address = address
        self.timeout = timeout
        self.retry = RetryRule(retries)
        self.searches = 0  # made so far (-verify and -rollback report them)
        self._counting = threading.Lock()
        pool = urllib3.HTTPSConnectionPool if address.tls else urllib3.HTTPConnectionPool
        self.pool = pool(
            "[%s]" % address.host if ":" in address.host else address.host,
            address.port,
            maxsize=connections,
            block=True,
            retries=False,
            timeout=urllib3.Timeout(total=timeout),
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
        )

    def _request(
        self, method: str, path: str, body: Optional[dict] = None, rule: Optional[RetryRule] = None
    ):
        import urllib3

        rule = rule or self.retry
        payload = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        attempt = 0
        while True:
            try:
                response = self.pool.urlopen(method, self.address.prefix + path, body=payload)
            except urllib3.exceptions.HTTPError as exc:
                attempt += 1
                delay = rule.delay(
                    attempt,
                    reason="no answer"
                    if isinstance(exc, urllib3.exceptions.TimeoutError)
                    else "connection failed",
                )
                if delay is None:
                    raise plugin_unreachable(self.address, exc, self.timeout) from None
            else:
                reason = rule.unwell(response.status, response.data)
                if reason is None:
                    break
                attempt += 1
                retry_after = response.headers.get("Retry-After")
                delay = rule.delay(
                    attempt, None if retry_after is None else retry_after.encode("latin-1"), reason
                )
                if delay is None:
                    break
            time.sleep(delay)
        if response.status >= 400:
            raise PluginRejected(
                response.status, plugin_error_message(response.data, response.reason)
            )
        try:
            return json.loads(response.data.decode("utf-8")) if response.data else None
        except ValueError:
            return None

    def check_health(self) -> str:
        """Raise DependencyError unless /v1/health says ok; return its version."""
        address = self.address
        try:
            data = self._request(
                "GET", "/v1/health", rule=RetryRule(min(HEALTH_RETRIES, self.retry.retries))
            )
        except PluginRejected as exc:
            if exc.status == 404:  # no plugin answers 404 there: the URL is wrong, not the plugin
                raise DependencyError(
                    "%s %s answers 404 at %s/v1/health: check the URL's path and port (the memory "
                    "plugin's base URL, such as %s, has no /v1)."
                    % (
                        "The default plugin URL" if address.default else address.named_by,
                        address.url,
                        address.url,
                        DEFAULT_PLUGIN_URL,
                    )
                ) from None
            raise DependencyError(
                "The memory plugin at %s is not healthy (%s); fix the plugin, then run again."
                % (address.url, exc)
            ) from None
        if not isinstance(data, dict) or data.get("status") != "ok":
            raise DependencyError(
                "The memory plugin at %s did not report status ok on /v1/health; check that %s "
                "names the memory plugin, then run again." % (address.url, address.named_by)
            )
        return str(data.get("version", "unknown"))

    def health_problem(self) -> Optional[str]:
        """What /v1/health says when it is not ok, asked once (no retry); None when it is ok."""
        try:
            data = self._request("GET", "/v1/health", rule=RetryRule(0))
        except PluginRejected as exc:
            return "its /v1/health answers %s" % exc
        except DependencyError:
            return "its /v1/health does not answer"
        if isinstance(data, dict) and data.get("status") == "ok":
            return None
        return "its /v1/health does not say ok"

    def put_namespace(self, name: str, kind: str) -> None:
        self._request("PUT", "/v1/namespaces/" + quote(name, safe=""), {"kind": kind})

    def search(self, namespaces: list[str], query: Optional[str] = None) -> list[dict]:
        body: dict[str, object] = {"namespaces": namespaces, "limit": SEARCH_CAP}
        if query:
            body["query"] = query
        with self._counting:
            self.searches += 1
        data = self._request("POST", "/v1/search", body)
        memories = (data or {}).get("memories") or []  # the plugin may send null
        return [m for m in memories if isinstance(m, dict) and isinstance(m.get("id"), str)]


def plugin_unreachable(
    address: PluginAddress, error: BaseException, timeout: float
) -> DependencyError:
    if address.default:
        advice = (
            "the default, as MEMORY_PLUGIN_URL is not set; set it (or --plugin-url) if the plugin "
            "listens elsewhere"
        )
    else:
        advice = "check that it is running and that %s is right" % address.named_by
    return DependencyError(
        "Cannot reach the memory plugin at %s (%s); %s."
        % (address.url, network_problem(error, timeout, "a request (--timeout)"), advice)
    )


def plugin_rejected(response: Response) -> PluginRejected:
    """The plugin's refusal of a request sent on the write stream."""
    return PluginRejected(
        response.head.status, plugin_error_message(response.body, response.head.reason)
    )


def plugin_error_message(body: bytes, reason: Optional[str]) -> str:
    """The message of the plugin's error envelope (or its health's status), or the HTTP reason
    phrase.
    """
    data = _envelope(body)
    text = " ".join(str(data.get("message") or data.get("status") or reason or "").split())
    return text if len(text) <= 200 else text[:200] + "..."


def _envelope(body: bytes) -> dict:
    """The plugin's JSON answer as a dict ({} when it is not one)."""
    try:
        data = json.loads(body.decode("utf-8")) if body else None
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {}


# What a plugin's 500 says when its own PostgreSQL cannot be reached (a restart, a failover): a
# SQLSTATE of class 08 (connection exception), 57P01-57P03 (shut down, starting up), 53300 (too many
# clients), or the words its driver uses for them.
STORE_DOWN = re.compile(
    r"\b(?:08[0-9A-Z]{3}|57P0[1-3]|53300)\b|(?i:the database system is|terminating "
    r"connection|connection refused|bad connection|connection reset|broken pipe|server closed the "
    r"connection|no connection to the server|could not connect|too many clients|unexpected EOF)"
)


def store_unavailable(body: bytes) -> bool:
    """Whether a 500's body says the plugin's database is unavailable (contract §4: the
    `unavailable` code), rather than that the request failed."""
    data = _envelope(body)
    if data.get("code") == "unavailable":
        return True
    text = data.get("message") if data else body[:1000].decode("utf-8", "replace")
    return isinstance(text, str) and STORE_DOWN.search(text) is not None


# ---------------------------------------------------------------------------
# HTTP/1.1 response framing (sans-I/O): RFC 9112
# ---------------------------------------------------------------------------

# The grammar's pieces, named once (RFC 9110 §5.1, §5.5; RFC 9112 §4, §5, §7.1).
TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
FIELD_TEXT = (
    rb"[\t\x20-\x7e\x80-\xff]*"  # SP, HTAB, VCHAR, obs-text: no CR, LF, NUL or other control
)
STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([0-9]{3})(?: (" + FIELD_TEXT + rb"))?")
FIELD_LINE = re.compile(rb"(" + TOKEN + rb"):(" + FIELD_TEXT + rb")")
CONTINUATION_LINE = re.compile(rb"[\t ]" + FIELD_TEXT)  # obs-fold: part of the line before
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)[\t ]*(?:;" + FIELD_TEXT + rb")?")

MAX_RESPONSE_HEAD = 64 * 1024  # a status line and its field lines, with every CRLF
MAX_CHUNK_LINE = 4096  # a chunk size line with its extensions, without its CRLF
MAX_TRAILERS = 64 * 1024  # a chunked body's trailer section, with every CRLF
MAX_RESPONSE_BODY = 1024 * 1024  # the plugin's answers to a write are a few hundred bytes


class Framing(Enum):
    """How a response's body ends (RFC 9112 §6.3)."""

    LENGTH = "length"  # after `length` bytes (0 for 1xx, 204, 304)
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until close"


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: str
    fields: tuple[tuple[bytes, bytes], ...]  # (name in lower case, value), obs-folds unfolded
    framing: Framing
    length: int  # of the body, for Framing.LENGTH
    persistent: bool  # the connection takes further requests after this response

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200

    def field(self, name: bytes) -> Optional[bytes]:
        return field_value(self.fields, name)


class Response(NamedTuple):
    head: ResponseHead
    body: bytes


def field_value(fields: Iterable[tuple[bytes, bytes]], name: bytes) -> Optional[bytes]:
    """A field's value (name in lower case); repeated fields joined by ", " (RFC 9110 §5.3)."""
    values = [value for key, value in fields if key == name]
    return b", ".join(values) if values else None


def _tokens(value: Optional[bytes]) -> list[bytes]:
    return [] if value is None else [item.strip().lower() for item in value.split(b",")]


def parse_field_lines(
    lines: Iterable[bytes], what: str = "header"
) -> tuple[tuple[bytes, bytes], ...]:
    """Field lines as (name in lower case, value); an obs-fold line continues the one before
    it, as one space (RFC 9112 §5.2)."""
    fields: list[tuple[bytes, list[bytes]]] = []  # (name, the value's parts, one per line)
    for line in lines:
        field_line = FIELD_LINE.fullmatch(line)
        if field_line is not None:
            fields.append((field_line.group(1).lower(), [field_line.group(2).strip(b" \t")]))
        elif fields and CONTINUATION_LINE.fullmatch(line):
            fields[-1][1].append(line.strip(b" \t"))
        else:
            raise ProtocolError("a malformed %s field line: %r" % (what, line[:40]))
    return tuple((name, b" ".join(part for part in parts if part)) for name, parts in fields)


@functools.lru_cache(maxsize=64)
def parse_response_head(head: bytes) -> ResponseHead:
    """A response head (status line and field lines, each with its CRLF).  Cached and
    immutable: a server sends the same few heads again and again."""
    lines = head.split(b"\r\n")[:-1]
    status_line = STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise ProtocolError("%r where an HTTP/1.x status line should be" % lines[0][:40])
    fields = parse_field_lines(lines[1:])
    status = int(status_line.group(2))
    http11 = status_line.group(1) != b"0"  # HTTP/1.x, x > 1, reads as 1.1 (RFC 9110 §2.5)
    persistent = http11 and b"close" not in _tokens(field_value(fields, b"connection"))
    transfer_encoding = field_value(fields, b"transfer-encoding")
    content_length = field_value(fields, b"content-length")
    framing, length = Framing.LENGTH, 0
    if status == 101:
        raise ProtocolError("101 Switching Protocols, which nothing asked for")
    if content_length is not None:
        length = parse_content_length(content_length)
    if 100 <= status < 200 or status in (204, 304):
        length = 0  # no body, whatever the fields say (RFC 9112 §6.3)
    elif transfer_encoding is not None:
        if not http11 or content_length is not None:  # RFC 9112 §6.1, §6.3
            raise ProtocolError(
                "Transfer-Encoding with %s" % ("Content-Length" if http11 else "HTTP/1.0")
            )
        if _tokens(transfer_encoding) != [b"chunked"]:
            raise ProtocolError("a transfer coding other than chunked: %r" % transfer_encoding[:40])
        framing = Framing.CHUNKED
    elif length > MAX_RESPONSE_BODY:
        raise ProtocolError(
            "a Content-Length over %d bytes: %r" % (MAX_RESPONSE_BODY, content_length[:40])
        )
    elif content_length is None:
        framing, persistent = Framing.UNTIL_CLOSE, False
    reason = (status_line.group(3) or b"").decode("latin-1")
    return ResponseHead(status, reason, fields, framing, length, persistent)


def parse_content_length(value: bytes) -> int:
    """1*DIGIT, or a list of that same value (RFC 9112 §6.3); leading zeros allowed.  A value
    too long to be a body here reads as MAX_RESPONSE_BODY + 1."""
    values = {item.strip() for item in value.split(b",")}
    text = values.pop()
    if values or not text.isdigit():  # bytes.isdigit(): ASCII digits only
        raise ProtocolError("an invalid Content-Length: %r" % value[:40])
    number = text.lstrip(b"0") or b"0"
    return int(number) if len(number) <= 7 else MAX_RESPONSE_BODY + 1


class ReceiveBuffer(bytearray):
    """The bytes received and not yet parsed.  A search for a line end goes on where the last one
    stopped, so each byte is looked at once however the bytes are split (`scanned` counts what the
    searches looked at)."""

    _looked = 0  # how far the search for the current line's end has looked
    scanned = 0

    def line_end(self, needle: bytes = b"\r\n") -> int:
        """Where the next `needle` starts, or -1."""
        start = max(0, self._looked - len(needle) + 1)
        end = self.find(needle, start)
        self.scanned += (end + len(needle) if end >= 0 else len(self)) - start
        self._looked = 0 if end >= 0 else len(self)
        return end

    def take(self, size: int) -> bytes:
        data = bytes(self[:size])
        del self[:size]  # from the front of a bytearray: no copy of the rest
        return data


class BodyReader:
    """How a response's body ends: one reader per framing (READERS), owning its state."""

    def __init__(self, head: ResponseHead):
        self._length = head.length

    def read(self, buffer: ReceiveBuffer) -> Optional[bytes]:
        """The whole body once it is in the buffer, else None."""
        return buffer.take(self._length) if len(buffer) >= self._length else None

    def end_of_stream(self, buffer: ReceiveBuffer) -> Optional[bytes]:
        """The body the server's close completes, or None: the close cut it short."""
        return None


class UntilCloseReader(BodyReader):
    """An HTTP/1.0 body without a length: whatever comes until the server closes."""

    def read(self, buffer: ReceiveBuffer) -> Optional[bytes]:
        if len(buffer) > MAX_RESPONSE_BODY:
            raise ProtocolError("a body longer than %d bytes" % MAX_RESPONSE_BODY)
        return None

    def end_of_stream(self, buffer: ReceiveBuffer) -> Optional[bytes]:
        return buffer.take(len(buffer))


class ChunkedReader(BodyReader):
    """Chunks, then the trailer section (RFC 9112 §7.1), read on from where the last call stopped:
    `_state` reads the next part, and returns True to go on, None for more bytes, or the whole body.
    """

    def __init__(self, head: ResponseHead):
        self._state = self._size_line
        self._left = 0  # of the current chunk
        self.body = bytearray()
        self._trailers, self._trailer_bytes = [], 0

    def read(self, buffer: ReceiveBuffer) -> Optional[bytes]:
        step = True
        while step is True:
            step = self._state(buffer)
        return step

    def _size_line(self, buffer: ReceiveBuffer) -> Optional[bool]:
        end = buffer.line_end()
        if end > MAX_CHUNK_LINE or (end < 0 and len(buffer) >= MAX_CHUNK_LINE + 2):
            raise ProtocolError("a chunk size line longer than %d bytes" % MAX_CHUNK_LINE)
        if end < 0:
            return None
        size_line = CHUNK_SIZE_LINE.fullmatch(buffer, 0, end)
        if size_line is None:
            raise ProtocolError("a malformed chunk size line: %r" % bytes(buffer[: min(end, 40)]))
        digits = size_line.group(1).lstrip(b"0") or b"0"  # 1*HEXDIG: leading zeros allowed
        if len(digits) > 8 or len(self.body) + int(digits, 16) > MAX_RESPONSE_BODY:
            raise ProtocolError("a body longer than %d bytes" % MAX_RESPONSE_BODY)
        del buffer[: end + 2]
        self._left = int(digits, 16)
        self._state = self._data if self._left else self._trailer_line
        return True

    def _data(self, buffer: ReceiveBuffer) -> Optional[bool]:
        """A chunk's data, and the CRLF after it."""
        data = buffer.take(self._left)
        self.body += data
        self._left -= len(data)
        if self._left or len(buffer) < 2:
            return None
        if buffer[:2] != b"\r\n":
            raise ProtocolError("a chunk longer than its size line says")
        del buffer[:2]
        self._state = self._size_line
        return True

    def _trailer_line(self, buffer: ReceiveBuffer) -> Union[None, bool, bytes]:
        end = buffer.line_end()
        if self._trailer_bytes + (end + 2 if end >= 0 else len(buffer)) > MAX_TRAILERS:
            raise ProtocolError("a trailer section longer than %d bytes" % MAX_TRAILERS)
        if end < 0:
            return None
        self._trailer_bytes += end + 2
        line = buffer.take(end + 2)[:-2]
        if line:
            self._trailers.append(line)
            return True
        parse_field_lines(self._trailers, "trailer")  # validated, then not needed
        return bytes(self.body)


READERS = {
    Framing.LENGTH: BodyReader,
    Framing.CHUNKED: ChunkedReader,
    Framing.UNTIL_CLOSE: UntilCloseReader,
}


class ResponseParser:
    """Cuts the bytes a server sends into responses, by the protocol's framing (h11's pattern: one
    small reader per framing, chosen from READERS, over one incremental buffer).

    feed() what arrived, then take next_response() until it returns None (more bytes needed);
    end_of_stream() when the server closed.  1xx responses are skipped; after a response that closes
    the connection nothing more is read. Anything that is not HTTP/1.x raises ProtocolError.  Each
    byte fed is looked at a bounded number of times, however the bytes are split, and each limit
    holds the same."""

    def __init__(self):
        self._buffer = ReceiveBuffer()
        self._response: Optional[ResponseHead] = None  # the response whose body is being read
        self._reader: Optional[BodyReader] = None
        self.closed = False  # a response that ends the connection was read

    @property
    def scanned(self) -> int:
        return self._buffer.scanned

    def feed(self, data: bytes) -> None:
        if not self.closed:
            self._buffer += data

    def next_response(self) -> Optional[Response]:
        while self._response is None:
            if self.closed:
                return None
            head = self._read_head()
            if head is None:
                return None
            if not head.interim:
                self._response, self._reader = head, READERS[head.framing](head)
        body = self._reader.read(self._buffer)
        return None if body is None else self._complete(body)

    def end_of_stream(self) -> Optional[Response]:
        """The server closed: the response its close completes, or None when nothing was pending."""
        body = None if self._response is None else self._reader.end_of_stream(self._buffer)
        if body is not None:
            return self._complete(body)
        if self._response is not None or (self._buffer and not self.closed):
            raise ConnectionLost("the connection closed in the middle of a response")
        return None

    def _complete(self, body: bytes) -> Response:
        head, self._response, self._reader = self._response, None, None
        if not head.persistent:
            self.closed = True
            self._buffer.clear()
        return Response(head, body)

    def _read_head(self) -> Optional[ResponseHead]:
        if not self._buffer.startswith(b"HTTP/1."[: len(self._buffer)]):
            raise ProtocolError(
                "%r where an HTTP/1.x status line should be" % bytes(self._buffer[:24])
            )
        end = self._buffer.line_end(b"\r\n\r\n")
        if end + 4 > MAX_RESPONSE_HEAD or (end < 0 and len(self._buffer) >= MAX_RESPONSE_HEAD):
            raise ProtocolError("a response head longer than %d bytes" % MAX_RESPONSE_HEAD)
        if end < 0:
            return None
        return parse_response_head(self._buffer.take(end + 4)[:-2])


# ---------------------------------------------------------------------------
# The write stream: pipelined HTTP/1.1 requests on sockets, as many at once as the plugin takes
# ---------------------------------------------------------------------------

# urllib3 costs several times the CPU of this per request, and in a tenant that
# CPU is taken from the plugin and the live platform.  One loop drives every
# connection (no threads, no locks).  -apply's POSTs and -rollback's DELETEs
# go through it; the plugin's other calls use urllib3.

PIPELINE_DEPTH = 4  # requests in flight on one connection at most
READ_AHEAD_ROWS = 64  # rows planned in one go, between reads of answers
MAX_PACE_SECONDS = 0.01  # the longest pause between reads of answers (see WriteStream._wait)
RECEIVE_BYTES = 65536
IDLE_CHECK_SECONDS = 1.0  # a connection idle this long is checked before it is used again
STOP_CHECK_SECONDS = 0.25  # the loop notices a signal at least this often
HEALTH_RECHECK_SECONDS = 1.0  # a 500 asks /v1/health again at most this often
# The limiter's hill climb: a window of at least LIMIT_WINDOW_SECONDS and LIMIT_WINDOW_ANSWERS
# answers per connection measures the plugin's throughput at one number of connections; twice as
# many must give THROUGHPUT_GAIN more to be kept.
LIMIT_WINDOW_SECONDS = 0.3
LIMIT_WINDOW_ANSWERS = 8
THROUGHPUT_GAIN = 0.10
START_CONNECTIONS = 8  # where the climb starts
# Held at a level, the limiter tries half as many and twice as many again after PROBE_FIRST_SECONDS,
# then after twice as long each time the level holds, up to PROBE_SECONDS: a single window can
# mislead.
PROBE_FIRST_SECONDS, PROBE_SECONDS = 2.0, 10.0
HELD_RATE_WEIGHT = 0.3  # the held level's rate: a moving average of its windows


class ConcurrencyLimit:
    """How many connections keep a request at the plugin: the plugin serves a connection's requests
    one at a time (contract §4), so this is how many of ours it works on at once.

    Pure: fed each answer (when it came, and when its request was sent), it measures the plugin's
    throughput at the current number of connections, counting only requests sent since that number
    was set (so that a change is measured once the pipelines have refilled).  It climbs a hill on a
    log scale: from START_CONNECTIONS it doubles while a doubling gives THROUGHPUT_GAIN more; when
    one does not, it goes back to the level below, the knee: the fewest connections that get about
    the most the plugin serves, and so the least queue for the live tenant's requests behind ours.
    Held there PROBE_SECONDS, it tries half as many (kept if the plugin serves about as much:
    gentler for the same rate) and then twice as many (kept if it serves more: the plugin may have
    been busy elsewhere).  A step down on a measurement (a doubling that did not pay, fewer kept)
    rests on two windows.  An overload answer (429, 503) or a lost connection halves it at once.
    Never above `ceiling`, never below 1."""

    def __init__(self, ceiling: int):
        self.ceiling = ceiling
        self.connections = min(START_CONNECTIONS, ceiling)
        # answers per second measured at each number of connections
        self._rates: dict[int, float] = {}
        self._climbing = True  # doubling until a doubling does not pay
        # a probe's level is being measured; back to this one otherwise
        self._trying: Optional[int] = None
        self._held_since = 0.0
        self._probe_after = PROBE_FIRST_SECONDS
        self._doubt: Optional[float] = None  # a first window that says to go down, to confirm
        self._restart(0.0)

    def _restart(self, now: float) -> None:
        """Measure from now: only requests sent from now on count."""
        self.since, self._window_start, self.answers = now, None, 0

    def _set(self, connections: int, now: float) -> None:
        self.connections = max(1, min(self.ceiling, connections))
        self._doubt = None
        self._restart(now)

    def _confirmed(self, rate: float, now: float) -> Optional[float]:
        """A step down rests on two windows: None after the first (measure again), then the mean of
        both (a single window can mislead by more than THROUGHPUT_GAIN)."""
        if self._doubt is None:
            self._doubt = rate
            self._restart(now)
            return None
        return (self._doubt + rate) / 2

    def answered(self, now: float, sent_at: float) -> None:
        if sent_at < self.since:
            return
        if self._window_start is None:
            self._window_start = now
            return
        self.answers += 1
        elapsed = now - self._window_start
        if (
            elapsed >= LIMIT_WINDOW_SECONDS
            and self.answers >= LIMIT_WINDOW_ANSWERS * self.connections
        ):
            self.decide(self.answers / elapsed, now)

    def decide(self, rate: float, now: float) -> None:
        """What one window measured: the plugin served `rate` answers a second at this many
        connections."""
        level = self.connections
        held = self._rates.get(level) if not (self._climbing or self._trying) else None
        self._rates[level] = rate if held is None else held + HELD_RATE_WEIGHT * (rate - held)
        if self._trying is not None:
            self._probed(level, rate, now)
        elif self._climbing:
            below = self._rates.get(level // 2)
            unpaid = below is not None and level > 1 and rate < below * (1 + THROUGHPUT_GAIN)
            if unpaid:
                rate = self._confirmed(rate, now)
                if rate is None:
                    return
                self._rates[level] = rate
                unpaid = rate < below * (1 + THROUGHPUT_GAIN)
            if unpaid:
                self._hold(level // 2, now)  # the doubling did not pay: the knee is below
            elif level >= self.ceiling:
                self._hold(level, now)
            else:
                self._set(level * 2, now)
        elif now - self._held_since >= self._probe_after and level > 1:
            self._trying = level
            self._set(level // 2, now)
        elif now - self._held_since >= self._probe_after and level < self.ceiling:
            self._trying = level
            self._set(level * 2, now)
        else:
            self._restart(now)

    def _probed(self, level: int, rate: float, now: float) -> None:
        """A probe's window, from the level held (`trying`): keep fewer if they serve as much
        (within a third of the gain: a halving gives up less than a doubling must win), or more if
        they serve THROUGHPUT_GAIN more; after fewer did not, try more; else go back."""
        held = self._trying
        as_much = level < held and rate >= self._rates[held] * (1 - THROUGHPUT_GAIN / 3)
        if as_much:
            rate = self._confirmed(rate, now)
            if rate is None:
                return
            as_much = rate >= self._rates[held] * (1 - THROUGHPUT_GAIN / 3)
        self._trying = None
        if as_much:
            self._hold(level, now)
        elif level > held and rate >= self._rates[held] * (1 + THROUGHPUT_GAIN):
            self._climbing = True
            if level < self.ceiling:
                self._set(level * 2, now)
            else:
                self._hold(level, now)
        elif level < held and held < self.ceiling:
            self._trying = held
            self._set(held * 2, now)
        else:
            self._hold(held, now, again=True)

    def _hold(self, connections: int, now: float, again: bool = False) -> None:
        """Hold a level: probe it after PROBE_FIRST_SECONDS, or `again` (a probe came back to it)
        after twice as long as last time."""
        self._probe_after = (
            min(PROBE_SECONDS, self._probe_after * 2) if again else PROBE_FIRST_SECONDS
        )
        self._climbing = False
        self._held_since = now
        self._set(connections, now)

    def overloaded(self, now: float) -> None:
        """The plugin said it is overloaded (429, 503): half as many, at most once per window."""
        if now - self.since >= LIMIT_WINDOW_SECONDS:
            self._trying = None
            self._hold(self.connections // 2, now)

    def idle(self) -> None:
        """Nothing is in flight (the mode works on something else): no window spans it."""
        self._window_start, self.answers = None, 0

    def stalled(self, now: float) -> None:
        """A connection failed or an answer timed out."""
        self._trying = None
        self._hold(self.connections // 2, now)


class LoadStatistics:
    """What the stream did to the plugin, for the progress line and the summary: answers and their
    latency (from sending a request to its whole answer; percentiles in flat memory, from counts in
    buckets 5 % wide, 10 µs to 1000 s), writes in flight while there was more to send, and the
    seconds from the first request to the last answer."""

    EDGES = [1e-5 * 1.05**bucket for bucket in range(int(math.log(1e8) / math.log(1.05)) + 1)]

    def __init__(self):
        self._counts = [0] * (len(self.EDGES) + 1)  # the last: beyond the last edge
        self.answers = 0
        self._in_flight_range: Optional[tuple[int, int]] = None
        self._first_sent: Optional[float] = None
        self._last_answer = 0.0

    def sent(self, now: float, in_flight: int, more: bool) -> None:
        if self._first_sent is None and in_flight:
            self._first_sent = now
        if more:
            low, high = self._in_flight_range or (in_flight, in_flight)
            self._in_flight_range = (min(low, in_flight), max(high, in_flight))

    def answered(self, now: float, sent_at: float) -> None:
        self.answers += 1
        self._last_answer = now
        self._counts[bisect.bisect_left(self.EDGES, now - sent_at)] += 1

    def latency_ms(self, q: float) -> Optional[float]:
        """The upper edge of the bucket that holds the q-quantile, or None with no answers."""
        wanted, seen = q * self.answers, 0
        for bucket, count in enumerate(self._counts if self.answers else ()):
            seen += count
            if seen >= wanted:
                return round(self.EDGES[min(bucket, len(self.EDGES) - 1)] * 1e3, 2)
        return None

    def to_json(self) -> dict[str, object]:
        low, high = self._in_flight_range or (0, 0)
        return {
            "answered": self.answers,
            "in_flight_min": low,
            "in_flight_max": high,
            "seconds": round(self._last_answer - self._first_sent, 3) if self._first_sent else 0.0,
            "latency_p50_ms": self.latency_ms(0.5),
            "latency_p99_ms": self.latency_ms(0.99),
        }


class Pacing:
    """When the stream sends and when it reads.  --max-rate: requests go evenly spaced, at `rate` a
    second; a slot taken late (the loop woke up after it) moves the next one less, so that lateness
    does not add up, and no request goes more than one slot early.  With the write window full,
    answers are read only every so often: about the time the plugin takes to answer half of the
    window, so that each system call carries several requests and responses (on loopback one send
    and one receive cost more CPU than reading and planning a row) while the plugin works on the
    other half."""

    def __init__(self, max_rate: float):
        self.interval = 1.0 / max_rate if max_rate else 0.0
        self.next_slot = 0.0
        self._last_wait = float("-inf")  # when a request last had to wait for the cap
        self._answer_rate = 0.0  # responses per second, a moving average, while the window is full
        self._read_every = 0.0
        self._last_read = 0.0

    def send_delay(self, now: float) -> float:
        """0 when a request may go now (it takes the slot), else the seconds until it may."""
        if now < self.next_slot:
            self._last_wait = now
            return self.next_slot - now
        self.next_slot = max(self.next_slot, now - self.interval) + self.interval
        return 0.0

    def capping(self) -> bool:
        return time.monotonic() - self._last_wait < 2.0

    def read_pause(self, now: float, full: bool) -> float:
        """Seconds to wait before the next read of answers."""
        return max(0.0, self._last_read + self._read_every - now) if full else 0.0

    def read(self, now: float, answers: int, window: int, full: bool) -> None:
        """A read brought `answers` for a `window` of requests, full or not."""
        if full and answers:
            rate = answers / max(now - self._last_read, 1e-6)
            self._answer_rate = (
                rate if not self._answer_rate else 0.8 * self._answer_rate + 0.2 * rate
            )
            self._read_every = min(MAX_PACE_SECONDS, 0.5 * window / self._answer_rate)
        self._last_read = now


JSON_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), check_circular=False)


def request_head(address: PluginAddress, method: str, path: str) -> bytes:
    """A request up to its Content-Length value (the length and the body follow)."""
    return (
        "%s %s%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nContent-Type: "
        "application/json\r\nContent-Length: "
        % (method, address.prefix, path, address.host_header, USER_AGENT)
    ).encode("ascii")


def with_body(head: bytes, payload: bytes) -> bytes:
    return b"%s%d\r\n\r\n%s" % (head, len(payload), payload)


class StreamMode(Protocol):
    """What WriteStream.drive drives: a mode's side of the write stream (-apply's ApplyWrites,
    -rollback's RollbackDeletes)."""

    def fill(self, room: int) -> bool:
        """Submit up to `room` more jobs (WriteStream.submit); False once there are no more."""

    def answered(self, job: Job, response: Response) -> None:
        """Take a job's final answer: any status but those RetryRule retries
        (WriteStream._answered).
        """


class Job:
    """One request on its way to the plugin, and what it is for."""

    __slots__ = ("number", "item", "request", "retries", "not_before", "sent_at")

    def __init__(self, number: int, item, request: bytes):
        self.number = number  # in the mode's order
        self.item = item  # the mode's: a PlannedWrite, or what a delete removes
        self.request = request
        self.retries = 0
        self.not_before = 0.0  # monotonic time before which it is not sent again
        self.sent_at = 0.0  # --timeout runs from here


class WriteConnection:
    """One keep-alive connection to the plugin and the requests in flight on it, oldest first.

    It pipelines only once it has answered as a persistent HTTP/1.1 connection; until then it
    carries one request at a time, so a server that answers once and closes, or speaks HTTP/1.0,
    still gets every request. The socket is non-blocking: a timeout on it would cost a poll() before
    every send and receive."""

    def __init__(self, address: PluginAddress, tls_context, timeout: float, received: memoryview):
        self.address = address
        self.tls_context = tls_context
        self.received = received  # the stream's one receive buffer (one loop reads them all)
        self._would_block: tuple[type, ...] = (BlockingIOError,)
        if tls_context is not None:
            self._would_block += (ssl.SSLWantReadError, ssl.SSLWantWriteError)
        self.timeout = timeout
        self._sock = None
        self._parser: Optional[ResponseParser] = None
        self.outgoing = b""  # requests the socket has not taken yet
        self.in_flight: deque[Job] = deque()
        self.pipelining = False
        self._last_used = 0.0

    def fileno(self) -> int:
        return self._sock.fileno()

    def free_slots(self, depth: int) -> int:
        if self.pipelining:
            return depth - len(self.in_flight)
        return 0 if self.in_flight else 1

    def deadline(self) -> float:
        """When the oldest request in flight runs out of time (--timeout): its answer, interim
        responses and dripped bytes included, must be complete by then."""
        return self.in_flight[0].sent_at + self.timeout

    def send(self, jobs: list[Job], now: float) -> None:
        """Send the requests, pipelined; on OSError they stay in flight, unanswered."""
        if (
            self._sock is not None
            and not self.in_flight
            and now - self._last_used > IDLE_CHECK_SECONDS
            and select.select([self._sock], [], [], 0)[0]
        ):
            self.close()  # closed by the server while idle (or it sent what nobody asked for)
        for job in jobs:
            job.sent_at = now
        self.in_flight.extend(jobs)
        self._last_used = now
        if self._sock is None:
            self._open()
        self.outgoing += (
            jobs[0].request if len(jobs) == 1 else b"".join([job.request for job in jobs])
        )
        self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; the rest waits until it is writable again."""
        try:
            sent = self._sock.send(self.outgoing)
        except self._would_block:
            return
        self.outgoing = self.outgoing[sent:]

    def _open(self) -> None:
        sock = socket.create_connection((self.address.host, self.address.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is not None:
                sock = self.tls_context.wrap_socket(sock, server_hostname=self.address.host)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock, self._parser, self.pipelining, self.outgoing = (
            sock,
            ResponseParser(),
            False,
            b"",
        )

    def receive(self, now: float) -> tuple[list[Response], bool]:
        """The responses that have arrived (maybe none), and whether the server closed."""
        try:
            size = self._sock.recv_into(self.received)
        except self._would_block:
            return [], False
        self._last_used = now
        if not size:
            final = self._parser.end_of_stream()
            return ([] if final is None else [final]), True
        self._parser.feed(self.received[:size])
        while self.tls_context is not None and self._sock.pending():  # decrypted, not yet read
            self._parser.feed(self.received[: self._sock.recv_into(self.received)])
        responses = []
        response = self._parser.next_response()
        while response is not None:
            responses.append(response)
            response = self._parser.next_response()
        return responses, False

    def close(self) -> list[Job]:
        """Close the connection; return the requests still unanswered on it."""
        if self._sock is not None:
            self._sock.close()
        self._sock, self._parser, self.pipelining, self.outgoing = None, None, False, b""
        unanswered = list(self.in_flight)
        self.in_flight.clear()
        return unanswered


class WriteStream:
    """Requests, oldest first, pipelined over keep-alive connections by one loop.

    ConcurrencyLimit decides how many connections carry requests, never more than `ceiling`: the
    plugin works on one request per connection at a time (contract §4), so that is how many it
    works on at once for this run.  Each connection pipelines up to PIPELINE_DEPTH, so that no round
    trip leaves it idle; with a ceiling of 1, strictly one request at a time.  A mode drives it with
    two callables: fill(room) submits up to `room` more jobs and returns False once it has no more;
    answered(job, response) takes each final answer. RetryRule decides what goes again: a retryable
    status, and every unanswered request on a connection that failed or timed out (a retry of each,
    on a fresh connection); an orderly close re-sends the rest without counting.  A dependency
    failure (fail()) stops new work; what is in flight still gets its answers."""

    def __init__(
        self,
        address: PluginAddress,
        ceiling: int,
        timeout: float,
        retry: RetryRule,
        max_rate: float,
        stop: threading.Event,
        health: Optional[Callable[[], Optional[str]]] = None,
    ):
        self.address = address
        self.ceiling = ceiling
        self.timeout = timeout
        self.retry = retry
        self.stop = stop
        self.tls_context = ssl.create_default_context() if address.tls else None
        self.limit = ConcurrencyLimit(ceiling)
        self.received = memoryview(bytearray(RECEIVE_BYTES))
        self.connections: list[WriteConnection] = []
        self._ready: deque[Job] = deque()  # to send, oldest first
        self._retrying: list[Job] = []  # to send again after their backoff
        self.fatal: Optional[BackfillError] = None
        self._stats = LoadStatistics()
        self._pacing = Pacing(max_rate)
        self.health = health  # what /v1/health says when it is not ok (None when it is)
        self._health_said: Optional[str] = None
        self._health_asked_at = float("-inf")
        self.unwell: Optional[str] = None  # what the plugin last said when it was unwell

    def submit(self, job: Job) -> None:
        self._ready.append(job)

    def fail(self, error: BackfillError) -> None:
        self.fatal = self.fatal or error
        self.stop.set()

    def depth(self) -> int:
        return PIPELINE_DEPTH if self.ceiling > 1 else 1

    def capacity(self) -> int:
        return self.limit.connections * self.depth()

    def in_flight(self) -> int:
        return sum(len(connection.in_flight) for connection in self.connections)

    def pending(self) -> int:
        """Jobs submitted and not yet answered for good."""
        return len(self._ready) + len(self._retrying) + self.in_flight()

    def drive(self, mode: StreamMode) -> Optional[BackfillError]:
        """Send every job mode.fill() gives; return when each has its final answer (or the run
        stopped), with what stopped it, if anything.  The connections stay open for the next drive()
        until close()."""
        fill, answered = mode.fill, mode.answered
        more = True
        while True:
            if self.stop.is_set():
                self._ready.clear()
                self._retrying.clear()
            else:
                if more and len(self._ready) < self.capacity():
                    more = fill(self.capacity() + READ_AHEAD_ROWS - self.pending())
                self._send()
            busy = [connection for connection in self.connections if connection.in_flight]
            if not (busy or self._ready or self._retrying or (more and not self.stop.is_set())):
                self.limit.idle()
                return self.fatal
            self._wait(busy, answered)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()

    def load(self) -> dict[str, object]:
        """What an operator watches on a live tenant: connections in use (the requests the plugin
        works on at once) and the ceiling, writes in flight, the plugin's answer latency, retries.
        """
        return {
            **self._stats.to_json(),
            "in_flight": self.in_flight(),
            "connections": self.limit.connections,
            "connections_in_use": sum(1 for connection in self.connections if connection.in_flight),
            "connections_ceiling": self.ceiling,
            "retries": self.retry.granted,
            "last_retry_reason": self.retry.last_reason,
        }

    def describe_load(self) -> str:
        load = self.load()
        text = ", connections in use %d (at most %d), writes in flight %d (%d-%d)" % (
            load["connections_in_use"],
            load["connections_ceiling"],
            load["in_flight"],
            load["in_flight_min"],
            load["in_flight_max"],
        )
        if load["latency_p50_ms"] is not None:
            text += ", latency p50 %.1f ms p99 %.1f ms" % (
                load["latency_p50_ms"],
                load["latency_p99_ms"],
            )
        if self._pacing.capping():
            text += ", capped by --max-rate"
        return text + ", " + self.retry.describe()

    # --- sending ----------------------------------------------------------

    def _send(self) -> None:
        now = time.monotonic()
        if self._retrying:
            due = sorted(
                (job for job in self._retrying if job.not_before <= now), key=lambda job: job.number
            )
            if due:
                self._retrying = [job for job in self._retrying if job.not_before > now]
                self._ready.extendleft(reversed(due))
        if not self._ready:
            return
        working = self.limit.connections
        while len(self.connections) < working:
            self.connections.append(
                WriteConnection(self.address, self.tls_context, self.timeout, self.received)
            )
        depth = self.depth()
        for connection in self.connections[:working]:
            batch: list[Job] = []
            slots = connection.free_slots(depth)
            while slots > len(batch) and self._ready and not self.stop.is_set():
                if self._pacing.interval and self._pacing.send_delay(now) > 0:
                    break
                batch.append(self._ready.popleft())
            if batch:
                try:
                    connection.send(batch, now)
                except OSError as exc:
                    self._connection_failed(connection, exc, now)
        self._stats.sent(now, self.in_flight(), bool(self._ready))

    # --- receiving --------------------------------------------------------

    def _wait(self, busy: list[WriteConnection], answered: Callable[[Job, Response], None]) -> None:
        """Wait for answers (or the next retry, rate slot or timeout), then handle them.  With one
        request at a time per connection (--concurrency 1) there is nothing to batch: a Pacing pause
        would only add a wake-up to each round trip."""
        now = time.monotonic()
        if not busy:
            time.sleep(max(0.0, self._wake_time(now) - now))
            return
        full = (
            self.depth() > 1
            and sum(len(connection.in_flight) for connection in busy) >= self.capacity()
        )
        if pause := self._pacing.read_pause(now, full):
            time.sleep(pause)
            now = time.monotonic()
        answers = self._stats.answers
        for connection in busy:  # answers are usually there by now: no select() first
            self._receive(connection, now, answered)
        if self._stats.answers == answers:
            busy = [connection for connection in self.connections if connection.in_flight]
            if busy:
                readable, writable, _ = select.select(
                    busy,
                    [connection for connection in busy if connection.outgoing],
                    [],
                    max(0.0, self._wake_time(now) - now),
                )
                now = time.monotonic()
                for connection in writable:
                    try:
                        connection.flush()
                    except OSError as exc:
                        self._connection_failed(connection, exc, now)
                for connection in readable:
                    if connection.in_flight:
                        self._receive(connection, now, answered)
        self._pacing.read(now, self._stats.answers - answers, self.capacity(), full)
        for connection in self.connections:
            if connection.in_flight and now >= connection.deadline():
                self._connection_failed(
                    connection,
                    ConnectionLost("no whole answer within %g s (--timeout)" % self.timeout),
                    now,
                    "no answer",
                )

    def _wake_time(self, now: float) -> float:
        """When to stop waiting for answers: a timeout, a retry or rate slot due, or a signal."""
        wake = now + STOP_CHECK_SECONDS
        deadlines = [
            connection.deadline() for connection in self.connections if connection.in_flight
        ]
        if deadlines:
            wake = min(wake, min(deadlines))
        if self._retrying:
            wake = min(wake, min(job.not_before for job in self._retrying))
        if self._ready and self._pacing.interval:
            wake = min(wake, self._pacing.next_slot)
        return wake

    def _receive(
        self, connection: WriteConnection, now: float, answered: Callable[[Job, Response], None]
    ) -> None:
        try:
            responses, closed = connection.receive(now)
        except (ConnectionLost, OSError) as exc:
            self._connection_failed(connection, exc, now)
            return
        except ProtocolError as exc:
            self._protocol_error(connection, exc)
            return
        for response in responses:
            if not connection.in_flight:
                self._protocol_error(connection, ProtocolError("a response to no request"))
                return
            job = connection.in_flight.popleft()
            self._stats.answered(now, job.sent_at)
            if response.head.status in OVERLOAD_STATUSES:  # overload, not a sample of its rate
                self.limit.overloaded(now)
            else:
                self.limit.answered(now, job.sent_at)
            self._answered(job, response, now, answered)
            if not response.head.persistent:  # the rest were not answered: send them again
                self._ready.extendleft(reversed(connection.close()))
                return
            connection.pipelining = True
        if closed:
            self._connection_failed(
                connection, ConnectionLost("the server closed the connection"), now
            )

    def _answered(
        self, job: Job, response: Response, now: float, answered: Callable[[Job, Response], None]
    ) -> None:
        """A final answer goes to the mode, unless it says the plugin was unwell (RetryRule.unwell;
        or a 500 while /v1/health does not say ok): then the request goes again, and after its last
        retry the run stops, blaming no row for the plugin's state."""
        head = response.head
        reason = self.retry.unwell(head.status, response.body)
        if reason is None and head.status == 500:
            reason = self._health_problem(now)
        if reason is None:
            answered(job, response)
            return
        self.unwell = "HTTP %d: %s" % (
            head.status,
            plugin_error_message(response.body, head.reason),
        )
        if not self._retry(job, now, reason, head.field(b"retry-after")):
            self.fail(
                DependencyError(
                    "The memory plugin at %s stayed unwell through %d retries of a request (it "
                    "said %s%s); stopped, no row counted as refused. Check the plugin and its "
                    "database, then re-run to resume."
                    % (
                        self.address.url,
                        self.retry.retries,
                        self.unwell,
                        "; " + self._health_said if self._health_said else "",
                    )
                )
            )

    def _health_problem(self, now: float) -> Optional[str]:
        """Before a 500 is taken as the request's fault: what /v1/health says if it is not ok (asked
        at most every HEALTH_RECHECK_SECONDS), as the retry's reason."""
        if self.health is None:
            return None
        if now - self._health_asked_at >= HEALTH_RECHECK_SECONDS:
            self._health_said, self._health_asked_at = self.health(), now
        return "HTTP 500 while " + self._health_said if self._health_said else None

    def _retry(
        self, job: Job, now: float, reason: str, retry_after: Optional[bytes] = None
    ) -> bool:
        """Queue the job to go again, as RetryRule says; False when it has no retry left."""
        job.retries += 1
        delay = self.retry.delay(job.retries, retry_after, reason)
        if delay is None:
            return False
        job.not_before = now + delay
        self._retrying.append(job)
        return True

    def _connection_failed(
        self,
        connection: WriteConnection,
        error: Exception,
        now: float,
        reason: str = "connection lost",
    ) -> None:
        """Each unanswered request on the connection goes again on a fresh one (a retry of each)."""
        self.limit.stalled(now)
        for job in connection.close():
            if not self._retry(job, now, reason):
                self.fail(plugin_unreachable(self.address, error, self.timeout))
                return

    def _protocol_error(self, connection: WriteConnection, error: ProtocolError) -> None:
        connection.close()  # its unanswered requests are not done: a re-run sends them
        self.fail(
            DependencyError(
                "The memory plugin at %s sent a response that is not valid HTTP/1.1 (%s); stopped. "
                "Check that MEMORY_PLUGIN_URL points at the memory plugin, then re-run to resume."
                % (self.address.url, error)
            )
        )


# ---------------------------------------------------------------------------
# The record finder: a row's record in the plugin, which has no lookup by id
# ---------------------------------------------------------------------------

SEARCH_QUERY_CHARS = 2000  # cap on the text of a targeted search
NAMESPACES_PER_SEARCH = 500  # a search over the whole tenant is split into searches this big
SEARCH_BATCH = 64  # rows searched for one by one at a time (then those found meanwhile are dropped)


def row_groups(rows: Iterable[LegacyRow], size: int) -> Iterator[tuple[list[LegacyRow], list[str]]]:
    """Rows (ordered by workspace) in groups of about `size`, cut between workspaces
    unless one workspace alone is far bigger; each with the workspaces it finishes."""
    group: list[LegacyRow] = []
    finished: list[str] = []
    current = first = object()
    for row in rows:
        if row.workspace_id != current:
            if current is not first:
                finished.append(current)
            current = row.workspace_id
            if len(group) >= size:
                yield group, finished
                group, finished = [], []
        elif len(group) >= 4 * size:
            yield group, finished
            group, finished = [], []
        group.append(row)
    if current is not first:
        finished.append(current)
    yield group, finished


@dataclass(frozen=True)
class Sought:
    """A row to find in the plugin."""

    row: LegacyRow
    content: str  # as -apply writes it
    namespace: Optional[str]  # where -apply writes it; None for a row it skips


def sought_for(outcome: Outcome, redaction: bool) -> Optional[Sought]:
    """The one step from a row to what is looked for: its content as written and where -apply writes
    it.  A row -apply skips is looked for too (an older backfill may have written it), except an
    empty one: the plugin refuses empty content."""
    if isinstance(outcome, PlannedWrite):
        return Sought(outcome.row, outcome.body["content"], outcome.target.namespace)
    row = outcome.row
    if not row.content.strip():
        return None
    return Sought(
        row,
        platform_content(row.content, SCOPE_KINDS.get(row.scope, "workspace"), redaction)[0],
        None,
    )


class Place(Word):
    """Where a lookup puts a row's record: exactly one of these (Lookup.place)."""

    IN_PLACE = "where -apply writes it"
    ELSEWHERE = "elsewhere"
    REFUSED = "refused"  # not looked up: the plugin refused a search for it
    ABSENT = "absent"  # a search that could find it, whole, did not
    UNSEARCHABLE = "unsearchable"  # no search that could find it came back whole


class Lookup(NamedTuple):
    """What the finder learned about one row."""

    record: Optional[dict]  # the plugin's record with the row's id, wherever it is
    complete: bool  # a search of the whole tenant that must have returned it came back whole
    searchable: bool  # that search could find it: its text has words, or is one character
    refused: Optional[str]  # the plugin refused a search for it

    def place(self, expected: Optional[str]) -> Place:
        """Found in the namespace `expected` or elsewhere; or not found: the plugin refused a
        search, absent (a whole search that could find it did not), or unsearchable."""
        if self.record is not None:
            return Place.IN_PLACE if self.record.get("namespace") == expected else Place.ELSEWHERE
        if self.refused:
            return Place.REFUSED
        return Place.ABSENT if self.complete and self.searchable else Place.UNSEARCHABLE

    def why_not_looked_up(self) -> str:
        """For Place.REFUSED and Place.UNSEARCHABLE."""
        if self.refused:
            return "the plugin refused a search for it (%s)" % self.refused
        return "a search for its words matches too many records or finds no searchable word"


class Reading(NamedTuple):
    """What reading namespaces whole found: the records, the namespaces read whole, those over the
    cap (their newest SEARCH_CAP only), those whose search the plugin refused (and what it said)."""

    records: list[dict]
    whole: set
    over_cap: set
    refused: dict


class RecordFinder:
    """Finds rows' records in the plugin, which has no lookup by id and caps a search at 100.

    Namespace first: a search without a query lists the newest 100 records of the namespaces it
    names, so the namespaces rows are written to are read whole in batches that hold fewer than 100
    between them (read_whole), and a row not in its namespace read whole is not there.  Whether it
    sits in another namespace is learned by reading the rest of the tenant whole, once a run (only
    the records a backfill wrote elsewhere than where -apply writes them are kept: misplaced()); or,
    when only a few rows are in question, by searching for each one's own words.  A namespace over
    the cap is read as far as it goes, and its other rows are searched for by words several of them
    share (shared_word_searches), then one by one in the namespaces their workspace reads.  Where
    nothing could be read whole, each row is searched for with words a changed copy would still
    share, then in every namespace of the tenant.  Searches run on the pool, --concurrency at a
    time; find() alone puts what they found together."""

    def __init__(
        self,
        plugin: PluginClient,
        database: LegacyDatabase,
        tree: WorkspaceTree,
        workspaces: list[str],
        pool,
    ):
        self.plugin = plugin
        self.database = database
        self._tree = tree
        self.pool = pool
        self._every_namespace = tree.namespaces()
        self._tenant_namespaces = [
            self._every_namespace[n : n + NAMESPACES_PER_SEARCH]
            for n in range(0, len(self._every_namespace), NAMESPACES_PER_SEARCH)
        ]
        # what the legacy rows make of each namespace
        self.expected = database.rows_per_namespace(tree)
        self._listings: dict[str, dict[str, dict]] = {}  # namespace read whole -> its records by id
        # namespace over the cap -> its newest records by id
        self._crowded: dict[str, dict[str, dict]] = {}
        self._users = Counter(name for workspace in workspaces for name in self._written(workspace))
        self.tenant: Optional[Reading] = None  # the tenant read whole, its misplaced records kept

    def _written(self, workspace: Optional[str]) -> list[str]:
        """The namespaces the workspace's rows are written to."""
        names = []
        for scope in SCOPE_KINDS:
            with contextlib.suppress(RowSkipped):
                names.append(resolve_target(workspace, scope, self._tree).namespace)
        return names

    def done_with(self, workspaces: list[Optional[str]]) -> None:
        """Forget what only these (finished) workspaces needed: memory stays flat."""
        for workspace in workspaces:
            for namespace in self._written(workspace):
                self._users[namespace] -= 1
                if self._users[namespace] <= 0:
                    self._listings.pop(namespace, None)
                    self._crowded.pop(namespace, None)

    # --- reading namespaces whole ---------------------------------------------

    def read_whole(self, namespaces: list[str], keep: Callable[[list[dict]], None]) -> Reading:
        """Read these namespaces with the fewest searches: batches the legacy rows say hold fewer
        than LISTING_ROOM records, each searched without a query; a batch that comes back full is
        halved and read again, until each part comes back under the cap (read whole) or is one
        namespace (over the cap). `keep` sees every record found."""
        reading = Reading([], set(), set(), {})
        batches = _packed(namespaces, self.expected)
        while batches:
            halves = []
            answers = self.pool.map(self._search, batches)
            for batch, (found, whole, error) in zip(batches, answers, strict=True):
                if error:
                    reading.refused.update(dict.fromkeys(batch, error))
                    continue
                keep(found)
                if whole:
                    reading.whole.update(batch)
                elif len(batch) == 1:
                    reading.over_cap.add(batch[0])
                else:
                    halves += [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
            batches = halves
        return reading

    def _read_written(self, namespaces: set) -> dict[str, str]:
        """The namespaces rows are written to, read once while a workspace still needs them; returns
        those whose search the plugin refused (and what it said), to be read again next time."""
        unread = sorted(namespaces - set(self._listings) - set(self._crowded))
        if not unread:
            return {}
        found: dict[str, dict[str, dict]] = {namespace: {} for namespace in unread}

        def keep(records: list[dict]) -> None:
            for record in records:
                holder = found.get(record.get("namespace"))
                if holder is not None:
                    holder[record["id"]] = record

        reading = self.read_whole(unread, keep)
        for namespace in unread:
            if namespace in reading.whole:
                self._listings[namespace] = found[namespace]
            elif namespace in reading.over_cap:
                self._crowded[namespace] = found[namespace]
        return reading.refused

    def misplaced(self) -> Reading:
        """The whole tenant read once: of its records, those a backfill wrote (their id is a legacy
        row's) elsewhere than the namespace -apply writes that row to.  Flat in memory as long as
        such records are few (they are a repair's exceptions)."""
        if self.tenant is None:
            kept: list[dict] = []

            def keep(records: list[dict]) -> None:
                ids = [record["id"] for record in records if _is_uuid(record["id"])]
                homes = self.database.targets_of(ids, self._tree)
                kept.extend(
                    record
                    for record in records
                    if record["id"] in homes and homes[record["id"]] != record.get("namespace")
                )

            reading = self.read_whole(self._every_namespace, keep)
            self.tenant = reading._replace(records=kept)
        return self.tenant

    # --- finding rows -----------------------------------------------------------

    def find(
        self,
        sought: list[Sought],
        not_at_home: Optional[Callable[[list[Sought]], list[Sought]]] = None,
    ) -> dict[str, Lookup]:
        """Look for a group of rows; a Lookup for each, by row id.  `not_at_home`, when given, takes
        the rows of namespaces over the cap that are not among their newest, instead of searches
        (-rollback deletes them where -apply writes them), and returns those it proved are not
        there: the rows it took and did not return get no Lookup."""
        wanted = {s.row.id for s in sought}
        refused_namespaces = self._read_written({s.namespace for s in sought if s.namespace})
        seen: dict[str, dict] = {}
        for s in sought:
            record = (self._listings.get(s.namespace) or self._crowded.get(s.namespace) or {}).get(
                s.row.id
            )
            if record is not None:
                seen[s.row.id] = record
        refused = {
            s.row.id: refused_namespaces[s.namespace]
            for s in sought
            if s.namespace in refused_namespaces
        }
        crowded = [s for s in sought if s.namespace in self._crowded and s.row.id not in seen]
        if crowded and not_at_home is not None:
            proven = {s.row.id for s in not_at_home(crowded)}
            taken = {s.row.id for s in crowded} - proven
            sought = [s for s in sought if s.row.id not in taken]
            whole_there = dict.fromkeys(proven, True)
        else:
            whole_there = self._search_crowded(sought, crowded, seen, refused, wanted)
        unseen = [s for s in sought if s.row.id not in seen and s.row.id not in refused]
        complete: dict[str, bool] = {}
        if unseen and self._tenant_read_pays(len(unseen)):
            tenant = self.misplaced()
            _keep(seen, tenant.records, wanted)
            beyond = sorted(tenant.over_cap | set(tenant.refused))  # where a row could hide, unread
            unseen = [s for s in unseen if s.row.id not in seen]
            for s in unseen:
                at_home = (
                    s.namespace in self._listings
                    or whole_there.get(s.row.id, False)
                    or not s.namespace
                )
                complete[s.row.id] = at_home and not beyond
            searched = [s for s in unseen if not complete[s.row.id]]
            chunks = [
                beyond[n : n + NAMESPACES_PER_SEARCH]
                for n in range(0, len(beyond), NAMESPACES_PER_SEARCH)
            ]
            for s, (records, whole, error) in zip(
                searched,
                self.pool.map(lambda s: self._search_everywhere(s, chunks), searched),
                strict=True,
            ):
                _keep(seen, records, wanted)
                complete[s.row.id] = whole
                if error:
                    refused[s.row.id] = error
        elif unseen:
            for s, (records, whole, error) in zip(
                unseen, self.pool.map(self._search_everywhere, unseen), strict=True
            ):
                _keep(seen, records, wanted)
                complete[s.row.id] = whole
                if error:
                    refused[s.row.id] = error
        unseen = [s for s in unseen if s.row.id not in seen and s.row.id not in refused]
        searchable = self._searchable([s for s in unseen if not self._read_for(s)])
        return {
            s.row.id: Lookup(
                seen.get(s.row.id),
                complete.get(s.row.id, False),
                self._read_for(s) or searchable.get(s.row.id, False),
                refused.get(s.row.id),
            )
            for s in sought
        }

    def _read_for(self, sought: Sought) -> bool:
        """Every place it could be was read whole: no word of it was needed to look."""
        tenant = self.tenant
        return (
            tenant is not None
            and not tenant.over_cap
            and not tenant.refused
            and (sought.namespace is None or sought.namespace in self._listings)
        )

    def _search_crowded(
        self, sought: list[Sought], crowded: list[Sought], seen: dict, refused: dict, wanted: set
    ) -> dict[str, bool]:
        """Rows of namespaces over the cap, not among their newest: searched for by words several of
        them share, then one by one by their own words in the namespaces their workspace reads.
        Returns, by row, whether that own-words search came back whole (so that, with words, it is
        not there)."""
        if not crowded:
            return {}
        in_crowded = [s for s in sought if s.namespace in self._crowded]
        for records, _, _ in self.pool.map(
            lambda search: self._search([search[0]], search[1], wanted),
            shared_word_searches(in_crowded, crowded),
        ):
            _keep(seen, records, wanted)  # a refused one: its rows are searched for one by one
        whole_there: dict[str, bool] = {}
        unseen = [s for s in crowded if s.row.id not in seen]
        # a row another's search found is not searched for
        for start in range(0, len(unseen), SEARCH_BATCH):
            batch = [s for s in unseen[start : start + SEARCH_BATCH] if s.row.id not in seen]
            for s, (records, whole, error) in zip(
                batch,
                self.pool.map(
                    lambda s: self._search(self._nearby(s), search_query(s.content), wanted), batch
                ),
                strict=True,
            ):
                _keep(seen, records, wanted)
                whole_there[s.row.id] = whole
                if error:
                    refused[s.row.id] = error
        return whole_there

    def _tenant_read_pays(self, unseen: int) -> bool:
        """Whether reading the whole tenant once costs fewer searches than searching for each of
        `unseen` rows by its words (about one search per NAMESPACES_PER_SEARCH namespaces, and the
        fallbacks)."""
        if self.tenant is not None:
            return True
        reading = len(_packed(self._every_namespace, self.expected)) * 2
        return unseen * 2 * len(self._tenant_namespaces) >= reading

    def _searchable(self, unseen: list[Sought]) -> dict[str, bool]:
        """Whether a search for each row's own words could find it: it has words, or is one
        character.
        """
        queries = [search_query(s.content) for s in unseen]
        return {
            s.row.id: has_words or len(query) < 2
            for s, query, has_words in zip(
                unseen, queries, self.database.have_search_words(queries), strict=True
            )
        }

    def _search(
        self, namespaces: list[str], query: Optional[str] = None, wanted: Optional[set] = None
    ) -> tuple[list[dict], bool, Optional[str]]:
        """One search: what it found (of the `wanted` ids only, when given: a search by words may
        bring a hundred look-alikes, and searches run several at a time), whether that is all there
        is (under the cap), and the plugin's refusal, if it refused."""
        if not namespaces:  # a row of no workspace: only the tenant-wide search looks for it
            return [], True, None
        try:
            found = self.plugin.search(namespaces, query)
        except PluginRejected as exc:
            return [], False, str(exc)
        whole = len(found) < SEARCH_CAP
        return (found if wanted is None else [r for r in found if r["id"] in wanted]), whole, None

    def _search_everywhere(
        self, sought: Sought, places: Optional[list[list[str]]] = None
    ) -> tuple[list[dict], bool, Optional[str]]:
        """Searches for a copy changed somewhere, then for the row's own words in the whole tenant
        (or the `places` not read whole): what they found, whether the search by its words was
        whole, a refusal."""
        records: list[dict] = []
        refused = None
        nearby = self._nearby(sought)
        for query in fallback_queries(sought.content):
            found, _, error = self._search(nearby, query, {sought.row.id})
            records += found
            refused = refused or error
            if any(record["id"] == sought.row.id for record in found):
                return records, True, None
        whole = True
        for namespaces in self._tenant_namespaces if places is None else places:
            found, complete, error = self._search(
                namespaces, search_query(sought.content), {sought.row.id}
            )
            records += found
            refused, whole = refused or error, whole and complete
            if any(record["id"] == sought.row.id for record in found):
                return records, True, None
        return records, whole, refused

    def _nearby(self, sought: Sought) -> list[str]:
        """The namespaces the row's workspace reads, and the one the row is written to."""
        names = (
            set(self._tree.readable_namespaces(sought.row.workspace_id))
            if sought.row.workspace_id in self._tree
            else set()
        )
        return sorted(names | ({sought.namespace} if sought.namespace else set()))


LISTING_ROOM = 60  # records a listing batch is expected to hold at most (the cap is 100)


def _packed(namespaces: list[str], expected: Counter) -> list[list[str]]:
    """The namespaces in batches whose expected records stay within LISTING_ROOM (one that holds
    more goes alone), at most NAMESPACES_PER_SEARCH namespaces each."""
    batches: list[list[str]] = []
    room = 0
    for namespace in namespaces:
        holds = expected.get(namespace, 0)
        if not batches or room + holds > LISTING_ROOM or len(batches[-1]) >= NAMESPACES_PER_SEARCH:
            batches.append([])
            room = 0
        batches[-1].append(namespace)
        room += holds
    return batches


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
    except ValueError:
        return False
    return True


def _keep(seen: dict[str, dict], records: list[dict], wanted: set) -> None:
    """Remember the records of the rows sought (only those: memory stays flat)."""
    for record in records:
        if record["id"] in wanted:
            seen.setdefault(record["id"], record)


def search_query(content: str) -> str:
    """Text for a full-text search that the record with this content must match.

    The plugin ANDs every word of the query, so the row's own words (cut at a whitespace boundary,
    never mid-word) always find it."""
    text = content.strip()
    if len(text) > SEARCH_QUERY_CHARS:
        cut = text[:SEARCH_QUERY_CHARS].rsplit(None, 1)[0]
        text = cut if len(cut) < SEARCH_QUERY_CHARS else text
    return text


REDACTION_MARK = re.compile(r"\[REDACTED:[A-Z0-9_]+\]")


def fallback_queries(content: str) -> list[str]:
    """Searches that find a copy of this content whose words differ somewhere: the text without its
    redaction marks (a copy that holds the secrets in clear), and each half of it (a copy changed in
    the other half)."""
    plain = REDACTION_MARK.sub(" ", content)
    words = plain.split()
    halves = [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])]
    queries: list[str] = []
    for query in [search_query(plain)] + [search_query(half) for half in halves]:
        if len(query) >= 2 and query != search_query(content) and query not in queries:
            queries.append(query)
    return queries


SEARCH_WORD = re.compile(r"[a-z0-9]{3,}")


def shared_word_searches(sought: list[Sought], unseen: list[Sought]) -> list[tuple[str, str]]:
    """(namespace, word) searches that each find several unseen rows at once: words that two or more
    of them share but, as far as these rows tell, at most SEARCH_CAP records of the namespace hold.
    Most shared first; each search covers rows no earlier one did."""
    by_namespace: dict[str, tuple[list[Sought], set]] = {}
    for s in sought:
        if s.namespace:
            by_namespace.setdefault(s.namespace, ([], set()))[0].append(s)
    for s in unseen:
        if s.namespace:
            by_namespace[s.namespace][1].add(s.row.id)
    searches = []
    for namespace, (rows, pending) in sorted(by_namespace.items()):
        holders: dict[str, set] = {}  # word -> the namespace's rows that hold it
        for s in rows:
            for word in set(SEARCH_WORD.findall(s.content.lower())):
                holders.setdefault(word, set()).add(s.row.id)
        shared = [
            (len(ids & pending), word) for word, ids in holders.items() if len(ids) <= SEARCH_CAP
        ]
        for _, word in sorted(shared, reverse=True):
            found = holders[word] & pending
            if len(found) >= 2:
                searches.append((namespace, word))
                pending -= found
    return searches


# ---------------------------------------------------------------------------
# Local files, progress and signals; starting a mode, one dependency at a time
# ---------------------------------------------------------------------------

PROGRESS_TTY_SECONDS = 0.5  # refresh of the self-updating progress line
PROGRESS_LOG_SECONDS = 5.0  # at most one plain progress line this often otherwise


class FailureLog:
    """--failures FILE: one JSON object per line (ids, reasons, namespaces, never content)."""

    def __init__(self, path: Optional[str], append: bool = False):
        self._file = None
        if path:
            try:
                self._file = open(path, "a" if append else "w", encoding="utf-8")
            except OSError as exc:
                raise UsageError(
                    "Cannot write the failures file %s (%s); choose a writable path."
                    % (path, exc.strerror)
                ) from None

    def record_row(self, row: LegacyRow, **entry) -> None:
        self.write(
            {
                "id": row.id,
                "workspace_id": row.workspace_id,
                "scope": row.scope,
                **{key: value for key, value in entry.items() if value is not None},
            }
        )

    def write(self, entry: dict[str, object]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Counted(Protocol):
    """What the progress line reads of a mode's report while rows move."""

    @property
    def done(self) -> int:
        """Rows done so far (copied, skipped, failed; checked; deleted or found absent)."""

    @property
    def errors(self) -> int:
        """Rows that failed so far."""


class Progress:
    """The progress line on stderr, from the first second: what the run waits for (connecting,
    reading, checking the plugin) until rows move; then rows done / total, rows per second, ETA,
    errors and what `details` adds.

    On a terminal: one line that rewrites itself; otherwise a plain line at most every
    PROGRESS_LOG_SECONDS. Runs in its own thread; nothing at all when not `shown` (-q, -v).  It
    reads the report as Counted."""

    def __init__(self, stream, shown: bool = True):
        self.stream = stream
        self._shown = shown
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._activity, self.since = "starting", time.monotonic()
        self.report: Optional[Counted] = None
        self._total = 0
        self._details: Callable[[], str] = str
        self._drawn = False  # a line of ours is on the terminal
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        if self._shown:
            self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._shown:
            return
        self.stopped.set()
        self.thread.join()
        if self._tty and self._drawn:  # the last redraw: clear what it overwrites, keep the rows
            self.stream.write("\r\x1b[K" + (self.line() + "\n" if self.report is not None else ""))
            self.stream.flush()

    def doing(self, activity: str) -> None:
        """What the run waits for now, until count() is called."""
        self._activity, self.since = activity, time.monotonic()

    def count(self, report: Counted, total: int, details: Callable[[], str] = str) -> None:
        """Rows move from now on (the report last: the thread draws rows once it is set)."""
        self._total, self._details, self.since = total, details, time.monotonic()
        self.report = report

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.since, 1e-6)
        if self.report is None:
            return "%s (%.0f s)" % (self._activity, elapsed)
        done = self.report.done
        rate = done / elapsed
        eta = "%ds" % ((self._total - done) / rate) if rate > 0 and done < self._total else "-"
        percent = 100.0 * done / self._total if self._total else 100.0
        return "%d/%d rows (%.0f%%), %.0f rows/s, ETA %s, errors %d%s" % (
            done,
            self._total,
            percent,
            rate,
            eta,
            self.report.errors,
            self._details(),
        )

    def _run(self) -> None:
        interval = PROGRESS_TTY_SECONDS if self._tty else PROGRESS_LOG_SECONDS
        while not self.stopped.wait(interval):
            if self._tty:
                self.stream.write("\r\x1b[K" + self.line())
                self._drawn = True
            else:
                self.stream.write("progress: %s\n" % self.line())
            self.stream.flush()


@contextlib.contextmanager
def signals_stop(stop: threading.Event):
    """First SIGINT/SIGTERM: set `stop` (the run winds down); a second: exit at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            os._exit(128 + signum)
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def drive_stopping(
    mode: str,
    stream: WriteStream,
    failures: FailureLog,
    work: Callable[[], Optional[BackfillError]],
) -> Optional[BackfillError]:
    """Run a mode's `work` on the stream, the first SIGINT/SIGTERM winding it down; return what
    stopped it early: a signal, a lost dependency, or a defect of this tool (stopped cleanly all the
    same, so that the summary and checkpoint are kept).  Closes the stream and `failures`."""
    with signals_stop(stream.stop) as received:
        try:
            stopped = work()
        except BackfillError as exc:
            stopped = exc
        except Exception as exc:  # noqa: BLE001 - a defect: stop with the summary and checkpoint
            stopped = defect(mode, exc)
        finally:
            stream.close()
            failures.close()
    return Interrupted(received[0]) if received else stopped


def defect(mode: str, error: Exception) -> BackfillError:
    """A failure of this tool's own code, said in one sentence that names it; its traceback is kept
    for -v."""
    stopped = BackfillError(
        "%s failed unexpectedly (%s, a defect of %s: re-run with -v to see where, and report it); "
        "stopped." % (mode, type(error).__name__, PROG)
    )
    stopped.traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return stopped


def check_plugin(plugin: PluginClient, progress: Progress) -> str:
    progress.doing("checking the memory plugin at %s" % plugin.address.url)
    return plugin.check_health()


def open_write_stream(settings: Settings, plugin: PluginClient) -> WriteStream:
    """-apply's and -rollback's stream to the plugin, under the plugin client's retry rule."""
    return WriteStream(
        settings.plugin,
        settings.write_connections,
        settings.timeout,
        plugin.retry,
        settings.max_rate,
        threading.Event(),
        plugin.health_problem,
    )


def open_database(settings: Settings, progress: Progress) -> LegacyDatabase:
    progress.doing("connecting to the legacy database %s" % settings.database.describe())
    return LegacyDatabase(settings.database)


def read_tree(database: LegacyDatabase, settings: Settings, progress: Progress) -> WorkspaceTree:
    """The tenant's workspaces; a -workspace that names neither a workspace nor a row is refused."""
    progress.doing("reading the workspaces and counting rows")
    tree = database.read_workspaces()
    if (
        settings.workspace
        and settings.workspace not in tree
        and not database.count_rows(settings.workspaces)
    ):
        raise UsageError(
            "-workspace %s names no workspace and no row of agent_memories in %s; check the UUID "
            "(nothing was written)." % (settings.workspace, settings.database.describe())
        )
    return tree


# ---------------------------------------------------------------------------
# Lines every mode's summary shares
# ---------------------------------------------------------------------------


def _counts(counter: Counter) -> str:
    return ", ".join("%s=%d" % item for item in sorted(counter.items())) or "none"


def _plugin_line(plugin: PluginAddress, status: Optional[str]) -> list[str]:
    return ["plugin: %s: %s" % (plugin.describe(), status)] if status else []


def _load_line(load: Optional[dict[str, object]], what: str) -> list[str]:
    if not load or not load["answered"]:
        return []
    line = (
        "%s: %d answered in %.1f s; %d retries%s; in flight %d-%d while there was more to send; "
        "connections at the end: %d"
        % (
            what,
            load["answered"],
            load["seconds"],
            load["retries"],
            " (the last after %s)" % load["last_retry_reason"] if load["retries"] else "",
            load["in_flight_min"],
            load["in_flight_max"],
            load["connections"],
        )
    )
    if load["latency_p50_ms"] is not None:
        line += "; plugin answer latency p50 %.1f ms, p99 %.1f ms" % (
            load["latency_p50_ms"],
            load["latency_p99_ms"],
        )
    return [line]


def _problem_lines(problems: list[str], failures_path: Optional[str], listed: str) -> list[str]:
    lines = []
    if problems:
        lines.append("errors (first %d):" % SHOWN_PROBLEMS)
        lines.extend("  " + problem for problem in problems)
    if failures_path:
        lines.append("%s are listed in %s" % (listed, failures_path))
    return lines


# ===========================================================================
# -dry-run and -apply
# ===========================================================================


# ---------------------------------------------------------------------------
# The report, and -dry-run
# ---------------------------------------------------------------------------


@dataclass
class BackfillReport(RunReport):
    by_namespace: Counter = field(default_factory=Counter)  # rows copied (or to copy)
    skip_reasons: Counter = field(default_factory=Counter)
    redactions: Counter = field(default_factory=Counter)
    resumed_from: Optional[dict[str, object]] = None
    # A plugin that ignores ids stored these under ids of its own: (row id, its id, namespace).
    stored_as_others: list[tuple[str, str, Optional[str]]] = field(default_factory=list)

    @property
    def by_kind(self) -> Counter:
        kinds: Counter = Counter()
        for namespace, count in self.by_namespace.items():
            kinds[namespace_kind(namespace)] += count
        return kinds

    @property
    def by_scope(self) -> Counter:
        """The scope rule maps each scope to one namespace kind (SCOPE_KINDS), and back."""
        scopes = {kind: scope for scope, kind in SCOPE_KINDS.items()}
        return Counter({scopes[kind]: count for kind, count in self.by_kind.items()})

    @property
    def namespaces(self) -> set:
        return set(self.by_namespace)

    @property
    def copied(self) -> int:
        return sum(self.by_namespace.values())

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    @property
    def done(self) -> int:
        return self.copied + self.skipped + self.errors

    def count_copy(self, planned: PlannedWrite) -> None:
        self.by_namespace[planned.target.namespace] += 1
        if planned.redactions:
            self.redactions.update(planned.redactions)

    def failed_rows(self) -> str:
        if self.settings.mode == Mode.DRY_RUN:
            return (
                "%d rows cannot be copied (listed above, with why); fix them in the legacy "
                "database, then run -dry-run again." % self.errors
            )
        return (
            "%d rows were not copied (listed above%s, with why: the plugin's refusal, or a row to "
            "fix in the legacy database); fix what each says, then run -apply again: rows already "
            "copied are rewritten by id, never duplicated." % (self.errors, self.listed())
        )

    def to_json(self) -> dict[str, object]:
        return {
            **super().to_json(),
            "stored_under_other_ids": [
                {"row_id": row_id, "stored_id": stored, "namespace": namespace}
                for row_id, stored, namespace in self.stored_as_others
            ],
            "mode": self.settings.mode,
            "copied": self.copied,
            "skipped": self.skipped,
            "redaction": self.settings.redact,
            "rows_by_scope": dict(self.by_scope),
            "rows_by_namespace_kind": dict(self.by_kind),
            "namespaces": len(self.namespaces),
            "skipped_by_reason": dict(self.skip_reasons),
            "redactions_by_label": dict(self.redactions),
            "checkpoint": self.settings.checkpoint,
            "resumed_from": self.resumed_from,
        }


def format_backfill(report: BackfillReport) -> list[str]:
    settings = report.settings
    verb = "copied" if settings.mode == Mode.APPLY else "to copy"
    lines = ["memory-backfill -%s" % settings.mode] + _plugin_line(
        settings.plugin, report.plugin_status
    )
    if report.resumed_from:
        lines.append(
            "resumed from checkpoint %s after row %s"
            % (settings.checkpoint, report.resumed_from["id"])
        )
    lines.append("rows %s by scope: %s" % (verb, _counts(report.by_scope)))
    lines.append(
        "rows %s by namespace kind: %s (%d namespaces)"
        % (verb, _counts(report.by_kind), len(report.namespaces))
    )
    lines.append("skipped by reason:" if report.skipped else "skipped: none")
    for reason, count in sorted(report.skip_reasons.items()):
        lines.append("  %6d  %s" % (count, reason))
    if settings.redact:
        lines.append("redactions by label: %s" % _counts(report.redactions))
    else:
        lines.append("redaction: OFF (--no-redact): contents are copied unredacted")
    lines += _load_line(report.load, "writes")
    lines += _problem_lines(report.problems, settings.failures, "skipped and failed rows")
    if report.stored_as_others:
        lines.append(
            "records the plugin stored under ids of its own (delete them: README, \"A plugin that "
            "ignores ids\"):"
        )
        lines.extend("  row %s: stored as %s in %s" % entry for entry in report.stored_as_others)
    if report.stopped:
        lines.append("STOPPED EARLY: %s" % report.stopped)
    if report.stopped and report.stopped.advise_rerun:
        if settings.checkpoint:
            lines.append(
                "progress is saved in %s; run the same command again to resume"
                % settings.checkpoint
            )
        else:
            lines.append(
                "run the same command again: rows already copied are rewritten, never duplicated "
                "(use --checkpoint FILE to resume instead)"
            )
    counters = "scanned=%d copied=%d skipped=%d errors=%d" % (
        report.scanned,
        report.copied,
        report.skipped,
        report.errors,
    )
    if settings.mode == Mode.DRY_RUN:
        lines.append("Dry run complete (nothing written): " + counters)
    else:
        lines.append("Backfill %s: %s" % ("stopped" if report.stopped else "complete", counters))
    return lines


def planned_outcomes(
    rows: Iterable[LegacyRow], tree: WorkspaceTree, settings: Settings, report: BackfillReport, log
) -> Iterator[Outcome]:
    """Each row's outcome, counted as scanned (and skipped) in the report as it goes."""
    for row in rows:
        report.scanned += 1
        outcome = plan_row(row, tree, settings.redact)
        if isinstance(outcome, RowSkipped):
            report.skip_reasons[outcome.reason] += 1
            log("skip %s: %s", row.id, outcome.reason)
        elif isinstance(outcome, RowFailed):
            report.count_error(row.id, outcome)
            log("error %s: %s", row.id, outcome)
        yield outcome


def dry_run(settings: Settings, log, progress: Progress) -> BackfillReport:
    """-dry-run: read and decide everything, write nothing; say whether -apply could start."""
    report = BackfillReport(settings)
    try:
        version = check_plugin(PluginClient(settings.plugin, settings.timeout, 0), progress)
        report.plugin_status = "ok (version %s): -apply could start" % version
    except DependencyError as exc:
        report.plugin_status = "NOT ready, -apply would stop: %s" % exc
    with open_database(settings, progress) as database:
        tree = read_tree(database, settings, progress)
        total = database.count_rows(settings.workspaces, settings.limit)
        progress.count(report, total)
        rows = database.rows(settings.workspaces, settings.limit)
        for outcome in planned_outcomes(rows, tree, settings, report, log):
            if isinstance(outcome, PlannedWrite):
                report.count_copy(outcome)
                log("would copy %s -> %s", outcome.row.id, outcome.target.namespace)
    return report


# ---------------------------------------------------------------------------
# Checkpoint and low-water mark
# ---------------------------------------------------------------------------

CHECKPOINT_SAVE_SECONDS = 1.0  # the checkpoint file is replaced at most this often
MAX_CHECKPOINT_BYTES = 64 * 1024  # a checkpoint is a few hundred bytes


class Checkpoint:
    """--checkpoint FILE: how far -apply got, so that a re-run resumes there.

    Every row before `position` (in the read order) is durably written to the plugin or skipped by
    design. The file is JSON, replaced atomically (temporary file + rename), and names the row set
    it belongs to; a run with another -workspace or database refuses it.  One run at a time: open()
    takes an exclusive lock (flock on FILE.lock, which the kernel frees when the process ends
    however it ends), close() frees it."""

    def __init__(
        self,
        path: str,
        identity: dict[str, object],
        position: Optional[dict] = None,
        rows_done: int = 0,
        complete: bool = False,
    ):
        self.path = path
        self._identity = identity
        self.position = position
        self._rows_done = rows_done
        self.complete = complete
        self._saved_at = 0.0
        self.lock: Optional[int] = None  # the locked file's descriptor

    @classmethod
    def open(cls, settings: Settings) -> Checkpoint:
        """The checkpoint of this run, locked; a new one (saved at once, which proves the path
        writable) when FILE does not exist.  UsageError, in one sentence, for anything else."""
        identity = {"workspace": settings.workspace, "database": settings.database.describe()}
        path = settings.checkpoint
        lock = _lock_checkpoint(path)
        try:
            with contextlib.suppress(OSError):  # a temporary file a killed run left behind
                os.unlink(path + ".tmp")
            checkpoint = cls._read(path, identity)
            if checkpoint is None:
                checkpoint = cls(path, identity)
                checkpoint.save()
            checkpoint.lock = lock
        except BaseException:
            _unlock_checkpoint(path, lock)
            raise
        return checkpoint

    @classmethod
    def _read(cls, path: str, identity: dict[str, object]) -> Optional[Checkpoint]:
        try:
            data = read_regular_file(path, MAX_CHECKPOINT_BYTES)
        except FileRefused as refused:
            raise UsageError(
                "Cannot read the checkpoint %s (it %s); name a checkpoint file of -apply, or a "
                "path where none exists yet." % (path, refused)
            ) from None
        if data is None:
            return None
        try:
            found = json.loads(data.decode("utf-8"))
            position = found["position"]
            if position is not None:
                created_at = position["created_at"]
                if created_at is not None and not isinstance(created_at, str):
                    raise TypeError
                position = {"created_at": created_at, "id": str(UUID(position["id"]))}
            rows_done, complete = found["rows_done"], found["complete"]
            if (
                found.get("tool") != PROG
                or type(rows_done) is not int
                or type(complete) is not bool
            ):
                raise TypeError
            differ = sorted(key for key in identity if found["identity"].get(key) != identity[key])
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise UsageError(
                "The checkpoint %s is not a memory-backfill checkpoint (not its JSON, or missing "
                "fields); remove it to start over." % path
            ) from None
        if differ:
            raise UsageError(
                "The checkpoint %s belongs to another run (different %s); use the same options, or "
                "another checkpoint file." % (path, " and ".join(differ))
            )
        return cls(path, identity, position, rows_done, complete)

    def advance(self, position: tuple[Optional[str], str], rows: int) -> None:
        """Every row up to `position` is done: `rows` more than before."""
        self.position = {"created_at": position[0], "id": position[1]}
        self._rows_done += rows
        if time.monotonic() - self._saved_at >= CHECKPOINT_SAVE_SECONDS:
            self.save()

    def save(self, complete: bool = False) -> None:
        """Replace the file; on a failure (a full disk) the file stays as it was, and no temporary
        is left."""
        self.complete = complete
        data = {
            "tool": PROG,
            "format": 1,
            "identity": self._identity,
            "position": self.position,
            "rows_done": self._rows_done,
            "complete": complete,
        }
        temporary = self.path + ".tmp"
        created = False
        try:
            with open(temporary, "w", encoding="utf-8") as fh:
                created = True
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            raise UsageError(
                "Cannot write the checkpoint %s (%s); choose a writable path."
                % (self.path, exc.strerror)
            ) from None
        self._saved_at = time.monotonic()

    def close(self) -> None:
        if self.lock is not None:
            _unlock_checkpoint(self.path, self.lock)
            self.lock = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _lock_checkpoint(path: str) -> int:
    """An exclusive lock on FILE.lock (holding this process's id); UsageError at once if another run
    holds it.  The file is removed when the lock is freed, so each taker checks that it locked the
    file that is still there."""
    lock_path = path + ".lock"
    while True:
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise UsageError(
                "Cannot write the checkpoint %s (%s: %s); choose a writable path."
                % (path, lock_path, (exc.strerror or "error").lower())
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(descriptor, 32).decode("ascii", "replace").strip()
            os.close(descriptor)
            raise UsageError(
                "The checkpoint %s is in use by another -apply run (%s, which holds %s); let it "
                "finish or stop it, or give this run another checkpoint file."
                % (path, "process " + holder if holder.isdigit() else "a process", lock_path)
            ) from None
        try:
            current = os.stat(lock_path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, b"%d\n" % os.getpid())
            return descriptor
        os.close(descriptor)  # freed and removed while this one waited: take the new one


def _unlock_checkpoint(path: str, descriptor: int) -> None:
    with contextlib.suppress(OSError):
        # while still held: a run that opened it meanwhile sees it is gone
        os.unlink(path + ".lock")
    os.close(descriptor)


class LowWaterMark:
    """Rows numbered in read order; the mark is the longest prefix of rows done (written, or skipped
    by design), and the checkpoint follows it."""

    def __init__(self, checkpoint: Optional[Checkpoint]):
        self.checkpoint = checkpoint
        self._next_number = 0
        self._low_water = -1  # every row numbered <= this is done
        self._settled: set = set()  # rows done above the mark
        self._positions: dict[int, tuple[Optional[str], str]] = {}
        # After a refused row the mark cannot pass it in this run: stop tracking
        # (memory stays flat); a resume starts again at that row.
        self._frozen = False

    def number(self, row: LegacyRow) -> int:
        number = self._next_number
        self._next_number += 1
        if not self._frozen:
            self._positions[number] = (row.legacy.get("created_at"), row.id)
        return number

    def done(self, number: int) -> None:
        """Row `number` is done; raises BackfillError if the checkpoint cannot be saved."""
        if self._frozen:
            return
        self._settled.add(number)
        before = self._low_water
        while self._low_water + 1 in self._settled:
            self._low_water += 1
            self._settled.discard(self._low_water)
            position = self._positions.pop(self._low_water)
        if self.checkpoint is not None and self._low_water > before:
            self.checkpoint.advance(position, self._low_water - before)

    def freeze(self) -> None:
        self._frozen = True
        self._settled.clear()
        self._positions.clear()


# ---------------------------------------------------------------------------
# -apply
# ---------------------------------------------------------------------------


def write_request(address: PluginAddress, planned: PlannedWrite, heads: dict[str, bytes]) -> bytes:
    """The POST of one memory, ready to send (`heads` caches each namespace's head)."""
    namespace = planned.target.namespace
    head = heads.get(namespace)
    if head is None:
        path = "/v1/namespaces/%s/memories" % quote(namespace, safe="")
        head = heads[namespace] = request_head(address, "POST", path)
    try:
        payload = JSON_ENCODER.encode(planned.body).encode("ascii")
    except ValueError:  # allow_nan=False: only the embedding holds floats
        raise RowFailed("the embedding holds NaN or Infinity, which JSON cannot carry") from None
    return with_body(head, payload)


# The 201 body as the plugin (Go's encoding/json) writes it: read without a JSON parse.
STORED_BODY = re.compile(rb'\{"id":"([0-9a-f-]{36})","namespace":"[^"\\]*"\}\n?')


def stored_id(body: bytes) -> Optional[str]:
    """The id in a 201 body, {"id": "...", "namespace": "..."}; None if it is not that object."""
    plain = STORED_BODY.fullmatch(body)
    if plain is not None:
        return plain.group(1).decode("ascii")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    found = data.get("id") if isinstance(data, dict) else None
    return found.lower() if isinstance(found, str) else None


class ApplyWrites:
    """-apply's side of the write stream: rows in (planned, numbered, their namespace upserted once
    per run before its first write), answers out (counted, the checkpoint advanced).  A 2xx whose
    body names another id than the one sent stops the run: that plugin ignores ids, so every re-run
    would duplicate every row (contract §4)."""

    def __init__(
        self,
        plugin: PluginClient,
        settings: Settings,
        report: BackfillReport,
        log,
        checkpoint: Optional[Checkpoint],
        failures: FailureLog,
        stream: WriteStream,
        outcomes: Iterator[Outcome],
    ):
        self.plugin = plugin
        self.report = report
        self.log = log
        self.failures = failures
        self.stream = stream
        self._outcomes = outcomes
        self.max_consecutive_failures = settings.max_consecutive_failures
        self.mark = LowWaterMark(checkpoint)
        self._heads: dict[str, bytes] = {}  # namespace -> the start of its POST
        self.namespaces: set = set()  # upserted in this run
        self._consecutive_failures = 0

    def fill(self, room: int) -> bool:
        """Plan up to `room` more writes; False once there are no more rows."""
        while room > 0:
            try:
                outcome = next(self._outcomes, None)
            except BackfillError as exc:  # the legacy database was lost
                self.stream.fail(exc)
                return False
            if outcome is None:
                return False
            number = self.mark.number(outcome.row)
            if isinstance(outcome, RowSkipped):
                self.failures.record_row(outcome.row, reason=outcome.reason)
                self._settle(number)
                continue
            if isinstance(outcome, RowFailed):  # counted already; a resume reads it again
                self.failures.record_row(outcome.row, error=str(outcome))
                self.mark.freeze()
                continue
            job = Job(number, outcome, b"")
            if outcome.target.namespace not in self.namespaces and not self._upsert_namespace(job):
                continue
            try:
                job.request = write_request(self.plugin.address, outcome, self._heads)
            except RowFailed as exc:
                self._refused(job, exc)
                continue
            self.stream.submit(job)
            room -= 1
        return True

    def _upsert_namespace(self, job: Job) -> bool:
        """PUT the job's namespace (the first time in this run); False if the write cannot go."""
        target = job.item.target
        try:
            self.plugin.put_namespace(target.namespace, target.kind)
        except RowFailed as exc:  # the next row of this namespace tries again
            self._refused(job, exc)
            return False
        except BackfillError as exc:
            self.stream.fail(exc)
            return False
        self.namespaces.add(target.namespace)
        return True

    def answered(self, job: Job, response: Response) -> None:
        planned = job.item
        status = response.head.status
        if not 200 <= status < 300:
            self._refused(job, plugin_rejected(response))
            return
        if not response.body.startswith(b'{"id":"%s",' % planned.row.id.encode("ascii")):
            found = stored_id(response.body)  # not Go's form of it: read it whole
            if found != planned.row.id:
                self._duplicated(job, found, response.body)
                return
        self.report.count_copy(planned)
        self._consecutive_failures = 0
        self._settle(job.number)
        self.log("copy %s -> %s", planned.row.id, planned.target.namespace)

    def _duplicated(self, job: Job, found: Optional[str], body: bytes) -> None:
        """The plugin stored the write under another id (or said nothing readable)."""
        row = job.item.row
        error = RowFailed(
            "the plugin stored it as %s, not under its own id" % found
            if found
            else "the plugin's 201 body does not name the id it stored"
        )
        namespace = None
        if found:
            with contextlib.suppress(ValueError, AttributeError):
                namespace = json.loads(body.decode("utf-8")).get("namespace")
            self.report.stored_as_others.append((row.id, found, namespace))
        self.failures.record_row(row, error=str(error), stored_id=found, stored_namespace=namespace)
        self.report.count_error(row.id, error)
        self.mark.freeze()
        self.stream.fail(
            PluginIgnoresIds(
                "The memory plugin at %s ignores the ids it is given (row %s was stored %s), so "
                "every run would duplicate every row; stopped. Do not run -apply again until the "
                "plugin is upgraded to one with idempotent upsert by id; then delete the records "
                "it stored under ids of its own (listed above, in --json and in --failures) as the "
                "README's \"A plugin that ignores ids\" shows."
                % (
                    self.plugin.address.url,
                    row.id,
                    "as %s" % found if found else "without naming its id",
                )
            )
        )

    def _refused(self, job: Job, error: RowFailed) -> None:
        row = job.item.row
        self.failures.record_row(row, error=str(error), status=getattr(error, "status", None))
        self.log("error %s: %s", row.id, error)
        self.report.count_error(row.id, error)
        self.mark.freeze()
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.max_consecutive_failures:
            self.stream.fail(
                DependencyError(
                    "The plugin refused %d rows in a row (the last: %s); stopped. Fix what it says "
                    "(in the plugin or in those rows), then re-run to resume."
                    % (self._consecutive_failures, error)
                )
            )

    def _settle(self, number: int) -> None:
        try:
            self.mark.done(number)
        except BackfillError as exc:  # the checkpoint cannot be saved
            self.stream.fail(exc)


def apply(settings: Settings, log, progress: Progress) -> BackfillReport:
    """-apply: copy the rows, oldest first, through the write stream.

    It stops early, cleanly, on a lost dependency or a signal: the writes in flight get their
    answers, the checkpoint is saved, and the error raised carries the report so far."""
    if not settings.checkpoint:
        return _copy(settings, log, progress, None)
    with Checkpoint.open(settings) as checkpoint:  # locked: one run per checkpoint
        return _copy(settings, log, progress, checkpoint)


def _copy(
    settings: Settings, log, progress: Progress, checkpoint: Optional[Checkpoint]
) -> BackfillReport:
    report = BackfillReport(settings)
    if checkpoint is not None:
        report.resumed_from = checkpoint.position
        if checkpoint.complete:
            report.plugin_status = "not contacted: the checkpoint says this backfill is complete"
            return report
    plugin = PluginClient(settings.plugin, settings.timeout, settings.retries)
    report.plugin_status = "ok (version %s)" % check_plugin(plugin, progress)
    stream = open_write_stream(settings, plugin)
    with open_database(settings, progress) as database:  # a refusal here comes before any write
        after = checkpoint.position if checkpoint else None
        tree = read_tree(database, settings, progress)
        total = database.count_rows(settings.workspaces, settings.limit, after)
        outcomes = planned_outcomes(
            database.rows(settings.workspaces, settings.limit, after), tree, settings, report, log
        )
        failures = FailureLog(settings.failures, append=bool(checkpoint and checkpoint.position))
        writes = ApplyWrites(plugin, settings, report, log, checkpoint, failures, stream, outcomes)
        progress.count(report, total, stream.describe_load)
        stopped = drive_stopping("-apply", stream, failures, lambda: stream.drive(writes))
    report.load = stream.load()
    if checkpoint is not None:
        # Complete only when the table was read to its end: a -limit run that
        # used up its limit leaves the rest for the next run.
        reached_end = settings.limit is None or report.scanned < settings.limit
        try:
            checkpoint.save(complete=stopped is None and report.errors == 0 and reached_end)
        except BackfillError as exc:
            stopped = stopped or exc
    report.stop(stopped)
    return report


# ===========================================================================
# -verify
# ===========================================================================

# (redacted) content shown on each side of a first difference, with --show-content
DIFF_CONTEXT_CHARS = 30
VERIFY_GROUP_ROWS = 250  # -verify reads, lists and searches this many rows at a time (its memory)


class VerifyClass(Word):
    """What -verify finds for a row: exactly one of these."""

    MATCH = "match"
    MISSING = "missing"
    WRONG_NAMESPACE = "wrong namespace"
    CONTENT_DIFFERS = "content differs"
    UNREDACTED = "unredacted"
    PROVENANCE = "provenance"
    UNVERIFIABLE = "unverifiable"
    UNREADABLE = "unreadable"  # not looked up: no write can carry it (its text is not UTF-8)


PROBLEM_CLASSES = (  # what -apply repairs
    VerifyClass.MISSING,
    VerifyClass.WRONG_NAMESPACE,
    VerifyClass.CONTENT_DIFFERS,
    VerifyClass.UNREDACTED,
    VerifyClass.PROVENANCE,
)


@dataclass(frozen=True)
class Finding:
    """What -verify found for one row: its class, and what differs (never a secret)."""

    row: LegacyRow
    expected: Optional[str]  # the namespace -apply writes it to
    row_class: VerifyClass
    detail: str = ""
    found_in: Optional[str] = None  # the namespace that holds the plugin's copy
    labels: tuple[str, ...] = ()  # unredacted: the labels of the secrets in clear

    def line(self) -> str:
        return "%s %s (workspace %s): %s" % (
            self.row_class,
            self.row.id,
            self.row.workspace_id,
            self.detail,
        )

    def to_json(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "id": self.row.id,
            "workspace_id": self.row.workspace_id,
            "class": self.row_class,
            "expected_namespace": self.expected,
            "found_namespace": self.found_in,
        }
        if self.labels:
            entry["labels"] = list(self.labels)
        return entry


@dataclass
class VerifyReport:
    settings: Settings
    workspaces_sampled: int = 0
    scanned: int = 0  # rows read, skipped ones included
    classes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # the first SHOWN_PROBLEMS lines
    retries: int = 0  # of searches
    searches: int = 0

    @property
    def done(self) -> int:
        return self.scanned

    @property
    def matches(self) -> int:
        return self.classes[VerifyClass.MATCH]

    @property
    def mismatches(self) -> int:
        return sum(self.classes[row_class] for row_class in PROBLEM_CLASSES)

    @property
    def errors(self) -> int:
        return self.classes[VerifyClass.UNVERIFIABLE] + self.classes[VerifyClass.UNREADABLE]

    def count(self, finding: Finding) -> None:
        self.classes[finding.row_class] += 1
        if finding.row_class != VerifyClass.MATCH and len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(finding.line())

    def verdict(self) -> Optional[BackfillError]:
        """Exit 1, with what to do, unless every sampled row matches."""
        listed = "listed above" + (
            " and in " + self.settings.failures if self.settings.failures else ""
        )
        advice = []
        if self.mismatches:
            advice.append(
                "%d sampled rows do not match (%s): run -apply to rewrite them by id, then -verify "
                "again" % (self.mismatches, listed)
            )
        if self.classes[VerifyClass.UNVERIFIABLE]:
            advice.append(
                "%d rows could not be looked up (unverifiable, %s): check those ids in the plugin "
                "by hand, or run -verify again if the plugin refused searches"
                % (self.classes[VerifyClass.UNVERIFIABLE], listed)
            )
        if self.classes[VerifyClass.UNREADABLE]:
            advice.append(
                "%d rows cannot be copied at all (unreadable, %s: their text is not UTF-8); fix "
                "them in the legacy database, then run -apply"
                % (self.classes[VerifyClass.UNREADABLE], listed)
            )
        return Incomplete("; ".join(advice) + ".") if advice else None

    def to_json(self) -> dict[str, object]:
        return {
            "mode": Mode.VERIFY,
            "workspaces_sampled": self.workspaces_sampled,
            "scanned": self.scanned,
            "matches": self.matches,
            "mismatches": self.mismatches,
            "errors": self.errors,
            "unverifiable": self.classes[VerifyClass.UNVERIFIABLE],
            "problems": self.problems,
            "retries": self.retries,
            "searches": self.searches,
            "rows_by_class": {
                row_class.replace(" ", "_"): self.classes[row_class] for row_class in VerifyClass
            },
            "failures_file": self.settings.failures,
        }


def format_verify(report: VerifyReport) -> list[str]:
    settings = report.settings
    lines = ["memory-backfill -verify", "plugin: %s" % settings.plugin.describe()]
    if report.retries:
        lines.append("searches retried: %d" % report.retries)
    problems = report.mismatches + report.errors
    if problems:
        lines.append(
            "problems (%s):"
            % (
                "all %d" % problems
                if problems <= SHOWN_PROBLEMS
                else "first %d of %d" % (SHOWN_PROBLEMS, problems)
            )
        )
        lines.extend("  " + problem for problem in report.problems)
        if settings.failures:
            lines.append("every problem row is listed in %s" % settings.failures)
    lines.append(
        "rows by class: "
        + ", ".join(
            "%s=%d" % (row_class, report.classes[row_class])
            for row_class in tuple(VerifyClass)[:-1]
        )
    )
    if report.mismatches:
        lines.append(
            "to repair: run -apply to rewrite these %d rows by id; it repairs every class above"
            % report.mismatches
        )
    lines.append(
        "unverifiable rows (counted as errors): %d" % report.classes[VerifyClass.UNVERIFIABLE]
    )
    if report.classes[VerifyClass.UNREADABLE]:
        lines.append(
            "unreadable rows, not UTF-8 (counted as errors): %d"
            % report.classes[VerifyClass.UNREADABLE]
        )
    lines.append(
        "Verify complete: workspaces_sampled=%d matches=%d mismatches=%d errors=%d"
        % (report.workspaces_sampled, report.matches, report.mismatches, report.errors)
    )
    return lines


def classify(planned: PlannedWrite, lookup: Lookup, show_content: bool = False) -> Finding:
    """The row's class, from what the finder learned: every class is decided here.  No memory
    text goes into the finding unless `show_content` (--show-content)."""
    expected = planned.target.namespace
    place, record = lookup.place(expected), lookup.record
    finding = functools.partial(Finding, planned.row, expected)
    if place == Place.ABSENT:
        return finding(
            VerifyClass.MISSING, "in no namespace of the tenant; -apply writes it to %s" % expected
        )
    if place == Place.REFUSED:
        return finding(VerifyClass.UNVERIFIABLE, lookup.why_not_looked_up())
    if place == Place.UNSEARCHABLE:
        return finding(
            VerifyClass.UNVERIFIABLE,
            "not among the newest %d of %s, and %s"
            % (SEARCH_CAP, expected, lookup.why_not_looked_up()),
        )
    namespace = record.get("namespace")
    if place == Place.ELSEWHERE:
        return finding(
            VerifyClass.WRONG_NAMESPACE,
            "expected in %s, found in %s" % (expected, namespace),
            namespace,
        )
    content = record.get("content") if isinstance(record.get("content"), str) else ""
    wanted = planned.body["content"]
    if content != wanted:
        redacted, labels = redact(content)
        if labels and platform_content(redacted, planned.target.kind, redaction=False)[0] == wanted:
            labels = tuple(sorted(labels))
            return finding(
                VerifyClass.UNREDACTED,
                "the plugin's copy holds secrets in clear (%s)" % ", ".join(labels),
                namespace,
                labels,
            )
        return finding(
            VerifyClass.CONTENT_DIFFERS,
            first_difference(redact(wanted)[0], redacted, show_content),
            namespace,
        )
    propagation = record.get("propagation")
    legacy = propagation.get("legacy") if isinstance(propagation, dict) else None
    provenance = planned.body["propagation"]["legacy"]
    if legacy != provenance:
        if not isinstance(legacy, dict):
            return finding(VerifyClass.PROVENANCE, "propagation.legacy is missing", namespace)
        fields = sorted(
            key for key in set(legacy) | set(provenance) if legacy.get(key) != provenance.get(key)
        )
        return finding(
            VerifyClass.PROVENANCE,
            "propagation.legacy differs in %s" % ", ".join(fields),
            namespace,
        )
    return finding(VerifyClass.MATCH, found_in=namespace)


def first_difference(expected: str, found: str, show_content: bool = False) -> str:
    """Where two (redacted) texts first differ: the character, the lengths and the secrets whose
    redaction marks only one side holds; with `show_content`, a short window of each around it."""
    at = next(
        (n for n, (a, b) in enumerate(zip(expected, found, strict=False)) if a != b),
        min(len(expected), len(found)),
    )
    if at == len(expected) == len(found):
        return "the difference lies inside redacted secrets"
    if not show_content:
        longer = (
            "the plugin's copy is longer"
            if len(found) > len(expected)
            else "the plugin's copy is shorter"
            if len(found) < len(expected)
            else "same length"
        )
        marks = Counter(REDACTION_MARK.findall(expected))
        marks.subtract(Counter(REDACTION_MARK.findall(found)))
        labels = sorted({mark[10:-1] for mark, count in marks.items() if count})
        return (
            "from character %d: expected %d characters, found %d (%s)%s; --show-content shows the "
            "text"
            % (
                at + 1,
                len(expected),
                len(found),
                longer,
                "; secrets involved: " + ", ".join(labels) if labels else "",
            )
        )
    start = max(0, at - DIFF_CONTEXT_CHARS)

    def window(text: str) -> str:
        end = at + DIFF_CONTEXT_CHARS
        return "%s%s%s" % (
            "..." if start else "",
            json.dumps(text[start:end], ensure_ascii=False),
            "..." if end < len(text) else "",
        )

    return "from character %d: expected %s, found %s" % (at + 1, window(expected), window(found))


def sample_workspaces(candidates: Iterable[str], size: int, seed: int) -> list[str]:
    """A deterministic sample (size 0 = all), in sorted order."""
    ordered = sorted(candidates)
    if size == 0 or size >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, size))


def verify(settings: Settings, log, progress: Progress) -> VerifyReport:
    """-verify: each row -apply would write, of a sample of workspaces, looked for in the plugin."""
    report = VerifyReport(settings)
    plugin = PluginClient(
        settings.plugin, settings.timeout, settings.retries, connections=settings.searches
    )
    check_plugin(plugin, progress)
    failures = FailureLog(settings.failures)
    try:
        with (
            open_database(settings, progress) as database,
            ThreadPoolExecutor(settings.searches, thread_name_prefix="search") as pool,
        ):
            tree = read_tree(database, settings, progress)
            if settings.workspaces:
                sample = settings.workspaces
            else:
                candidates = [
                    w for w in database.workspaces_of() if w in tree and not tree.is_removed(w)
                ]
                sample = sample_workspaces(candidates, settings.verify_sample, settings.seed)
            report.workspaces_sampled = len(sample)
            finder = RecordFinder(plugin, database, tree, sample, pool)
            progress.count(
                report, database.count_rows(sample), lambda: ", " + plugin.retry.describe()
            )
            for rows, finished in row_groups(database.rows(sample, tree=tree), VERIFY_GROUP_ROWS):
                report.scanned += len(rows)
                outcomes = [plan_row(row, tree, settings.redact) for row in rows]
                planned = [outcome for outcome in outcomes if isinstance(outcome, PlannedWrite)]
                lookups = finder.find([sought_for(p, settings.redact) for p in planned])
                findings = [
                    Finding(failed.row, None, VerifyClass.UNREADABLE, str(failed))
                    for failed in outcomes
                    if isinstance(failed, RowFailed)
                ]
                findings += [classify(p, lookups[p.row.id], settings.show_content) for p in planned]
                for finding in findings:
                    report.count(finding)
                    if finding.row_class == VerifyClass.MATCH:
                        log("match %s", finding.row.id)
                    else:
                        log(finding.line())
                        failures.write(finding.to_json())
                finder.done_with(finished)
    finally:
        failures.close()
        report.searches, report.retries = plugin.searches, plugin.retry.granted
    return report


# ===========================================================================
# -rollback
# ===========================================================================

ROLLBACK_GROUP_ROWS = 2000  # rows read, deleted and looked for at a time


@dataclass
class RollbackReport(RunReport):
    deleted: Counter = field(default_factory=Counter)  # by namespace kind
    to_delete: Counter = field(default_factory=Counter)  # by namespace kind, without --yes
    absent: int = 0
    searches: int = 0

    @property
    def done(self) -> int:
        return sum(self.deleted.values()) + sum(self.to_delete.values()) + self.absent + self.errors

    def failed_rows(self) -> str:
        return (
            "%d records could not be deleted or looked up (listed above%s); fix what the plugin "
            "says, then run -rollback --yes again: it deletes what is left."
            % (self.errors, self.listed())
        )

    def to_json(self) -> dict[str, object]:
        return {
            **super().to_json(),
            "mode": Mode.ROLLBACK,
            "yes": self.settings.yes,
            "deleted": sum(self.deleted.values()),
            "deleted_by_namespace_kind": dict(self.deleted),
            "would_delete": sum(self.to_delete.values()),
            "would_delete_by_namespace_kind": dict(self.to_delete),
            "absent": self.absent,
            "searches": self.searches,
        }


def format_rollback(report: RollbackReport) -> list[str]:
    settings = report.settings
    lines = [
        "memory-backfill -rollback" + ("" if settings.yes else " (without --yes: nothing deleted)")
    ]
    lines += _plugin_line(settings.plugin, report.plugin_status)
    if settings.yes:
        lines.append("records deleted by namespace kind: %s" % _counts(report.deleted))
    else:
        lines.append("records to delete by namespace kind: %s" % _counts(report.to_delete))
    lines.append("rows with no record in the plugin (absent): %d" % report.absent)
    lines += _load_line(report.load, "deletes")
    lines += _problem_lines(
        report.problems, settings.failures, "rows whose record could not be deleted"
    )
    deleted = sum(report.deleted.values())
    if settings.yes or not report.to_delete:
        if report.stopped:
            lines.append("STOPPED EARLY: %s" % report.stopped)
            lines.append("run the same command again: it deletes what is left")
        lines.append(
            "Rollback %s: scanned=%d deleted=%d absent=%d errors=%d"
            % (
                "stopped" if report.stopped else "complete",
                report.scanned,
                deleted,
                report.absent,
                report.errors,
            )
        )
    else:
        lines.append(
            "Rollback not done (no --yes): scanned=%d would_delete=%d absent=%d errors=%d"
            % (report.scanned, sum(report.to_delete.values()), report.absent, report.errors)
        )
    return lines


def delete_request(address: PluginAddress, record_id: str, namespace: str) -> bytes:
    """DELETE /v1/memories/{id}, from the namespace that holds it (contract §4)."""
    head = request_head(address, "DELETE", "/v1/memories/" + quote(record_id, safe=""))
    return with_body(
        head, JSON_ENCODER.encode({"requested_by_namespace": namespace}).encode("ascii")
    )


class RollbackDeletes:
    """-rollback's side of the write stream, one group of rows at a time: each row's record found
    (wherever it is), then deleted from the namespace that holds it."""

    def __init__(
        self,
        address: PluginAddress,
        report: RollbackReport,
        log,
        failures: FailureLog,
        stream: WriteStream,
    ):
        self.address = address
        self.report = report
        self.log = log
        self.failures = failures
        self.stream = stream
        self._not_there: list[Sought] = []  # deleted where -apply writes them: 404
        # the deletes to send
        self.pending: Iterator[tuple[int, tuple[Sought, str, bool]]] = iter(())

    def back_out(
        self, rows: list[LegacyRow], tree: WorkspaceTree, settings: Settings, finder: RecordFinder
    ) -> None:
        wanted = []
        for row in rows:
            self.report.scanned += 1
            looked_for = sought_for(plan_row(row, tree, settings.redact), settings.redact)
            if looked_for is None:  # no backfill can have written it
                self._absent(row)
            else:
                wanted.append(looked_for)
        lookups = finder.find(wanted, self._not_at_home if settings.yes else None)
        found = []
        for s in wanted:
            lookup = lookups.get(s.row.id)
            if lookup is None:  # deleted where -apply writes it
                continue
            place = lookup.place(s.namespace)
            if place in (Place.IN_PLACE, Place.ELSEWHERE):
                namespace = str(lookup.record.get("namespace"))
                if settings.yes:
                    found.append((s, namespace))
                else:
                    self.report.to_delete[namespace_kind(namespace)] += 1
                    self.log("would delete %s from %s", s.row.id, namespace)
            elif place == Place.ABSENT:
                self._absent(s.row)
            else:
                self._error(s.row, None, "could not be looked up: " + lookup.why_not_looked_up())
        self._delete([(s, namespace, False) for s, namespace in found])

    def _not_at_home(self, crowded: list[Sought]) -> list[Sought]:
        """Rows of namespaces too full to read whole: deleted where -apply writes them (one request
        each, fewer than the searches that would find them); those that were not there (404) are
        returned."""
        self._not_there = []
        self._delete([(s, s.namespace, True) for s in crowded])
        return self._not_there

    def _delete(self, targets: list[tuple[Sought, str, bool]]) -> None:
        """DELETE each (row, the namespace that holds its record, blind) through the stream;
        `blind`: where -apply writes it, not seen there, so a 404 is no error: the row is looked for
        elsewhere."""
        self.pending = iter(enumerate(targets))
        self.stream.drive(self)

    def fill(self, room: int) -> bool:
        for _ in range(room):
            number, target = next(self.pending, (None, None))
            if target is None:
                return False
            sought, namespace, _ = target
            request = delete_request(self.address, sought.row.id, namespace)
            self.stream.submit(Job(number, target, request))
        return True

    def answered(self, job: Job, response: Response) -> None:
        sought, namespace, blind = job.item
        status = response.head.status
        if 200 <= status < 300:
            self.report.deleted[namespace_kind(namespace)] += 1
            self.log("deleted %s from %s", sought.row.id, namespace)
        elif status == 404 and blind:
            self._not_there.append(sought)
        elif status == 404:
            self._error(
                sought.row,
                namespace,
                "no longer in %s (moved or deleted meanwhile); run -rollback again" % namespace,
                status,
            )
        else:
            self._error(sought.row, namespace, plugin_rejected(response), status)

    def _absent(self, row: LegacyRow) -> None:
        self.report.absent += 1
        self.log("absent %s", row.id)

    def _error(
        self, row: LegacyRow, namespace: Optional[str], error: object, status: Optional[int] = None
    ) -> None:
        self.failures.record_row(row, namespace=namespace, error=str(error), status=status)
        self.log("error %s: %s", row.id, error)
        self.report.count_error(row.id, error)


def rollback(settings: Settings, log, progress: Progress) -> RollbackReport:
    """-rollback: for every row -apply would select, delete the plugin's record with that row's id,
    wherever in the tenant it is (only those: contract §4 says a record with a legacy row's id was
    written by a backfill).  Without --yes, find them and delete nothing.

    With --yes, each group of rows is looked for (the namespaces it is written to read whole, and
    elsewhere in the tree where rows are not there), and each record found is deleted from the
    namespace that holds it. Deletes go through the write stream; a signal or a lost dependency
    stops it cleanly."""
    report = RollbackReport(settings)
    plugin = PluginClient(
        settings.plugin, settings.timeout, settings.retries, connections=settings.searches
    )
    report.plugin_status = "ok (version %s)" % check_plugin(plugin, progress)
    stream = open_write_stream(settings, plugin)
    with (
        open_database(settings, progress) as database,
        ThreadPoolExecutor(settings.searches, thread_name_prefix="search") as pool,
    ):
        tree = read_tree(database, settings, progress)  # a refusal here comes before any delete
        total = database.count_rows(settings.workspaces, settings.limit)
        holders = database.workspaces_of(settings.workspaces, settings.limit)
        finder = RecordFinder(plugin, database, tree, holders, pool)
        failures = FailureLog(settings.failures)
        deletes = RollbackDeletes(plugin.address, report, log, failures, stream)
        progress.count(report, total, stream.describe_load)

        def delete() -> Optional[BackfillError]:
            selected = database.rows(settings.workspaces, settings.limit, tree=tree)
            for rows, finished in row_groups(selected, ROLLBACK_GROUP_ROWS):
                if stream.stop.is_set():
                    break
                deletes.back_out(rows, tree, settings, finder)
                finder.done_with(finished)
            return stream.fatal

        stopped = drive_stopping("-rollback", stream, failures, delete)
    report.load, report.searches = stream.load(), plugin.searches
    if stopped is None and report.to_delete:
        stopped = UsageError(
            "Nothing was deleted: run the same command with --yes to delete these %d records."
            % sum(report.to_delete.values())
        )
    report.stop(stopped)
    return report


# ===========================================================================
# Command line
# ===========================================================================

HELP_EPILOG = """\
configuration:
  DATABASE_URL       the platform's PostgreSQL, libpq style:
                     postgres://USER:PASSWORD@HOST:PORT/DB?sslmode=prefer
                     (opened read-only; every mode needs it; connecting
                     waits at most connect_timeout=SECONDS, default %g)
  MEMORY_PLUGIN_URL  the memory plugin; when unset, %s (the
                     tenant image's bundled plugin)
  The first line on stderr names the mode, the database, the plugin and
  the selection, before anything is read or written.

exit statuses:
  0    done: every row copied (or would be), everything verified, or every
       record found deleted
  1    finished, but some rows failed, -verify found problem or
       unverifiable rows (-apply rewrites them by id), or some deletes failed
  2    usage or configuration error, or -rollback without --yes (nothing
       was touched)
  3    a dependency is unusable: database or plugin unreachable, too slow
       (see --statement-timeout), login refused, agent_memories missing,
       plugin not healthy, not speaking HTTP or ignoring ids, or lost
       mid-run (-apply stops cleanly: see --checkpoint)
  130  interrupted by SIGINT (143: SIGTERM); -apply and -rollback stop cleanly
  Every status but 0 ends with one sentence on stderr saying what to do.

examples:
  memory-backfill -dry-run
  memory-backfill -apply -workspace 6f9619ff-8b86-d011-b42d-00cf4fc964ff -limit 100
  memory-backfill -apply --checkpoint /tmp/backfill.json --failures /tmp/failures.jsonl
  memory-backfill -verify -verify-sample 0 --failures /tmp/verify.jsonl
  memory-backfill -rollback --yes -workspace 6f9619ff-8b86-d011-b42d-00cf4fc964ff
""" % (DEFAULT_CONNECT_TIMEOUT, DEFAULT_PLUGIN_URL)


class HelpShown(Exception):
    """--help was printed, or --version is to be (its text); the run ends with status 0."""


class _Parser(argparse.ArgumentParser):
    # argparse would call sys.exit itself; we raise, so main() decides.
    def error(self, message: str):
        raise UsageError("%s; run with --help for usage." % message.rstrip("."))

    def exit(self, status: int = 0, message: Optional[str] = None):
        raise HelpShown()


FLAG_ACTIONS = ("store_true", "append_const", "help", "version")  # options that take no value


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, bool]]:
    """The parser, and every option name it accepts (whether it takes a value)."""
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy the legacy agent_memories table into the memory plugin, exactly as the\n"
        "live platform would have written it; verify the copy; back it out.\nChoose exactly one "
        "mode. Options are taken only by their full names, with\none or two dashes, and as "
        "-name=value.",
        epilog=HELP_EPILOG,
    )
    names: dict[str, bool] = {}

    def option(group, *flags: str, **kwargs) -> None:
        names.update(dict.fromkeys(flags, kwargs.get("action") not in FLAG_ACTIONS))
        group.add_argument(*flags, **kwargs)

    modes = parser.add_argument_group("modes (exactly one)")
    for name, text in (
        (Mode.DRY_RUN, "read and decide everything, write nothing"),
        (Mode.APPLY, "copy the rows into the plugin (safe to re-run)"),
        (Mode.VERIFY, "check the plugin against the legacy table"),
        (
            Mode.ROLLBACK,
            "delete the plugin's records that carry a selected row's id (with --yes; without it, "
            "only count them)",
        ),
    ):
        option(
            modes,
            "-" + name,
            "--" + name,
            dest="modes",
            action="append_const",
            const=name,
            help=text,
        )
    selection = parser.add_argument_group("selection")
    option(
        selection, "-workspace", "--workspace", metavar="UUID", help="only this workspace's rows"
    )
    option(
        selection, "-limit", "--limit", metavar="N", help="at most N rows this run (oldest first)"
    )
    option(
        selection,
        "-verify-sample",
        "--verify-sample",
        metavar="N",
        default=str(DEFAULT_VERIFY_SAMPLE),
        help="workspaces -verify checks (default %(default)s; 0 = all)",
    )
    option(
        selection,
        "-seed",
        "--seed",
        metavar="N",
        default=str(DEFAULT_SEED),
        help="seed of the -verify sample (default fixed: %(default)s)",
    )
    connections = parser.add_argument_group("connections")
    option(
        connections, "-database-url", "--database-url", metavar="URL", help="overrides DATABASE_URL"
    )
    option(
        connections,
        "-plugin-url",
        "--plugin-url",
        metavar="URL",
        help="overrides MEMORY_PLUGIN_URL (default %s)" % DEFAULT_PLUGIN_URL,
    )
    option(
        connections,
        "-statement-timeout",
        "--statement-timeout",
        metavar="SECONDS",
        default="%g" % DEFAULT_STATEMENT_TIMEOUT,
        help="seconds each database statement may take, waiting for a lock included (default "
        "%(default)s); then the run stops with exit 3",
    )
    option(
        connections,
        "-timeout",
        "--timeout",
        metavar="SECONDS",
        default="%g" % DEFAULT_TIMEOUT,
        help="seconds a plugin request may take, from sending it to its whole answer; then it "
        "is retried (default %(default)s)",
    )
    option(
        connections,
        "-retries",
        "--retries",
        metavar="N",
        default=str(DEFAULT_RETRIES),
        help="retries of a plugin request on connection errors, timeouts and 429/502/503/504, "
        "with exponential backoff (default %(default)s)",
    )
    option(
        connections,
        "-concurrency",
        "--concurrency",
        metavar="N",
        help="the most requests the plugin works on for this run at once; lower is gentler on a "
        "live tenant. -apply and -rollback: at most N connections (default %d), each pipelining up "
        "to %d writes (deletes); below N the tool uses as many as the plugin serves without a "
        "queue forming, judged from its answers; N=1: strictly one request at a time. -verify, "
        "-rollback: N searches at once (default %d)"
        % (DEFAULT_WRITE_CONNECTIONS, PIPELINE_DEPTH, DEFAULT_SEARCHES),
    )
    writing = parser.add_argument_group("writing")
    option(
        writing,
        "-no-redact",
        "--no-redact",
        action="store_true",
        help="copy contents without secret redaction (said in the summary)",
    )
    option(writing, "-yes", "--yes", action="store_true", help="-rollback: really delete")
    option(
        writing,
        "-max-rate",
        "--max-rate",
        metavar="N",
        default="0",
        help="-apply, -rollback: at most N writes (deletes) per second (default 0 = no cap)",
    )
    option(
        writing,
        "-checkpoint",
        "--checkpoint",
        metavar="FILE",
        help="-apply: save progress here; if FILE exists, resume after it",
    )
    option(
        writing,
        "-max-consecutive-failures",
        "--max-consecutive-failures",
        metavar="N",
        default=str(DEFAULT_MAX_CONSECUTIVE_FAILURES),
        help="-apply stops (exit 3) after N rows in a row fail (default %(default)s)",
    )
    output = parser.add_argument_group("output")
    option(
        output,
        "-failures",
        "--failures",
        metavar="FILE",
        help="-apply: every skipped or failed row; -verify: every problem row; -rollback: every "
        "row whose record could not be deleted; one JSON object per line (ids, reasons, "
        "namespaces, never content)",
    )
    option(
        output,
        "-show-content",
        "--show-content",
        action="store_true",
        help="-verify: show a window of both texts around a difference (redacted, but customer "
        "text: without it, no memory text is ever printed)",
    )
    option(
        output,
        "-q",
        "-quiet",
        "--quiet",
        action="store_true",
        help="no progress line on stderr (the target line and the final sentence remain)",
    )
    option(
        output,
        "-json",
        "--json",
        action="store_true",
        help="print the report as one JSON object on stdout, on every exit",
    )
    option(
        output,
        "-v",
        "-verbose",
        "--verbose",
        action="store_true",
        help="one line per row on stderr (ids only, never content)",
    )
    option(
        output,
        "-version",
        "--version",
        action="store_true",
        help="print the version and the vendored library versions",
    )
    option(output, "-h", "-help", "--help", action="help", help="show this help")
    return parser, names


def refuse_inexact_options(argv: Sequence[str], names: dict[str, bool]) -> None:
    """Only an option's full name runs: argparse would take a prefix of a one-dash option
    (-n for -no-redact, -y for -yes) whatever allow_abbrev says.  Checked before anything else."""
    value_next = False
    for arg in argv:
        if value_next:
            value_next = False
            continue
        if not arg.startswith("-"):
            continue  # argparse refuses a stray word
        name, has_value = arg.split("=", 1)[0], "=" in arg
        if name in names:
            value_next = names[name] and not has_value
            continue
        meant = [known for known in names if known.startswith(name)] if name.strip("-") else []
        meant = sorted(meant or difflib.get_close_matches(name, names, n=1, cutoff=0.75))
        if not meant:
            raise UsageError(
                "%s is not an option (options are taken only by their full names); run with --help "
                "for the list." % name
            )
        raise UsageError(
            "%s is not an option (options are taken only by their full names): did you mean %s?"
            % (
                name,
                " or ".join(meant)
                if len(meant) < 3
                else ", ".join(meant[:-1]) + " or " + meant[-1],
            )
        )


def parse_settings(argv: Optional[Sequence[str]], environ: dict[str, str]) -> Settings:
    """Turn the command line and environment into Settings, or raise UsageError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, names = build_parser()
    refuse_inexact_options(argv, names)
    args = parser.parse_args(argv)
    if args.version:
        raise HelpShown(version_text())
    modes = args.modes or []
    if len(modes) != 1:
        raise UsageError(
            "Choose exactly one mode: -dry-run, -apply, -verify or -rollback%s."
            % (" (got %s)" % " and ".join("-" + m for m in modes) if modes else "")
        )
    mode = modes[0]
    if args.checkpoint and mode != Mode.APPLY:
        raise UsageError("--checkpoint goes with -apply only.")
    if args.failures and mode == Mode.DRY_RUN:  # -dry-run writes nothing anywhere
        raise UsageError("--failures goes with -apply, -verify and -rollback only.")
    if args.yes and mode != Mode.ROLLBACK:
        raise UsageError("--yes goes with -rollback only.")
    if args.show_content and mode != Mode.VERIFY:
        raise UsageError("--show-content goes with -verify only.")
    database = parse_database_url(args.database_url or environ.get("DATABASE_URL"), environ)
    database = replace(
        database, statement_timeout=_seconds(args.statement_timeout, "--statement-timeout")
    )
    plugin = parse_plugin_url(
        args.plugin_url or environ.get("MEMORY_PLUGIN_URL"),
        "--plugin-url" if args.plugin_url else "MEMORY_PLUGIN_URL",
    )
    return Settings(
        mode=mode,
        database=database,
        plugin=plugin,
        workspace=parse_uuid(args.workspace) if args.workspace is not None else None,
        limit=_whole_number(args.limit, "-limit", 1) if args.limit is not None else None,
        verify_sample=_whole_number(args.verify_sample, "-verify-sample", 0),
        seed=_whole_number(args.seed, "--seed", 0),
        concurrency=(
            _whole_number(args.concurrency, "--concurrency", 1)
            if args.concurrency is not None
            else None
        ),
        max_rate=_whole_number(args.max_rate, "--max-rate", 0),
        max_consecutive_failures=_whole_number(
            args.max_consecutive_failures, "--max-consecutive-failures", 1
        ),
        retries=_whole_number(args.retries, "--retries", 0),
        checkpoint=args.checkpoint,
        failures=args.failures,
        yes=args.yes,
        redact=not args.no_redact,
        timeout=_seconds(args.timeout, "--timeout"),
        json_output=args.json,
        verbose=args.verbose,
        quiet=args.quiet,
        show_content=args.show_content,
    )


def version_text() -> str:
    """The tool's version and the vendored libraries', read from their metadata."""

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "missing"

    return "%s %s (pg8000 %s, urllib3 %s, Python %s)" % (
        PROG,
        __version__,
        installed("pg8000"),
        installed("urllib3"),
        ".".join(map(str, sys.version_info[:3])),
    )


def target_line(settings: Settings) -> str:
    """What the run is about to touch, said first: mode, database, plugin, selection."""
    if settings.workspace:
        selection = "workspace %s only" % settings.workspace
    elif settings.mode == Mode.VERIFY:
        selection = (
            "every workspace"
            if not settings.verify_sample
            else "a sample of %d workspaces (seed %d)" % (settings.verify_sample, settings.seed)
        )
    else:
        selection = "every workspace"
    if settings.limit is not None and settings.mode != Mode.VERIFY:
        selection += ", at most %d rows (-limit)" % settings.limit
    return "%s -%s: database %s (%s); plugin %s; %s" % (
        PROG,
        settings.mode,
        settings.database.describe(),
        settings.database.describe_login(),
        settings.plugin.describe(),
        selection,
    )


MODE_RUNS = {
    Mode.DRY_RUN: (dry_run, format_backfill),
    Mode.APPLY: (apply, format_backfill),
    Mode.VERIFY: (verify, format_verify),
    Mode.ROLLBACK: (rollback, format_rollback),
}


def run(
    argv: Optional[Sequence[str]] = None,
    environ: Optional[dict[str, str]] = None,
    stdout=None,
    stderr=None,
) -> ExitStatus:
    """Run the tool and print its report; return OK, or raise the BackfillError that says
    why not (with its status).  With --json the report is one JSON object, error included."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        settings = parse_settings(argv, dict(os.environ if environ is None else environ))
    except HelpShown as shown:
        if shown.args:
            print(shown.args[0], file=stdout)
        return ExitStatus.OK
    print(target_line(settings), file=stderr, flush=True)
    mode, format_report = MODE_RUNS[settings.mode]

    def log(line: str, *args) -> None:  # formats only when shown: it runs once per row
        if settings.verbose:
            print(line % args if args else line, file=stderr, flush=True)

    with Progress(stderr, shown=not (settings.quiet or settings.verbose)) as progress:
        try:
            report = mode(settings, log, progress)
            error = report.verdict()
        except BackfillError as exc:
            report, error = exc.report, exc
        except Exception as exc:  # noqa: BLE001 - a defect, said in one sentence (-v: where)
            report, error = None, defect("-" + settings.mode, exc)
    if error is not None and error.traceback and settings.verbose:
        print(error.traceback.rstrip(), file=stderr, flush=True)
    if settings.json_output:
        data = report.to_json() if report is not None else {"mode": settings.mode}
        data.update(
            database=settings.database.describe(),
            plugin_url=settings.plugin.url,
            plugin_url_is_default=settings.plugin.default,
        )
        print(json_line(data, error), file=stdout, flush=True)
    elif report is not None:
        print("\n".join(format_report(report)), file=stdout, flush=True)
    if error is not None:
        error.shown_as_json = settings.json_output
        raise error
    return ExitStatus.OK


def json_line(
    data: dict[str, object], error: Optional[BaseException], status: Optional[int] = None
) -> str:
    """The one JSON object --json prints, on every exit: with its exit_status and the sentence."""
    if status is None:
        status = getattr(error, "status", ExitStatus.OK)
    return json.dumps(
        {**data, "exit_status": int(status), "error": None if error is None else str(error)},
        sort_keys=True,
    )


def zipapp_main() -> str:
    """The zipapp's __main__.py, which build_zipapp.sh writes: it checks the Python floor before
    this module (which an older Python may not even compile) is imported, and prints the help text
    rendered at build time without importing it at all."""
    return """import sys

if sys.version_info < %r:
    sys.stderr.write(%r %% sys.version.split()[0])
    sys.exit(%d)

if sys.argv[1:] in (["--help"], ["-help"], ["-h"]):
    sys.stdout.write(__loader__.get_data("help.txt").decode("utf-8"))
    sys.exit(0)

import memory_backfill  # noqa: E402

sys.exit(memory_backfill.main())
""" % (MIN_PYTHON, PYTHON_TOO_OLD, ExitStatus.USAGE)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: run(), with every error mapped to its exit status here."""
    if sys.version_info < MIN_PYTHON:
        sys.stderr.write(PYTHON_TOO_OLD % sys.version.split()[0])
        return ExitStatus.USAGE
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except BackfillError as exc:
        error, status = exc, exc.status
    except KeyboardInterrupt:
        error = BackfillError(
            "interrupted; re-run the same command to continue (writes are idempotent)."
        )
        status = ExitStatus.INTERRUPTED
    print("%s: %s" % (PROG, error), file=sys.stderr)
    if {"-json", "--json"} & set(argv) and not error.shown_as_json:
        print(json_line({}, error, status), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
