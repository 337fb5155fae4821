"""The pure parts: URL parsing, scope mapping, redaction, planning, options."""

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
        "app", "p@ss:w/rd%", "db.internal", 5432, "platform")
    assert config.sslmode == "prefer"  # libpq's default
    assert "p@ss" not in repr(config) and "p@ss" not in config.describe()


def test_database_url_ipv6_host_port_and_parameters():
    config = mb.parse_database_url(
        "postgresql://u:pw@[::1]:6543/db?sslmode=verify-full&sslrootcert=/ca.pem"
        "&connect_timeout=7&application_name=ops&search_path=legacy,public")
    assert (config.host, config.port) == ("::1", 6543)
    assert (config.sslmode, config.sslrootcert, config.connect_timeout) == (
        "verify-full", "/ca.pem", 7.0)
    assert config.application_name == "ops"
    assert config.startup_params == {"search_path": "legacy,public"}
    assert config.describe() == "u@[::1]:6543/db"


@pytest.mark.parametrize("mode", mb.SSL_MODES)
def test_database_url_every_sslmode(mode):
    assert mb.parse_database_url("postgres://u@h/d?sslmode=" + mode).sslmode == mode


@pytest.mark.parametrize("url, complaint", [
    (None, "DATABASE_URL is not set"),
    ("", "DATABASE_URL is not set"),
    ("mysql://u:pw@h/d", "scheme must be postgres"),
    ("postgres://u:topsecret@h:notaport/d", "malformed"),
    ("postgres:///d", "names no host"),
    ("postgres://h/d", "names no user"),
    ("postgres://u:pw@h/d?sslmode=sometimes", "sslmode must be one of"),
    ("postgres://u:pw@h/d?connect_timeout=soon", "connect_timeout"),
])
def test_database_url_errors_are_usage_errors_without_the_password(url, complaint):
    with pytest.raises(mb.UsageError) as raised:
        mb.parse_database_url(url)
    assert complaint in str(raised.value)
    assert "topsecret" not in str(raised.value)


def test_database_url_host_as_query_parameter_and_unix_socket_folder():
    config = mb.parse_database_url("postgres://u@/d?host=/var/run/postgresql&port=5433")
    assert (config.host, config.port, config.startup_params) == ("/var/run/postgresql", 5433, {})


def test_plugin_url_trailing_slash_is_harmless():
    assert mb.parse_plugin_url("http://localhost:9100/") == "http://localhost:9100"
    for bad in ("localhost:9100", "ftp://x", "http://", "http://h:port"):
        with pytest.raises(mb.UsageError):
            mb.parse_plugin_url(bad)


def test_plugin_userinfo_never_shown():
    client = mb.PluginClient("http://user:hunter2@127.0.0.1:9/")
    assert "hunter2" not in client.base_url and client.base_url == "http://127.0.0.1:9/"


def test_parse_embedding_pgvector_and_array_forms():
    assert mb.parse_embedding("[1,2.5,-3e-2]") == [1.0, 2.5, -0.03]
    assert mb.parse_embedding("{0.5,1}") == [0.5, 1.0]
    assert mb.parse_embedding(None) is None


# --- scope mapping: every row of REFERENCE §3 -------------------------------------

ROOT, CHILD, GRANDCHILD = "r", "c", "g"
TREE = mb.WorkspaceTree([(ROOT, None, "active"), (CHILD, ROOT, "active"),
                         (GRANDCHILD, CHILD, "removed")])


@pytest.mark.parametrize("workspace, scope, namespace, kind", [
    (GRANDCHILD, "LOCAL", "workspace:g", "workspace"),
    (CHILD, "LOCAL", "workspace:c", "workspace"),
    (ROOT, "LOCAL", "workspace:r", "workspace"),
    (GRANDCHILD, "TEAM", "team:c", "team"),
    (CHILD, "TEAM", "team:r", "team"),
    (ROOT, "TEAM", "team:r", "team"),
    (ROOT, "GLOBAL", "org:r", "org"),
])
def test_scope_mapping(workspace, scope, namespace, kind):
    assert mb.resolve_target(workspace, scope, TREE) == mb.Target(namespace, kind)


@pytest.mark.parametrize("workspace, scope, reason", [
    (None, "LOCAL", mb.SKIP_NO_WORKSPACE),
    ("missing", "LOCAL", mb.SKIP_WORKSPACE_NOT_FOUND),
    (CHILD, "GLOBAL", mb.SKIP_GLOBAL_NOT_ROOT),
    (GRANDCHILD, "GLOBAL", mb.SKIP_GLOBAL_NOT_ROOT),
    (ROOT, "local", mb.SKIP_UNKNOWN_SCOPE),
])
def test_scope_mapping_skips(workspace, scope, reason):
    with pytest.raises(mb.RowSkipped) as raised:
        mb.resolve_target(workspace, scope, TREE)
    assert raised.value.reason == reason


def test_chain_of_exactly_50_hops_resolves_and_51_is_a_cycle():
    chain = [("w0", None, None)] + [("w%d" % i, "w%d" % (i - 1), None) for i in range(1, 52)]
    tree = mb.WorkspaceTree(chain)
    assert tree.root_of("w50") == "w0"
    with pytest.raises(mb.RowSkipped, match="50 hops"):
        tree.root_of("w51")
    cycle = mb.WorkspaceTree([("a", "b", None), ("b", "a", None)])
    with pytest.raises(mb.RowSkipped, match="cycle"):
        mb.resolve_target("a", "LOCAL", cycle)


def test_readable_namespaces():
    assert TREE.readable_namespaces(GRANDCHILD) == ["workspace:g", "team:c", "org:r"]
    assert TREE.readable_namespaces(ROOT) == ["workspace:r", "team:r", "org:r"]


# --- redaction: every label of REFERENCE §5 ---------------------------------------

SECRETS = {
    "API_KEY": "OPENAI_API_KEY=sk-abcdefghijklmnop1234",
    "TOKEN": "slack_bot_token = xoxb-123",
    "SECRET": "CLIENT_SECRET=hunter2",
    "BEARER_TOKEN": "Bearer abc.def.ghi",
    "OPENSSH_PRIVATE_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----",
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


def test_redaction_reference_example_and_idempotence():
    text, counts = mb.redact("token OPENAI_API_KEY=sk-abcdefghijklmnop1234 here")
    assert text == "token [REDACTED:API_KEY] here"
    assert mb.redact(text) == (text, Counter())


@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from(sorted(SECRETS.values()))),
                max_size=8))
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
        "id": row.id, "content": "use [REDACTED:BEARER_TOKEN] now", "kind": "fact",
        "source": "agent", "propagation": {"legacy": row.legacy}}
    assert planned.redactions == Counter({"BEARER_TOKEN": 1})
    assert mb.plan_row(row, TREE, redaction=False).body["content"] == "use Bearer abc now"


@pytest.mark.parametrize("content", ["", "   ", "\n\t "])
def test_plan_skips_empty_content(content):
    assert mb.plan_row(_row(content), TREE).reason == mb.SKIP_EMPTY_CONTENT


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
    record = {"id": planned.row.id, "namespace": planned.target.namespace,
              "content": planned.body["content"], "propagation": planned.body["propagation"]}
    return {**record, **changes}


def test_classify_every_class():
    planned = _planned("deploy key ghp_%s then Bearer tok9 at 5 pm" % ("Z" * 20))
    assert mb.classify(planned, _copy(planned)).verdict == mb.MATCH
    missing = mb.classify(planned, None)
    assert (missing.verdict, missing.detail) == (
        mb.MISSING, "in no namespace of the tenant; -apply writes it to workspace:c")
    moved = mb.classify(planned, _copy(planned, namespace="team:r"))
    assert (moved.verdict, moved.detail, moved.found_in) == (
        mb.WRONG_NAMESPACE, "expected in workspace:c, found in team:r", "team:r")
    clear = mb.classify(planned, _copy(planned, content=planned.row.content))
    assert (clear.verdict, clear.labels) == (mb.UNREDACTED, ("BEARER_TOKEN", "GITHUB_PAT"))
    assert clear.detail == "the plugin's copy holds secrets in clear (BEARER_TOKEN, GITHUB_PAT)"
    changed = mb.classify(planned, _copy(planned, content=planned.body["content"].replace("5", "6")))
    assert changed.verdict == mb.CONTENT_DIFFERS and "found" in changed.detail
    for propagation, detail in [(None, "propagation.legacy is missing"),
                                ({}, "propagation.legacy is missing"),
                                ({"legacy": {**planned.row.legacy, "scope": "TEAM"}},
                                 "propagation.legacy differs in scope")]:
        found = mb.classify(planned, _copy(planned, propagation=propagation))
        assert (found.verdict, found.detail) == (mb.PROVENANCE, detail)
    shown = repr([(f.line(), f.to_json()) for f in (missing, moved, clear, changed)])
    assert "Z" * 20 not in shown and "tok9" not in shown


def test_a_content_difference_shows_both_sides_around_it_redacted():
    head = "x" * 100
    detail = mb.first_difference(head + " deploy at 5 pm sharp", head + " deploy at 6 pm sharp")
    assert detail == ('from character 112: expected ..."xxxxxxxxxxxxxxxxxxx deploy at 5 pm sharp", '
                      'found ..."xxxxxxxxxxxxxxxxxxx deploy at 6 pm sharp"')
    assert mb.first_difference("abc", "abcdef") == 'from character 4: expected "abc", found "abcdef"'
    assert mb.first_difference("[REDACTED:TOKEN]", "[REDACTED:TOKEN]") == \
        "the difference lies inside redacted secrets"
    planned = _planned("note: " + "y" * 90 + " Bearer tok1 end")
    altered = planned.row.content.replace("end", "Bearer tok2 fin")
    detail = mb.classify(planned, _copy(planned, content=altered)).detail
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
    rows += [_planned("%s svc9 other%d" % (common, n)) for n in range(120)]  # svc9: too many holders
    unseen = rows[:6] + [rows[12], rows[13]]
    searches = mb.shared_word_searches(rows, unseen)
    assert searches == [("workspace:c", "svc2"), ("workspace:c", "svc1"), ("workspace:c", "svc0")]
    assert mb.shared_word_searches(rows, []) == []


def test_a_verify_failure_entry_names_namespaces_and_labels_never_content():
    planned = _planned("key ghp_%s here" % ("Q" * 20))
    entry = mb.classify(planned, _copy(planned, content=planned.row.content)).to_json()
    assert entry == {"id": planned.row.id, "workspace_id": CHILD, "class": "unredacted",
                     "expected_namespace": "workspace:c", "found_namespace": "workspace:c",
                     "labels": ["GITHUB_PAT"]}


def test_sample_is_deterministic_and_zero_means_all():
    ids = ["w%03d" % i for i in range(200)]
    assert mb.sample_workspaces(ids, 50, 1) == mb.sample_workspaces(reversed(ids), 50, 1)
    assert len(mb.sample_workspaces(ids, 50, 1)) == 50
    assert mb.sample_workspaces(ids, 50, 1) != mb.sample_workspaces(ids, 50, 2)
    assert mb.sample_workspaces(ids, 0, 1) == ids


# --- options --------------------------------------------------------------------------

URLS = {"DATABASE_URL": "postgres://u:pw@h/d", "MEMORY_PLUGIN_URL": "http://p:9100/"}


@pytest.mark.parametrize("argv", [
    ["-apply", "-limit", "10"], ["-apply", "-limit=10"], ["--apply", "--limit=10"],
    ["--apply", "--limit", "10"],
])
def test_option_spellings(argv):
    settings = mb.parse_settings(argv, URLS)
    assert (settings.mode, settings.limit, settings.plugin_url) == ("apply", 10, "http://p:9100")


def test_options_override_environment():
    settings = mb.parse_settings(["-verify", "--database-url", "postgres://x@y/z",
                                  "--plugin-url=http://q:1", "-verify-sample=0",
                                  "-workspace", "6F9619FF-8B86-D011-B42D-00CF4FC964FF"], URLS)
    assert (settings.database.host, settings.plugin_url, settings.verify_sample) == ("y", "http://q:1", 0)
    assert settings.workspace == "6f9619ff-8b86-d011-b42d-00cf4fc964ff"


def test_dry_run_needs_no_plugin_url():
    settings = mb.parse_settings(["-dry-run"], {"DATABASE_URL": "postgres://u@h/d"})
    assert settings.plugin_url is None


@pytest.mark.parametrize("argv, complaint", [
    ([], "Choose exactly one mode"),
    (["-apply", "-verify"], "got -apply and -verify"),
    (["-apply", "-limit", "0"], "-limit must be a positive whole number"),
    (["-apply", "-limit", "ten"], "-limit must be a positive whole number"),
    (["-apply", "-limit=-3"], "-limit must be a positive whole number"),
    (["-apply", "-workspace", "not-a-uuid"], "-workspace must be a workspace UUID"),
    (["-verify", "-verify-sample", "-1"], "-verify-sample must be a whole number"),
    (["-apply", "--frobnicate"], "unrecognized arguments"),
    (["-apply", "--timeout", "0"], "--timeout must be a positive number"),
])
def test_usage_errors(argv, complaint):
    with pytest.raises(mb.UsageError, match=complaint):
        mb.parse_settings(argv, URLS)


def test_apply_needs_the_plugin_url():
    with pytest.raises(mb.UsageError, match="MEMORY_PLUGIN_URL is not set"):
        mb.parse_settings(["-apply"], {"DATABASE_URL": "postgres://u@h/d"})


@given(st.text(alphabet=st.sampled_from(list("abcAKIA_-=:/+ sktokenBearer0123456789ghpvcx\n")),
               max_size=120))
def test_redaction_prefilter_never_changes_the_result(text):
    full = text
    counts = Counter()
    for label, pattern, replacement in mb.redaction_rules():
        full, n = pattern.subn(replacement, full)
        if n:
            counts[label] += n
    assert mb.redact(text) == (full, counts)
