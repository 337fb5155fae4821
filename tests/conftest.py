"""Fixtures: a throwaway PostgreSQL cluster, legacy databases, the test plugin.

The cluster is started once per test session with initdb + pg_ctl on a free
port in a temporary directory (as the `postgres` system user when the tests
run as root, since initdb refuses root).  Set MEMORY_BACKFILL_TEST_DSN to a
superuser URL to use an existing server instead.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_cluster import (  # noqa: E402, F401
    APP_PASSWORD,
    Cluster,
    ensure_app_role,
    free_port,
    start_cluster,
)
from plugin_server import GoPlugin, PluginServer, build_go_plugin  # noqa: E402

LEGACY_SCHEMA = """
CREATE TABLE workspaces (
    id uuid PRIMARY KEY, name text NOT NULL,
    parent_id uuid NULL REFERENCES workspaces(id) DEFERRABLE INITIALLY DEFERRED,
    status text NOT NULL DEFAULT 'active');
CREATE TABLE agent_memories (
    id uuid PRIMARY KEY,
    workspace_id uuid NULL REFERENCES workspaces(id),
    content text NOT NULL,
    scope varchar(10) NOT NULL {scope_check},
    namespace varchar(50) NOT NULL DEFAULT 'general',
    created_at timestamptz NULL DEFAULT now(),
    updated_at timestamptz NULL DEFAULT now(),
    embedding real[] NULL);
"""
SCOPE_CHECK = "CHECK (scope IN ('LOCAL','TEAM','GLOBAL'))"


# --- the PostgreSQL server -----------------------------------------------------


@pytest.fixture(scope="session")
def cluster():
    dsn = os.environ.get("MEMORY_BACKFILL_TEST_DSN")
    if dsn:
        parts = urlsplit(dsn)
        external = Cluster(parts.hostname, parts.port or 5432, parts.username, parts.password or "")
        ensure_app_role(external)
        yield external
        return
    try:
        started = start_cluster()
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=3)
    try:
        yield started
    finally:
        started.stop()


_database_numbers = itertools.count(1)


def create_database(cluster: Cluster, prefix: str) -> str:
    return cluster.create_database("%s_%d_%d" % (prefix, os.getpid(), next(_database_numbers)))


# --- the legacy database -------------------------------------------------------


class Legacy:
    """A fresh legacy database with helpers to build a workspace tree and rows."""

    BASE_TIME = datetime(2024, 1, 1, tzinfo=timezone.utc)

    def __init__(self, cluster: Cluster, name: str):
        self.cluster = cluster
        self.name = name
        self.db = cluster.connect(name)
        self._clock = itertools.count()

    @property
    def url(self) -> str:
        return self.cluster.url(self.name)

    def create_schema(self, drop_columns=(), scope_check=True) -> Legacy:
        sql = LEGACY_SCHEMA.format(scope_check=SCOPE_CHECK if scope_check else "")
        for statement in sql.split(";"):
            if statement.strip():
                self.db.run(statement)
        for column in drop_columns:
            self.db.run("ALTER TABLE agent_memories DROP COLUMN %s" % column)
        return self

    def workspace(self, parent=None, status="active", workspace_id=None) -> str:
        workspace_id = workspace_id or str(uuid.uuid4())
        self.db.run(
            "INSERT INTO workspaces (id, name, parent_id, status) VALUES (CAST(:id AS uuid), "
            ":name, CAST(:parent AS uuid), :status)",
            id=workspace_id,
            name="ws-" + workspace_id[:8],
            parent=parent,
            status=status,
        )
        return workspace_id

    def chain(self, length: int) -> list:
        """A root followed by `length` descendants, each the parent of the next."""
        ids = [self.workspace()]
        for _ in range(length):
            ids.append(self.workspace(parent=ids[-1]))
        return ids

    def memory(
        self,
        workspace_id,
        content="a memory about deployment",
        scope="LOCAL",
        created_at=None,
        memory_id=None,
        **columns,
    ) -> str:
        memory_id = memory_id or str(uuid.uuid4())
        if created_at is None:
            created_at = self.BASE_TIME + timedelta(seconds=next(self._clock))
        names = ["id", "workspace_id", "content", "scope", "created_at", *columns]
        values = [
            "CAST(:id AS uuid)",
            "CAST(:workspace_id AS uuid)",
            ":content",
            ":scope",
            ":created_at",
            *(":" + c for c in columns),
        ]
        self.db.run(
            "INSERT INTO agent_memories (%s) VALUES (%s)" % (", ".join(names), ", ".join(values)),
            id=memory_id,
            workspace_id=workspace_id,
            content=content,
            scope=scope,
            created_at=created_at,
            **columns,
        )
        return memory_id

    def many(self, workspace_id, count: int, scope="LOCAL", words=("alpha",)) -> list:
        """`count` rows with distinct, searchable contents, inserted in one statement."""
        rows = self.db.run(
            "INSERT INTO agent_memories (id, workspace_id, content, scope, created_at) SELECT "
            "gen_random_uuid(), CAST(:ws AS uuid), 'note ' || g || ' about ' || :words || ' item' "
            "|| g, :scope, CAST(:base AS timestamptz) + g * interval '1 second' FROM "
            "generate_series(1, CAST(:count AS int)) g RETURNING id::text",
            ws=workspace_id,
            words=" ".join(words),
            scope=scope,
            count=count,
            base=self.BASE_TIME + timedelta(days=1),
        )
        return [r[0] for r in rows]

    def ids_in_read_order(self) -> list:
        """The row ids in -apply's read order (memory_backfill.READ_ORDER)."""
        import memory_backfill

        return [
            r[0]
            for r in self.db.run(
                "SELECT id::text FROM agent_memories ORDER BY " + memory_backfill.READ_ORDER
            )
        ]

    def contents(self) -> dict:
        return dict(self.db.run("SELECT id::text, content FROM agent_memories"))

    def snapshot(self) -> list:
        """Every legacy row, byte for byte, to prove runs never change them."""
        return self.db.run("SELECT m::text FROM agent_memories m ORDER BY id") + self.db.run(
            "SELECT w::text FROM workspaces w ORDER BY id"
        )

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def legacy(cluster):
    database = Legacy(cluster, create_database(cluster, "legacy"))
    yield database
    database.close()


@pytest.fixture
def root(legacy):
    """The legacy schema and one root workspace."""
    legacy.create_schema()
    return legacy.workspace()


@pytest.fixture
def tree(legacy):
    """root -> child -> grandchild -> great-grandchild, plus a second root."""
    legacy.create_schema()
    root, child, grandchild, great = legacy.chain(3)
    return {
        "root": root,
        "child": child,
        "grandchild": grandchild,
        "great": great,
        "other_root": legacy.workspace(),
    }


def assert_each_row_once(records: dict, legacy: Legacy, ids, count: int = None) -> None:
    """The plugin's records (by id) are these rows, each once, with their very content;
    `count`: the plugin's own count of records, when it can hold records of other ids."""
    contents = legacy.contents()
    assert sorted(records) == sorted(ids) and (count is None or count == len(ids))
    assert {i: r["content"] for i, r in records.items()} == {i: contents[i] for i in ids}


# --- the plugin ----------------------------------------------------------------


@pytest.fixture(scope="session")
def plugin_server(cluster):
    name = create_database(cluster, "plugin")
    server = PluginServer(cluster.login(name)).start()
    yield server
    server.stop()


@pytest.fixture
def plugin(plugin_server):
    plugin_server.reset()
    yield plugin_server
    plugin_server.reset()


@pytest.fixture(scope="session")
def go_plugin_server(cluster, tmp_path_factory):
    """The Go stand-in (tests/plugin.go), built once for the session, on a database of its own."""
    name = create_database(cluster, "go_plugin")
    binary = build_go_plugin(str(tmp_path_factory.mktemp("go")))
    server = GoPlugin(binary, cluster.login(name))
    yield server
    server.stop()


@pytest.fixture
def go_plugin(go_plugin_server):
    go_plugin_server.reset()
    yield go_plugin_server
    go_plugin_server.reset()


@pytest.fixture
def env(legacy, plugin, monkeypatch):
    """DATABASE_URL and MEMORY_PLUGIN_URL pointing at this test's databases."""
    monkeypatch.setenv("DATABASE_URL", legacy.url)
    monkeypatch.setenv("MEMORY_PLUGIN_URL", plugin.url)
    return {"DATABASE_URL": legacy.url, "MEMORY_PLUGIN_URL": plugin.url}


# --- running the tool ----------------------------------------------------------

TARGET_LINE = re.compile(
    r"memory-backfill -(dry-run|apply|verify|rollback): database \S+ \((password from [^)]+|no "
    r"password)\); plugin "
)


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def said(self) -> str:
        return said(self.stderr)


def said(stderr: str) -> str:
    """stderr after the target line, which every run past the command line prints first."""
    first, _, rest = stderr.partition("\n")
    return rest if TARGET_LINE.match(first) else stderr


def build_zipapp(target: Path) -> Path:
    subprocess.run(
        ["bash", str(ROOT / "build_zipapp.sh"), str(target)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return target


@pytest.fixture(scope="session")
def zipapp_file(tmp_path_factory) -> Path:
    """dist/memory-backfill built once for this session (in a temp folder)."""
    return build_zipapp(tmp_path_factory.mktemp("zipapp") / "memory-backfill")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "module_only: a long run whose zipapp twin would add time and nothing else (the same code, "
        "started once more)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked module_only run in-process only."""
    keep, drop = [], []
    for item in items:
        zipapp = getattr(item, "callspec", None) and item.callspec.params.get("cli") == "zipapp"
        (drop if zipapp and item.get_closest_marker("module_only") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=["module", "zipapp"])
def cli(request, capsys):
    """Run the tool in-process (module) or as the built file (zipapp)."""
    import memory_backfill

    if request.param == "zipapp":
        path = request.getfixturevalue("zipapp_file")

        def run_zipapp(*args, timeout=120):
            done = subprocess.run(
                [sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout
            )
            return Result(done.returncode, done.stdout, done.stderr)

        return run_zipapp

    def run_module(*args, timeout=None):
        capsys.readouterr()
        status = memory_backfill.main(list(args))
        captured = capsys.readouterr()
        return Result(status, captured.out, captured.err)

    return run_module
