"""The pure parts: URL parsing, scope mapping, redaction, planning, options."""

import os
import re
import uuid
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

import memory_backfill as mb

# --- DATABASE_URL / MEMORY_PLUGIN_URL --------------------------------------------


def test_database_url_percent_encoded_password_and_defaults():
    config = mb.parse_database_url("postgres://app:p%40ss%3Aw%2Frd%25@db.internal/platform")
    assert (config.user, config.password, config.host, config.port, config.database) == (
        "app",
        "p@ss:w/rd%",
        "db.internal",
        5432,
        "platform",
    )
    assert config.sslmode == "prefer"  # libpq's default
    assert "p@ss" not in repr(config) and "p@ss" not in config.describe()


def test_database_url_ipv6_host_port_and_parameters():
    config = mb.parse_database_url(
        "postgresql://u:pw@[::1]:6543/db?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=7&application_name=ops&search_path=legacy,public"
    )
    assert (config.host, config.port) == ("::1", 6543)
    assert (config.sslmode, config.sslrootcert, config.connect_timeout) == (
        "verify-full",
        "/ca.pem",
        7.0,
    )
    assert config.application_name == "ops"
    assert config.startup_params == {"search_path": "legacy,public"}
    assert config.describe() == "u@[::1]:6543/db"


@pytest.mark.parametrize("mode", mb.SSL_MODES)
def test_database_url_every_sslmode(mode):
    assert mb.parse_database_url("postgres://u@h/d?sslmode=" + mode).sslmode == mode


@pytest.mark.parametrize(
    "url, complaint",
    [
        (None, "DATABASE_URL is not set"),
        ("", "DATABASE_URL is not set"),
        ("mysql://u:pw@h/d", "scheme must be postgres"),
        ("postgres://u:topsecret@h:notaport/d", "malformed"),
        ("postgres://u:pw@h/d?sslmode=sometimes", "sslmode must be one of"),
        ("postgres://u:pw@h/d?connect_timeout=soon", "connect_timeout"),
    ],
)
def test_database_url_errors_are_usage_errors_without_the_password(url, complaint):
    with pytest.raises(mb.UsageError) as raised:
        mb.parse_database_url(url)
    assert complaint in str(raised.value)
    assert "topsecret" not in str(raised.value)


def test_database_url_completed_as_libpq_completes_it(tmp_path, monkeypatch):
    """Where the URL is silent: PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE, PGCONNECT_TIMEOUT;
    then the login name as the user (and as the database), the local server's socket folder as the
    host."""
    import pwd

    environ = {
        "PGHOST": "db.env",
        "PGPORT": "6000",
        "PGUSER": "envuser",
        "PGDATABASE": "envdb",
        "PGSSLMODE": "require",
        "PGCONNECT_TIMEOUT": "4",
        "HOME": str(tmp_path),
    }
    config = mb.parse_database_url("postgres://urluser@urlhost/urldb", environ)
    assert (config.host, config.port, config.user, config.database) == (
        "urlhost",
        6000,
        "urluser",
        "urldb",
    )
    assert (config.sslmode, config.connect_timeout) == ("require", 4.0)
    config = mb.parse_database_url(None, environ)
    assert (config.host, config.port, config.user, config.database) == (
        "db.env",
        6000,
        "envuser",
        "envdb",
    )
    monkeypatch.setattr(mb, "DEFAULT_SOCKET_DIRS", (str(tmp_path),))
    (tmp_path / ".s.PGSQL.5432").touch()
    config = mb.parse_database_url("postgres://", {"PGDATABASE": "d", "HOME": str(tmp_path)})
    login = pwd.getpwuid(os.geteuid()).pw_name
    assert (config.host, config.port, config.user, config.database) == (
        str(tmp_path),
        5432,
        login,
        "d",
    )
    assert mb.parse_database_url("postgres://h", {}).database == login
    with pytest.raises(mb.UsageError, match="PGPORT must be a positive whole number"):
        mb.parse_database_url("postgres://h/d", {"PGPORT": "x"})


def test_database_url_host_as_query_parameter_and_unix_socket_folder():
    config = mb.parse_database_url("postgres://u@/d?host=/var/run/postgresql&port=5433")
    assert (config.host, config.port, config.startup_params) == ("/var/run/postgresql", 5433, {})


def test_plugin_url_trailing_slash_is_harmless():
    assert mb.parse_plugin_url("http://localhost:9100/").url == "http://localhost:9100"
    for bad in ("localhost:9100", "ftp://x", "http://", "http://h:port"):
        with pytest.raises(mb.UsageError):
            mb.parse_plugin_url(bad)


def test_plugin_userinfo_never_shown():
    address = mb.parse_plugin_url("http://user:hunter2@127.0.0.1:9/")
    assert "hunter2" not in repr(address) and address.url == "http://127.0.0.1:9"


def test_plugin_address_is_parsed_once_for_both_clients():
    assert mb.parse_plugin_url("http://bücher.example:9100/x/") == mb.PluginAddress(
        "http://bücher.example:9100/x",
        "bücher.example",
        9100,
        False,
        "/x",
        "xn--bcher-kva.example:9100",
    )
    assert mb.parse_plugin_url("https://[::1]/") == mb.PluginAddress(
        "https://[::1]", "::1", 443, True, "", "[::1]"
    )
    assert mb.parse_plugin_url("http://localhost:80").host_header == "localhost"


@pytest.mark.parametrize("environ", [{}, {"MEMORY_PLUGIN_URL": ""}])
def test_without_a_plugin_url_every_mode_uses_the_tenant_images_plugin(environ):
    for mode in ("-dry-run", "-apply", "-verify", "-rollback"):
        settings = mb.parse_settings([mode], {"DATABASE_URL": "postgres://u@h/d", **environ})
        assert settings.plugin == mb.PluginAddress(
            "http://localhost:9100", "localhost", 9100, False, "", "localhost:9100", default=True
        )
        assert (
            settings.plugin.describe()
            == "http://localhost:9100 (the default: MEMORY_PLUGIN_URL is not set)"
        )
    named = mb.parse_settings(
        ["-apply"],
        {"DATABASE_URL": "postgres://u@h/d", "MEMORY_PLUGIN_URL": "http://localhost:9100"},
    )
    assert not named.plugin.default and named.plugin.describe() == "http://localhost:9100"


def test_parse_embedding_pgvector_and_array_forms():
    assert mb.parse_embedding("[1,2.5,-3e-2]") == [1.0, 2.5, -0.03]
    assert mb.parse_embedding("{0.5,1}") == [0.5, 1.0]
    assert mb.parse_embedding(None) is None


# --- scope mapping: every row of contract §3 -------------------------------------

ROOT, CHILD, GRANDCHILD = "r", "c", "g"
ORPHAN, CYCLE_A, CYCLE_B = "o", "a", "b"  # o's parent row is gone; a and b are each other's parent
TREE = mb.WorkspaceTree(
    [
        (ROOT, None, "active"),
        (CHILD, ROOT, "active"),
        (GRANDCHILD, CHILD, "removed"),
        (ORPHAN, "gone", "active"),
        (CYCLE_A, CYCLE_B, "active"),
        (CYCLE_B, CYCLE_A, "active"),
    ]
)


@pytest.mark.parametrize(
    "workspace, scope, namespace, kind",
    [
        (GRANDCHILD, "LOCAL", "workspace:g", "workspace"),
        (CHILD, "LOCAL", "workspace:c", "workspace"),
        (ROOT, "LOCAL", "workspace:r", "workspace"),
        (GRANDCHILD, "TEAM", "team:c", "team"),
        (CHILD, "TEAM", "team:r", "team"),
        (ROOT, "TEAM", "team:r", "team"),
        (ROOT, "GLOBAL", "org:r", "org"),
        (ORPHAN, "LOCAL", "workspace:o", "workspace"),  # the chain is never needed to write
        (ORPHAN, "TEAM", "team:gone", "team"),  # the parent_id as it stands
        (CYCLE_A, "LOCAL", "workspace:a", "workspace"),
        (CYCLE_A, "TEAM", "team:b", "team"),
    ],
)
def test_scope_mapping(workspace, scope, namespace, kind):
    assert mb.resolve_target(workspace, scope, TREE) == mb.Target(namespace, kind)


@pytest.mark.parametrize(
    "workspace, scope, reason",
    [
        (None, "LOCAL", mb.SkipReason.NO_WORKSPACE),
        ("missing", "LOCAL", mb.SkipReason.WORKSPACE_NOT_FOUND),
        (CHILD, "GLOBAL", mb.SkipReason.GLOBAL_NOT_ROOT),
        (GRANDCHILD, "GLOBAL", mb.SkipReason.GLOBAL_NOT_ROOT),
        (ORPHAN, "GLOBAL", mb.SkipReason.GLOBAL_NOT_ROOT),  # it has a parent_id, so it is no root
        (CYCLE_A, "GLOBAL", mb.SkipReason.GLOBAL_NOT_ROOT),
        (ROOT, "local", mb.SkipReason.UNKNOWN_SCOPE),
    ],
)
def test_scope_mapping_skips(workspace, scope, reason):
    with pytest.raises(mb.RowSkipped, match="^%s$" % re.escape(reason)):
        mb.resolve_target(workspace, scope, TREE)


def test_the_org_a_workspace_reads_is_the_last_reached_within_50_hops():
    chain = [("w0", None, None)] + [("w%d" % i, "w%d" % (i - 1), None) for i in range(1, 52)]
    tree = mb.WorkspaceTree(chain)
    assert tree.top("w50") == "w0"  # exactly 50 hops: the root
    assert tree.top("w51") == "w1"  # longer: the one 50 hops up
    assert TREE.top(CYCLE_A) == CYCLE_A  # 50 hops around a 2-cycle end where they began
    assert TREE.top(ORPHAN) == ORPHAN  # its parent row is gone: the last that exists
    assert TREE.top(GRANDCHILD) == ROOT


def test_readable_namespaces():
    assert TREE.readable_namespaces(GRANDCHILD) == ["workspace:g", "team:c", "org:r"]
    assert TREE.readable_namespaces(ROOT) == ["workspace:r", "team:r", "org:r"]
    assert TREE.readable_namespaces(ORPHAN) == ["workspace:o", "team:gone", "org:o"]
    assert TREE.readable_namespaces(CYCLE_B) == ["workspace:b", "team:a", "org:b"]


def test_a_row_of_a_root_reads_what_it_writes():
    for scope in mb.SCOPE_KINDS:
        assert mb.resolve_target(ROOT, scope, TREE).namespace in TREE.readable_namespaces(ROOT)


# --- redaction: every label of contract §5 ---------------------------------------

SECRETS = {
    "API_KEY": "OPENAI_API_KEY=sk-abcdefghijklmnop1234",
    "TOKEN": "slack_bot_token = xoxb-123",
    "SECRET": "CLIENT_SECRET=hunter2",
    "BEARER_TOKEN": "Bearer abc.def.ghi",
    "OPENSSH_PRIVATE_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE "
    "KEY-----",
    "PRIVATE_KEY": "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
    "DB_URL_WITH_CREDENTIALS": "postgres://admin:pw@db.internal:5432",
    "GITHUB_PAT": "ghp_" + "a" * 20,
    "GITHUB_OAUTH": "gho_" + "b" * 20,
    "GITHUB_APP_SERVER_TOKEN": "ghs_" + "c" * 20,
    "GITHUB_USER_TOKEN": "ghu_" + "d" * 20,
    "GITHUB_REFRESH_TOKEN": "ghr_" + "e" * 20,
    "GITHUB_FINEGRAINED_PAT": "github_pat_" + "f" * 20,
    "VERCEL_TOKEN": "vc_" + "g" * 20,
    "AWS_ACCESS_KEY_ID": "AKIA" + "H" * 16,
    "PERPLEXITY_API_KEY": "pplx-" + "i" * 24,
    "SK_TOKEN": "sk-" + "j" * 20,
    "CTX7_TOKEN": "ctx7_abc123",
    "BASE64_BLOB": "QUJD" * 9,
}


def test_every_label_has_a_sample():
    assert set(SECRETS) == {label for label, _, _ in mb.REDACTION_PATTERNS}


@pytest.mark.parametrize("label", sorted(SECRETS))
def test_redaction_per_label(label):
    text, counts = mb.redact("before %s after" % SECRETS[label])
    assert text == "before [REDACTED:%s] after" % label
    assert counts == Counter({label: 1})


def test_global_memories_get_the_delimiter_guard_after_redaction():
    text = "[MEMORY x] see [MEMORY y] and Bearer abc [MEMORY"
    assert mb.platform_content(text, "org") == (
        "[_MEMORY x] see [_MEMORY y] and [REDACTED:BEARER_TOKEN] [MEMORY",
        Counter({"BEARER_TOKEN": 1}),
    )
    assert (
        mb.platform_content(text, "workspace")[0]
        == "[MEMORY x] see [MEMORY y] and [REDACTED:BEARER_TOKEN] [MEMORY"
    )
    assert mb.platform_content("[_MEMORY z]", "org")[0] == "[_MEMORY z]"  # idempotent
    assert (
        mb.platform_content("Bearer a [MEMORY b", "org", redaction=False)[0]
        == "Bearer a [_MEMORY b"
    )
    row = _row("GLOBAL [MEMORY id=1] note", scope="GLOBAL")
    assert mb.plan_row(row, TREE).body["content"] == "GLOBAL [_MEMORY id=1] note"
    assert mb.plan_row(_row("[MEMORY a", scope="TEAM"), TREE).body["content"] == "[MEMORY a"


def test_redaction_reference_example_and_idempotence():
    text, counts = mb.redact("token OPENAI_API_KEY=sk-abcdefghijklmnop1234 here")
    assert text == "token [REDACTED:API_KEY] here"
    assert mb.redact(text) == (text, Counter())


@given(
    st.lists(st.one_of(st.text(max_size=40), st.sampled_from(sorted(SECRETS.values()))), max_size=8)
)
def test_redaction_is_idempotent_and_leaves_no_secret(parts):
    once, _ = mb.redact(" ".join(parts))
    assert mb.redact(once) == (once, Counter())
    for secret in SECRETS.values():
        assert secret not in once


# --- planning ----------------------------------------------------------------------


def _row(content="hello", scope="LOCAL", workspace=ROOT, **extra):
    legacy = {"workspace_id": workspace, "scope": scope, "created_at": None, **extra}
    return mb.LegacyRow(str(uuid.uuid4()), workspace, content, scope, legacy)


def test_plan_builds_the_memory_write():
    row = _row("use Bearer abc now", scope="TEAM", workspace=CHILD, namespace="general")
    planned = mb.plan_row(row, TREE)
    assert planned.target == mb.Target("team:r", "team")
    assert planned.body == {
        "id": row.id,
        "content": "use [REDACTED:BEARER_TOKEN] now",
        "kind": "fact",
        "source": "agent",
        "propagation": {"legacy": row.legacy},
    }
    assert planned.redactions == Counter({"BEARER_TOKEN": 1})
    assert mb.plan_row(row, TREE, redaction=False).body["content"] == "use Bearer abc now"


@pytest.mark.parametrize("content", ["", "   ", "\n\t "])
def test_plan_skips_empty_content(content):
    assert mb.plan_row(_row(content), TREE).reason == mb.SkipReason.EMPTY_CONTENT


def test_search_query_never_cuts_a_word():
    words = " ".join("word%04d" % i for i in range(1000))
    query = mb.search_query(words)
    assert len(query) <= mb.SEARCH_QUERY_CHARS and words.startswith(query + " ")
    assert mb.search_query("  short text ") == "short text"
    assert mb.search_query("x" * 5000) == "x" * 5000


# --- verification: one class per row ------------------------------------------------


def _planned(content="deploy at 5 pm", scope="LOCAL"):
    return mb.plan_row(_row(content, scope=scope, workspace=CHILD), TREE)


def _copy(planned, **changes):
    record = {
        "id": planned.row.id,
        "namespace": planned.target.namespace,
        "content": planned.body["content"],
        "propagation": planned.body["propagation"],
    }
    return {**record, **changes}


def found(record):
    return mb.Lookup(record, True, True, None)


SECRET_ROW = "deploy key ghp_%s then Bearer tok9 at 5 pm" % ("Z" * 20)


def _changed(planned):
    return {"content": planned.body["content"].replace("5", "6")}


@pytest.mark.parametrize(
    "changes, row_class, detail",
    [
        (lambda p: {}, mb.VerifyClass.MATCH, ""),
        (
            lambda p: {"namespace": "team:r"},
            mb.VerifyClass.WRONG_NAMESPACE,
            "expected in workspace:c, found in team:r",
        ),
        (
            lambda p: {"content": p.row.content},
            mb.VerifyClass.UNREDACTED,
            "the plugin's copy holds secrets in clear (BEARER_TOKEN, GITHUB_PAT)",
        ),
        (
            _changed,
            mb.VerifyClass.CONTENT_DIFFERS,
            "from character 66: expected 69 characters, found",
        ),
        (
            lambda p: {"propagation": None},
            mb.VerifyClass.PROVENANCE,
            "propagation.legacy is missing",
        ),
        (lambda p: {"propagation": {}}, mb.VerifyClass.PROVENANCE, "propagation.legacy is missing"),
        (
            lambda p: {"propagation": {"legacy": {**p.row.legacy, "scope": "TEAM"}}},
            mb.VerifyClass.PROVENANCE,
            "propagation.legacy differs in scope",
        ),
    ],
)
def test_classify_a_found_copy(changes, row_class, detail):
    planned = _planned(SECRET_ROW)
    finding = mb.classify(planned, found(_copy(planned, **changes(planned))))
    assert (finding.row_class, finding.detail[: len(detail)]) == (row_class, detail)
    shown = repr((finding.line(), finding.to_json()))
    assert "Z" * 20 not in shown and "tok9" not in shown


def test_classify_a_copy_in_no_namespace():
    missing = mb.classify(_planned(SECRET_ROW), found(None))
    assert (missing.row_class, missing.detail) == (
        mb.VerifyClass.MISSING,
        "in no namespace of the tenant; -apply writes it to workspace:c",
    )


def test_a_copy_in_another_namespace_names_it():
    planned = _planned(SECRET_ROW)
    moved = mb.classify(planned, found(_copy(planned, namespace="team:r")))
    assert moved.found_in == "team:r"


def test_a_copy_in_clear_names_the_labels_it_holds():
    planned = _planned(SECRET_ROW)
    clear = mb.classify(planned, found(_copy(planned, content=planned.row.content)))
    assert clear.labels == ("BEARER_TOKEN", "GITHUB_PAT")


@pytest.mark.parametrize(
    "record, complete, searchable, refused, row_class, detail",
    [
        (False, True, True, None, mb.VerifyClass.MISSING, "in no namespace"),
        (False, False, True, None, mb.VerifyClass.UNVERIFIABLE, "matches too many records"),
        (False, True, False, None, mb.VerifyClass.UNVERIFIABLE, "no searchable word"),
        (False, True, True, "HTTP 400: no", mb.VerifyClass.UNVERIFIABLE, "refused a search"),
        (True, False, False, "HTTP 400: no", mb.VerifyClass.MATCH, ""),
    ],
)
def test_a_row_not_found_is_missing_only_when_a_whole_search_would_have_found_it(
    record, complete, searchable, refused, row_class, detail
):
    planned = _planned()
    lookup = mb.Lookup(_copy(planned) if record else None, complete, searchable, refused)
    finding = mb.classify(planned, lookup)
    assert finding.row_class == row_class and detail in finding.detail


def test_a_global_copy_without_the_delimiter_guard_differs_and_one_in_clear_is_unredacted():
    planned = mb.plan_row(_row("org rule [MEMORY 7] Bearer tok5", scope="GLOBAL"), TREE)
    assert planned.body["content"] == "org rule [_MEMORY 7] [REDACTED:BEARER_TOKEN]"
    unguarded = mb.classify(
        planned,
        found(_copy(planned, content="org rule [MEMORY 7] [REDACTED:BEARER_TOKEN]")),
        show_content=True,
    )
    assert (
        unguarded.row_class == mb.VerifyClass.CONTENT_DIFFERS
        and '"org rule [_MEMORY 7]' in unguarded.detail
    )
    upstream = mb.classify(planned, found(_copy(planned, content=planned.row.content)))
    assert (upstream.row_class, upstream.labels) == (mb.VerifyClass.UNREDACTED, ("BEARER_TOKEN",))


def test_a_content_difference_says_where_and_shows_the_text_only_when_asked():
    head = "x" * 100
    expected, changed = head + " deploy at 5 pm sharp", head + " deploy at 6 pm sharp"
    assert mb.first_difference(expected, changed) == (
        "from character 112: expected 121 characters, found 121 (same length); --show-content "
        "shows the text"
    )
    assert mb.first_difference(expected, changed, show_content=True) == (
        'from character 112: expected ..."xxxxxxxxxxxxxxxxxxx deploy at 5 pm sharp", '
        'found ..."xxxxxxxxxxxxxxxxxxx deploy at 6 pm sharp"'
    )
    assert (
        mb.first_difference("abc", "abcdef", True)
        == 'from character 4: expected "abc", found "abcdef"'
    )
    assert mb.first_difference("abc", "abcdef") == (
        "from character 4: expected 3 characters, found 6 (the plugin's copy is longer); "
        "--show-content shows the text"
    )
    assert (
        mb.first_difference("[REDACTED:TOKEN]", "[REDACTED:TOKEN]")
        == "the difference lies inside redacted secrets"
    )
    planned = _planned("note: " + "y" * 90 + " Bearer tok1 end")
    altered = planned.row.content.replace("end", "Bearer tok2 fin ghp_" + "Q" * 20)
    detail = mb.classify(planned, found(_copy(planned, content=altered))).detail
    assert detail == (
        "from character 54: expected 56 characters, found 102 (the plugin's copy is longer); "
        "secrets involved: BEARER_TOKEN, GITHUB_PAT; --show-content shows the text"
    )
    detail = mb.classify(planned, found(_copy(planned, content=altered)), show_content=True).detail
    assert "tok1" not in detail and "tok2" not in detail and "[REDACTED:BEARER_TOKEN] fin" in detail


def test_fallback_queries_find_a_copy_changed_in_one_half_or_unredacted():
    content = "alpha beta gamma [REDACTED:TOKEN] delta epsilon zeta eta"
    queries = mb.fallback_queries(content)
    assert queries[0] == "alpha beta gamma   delta epsilon zeta eta"
    assert queries[1:] == ["alpha beta gamma", "delta epsilon zeta eta"]
    assert all(mb.search_query(content) != q for q in queries)
    assert mb.fallback_queries("x") == []


def test_shared_word_searches_cover_unseen_rows_with_words_few_records_hold():
    common = " ".join(["rollout"] * 3)
    rows = [_planned("%s svc%d note%d" % (common, n % 3, n)) for n in range(12)]
    # svc9: too many holders
    rows += [_planned("%s svc9 other%d" % (common, n)) for n in range(120)]
    unseen = rows[:6] + [rows[12], rows[13]]
    rows = [mb.Sought(p.row, p.body["content"], p.target.namespace) for p in rows]
    unseen = [mb.Sought(p.row, p.body["content"], p.target.namespace) for p in unseen]
    searches = mb.shared_word_searches(rows, unseen)
    assert searches == [("workspace:c", "svc2"), ("workspace:c", "svc1"), ("workspace:c", "svc0")]
    assert mb.shared_word_searches(rows, []) == []


def test_a_verify_failure_entry_names_namespaces_and_labels_never_content():
    planned = _planned("key ghp_%s here" % ("Q" * 20))
    entry = mb.classify(planned, found(_copy(planned, content=planned.row.content))).to_json()
    assert entry == {
        "id": planned.row.id,
        "workspace_id": CHILD,
        "class": "unredacted",
        "expected_namespace": "workspace:c",
        "found_namespace": "workspace:c",
        "labels": ["GITHUB_PAT"],
    }


def test_sample_is_deterministic_and_zero_means_all():
    ids = ["w%03d" % i for i in range(200)]
    assert mb.sample_workspaces(ids, 50, 1) == mb.sample_workspaces(reversed(ids), 50, 1)
    assert len(mb.sample_workspaces(ids, 50, 1)) == 50
    assert mb.sample_workspaces(ids, 50, 1) != mb.sample_workspaces(ids, 50, 2)
    assert mb.sample_workspaces(ids, 0, 1) == ids


# --- options --------------------------------------------------------------------------

URLS = {"DATABASE_URL": "postgres://u:pw@h/d", "MEMORY_PLUGIN_URL": "http://p:9100/"}


@pytest.mark.parametrize(
    "argv",
    [
        ["-apply", "-limit", "10"],
        ["-apply", "-limit=10"],
        ["--apply", "--limit=10"],
        ["--apply", "--limit", "10"],
    ],
)
def test_option_spellings(argv):
    settings = mb.parse_settings(argv, URLS)
    assert (settings.mode, settings.limit, settings.plugin.url) == ("apply", 10, "http://p:9100")


def test_options_override_environment():
    settings = mb.parse_settings(
        [
            "-verify",
            "--database-url",
            "postgres://x@y/z",
            "--plugin-url=http://q:1",
            "-verify-sample=0",
            "-workspace",
            "6F9619FF-8B86-D011-B42D-00CF4FC964FF",
        ],
        URLS,
    )
    assert (settings.database.host, settings.plugin.url, settings.verify_sample) == (
        "y",
        "http://q:1",
        0,
    )
    assert settings.workspace == "6f9619ff-8b86-d011-b42d-00cf4fc964ff"


def test_concurrency_is_the_connections_and_the_searches_at_once():
    settings = mb.parse_settings(["-apply"], URLS)
    defaults = (mb.DEFAULT_WRITE_CONNECTIONS, mb.DEFAULT_SEARCHES)
    assert (settings.write_connections, settings.searches) == defaults
    settings = mb.parse_settings(["-rollback", "--concurrency", "3"], URLS)
    assert (settings.write_connections, settings.searches) == (3, 3)


@pytest.mark.parametrize(
    "argv, complaint",
    [
        ([], "Choose exactly one mode"),
        (["-apply", "-verify"], "got -apply and -verify"),
        (["-apply", "-limit", "0"], "-limit must be a positive whole number"),
        (["-apply", "-limit", "ten"], "-limit must be a positive whole number"),
        (["-apply", "-limit=-3"], "-limit must be a positive whole number"),
        (["-apply", "-workspace", "not-a-uuid"], "-workspace must be a workspace UUID"),
        (["-verify", "-verify-sample", "-1"], "-verify-sample must be a whole number"),
        (["-apply", "--frobnicate"], "--frobnicate is not an option"),
        (["-apply", "stray"], "unrecognized arguments"),
        (["-apply", "--timeout", "0"], "--timeout must be a positive number"),
    ],
)
def test_usage_errors(argv, complaint):
    with pytest.raises(mb.UsageError, match=complaint):
        mb.parse_settings(argv, URLS)


def test_the_id_a_201_body_names():
    row_id = "6f9619ff-8b86-d011-b42d-00cf4fc964ff"
    for body in (
        b'{"id":"%s","namespace":"workspace:w"}\n' % row_id.encode(),  # as Go writes it
        b'{ "namespace": "a\\"b", "id": "%s" }' % row_id.upper().encode(),
    ):
        assert mb.stored_id(body) == row_id
    for body in (
        b'{"namespace":"w"}',
        b"[]",
        b"",
        b"\xff",
        b'{"id": 7}',
        b'{"id":"%s"' % row_id.encode(),
    ):
        assert mb.stored_id(body) is None, body


def test_yes_goes_with_rollback_only():
    assert mb.parse_settings(["-rollback", "--yes"], URLS).yes
    assert not mb.parse_settings(["-rollback"], URLS).yes
    with pytest.raises(mb.UsageError, match="--yes goes with -rollback only"):
        mb.parse_settings(["-apply", "--yes"], URLS)


@given(
    st.text(
        alphabet=st.sampled_from(list("abcAKIA_-=:/+ sktokenBearer0123456789ghpvcx\n")),
        max_size=120,
    )
)
def test_redaction_prefilter_never_changes_the_result(text):
    full = text
    counts = Counter()
    for label, pattern, replacement in mb.redaction_rules():
        full, n = pattern.subn(replacement, full)
        if n:
            counts[label] += n
    assert mb.redact(text) == (full, counts)


# --- a 500 that says the plugin's own database is down (contract §4) -------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"code":"unavailable","message":"store unavailable"}',
        b'{"code":"internal","message":"pq: the database system is starting up"}',
        b'{"code":"internal","message":"ERROR: terminating connection (SQLSTATE 57P01)"}',
        b'{"code":"internal","message":"dial tcp 127.0.0.1:5432: connect: connection refused"}',
        b'{"code":"internal","message":"driver: bad connection"}',
        b'{"code":"internal","message":"store write failed: SQLSTATE 08006"}',
        b'{"code":"internal","message":"pq: sorry, too many clients already (53300)"}',
        b"upstream: server closed the connection unexpectedly",  # not the envelope
    ],
)
def test_a_500_that_says_the_plugins_database_is_down_is_the_stores_not_the_rows(body):
    assert mb.store_unavailable(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"code":"internal","message":"store write failed: insert or update on table '
        b'\\"memories\\" violates foreign key constraint (SQLSTATE 23503)"}',
        b'{"code":"internal","message":"value too long for type character varying(50)"}',
        b"",
        b"\xff\xfe not even text",
    ],
)
def test_any_other_500_is_not_said_to_be_the_stores(body):
    assert not mb.store_unavailable(body)
