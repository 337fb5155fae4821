#!/usr/bin/env python3
"""memory-backfill: copy legacy agent memories into the memory plugin.

Reads every row of the platform's legacy ``agent_memories`` table (read only)
and writes it to the memory plugin over HTTP exactly as the live platform
would have: same namespace (scope mapping), same secret redaction, the row's
UUID as the idempotency key, so a re-run never duplicates anything.

Usage:
    memory-backfill -dry-run [options]   decide everything, write nothing
    memory-backfill -apply   [options]   copy the rows into the plugin
    memory-backfill -verify  [options]   prove the plugin holds what it should

Configuration comes from DATABASE_URL and MEMORY_PLUGIN_URL (or
--database-url / --plugin-url).  Run with --help for every option and the
exit statuses.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import select
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__version__ = "0.1.0"

PROG = "memory-backfill"
MIN_PYTHON = (3, 9)

DEFAULT_VERIFY_SAMPLE = 50
DEFAULT_SEED = 20261126
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 8  # backoff 0.2 s doubling to at most 4 s: about 18 s before giving up
BACKOFF_FACTOR, BACKOFF_MAX, BACKOFF_JITTER = 0.2, 4.0, 0.1  # seconds
DEFAULT_CONCURRENCY = 8
PIPELINE_DEPTH = 4  # writes in flight per connection at most
MAX_PACE_SECONDS = 0.05  # the longest pause between reads of answers (see Writer._wait)
READ_AHEAD_ROWS = 64  # -apply plans this many rows in one go, between reads of answers
RECEIVE_BYTES = 65536
IDLE_CHECK_SECONDS = 1.0  # a connection idle this long is checked before it is used again
STOP_CHECK_SECONDS = 0.25  # the write loop notices a signal at least this often
DEFAULT_MAX_CONSECUTIVE_FAILURES = 20
CHECKPOINT_SAVE_SECONDS = 1.0  # the checkpoint file is replaced at most this often
MAX_PARENT_HOPS = 50
SEARCH_CAP = 100  # the plugin returns at most this many rows per search
SEARCH_QUERY_CHARS = 2000  # cap on the text of a targeted verify search
DIFF_CONTEXT_CHARS = 30  # (redacted) content shown on each side of a first difference
NAMESPACES_PER_SEARCH = 500  # a search over the whole tenant is split into searches this big
VERIFY_GROUP_ROWS = 2000  # -verify reads, lists and searches this many rows at a time
FETCH_ROWS = 1000  # rows per FETCH from the server-side cursor
SHOWN_PROBLEMS = 20  # per-row errors / mismatches listed in the text summary
PROGRESS_TTY_SECONDS = 0.5  # refresh of the self-updating progress line
PROGRESS_LOG_SECONDS = 5.0  # at most one plain progress line this often otherwise
RETRY_STATUSES = (429, 502, 503, 504)
HEALTH_RETRIES = 2  # a plugin that is down at the start should fail the run fast

# Skip reasons: the rows -apply will not write, and why.
SKIP_NO_WORKSPACE = "workspace_id is NULL"
SKIP_WORKSPACE_NOT_FOUND = "workspace not found"
SKIP_CYCLE = "parent chain longer than 50 hops (cycle or corrupt data)"
SKIP_UNKNOWN_SCOPE = "unknown scope"
SKIP_GLOBAL_NOT_ROOT = "GLOBAL memory on a non-root workspace (no writable namespace)"
SKIP_EMPTY_CONTENT = "content is empty after trimming whitespace"

# What -verify finds for a row: exactly one of these.
MATCH = "match"
MISSING = "missing"
WRONG_NAMESPACE = "wrong namespace"
CONTENT_DIFFERS = "content differs"
UNREDACTED = "unredacted"
PROVENANCE = "provenance"
UNVERIFIABLE = "unverifiable"
PROBLEM_CLASSES = (MISSING, WRONG_NAMESPACE, CONTENT_DIFFERS, UNREDACTED, PROVENANCE)
VERIFY_CLASSES = (MATCH,) + PROBLEM_CLASSES + (UNVERIFIABLE,)

# REFERENCE §5 (SAFE-T1201), applied in this order, each over the output of
# the previous one.  The platform's patterns are RE2: its \b, \s, \w are
# ASCII-only, hence re.ASCII.
_I = re.IGNORECASE
REDACTION_PATTERNS: Tuple[Tuple[str, str, int], ...] = (
    ("API_KEY", r"\b[A-Z][A-Z0-9_]*_API_KEY\s*=\s*\S+", _I),
    ("TOKEN", r"\b[A-Z][A-Z0-9_]*_TOKEN\s*=\s*\S+", _I),
    ("SECRET", r"\b[A-Z][A-Z0-9_]*_SECRET\s*=\s*\S+", _I),
    ("BEARER_TOKEN", r"Bearer\s+\S+", 0),
    ("OPENSSH_PRIVATE_KEY",
     r"-----BEGIN OPENSSH PRIVATE KEY-----[\s\S]*?-----END OPENSSH PRIVATE KEY-----", 0),
    ("PRIVATE_KEY", r"-----BEGIN[ A-Z]+PRIVATE KEY-----[\s\S]*?-----END[ A-Z]+PRIVATE KEY-----", 0),
    ("DB_URL_WITH_CREDENTIALS",
     r"\b(?:postgres(?:ql)?|mysql|mongodb(?:\+srv)?|redis|amqp|amqps)://"
     r"(?:[^\s/@:]*:[^\s/@]+)@[^\s/]+", _I),
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


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

HELP_EPILOG = """\
configuration:
  DATABASE_URL       the platform's PostgreSQL, libpq style:
                     postgres://USER:PASSWORD@HOST:PORT/DB?sslmode=prefer
                     (opened read-only; -dry-run and -verify need it too)
  MEMORY_PLUGIN_URL  the memory plugin, normally http://localhost:9100
                     (not needed by -dry-run; checked when set)

exit statuses:
  0    done: every row copied (or would be), or everything verified
  1    finished, but some rows failed, or -verify found problem or
       unverifiable rows (-apply rewrites them by id)
  2    usage or configuration error (nothing was touched)
  3    a dependency is unusable: database or plugin unreachable, login
       refused, agent_memories missing, plugin not healthy or not
       speaking HTTP, or lost mid-run (-apply stops cleanly: see
       --checkpoint)
  130  interrupted by SIGINT (143: SIGTERM); -apply stops cleanly

  After a stop, run the same command again: writes are idempotent, and
  with --checkpoint FILE the run continues where it stopped.

examples:
  memory-backfill -dry-run
  memory-backfill -apply -workspace 6f9619ff-8b86-d011-b42d-00cf4fc964ff -limit 100
  memory-backfill -apply --checkpoint /tmp/backfill.json --failures /tmp/failures.jsonl
  memory-backfill -verify -verify-sample 0 --failures /tmp/verify.jsonl
"""


# ---------------------------------------------------------------------------
# Errors and exit statuses
# ---------------------------------------------------------------------------

class ExitStatus(IntEnum):
    OK = 0
    INCOMPLETE = 1  # finished, but rows failed or verification found problems
    USAGE = 2  # usage or configuration error
    UNAVAILABLE = 3  # a dependency (database, plugin) is unusable
    INTERRUPTED = 130  # SIGINT: 128 + 2
    TERMINATED = 143  # SIGTERM: 128 + 15


class BackfillError(Exception):
    """An error that ends the run; its text is the one sentence shown."""

    status = ExitStatus.UNAVAILABLE
    report = None  # the report so far, when -apply stopped part-way


class UsageError(BackfillError):
    status = ExitStatus.USAGE


class DependencyError(BackfillError):
    status = ExitStatus.UNAVAILABLE


class Interrupted(BackfillError):
    """SIGINT or SIGTERM: the run wound down cleanly."""

    def __init__(self, signum: int):
        import signal

        name = signal.Signals(signum).name
        super().__init__("Interrupted by %s: stopped taking rows and finished the writes in flight; "
                         "re-run the same command to resume." % name)
        self.status = ExitStatus.INTERRUPTED if name == "SIGINT" else ExitStatus.TERMINATED


class RowFailed(Exception):
    """One row could not be written; the run goes on."""


class PluginRejected(RowFailed):
    """The plugin answered a single request with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__("HTTP %d: %s" % (status, message))
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------

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
    connect_timeout: Optional[float] = None
    application_name: str = PROG
    startup_params: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """Where the database is, for messages: never includes the password."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s@%s:%d/%s" % (self.user, host, self.port, self.database)


@dataclass(frozen=True)
class Settings:
    mode: str  # "dry-run", "apply" or "verify"
    database: DatabaseConfig
    plugin_url: Optional[str]
    workspace: Optional[str] = None
    limit: Optional[int] = None
    verify_sample: int = DEFAULT_VERIFY_SAMPLE
    seed: int = DEFAULT_SEED
    redact: bool = True
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    concurrency: int = DEFAULT_CONCURRENCY
    max_rate: float = 0  # writes per second; 0 = no cap
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    checkpoint: Optional[str] = None
    failures: Optional[str] = None
    json_output: bool = False
    verbose: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class LegacyRow:
    id: str
    workspace_id: Optional[str]
    content: str
    scope: str
    legacy: Dict[str, object]  # what goes to propagation["legacy"]
    embedding: Optional[List[float]] = None


@dataclass(frozen=True)
class Target:
    namespace: str
    kind: str  # workspace | team | org


@dataclass(frozen=True)
class PlannedWrite:
    row: LegacyRow
    target: Target
    body: Dict[str, object]  # the MemoryWrite sent to the plugin
    redactions: Counter


@dataclass(frozen=True)
class Skipped:
    row: LegacyRow
    reason: str


Outcome = Union[PlannedWrite, Skipped]


@dataclass
class BackfillReport:
    mode: str
    redact: bool = True
    scanned: int = 0
    copied: int = 0
    skipped: int = 0
    errors: int = 0
    by_scope: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    skip_reasons: Counter = field(default_factory=Counter)
    redactions: Counter = field(default_factory=Counter)
    namespaces: set = field(default_factory=set)
    problems: List[str] = field(default_factory=list)  # "id: message", capped
    plugin_status: Optional[str] = None
    checkpoint_path: Optional[str] = None
    resumed_from: Optional[Dict[str, object]] = None
    failures_path: Optional[str] = None
    stopped: Optional[str] = None  # why -apply stopped early
    stopped_status: Optional[ExitStatus] = None

    def count_copy(self, planned: PlannedWrite) -> None:
        self.copied += 1
        self.by_scope[planned.row.scope] += 1
        self.by_kind[planned.target.kind] += 1
        self.namespaces.add(planned.target.namespace)
        if planned.redactions:
            self.redactions.update(planned.redactions)

    def count_error(self, row_id: str, error: Exception) -> None:
        self.errors += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append("%s: %s" % (row_id, error))

    def exit_status(self) -> ExitStatus:
        if self.stopped_status is not None:
            return self.stopped_status
        return ExitStatus.INCOMPLETE if self.errors else ExitStatus.OK

    def to_json(self) -> Dict[str, object]:
        return {
            "mode": self.mode, "scanned": self.scanned, "copied": self.copied,
            "skipped": self.skipped, "errors": self.errors, "redaction": self.redact,
            "rows_by_scope": dict(self.by_scope), "rows_by_namespace_kind": dict(self.by_kind),
            "namespaces": len(self.namespaces), "skipped_by_reason": dict(self.skip_reasons),
            "redactions_by_label": dict(self.redactions), "error_rows": self.problems,
            "plugin": self.plugin_status, "checkpoint": self.checkpoint_path,
            "resumed_from": self.resumed_from, "failures_file": self.failures_path,
            "stopped": self.stopped, "exit_status": int(self.exit_status()),
        }


@dataclass(frozen=True)
class Finding:
    """What -verify found for one row: its class, and what differs (never a secret)."""

    planned: PlannedWrite
    verdict: str  # one of VERIFY_CLASSES
    detail: str = ""
    found_in: Optional[str] = None  # the namespace that holds the plugin's copy
    labels: Tuple[str, ...] = ()  # unredacted: the labels of the secrets in clear

    def line(self) -> str:
        row = self.planned.row
        return "%s %s (workspace %s): %s" % (self.verdict, row.id, row.workspace_id, self.detail)

    def to_json(self) -> Dict[str, object]:
        entry: Dict[str, object] = {
            "id": self.planned.row.id, "workspace_id": self.planned.row.workspace_id,
            "class": self.verdict, "expected_namespace": self.planned.target.namespace,
            "found_namespace": self.found_in}
        if self.labels:
            entry["labels"] = list(self.labels)
        return entry


@dataclass
class VerifyReport:
    workspaces_sampled: int = 0
    classes: Counter = field(default_factory=Counter)
    problems: List[str] = field(default_factory=list)  # the first SHOWN_PROBLEMS lines
    failures_path: Optional[str] = None

    @property
    def matches(self) -> int:
        return self.classes[MATCH]

    @property
    def mismatches(self) -> int:
        return sum(self.classes[verdict] for verdict in PROBLEM_CLASSES)

    @property
    def errors(self) -> int:
        return self.classes[UNVERIFIABLE]

    def count(self, finding: Finding) -> None:
        self.classes[finding.verdict] += 1
        if finding.verdict != MATCH and len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(finding.line())

    def exit_status(self) -> ExitStatus:
        return ExitStatus.INCOMPLETE if self.mismatches or self.errors else ExitStatus.OK

    def to_json(self) -> Dict[str, object]:
        return {
            "mode": "verify", "workspaces_sampled": self.workspaces_sampled,
            "matches": self.matches, "mismatches": self.mismatches, "errors": self.errors,
            "unverifiable": self.errors, "problems": self.problems,
            "rows_by_class": {verdict.replace(" ", "_"): self.classes[verdict]
                              for verdict in VERIFY_CLASSES},
            "failures_file": self.failures_path, "exit_status": int(self.exit_status()),
        }


# ---------------------------------------------------------------------------
# Configuration parsing (pure)
# ---------------------------------------------------------------------------

def parse_database_url(url: Optional[str]) -> DatabaseConfig:
    """Parse a libpq-style postgres:// URL; raise UsageError if it is not one."""
    if not url:
        raise UsageError("DATABASE_URL is not set; set it (or pass --database-url) to "
                         "the platform's PostgreSQL URL, postgres://USER:PASSWORD@HOST/DB.")
    # Never echo the URL: it may hold the password.
    bad = "DATABASE_URL is malformed: %s; expected postgres://USER:PASSWORD@HOST:PORT/DB."
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(bad % _strip_secrets(str(exc), url)) from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise UsageError(bad % "the scheme must be postgres:// or postgresql://")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    # libpq also accepts these as query parameters; the URL's own parts win.
    host = unquote(parts.hostname or "") or params.pop("host", "")
    user = unquote(parts.username or "") or params.pop("user", "")
    password = unquote(parts.password) if parts.password is not None else params.pop("password", None)
    database = unquote(parts.path.lstrip("/")) or params.pop("dbname", "") or user
    port_text = params.pop("port", None)
    for key in ("host", "user", "password", "dbname"):
        params.pop(key, None)
    if not host:
        raise UsageError(bad % "it names no host")
    if not user:
        raise UsageError(bad % "it names no user")
    if port is None and port_text is not None:
        port = _whole_number(port_text, "the DATABASE_URL port", 1)
    sslmode = params.pop("sslmode", "prefer")
    if sslmode not in SSL_MODES:
        raise UsageError(bad % ("sslmode must be one of " + ", ".join(SSL_MODES)))
    timeout = params.pop("connect_timeout", None)
    try:
        connect_timeout = float(timeout) if timeout and float(timeout) > 0 else None
    except ValueError:
        raise UsageError(bad % "connect_timeout must be a number of seconds") from None
    return DatabaseConfig(
        user=user, host=host, port=port or 5432, database=database, password=password,
        sslmode=sslmode, sslrootcert=params.pop("sslrootcert", None),
        connect_timeout=connect_timeout,
        application_name=params.pop("application_name", PROG),
        startup_params=params,
    )


def _strip_secrets(text: str, url: str) -> str:
    """Remove anything of the URL's userinfo from a parser's message."""
    userinfo = urlsplit(url).netloc.rpartition("@")[0] if "@" in url else ""
    for secret in filter(None, (userinfo, *userinfo.split(":"))):
        text = text.replace(secret, "***")
    return text


def parse_plugin_url(url: Optional[str]) -> str:
    """Return the plugin's base URL without a trailing slash."""
    if not url:
        raise UsageError("MEMORY_PLUGIN_URL is not set; set it (or pass --plugin-url) to "
                         "the memory plugin, normally http://localhost:9100.")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise UsageError("MEMORY_PLUGIN_URL is malformed: the port is not a number; "
                         "expected http://HOST:PORT.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("MEMORY_PLUGIN_URL is malformed: expected http://HOST:PORT "
                         "(for example http://localhost:9100).")
    return url.strip().rstrip("/")


def parse_uuid(value: str) -> str:
    from uuid import UUID

    try:
        return str(UUID(value))
    except ValueError:
        raise UsageError("-workspace must be a workspace UUID, not %r." % value[:60]) from None


def parse_embedding(text: Optional[str]) -> Optional[List[float]]:
    """pgvector's '[1,2,3]' (or an array's '{1,2,3}') as a list of numbers."""
    if text is None:
        return None
    inner = text.strip()[1:-1].strip()
    return [float(x) for x in inner.split(",")] if inner else []


# ---------------------------------------------------------------------------
# Scope mapping (pure): REFERENCE §3
# ---------------------------------------------------------------------------

class WorkspaceTree:
    """All workspaces of the tenant, read once, with each one's chain resolved."""

    def __init__(self, workspaces: Iterable[Tuple[str, Optional[str], Optional[str]]]):
        self.parent: Dict[str, Optional[str]] = {}
        self.status: Dict[str, Optional[str]] = {}
        for workspace_id, parent_id, status in workspaces:
            self.parent[workspace_id] = parent_id
            self.status[workspace_id] = status
        self._roots: Dict[str, Union[str, Exception]] = {}

    def __contains__(self, workspace_id: str) -> bool:
        return workspace_id in self.parent

    def is_removed(self, workspace_id: str) -> bool:
        return self.status.get(workspace_id) == "removed"

    def root_of(self, workspace_id: str) -> str:
        """The root of the chain; raises RowSkipped for a missing or cyclic chain."""
        if workspace_id not in self._roots:
            self._roots[workspace_id] = self._walk(workspace_id)
        root = self._roots[workspace_id]
        if isinstance(root, RowSkipped):
            raise root
        return root

    def _walk(self, workspace_id: str) -> Union[str, Exception]:
        current = workspace_id
        for _ in range(MAX_PARENT_HOPS + 1):
            if current not in self.parent:
                return RowSkipped(SKIP_WORKSPACE_NOT_FOUND)
            parent = self.parent[current]
            if parent is None:
                return current
            current = parent
        return RowSkipped(SKIP_CYCLE)

    def namespaces(self) -> List[str]:
        """Every namespace of the tenant's tree: each kind, named after each workspace (a
        misplaced record may sit where the scope mapping would never write)."""
        return sorted(kind + ":" + workspace_id for workspace_id in self.parent
                      for kind in ("workspace", "team", "org"))

    def readable_namespaces(self, workspace_id: str) -> List[str]:
        """The workspace:, team: and org: namespaces a workspace can read."""
        root = self.root_of(workspace_id)
        team = self.parent[workspace_id] or workspace_id
        return ["workspace:" + workspace_id, "team:" + team, "org:" + root]


class RowSkipped(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def resolve_target(workspace_id: Optional[str], scope: str, tree: WorkspaceTree) -> Target:
    """The namespace the live platform writes a memory of this scope to."""
    if workspace_id is None:
        raise RowSkipped(SKIP_NO_WORKSPACE)
    root = tree.root_of(workspace_id)
    parent = tree.parent[workspace_id]
    if scope == "LOCAL":
        return Target("workspace:" + workspace_id, "workspace")
    if scope == "TEAM":
        return Target("team:" + (parent or workspace_id), "team")
    if scope == "GLOBAL":
        if parent is not None:
            raise RowSkipped(SKIP_GLOBAL_NOT_ROOT)
        return Target("org:" + root, "org")
    raise RowSkipped(SKIP_UNKNOWN_SCOPE)


def target_namespaces(workspace_id: str, tree: WorkspaceTree) -> List[str]:
    """The namespaces a workspace's rows can be written to, one scope after another."""
    names = []
    for scope in ("LOCAL", "TEAM", "GLOBAL"):
        with contextlib.suppress(RowSkipped):
            names.append(resolve_target(workspace_id, scope, tree).namespace)
    return names


# ---------------------------------------------------------------------------
# Redaction (pure): REFERENCE §5
# ---------------------------------------------------------------------------

@functools.cache
def redaction_rules() -> Tuple[Tuple[str, re.Pattern, str], ...]:
    """The compiled patterns (compiled on first use: --help need not pay for them)."""
    return tuple((label, re.compile(pattern, flags | re.ASCII), "[REDACTED:%s]" % label)
                 for label, pattern, flags in REDACTION_PATTERNS)


# Every match of every pattern above contains one of these literals (the
# first three in any case) or a run of 33 base64 characters.  Text with none
# of them (most memories) is returned as it is, after a few cheap scans.
PREFILTER_ANY_CASE = ("_api_key", "_token", "_secret")
PREFILTER_LITERALS = ("://", "Bearer", "-----BEGIN", "ghp_", "gho_", "ghs_", "ghu_", "ghr_",
                      "github_pat_", "vc_", "AKIA", "pplx-", "sk-", "ctx7_")
NO_REDACTIONS: Counter = Counter()  # shared: never mutated


@functools.cache
def base64_run() -> re.Pattern:
    return re.compile(r"[A-Za-z0-9+/]{33}")


def may_hold_secret(text: str) -> bool:
    lowered = text.lower()
    return (any(word in lowered for word in PREFILTER_ANY_CASE)
            or any(word in text for word in PREFILTER_LITERALS)
            or base64_run().search(text) is not None)


def redact(text: str) -> Tuple[str, Counter]:
    """Apply SAFE-T1201; return the redacted text and the matches per label."""
    if not may_hold_secret(text):
        return text, NO_REDACTIONS
    counts: Counter = Counter()
    for label, pattern, replacement in redaction_rules():
        text, n = pattern.subn(replacement, text)
        if n:
            counts[label] += n
    return text, counts


# ---------------------------------------------------------------------------
# Planning (pure): what -apply writes for one legacy row
# ---------------------------------------------------------------------------

def plan_row(row: LegacyRow, tree: WorkspaceTree, redaction: bool = True) -> Outcome:
    try:
        target = resolve_target(row.workspace_id, row.scope, tree)
    except RowSkipped as skip:
        return Skipped(row, skip.reason)
    if not row.content.strip():
        return Skipped(row, SKIP_EMPTY_CONTENT)
    content, counts = redact(row.content) if redaction else (row.content, NO_REDACTIONS)
    body: Dict[str, object] = {
        "id": row.id, "content": content, "kind": "fact", "source": "agent",
        "propagation": {"legacy": row.legacy},
    }
    if row.embedding is not None:
        body["embedding"] = row.embedding
    return PlannedWrite(row, target, body, counts)


def search_query(content: str) -> str:
    """Text for a full-text search that the record with this content must match.

    The plugin ANDs every word of the query, so the row's own words (cut at a
    whitespace boundary, never mid-word) always find it.
    """
    text = content.strip()
    if len(text) > SEARCH_QUERY_CHARS:
        cut = text[:SEARCH_QUERY_CHARS].rsplit(None, 1)[0]
        text = cut if len(cut) < SEARCH_QUERY_CHARS else text
    return text


def sample_workspaces(candidates: Iterable[str], size: int, seed: int) -> List[str]:
    """A deterministic sample (size 0 = all), in sorted order."""
    import random

    ordered = sorted(candidates)
    if size == 0 or size >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, size))


# ---------------------------------------------------------------------------
# Verification (pure): what -verify concludes about one row
# ---------------------------------------------------------------------------

REDACTION_MARK = re.compile(r"\[REDACTED:[A-Z0-9_]+\]")


def fallback_queries(content: str) -> List[str]:
    """Searches that find a copy of this content whose words differ somewhere: the
    text without its redaction marks (a copy that holds the secrets in clear), and
    each half of it (a copy changed in the other half)."""
    plain = REDACTION_MARK.sub(" ", content)
    words = plain.split()
    halves = [" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])]
    queries: List[str] = []
    for query in [search_query(plain)] + [search_query(half) for half in halves]:
        if len(query) >= 2 and query != search_query(content) and query not in queries:
            queries.append(query)
    return queries


SEARCH_WORD = re.compile(r"[a-z0-9]{3,}")


def shared_word_searches(planned: List[PlannedWrite], unseen: List[PlannedWrite]) -> List[Tuple[str, str]]:
    """(namespace, word) searches that each find several unseen rows at once: words that
    two or more of them share but, as far as these rows tell, at most SEARCH_CAP records of
    the namespace hold.  Most shared first; each search covers rows no earlier one did."""
    by_namespace: Dict[str, Tuple[List[PlannedWrite], set]] = {}
    for p in planned:
        by_namespace.setdefault(p.target.namespace, ([], set()))[0].append(p)
    for p in unseen:
        by_namespace[p.target.namespace][1].add(p.row.id)
    searches = []
    for namespace, (rows, pending) in sorted(by_namespace.items()):
        holders: Dict[str, set] = {}  # word -> the namespace's rows that hold it
        for p in rows:
            for word in set(SEARCH_WORD.findall(p.body["content"].lower())):
                holders.setdefault(word, set()).add(p.row.id)
        shared = [(len(ids & pending), word) for word, ids in holders.items() if len(ids) <= SEARCH_CAP]
        for _, word in sorted(shared, reverse=True):
            found = holders[word] & pending
            if len(found) >= 2:
                searches.append((namespace, word))
                pending -= found
    return searches


def classify(planned: PlannedWrite, record: Optional[Dict]) -> Finding:
    """Compare the plugin's copy of a row (None: found nowhere) with what -apply writes."""
    expected = planned.target.namespace
    if record is None:
        return Finding(planned, MISSING, "in no namespace of the tenant; -apply writes it to %s"
                       % expected)
    namespace = record.get("namespace")
    if namespace != expected:
        return Finding(planned, WRONG_NAMESPACE, "expected in %s, found in %s" % (expected, namespace),
                       namespace)
    content = record.get("content") if isinstance(record.get("content"), str) else ""
    if content != planned.body["content"]:
        redacted, labels = redact(content)
        if redacted == planned.body["content"]:
            labels = tuple(sorted(labels))
            return Finding(planned, UNREDACTED, "the plugin's copy holds secrets in clear (%s)"
                           % ", ".join(labels), namespace, labels)
        return Finding(planned, CONTENT_DIFFERS, first_difference(
            redact(planned.body["content"])[0], redacted), namespace)
    propagation = record.get("propagation")
    legacy = propagation.get("legacy") if isinstance(propagation, dict) else None
    wanted = planned.body["propagation"]["legacy"]
    if legacy != wanted:
        if not isinstance(legacy, dict):
            return Finding(planned, PROVENANCE, "propagation.legacy is missing", namespace)
        fields = sorted(key for key in set(legacy) | set(wanted) if legacy.get(key) != wanted.get(key))
        return Finding(planned, PROVENANCE, "propagation.legacy differs in %s" % ", ".join(fields),
                       namespace)
    return Finding(planned, MATCH, found_in=namespace)


def first_difference(expected: str, found: str) -> str:
    """Where two (redacted) texts first differ, with a short window of each around it."""
    at = next((n for n, (a, b) in enumerate(zip(expected, found)) if a != b),
              min(len(expected), len(found)))
    if at == len(expected) == len(found):
        return "the difference lies inside redacted secrets"
    start = max(0, at - DIFF_CONTEXT_CHARS)

    def window(text: str) -> str:
        end = at + DIFF_CONTEXT_CHARS
        return "%s%s%s" % ("..." if start else "", json.dumps(text[start:end], ensure_ascii=False),
                           "..." if end < len(text) else "")

    return "from character %d: expected %s, found %s" % (at + 1, window(expected), window(found))


# ---------------------------------------------------------------------------
# HTTP/1.1 response framing (pure): RFC 9112
# ---------------------------------------------------------------------------

MAX_RESPONSE_HEAD = 64 * 1024  # status line and header fields (and a chunked body's trailers)
MAX_RESPONSE_BODY = 1024 * 1024  # the plugin's answers to a write are a few hundred bytes
# A response head: the status line, then field lines, each with its CRLF.  A
# field value may hold no CR, LF, NUL or other control character but HTAB.
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n"
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
_OBS_FOLD = re.compile(rb"\r\n[\t ]+")  # RFC 9112 5.2
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[\t ]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_TRAILER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*")
CHUNKED = -1  # Response.length of a chunked body
UNTIL_CLOSE = -2  # Response.length of a body that ends when the server closes


class ProtocolError(Exception):
    """Bytes that are not an HTTP/1.x response: never retried, never guessed at."""


class ConnectionLost(Exception):
    """The connection ended (or went silent) before every request on it was answered."""


class Response:
    """One final response: status, reason, head (obs-folds unfolded), body."""

    __slots__ = ("status", "reason", "head", "length", "persistent", "body")

    def __init__(self, status: int, reason: str, head: bytes, length: int, persistent: bool):
        self.status = status
        self.reason = reason
        self.head = head
        self.length = length  # of the body: bytes, CHUNKED or UNTIL_CLOSE
        self.persistent = persistent  # the connection takes further requests after this one
        self.body = b""

    def field(self, name: bytes) -> Optional[bytes]:
        return header_field(self.head.lower(), self.head, name)

    def copy(self) -> Response:
        return Response(self.status, self.reason, self.head, self.length, self.persistent)


def header_field(lowered: bytes, head: bytes, name: bytes) -> Optional[bytes]:
    """A field's value in a parsed head (name in lower case); a repeated field's values
    joined with ", " (RFC 9110 5.3); None when absent."""
    key = b"\r\n" + name + b":"
    start = lowered.find(key)
    if start < 0:
        return None
    values = []
    while start >= 0:
        end = lowered.find(b"\r\n", start + len(key))
        values.append(head[start + len(key):end].strip(b" \t"))
        start = lowered.find(key, end)
    return b", ".join(values)


@functools.lru_cache(maxsize=64)
def parse_response_head(head: bytes) -> Response:
    """A response with no body yet, from its status line and header fields (each line with
    its CRLF).  Cached: a server sends the same few heads again and again."""
    match = _RESPONSE_HEAD.fullmatch(head)
    if match is None:  # a field line continued on the next (obs-fold) reads as one space
        status_end = head.find(b"\r\n") + 2
        if head[status_end:status_end + 1] not in (b" ", b"\t"):
            head = head[:status_end] + _OBS_FOLD.sub(b" ", head[status_end:])
            match = _RESPONSE_HEAD.fullmatch(head)
    if match is None:
        lines = head.split(b"\r\n")
        if _RESPONSE_HEAD.fullmatch(lines[0] + b"\r\n") is None:
            raise ProtocolError("%r where an HTTP/1.x status line should be" % lines[0][:40])
        bad = next(line for line in lines[1:] if _TRAILER_LINE.fullmatch(line) is None)
        raise ProtocolError("a malformed header field line: %r" % bad[:40])
    lowered = head.lower()
    status = int(match.group(2))
    http11 = match.group(1) == b"1"
    connection = header_field(lowered, head, b"connection")
    persistent = http11 and (connection is None or b"close" not in [
        token.strip() for token in connection.lower().split(b",")])
    transfer_encoding = header_field(lowered, head, b"transfer-encoding")
    content_length = header_field(lowered, head, b"content-length")
    if status < 200 or status in (204, 304):
        length = 0
        if status == 101:
            raise ProtocolError("101 Switching Protocols, which nothing asked for")
    elif transfer_encoding is not None:
        if not http11 or content_length is not None:
            raise ProtocolError("Transfer-Encoding with %s"
                                % ("HTTP/1.0" if not http11 else "Content-Length"))
        if transfer_encoding.lower() != b"chunked":
            raise ProtocolError("a transfer coding other than chunked: %r" % transfer_encoding[:40])
        length = CHUNKED
    elif content_length is not None:
        length = parse_content_length(content_length)
    else:
        length, persistent = UNTIL_CLOSE, False
    return Response(status, (match.group(3) or b"").decode("latin-1"), head, length, persistent)


def parse_content_length(value: bytes) -> int:
    """A Content-Length value: digits, or a list of the same digits (RFC 9112 6.3)."""
    if not value.isdigit():  # bytes.isdigit(): ASCII digits only
        values = {item.strip() for item in value.split(b",")}
        number = values.pop()
        if values or not number.isdigit():
            raise ProtocolError("an invalid Content-Length: %r" % value[:40])
        value = number
    if len(value) > 15 or int(value) > MAX_RESPONSE_BODY:
        raise ProtocolError("a Content-Length over %d bytes: %r" % (MAX_RESPONSE_BODY, value[:40]))
    return int(value)


class ResponseParser:
    """Cuts the bytes a server sends into responses, by the protocol's framing.

    feed() what arrived, then take next_response() until it returns None (more
    bytes needed); end_of_stream() when the server closed.  1xx responses are
    skipped.  Anything that is not HTTP/1.x raises ProtocolError.
    """

    def __init__(self):
        self.buffer = bytearray()
        self.head: Optional[Response] = None  # the response whose body is being read

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_response(self) -> Optional[Response]:
        while self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                self._check_head_so_far()
                return None
            parsed = parse_response_head(bytes(self.buffer[:end + 2]))
            del self.buffer[:end + 4]
            if parsed.status >= 200:
                self.head = parsed.copy()
        head = self.head
        if head.length >= 0:
            if len(self.buffer) < head.length:
                return None
            head.body = bytes(self.buffer[:head.length])
            del self.buffer[:head.length]
        elif head.length == CHUNKED:
            body = self._chunked_body()
            if body is None:
                return None
            head.body = body
        else:
            if len(self.buffer) > MAX_RESPONSE_BODY:
                raise ProtocolError("a body longer than %d bytes" % MAX_RESPONSE_BODY)
            return None
        self.head = None
        return head

    def end_of_stream(self) -> Optional[Response]:
        """The server closed: the response its close completes, or None when nothing was pending."""
        head = self.head
        if head is not None and head.length == UNTIL_CLOSE:
            head.body, self.head = bytes(self.buffer), None
            self.buffer.clear()
            return head
        if head is not None or self.buffer:
            raise ConnectionLost("the connection closed in the middle of a response")
        return None

    def _check_head_so_far(self) -> None:
        start = bytes(self.buffer[:7])
        if start != b"HTTP/1."[:len(start)]:
            raise ProtocolError("%r where an HTTP/1.x status line should be" % bytes(self.buffer[:24]))
        if len(self.buffer) > MAX_RESPONSE_HEAD:
            raise ProtocolError("a response head longer than %d bytes" % MAX_RESPONSE_HEAD)

    def _chunked_body(self) -> Optional[bytes]:
        """The whole chunked body, once all of it (and its trailer section) has arrived."""
        buffer, position, chunks, total = self.buffer, 0, [], 0
        while True:
            end = buffer.find(b"\r\n", position)
            if end < 0:
                return self._incomplete_line(position)
            size_line = _CHUNK_SIZE_LINE.fullmatch(buffer, position, end)
            if size_line is None:
                raise ProtocolError("a malformed chunk size line: %r" % bytes(buffer[position:end])[:40])
            size = int(size_line.group(1), 16)
            position = end + 2
            if size == 0:
                break
            total += size
            if total > MAX_RESPONSE_BODY:
                raise ProtocolError("a body longer than %d bytes" % MAX_RESPONSE_BODY)
            if len(buffer) < position + size + 2:
                return None
            if buffer[position + size:position + size + 2] != b"\r\n":
                raise ProtocolError("a chunk longer than its size line says")
            chunks.append(bytes(buffer[position:position + size]))
            position += size + 2
        while True:  # the trailer section: field lines, then an empty line
            end = buffer.find(b"\r\n", position)
            if end < 0:
                return self._incomplete_line(position)
            if end == position:
                break
            if _TRAILER_LINE.fullmatch(buffer, position, end) is None:
                raise ProtocolError("a malformed trailer field line: %r" % bytes(buffer[position:end])[:40])
            position = end + 2
        del buffer[:position + 2]
        return b"".join(chunks)

    def _incomplete_line(self, position: int) -> None:
        if len(self.buffer) - position > MAX_RESPONSE_HEAD or position > 2 * MAX_RESPONSE_BODY:
            raise ProtocolError("a chunk size or trailer line longer than %d bytes" % MAX_RESPONSE_HEAD)
        return None


# ---------------------------------------------------------------------------
# Legacy database adapter (pg8000, read only)
# ---------------------------------------------------------------------------

OPTIONAL_COLUMNS = ("namespace", "updated_at", "embedding")
# Timestamps are read as RFC 3339 text in UTC, formatted by the server:
# parsing them into datetimes only to print them again dominated -dry-run.
RFC3339_UTC = ("CASE WHEN isfinite({0}) THEN to_char({0} AT TIME ZONE 'UTC', "
               "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') ELSE {0}::text END")


class LegacyDatabase:
    """A read-only session on the platform's PostgreSQL."""

    def __init__(self, config: DatabaseConfig):
        self.config = config
        self.connection = None
        self.columns: Tuple[str, ...] = ()

    def __enter__(self) -> LegacyDatabase:
        self.connection = _connect(self.config)
        with self._errors():
            # One snapshot for the whole run; the session refuses writes.
            self.connection.run("START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            found = self.connection.run(
                "SELECT a.attname FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass('agent_memories') "
                "AND a.attnum > 0 AND NOT a.attisdropped")
        if not found:
            raise DependencyError(
                "The legacy table agent_memories does not exist in %s (already migrated, "
                "or the wrong database); check DATABASE_URL." % self.config.describe())
        self.columns = tuple(name for (name,) in found)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def _errors(self):
        return _database_errors(self.config, connected=True)

    def read_workspaces(self) -> WorkspaceTree:
        with self._errors():
            has_status = self.connection.run(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('workspaces') "
                "AND attname = 'status' AND NOT attisdropped")
            status = "status::text" if has_status else "NULL"
            return WorkspaceTree(self.connection.run(
                "SELECT id::text, parent_id::text, %s FROM workspaces" % status))  # noqa: S608

    def _select(self) -> str:
        """The columns of a LegacyRow; an optional column the tenant lacks reads as NULL."""
        as_text = {"namespace": "namespace", "updated_at": RFC3339_UTC.format("updated_at"),
                   "embedding": "embedding::text"}
        select = ["id::text", "workspace_id::text", "content", "scope::text",
                  RFC3339_UTC.format("created_at")]
        select += [as_text[name] if name in self.columns else "NULL" for name in OPTIONAL_COLUMNS]
        return "SELECT %s FROM agent_memories" % ", ".join(select)  # noqa: S608 - fixed column text

    def count_rows(self, workspace: Optional[str] = None, limit: Optional[int] = None,
                   after: Optional[Dict] = None) -> int:
        """How many rows rows() will yield (same snapshot, so exact)."""
        where, params = _row_filter(workspace, after)
        sql = "SELECT count(*) FROM agent_memories" + where  # noqa: S608 - fixed text, bound values
        with self._errors():
            [[count]] = self.connection.run(sql, **params)
        return count if limit is None else min(count, limit)

    def rows(self, workspace: Optional[str] = None, limit: Optional[int] = None,
             after: Optional[Dict] = None) -> Iterator[LegacyRow]:
        """Rows oldest first (after a checkpoint position)."""
        # Only fixed text is spliced in; every value is bound.
        where, params = _row_filter(workspace, after)
        sql = self._select() + where + " ORDER BY created_at ASC NULLS FIRST, id"
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = limit
        return self._stream(sql, params)

    def rows_by_workspace(self, workspaces: List[str]) -> Iterator[LegacyRow]:
        """The rows of these workspaces, one workspace after another, each oldest first."""
        return self._stream(self._select() + " WHERE workspace_id = ANY(CAST(:workspaces AS uuid[])) "
                            "ORDER BY workspace_id, created_at ASC NULLS FIRST, id",
                            {"workspaces": workspaces})

    def _stream(self, sql: str, params: Dict) -> Iterator[LegacyRow]:
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

    def _legacy_row(self, record: Sequence) -> LegacyRow:
        row_id, workspace_id, content, scope, created_at, namespace, updated_at, embedding = record
        legacy: Dict[str, object] = {
            "workspace_id": workspace_id, "scope": scope, "created_at": created_at,
        }
        if "updated_at" in self.columns:
            legacy["updated_at"] = updated_at
        if "namespace" in self.columns:
            legacy["namespace"] = namespace
        return LegacyRow(row_id, workspace_id, content, scope, legacy, parse_embedding(embedding))

    def workspaces_with_rows(self) -> List[str]:
        with self._errors():
            return [w for (w,) in self.connection.run(
                "SELECT DISTINCT workspace_id::text FROM agent_memories "
                "WHERE workspace_id IS NOT NULL")]

    def have_search_words(self, texts: List[str]) -> List[bool]:
        """Whether PostgreSQL's English full-text parser finds any word in each text."""
        if not texts:
            return []
        with self._errors():
            return [found for (found,) in self.connection.run(
                "SELECT numnode(plainto_tsquery('english', text)) > 0 FROM unnest(CAST(:texts AS text[])) "
                "WITH ORDINALITY AS t(text, n) ORDER BY n", texts=texts)]


def _row_filter(workspace: Optional[str], after: Optional[Dict]) -> Tuple[str, Dict[str, object]]:
    """WHERE clause for -workspace and a checkpoint position, in the read order
    (created_at ascending with NULLs first, then id)."""
    conditions, params = [], {}
    if workspace is not None:
        conditions.append("workspace_id = CAST(:workspace AS uuid)")
        params["workspace"] = workspace
    if after is not None:
        conditions.append(
            "(CASE WHEN CAST(:after_at AS timestamptz) IS NULL"
            " THEN created_at IS NOT NULL OR id > CAST(:after_id AS uuid)"
            " ELSE created_at > CAST(:after_at AS timestamptz)"
            " OR (created_at = CAST(:after_at AS timestamptz) AND id > CAST(:after_id AS uuid)) END)")
        params["after_at"] = after["created_at"]
        params["after_id"] = after["id"]
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


def _ssl_context(config: DatabaseConfig):
    """pg8000's ssl_context for a libpq sslmode (None = try TLS, else plain)."""
    import ssl

    mode = config.sslmode
    if mode == "require" and config.sslrootcert:
        mode = "verify-ca"  # libpq: require with a root certificate verifies it
    if mode in ("disable", "allow"):
        return False
    if mode == "prefer":
        return None
    if mode == "require":
        return True
    context = ssl.create_default_context(cafile=config.sslrootcert)
    context.check_hostname = mode == "verify-full"
    return context


def _connect(config: DatabaseConfig):
    import pg8000.native

    params = dict(config.startup_params)
    params["default_transaction_read_only"] = "on"  # the session refuses writes
    unix_sock = None
    if config.host.startswith("/"):
        unix_sock = "%s/.s.PGSQL.%d" % (config.host, config.port)
    kwargs = dict(
        user=config.user, host=config.host, port=config.port, database=config.database,
        password=config.password, unix_sock=unix_sock, timeout=config.connect_timeout,
        application_name=config.application_name, startup_params=params,
    )
    with _database_errors(config):
        try:
            return pg8000.native.Connection(ssl_context=_ssl_context(config), **kwargs)
        except pg8000.native.DatabaseError as exc:
            # sslmode=allow: plain first, TLS when the server insists on it.
            if config.sslmode != "allow" or _sqlstate(exc) != "28000":
                raise
            return pg8000.native.Connection(ssl_context=True, **kwargs)


def _sqlstate(exc: Exception) -> str:
    details = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return details.get("C", "")


class _database_errors:
    """Turn pg8000 and socket errors into one clear DependencyError sentence."""

    def __init__(self, config: DatabaseConfig, connected: bool = False):
        self.config = config
        self.connected = connected

    def __enter__(self):
        return self

    def _lost(self, detail) -> DependencyError:
        return DependencyError(
            "The connection to the legacy database %s was lost (%s); check that it is running, "
            "then run the same command again." % (self.config.describe(), detail))

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (BackfillError, GeneratorExit)):
            return False
        import pg8000.exceptions

        where = self.config.describe()
        if isinstance(exc, pg8000.exceptions.DatabaseError):
            code = _sqlstate(exc)
            message = exc.args[0].get("M", "") if isinstance(exc.args[0], dict) else str(exc)
            if code in ("28P01", "28000"):
                raise DependencyError(
                    "The legacy database refused the login for %s (%s); check the user and "
                    "password in DATABASE_URL." % (where, message)) from None
            if code.startswith(("57P", "08")) and self.connected:
                raise self._lost(message) from None
            if code == "3D000":
                raise DependencyError(
                    "The legacy database %s does not exist; check the database name in "
                    "DATABASE_URL." % where) from None
            raise DependencyError(
                "The legacy database %s failed (SQLSTATE %s: %s); the run stopped, nothing "
                "further was written." % (where, code, message)) from None
        if isinstance(exc, (pg8000.exceptions.InterfaceError, OSError)):
            cause = exc.__cause__ or exc
            if self.connected:
                raise self._lost(cause) from None
            raise DependencyError(
                "Cannot reach the legacy database %s (%s); check that it is running and "
                "that DATABASE_URL is right." % (where, cause)) from None
        return False


# ---------------------------------------------------------------------------
# Plugin adapter (urllib3, JSON over HTTP): REFERENCE §4
# ---------------------------------------------------------------------------

class PluginClient:
    """The memory plugin's HTTP API, over one pool of keep-alive connections.

    Connection errors, timeouts and 429/502/503/504 are retried by urllib3's
    Retry with exponential backoff (honouring Retry-After); every request is
    safe to repeat because each write carries the row's id.
    """

    def __init__(self, base_url: str, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, connections: int = 1):
        import urllib3

        url = urlsplit(base_url)
        self.base_url = url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()  # shown: no userinfo
        self.address = parse_plugin_address(base_url)
        self.retry = retry = urllib3.Retry(
            total=retries, backoff_factor=BACKOFF_FACTOR, backoff_max=BACKOFF_MAX,
            backoff_jitter=BACKOFF_JITTER,
            status_forcelist=RETRY_STATUSES, allowed_methods=None,
            respect_retry_after_header=True, raise_on_status=False,
        )
        # One connection pool for the one plugin host: no per-request URL parsing
        # and pool lookup, as a PoolManager would do.
        self.pool = urllib3.connection_from_url(
            base_url, maxsize=connections, block=True, retries=retry,
            timeout=urllib3.Timeout(total=timeout),
            headers={"Content-Type": "application/json", "User-Agent": PROG + "/" + __version__},
        )

    def _request(self, method: str, path: str, body: Optional[Dict] = None, retries=None):
        import urllib3

        payload = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        try:
            response = self.pool.urlopen(method, self.address.prefix + path, body=payload,
                                         retries=retries)
        except urllib3.exceptions.HTTPError as exc:
            raise plugin_unreachable(self.base_url, getattr(exc, "reason", None) or exc) from None
        if response.status >= 400:
            raise PluginRejected(response.status, plugin_error_message(response.data, response.reason))
        try:
            return json.loads(response.data.decode("utf-8")) if response.data else None
        except ValueError:
            return None

    def check_health(self) -> str:
        """Raise DependencyError unless /v1/health says ok; return its version."""
        try:
            data = self._request("GET", "/v1/health", retries=self.retry.new(
                total=min(HEALTH_RETRIES, self.retry.total)))
        except PluginRejected as exc:
            raise DependencyError(
                "The memory plugin at %s is not healthy (%s); fix the plugin, then run "
                "again." % (self.base_url, exc)) from None
        if not isinstance(data, dict) or data.get("status") != "ok":
            raise DependencyError(
                "The memory plugin at %s did not report status ok on /v1/health; fix the "
                "plugin, then run again." % self.base_url)
        return str(data.get("version", "unknown"))

    def put_namespace(self, name: str, kind: str) -> None:
        self._request("PUT", "/v1/namespaces/" + quote(name, safe=""), {"kind": kind})

    def search(self, namespaces: List[str], query: Optional[str] = None,
               limit: int = SEARCH_CAP) -> List[Dict]:
        body: Dict[str, object] = {"namespaces": namespaces, "limit": limit}
        if query:
            body["query"] = query
        data = self._request("POST", "/v1/search", body)
        memories = (data or {}).get("memories") or []  # the plugin may send null
        return [m for m in memories if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def search_quietly(self, namespace: str) -> List[Dict]:
        """The newest records of a namespace; none if the plugin refuses to list it."""
        try:
            return self.search([namespace])
        except PluginRejected:
            return []


def plugin_unreachable(base_url: str, reason: object) -> DependencyError:
    return DependencyError("Cannot reach the memory plugin at %s (%s); check that it is running and "
                           "that MEMORY_PLUGIN_URL is right." % (base_url, _short(reason)))


def plugin_error_message(body: bytes, reason: Optional[str]) -> str:
    """The message of the plugin's error envelope, or the HTTP reason phrase."""
    try:
        data = json.loads(body.decode("utf-8")) if body else None
    except ValueError:
        data = None
    message = data.get("message") if isinstance(data, dict) else None
    return _short(message or reason or "")


def _short(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------
# Write stream: -apply's POSTs, pipelined HTTP/1.1 on sockets
# ---------------------------------------------------------------------------
# urllib3 costs several times the CPU of this per write, and in a tenant that
# CPU is taken from the plugin and the live platform.  One loop drives every
# connection (no threads, no locks); the plugin's other calls use urllib3.

@dataclass(frozen=True)
class PluginAddress:
    host: str
    port: int
    tls: bool
    prefix: str  # the URL's path, before /v1/...
    host_header: str


def parse_plugin_address(base_url: str) -> PluginAddress:
    parts = urlsplit(base_url)
    tls = parts.scheme == "https"
    default_port = 443 if tls else 80
    host = parts.hostname
    shown = "[%s]" % host if ":" in host else host.encode("idna").decode("ascii")
    if parts.port not in (None, default_port):
        shown += ":%d" % parts.port
    return PluginAddress(host, parts.port or default_port, tls, parts.path.rstrip("/"), shown)


def connection_depths(concurrency: int) -> List[int]:
    """How --concurrency N writes in flight spread over connections: ceil(N / 4) of them."""
    count = -(-concurrency // PIPELINE_DEPTH)
    return [concurrency // count + (n < concurrency % count) for n in range(count)]


def backoff_seconds(retry: int) -> float:
    """The wait before the retry-th re-send: none for the first, then doubling (urllib3's rule)."""
    import random

    if retry <= 1:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_FACTOR * 2 ** (retry - 1) + random.random() * BACKOFF_JITTER)


def write_request_head(address: PluginAddress, namespace: str) -> bytes:
    """A memory's POST up to its Content-Length value (the length and body follow)."""
    return ("POST %s/v1/namespaces/%s/memories HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s/%s\r\n"
            "Content-Type: application/json\r\nContent-Length: " % (
                address.prefix, quote(namespace, safe=""), address.host_header, PROG,
                __version__)).encode("ascii")


JSON_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), check_circular=False)


class PendingWrite:
    """A planned row on its way to the plugin: its encoded request and its retries so far."""

    __slots__ = ("number", "planned", "request", "retries", "not_before")

    def __init__(self, number: int, planned: PlannedWrite, request: bytes):
        self.number = number  # in the read order
        self.planned = planned
        self.request = request
        self.retries = 0
        self.not_before = 0.0  # monotonic time before which it is not re-sent


class WriteConnection:
    """One keep-alive connection to the plugin and the writes in flight on it, oldest first.

    It pipelines (up to `depth` writes) only once it has answered as a
    persistent HTTP/1.1 connection; until then it carries one write at a time,
    so a server that answers once and closes, or speaks HTTP/1.0, still gets
    every row.  The socket is non-blocking: a timeout on it would cost a poll()
    before every send and receive.
    """

    def __init__(self, address: PluginAddress, tls_context, depth: int, timeout: float):
        self.address = address
        self.tls_context = tls_context
        self.would_block: Tuple[type, ...] = (BlockingIOError,)
        if tls_context is not None:
            import ssl

            self.would_block += (ssl.SSLWantReadError, ssl.SSLWantWriteError)
        self.depth = depth
        self.timeout = timeout
        self.sock = None
        self.parser: Optional[ResponseParser] = None
        self.received = memoryview(bytearray(RECEIVE_BYTES))
        self.outgoing = b""  # requests the socket has not taken yet
        self.in_flight: Deque[PendingWrite] = deque()
        self.pipelining = False
        self.last_progress = 0.0  # when it last sent or received: --timeout runs from here

    def fileno(self) -> int:
        return self.sock.fileno()

    def free_slots(self) -> int:
        if self.pipelining:
            return self.depth - len(self.in_flight)
        return 0 if self.in_flight else 1

    def send(self, writes: List[PendingWrite], now: float) -> None:
        """Send the writes' requests, pipelined; on OSError they stay in flight, unanswered."""
        if (self.sock is not None and not self.in_flight and now - self.last_progress > IDLE_CHECK_SECONDS
                and select.select([self.sock], [], [], 0)[0]):
            self.close()  # closed by the server while idle (or it sent what nobody asked for)
        self.in_flight.extend(writes)
        self.last_progress = now
        if self.sock is None:
            self._open()
        self.outgoing += writes[0].request if len(writes) == 1 else b"".join([w.request for w in writes])
        self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; the rest waits until it is writable again."""
        try:
            sent = self.sock.send(self.outgoing)
        except self.would_block:
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
        self.sock, self.parser, self.pipelining, self.outgoing = sock, ResponseParser(), False, b""

    def receive(self, now: float) -> Tuple[List[Response], bool]:
        """The responses that have arrived (maybe none), and whether the server closed."""
        try:
            size = self.sock.recv_into(self.received)
        except self.would_block:
            return [], False
        self.last_progress = now
        if not size:
            final = self.parser.end_of_stream()
            return ([] if final is None else [final]), True
        self.parser.feed(self.received[:size])
        while self.tls_context is not None and self.sock.pending():  # decrypted, not yet read
            self.parser.feed(self.received[:self.sock.recv_into(self.received)])
        responses = []
        response = self.parser.next_response()
        while response is not None:
            responses.append(response)
            response = self.parser.next_response()
        return responses, False

    def close(self) -> List[PendingWrite]:
        """Close the connection; return the writes still unanswered on it."""
        if self.sock is not None:
            self.sock.close()
        self.sock, self.parser, self.pipelining, self.outgoing = None, None, False, b""
        unanswered = list(self.in_flight)
        self.in_flight.clear()
        return unanswered


# ---------------------------------------------------------------------------
# Checkpoint and failure report (local files)
# ---------------------------------------------------------------------------

class Checkpoint:
    """--checkpoint FILE: how far -apply got, so that a re-run resumes there.

    Every row before `position` (in the read order) is durably written to the
    plugin or skipped by design.  The file is JSON, replaced atomically
    (temporary file + rename), and names the row set it belongs to; a run with
    another mode, -workspace or database refuses it.
    """

    def __init__(self, path: str, identity: Dict[str, object], position: Optional[Dict] = None,
                 rows_done: int = 0, complete: bool = False):
        self.path = path
        self.identity = identity
        self.position = position
        self.rows_done_before = rows_done
        self.rows_done = rows_done
        self.complete = complete
        self.saved_at = 0.0

    @classmethod
    def open(cls, settings: Settings) -> Checkpoint:
        identity = {"mode": settings.mode, "workspace": settings.workspace,
                    "database": settings.database.describe()}
        path = settings.checkpoint
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            checkpoint = cls(path, identity)
            checkpoint.save()  # proves the path is writable before anything is written
            return checkpoint
        except OSError as exc:
            raise UsageError("Cannot read the checkpoint %s (%s); choose a readable file."
                             % (path, exc.strerror)) from None
        try:
            data = json.loads(text)
            position = data["position"]
            if position is not None:
                position = {"created_at": position["created_at"], "id": str(position["id"])}
            checkpoint = cls(path, dict(data["identity"]), position, int(data["rows_done"]),
                             bool(data["complete"]))
        except (ValueError, KeyError, TypeError):
            raise UsageError("The checkpoint %s is not a memory-backfill checkpoint (unreadable JSON "
                             "or missing fields); remove it to start over." % path) from None
        if checkpoint.identity != identity:
            differ = sorted(k for k in identity if checkpoint.identity.get(k) != identity[k])
            raise UsageError("The checkpoint %s belongs to another run (different %s); use the same "
                             "options, or another checkpoint file." % (path, " and ".join(differ)))
        return checkpoint

    def advance(self, position: Tuple[Optional[str], str], rows_done_this_run: int) -> None:
        self.position = {"created_at": position[0], "id": position[1]}
        self.rows_done = self.rows_done_before + rows_done_this_run
        if time.monotonic() - self.saved_at >= CHECKPOINT_SAVE_SECONDS:
            self.save()

    def save(self, complete: bool = False) -> None:
        self.complete = complete
        data = {"tool": PROG, "format": 1, "identity": self.identity, "position": self.position,
                "rows_done": self.rows_done, "complete": complete}
        temporary = self.path + ".tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            raise UsageError("Cannot write the checkpoint %s (%s); choose a writable path."
                             % (self.path, exc.strerror)) from None
        self.saved_at = time.monotonic()


class FailureLog:
    """--failures FILE: one JSON object per skipped or failed row, never the content."""

    def __init__(self, path: Optional[str], append: bool = False):
        self.file = None
        self.lock = threading.Lock()
        if path:
            try:
                self.file = open(path, "a" if append else "w", encoding="utf-8")
            except OSError as exc:
                raise UsageError("Cannot write the failures file %s (%s); choose a writable path."
                                 % (path, exc.strerror)) from None

    def record(self, row: LegacyRow, reason: Optional[str] = None, error: Optional[str] = None,
               status: Optional[int] = None) -> None:
        if self.file is None:
            return
        entry: Dict[str, object] = {"id": row.id, "workspace_id": row.workspace_id, "scope": row.scope}
        if reason is not None:
            entry["reason"] = reason
        if error is not None:
            entry["error"] = error
        if status is not None:
            entry["status"] = status
        self._write(entry)

    def record_finding(self, finding: Finding) -> None:
        self._write(finding.to_json())

    def _write(self, entry: Dict[str, object]) -> None:
        if self.file is not None:
            with self.lock:
                self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------
# Progress and pacing
# ---------------------------------------------------------------------------

class RateLimiter:
    """--max-rate: spaces writes evenly so that they stay under `rate` per second."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self.next_slot = 0.0
        self.last_wait = float("-inf")  # when a write last had to wait for the cap

    def delay(self, now: float) -> float:
        """0 when a write may go now (it takes the slot), else the seconds until it may."""
        if now < self.next_slot:
            self.last_wait = now
            return self.next_slot - now
        self.next_slot = now + self.interval
        return 0.0

    def limiting(self) -> bool:
        return time.monotonic() - self.last_wait < 2.0


class Progress:
    """Rows done / total, rows per second, ETA and errors, on stderr.

    On a terminal: one line that rewrites itself; otherwise a plain line at
    most every PROGRESS_LOG_SECONDS.  Runs in its own thread.
    """

    def __init__(self, report: BackfillReport, total: int, stream, limiter=None):
        self.report = report
        self.total = total
        self.stream = stream
        self.limiter = limiter
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()
        if self.tty:
            self.stream.write("\r%s\n" % self.line())
            self.stream.flush()

    def line(self) -> str:
        report = self.report
        done = report.copied + report.skipped + report.errors
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        eta = "%ds" % ((self.total - done) / rate) if rate > 0 and done < self.total else "-"
        percent = 100.0 * done / self.total if self.total else 100.0
        capped = ", capped by --max-rate" if self.limiter and self.limiter.limiting() else ""
        return "%d/%d rows (%.0f%%), %.0f rows/s, ETA %s, errors %d%s" % (
            done, self.total, percent, rate, eta, report.errors, capped)

    def _run(self) -> None:
        interval = PROGRESS_TTY_SECONDS if self.tty else PROGRESS_LOG_SECONDS
        while not self.stopped.wait(interval):
            if self.tty:
                self.stream.write("\r\x1b[K" + self.line())
            else:
                self.stream.write("progress: %s\n" % self.line())
            self.stream.flush()


# ---------------------------------------------------------------------------
# The three modes
# ---------------------------------------------------------------------------

def backfill(settings: Settings, log, stderr=None) -> BackfillReport:
    """-dry-run (settings.mode == 'dry-run') and -apply.

    -apply stops early, cleanly, on a lost dependency or a signal: the writes
    in flight get their answers, the checkpoint is saved, and the error raised
    carries the report so far.
    """
    report = BackfillReport(settings.mode, redact=settings.redact)
    if settings.mode != "apply":
        if settings.plugin_url:
            try:
                version = PluginClient(settings.plugin_url, settings.timeout, 0).check_health()
                report.plugin_status = "ok (version %s): -apply could start" % version
            except DependencyError as exc:
                report.plugin_status = "NOT ready, -apply would stop: %s" % exc
        with LegacyDatabase(settings.database) as database:
            with _planned_rows(database, settings, report, None, log, stderr) as outcomes:
                for outcome in outcomes:
                    if isinstance(outcome, PlannedWrite):
                        report.count_copy(outcome)
                        log("would copy %s -> %s", outcome.row.id, outcome.target.namespace)
        return report

    checkpoint = Checkpoint.open(settings) if settings.checkpoint else None
    if checkpoint is not None:
        report.checkpoint_path = settings.checkpoint
        report.resumed_from = checkpoint.position
        if checkpoint.complete:
            report.plugin_status = "not contacted: the checkpoint says this backfill is complete"
            return report
    failures = FailureLog(settings.failures, append=bool(checkpoint and checkpoint.position))
    report.failures_path = settings.failures
    plugin = PluginClient(settings.plugin_url, settings.timeout, settings.retries)
    report.plugin_status = "ok (version %s)" % plugin.check_health()
    stop = threading.Event()
    writer = Writer(plugin, settings, report, log, checkpoint, failures, stop)
    stopped: Optional[BackfillError] = None
    with _signals_stop(stop) as received:
        try:
            with LegacyDatabase(settings.database) as database:
                with _planned_rows(database, settings, report, writer, log, stderr) as outcomes:
                    stopped = writer.run(outcomes)
        except BackfillError as exc:
            stopped = exc
        except Exception as exc:  # noqa: BLE001 - a defect: stop with the summary and checkpoint
            stopped = BackfillError("-apply failed unexpectedly (%s, a defect of %s); stopped. "
                                    "Re-run to resume." % (type(exc).__name__, PROG))
        finally:
            failures.close()
    if received:
        stopped = Interrupted(received[0])
    if checkpoint is not None:
        # Complete only when the table was read to its end: a -limit run that
        # used up its limit leaves the rest for the next run.
        reached_end = settings.limit is None or report.scanned < settings.limit
        try:
            checkpoint.save(complete=stopped is None and report.errors == 0 and reached_end)
        except BackfillError as exc:
            stopped = stopped or exc
    if stopped is not None:
        report.stopped, report.stopped_status = str(stopped), stopped.status
        stopped.report = report
        raise stopped
    return report


@contextlib.contextmanager
def _planned_rows(database: LegacyDatabase, settings: Settings, report: BackfillReport,
                  writer: Optional[Writer], log, stderr) -> Iterator[Iterator[Outcome]]:
    """The planned rows, oldest first (after the checkpoint), with progress shown meanwhile."""
    after = writer.mark.checkpoint.position if writer and writer.mark.checkpoint else None
    tree = database.read_workspaces()
    total = database.count_rows(settings.workspace, settings.limit, after)
    progress = Progress(report, total, stderr or sys.stderr, writer and writer.limiter)
    with contextlib.nullcontext() if settings.quiet or settings.verbose else progress:
        yield _outcomes(database.rows(settings.workspace, settings.limit, after), tree, settings,
                        report, log)


def _outcomes(rows: Iterable[LegacyRow], tree: WorkspaceTree, settings: Settings,
              report: BackfillReport, log) -> Iterator[Outcome]:
    for row in rows:
        report.scanned += 1
        outcome = plan_row(row, tree, settings.redact)
        if isinstance(outcome, Skipped):
            report.skipped += 1
            report.skip_reasons[outcome.reason] += 1
            log("skip %s: %s", row.id, outcome.reason)
        yield outcome


@contextlib.contextmanager
def _signals_stop(stop: threading.Event):
    """First SIGINT/SIGTERM: set `stop` (the run winds down); a second: exit at once."""
    import signal

    received: List[int] = []
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


class LowWaterMark:
    """Rows numbered in read order; the mark is the longest prefix of rows done
    (written, or skipped by design), and the checkpoint follows it."""

    def __init__(self, checkpoint: Optional[Checkpoint]):
        self.checkpoint = checkpoint
        self.next_number = 0
        self.low_water = -1  # every row numbered <= this is done
        self.settled: set = set()  # rows done above the mark
        self.positions: Dict[int, Tuple[Optional[str], str]] = {}
        # After a refused row the mark cannot pass it in this run: stop tracking
        # (memory stays flat); a resume starts again at that row.
        self.frozen = False

    def number(self, row: LegacyRow) -> int:
        number = self.next_number
        self.next_number += 1
        if not self.frozen:
            self.positions[number] = (row.legacy.get("created_at"), row.id)
        return number

    def done(self, number: int) -> None:
        """Row `number` is done; raises BackfillError if the checkpoint cannot be saved."""
        if self.frozen:
            return
        self.settled.add(number)
        if self.low_water + 1 not in self.settled:
            return
        while self.low_water + 1 in self.settled:
            self.low_water += 1
            self.settled.discard(self.low_water)
            position = self.positions.pop(self.low_water)
        if self.checkpoint is not None:
            self.checkpoint.advance(position, self.low_water + 1)

    def freeze(self) -> None:
        self.frozen = True
        self.settled.clear()
        self.positions.clear()


class Writer:
    """-apply's writes: planned rows, oldest first, pipelined over keep-alive
    connections by one loop.

    At most --concurrency writes are in flight at the plugin, and at most
    READ_AHEAD_ROWS more are planned ahead (in one go), so memory stays flat
    whatever the table size.  Each namespace is upserted (through urllib3)
    once per run, before its first write.  Connection errors, timeouts and
    429/502/503/504 are retried with backoff and jitter, honouring
    Retry-After; every unanswered write on a failed connection is re-sent on
    a fresh one (a retry of each: writes are idempotent by id).  A dependency
    failure stops new work; the writes in flight still get their answers.
    """

    def __init__(self, plugin: PluginClient, settings: Settings, report: BackfillReport, log,
                 checkpoint: Optional[Checkpoint], failures: FailureLog, stop: threading.Event):
        import ssl

        self.plugin = plugin
        self.report = report
        self.log = log
        self.failures = failures
        self.stop = stop
        self.timeout = settings.timeout
        self.max_retries = settings.retries
        self.max_consecutive_failures = settings.max_consecutive_failures
        self.limiter = RateLimiter(settings.max_rate) if settings.max_rate else None
        context = ssl.create_default_context() if plugin.address.tls else None
        self.connections = [WriteConnection(plugin.address, context, depth, settings.timeout)
                            for depth in connection_depths(settings.concurrency)]
        self.capacity = settings.concurrency  # writes in flight at the plugin, at most
        self.window = settings.concurrency + READ_AHEAD_ROWS  # rows read and not yet done, at most
        self.unresolved = 0
        self.ready: Deque[PendingWrite] = deque()  # to send, oldest first
        self.retrying: List[PendingWrite] = []  # to send again after their backoff
        self.heads: Dict[str, bytes] = {}  # namespace -> the start of its POST
        self.namespaces: set = set()  # upserted in this run
        self.mark = LowWaterMark(checkpoint)
        self.consecutive_failures = 0
        self.fatal: Optional[BackfillError] = None
        self.answered = 0  # responses read, in all
        self.answer_rate = 0.0  # responses per second, a moving average
        self.pace = 0.0  # pause between reads while writes are in flight
        self.last_read = 0.0

    def run(self, outcomes: Iterator[Outcome]) -> Optional[BackfillError]:
        """Write every planned row; return what stopped the run early, if anything."""
        more_rows = True
        try:
            while True:
                if self.stop.is_set():
                    self.ready.clear()
                    self.retrying.clear()
                else:
                    if more_rows and len(self.ready) < self.capacity:
                        more_rows = self._read_ahead(outcomes)
                    self._send()
                busy = [connection for connection in self.connections if connection.in_flight]
                if not (busy or self.ready or self.retrying or (more_rows and not self.stop.is_set())):
                    return self.fatal
                self._wait(busy)
        finally:
            for connection in self.connections:
                connection.close()

    # --- reading ahead ----------------------------------------------------

    def _read_ahead(self, outcomes: Iterator[Outcome]) -> bool:
        """Plan rows until the window is full; False once there are no more."""
        while self.unresolved < self.window:
            try:
                outcome = next(outcomes, None)
            except BackfillError as exc:  # the legacy database was lost
                self._fail(exc)
                return False
            if outcome is None:
                return False
            number = self.mark.number(outcome.row)
            if isinstance(outcome, Skipped):
                self.failures.record(outcome.row, reason=outcome.reason)
                self._settle(number)
                continue
            self.unresolved += 1
            try:
                self.ready.append(PendingWrite(number, outcome, self._request(outcome)))
            except RowFailed as exc:
                self._refused(PendingWrite(number, outcome, b""), exc)
        return True

    def _request(self, planned: PlannedWrite) -> bytes:
        """The POST of one memory, ready to send."""
        namespace = planned.target.namespace
        head = self.heads.get(namespace)
        if head is None:
            head = self.heads[namespace] = write_request_head(self.plugin.address, namespace)
        try:
            payload = JSON_ENCODER.encode(planned.body).encode("ascii")
        except ValueError:  # allow_nan=False: only the embedding holds floats
            raise RowFailed("the embedding holds NaN or Infinity, which JSON cannot carry") from None
        return b"%s%d\r\n\r\n%s" % (head, len(payload), payload)

    # --- sending ----------------------------------------------------------

    def _send(self) -> None:
        now = time.monotonic()
        if self.retrying:
            due = sorted((w for w in self.retrying if w.not_before <= now), key=lambda w: w.number)
            if due:
                self.retrying = [w for w in self.retrying if w.not_before > now]
                self.ready.extendleft(reversed(due))
        for connection in self.connections:
            batch: List[PendingWrite] = []
            slots = connection.free_slots()
            while slots > len(batch) and self.ready and not self.stop.is_set():
                if self.limiter is not None and self.limiter.delay(now) > 0:
                    break
                write = self.ready.popleft()
                if write.planned.target.namespace in self.namespaces or self._upsert_namespace(write):
                    batch.append(write)
            if batch:
                try:
                    connection.send(batch, now)
                except OSError as exc:
                    self._connection_failed(connection, exc, now)

    def _upsert_namespace(self, write: PendingWrite) -> bool:
        """PUT the write's namespace (the first time in this run); False if the write cannot go."""
        target = write.planned.target
        try:
            self.plugin.put_namespace(target.namespace, target.kind)
        except RowFailed as exc:  # the next row of this namespace tries again
            self._refused(write, exc)
            return False
        except BackfillError as exc:
            self._fail(exc)
            return False
        self.namespaces.add(target.namespace)
        return True

    # --- receiving --------------------------------------------------------

    def _wait(self, busy: List[WriteConnection]) -> None:
        """Wait for answers (or the next retry, rate slot or timeout), then handle them.

        With all --concurrency writes in flight, answers are read only every so
        often (`pace`: about the time the plugin takes to answer half of them),
        so that each system call carries several requests and responses: on
        loopback one send and one receive cost more CPU than reading and
        planning a row.  The plugin has the other half to work on meanwhile.
        """
        now = time.monotonic()
        if not busy:
            time.sleep(max(0.0, self._wake_time(now) - now))
            return
        full = sum(len(connection.in_flight) for connection in busy) >= self.capacity
        if full and now < self.last_read + self.pace:
            time.sleep(self.last_read + self.pace - now)
            now = time.monotonic()
        answered = self.answered
        for connection in busy:  # answers are usually there by now: no select() first
            self._receive(connection, now)
        if self.answered == answered:
            busy = [connection for connection in self.connections if connection.in_flight]
            if busy:
                readable, writable, _ = select.select(
                    busy, [connection for connection in busy if connection.outgoing], [],
                    max(0.0, self._wake_time(now) - now))
                now = time.monotonic()
                for connection in writable:
                    try:
                        connection.flush()
                    except OSError as exc:
                        self._connection_failed(connection, exc, now)
                for connection in readable:
                    if connection.in_flight:
                        self._receive(connection, now)
        if full and self.answered > answered:
            rate = (self.answered - answered) / max(now - self.last_read, 1e-6)
            self.answer_rate = rate if not self.answer_rate else 0.8 * self.answer_rate + 0.2 * rate
            self.pace = min(MAX_PACE_SECONDS, 0.5 * self.capacity / self.answer_rate)
        self.last_read = now
        for connection in self.connections:
            if connection.in_flight and now - connection.last_progress >= self.timeout:
                self._connection_failed(connection, ConnectionLost(
                    "no answer within %g s (--timeout)" % self.timeout), now)

    def _wake_time(self, now: float) -> float:
        """When to stop waiting for answers: a timeout, a retry or rate slot due, or a signal."""
        wake = now + STOP_CHECK_SECONDS
        busy = [connection.last_progress for connection in self.connections if connection.in_flight]
        if busy:
            wake = min(wake, min(busy) + self.timeout)
        if self.retrying:
            wake = min(wake, min(write.not_before for write in self.retrying))
        if self.ready and self.limiter is not None:
            wake = min(wake, self.limiter.next_slot)
        return wake

    def _receive(self, connection: WriteConnection, now: float) -> None:
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
            self._answered(connection.in_flight.popleft(), response, now)
            if not response.persistent:  # the rest were not answered: send them again
                self.ready.extendleft(reversed(connection.close()))
                return
            connection.pipelining = True
        if closed:
            self._connection_failed(connection, ConnectionLost("the server closed the connection"), now)

    def _answered(self, write: PendingWrite, response: Response, now: float) -> None:
        self.answered += 1
        status = response.status
        if 200 <= status < 300:
            self._written(write)
        elif status in RETRY_STATUSES and write.retries < self.max_retries:
            write.retries += 1
            delay = backoff_seconds(write.retries)
            retry_after = response.field(b"retry-after")
            if retry_after is not None:
                with contextlib.suppress(ValueError):  # urllib3's InvalidHeader is a ValueError
                    delay = self.plugin.retry.parse_retry_after(retry_after.decode("latin-1"))
            write.not_before = now + delay
            self.retrying.append(write)
        else:
            self._refused(write, PluginRejected(status, plugin_error_message(response.body, response.reason)))

    def _connection_failed(self, connection: WriteConnection, error: Exception, now: float) -> None:
        """Every unanswered write on the connection goes again, on a fresh one (a retry of each)."""
        for write in connection.close():
            write.retries += 1
            if write.retries > self.max_retries:
                self._fail(plugin_unreachable(self.plugin.base_url, error))
                return
            write.not_before = now + backoff_seconds(write.retries)
            self.retrying.append(write)

    def _protocol_error(self, connection: WriteConnection, error: ProtocolError) -> None:
        connection.close()  # its unanswered writes are not done: a resume writes them
        self._fail(DependencyError(
            "The memory plugin at %s sent a response that is not valid HTTP/1.1 (%s); stopped. "
            "Check that MEMORY_PLUGIN_URL points at the memory plugin, then re-run to resume."
            % (self.plugin.base_url, error)))

    # --- outcomes ---------------------------------------------------------

    def _written(self, write: PendingWrite) -> None:
        planned = write.planned
        self.report.count_copy(planned)
        self.consecutive_failures = 0
        self.unresolved -= 1
        self._settle(write.number)
        self.log("copy %s -> %s", planned.row.id, planned.target.namespace)

    def _refused(self, write: PendingWrite, error: RowFailed) -> None:
        row = write.planned.row
        self.failures.record(row, error=str(error), status=getattr(error, "status", None))
        self.log("error %s: %s", row.id, error)
        self.report.count_error(row.id, error)
        self.mark.freeze()
        self.unresolved -= 1
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.max_consecutive_failures:
            self._fail(DependencyError(
                "The plugin refused %d rows in a row (the last: %s); stopped. Fix the plugin, "
                "then re-run to resume." % (self.consecutive_failures, error)))

    def _settle(self, number: int) -> None:
        try:
            self.mark.done(number)
        except BackfillError as exc:  # the checkpoint cannot be saved
            self._fail(exc)

    def _fail(self, error: BackfillError) -> None:
        self.fatal = self.fatal or error
        self.stop.set()


def verify(settings: Settings, log) -> VerifyReport:
    """-verify: every row -apply would write, for a sample of workspaces, looked up in the plugin."""
    from concurrent.futures import ThreadPoolExecutor

    report = VerifyReport(failures_path=settings.failures)
    plugin = PluginClient(settings.plugin_url, settings.timeout, settings.retries,
                          connections=settings.concurrency)
    plugin.check_health()
    failures = FailureLog(settings.failures)
    try:
        with LegacyDatabase(settings.database) as database, \
                ThreadPoolExecutor(settings.concurrency, thread_name_prefix="search") as pool:
            tree = database.read_workspaces()
            if settings.workspace:
                sample = [settings.workspace]
            else:
                candidates = [w for w in database.workspaces_with_rows()
                              if w in tree and not tree.is_removed(w)]
                sample = sample_workspaces(candidates, settings.verify_sample, settings.seed)
            report.workspaces_sampled = len(sample)
            finder = RecordFinder(plugin, database, tree, sample, pool)
            for rows, finished in _row_groups(database.rows_by_workspace(sample), VERIFY_GROUP_ROWS):
                planned = [outcome for outcome in (plan_row(row, tree, settings.redact) for row in rows)
                           if isinstance(outcome, PlannedWrite)]
                for finding in finder.check(planned):
                    report.count(finding)
                    if finding.verdict == MATCH:
                        log("match %s", finding.planned.row.id)
                    else:
                        log(finding.line())
                        failures.record_finding(finding)
                finder.done_with(finished)
    finally:
        failures.close()
    return report


def _row_groups(rows: Iterable[LegacyRow], size: int) -> Iterator[Tuple[List[LegacyRow], List[str]]]:
    """Rows (ordered by workspace) in groups of about `size`, cut between workspaces
    unless one workspace alone is far bigger; each with the workspaces it finishes."""
    group: List[LegacyRow] = []
    finished: List[str] = []
    current = None
    for row in rows:
        if row.workspace_id != current:
            if current is not None:
                finished.append(current)
            current = row.workspace_id
            if len(group) >= size:
                yield group, finished
                group, finished = [], []
        elif len(group) >= 4 * size:
            yield group, finished
            group, finished = [], []
        group.append(row)
    if current is not None:
        finished.append(current)
    yield group, finished


class RecordFinder:
    """Finds rows in the plugin, which has no lookup by id and caps a search at 100.

    Each namespace a sampled row belongs in is listed once (its newest 100),
    kept while a workspace still to come may need it.  Rows not seen there are
    searched for by words several of them share (shared_word_searches), then
    each one by its own words in the namespaces its workspace can read;
    if still unseen, with words a changed copy would still share (the text
    without its redaction marks, either half), then with its own words in every
    namespace of the tenant.  A row seen in any earlier result is not searched
    for again.  Searches run on the pool, --concurrency at a time.  A row is
    `missing` only when a search over the whole tenant that must have returned
    it came back complete (under 100 results, with searchable words); else it
    is `unverifiable`.
    """

    def __init__(self, plugin: PluginClient, database: LegacyDatabase, tree: WorkspaceTree,
                 sample: List[str], pool):
        self.plugin = plugin
        self.database = database
        self.tree = tree
        self.pool = pool
        namespaces = tree.namespaces()
        self.tenant_namespaces = [namespaces[n:n + NAMESPACES_PER_SEARCH]
                                  for n in range(0, len(namespaces), NAMESPACES_PER_SEARCH)]
        self.listings: Dict[str, List[str]] = {}  # namespace -> the ids of its newest records
        self.users = Counter(name for workspace in sample for name in target_namespaces(workspace, tree))
        self.listed: Dict[str, Dict] = {}  # row id -> the plugin's record, from the listings kept
        self.seen: Dict[str, Dict] = {}  # row id -> the plugin's record, from this group's searches

    def done_with(self, workspaces: List[str]) -> None:
        """Forget what only these (finished) workspaces needed: memory stays flat."""
        for workspace in workspaces:
            for namespace in target_namespaces(workspace, self.tree):
                self.users[namespace] -= 1
                if self.users[namespace] <= 0 and namespace in self.listings:
                    for row_id in self.listings.pop(namespace):
                        self.listed.pop(row_id, None)

    def check(self, planned: List[PlannedWrite]) -> List[Finding]:
        """Find and classify a group of rows."""
        unlisted = sorted({p.target.namespace for p in planned} - set(self.listings))
        for namespace, listed in zip(unlisted, self.pool.map(self.plugin.search_quietly, unlisted)):
            self.listings[namespace] = [record["id"] for record in listed]
            self.listed.update((record["id"], record) for record in listed)
        self.seen = dict(self.listed)
        refused: Dict[str, str] = {}
        unseen = [p for p in planned if p.row.id not in self.seen]
        list(self.pool.map(self._search_shared_word, shared_word_searches(planned, unseen)))
        unseen = [p for p in unseen if p.row.id not in self.seen]
        list(self.pool.map(lambda p: self._search_nearby(p, refused), unseen))
        unseen = [p for p in unseen if p.row.id not in self.seen and p.row.id not in refused]
        complete = dict(zip([p.row.id for p in unseen], self.pool.map(
            lambda p: self._search_everywhere(p, refused), unseen)))
        unseen = [p for p in unseen if p.row.id not in self.seen and p.row.id not in refused]
        searchable = dict(zip([p.row.id for p in unseen], self.database.have_search_words(
            [search_query(p.body["content"]) for p in unseen])))
        findings = []
        for p in planned:
            row_id = p.row.id
            if row_id in self.seen:
                findings.append(classify(p, self.seen[row_id]))
            elif row_id in refused:
                findings.append(Finding(p, UNVERIFIABLE, "the plugin refused a search for it (%s)"
                                        % refused[row_id]))
            elif complete.get(row_id) and (searchable[row_id] or len(search_query(p.body["content"])) < 2):
                findings.append(classify(p, None))
            else:
                findings.append(Finding(p, UNVERIFIABLE, (
                    "not among the newest %d of %s, and a search for its words matches too many "
                    "records or finds no searchable word" % (SEARCH_CAP, p.target.namespace))))
        return findings

    def _search(self, namespaces: List[str], query: str, planned: PlannedWrite,
                refused: Dict[str, str]) -> bool:
        """One search; whether it was complete (fewer results than the cap)."""
        try:
            found = self.plugin.search(namespaces, query)
        except PluginRejected as exc:
            refused[planned.row.id] = str(exc)
            return False
        self._remember(found)
        return len(found) < SEARCH_CAP

    def _search_shared_word(self, search: Tuple[str, str]) -> None:
        namespace, word = search
        with contextlib.suppress(PluginRejected):  # its rows are searched for one by one
            self._remember(self.plugin.search([namespace], word))

    def _search_nearby(self, planned: PlannedWrite, refused: Dict[str, str]) -> None:
        if planned.row.id in self.seen:  # found meanwhile by another row's search
            return
        self._search(self._nearby(planned), search_query(planned.body["content"]), planned, refused)

    def _search_everywhere(self, planned: PlannedWrite, refused: Dict[str, str]) -> bool:
        """Whether a search of the whole tenant for the row's own words was complete."""
        nearby = self._nearby(planned)
        for query in fallback_queries(planned.body["content"]):
            self._search(nearby, query, planned, refused)
            if planned.row.id in self.seen:
                return True
        query = search_query(planned.body["content"])
        complete = True
        for namespaces in self.tenant_namespaces:
            complete = self._search(namespaces, query, planned, refused) and complete
            if planned.row.id in self.seen:
                return True
        return complete

    def _nearby(self, planned: PlannedWrite) -> List[str]:
        """The namespaces the row's workspace can read, and the one the row belongs in."""
        return sorted(set(self.tree.readable_namespaces(planned.row.workspace_id))
                      | {planned.target.namespace})

    def _remember(self, records: List[Dict]) -> None:
        for record in records:
            self.seen.setdefault(record["id"], record)


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def format_backfill(report: BackfillReport) -> List[str]:
    def counts(counter: Counter) -> str:
        return ", ".join("%s=%d" % item for item in sorted(counter.items())) or "none"

    verb = "copied" if report.mode == "apply" else "to copy"
    lines = ["memory-backfill -%s" % report.mode]
    if report.plugin_status:
        lines.append("plugin: %s" % report.plugin_status)
    if report.resumed_from:
        lines.append("resumed from checkpoint %s after row %s"
                     % (report.checkpoint_path, report.resumed_from["id"]))
    lines.append("rows %s by scope: %s" % (verb, counts(report.by_scope)))
    lines.append("rows %s by namespace kind: %s (%d namespaces)"
                 % (verb, counts(report.by_kind), len(report.namespaces)))
    lines.append("skipped by reason:" if report.skipped else "skipped: none")
    for reason, count in sorted(report.skip_reasons.items()):
        lines.append("  %6d  %s" % (count, reason))
    if report.redact:
        lines.append("redactions by label: %s" % counts(report.redactions))
    else:
        lines.append("redaction: OFF (--no-redact): contents are copied unredacted")
    if report.errors:
        lines.append("errors (first %d):" % SHOWN_PROBLEMS)
        lines.extend("  " + problem for problem in report.problems)
    if report.failures_path:
        lines.append("skipped and failed rows are listed in %s" % report.failures_path)
    if report.stopped:
        lines.append("STOPPED EARLY: %s" % report.stopped)
        if report.checkpoint_path:
            lines.append("progress is saved in %s; run the same command again to resume"
                         % report.checkpoint_path)
        else:
            lines.append("run the same command again: rows already copied are rewritten, "
                         "never duplicated (use --checkpoint FILE to resume instead)")
    lines.append("Backfill %s: scanned=%d copied=%d skipped=%d errors=%d" % (
        "stopped" if report.stopped else "complete",
        report.scanned, report.copied, report.skipped, report.errors))
    return lines


def format_verify(report: VerifyReport) -> List[str]:
    lines = ["memory-backfill -verify"]
    problems = report.mismatches + report.errors
    if problems:
        lines.append("problems (%s):" % ("all %d" % problems if problems <= SHOWN_PROBLEMS
                                         else "first %d of %d" % (SHOWN_PROBLEMS, problems)))
        lines.extend("  " + problem for problem in report.problems)
        if report.failures_path:
            lines.append("every problem row is listed in %s" % report.failures_path)
    lines.append("rows by class: " + ", ".join("%s=%d" % (verdict, report.classes[verdict])
                                               for verdict in VERIFY_CLASSES))
    if report.mismatches:
        lines.append("to repair: run -apply to rewrite these %d rows by id; it repairs every class "
                     "above" % report.mismatches)
    lines.append("unverifiable rows (counted as errors): %d" % report.errors)
    lines.append("Verify complete: workspaces_sampled=%d matches=%d mismatches=%d errors=%d"
                 % (report.workspaces_sampled, report.matches, report.mismatches, report.errors))
    return lines


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class HelpShown(Exception):
    """--help was printed; the run ends with status 0."""


class _Parser(argparse.ArgumentParser):
    # argparse would call sys.exit itself; we raise, so main() decides.
    def error(self, message: str):
        raise UsageError("%s; run with --help for usage." % message.rstrip("."))

    def exit(self, status: int = 0, message: Optional[str] = None):
        raise HelpShown()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy the legacy agent_memories table into the memory plugin, "
                    "exactly as the live platform would have written it.\n"
                    "Choose exactly one mode; every option also works with one or two "
                    "dashes and as -name=value.",
        epilog=HELP_EPILOG,
    )
    modes = parser.add_argument_group("modes (exactly one)")
    for name, text in (("dry-run", "read and decide everything, write nothing"),
                       ("apply", "copy the rows into the plugin (safe to re-run)"),
                       ("verify", "check the plugin against the legacy table")):
        modes.add_argument("-" + name, "--" + name, dest="modes", action="append_const",
                           const=name, help=text)
    options = parser.add_argument_group("options")
    options.add_argument("-workspace", "--workspace", metavar="UUID",
                         help="only this workspace's rows")
    options.add_argument("-limit", "--limit", metavar="N", help="at most N rows this run")
    options.add_argument("-verify-sample", "--verify-sample", metavar="N",
                         default=str(DEFAULT_VERIFY_SAMPLE),
                         help="workspaces -verify checks (default %(default)s; 0 = all)")
    options.add_argument("-seed", "--seed", metavar="N", default=str(DEFAULT_SEED),
                         help="seed of the -verify sample (default fixed: %(default)s)")
    options.add_argument("-database-url", "--database-url", metavar="URL",
                         help="overrides DATABASE_URL")
    options.add_argument("-plugin-url", "--plugin-url", metavar="URL",
                         help="overrides MEMORY_PLUGIN_URL")
    options.add_argument("-no-redact", "--no-redact", action="store_true",
                         help="copy contents without secret redaction (said in the summary)")
    options.add_argument("-timeout", "--timeout", metavar="SECONDS", default=str(DEFAULT_TIMEOUT),
                         help="per-request timeout for the plugin (default %(default)s)")
    options.add_argument("-concurrency", "--concurrency", metavar="N",
                         default=str(DEFAULT_CONCURRENCY),
                         help="-apply: at most N writes in flight at the plugin, pipelined "
                              "%d per keep-alive connection (N=8: 2 connections); -verify: N "
                              "searches at once (default %%(default)s)" % PIPELINE_DEPTH)
    options.add_argument("-checkpoint", "--checkpoint", metavar="FILE",
                         help="-apply: save progress here; if FILE exists, resume after it")
    options.add_argument("-failures", "--failures", metavar="FILE",
                         help="-apply: every skipped or failed row; -verify: every problem row; "
                              "one JSON object per line (ids, reasons, namespaces, never content)")
    options.add_argument("-max-consecutive-failures", "--max-consecutive-failures", metavar="N",
                         default=str(DEFAULT_MAX_CONSECUTIVE_FAILURES),
                         help="-apply stops (exit 3) after N rows in a row fail (default %(default)s)")
    options.add_argument("-retries", "--retries", metavar="N", default=str(DEFAULT_RETRIES),
                         help="retries of a plugin request on connection errors, timeouts and "
                              "429/502/503/504, with exponential backoff (default %(default)s)")
    options.add_argument("-max-rate", "--max-rate", metavar="N", default="0",
                         help="-apply: at most N writes per second (default 0 = no cap)")
    options.add_argument("-q", "-quiet", "--quiet", action="store_true",
                         help="no progress line on stderr")
    options.add_argument("-json", "--json", action="store_true",
                         help="print the final report as one JSON object on stdout")
    options.add_argument("-v", "-verbose", "--verbose", action="store_true",
                         help="one line per row on stderr (ids only, never content)")
    options.add_argument("-version", "--version", action="store_true",
                         help="print the version and the vendored library versions")
    return parser


def _whole_number(text: str, option: str, minimum: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = minimum - 1
    if value < minimum:
        kind = "a positive whole number" if minimum > 0 else "a whole number, 0 or more"
        raise UsageError("%s must be %s, not %r." % (option, kind, str(text)[:40]))
    return value


def parse_settings(argv: Optional[Sequence[str]], environ: Dict[str, str]) -> Settings:
    """Turn the command line and environment into Settings, or raise UsageError."""
    args = build_parser().parse_args(argv)
    modes = args.modes or []
    if len(modes) != 1:
        raise UsageError("Choose exactly one mode: -dry-run, -apply or -verify%s."
                         % (" (got %s)" % " and ".join("-" + m for m in modes) if modes else ""))
    mode = modes[0]
    if args.checkpoint and mode != "apply":
        raise UsageError("--checkpoint goes with -apply only.")
    if args.failures and mode == "dry-run":  # -dry-run writes nothing anywhere
        raise UsageError("--failures goes with -apply and -verify only.")
    try:
        timeout = float(args.timeout)
    except ValueError:
        timeout = 0
    if not timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds, not %r."
                         % args.timeout[:40])
    database = parse_database_url(args.database_url or environ.get("DATABASE_URL"))
    plugin_url = args.plugin_url or environ.get("MEMORY_PLUGIN_URL")
    if mode != "dry-run" or plugin_url:
        plugin_url = parse_plugin_url(plugin_url)
    return Settings(
        mode=mode, database=database, plugin_url=plugin_url,
        workspace=parse_uuid(args.workspace) if args.workspace is not None else None,
        limit=_whole_number(args.limit, "-limit", 1) if args.limit is not None else None,
        verify_sample=_whole_number(args.verify_sample, "-verify-sample", 0),
        seed=_whole_number(args.seed, "--seed", 0),
        concurrency=_whole_number(args.concurrency, "--concurrency", 1),
        max_rate=_whole_number(args.max_rate, "--max-rate", 0),
        max_consecutive_failures=_whole_number(args.max_consecutive_failures,
                                               "--max-consecutive-failures", 1),
        retries=_whole_number(args.retries, "--retries", 0),
        checkpoint=args.checkpoint, failures=args.failures,
        redact=not args.no_redact, timeout=timeout,
        json_output=args.json, verbose=args.verbose, quiet=args.quiet,
    )


def version_text() -> str:
    """The tool's version and the vendored libraries', read from their metadata."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "missing"

    return "%s %s (pg8000 %s, urllib3 %s, Python %s)" % (
        PROG, __version__, installed("pg8000"), installed("urllib3"),
        ".".join(map(str, sys.version_info[:3])))


def run(argv: Optional[Sequence[str]] = None, environ: Optional[Dict[str, str]] = None,
        stdout=None, stderr=None) -> int:
    """Run the tool; return 0 or 1, raise BackfillError for anything that stops it."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv or "-version" in argv:
        print(version_text(), file=stdout)
        return ExitStatus.OK
    try:
        settings = parse_settings(argv, dict(os.environ if environ is None else environ))
    except HelpShown:
        return ExitStatus.OK

    def log(line: str, *args) -> None:  # formats only when shown: it runs once per row
        if settings.verbose:
            print(line % args if args else line, file=stderr, flush=True)

    def show(report) -> None:
        if settings.json_output:
            print(json.dumps(report.to_json(), sort_keys=True), file=stdout, flush=True)
        elif isinstance(report, VerifyReport):
            print("\n".join(format_verify(report)), file=stdout, flush=True)
        else:
            print("\n".join(format_backfill(report)), file=stdout, flush=True)

    try:
        report = verify(settings, log) if settings.mode == "verify" else backfill(settings, log, stderr)
    except BackfillError as exc:
        if exc.report is not None:  # -apply stopped part-way: say how far it got
            show(exc.report)
        raise
    show(report)
    return report.exit_status()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: run(), with every error mapped to its exit status here."""
    if sys.version_info < MIN_PYTHON:
        print("%s: needs Python %d.%d or newer, this is %s; run it with a newer python3."
              % (PROG, *MIN_PYTHON, sys.version.split()[0]), file=sys.stderr)
        return ExitStatus.USAGE
    try:
        return int(run(argv))
    except BackfillError as exc:
        print("%s: %s" % (PROG, exc), file=sys.stderr)
        return int(exc.status)
    except KeyboardInterrupt:
        print("%s: interrupted; re-run the same command to continue (writes are "
              "idempotent)." % PROG, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
