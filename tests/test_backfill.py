"""End to end: the tool against a real PostgreSQL and the test plugin over HTTP.

Every test runs twice: in-process (memory_backfill.main) and as the built
zipapp in a subprocess (see the `cli` fixture).
"""

import json
import re
import uuid

import pytest
from conftest import APP_PASSWORD, free_port

import memory_backfill as mb

LAST_BACKFILL = re.compile(
    r"^Backfill complete: scanned=(\d+) copied=(\d+) skipped=(\d+) errors=(\d+)$"
)
LAST_DRY_RUN = re.compile(
    r"^Dry run complete \(nothing written\): scanned=(\d+) copied=(\d+) skipped=(\d+) errors=(\d+)$"
)
LAST_VERIFY = re.compile(
    r"^Verify complete: workspaces_sampled=(\d+) matches=(\d+) mismatches=(\d+) errors=(\d+)$"
)


def counts(result, pattern=LAST_BACKFILL):
    match = pattern.match(result.last_line)
    assert match, "unexpected last line: %r" % result.last_line
    return tuple(int(n) for n in match.groups())


def assert_clean(result):
    """No password, and no stack trace, in anything the tool printed."""
    assert APP_PASSWORD not in result.output()
    assert "Traceback" not in result.output()


# --- -apply ----------------------------------------------------------------------------


def test_apply_maps_every_scope_on_a_deep_tree(cli, legacy, tree, plugin, env):
    expected = {}
    for name in ("root", "child", "grandchild", "great"):
        w = tree[name]
        expected[legacy.memory(w, "local note of %s" % name, "LOCAL")] = "workspace:" + w
    expected[legacy.memory(tree["root"], "team note of root", "TEAM")] = "team:" + tree["root"]
    expected[legacy.memory(tree["child"], "team note of child", "TEAM")] = "team:" + tree["root"]
    expected[legacy.memory(tree["grandchild"], "team of gc", "TEAM")] = "team:" + tree["child"]
    expected[legacy.memory(tree["great"], "team of great", "TEAM")] = "team:" + tree["grandchild"]
    expected[legacy.memory(tree["root"], "org wide fact", "GLOBAL")] = "org:" + tree["root"]
    expected[legacy.memory(tree["other_root"], "other org", "GLOBAL")] = "org:" + tree["other_root"]

    result = cli("-apply")

    assert result.status == 0, result.output()
    assert counts(result) == (10, 10, 0, 0)
    records = plugin.records()
    assert {i: r["namespace"] for i, r in records.items()} == expected
    assert all(r["kind"] == "fact" and r["source"] == "agent" for r in records.values())
    kinds = plugin.namespaces()
    assert kinds["org:" + tree["root"]] == "org" and kinds["team:" + tree["child"]] == "team"
    assert kinds["workspace:" + tree["great"]] == "workspace"
    assert set(plugin.namespace_puts.values()) == {1}  # one PUT per namespace per run
    assert "rows copied by scope: GLOBAL=2, LOCAL=4, TEAM=4" in result.stdout
    assert (
        "rows copied by namespace kind: org=2, team=4, workspace=4 (9 namespaces)" in result.stdout
    )
    assert_clean(result)


def test_apply_keeps_legacy_fields_in_propagation_and_sends_embeddings(
    cli, legacy, tree, plugin, env
):
    row = legacy.memory(tree["child"], "with embedding", "TEAM", embedding=[0.25, -1.5, 3.0])
    plain = legacy.memory(tree["child"], "no embedding", "LOCAL")
    legacy.db.run(
        "UPDATE agent_memories SET namespace = 'ops', updated_at = '2024-02-03T04:05:06Z' WHERE id "
        "= CAST(:id AS uuid)",
        id=row,
    )

    assert cli("-apply").status == 0

    records = plugin.records()
    assert records[row]["propagation"] == {
        "legacy": {
            "workspace_id": tree["child"],
            "scope": "TEAM",
            "namespace": "ops",
            "created_at": "2024-01-01T00:00:00.000000Z",
            "updated_at": "2024-02-03T04:05:06.000000Z",
        }
    }
    assert records[row]["embedding"] == [0.25, -1.5, 3.0]
    assert records[plain]["embedding"] is None


def test_apply_copies_oldest_first(cli, legacy, tree, plugin, env):
    from datetime import datetime, timezone

    newer = legacy.memory(
        tree["root"], "newer", created_at=datetime(2025, 1, 1, tzinfo=timezone.utc)
    )
    older = legacy.memory(
        tree["root"], "older", created_at=datetime(2023, 1, 1, tzinfo=timezone.utc)
    )
    undated = legacy.memory(tree["root"], "undated")
    legacy.db.run(
        "UPDATE agent_memories SET created_at = NULL WHERE id = CAST(:id AS uuid)", id=undated
    )

    assert cli("-apply", "--concurrency", "1").status == 0
    assert plugin.first_writes == [undated, older, newer]


@pytest.mark.module_only
def test_concurrent_writers_write_each_row_once_and_each_namespace_once(cli, legacy, plugin, env):
    legacy.create_schema()
    roots = [legacy.workspace() for _ in range(5)]
    children = [legacy.workspace(parent=roots[i % 5]) for i in range(20)]
    ids = []
    for n, workspace in enumerate(children):
        ids += legacy.many(workspace, 200, scope="TEAM" if n % 2 else "LOCAL")
    for root in roots:
        ids += legacy.many(root, 200, scope="GLOBAL")

    result = cli("-apply", "--concurrency", "16")

    assert result.status == 0, result.output()
    assert counts(result) == (5000, 5000, 0, 0)
    assert plugin.count() == 5000 and sorted(plugin.records()) == sorted(ids)
    assert plugin.requests["write_memory"] == 5000
    namespaces = {r["namespace"] for r in plugin.records().values()}
    assert len(namespaces) == 20 and plugin.namespace_puts == dict.fromkeys(namespaces, 1)
    # Handed out oldest first: within every namespace, no row reaches the plugin
    # more than one in-flight window (16 connections, each pipelining PIPELINE_DEPTH)
    # ahead of its turn in created_at order.  (A row that needed a retry may arrive
    # late, never early.)
    window = 16 * mb.PIPELINE_DEPTH
    oldest_first = legacy.ids_in_read_order()
    turn = {row_id: n for n, row_id in enumerate(oldest_first)}
    arrived = {row_id: n for n, row_id in enumerate(plugin.first_writes)}
    records = plugin.records()
    for namespace in namespaces:
        rows = sorted((i for i in ids if records[i]["namespace"] == namespace), key=turn.get)
        assert all(arrived[row_id] >= turn[row_id] - window for row_id in rows), namespace
        first = min(rows, key=arrived.get)
        assert turn[first] - turn[rows[0]] <= window  # its first write is among its oldest rows


def test_every_skip_reason_is_named_and_nothing_skipped_is_written(cli, legacy, plugin, env):
    legacy.create_schema(scope_check=False)
    root, child = legacy.chain(1)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    legacy.db.run("SET session_replication_role = replica")  # let the bad rows in
    legacy.workspace(parent=b, workspace_id=a)
    legacy.workspace(parent=a, workspace_id=b)
    legacy.memory(None, "orphan")
    legacy.memory(str(uuid.uuid4()), "lost workspace")
    legacy.memory(a, "global in a cycle", "GLOBAL")
    legacy.memory(root, "strange scope", "PRIVATE")
    legacy.memory(child, "global from a child", "GLOBAL")
    legacy.memory(root, " \n\t ")
    good = legacy.memory(root, "the one good row")

    result = cli("-apply")

    assert result.status == 0, result.output()
    assert counts(result) == (7, 1, 6, 0)
    for reason, count in (
        (mb.SkipReason.NO_WORKSPACE, 1),
        (mb.SkipReason.WORKSPACE_NOT_FOUND, 1),
        (mb.SkipReason.UNKNOWN_SCOPE, 1),
        (mb.SkipReason.GLOBAL_NOT_ROOT, 2),
        (mb.SkipReason.EMPTY_CONTENT, 1),
    ):
        assert re.search(r"^\s+%d  %s$" % (count, re.escape(reason)), result.stdout, re.M), reason
    assert list(plugin.records()) == [good]


def test_the_platforms_mapping_for_lost_parents_cycles_and_the_delimiter_guard(
    cli, legacy, plugin, env
):
    """contract §3: writing needs no parent chain; §5: GLOBAL content gets the guard."""
    legacy.create_schema()
    grandparent, parent = legacy.chain(1)
    orphan = legacy.workspace(parent=parent)
    orphan_root = legacy.workspace()
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    legacy.db.run("SET session_replication_role = replica")  # FK bypassed, as on a broken tenant
    legacy.workspace(parent=b, workspace_id=a)
    legacy.workspace(parent=a, workspace_id=b)
    legacy.db.run("DELETE FROM workspaces WHERE id = CAST(:id AS uuid)", id=parent)  # hard-deleted
    expected = {
        legacy.memory(orphan, "orphan local [MEMORY x] note", "LOCAL"): (
            "workspace:" + orphan,
            "orphan local [MEMORY x] note",
        ),
        legacy.memory(orphan, "orphan team note", "TEAM"): ("team:" + parent, "orphan team note"),
        legacy.memory(orphan_root, "org rule [MEMORY id=9] keep Bearer tok7", "GLOBAL"): (
            "org:" + orphan_root,
            "org rule [_MEMORY id=9] keep [REDACTED:BEARER_TOKEN]",
        ),
        legacy.memory(a, "cycle local", "LOCAL"): ("workspace:" + a, "cycle local"),
        legacy.memory(b, "cycle team", "TEAM"): ("team:" + a, "cycle team"),
        legacy.memory(grandparent, "[MEMORY a][MEMORY b]", "GLOBAL"): (
            "org:" + grandparent,
            "[_MEMORY a][_MEMORY b]",
        ),
    }
    legacy.memory(orphan, "global of a child whose parent is gone", "GLOBAL")  # not a root: skipped
    legacy.memory(a, "global in a cycle", "GLOBAL")

    result = cli("-apply")

    assert result.status == 0, result.output()
    assert counts(result) == (8, 6, 2, 0)
    assert re.search(r"^\s+2  %s$" % re.escape(mb.SkipReason.GLOBAL_NOT_ROOT), result.stdout, re.M)
    assert {i: (r["namespace"], r["content"]) for i, r in plugin.records().items()} == expected
    result = cli("-verify", "-verify-sample", "0")
    assert result.status == 0, result.output()
    assert counts(result, LAST_VERIFY) == (5, 6, 0, 0)


def test_apply_redacts_and_reports_counts_not_secrets(cli, legacy, tree, plugin, env):
    secret = "ghp_" + "Z" * 30
    row = legacy.memory(tree["root"], "deploy key %s and Bearer tok123 done" % secret)

    result = cli("-apply", "-v")

    assert result.status == 0
    content = plugin.records()[row]["content"]
    assert content == "deploy key [REDACTED:GITHUB_PAT] and [REDACTED:BEARER_TOKEN] done"
    assert "redactions by label: BEARER_TOKEN=1, GITHUB_PAT=1" in result.stdout
    assert secret not in result.output() and "tok123" not in result.output()
    assert "deploy key" not in result.output()  # verbose lines carry ids, never content
    assert ("copy %s -> workspace:%s" % (row, tree["root"])) in result.stderr


def test_no_redact_copies_verbatim_and_says_so(cli, legacy, tree, plugin, env):
    row = legacy.memory(tree["root"], "Bearer keepme")
    result = cli("-apply", "--no-redact")
    assert result.status == 0
    assert plugin.records()[row]["content"] == "Bearer keepme"
    assert "redaction: OFF (--no-redact)" in result.stdout


def test_rerunning_apply_changes_nothing(cli, legacy, tree, plugin, env):
    ids = legacy.many(tree["child"], 30, scope="TEAM")
    legacy.memory(tree["root"], "GLOBAL fact", "GLOBAL")
    assert cli("-apply").status == 0
    first = plugin.records()

    second_run = cli("-apply")

    assert second_run.status == 0 and counts(second_run) == (31, 31, 0, 0)
    again = plugin.records()
    assert plugin.count() == 31 and set(again) == set(first) and set(ids) <= set(again)
    for key in ("namespace", "content", "kind", "source", "propagation", "embedding"):
        assert {i: r[key] for i, r in again.items()} == {i: r[key] for i, r in first.items()}


def test_limit_and_workspace_filters(cli, legacy, tree, plugin, env):
    legacy.many(tree["root"], 5)
    mine = legacy.many(tree["grandchild"], 4)

    result = cli("-apply", "-limit", "3")
    assert counts(result) == (3, 3, 0, 0) and plugin.count() == 3

    plugin.reset()
    result = cli("--apply", "--workspace=" + tree["grandchild"])
    assert counts(result) == (4, 4, 0, 0)
    assert sorted(plugin.records()) == sorted(mine)

    plugin.reset()
    result = cli("-apply", "-workspace", tree["grandchild"], "-limit=2")
    assert counts(result) == (2, 2, 0, 0) and set(plugin.records()) <= set(mine)


def test_a_plugin_that_ignores_ids_stops_apply_before_it_duplicates_anything_more(
    cli, legacy, tree, plugin, env
):
    legacy.many(tree["root"], 200)
    plugin.ignore_ids = True  # as before idempotent upsert: each write stored under a new id
    before = set()
    for run in (1, 2):  # a re-run does the same
        result = cli("-apply", "--concurrency", "4")
        assert result.status == 3
        assert re.fullmatch(
            r"memory-backfill: The memory plugin at %s ignores the ids it is given \(row \S+ was "
            r"stored as \S+\), so every run would duplicate every row; stopped\. Do not run -apply "
            r"again until the plugin is upgraded to one with idempotent upsert by id; then delete "
            r"the records it stored under ids of its own \(listed above, in --json and in "
            r"--failures\) as the README's \"A plugin that ignores ids\" shows\.\n"
            % re.escape(plugin.url),
            result.said,
        ), result.stderr
        assert plugin.count() <= 4 * run  # no more writes than were in flight
        assert "STOPPED EARLY" in result.stdout and "the plugin stored it as " in result.stdout
        assert "run the same command again" not in result.output()
        listed = re.findall(r"^  row (\S+): stored as (\S+) in (\S+)$", result.stdout, re.M)
        stored = {i: r["namespace"] for i, r in plugin.records().items() if i not in before}
        assert sorted((stored_id, namespace) for _, stored_id, namespace in listed) == sorted(
            stored.items()
        )
        before = set(plugin.records())
        assert result.last_line.startswith("Backfill stopped: scanned=")
    assert_clean(result)


def test_a_row_the_plugin_rejects_is_an_error_and_the_run_goes_on(cli, legacy, tree, plugin, env):
    rejected = legacy.memory(tree["root"], "the plugin says no")
    nan = legacy.memory(tree["root"], "not a number inside", embedding=[float("nan")])
    good = legacy.memory(tree["root"], "fine row")
    plugin.reject_ids.add(rejected)

    result = cli("-apply")

    assert result.status == 1
    assert counts(result) == (3, 1, 0, 2)
    assert list(plugin.records()) == [good]
    assert re.search(r"^  %s: HTTP 400: rejected by the test$" % rejected, result.stdout, re.M)
    assert re.search(
        r"^  %s: the embedding holds NaN or Infinity, which JSON cannot carry$" % nan,
        result.stdout,
        re.M,
    )
    assert result.said == (
        "memory-backfill: 2 rows were not copied (listed above, with why: the plugin's refusal, or "
        "a row to fix in the legacy database); fix what each says, then run -apply again: rows "
        "already copied are rewritten by id, never duplicated.\n"
    )


@pytest.fixture
def sql_ascii_legacy(cluster):
    """A legacy database in SQL_ASCII, which stores whatever bytes it is given."""
    from conftest import Legacy, create_database

    name = create_database(cluster, "ascii_template")  # a name of this session's, for the real one
    admin = cluster.connect()
    admin.run("DROP DATABASE %s" % name)
    admin.run(
        "CREATE DATABASE %s ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
        % name
    )
    admin.close()
    legacy = Legacy(cluster, name)
    legacy.db.close()
    # as the platform talks
    legacy.db = cluster.connect(name, startup_params={"client_encoding": "UTF8"})
    legacy.create_schema()
    yield legacy
    legacy.close()


def test_a_row_that_is_not_utf8_is_that_rows_error_in_every_mode(
    cli, sql_ascii_legacy, plugin, monkeypatch, tmp_path
):
    legacy = sql_ascii_legacy
    monkeypatch.setenv("DATABASE_URL", legacy.url)
    monkeypatch.setenv("MEMORY_PLUGIN_URL", plugin.url)
    root = legacy.workspace()
    good = [legacy.memory(root, "plain fact %d" % n) for n in range(5)]
    good.append(legacy.memory(root, "na\u00efve caf\u00e9 \u2603 in UTF-8", "TEAM"))
    bad = legacy.memory(root, "placeholder")
    legacy.db.run(
        "UPDATE agent_memories SET content = 'menu caf' || convert_from(decode('e9', 'hex'), "
        "'SQL_ASCII') || ' soup' WHERE id = CAST(:id AS uuid)",
        id=bad,
    )
    good += [legacy.memory(root, "later fact %d" % n) for n in range(5)]
    why = (
        "its content is not UTF-8 (byte 9 of 14 is 0xe9); the live platform stores UTF-8 only: fix "
        "the row in the legacy database"
    )

    result = cli("-dry-run")
    assert result.status == 1 and counts(result, LAST_DRY_RUN) == (12, 11, 0, 1)
    assert "  %s: %s\n" % (bad, why) in result.stdout
    assert result.said.startswith(
        "memory-backfill: 1 rows cannot be copied (listed above, with why)"
    )

    failures = tmp_path / "failures.jsonl"
    result = cli("-apply", "--failures", str(failures))
    assert result.status == 1 and counts(result) == (12, 11, 0, 1)
    assert "  %s: %s\n" % (bad, why) in result.stdout
    contents = dict(
        legacy.db.run(
            "SELECT id::text, content FROM agent_memories WHERE id <> CAST(:id AS uuid)", id=bad
        )
    )
    assert {i: r["content"] for i, r in plugin.records().items()} == {i: contents[i] for i in good}
    assert [json.loads(line) for line in failures.read_text().splitlines()] == [
        {"id": bad, "workspace_id": root, "scope": "LOCAL", "error": why}
    ]

    result = cli("-verify", "-verify-sample", "0", "--json")
    report = json.loads(result.stdout)
    assert result.status == 1 and report["rows_by_class"]["unreadable"] == 1
    assert (report["matches"], report["mismatches"], report["errors"]) == (11, 0, 1)
    assert "1 rows cannot be copied at all (unreadable" in result.said

    result = cli("-rollback", "--yes")
    assert result.status == 0, result.output()
    assert result.last_line == "Rollback complete: scanned=12 deleted=11 absent=1 errors=0"
    assert plugin.count() == 0
    for text in ("menu", "soup"):
        assert text not in result.output()


def test_json_report(cli, legacy, tree, plugin, env):
    legacy.memory(tree["root"], "x1 Bearer abc")
    legacy.memory(None, "orphan")
    result = cli("-apply", "--json")
    report = json.loads(result.stdout)
    assert report["scanned"] == 2 and report["copied"] == 1 and report["skipped"] == 1
    assert report["skipped_by_reason"] == {mb.SkipReason.NO_WORKSPACE: 1}
    assert report["redactions_by_label"] == {"BEARER_TOKEN": 1}
    assert report["exit_status"] == 0 == result.status


def test_missing_optional_columns(cli, legacy, plugin, env):
    legacy.create_schema(drop_columns=("namespace", "updated_at", "embedding"))
    root = legacy.workspace()
    row = legacy.memory(root, "old tenant row")

    result = cli("-apply")

    assert result.status == 0, result.output()
    assert plugin.records()[row]["propagation"] == {
        "legacy": {
            "workspace_id": root,
            "scope": "LOCAL",
            "created_at": "2024-01-01T00:00:00.000000Z",
        }
    }
    assert "embedding" not in plugin.records()[row] or plugin.records()[row]["embedding"] is None


# --- -dry-run --------------------------------------------------------------------------


def test_dry_run_writes_nothing_anywhere(cli, legacy, tree, plugin, env):
    legacy.many(tree["root"], 10)
    legacy.memory(tree["child"], "GLOBAL from child", "GLOBAL")
    before = legacy.snapshot()

    result = cli("-dry-run")

    assert result.status == 0
    assert counts(result, LAST_DRY_RUN) == (11, 10, 1, 0)
    assert plugin.count() == 0 and plugin.namespaces() == {}
    assert plugin.requests["put_namespace"] == plugin.requests["write_memory"] == 0
    assert plugin.requests["health"] == 1
    assert "plugin: %s: ok (version test-plugin): -apply could start" % plugin.url in result.stdout
    assert "rows to copy by scope: LOCAL=10" in result.stdout
    assert legacy.snapshot() == before


@pytest.fixture
def nothing_on_the_default_port(tmp_path_factory):
    """Port 9100 bound without listening, so that a connection to it is refused for sure (one test
    at a time holds it, whichever pytest worker runs it)."""
    import fcntl
    import socket

    lock = open(tmp_path_factory.getbasetemp().parent / "port-9100.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    held = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family)
        try:
            sock.bind((host, 9100))
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET or exc.errno != __import__("errno").EADDRNOTAVAIL:
                lock.close()
                pytest.skip("port 9100 is in use here: %s" % exc)
            continue
        held.append(sock)
    yield
    for sock in held:
        sock.close()
    lock.close()


def test_without_a_plugin_url_the_tenant_images_plugin_is_used_and_named(
    cli, legacy, tree, monkeypatch, nothing_on_the_default_port
):
    monkeypatch.setenv("DATABASE_URL", legacy.url)
    monkeypatch.delenv("MEMORY_PLUGIN_URL", raising=False)
    legacy.memory(tree["root"], "one")
    result = cli("-dry-run")
    assert result.status == 0 and counts(result, LAST_DRY_RUN) == (1, 1, 0, 0)
    assert (
        "plugin: http://localhost:9100 (the default: MEMORY_PLUGIN_URL is not set): NOT ready, "
        "-apply would stop: Cannot reach the memory plugin at http://localhost:9100 ("
    ) in result.stdout

    result = cli("-apply", "--retries", "1")
    assert result.status == 3
    assert result.said.startswith(
        "memory-backfill: Cannot reach the memory plugin at http://localhost:9100 ("
    )
    assert result.stderr.endswith(
        "); the default, as MEMORY_PLUGIN_URL is not set; set it (or --plugin-url) if the plugin "
        "listens elsewhere.\n"
    )
    assert result.said.count("\n") == 1 and result.stdout == ""


def test_dry_run_with_a_broken_plugin(cli, legacy, tree, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", legacy.url)
    legacy.memory(tree["root"], "one")
    url = "http://127.0.0.1:%d" % free_port()
    result = cli("-dry-run", "--plugin-url", url)
    assert result.status == 0
    assert (
        "plugin: %s: NOT ready, -apply would stop: Cannot reach the memory plugin" % url
        in result.stdout
    )


def test_the_database_session_refuses_writes(cluster, legacy):
    legacy.create_schema()
    config = mb.parse_database_url(cluster.url(legacy.name, cluster.user, cluster.password))
    connection = mb._connect(config)  # even a superuser's session
    try:
        with pytest.raises(Exception, match="read-only transaction"):
            connection.run("CREATE TABLE intruder (x int)")
    finally:
        connection.close()


# --- -verify ---------------------------------------------------------------------------


def test_verify_passes_after_apply_and_fails_after_tampering(cli, legacy, tree, plugin, env):
    ids = [
        legacy.memory(tree[name], "%s fact number %d" % (name, i), scope)
        for i, (name, scope) in enumerate(
            [("root", "GLOBAL"), ("child", "TEAM"), ("great", "LOCAL"), ("great", "TEAM")]
        )
    ]
    assert cli("-apply").status == 0

    result = cli("-verify")
    assert result.status == 0, result.output()
    assert counts(result, LAST_VERIFY) == (3, 4, 0, 0)

    plugin.execute("DELETE FROM memories WHERE id = CAST(:id AS uuid)", id=ids[0])
    plugin.execute(
        "UPDATE memories SET content = 'tampered' WHERE id = CAST(:id AS uuid)", id=ids[1]
    )
    plugin.execute(
        "UPDATE memories SET namespace = 'workspace:' || :w WHERE id = CAST(:id AS uuid)",
        id=ids[3],
        w=tree["great"],
    )

    result = cli("-verify")
    assert result.status == 1
    assert counts(result, LAST_VERIFY) == (3, 1, 3, 0)
    assert (
        "  missing %s (workspace %s): in no namespace of the tenant; -apply writes it to org:%s\n"
        % (ids[0], tree["root"], tree["root"])
    ) in result.stdout
    assert (
        "  content differs %s (workspace %s): from character 1: expected 19 characters, found 8 "
        "(the plugin's copy is shorter); --show-content shows the text\n" % (ids[1], tree["child"])
    ) in result.stdout
    assert "child fact" not in result.output() and "tampered" not in result.output()
    assert (
        "  wrong namespace %s (workspace %s): expected in team:%s, found in workspace:%s\n"
        % (ids[3], tree["great"], tree["grandchild"], tree["great"])
        in result.stdout
    )
    assert (
        "to repair: run -apply to rewrite these 3 rows by id; it repairs every class above"
        in result.stdout
    )
    assert result.said == (
        "memory-backfill: 3 sampled rows do not match (listed above): run -apply to rewrite them "
        "by id, then -verify again.\n"
    )
    shown = cli("-verify", "--show-content")
    assert (
        '  content differs %s (workspace %s): from character 1: expected "child fact number '
        '1", '
        'found "tampered"\n' % (ids[1], tree["child"])
    ) in shown.stdout


@pytest.mark.module_only
def test_verify_a_workspace_with_250_memories(cli, legacy, tree, plugin, env):
    ids = legacy.many(tree["child"], 250, words=("kubernetes", "rollout"))
    assert cli("-apply").status == 0

    result = cli("-verify", "-workspace", tree["child"])
    assert result.status == 0, result.output()
    assert counts(result, LAST_VERIFY) == (1, 250, 0, 0)

    # One of the 150 older rows (not in the newest-100 listing) goes missing.
    plugin.execute("DELETE FROM memories WHERE id = CAST(:id AS uuid)", id=ids[10])
    result = cli("-verify", "-workspace", tree["child"])
    assert result.status == 1
    assert counts(result, LAST_VERIFY) == (1, 249, 1, 0)
    assert "  missing %s (workspace %s)" % (ids[10], tree["child"]) in result.stdout


def test_verify_calls_an_unsearchable_old_row_unverifiable_never_a_match(
    cli, legacy, tree, plugin, env
):
    stopwords = legacy.memory(tree["root"], "the and of")  # no searchable words
    legacy.many(tree["root"], 120)
    assert cli("-apply").status == 0

    result = cli("-verify")
    assert result.status == 1
    assert counts(result, LAST_VERIFY) == (1, 120, 0, 1)
    assert "unverifiable %s" % stopwords in result.stdout


@pytest.mark.module_only
def test_verify_samples_deterministically_and_skips_removed_workspaces(cli, legacy, plugin, env):
    legacy.create_schema()
    workspaces = [legacy.workspace() for _ in range(6)]
    removed = legacy.workspace(status="removed")
    for w in workspaces + [removed]:
        legacy.memory(w, "fact for " + w)
    assert cli("-apply").status == 0

    first = cli("-verify", "-verify-sample", "3", "--json")
    again = cli("-verify", "-verify-sample=3", "--json")
    everything = cli("-verify", "-verify-sample", "0", "--json")

    assert json.loads(first.stdout)["workspaces_sampled"] == 3
    assert first.stdout == again.stdout
    assert json.loads(everything.stdout)["matches"] == 6  # not the removed workspace's row


# --- exit statuses and their sentences ---------------------------------------------


def test_usage_errors_exit_2_before_connecting(cli, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://u:pw@127.0.0.1:%d/d" % free_port())
    monkeypatch.setenv("MEMORY_PLUGIN_URL", "http://127.0.0.1:9")
    for argv, sentence in [
        ((), "memory-backfill: Choose exactly one mode: -dry-run, -apply, -verify or -rollback."),
        (
            ("-apply", "-verify"),
            "Choose exactly one mode: -dry-run, -apply, -verify or -rollback (got -apply and "
            "-verify).",
        ),
        (("-apply", "-limit", "0"), "-limit must be a positive whole number, not '0'."),
        (("-apply", "-workspace", "42"), "-workspace must be a workspace UUID, not '42'."),
    ]:
        result = cli(*argv)
        assert result.status == 2, argv
        assert result.stdout == ""
        assert result.stderr.strip().endswith(sentence), result.stderr


def test_missing_or_malformed_configuration_exits_2(cli, monkeypatch):
    for name in ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEMORY_PLUGIN_URL", "http://127.0.0.1:9")
    result = cli("-apply")
    assert result.status == 2 and "DATABASE_URL is not set" in result.stderr

    monkeypatch.setenv("DATABASE_URL", "postgres://u:%s@h:port/d" % "hunter2")
    result = cli("-apply")
    assert result.status == 2 and "DATABASE_URL is malformed" in result.stderr
    assert "hunter2" not in result.output()

    monkeypatch.setenv("DATABASE_URL", "postgres://u:pw@h/d")
    monkeypatch.setenv("MEMORY_PLUGIN_URL", "localhost:9100")
    result = cli("-verify")
    assert result.status == 2 and "MEMORY_PLUGIN_URL is malformed" in result.stderr


def test_database_unreachable_exits_3(cli, plugin, monkeypatch):
    monkeypatch.setenv(
        "DATABASE_URL",
        "postgres://u:%s@127.0.0.1:%d/d?connect_timeout=5" % ("hunter2", free_port()),
    )
    monkeypatch.setenv("MEMORY_PLUGIN_URL", plugin.url)
    result = cli("-apply")
    assert result.status == 3
    assert result.said.startswith("memory-backfill: Cannot reach the legacy database u@127.0.0.1:")
    assert "hunter2" not in result.output() and result.said.count("\n") == 1


def test_login_refused_exits_3_without_the_password(cli, cluster, legacy, plugin, monkeypatch):
    legacy.create_schema()
    monkeypatch.setenv("DATABASE_URL", cluster.url(legacy.name, password="wrong-" + APP_PASSWORD))
    monkeypatch.setenv("MEMORY_PLUGIN_URL", plugin.url)
    result = cli("-dry-run")
    assert result.status == 3
    assert "The legacy database refused the login for backfill_app@" in result.stderr
    assert "check the user and password in DATABASE_URL" in result.stderr
    assert "wrong-" not in result.output() and APP_PASSWORD not in result.output()


def test_missing_agent_memories_exits_3(cli, legacy, plugin, env):
    legacy.db.run("CREATE TABLE workspaces (id uuid PRIMARY KEY, name text, parent_id uuid)")
    result = cli("-verify")
    assert result.status == 3
    assert "The legacy table agent_memories does not exist" in result.stderr
    assert_clean(result)


def test_plugin_unreachable_or_unhealthy_exits_3(cli, legacy, tree, plugin, env, monkeypatch):
    legacy.memory(tree["root"], "x")
    monkeypatch.setenv("MEMORY_PLUGIN_URL", "http://127.0.0.1:%d" % free_port())
    result = cli("-apply", "--timeout", "2")
    assert (
        result.status == 3
        and "Cannot reach the memory plugin at http://127.0.0.1:" in result.stderr
    )

    monkeypatch.setenv("MEMORY_PLUGIN_URL", plugin.url)
    plugin.degraded = True
    for mode in ("-apply", "-verify"):
        result = cli(mode)
        assert result.status == 3
        assert "The memory plugin at %s is not healthy (HTTP 503" % plugin.url in result.stderr
    assert plugin.count() == 0


# --- connection settings ---------------------------------------------------------------


def test_ipv6_search_path_and_sslmode_prefer_falls_back_to_plain(
    cli, cluster, legacy, plugin, monkeypatch
):
    legacy.create_schema()
    legacy.db.run("CREATE SCHEMA tenant")
    legacy.db.run("ALTER TABLE agent_memories SET SCHEMA tenant")
    legacy.db.run("ALTER TABLE workspaces SET SCHEMA tenant")
    legacy.db.run("SET search_path = tenant")
    root = legacy.workspace()
    row = legacy.memory(root, "found through search_path")
    host = "[::1]" if _ipv6_listening(cluster) else "127.0.0.1"
    monkeypatch.setenv(
        "DATABASE_URL",
        cluster.url(
            legacy.name, host=host, query="sslmode=prefer&search_path=tenant&application_name=ops"
        ),
    )
    monkeypatch.setenv("MEMORY_PLUGIN_URL", plugin.url + "/")

    result = cli("-apply")

    assert result.status == 0, result.output()
    assert list(plugin.records()) == [row]


def test_sslmode_require_against_a_server_without_tls_exits_3(
    cli, cluster, legacy, plugin, monkeypatch
):
    legacy.create_schema()
    monkeypatch.setenv("DATABASE_URL", cluster.url(legacy.name, query="sslmode=require"))
    monkeypatch.setenv("MEMORY_PLUGIN_URL", plugin.url)
    result = cli("-dry-run")
    assert result.status == 3 and "Server refuses SSL" in result.stderr


def _ipv6_listening(cluster) -> bool:
    import socket

    try:
        socket.create_connection(("::1", cluster.port), timeout=2).close()
        return True
    except OSError:
        return False


# --- progress and pacing -------------------------------------------------------------


@pytest.mark.module_only
def test_max_rate_caps_writes_per_second(cli, legacy, tree, plugin, env):
    import time

    legacy.many(tree["root"], 1000)
    started = time.monotonic()
    result = cli("-apply", "--max-rate", "200", "--concurrency", "16")
    elapsed = time.monotonic() - started
    assert result.status == 0 and plugin.count() == 1000
    assert elapsed >= 4.5  # 1,000 writes at 200/s: a lower bound only, never flaky


def _run_on_a_terminal(args, env):
    """Run the module with stderr on a pseudo-terminal; return (status, what the terminal saw)."""
    import os
    import pty
    import subprocess
    import sys

    from conftest import ROOT

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "memory_backfill.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env={**os.environ, **env},
    )
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    return process.wait(timeout=60), seen.decode("utf-8", "replace")


def test_progress_line_on_a_terminal_and_none_with_quiet(legacy, tree, plugin, env):
    legacy.many(tree["root"], 300)
    status, seen = _run_on_a_terminal(["-apply", "--max-rate", "200"], env)
    assert status == 0
    assert "\r" in seen
    assert re.search(
        r"\d+/300 rows \(\d+%\), \d+ rows/s, ETA \S+, errors 0, connections in use \d+ \(at most "
        r"64\), writes in flight \d+ \(\d+-\d+\), latency p50 [\d.]+ ms p99 [\d.]+ ms, capped by "
        r"--max-rate",
        seen,
    )
    # the last refresh: everything done, the line cleared
    assert "\r\x1b[K300/300 rows (100%)" in seen

    plugin.reset()
    status, seen = _run_on_a_terminal(["-apply", "--max-rate", "200", "-q"], env)
    assert status == 0 and re.fullmatch(r"memory-backfill -apply: database [^\r\n]+\r\n", seen), (
        seen
    )


@pytest.mark.module_only
def test_progress_without_a_terminal_is_plain_and_rare(cli, legacy, tree, plugin, env):
    legacy.many(tree["root"], 1300)
    result = cli("-apply", "--max-rate", "200")  # about 6.5 s
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    assert result.status == 0 and "\r" not in result.stderr
    assert 1 <= len(lines) <= 2  # at most one line per 5 seconds
    assert re.match(r"progress: \d+/1300 rows", lines[0])
