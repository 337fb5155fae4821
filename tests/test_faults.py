"""Nothing lost under faults: a flaky or dying plugin, a dropped database
connection, Ctrl-C and SIGKILL, bad checkpoint and failures files.

Each test counts the records in the plugin's database at the end.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assert_each_row_once, said
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import memory_backfill as mb

TOOL = [sys.executable, str(ROOT / "memory_backfill.py")]


def start(args, env):
    return subprocess.Popen(
        TOOL + list(args),
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout=60.0, process=None):
    """Until condition() holds; fails at the timeout, or at once (with what it said) if `process`
    ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(
                "the run ended first (%d): %s %s" % (process.returncode, out[-800:], err[-800:])
            )
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def read_checkpoint(path):
    with open(path) as fh:
        return json.load(fh)


def assert_checkpoint_consistent(legacy, plugin, path):
    """Every row before the checkpoint's position is in the plugin."""
    position = read_checkpoint(path)["position"]
    if position is None:
        return 0
    before = [
        r[0]
        for r in legacy.db.run(
            "SELECT id::text FROM agent_memories WHERE (created_at, id) <= (CAST(:at AS "
            "timestamptz), CAST(:id AS uuid))",
            at=position["created_at"],
            id=position["id"],
        )
    ]
    assert set(before) <= set(plugin.records())
    return len(before)


def start_slow_apply(plugin, env, checkpoint, *extra):
    """-apply with a checkpoint against a plugin slowed down enough to be caught part-way."""
    plugin.delay = 0.002
    return start(["-apply", "-q", "--checkpoint", str(checkpoint), *extra], env)


def resume_completes(legacy, plugin, env, checkpoint, ids) -> str:
    """The same command again, against a healthy plugin: everything present once."""
    plugin.clear_faults()
    run = start(["-apply", "-q", "--checkpoint", str(checkpoint)], env)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert_each_row_once(plugin.records(), legacy, ids, plugin.count())
    return out


def test_flaky_plugin_loses_nothing_and_duplicates_nothing(legacy, root, plugin, env):
    ids = legacy.many(root, 1000, scope="TEAM")
    plugin.fail_every = 3
    plugin.reset_every = 7

    status = mb.main(["-apply", "-q", "--retries", "10"])

    assert status == 0
    assert_each_row_once(plugin.records(), legacy, ids, plugin.count())
    assert plugin.request_count > 1000  # the faults really happened


def test_throttled_plugin_is_retried_after_retry_after(legacy, root, plugin, env, capsys):
    ids = legacy.many(root, 30)
    plugin.throttle_every = 10
    started = time.monotonic()
    assert mb.main(["-apply", "-q"]) == 0
    assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured
    assert_each_row_once(plugin.records(), legacy, ids, plugin.count())


def test_plugin_down_from_the_start(legacy, root, plugin, env, tmp_path, capsys):
    legacy.many(root, 500)
    plugin.down = True
    checkpoint = tmp_path / "cp.json"
    started = time.monotonic()

    status = mb.main(["-apply", "--checkpoint", str(checkpoint)])

    assert status == 3 and time.monotonic() - started < 5
    err = said(capsys.readouterr().err)
    assert err.count("\n") == 1 and "Cannot reach the memory plugin" in err
    data = read_checkpoint(checkpoint)
    assert data["position"] is None and data["rows_done"] == 0 and not data["complete"]
    plugin.down = False
    assert plugin.count() == 0


def test_plugin_killed_part_way_then_restarted_and_resumed(legacy, root, plugin, env, tmp_path):
    from plugin_server import PluginServer

    ids = legacy.many(root, 2000)
    checkpoint = tmp_path / "cp.json"
    doomed = PluginServer(
        plugin.connect_kwargs, connections=2
    ).start()  # same store, own process state
    doomed.delay = 0.002
    run = start(
        ["-apply", "-q", "--checkpoint", str(checkpoint), "--retries", "2"],
        {**env, "MEMORY_PLUGIN_URL": doomed.url},
    )
    wait_for(lambda: plugin.count() >= 800)
    doomed.kill()  # the sidecar is gone: open connections cut, new ones refused
    out, err = run.communicate(timeout=60)
    err = said(err)

    assert run.returncode == 3, err
    assert "Cannot reach the memory plugin" in err and err.count("\n") == 1
    assert "STOPPED EARLY" in out and out.rstrip().splitlines()[-1].startswith("Backfill stopped:")
    done = assert_checkpoint_consistent(legacy, plugin, checkpoint)
    assert 0 < done < 2000

    writes_before = plugin.requests["write_memory"]  # the restarted plugin
    assert "resumed from checkpoint" in resume_completes(legacy, plugin, env, checkpoint, ids)
    in_flight_at_most = mb.DEFAULT_WRITE_CONNECTIONS * mb.PIPELINE_DEPTH
    assert plugin.requests["write_memory"] - writes_before <= (2000 - done) + 2 * in_flight_at_most
    assert read_checkpoint(checkpoint)["complete"] is True

    # Resuming a completed run copies nothing and says so.
    run = start(["-apply", "-q", "--checkpoint", str(checkpoint)], env)
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 0 and out.rstrip().endswith("scanned=0 copied=0 skipped=0 errors=0")
    assert plugin.count() == 2000


def test_plugin_down_then_back_is_ridden_out_by_retries(legacy, root, plugin, env):
    import threading

    ids = legacy.many(root, 300)
    plugin.delay = 0.002
    threading.Timer(0.5, lambda: setattr(plugin, "down", True)).start()
    threading.Timer(1.5, lambda: setattr(plugin, "down", False)).start()
    assert mb.main(["-apply", "-q"]) == 0
    assert_each_row_once(plugin.records(), legacy, ids, plugin.count())


@pytest.fixture(scope="module")
def restartable_plugin():
    """A plugin stand-in whose own PostgreSQL is a cluster of its own, to restart under it."""
    from pg_cluster import start_cluster
    from plugin_server import PluginServer

    store = start_cluster()
    try:
        name = store.create_database("plugin_store")
        server = PluginServer(store.login(name), connections=4).start()
        server.store = store
        yield server
        server.stop()
    finally:
        store.stop()


def test_the_plugins_database_restarting_mid_run_loses_nothing(
    legacy, root, restartable_plugin, env
):
    plugin = restartable_plugin
    plugin.reset()
    ids = legacy.many(root, 3000)
    plugin.delay = 0.001
    run = start(["-apply", "-q", "--json"], {**env, "MEMORY_PLUGIN_URL": plugin.url})
    wait_for(lambda: plugin.count() >= 500, process=run)
    plugin.store.pg_ctl("restart", "-m", "fast")  # its connections cut; refused, then "starting up"
    out, err = run.communicate(timeout=120)

    assert run.returncode == 0, err
    report = json.loads(out)
    assert report["errors"] == 0 and report["copied"] == 3000 and report["retries"] > 0
    assert_each_row_once(plugin.records(), legacy, ids, plugin.count())


def test_a_plugin_whose_database_stays_down_stops_the_run_blaming_no_row(
    legacy, root, restartable_plugin, env, tmp_path
):
    plugin = restartable_plugin
    plugin.reset()
    ids = legacy.many(root, 3000)
    checkpoint, failures = tmp_path / "cp.json", tmp_path / "failures.jsonl"
    plugin.delay = 0.001
    run = start(
        ["-apply", "--retries", "2", "--checkpoint", str(checkpoint), "--failures", str(failures)],
        {**env, "MEMORY_PLUGIN_URL": plugin.url},
    )
    wait_for(lambda: plugin.count() >= 300, process=run)
    plugin.store.pg_ctl("stop", "-m", "fast")
    try:
        out, err = run.communicate(timeout=120)
    finally:
        plugin.store.pg_ctl("start")
    err = said(err)

    assert run.returncode == 3, err
    assert re.fullmatch(
        r"memory-backfill: The memory plugin at %s stayed unwell through 2 retries of a request "
        r"\(it said HTTP 500: [^\n]+; its /v1/health answers HTTP 503: degraded\); stopped, no row "
        r"counted as refused\. Check the plugin and its database, then re-run to resume\.\n"
        % re.escape(plugin.url),
        err,
    ), err
    assert "Backfill stopped: scanned=" in out and " errors=0" in out
    assert failures.read_text() == ""
    assert_checkpoint_consistent(legacy, plugin, checkpoint)
    resume_completes(legacy, plugin, {**env, "MEMORY_PLUGIN_URL": plugin.url}, checkpoint, ids)


def test_the_tool_killed_with_sigkill_then_resumed(legacy, root, plugin, env, tmp_path):
    ids = legacy.many(root, 2000)
    checkpoint = tmp_path / "cp.json"
    run = start_slow_apply(plugin, env, checkpoint)
    wait_for(
        lambda: (
            plugin.count() >= 800
            and checkpoint.exists()
            and read_checkpoint(checkpoint)["position"] is not None
        ),
        process=run,
    )
    run.kill()
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL
    assert_checkpoint_consistent(legacy, plugin, checkpoint)
    resume_completes(legacy, plugin, env, checkpoint, ids)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_winds_down_then_resume_completes(
    legacy, root, plugin, env, tmp_path, signum, status
):
    ids = legacy.many(root, 2000)
    checkpoint = tmp_path / "cp.json"
    run = start_slow_apply(plugin, env, checkpoint)
    wait_for(lambda: plugin.count() >= 500)
    run.send_signal(signum)
    out, err = run.communicate(timeout=60)
    err = said(err)

    assert run.returncode == status
    assert "Interrupted by %s" % signal.Signals(signum).name in err and err.count("\n") == 1
    assert out.rstrip().splitlines()[-1].startswith("Backfill stopped:")
    assert plugin.count() < 2000
    assert_checkpoint_consistent(legacy, plugin, checkpoint)
    resume_completes(legacy, plugin, env, checkpoint, ids)


def test_database_connection_terminated_part_way(cluster, legacy, root, plugin, env, tmp_path):
    ids = legacy.many(root, 2500)
    checkpoint = tmp_path / "cp.json"
    run = start_slow_apply(plugin, env, checkpoint)
    wait_for(lambda: plugin.count() >= 300)
    admin = cluster.connect()
    killed = admin.run(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
        "'memory-backfill'"
    )
    admin.close()
    out, err = run.communicate(timeout=60)
    err = said(err)

    assert killed and run.returncode == 3, err
    assert err.startswith("memory-backfill: The connection to the legacy database backfill_app@")
    assert "was lost" in err and err.count("\n") == 1
    assert "STOPPED EARLY" in out
    assert_checkpoint_consistent(legacy, plugin, checkpoint)
    resume_completes(legacy, plugin, env, checkpoint, ids)


def test_too_many_refused_rows_in_a_row_stop_the_run(legacy, root, plugin, env, capsys, tmp_path):
    ids = legacy.many(root, 200)
    plugin.reject_ids.update(ids[50:])
    failures = tmp_path / "failures.jsonl"

    status = mb.main(
        [
            "-apply",
            "-q",
            "--concurrency",
            "1",
            "--max-consecutive-failures",
            "5",
            "--failures",
            str(failures),
        ]
    )

    captured = capsys.readouterr()
    assert status == 3
    assert "The plugin refused 5 rows in a row" in said(captured.err)
    assert plugin.count() == 50
    lines = [json.loads(line) for line in failures.read_text().splitlines()]
    assert len(lines) == 5 and {line["status"] for line in lines} == {400}
    assert {line["error"] for line in lines} == {"HTTP 400: rejected by the test"}


def test_a_500_for_a_namespace_that_does_not_exist_is_that_rows_error_not_retried(
    legacy, tree, plugin, env, capsys, tmp_path
):
    lost = legacy.many(tree["child"], 3)
    kept = legacy.many(tree["root"], 5)
    plugin.lose_namespaces.add("workspace:" + tree["child"])
    failures = tmp_path / "failures.jsonl"

    status = mb.main(["-apply", "-q", "--json", "--failures", str(failures)])

    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert status == 1 and report["retries"] == 0 and report["errors"] == 3
    assert sorted(plugin.records()) == sorted(kept)
    lines = [json.loads(line) for line in failures.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(lost)
    assert {line["status"] for line in lines} == {500}
    assert all("foreign key" in line["error"] for line in lines), lines
    assert plugin.requests["health"] >= 2  # asked again before the rows were blamed


def test_an_unexpected_error_while_writing_stops_the_run(
    legacy, root, plugin, env, capsys, monkeypatch, tmp_path
):
    ids = legacy.many(root, 50)
    checkpoint = tmp_path / "cp.json"
    answered = mb.ApplyWrites.answered

    def buggy_answered(writes, job, response):
        if job.item.row.id == ids[20]:
            raise KeyError("a defect of the tool, not a refused row")
        answered(writes, job, response)

    monkeypatch.setattr(mb.ApplyWrites, "answered", buggy_answered)

    status = mb.main(["-apply", "-q", "--concurrency", "1", "--checkpoint", str(checkpoint)])

    captured = capsys.readouterr()
    assert status == 3
    assert said(captured.err) == (
        "memory-backfill: -apply failed unexpectedly (KeyError, a defect of memory-backfill: "
        "re-run with -v to see where, and report it); stopped.\n"
    )
    assert "STOPPED EARLY" in captured.out
    assert set(plugin.records()) == set(ids[:21])  # one write in flight at a time
    assert read_checkpoint(checkpoint)["position"]["id"] == ids[19]  # row 20 was never settled


def test_failures_file_lists_skips_and_errors_never_content(legacy, plugin, env, tmp_path, capsys):
    legacy.create_schema()
    root, child = legacy.chain(1)
    skipped = legacy.memory(child, "secret plans GLOBAL", "GLOBAL")
    refused = legacy.memory(root, "refused content")
    legacy.memory(root, "fine")
    plugin.reject_ids.add(refused)
    failures = tmp_path / "failures.jsonl"

    assert mb.main(["-apply", "-q", "--failures", str(failures)]) == 1

    text = failures.read_text()
    assert "secret plans" not in text and "refused content" not in text
    entries = {e["id"]: e for e in map(json.loads, text.splitlines())}
    assert entries[skipped] == {
        "id": skipped,
        "workspace_id": child,
        "scope": "GLOBAL",
        "reason": mb.SkipReason.GLOBAL_NOT_ROOT,
    }
    assert entries[refused] == {
        "id": refused,
        "workspace_id": root,
        "scope": "LOCAL",
        "error": "HTTP 400: rejected by the test",
        "status": 400,
    }
    assert "skipped and failed rows are listed in %s" % failures in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, complaint",
    [
        ("{not json", "is not a memory-backfill checkpoint"),
        (
            json.dumps(
                {
                    "tool": "memory-backfill",
                    "identity": {
                        "mode": "apply",
                        "workspace": "00000000-0000-0000-0000-000000000001",
                        "database": "x",
                    },
                    "position": None,
                    "rows_done": 0,
                    "complete": False,
                }
            ),
            "belongs to another run (different database and workspace)",
        ),
    ],
)
def test_bad_checkpoint_is_refused(legacy, root, plugin, env, tmp_path, capsys, content, complaint):
    legacy.many(root, 10)
    checkpoint = tmp_path / "cp.json"
    checkpoint.write_text(content)
    assert mb.main(["-apply", "--checkpoint", str(checkpoint)]) == 2
    err = said(capsys.readouterr().err)
    assert complaint in err and err.count("\n") == 1
    assert plugin.count() == 0 and plugin.requests["health"] == 0


CHECKPOINT_REFUSAL = re.compile(
    r"(The checkpoint \S+ (is not a memory-backfill checkpoint|belongs to another run)|Cannot read "
    r"the checkpoint) [^\n]+\.$"
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.binary(max_size=2000)
    | st.text(max_size=300).map(str.encode)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "tool",
                        "identity",
                        "position",
                        "rows_done",
                        "complete",
                        "id",
                        "created_at",
                        "workspace",
                        "database",
                    ]
                ),
                inner,
                max_size=5,
            )
        ),
    ).map(lambda value: json.dumps(value).encode())
)
@example(b"\xff\xfe\x00garbage")
@example(b"[" * 100_000)
@example(
    json.dumps(
        {
            "tool": "memory-backfill",
            "identity": {"workspace": None, "database": "x"},
            "position": {"created_at": 5, "id": "not a uuid"},
            "rows_done": 0,
            "complete": False,
        }
    ).encode()
)
def test_a_checkpoint_of_any_bytes_is_refused_in_one_sentence(tmp_path_factory, data):
    """Refused before anything is contacted (the URLs name nothing that listens), untouched, nothing
    left."""
    folder = tmp_path_factory.mktemp("cp")
    checkpoint = folder / "cp.json"
    checkpoint.write_bytes(data)
    stderr = io.StringIO()
    with pytest.raises(mb.UsageError) as refused:
        mb.run(
            [
                "-apply",
                "-q",
                "--checkpoint",
                str(checkpoint),
                "--database-url",
                "postgres://u@127.0.0.1:1/d",
                "--plugin-url",
                "http://127.0.0.1:1",
            ],
            stdout=io.StringIO(),
            stderr=stderr,
        )
    assert CHECKPOINT_REFUSAL.fullmatch(str(refused.value)), str(refused.value)
    assert stderr.getvalue().count("\n") == 1  # the target line, nothing else
    assert checkpoint.read_bytes() == data and sorted(folder.iterdir()) == [checkpoint]


@pytest.mark.parametrize(
    "make, complaint",
    [
        (lambda path: path.mkdir(), "(it is a directory)"),
        (lambda path: os.mkfifo(path), "(it is not a plain file)"),
        (lambda path: os.truncate(path.touch() or path, 10**9), "(it is larger than 65536 bytes)"),
        (lambda path: os.symlink("/dev/zero", path), "(it is not a plain file)"),
    ],
)
def test_a_checkpoint_that_is_not_a_file_is_refused_at_once(
    legacy, root, plugin, env, tmp_path, capsys, make, complaint
):
    checkpoint = tmp_path / "cp.json"
    make(checkpoint)
    started = time.monotonic()
    assert mb.main(["-apply", "--checkpoint", str(checkpoint)]) == 2
    err = said(capsys.readouterr().err)
    assert err.startswith(
        "memory-backfill: Cannot read the checkpoint %s %s" % (checkpoint, complaint)
    )
    assert err.count("\n") == 1 and time.monotonic() - started < 5
    assert plugin.requests["health"] == 0 and not (tmp_path / "cp.json.lock").exists()


def test_two_runs_on_one_checkpoint_the_second_refused_at_once(legacy, root, plugin, env, tmp_path):
    ids = legacy.many(root, 2000)
    checkpoint = tmp_path / "cp.json"
    first = start_slow_apply(plugin, env, checkpoint)
    wait_for(lambda: plugin.count() >= 200, process=first)

    started = time.monotonic()
    second = start(["-apply", "-q", "--checkpoint", str(checkpoint)], env)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 2 and time.monotonic() - started < 10
    assert said(err) == (
        "memory-backfill: The checkpoint %s is in use by another -apply run (process %d, which "
        "holds %s.lock); let it finish or stop it, or give this run another checkpoint file.\n"
        % (checkpoint, first.pid, checkpoint)
    )
    assert first.poll() is None  # the first run goes on, its checkpoint its own

    first.kill()  # a lock left by a killed run never blocks the next one
    first.wait(timeout=30)
    assert (tmp_path / "cp.json.lock").exists()
    resume_completes(legacy, plugin, env, checkpoint, ids)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cp.json"]  # no .lock, no .tmp


def test_a_full_disk_at_the_checkpoint_leaves_no_temporary_file(
    legacy, root, plugin, env, tmp_path
):
    """The file size limit fails the checkpoint's write as a full disk does (EFBIG for ENOSPC)."""
    import resource

    legacy.many(root, 10)
    checkpoint = tmp_path / "cp.json"
    run = subprocess.Popen(
        TOOL + ["-apply", "-q", "--checkpoint", str(checkpoint)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64)),
    )
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2
    assert said(err) == (
        "memory-backfill: Cannot write the checkpoint %s (File too large); choose a writable "
        "path.\n" % checkpoint
    )
    assert list(tmp_path.iterdir()) == [] and plugin.count() == 0


def test_limited_runs_with_a_checkpoint_continue_until_the_end(legacy, root, plugin, env, tmp_path):
    ids = legacy.many(root, 25)
    checkpoint = tmp_path / "cp.json"
    for _ in range(3):  # 10 + 10 + 5 rows
        assert mb.main(["-apply", "-q", "-limit", "10", "--checkpoint", str(checkpoint)]) == 0
        assert read_checkpoint(checkpoint)["complete"] is (plugin.count() == 25)
    assert_each_row_once(plugin.records(), legacy, ids, plugin.count())
    assert plugin.requests["write_memory"] == 25  # no row written twice


def test_checkpoint_of_another_workspace_filter_is_refused(
    legacy, root, plugin, env, tmp_path, capsys
):
    legacy.many(root, 10)
    checkpoint = tmp_path / "cp.json"
    assert mb.main(["-apply", "-q", "--checkpoint", str(checkpoint), "-workspace", root]) == 0
    plugin.reset()
    assert mb.main(["-apply", "--checkpoint", str(checkpoint)]) == 2
    assert "belongs to another run (different workspace)" in said(capsys.readouterr().err)
    assert plugin.count() == 0


def test_checkpoint_that_becomes_unwritable_stops_the_run(legacy, root, plugin, env, tmp_path):
    legacy.many(root, 2000)
    checkpoint = tmp_path / "cp.json"
    run = start_slow_apply(plugin, env, checkpoint)
    wait_for(lambda: plugin.count() >= 200)
    while True:  # the next save cannot write its temporary file (unless a save is writing it now)
        try:
            (tmp_path / "cp.json.tmp").mkdir()
            break
        except FileExistsError:
            time.sleep(0.001)
    out, err = run.communicate(timeout=60)
    err = said(err)
    assert run.returncode == 2
    assert err.startswith("memory-backfill: Cannot write the checkpoint %s" % checkpoint)
    assert err.count("\n") == 1 and "STOPPED EARLY" in out
    assert plugin.count() < 2000
    assert_checkpoint_consistent(legacy, plugin, checkpoint)


@pytest.mark.parametrize("option", ["--failures", "--checkpoint"])
def test_unwritable_paths_are_refused(legacy, root, plugin, env, capsys, option):
    legacy.many(root, 10)
    assert mb.main(["-apply", option, "/proc/no-such-dir/file"]) == 2
    err = said(capsys.readouterr().err)
    assert "choose a writable path" in err and err.count("\n") == 1
    assert plugin.count() == 0


@pytest.mark.parametrize(
    "option, modes, sentence",
    [
        ("--checkpoint", ("-dry-run", "-verify"), "--checkpoint goes with -apply only."),
        ("--failures", ("-dry-run",), "--failures goes with -apply, -verify and -rollback only."),
        ("--checkpoint", ("-rollback",), "--checkpoint goes with -apply only."),
    ],
)
def test_files_go_with_the_modes_that_write_them(
    legacy, root, env, capsys, tmp_path, option, modes, sentence
):
    for mode in modes:
        assert mb.main([mode, option, str(tmp_path / "x")]) == 2
        assert said(capsys.readouterr().err) == "memory-backfill: %s\n" % sentence
    assert list(tmp_path.iterdir()) == []


# --- any content arrives exactly as its redaction, and legacy is never touched ---------

SECRETS = [
    "OPENAI_API_KEY=sk-abcdefghijklmnop1234",
    "Bearer abc.def",
    "ghp_" + "a" * 20,
    "postgres://u:pw@host/db",
    "AKIA" + "B" * 16,
    "QUJD" * 9,
]
contents = st.lists(
    st.builds(
        lambda parts: "".join(parts),
        st.lists(
            st.one_of(
                st.text(
                    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                    min_size=1,
                    max_size=30,
                ),
                st.sampled_from(SECRETS),
                st.sampled_from(
                    ["\u05e9\u05dc\u05d5\u05dd", "e\u0301", "\U0001f600", "\u202e", "\x07\x1b[2J"]
                ),
            ),
            min_size=1,
            max_size=6,
        ),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(contents)
@example(["x" * 1_000_000 + " Bearer tail"])
def test_any_content_arrives_as_its_redaction(cluster, plugin_server, contents):
    from conftest import Legacy, create_database

    plugin_server.reset()
    legacy = Legacy(cluster, create_database(cluster, "prop"))
    try:
        legacy.create_schema()
        root = legacy.workspace()
        ids = [legacy.memory(root, content) for content in contents]
        before = legacy.snapshot()
        status = mb.run(
            ["-apply", "-q", "--database-url", legacy.url, "--plugin-url", plugin_server.url],
            stdout=open(os.devnull, "w"),
        )
        records = plugin_server.records()
        for row_id, content in zip(ids, contents, strict=True):
            if content.strip():
                assert records[row_id]["content"] == mb.redact(content)[0]
            else:
                assert row_id not in records
        assert status == 0
        assert legacy.snapshot() == before
    finally:
        legacy.close()
