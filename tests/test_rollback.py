"""-rollback: a backfill backed out, exactly, by id; the live platform's own records untouched."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import urllib3
from conftest import APP_PASSWORD, ROOT, said

import memory_backfill as mb

TOOL = [sys.executable, str(ROOT / "memory_backfill.py")]
LAST = "Rollback complete: scanned=%d deleted=%d absent=%d errors=%d"


@pytest.fixture
def tenant(legacy, plugin, env):
    """root -> a, root -> b; 150 rows in a (more than a listing of the newest 100), TEAM rows,
    b's rows, a GLOBAL row with a secret: applied.  Then the live platform's own records (random
    ids, some with a backfilled row's very content) and one backfilled record moved to team:b."""
    legacy.create_schema()
    root = legacy.workspace()
    a, b = legacy.workspace(parent=root), legacy.workspace(parent=root)
    ids = {
        "a": legacy.many(a, 150, words=("billing", "rollout")) + legacy.many(a, 10, "TEAM"),
        "b": legacy.many(b, 20, words=("ledger",)),
        "root": [
            legacy.memory(root, "org rule: deploy with Bearer tok_secret9 [MEMORY 1]", "GLOBAL")
        ],
    }
    assert mb.main(["-apply", "-q"]) == 0
    http = urllib3.PoolManager()
    contents = legacy.contents()
    live = []
    for n, namespace in enumerate(
        ["workspace:" + a, "team:" + root, "workspace:" + b, "org:" + root] * 3
    ):
        content = contents[ids["a"][n]] if n % 3 == 0 else "live note %d about billing rollout" % n
        response = http.request(
            "POST",
            plugin.url + "/v1/namespaces/%s/memories" % namespace,
            json={"content": content, "kind": "fact", "source": "user"},
        )
        assert response.status == 201
        live.append(json.loads(response.data)["id"])
    moved = ids["a"][3]
    plugin.execute(
        "INSERT INTO namespaces (name, kind) VALUES (:ns, 'team') ON CONFLICT DO NOTHING",
        ns="team:" + b,
    )
    plugin.execute(
        "UPDATE memories SET namespace = :ns WHERE id = CAST(:id AS uuid)", ns="team:" + b, id=moved
    )
    return {
        "root": root,
        "a": a,
        "b": b,
        "ids": ids,
        "live": live,
        "moved": moved,
        "legacy": legacy,
        "all": [i for group in ids.values() for i in group],
    }


def rollback(*options, environ=None):
    import io

    out, err = io.StringIO(), io.StringIO()
    try:
        status = mb.run(["-rollback", "-q", *options], environ=environ, stdout=out, stderr=err)
    except mb.BackfillError as exc:
        status, err = exc.status, io.StringIO(err.getvalue() + "memory-backfill: %s\n" % exc)
    return status, out.getvalue(), said(err.getvalue())


def assert_clean(*texts):
    for text in texts:
        assert (
            "tok_secret9" not in text and "billing rollout" not in text and APP_PASSWORD not in text
        )


def test_without_yes_it_finds_everything_and_deletes_nothing(tenant, plugin):
    before = plugin.records()
    status, out, err = rollback()
    assert status == 2
    assert err == (
        "memory-backfill: Nothing was deleted: run the same command with --yes to delete these 181 "
        "records.\n"
    )
    assert "records to delete by namespace kind: org=1, team=11, workspace=169" in out
    assert out.rstrip().endswith(
        "Rollback not done (no --yes): scanned=181 would_delete=181 absent=0 errors=0"
    )
    assert plugin.records() == before and plugin.requests["delete_memory"] == 0
    assert_clean(out, err)


def test_with_yes_it_deletes_exactly_the_backfilled_records_wherever_they_are(
    tenant, plugin, tmp_path
):
    live_before = {i: r for i, r in plugin.records().items() if i in tenant["live"]}
    namespaces_before = plugin.namespaces()

    status, out, err = rollback("--yes", "-workspace", tenant["b"])  # one workspace first
    assert status == 0, out + err
    assert out.rstrip().endswith(LAST % (20, 20, 0, 0))
    assert not set(tenant["ids"]["b"]) & set(plugin.records())
    assert set(tenant["ids"]["a"]) <= set(plugin.records())

    status, out, err = rollback("--yes", "--failures", str(tmp_path / "f.jsonl"))
    assert status == 0, out + err
    assert out.rstrip().endswith(LAST % (181, 161, 20, 0))
    # the moved one: team
    assert "records deleted by namespace kind: org=1, team=11, workspace=149" in out
    assert plugin.records() == live_before  # byte for byte, and nothing else is left
    assert plugin.namespaces() == namespaces_before
    assert (tmp_path / "f.jsonl").read_text() == ""
    assert_clean(out, err)

    status, out, err = rollback("--yes")  # a second run finds nothing
    assert status == 0 and out.rstrip().endswith(LAST % (181, 0, 181, 0))
    assert plugin.records() == live_before


def test_a_flaky_plugin_still_has_every_record_deleted_then_apply_restores(
    tenant, plugin, tmp_path
):
    plugin.fail_every = 4  # every 4th request: 503
    status, out, err = rollback("--yes")
    assert status == 0, out + err
    assert out.rstrip().endswith(LAST % (181, 181, 0, 0))
    plugin.clear_faults()
    assert not set(tenant["all"]) & set(plugin.records())

    verify = json.loads(
        subprocess.run(
            TOOL + ["-verify", "-verify-sample", "0", "-q", "--json"],
            capture_output=True,
            text=True,
            env=os.environ,
        ).stdout
    )
    assert verify["exit_status"] == 1 and verify["rows_by_class"]["missing"] == 181
    assert verify["matches"] == 0 and verify["errors"] == 0
    assert mb.main(["-apply", "-q"]) == 0
    assert mb.main(["-verify", "-verify-sample", "0", "-q"]) == 0


def test_deletes_the_plugin_refuses_are_listed_and_exit_1(tenant, plugin, tmp_path):
    refused = tenant["ids"]["b"][:2]
    plugin.reject_ids.update(refused)
    status, out, err = rollback(
        "--yes", "-workspace", tenant["b"], "--failures", str(tmp_path / "f.jsonl")
    )
    assert status == 1
    assert out.rstrip().endswith(LAST % (20, 18, 0, 2))
    for row_id in refused:
        assert "  %s: HTTP 400: rejected by the test\n" % row_id in out
    entries = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in entries) == sorted(refused)
    assert {e["namespace"] for e in entries} == {"workspace:" + tenant["b"]}
    assert {e["status"] for e in entries} == {400}
    assert set(refused) <= set(plugin.records())
    assert_clean(out, err, (tmp_path / "f.jsonl").read_text())


def test_a_defect_while_deleting_stops_it_cleanly_like_apply(tenant, plugin, monkeypatch):
    def buggy(deletes, job, response):
        raise KeyError("a defect of the tool")

    monkeypatch.setattr(mb.RollbackDeletes, "answered", buggy)
    status, out, err = rollback("--yes")
    assert status == 3
    assert err == (
        "memory-backfill: -rollback failed unexpectedly (KeyError, a defect of memory-backfill: "
        "re-run with -v to see where, and report it); stopped.\n"
    )
    assert out.rstrip().splitlines()[-1].startswith("Rollback stopped: scanned=")


def test_it_refuses_like_every_mode_when_a_dependency_is_missing(legacy, plugin, env, monkeypatch):
    legacy.db.run("CREATE TABLE workspaces (id uuid PRIMARY KEY, name text, parent_id uuid)")
    status, out, err = rollback("--yes")
    assert status == 3 and "The legacy table agent_memories does not exist" in err and out == ""
    legacy.db.run("DROP TABLE workspaces")
    legacy.create_schema()
    monkeypatch.setenv("MEMORY_PLUGIN_URL", "http://127.0.0.1:1")
    status, out, err = rollback("--yes", "--retries", "0")
    assert status == 3
    assert err.startswith("memory-backfill: Cannot reach the memory plugin at http://127.0.0.1:1 (")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_it_cleanly_with_what_was_deleted_so_far(
    legacy, plugin, env, signum, status
):
    legacy.create_schema()
    workspace = legacy.workspace()
    ids = legacy.many(workspace, 2000)
    namespace = "workspace:" + workspace
    plugin.execute("INSERT INTO namespaces (name, kind) VALUES (:ns, 'workspace')", ns=namespace)
    plugin.execute(
        "INSERT INTO memories (id, namespace, content, kind, source) SELECT id, :ns, 'x', 'fact', "
        "'agent' FROM unnest(CAST(:ids AS uuid[])) id",
        ns=namespace,
        ids=ids,
    )
    plugin.delay = 0.003
    run = subprocess.Popen(
        TOOL + ["-rollback", "--yes", "-q", "--concurrency", "4"],
        env=os.environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while plugin.requests["delete_memory"] < 300:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signum)
    out, err = run.communicate(timeout=60)
    err = said(err)
    plugin.clear_faults()
    assert run.returncode == status
    assert "Interrupted by %s" % signal.Signals(signum).name in err and err.count("\n") == 1
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("Rollback stopped: scanned=")
    deleted = int(last.split("deleted=")[1].split()[0])
    assert 0 < deleted < 2000 and plugin.count() == 2000 - deleted
    status, out, err = rollback("--yes")  # the same command again deletes the rest
    assert status == 0 and plugin.count() == 0
    assert out.rstrip().endswith(LAST % (2000, 2000 - deleted, deleted, 0))
    assert not set(ids) & set(plugin.records())
