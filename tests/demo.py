"""`make demo`: every mode on a throwaway tenant, end to end.

Starts a temporary PostgreSQL with a small legacy tenant (a three-level
workspace tree, every scope, a few secrets, a few rows that must be skipped)
and the test plugin, then runs -dry-run, -apply and -verify, backs the copy
out with -rollback (first without --yes), copies it again and verifies it,
showing what each printed.  Everything is removed at the end.
"""

import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pg_cluster import start_cluster  # noqa: E402
from plugin_server import PluginServer  # noqa: E402

import memory_backfill  # noqa: E402

SCHEMA = """
CREATE TABLE workspaces (id uuid PRIMARY KEY, name text NOT NULL,
    parent_id uuid REFERENCES workspaces(id), status text NOT NULL DEFAULT 'active');
CREATE TABLE agent_memories (id uuid PRIMARY KEY, workspace_id uuid REFERENCES workspaces(id),
    content text NOT NULL, scope varchar(10) NOT NULL,
    namespace varchar(50) NOT NULL DEFAULT 'general',
    created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
"""

ROWS = [  # (workspace, scope, content)
    ("org", "GLOBAL", "Company style guide: answers cite their sources."),
    ("org", "TEAM", "Platform team on-call rotates every Monday."),
    ("team", "TEAM", "Deploys go through the staging cluster first."),
    ("team", "LOCAL", "Service account uses OPENAI_API_KEY=sk-abcdefghijklmnop1234 for evals."),
    ("agent", "LOCAL", "Reminder: the DB is postgres://admin:hunter2@db.internal:5432/app"),
    ("agent", "TEAM", "Agent learned that retries need jitter."),
    ("agent", "GLOBAL", "A child workspace cannot write org-wide memories (skipped)."),
    (None, "LOCAL", "A row without a workspace (skipped)."),
    ("agent", "LOCAL", "   "),
]


def main() -> int:
    cluster = start_cluster()
    plugin = None
    try:
        legacy = cluster.create_database("demo_legacy")
        db = cluster.connect(legacy)
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.run(statement)
        ids = {"org": str(uuid.uuid4()), "team": str(uuid.uuid4()), "agent": str(uuid.uuid4())}
        for name, parent in (("org", None), ("team", "org"), ("agent", "team")):
            db.run(
                "INSERT INTO workspaces VALUES (CAST(:id AS uuid), :name, CAST(:parent AS uuid))",
                id=ids[name],
                name=name,
                parent=ids.get(parent),
            )
        for n, (workspace, scope, content) in enumerate(ROWS):
            db.run(
                "INSERT INTO agent_memories (id, workspace_id, content, scope, created_at) VALUES "
                "(gen_random_uuid(), CAST(:w AS uuid), :c, :s, now() - make_interval(mins => :n))",
                w=ids.get(workspace),
                c=content,
                s=scope,
                n=len(ROWS) - n,
            )
        db.close()
        plugin = PluginServer(cluster.login(cluster.create_database("demo_plugin")))
        plugin.start()
        os.environ["DATABASE_URL"] = cluster.url(legacy)
        os.environ["MEMORY_PLUGIN_URL"] = plugin.url
        runs = [
            (["-dry-run"], 0),
            (["-apply"], 0),
            (["-verify"], 0),
            (["-rollback"], 2),
            (["-rollback", "--yes"], 0),
            (["-apply"], 0),
            (["-verify"], 0),
        ]
        statuses = []
        for argv, _ in runs:
            print("\n$ memory-backfill %s" % " ".join(argv), flush=True)
            statuses.append(memory_backfill.main(argv))
            print("(exit status %d)" % statuses[-1], flush=True)
        print(
            "\nThe plugin now holds %d memories in %d namespaces."
            % (plugin.count(), len(plugin.namespaces()))
        )
        return 0 if statuses == [expected for _, expected in runs] else 1
    finally:
        if plugin is not None:
            plugin.stop()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
