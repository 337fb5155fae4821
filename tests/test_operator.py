"""Safe at the keyboard: exactly what was typed runs, every wait on the database is bounded,
the target is named first, the words are honest, no memory text is shown, no mistake is
silent.  Each test is one edge an operator meets at 3 a.m."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import APP_PASSWORD, ROOT, TARGET_LINE, free_port, said

import memory_backfill as mb

TOOL = [sys.executable, str(ROOT / "memory_backfill.py")]


def option_names():
    return mb.build_parser()[1]


# --- exactly what was typed runs ----------------------------------------------------------


def test_every_proper_prefix_of_every_option_is_refused_before_anything_is_read(
    legacy, tree, plugin, env, capsys
):
    legacy.many(tree["root"], 5)
    names = option_names()
    modes = {
        "-dry-run",
        "--dry-run",
        "-apply",
        "--apply",
        "-verify",
        "--verify",
        "-rollback",
        "--rollback",
    }
    tried = 0
    for name in names:
        for end in range(1, len(name)):
            prefix = name[:end]
            if prefix in names:  # -v, -q, -h are names of their own
                continue
            argv = [prefix] if name in modes else ["-apply", prefix]
            if names[name]:
                argv.append("1")  # as if it were the option's value
            assert mb.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith(
                "memory-backfill: %s is not an option (options are taken only by their full names)"
                % prefix
            ), err
            # refused before the target line
            assert err.count("\n") == 1 and not TARGET_LINE.match(err)
            if prefix.strip("-"):
                assert name in err.split("did you mean ", 1)[1], err
            tried += 1
    assert tried > 300
    assert plugin.count() == 0 and plugin.requests["health"] == 0


@pytest.mark.parametrize(
    "typed, meant",
    [
        (["-apply", "-n"], "did you mean -no-redact?"),
        (["-rollback", "-y"], "did you mean -yes?"),
        (["-appl"], "did you mean -apply?"),
        (["-rollb"], "did you mean -rollback?"),
        (["-dry"], "did you mean -dry-run?"),
        (["-apply", "--no-redcat"], "did you mean --no-redact?"),
        (["-apply", "-ver"], "did you mean -verbose, -verify, -verify-sample or -version?"),
        (["-apply", "-qv"], "did you mean -v?"),
        (["-apply", "--frobnicate"], "; run with --help for the list."),
    ],
)
def test_a_short_or_misspelt_option_names_the_one_meant(typed, meant, capsys):
    assert mb.main(typed) == 2
    err = capsys.readouterr().err
    assert err.startswith("memory-backfill: %s is not an option" % typed[-1]) and err.endswith(
        meant + "\n"
    )


def test_exact_names_still_work_in_every_form():
    urls = {"DATABASE_URL": "postgres://u@h/d"}
    for argv in (
        ["-apply", "-no-redact"],
        ["--apply", "--no-redact"],
        ["-apply", "-limit=3", "--no-redact"],
        ["-apply", "--limit", "3", "-no-redact"],
    ):
        settings = mb.parse_settings(argv, urls)
        assert settings.mode == "apply" and not settings.redact


def test_help_has_one_group_per_kind_of_option(capsys):
    assert mb.main(["--help"]) == 0
    titles = re.findall(r"^(\S[^\n]*):$", capsys.readouterr().out, re.M)
    assert titles[:5] == ["modes (exactly one)", "selection", "connections", "writing", "output"]
    assert len(titles) == len(set(titles))


# --- every wait on the database is bounded ------------------------------------------------


def timed(*args, env):
    started = time.monotonic()
    done = subprocess.run(
        TOOL + list(args), capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    return done, time.monotonic() - started


def test_a_database_that_accepts_and_never_answers_is_given_up_on(plugin):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes connections; nothing ever answers
    port = silent.getsockname()[1]
    try:
        url = "postgres://app:%s@127.0.0.1:%d/platform?connect_timeout=2" % ("hunter2", port)
        done, seconds = timed("-apply", env={"DATABASE_URL": url, "MEMORY_PLUGIN_URL": plugin.url})
    finally:
        silent.close()
    assert done.returncode == 3 and seconds < 12
    assert done.stderr.splitlines()[-1] == (
        "memory-backfill: Cannot reach the legacy database app@127.0.0.1:%d/platform (no answer "
        "within 2 s of connecting (connect_timeout in the URL)); check that it is running and that "
        "DATABASE_URL is right." % port
    )
    assert "hunter2" not in done.stderr + done.stdout


def test_the_default_connect_bound_is_ten_seconds():
    assert mb.parse_database_url("postgres://u@h/d").connect_timeout == 10
    # bounded
    assert mb.parse_database_url("postgres://u@h/d?connect_timeout=0").connect_timeout == 10
    assert mb.parse_database_url("postgres://u@h/d?connect_timeout=3").connect_timeout == 3


class TableLock:
    """agent_memories held in ACCESS EXCLUSIVE mode by another session, as a migration holds it."""

    def __init__(self, cluster, legacy):
        self.session = cluster.connect(legacy.name)

    def __enter__(self):
        self.session.run("BEGIN")
        self.session.run("LOCK TABLE agent_memories IN ACCESS EXCLUSIVE MODE")
        return self

    def release_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.session.run, ["COMMIT"])
        timer.start()
        return timer

    def __exit__(self, *exc_info):
        try:
            self.session.run("ROLLBACK")
        finally:
            self.session.close()


@pytest.mark.parametrize("mode", ["-apply", "-verify", "-rollback"])
def test_a_table_locked_by_a_migration_stops_the_run_within_the_bound(
    cluster, legacy, tree, plugin, env, tmp_path, mode
):
    legacy.many(tree["root"], 20)
    checkpoint = ["--checkpoint", str(tmp_path / "cp.json")] if mode == "-apply" else []
    with TableLock(cluster, legacy):
        done, seconds = timed(mode, "--statement-timeout", "1.5", "-q", *checkpoint, env=env)
    assert done.returncode == 3 and seconds < 15, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "memory-backfill: The legacy database %s did not finish a statement within 1.5 s "
        "(--statement-timeout): another session may hold a lock on agent_memories (a migration "
        "takes ACCESS EXCLUSIVE), or the server is overloaded; check pg_stat_activity and pg_locks "
        "there, then run the same command again (with a larger --statement-timeout SECONDS if it "
        "is only slow)." % mb.parse_database_url(legacy.url).describe()
    )
    assert plugin.count() == 0 and APP_PASSWORD not in done.stderr


def test_the_urls_connect_timeout_bounds_connecting_only(cluster, legacy, tree, plugin, env):
    ids = legacy.many(tree["root"], 20)
    url = legacy.url + "&connect_timeout=1"
    with TableLock(cluster, legacy) as lock:
        # longer than connect_timeout, shorter than the statement bound
        timer = lock.release_after(2.5)
        done, seconds = timed("-apply", "-q", env={**env, "DATABASE_URL": url})
        timer.join()
    assert done.returncode == 0 and seconds >= 2.5, done.stderr
    assert sorted(plugin.records()) == sorted(ids)


# --- libpq's habits: where the password comes from -----------------------------------------


def libpq_environment(monkeypatch, legacy, tmp_path, **variables):
    """DATABASE_URL without a password (as an operator who keeps it elsewhere), HOME with no
    password file, no PG* variable but `variables`."""
    for name in (
        "PGPASSWORD",
        "PGPASSFILE",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGSSLMODE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(
        "DATABASE_URL", legacy.cluster.url(legacy.name, password="").replace(":@", "@")
    )
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def password_file_line(*fields: str) -> str:
    return ":".join(field.replace("\\", "\\\\").replace(":", "\\:") for field in fields) + "\n"


def test_a_password_only_in_pgpassword_is_used(
    cli, legacy, root, plugin, env, monkeypatch, tmp_path
):
    ids = legacy.many(root, 20)
    libpq_environment(monkeypatch, legacy, tmp_path, PGPASSWORD=APP_PASSWORD)
    result = cli("-apply", "-q")
    assert result.status == 0, result.stderr
    assert "(password from PGPASSWORD); plugin" in result.stderr.splitlines()[0]
    assert APP_PASSWORD not in result.output()
    assert sorted(plugin.records()) == sorted(ids)


def test_a_password_only_in_the_password_file_is_used(
    cli, legacy, root, plugin, env, monkeypatch, tmp_path
):
    ids = legacy.many(root, 20)
    cluster, passfile = legacy.cluster, tmp_path / "pgpass"
    passfile.write_text(
        "# host:port:database:user:password, the first match wins\n"
        + password_file_line(cluster.host, str(cluster.port + 1), "*", "*", "wrong port")
        + password_file_line(cluster.host, str(cluster.port), "other_db", "*", "wrong database")
        + password_file_line("*", str(cluster.port), legacy.name, "backfill_app", APP_PASSWORD)
        + password_file_line("*", "*", "*", "*", "too late")
    )
    passfile.chmod(0o600)
    libpq_environment(monkeypatch, legacy, tmp_path, PGPASSFILE=str(passfile))
    result = cli("-apply", "-q")
    assert result.status == 0, result.stderr
    assert (
        "(password from the password file %s); plugin" % passfile in result.stderr.splitlines()[0]
    )
    assert APP_PASSWORD not in result.output()
    assert sorted(plugin.records()) == sorted(ids)


@pytest.mark.parametrize(
    "mode, why",
    [
        (
            0o644,
            "the password file {0} was not used: it has group or world access (libpq, too, ignores "
            "it until it is chmod 0600)",
        ),
        (None, "there is no password file {0}"),
    ],
)
def test_a_password_asked_for_and_not_given_is_one_sentence(
    cli, legacy, root, plugin, env, monkeypatch, tmp_path, mode, why
):
    legacy.many(root, 5)
    passfile = tmp_path / ".pgpass"  # the default place: HOME/.pgpass
    if mode is not None:
        passfile.write_text(password_file_line("*", "*", "*", "*", APP_PASSWORD))
        passfile.chmod(mode)
    libpq_environment(monkeypatch, legacy, tmp_path)
    result = cli("-apply")
    database = mb.parse_database_url(legacy.url).describe()
    assert result.status == 3
    assert "(no password); plugin" in result.stderr.splitlines()[0]
    assert result.said == (
        "memory-backfill: The legacy database %s asks for a password and none was given; put it in "
        "DATABASE_URL (postgres://USER:PASSWORD@HOST/DB), in PGPASSWORD, or in the password file "
        "(%s, or PGPASSFILE; mode 0600); %s.\n" % (database, passfile, why.format(passfile))
    )
    assert APP_PASSWORD not in result.output() and plugin.count() == 0


# --- a defect is never silent -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["-dry-run", "-verify", "-rollback"])
@pytest.mark.parametrize("verbose", [False, True])
def test_a_defect_is_one_sentence_and_v_shows_where(
    legacy, tree, plugin, env, capsys, monkeypatch, mode, verbose
):
    legacy.memory(tree["child"], "one fact")

    def defective(*args, **kwargs):
        raise ZeroDivisionError("a defect of the tool")

    monkeypatch.setattr(mb, "plan_row", defective)
    assert mb.main([mode] + (["-v"] if verbose else ["-q"])) == 3
    err = said(capsys.readouterr().err)
    sentence = (
        "memory-backfill: %s failed unexpectedly (ZeroDivisionError, a defect of memory-backfill: "
        "re-run with -v to see where, and report it); stopped.\n" % mode
    )
    if verbose:
        assert err.startswith("Traceback (most recent call last):\n") and err.endswith(sentence)
        assert 'in defective\n    raise ZeroDivisionError("a defect of the tool")' in err
    else:
        assert err == sentence


@pytest.mark.parametrize("verbose", [False, True])
def test_a_defect_while_writing_stops_cleanly_keeps_the_checkpoint_and_v_shows_where(
    legacy, tree, plugin, env, capsys, monkeypatch, tmp_path, verbose
):
    ids = legacy.many(tree["child"], 150)
    checkpoint = tmp_path / "run.ckpt"
    real_plan_row, planned = mb.plan_row, []

    def defective(*args, **kwargs):
        if len(planned) == 100:  # after the first rows' answers (64 are planned ahead)
            raise ZeroDivisionError("a defect of the tool")
        planned.append(real_plan_row(*args, **kwargs))
        return planned[-1]

    monkeypatch.setattr(mb, "plan_row", defective)
    options = ["-apply", "--concurrency", "1", "--checkpoint", str(checkpoint)]
    assert mb.main(options + (["-v"] if verbose else ["-q"])) == 3
    err = said(capsys.readouterr().err)
    sentence = (
        "memory-backfill: -apply failed unexpectedly (ZeroDivisionError, a defect of "
        "memory-backfill: re-run with -v to see where, and report it); stopped.\n"
    )
    assert err.endswith(sentence)
    if verbose:
        assert 'in defective\n    raise ZeroDivisionError("a defect of the tool")' in err
        assert err.count("Traceback (most recent call last):\n") == 1, err[-3000:]
    else:
        assert "Traceback" not in err and err.count("\n") == 1
    saved = json.loads(checkpoint.read_text())  # kept: never more than the plugin holds
    assert 0 < saved["rows_done"] <= plugin.count() <= 100 and not saved["complete"]

    monkeypatch.setattr(mb, "plan_row", real_plan_row)
    assert mb.main(options + ["-q"]) == 0
    assert sorted(plugin.records()) == sorted(ids)


# --- the target, named first --------------------------------------------------------------


def test_the_target_line_comes_first_with_q_and_json_and_never_the_password(
    legacy, tree, plugin, env
):
    legacy.memory(tree["child"], "one fact")
    for args in (
        ["-dry-run"],
        ["-apply", "-q", "-limit", "5"],
        ["-verify", "--json"],
        ["-rollback", "-workspace", tree["child"], "-q"],
    ):
        done = subprocess.run(
            TOOL + args, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
        )
        first = done.stderr.splitlines()[0]
        database = mb.parse_database_url(legacy.url).describe()
        selection = {
            "-dry-run": "every workspace",
            "-apply": "every workspace, at most 5 rows (-limit)",
            "-verify": "a sample of 50 workspaces (seed 20261126)",
            "-rollback": "workspace %s only" % tree["child"],
        }[args[0]]
        assert (
            first
            == "memory-backfill %s: database %s (password from DATABASE_URL); plugin %s; %s"
            % (args[0], database, plugin.url, selection)
        ), done.stderr
        assert APP_PASSWORD not in done.stderr + done.stdout
        if "--json" in args:
            report = json.loads(done.stdout)
            assert (report["database"], report["plugin_url"]) == (database, plugin.url)


def test_the_default_plugin_url_is_said_in_the_target_line(monkeypatch, capsys):
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", "postgres://u:pw@127.0.0.1:%d/d?connect_timeout=1" % port)
    monkeypatch.delenv("MEMORY_PLUGIN_URL", raising=False)
    mb.main(["-dry-run", "-q"])
    assert capsys.readouterr().err.splitlines()[0] == (
        "memory-backfill -dry-run: database u@127.0.0.1:%d/d (password from DATABASE_URL); plugin "
        "http://localhost:9100 (the default: MEMORY_PLUGIN_URL is not set); every workspace" % port
    )


def on_a_terminal(args, env, seconds):
    """Run the module with stderr on a pseudo-terminal for at most `seconds`; what it showed."""
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        TOOL + list(args), stdout=subprocess.DEVNULL, stderr=terminal, env={**os.environ, **env}
    )
    os.close(terminal)
    seen, deadline = b"", time.monotonic() + seconds
    os.set_blocking(controller, False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 4096)
        except BlockingIOError:  # nothing now: more to come unless it has exited
            if process.poll() is not None:
                break
            time.sleep(0.05)
            continue
        except OSError:  # it exited and everything it wrote was read
            break
        seen += chunk
    process.kill()
    process.wait()
    os.close(controller)
    return seen.decode("utf-8", "replace")


def test_a_slow_dependency_is_never_a_blank_screen(plugin):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        url = "postgres://app:pw@127.0.0.1:%d/platform?connect_timeout=30" % silent.getsockname()[1]
        seen = on_a_terminal(
            ["-dry-run"], {"DATABASE_URL": url, "MEMORY_PLUGIN_URL": plugin.url}, 1.5
        )
    finally:
        silent.close()
    assert "\r\x1b[Kconnecting to the legacy database app@127.0.0.1:" in seen, seen


# --- honest words -------------------------------------------------------------------------


@pytest.mark.module_only
def test_a_dry_run_says_it_wrote_nothing(cli, legacy, tree, plugin, env):
    legacy.many(tree["root"], 3)
    result = cli("-dry-run")
    assert (
        result.status == 0
        and result.last_line
        == "Dry run complete (nothing written): scanned=3 copied=3 skipped=0 errors=0"
    )
    assert "Backfill complete" not in result.stdout and plugin.count() == 0


@pytest.mark.module_only
def test_exit_1_of_rollback_ends_with_what_to_do(cli, legacy, tree, plugin, env):
    ids = legacy.many(tree["root"], 5)
    assert cli("-apply").status == 0
    plugin.reject_ids.add(ids[2])  # its delete is refused
    result = cli("-rollback", "--yes")
    assert result.status == 1
    assert result.said == (
        "memory-backfill: 1 records could not be deleted or looked up (listed above); fix what the "
        "plugin says, then run -rollback --yes again: it deletes what is left.\n"
    )


@pytest.mark.module_only
def test_a_wrong_path_in_the_plugin_url_is_named_as_the_urls_fault(cli, legacy, tree, plugin, env):
    result = cli("-apply", "--plugin-url", plugin.url + "/v1")
    assert result.status == 3
    assert result.said == (
        "memory-backfill: --plugin-url %s/v1 answers 404 at %s/v1/v1/health: check the URL's path "
        "and port (the memory plugin's base URL, such as http://localhost:9100, has no /v1).\n"
        % (plugin.url, plugin.url)
    )


class NotHttp:
    """A port that speaks something else: a banner, then close (as SSH or a database would)."""

    def __init__(self, banner: bytes):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.banner = banner
        self.url = "http://127.0.0.1:%d" % self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            try:
                connection.recv(65536)
                connection.sendall(self.banner)
            except OSError:
                pass
            connection.close()


@pytest.mark.parametrize(
    "banner, words",
    [
        (b"", "it closed the connection without an HTTP answer: does that port speak HTTP?"),
        (
            b"SSH-2.0-OpenSSH_9.6\r\n",
            "it answered with something that is not HTTP: does that port speak HTTP?",
        ),
    ],
)
@pytest.mark.module_only
def test_a_port_that_does_not_speak_http_is_said_in_words(cli, legacy, tree, env, banner, words):
    other = NotHttp(banner)
    result = cli("-apply", "--plugin-url", other.url, "--retries", "1")
    other.server.close()
    assert result.status == 3
    assert result.said == (
        "memory-backfill: Cannot reach the memory plugin at %s (%s); check that it is running and "
        "that --plugin-url is right.\n" % (other.url, words)
    )
    for python_text in (
        "RemoteDisconnected(",
        "HTTPConnection(host=",
        "[SSL",
        "Errno",
        "BadStatusLine",
    ):
        assert python_text not in result.output()


@pytest.mark.module_only
def test_https_to_a_plain_http_plugin_says_so(cli, legacy, tree, plugin, env):
    url = plugin.url.replace("http://", "https://")
    result = cli("-apply", "--plugin-url", url, "--retries", "1")
    assert result.status == 3
    assert result.said == (
        "memory-backfill: Cannot reach the memory plugin at %s (it does not speak TLS there: is "
        "the URL https:// where the server speaks plain http://?); check that it is running and "
        "that --plugin-url is right.\n" % url
    )
    assert "SSL" not in result.said


# --- no memory text by default ------------------------------------------------------------


@pytest.mark.module_only
def test_verify_shows_no_memory_text_anywhere_unless_asked(
    cli, legacy, tree, plugin, env, tmp_path
):
    row = legacy.memory(tree["root"], "quarterly payroll export runs on the fifth")
    assert cli("-apply").status == 0
    plugin.execute(
        "UPDATE memories SET content = 'quarterly payroll export moved to the ninth' WHERE id = "
        "CAST(:id AS uuid)",
        id=row,
    )
    failures = tmp_path / "verify.jsonl"
    for extra in ([], ["--json"], ["-v"]):
        result = cli("-verify", "--failures", str(failures), *extra)
        assert result.status == 1
        seen = result.output() + failures.read_text()
        for word in ("payroll", "quarterly", "fifth", "ninth"):
            assert word not in seen, (extra, seen)
        assert (
            "from character 26: expected 42 characters, found 43 (the plugin's copy is longer)"
            in seen
        )
    shown = cli("-verify", "--show-content")
    assert (
        'from character 26: expected "quarterly payroll export runs on the fifth", found '
        '"quarterly '
        'payroll export moved to the ninth"'
    ) in shown.stdout
    assert cli("-apply", "--show-content").status == 2  # it goes with -verify only


# --- no silent mistakes -------------------------------------------------------------------


@pytest.mark.module_only
def test_a_workspace_that_names_nothing_is_refused(cli, legacy, tree, plugin, env):
    legacy.many(tree["root"], 3)
    ghost = "00000000-0000-4000-8000-00000000dead"
    for mode in ("-dry-run", "-apply", "-verify", "-rollback"):
        result = cli(mode, "-workspace", ghost)
        assert result.status == 2, mode
        assert result.said == (
            "memory-backfill: -workspace %s names no workspace and no row of agent_memories in %s; "
            "check the UUID (nothing was written).\n"
            % (ghost, mb.parse_database_url(legacy.url).describe())
        )
    assert plugin.count() == 0


def test_json_is_one_object_on_every_exit(cli, legacy, tree, plugin, env, monkeypatch):
    ids = legacy.many(tree["root"], 4)

    def one_object(*args):
        result = cli(*args, "--json")
        report = json.loads(result.stdout)  # exactly one object: json.loads refuses anything more
        assert report["exit_status"] == result.status
        assert (report["error"] is None) == (result.status == 0)
        if result.status:
            assert result.said == "memory-backfill: %s\n" % report["error"]
        return report

    # 2, before the target
    assert one_object("-apply", "-limit", "0")["error"].startswith("-limit must be")
    assert one_object("-rollback")["exit_status"] == 0  # nothing written yet: nothing to delete
    assert one_object("-apply")["error"] is None
    report = one_object("-rollback")  # records to delete, no --yes: 2
    assert report["exit_status"] == 2 and report["would_delete"] == 4
    plugin.reject_ids.add(ids[0])
    plugin.execute("DELETE FROM memories WHERE id = CAST(:id AS uuid)", id=ids[1])
    report = one_object("-verify")
    assert report["exit_status"] == 1 and "1 sampled rows do not match" in report["error"]
    monkeypatch.setenv("MEMORY_PLUGIN_URL", "http://127.0.0.1:%d" % free_port())
    report = one_object("-apply", "--retries", "0")
    assert report["exit_status"] == 3 and report["error"].startswith(
        "Cannot reach the memory plugin"
    )
    assert report["database"] == mb.parse_database_url(legacy.url).describe()
    monkeypatch.delenv("DATABASE_URL")
    assert one_object("-apply")["error"].startswith("DATABASE_URL is not set")


@pytest.mark.module_only
def test_the_id_ignoring_stop_lists_what_it_stored_in_json_and_failures(
    cli, legacy, tree, plugin, env, tmp_path
):
    legacy.many(tree["root"], 50)
    plugin.ignore_ids = True
    failures = tmp_path / "failures.jsonl"
    result = cli("-apply", "--json", "--failures", str(failures), "--concurrency", "4")
    assert result.status == 3
    report = json.loads(result.stdout)
    stored = {i: r["namespace"] for i, r in plugin.records().items()}
    assert {e["stored_id"]: e["namespace"] for e in report["stored_under_other_ids"]} == stored
    listed = [json.loads(line) for line in failures.read_text().splitlines()]
    assert {e["stored_id"]: e["stored_namespace"] for e in listed} == stored
    assert "Do not run -apply again until the plugin is upgraded" in report["error"]


@pytest.mark.module_only
def test_retries_are_shown_while_they_happen_and_counted_at_the_end(cli, legacy, tree, plugin, env):
    legacy.many(tree["root"], 150)
    plugin.fail_every = 3  # every third request: 503
    seen = on_a_terminal(["-apply", "--max-rate", "100", "--retries", "10"], env, 2.5)
    assert re.search(r"errors 0, .*, retries [1-9]\d* \(last: HTTP 503\)", seen), seen
    plugin.reset()
    plugin.fail_every = 3
    result = cli("-apply", "--json", "--retries", "10")
    report = json.loads(result.stdout)
    assert result.status == 0 and plugin.count() == 150
    assert report["retries"] == report["stream"]["retries"] >= 50
    assert report["stream"]["last_retry_reason"] == "HTTP 503"
    text = cli("-apply", "--retries", "10").stdout
    assert re.search(
        r"^writes: \d+ answered in [\d.]+ s; \d+ retries \(the last after HTTP 503\);", text, re.M
    )


def test_the_last_progress_redraw_clears_what_it_overwrote(legacy, tree, plugin, env):
    legacy.many(tree["root"], 200)
    seen = on_a_terminal(["-apply", "--max-rate", "300"], env, 30)
    # the terminal's own CR LF aside
    redraws = [text for text in seen.split("\r")[1:] if text != "\n"]
    assert redraws and all(redraw.startswith("\x1b[K") for redraw in redraws)
    assert redraws[-1].startswith("\x1b[K200/200 rows (100%)")
