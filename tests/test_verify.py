"""-verify as a diagnosis: every sampled row in exactly one class, against a plugin
state doctored the way the upstream backfill and later accidents leave it; then
-apply repairs it and -verify passes.
"""

import json

import pytest
import urllib3
from conftest import said

import memory_backfill as mb

SECRETS = ["GITHUB_TOKEN=ghp_%s" % ("k" * 36), "Bearer tok_%s" % ("b" * 20)]


def long_content(n: int, words: str) -> str:
    """About 200 characters of distinct, searchable words."""
    return (
        "Runbook entry %d for the %s service: drain the node, cordon it, wait for the pods to "
        "move, then upgrade the kernel and reboot; page the owner if it takes longer than %d "
        "minutes (case%d)." % (n, words, n % 17 + 5, n)
    )


@pytest.fixture
def tenant(legacy):
    """root -> a -> leaf, root -> b: 260 rows in a (so most are older than the newest 100 the
    plugin lists), some holding secrets, plus TEAM, GLOBAL and b's rows."""
    legacy.create_schema()
    root = legacy.workspace()
    a = legacy.workspace(parent=root)
    b = legacy.workspace(parent=root)
    leaf = legacy.workspace(parent=a)
    rows = {}
    for n in range(260):
        secret = " deploy with %s now" % SECRETS[n // 10 % 2] if n % 10 == 3 else ""
        rows[legacy.memory(a, long_content(n, "billing") + secret)] = a
    for n in range(20):
        rows[legacy.memory(a, long_content(1000 + n, "search"), "TEAM")] = a
        rows[legacy.memory(b, long_content(2000 + n, "ledger"))] = b
        rows[legacy.memory(leaf, long_content(3000 + n, "mailer"), "TEAM")] = leaf
    rows[legacy.memory(root, long_content(4000, "global"), "GLOBAL")] = root
    order = legacy.ids_in_read_order()
    return {"root": root, "a": a, "b": b, "leaf": leaf, "order": order, "legacy": legacy}


def verify(tmp_path, *options):
    """-verify of every workspace: (status, text output, classes by row id, failures file text)."""
    import io
    import os

    failures = tmp_path / "verify-failures.jsonl"
    out, err = io.StringIO(), io.StringIO()
    try:
        status = mb.run(
            ["-verify", "-verify-sample", "0", "-q", "--failures", str(failures), *options],
            environ=dict(os.environ),
            stdout=out,
            stderr=err,
        )
    except mb.Incomplete as exc:  # exit 1: problem rows
        status = exc.status
    except mb.BackfillError as exc:
        pytest.fail("verify stopped: %s" % exc)
    text = failures.read_text()
    classes = {entry["id"]: entry for entry in map(json.loads, text.splitlines())}
    return status, out.getvalue() + said(err.getvalue()), classes, text


def assert_no_secret(*texts):
    for text in texts:
        for secret in SECRETS:
            assert secret.split("=")[-1].split(" ")[-1] not in text


def assert_repaired(plugin, legacy, tmp_path):
    assert mb.main(["-apply", "-q"]) == 0
    status, output, classes, _ = verify(tmp_path)
    assert status == 0 and classes == {}, output
    contents = legacy.contents()
    for row_id, record in plugin.records().items():
        assert record["content"] == mb.redact(contents[row_id])[0]
        assert record["propagation"]["legacy"]["created_at"].endswith("Z")


def test_a_doctored_plugin_is_diagnosed_row_by_row_then_repaired(tenant, plugin, env, tmp_path):
    order, a, b = tenant["order"], tenant["a"], tenant["b"]
    assert mb.main(["-apply", "-q"]) == 0
    old, new = order[:150], order[200:260]  # a's rows beyond the newest 100 listed, and within
    secret_rows = [order[n] for n in range(260) if n % 10 == 3]
    doctored = {
        old[5]: "missing",
        new[5]: "missing",
        old[6]: "wrong namespace",
        new[6]: "wrong namespace",
        old[7]: "content differs",
        new[7]: "content differs",
        secret_rows[2]: "unredacted",
        secret_rows[-1]: "unredacted",
        old[8]: "provenance",
        new[8]: "provenance",
        old[9]: "provenance",
    }
    run = plugin.execute
    for row_id in (old[5], new[5]):
        run("DELETE FROM memories WHERE id = CAST(:id AS uuid)", id=row_id)
    # listed by no row
    run("INSERT INTO namespaces (name, kind) VALUES (:ns, 'team')", ns="team:" + b)
    run(
        "UPDATE memories SET namespace = :ns WHERE id = CAST(:id AS uuid)",
        ns="team:" + b,
        id=old[6],
    )
    run(
        "UPDATE memories SET namespace = :ns WHERE id = CAST(:id AS uuid)",
        ns="team:" + a,
        id=new[6],
    )
    for row_id in (old[7], new[7]):  # changed after the 80th character
        run(
            "UPDATE memories SET content = left(content, 120) || 'ALTERED BY HAND' || "
            "substr(content, 126) WHERE id = CAST(:id AS uuid)",
            id=row_id,
        )
    for row_id in (secret_rows[2], secret_rows[-1]):  # the legacy content, secret in clear
        [[content]] = tenant["legacy"].db.run(
            "SELECT content FROM agent_memories WHERE id = CAST(:id AS uuid)", id=row_id
        )
        run("UPDATE memories SET content = :c WHERE id = CAST(:id AS uuid)", c=content, id=row_id)
    run(
        "UPDATE memories SET propagation = NULL WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=[old[8], new[8]],
    )
    run(
        "UPDATE memories SET propagation = jsonb_set(propagation, '{legacy,scope}', '\"TEAM\"') "
        "WHERE id = CAST(:id AS uuid)",
        id=old[9],
    )

    status, output, classes, failures = verify(tmp_path)

    assert status == 1
    assert {row_id: entry["class"] for row_id, entry in classes.items()} == doctored
    assert classes[old[6]]["found_namespace"] == "team:" + b
    assert classes[old[6]]["expected_namespace"] == "workspace:" + a
    assert classes[secret_rows[2]]["labels"] == ["TOKEN"]  # GITHUB_TOKEN=ghp_...
    assert classes[secret_rows[-1]]["labels"] == ["BEARER_TOKEN"]
    assert (
        "rows by class: match=%d, missing=2, wrong namespace=2, content differs=2, unredacted=2, "
        "provenance=3, unverifiable=0" % (len(order) - 11) in output
    )
    assert (
        "to repair: run -apply to rewrite these 11 rows by id; it repairs every class above"
        in output
    )
    assert output.rstrip().endswith("matches=%d mismatches=11 errors=0" % (len(order) - 11))
    differs = [
        line for line in output.splitlines() if line.startswith("  content differs %s" % old[7])
    ]
    assert (
        len(differs) == 1 and "from character 121: expected 189 characters, found 199" in differs[0]
    )
    assert "ALTERED BY HAND" not in output and "Runbook entry" not in output  # no memory text
    shown = verify(tmp_path, "--show-content")[1]
    differs = [
        line for line in shown.splitlines() if line.startswith("  content differs %s" % old[7])
    ]
    assert "ALTERED BY HAND" in differs[0]
    assert (
        "  provenance %s (workspace %s): propagation.legacy differs in scope" % (old[9], a)
        in output
    )
    assert_no_secret(output, failures)
    assert "Runbook entry" not in failures

    assert_repaired(plugin, tenant["legacy"], tmp_path)


def test_what_the_upstream_backfill_left_is_named_then_repaired(tenant, plugin, env, tmp_path):
    """Upstream wrote contents unredacted, no propagation, and stopped writing when its circuit
    breaker opened."""
    legacy, order = tenant["legacy"], tenant["order"]
    tree = legacy.db.run("SELECT id::text, parent_id::text, status FROM workspaces")
    workspaces = mb.WorkspaceTree(tree)
    http = urllib3.PoolManager()
    never_written = set(order[-30:])
    for row_id, workspace, content, scope in legacy.db.run(
        "SELECT id::text, workspace_id::text, content, scope FROM agent_memories"
    ):
        if row_id in never_written:
            continue
        target = mb.resolve_target(workspace, scope, workspaces)
        http.request(
            "PUT", plugin.url + "/v1/namespaces/" + target.namespace, json={"kind": target.kind}
        )
        response = http.request(
            "POST",
            plugin.url + "/v1/namespaces/%s/memories" % target.namespace,
            json={"id": row_id, "content": content, "kind": "fact", "source": "agent"},
        )
        assert response.status == 201

    status, output, classes, failures = verify(tmp_path)

    assert status == 1
    holding = {
        r[0]
        for r in legacy.db.run(
            "SELECT id::text FROM agent_memories WHERE content LIKE '%deploy with%'"
        )
    }
    expected = {
        row_id: (
            "missing"
            if row_id in never_written
            else "unredacted"
            if row_id in holding
            else "provenance"
        )
        for row_id in order
    }
    assert {row_id: entry["class"] for row_id, entry in classes.items()} == expected
    assert "matches=0 mismatches=%d errors=0" % len(order) in output
    assert_no_secret(output, failures)

    assert_repaired(plugin, legacy, tmp_path)


def test_concurrency_does_not_change_the_classes(legacy, plugin, env, tmp_path):
    legacy.create_schema()
    workspace = legacy.workspace()
    ids = legacy.many(workspace, 1000, words=("rollout", "canary"))
    assert mb.main(["-apply", "-q"]) == 0
    plugin.execute("DELETE FROM memories WHERE id = ANY(CAST(:ids AS uuid[]))", ids=ids[100:103])
    plugin.execute(
        "UPDATE memories SET content = content || ' changed' WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=ids[200:202] + ids[990:992],
    )
    plugin.execute(
        "UPDATE memories SET propagation = NULL WHERE id = CAST(:id AS uuid)", id=ids[300]
    )

    one = verify(tmp_path, "--concurrency", "1", "--json")
    sixteen = verify(tmp_path, "--concurrency", "16", "--json")

    assert one[0] == sixteen[0] == 1
    assert one[1] == sixteen[1] and one[2] == sixteen[2]
    report = json.loads(one[1])
    assert report["rows_by_class"] == {
        "match": 992,
        "missing": 3,
        "wrong_namespace": 0,
        "content_differs": 4,
        "unredacted": 0,
        "provenance": 1,
        "unverifiable": 0,
        "unreadable": 0,
    }


# --- the search plan: namespaces first ------------------------------------------------


@pytest.fixture
def small_namespaces(legacy, plugin, env):
    """A root, 3 teams of 2 leaves each: 40 rows of each scope a workspace may write, so that no
    namespace holds more than 100 records: applied."""
    legacy.create_schema()
    root = legacy.workspace()
    workspaces = [root]
    for _ in range(3):
        team = legacy.workspace(parent=root)
        workspaces += [team, legacy.workspace(parent=team), legacy.workspace(parent=team)]
    ids = []
    for n, workspace in enumerate(workspaces):
        ids += legacy.many(workspace, 25, words=("pager%d" % n,))
        ids += legacy.many(workspace, 10, "TEAM", words=("rota%d" % n,))
    ids += legacy.many(root, 40, "GLOBAL", words=("policy",))
    assert mb.main(["-apply", "-q"]) == 0
    return {"root": root, "workspaces": workspaces, "ids": ids}


def verify_json(tmp_path, *options):
    status, output, classes, _ = verify(tmp_path, "--json", *options)
    return status, json.loads(output.splitlines()[0]), classes


def rollback_json() -> dict:
    """-rollback --yes --json, which must exit 0: its report."""
    import io
    import os

    out = io.StringIO()
    status = mb.run(
        ["-rollback", "--yes", "-q", "--json"],
        environ=dict(os.environ),
        stdout=out,
        stderr=io.StringIO(),
    )
    assert status == 0, out.getvalue()
    return json.loads(out.getvalue())


def test_namespaces_read_whole_cost_a_few_searches_not_one_per_row(
    small_namespaces, plugin, tmp_path
):
    status, report, classes = verify_json(tmp_path)
    rows = len(small_namespaces["ids"])
    assert status == 0 and report["matches"] == rows and classes == {}
    assert 0 < report["searches"] <= 0.1 * rows, report["searches"]


def test_an_absent_row_and_a_moved_record_cost_no_search_of_their_own(
    small_namespaces, plugin, tmp_path
):
    ids, workspaces = small_namespaces["ids"], small_namespaces["workspaces"]
    absent, moved = ids[3:6], ids[40:42]
    plugin.execute("DELETE FROM memories WHERE id = ANY(CAST(:ids AS uuid[]))", ids=absent)
    plugin.execute(
        "UPDATE memories SET namespace = :ns WHERE id = ANY(CAST(:ids AS uuid[]))",
        ns="workspace:" + workspaces[5],
        ids=moved,
    )

    status, report, classes = verify_json(tmp_path)

    assert status == 1
    assert {row_id: entry["class"] for row_id, entry in classes.items()} == {
        **dict.fromkeys(absent, "missing"),
        **dict.fromkeys(moved, "wrong namespace"),
    }
    assert {classes[row_id]["found_namespace"] for row_id in moved} == {
        "workspace:" + workspaces[5]
    }
    # the tenant read once, no row alone
    assert report["searches"] <= 0.1 * len(ids), report["searches"]

    report = rollback_json()
    assert (report["deleted"], report["absent"]) == (len(ids) - 3, 3) and plugin.count() == 0
    assert report["searches"] <= 0.1 * len(ids), report["searches"]
    report = (
        rollback_json()
    )  # and again, on a plugin that holds none of them: reading, no row alone
    assert (report["deleted"], report["absent"], report["stream"]["answered"]) == (0, len(ids), 0)
    assert report["searches"] <= 0.1 * len(ids), report["searches"]


def test_a_namespace_over_100_records_is_read_as_far_as_it_goes_then_searched(
    legacy, plugin, env, tmp_path
):
    legacy.create_schema()
    workspace = legacy.workspace()
    ids = legacy.many(workspace, 250, words=("failover", "drill"))
    assert mb.main(["-apply", "-q"]) == 0
    old, new = ids[10], ids[240]  # beyond the newest 100, and among them
    plugin.execute("DELETE FROM memories WHERE id = ANY(CAST(:ids AS uuid[]))", ids=[old, new])
    plugin.execute(
        "UPDATE memories SET content = content || ' edited' WHERE id = CAST(:id AS uuid)",
        id=ids[20],
    )

    status, report, classes = verify_json(tmp_path)

    assert status == 1
    assert {row_id: entry["class"] for row_id, entry in classes.items()} == {
        old: "missing",
        new: "missing",
        ids[20]: "content differs",
    }
    assert report["matches"] == 247


def test_a_plugin_that_cannot_search_leaves_every_row_unverifiable_never_a_match(
    small_namespaces, plugin, tmp_path
):
    plugin.refuse_searches = True
    status, report, classes = verify_json(tmp_path)
    rows = len(small_namespaces["ids"])
    assert status == 1 and report["matches"] == 0 and report["unverifiable"] == rows
    assert {entry["class"] for entry in classes.values()} == {"unverifiable"}
    import io
    import os

    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(mb.Incomplete) as stopped:
        mb.run(["-rollback", "--yes", "-q"], environ=dict(os.environ), stdout=out, stderr=err)
    assert "%d records could not be deleted or looked up" % rows in str(stopped.value)
    assert plugin.count() == rows  # nothing deleted blind where nothing could be read
