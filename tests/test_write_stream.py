"""-apply's write stream: the response parser at every byte boundary, and the
writer against a scripted server that answers in every way HTTP/1.x allows
(and some it does not).  In every scenario each row ends up in the plugin
exactly once, and the checkpoint never passes a row that was not acknowledged.
"""

import json
import time

import pytest
from scripted_plugin import Reply, ScriptedPlugin

import memory_backfill as mb

# --- the response parser (pure) --------------------------------------------------

# A pipelined stream with every framing a response may have, and what each is.
RESPONSES = [
    (b"HTTP/1.1 100 Continue\r\n\r\n"  # interim: skipped
     b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
     b'{"id":"a"}\n', (201, b'{"id":"a"}\n', True)),
    (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\ncontent-length: 0\r\n\r\n",
     (503, b"", True)),
    (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"4;part=one\r\n{\"id\r\nA\r\n\":\"b\"}\n...\r\n0\r\nX-Trailer: t\r\n\r\n",
     (201, b'{"id":"b"}\n...', True)),
    (b"HTTP/1.1 400 Bad Request\r\nX-Folded: one\r\n two\r\nContent-Length: 2, 2\r\n\r\n{}",
     (400, b"{}", True)),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", (204, b"", True)),
    (b"HTTP/1.1 201 Created\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\n{}",
     (201, b"{}", False)),
    (b"HTTP/1.0 201 Created\r\nContent-Type: application/json\r\n\r\n{\"id\":\"c\"}",  # until close
     (201, b'{"id":"c"}', False)),
]
STREAM = b"".join(data for data, _ in RESPONSES)
EXPECTED = [expected for _, expected in RESPONSES]


def parse(pieces):
    parser, found = mb.ResponseParser(), []
    for piece in pieces:
        parser.feed(piece)
        response = parser.next_response()
        while response is not None:
            found.append((response.status, response.body, response.persistent))
            response = parser.next_response()
    final = parser.end_of_stream()
    if final is not None:
        found.append((final.status, final.body, final.persistent))
    return found


def test_a_pipelined_stream_parses_the_same_split_at_every_byte_boundary():
    assert parse([STREAM]) == EXPECTED
    for cut in range(1, len(STREAM)):
        assert parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
    assert parse([STREAM[n:n + 1] for n in range(len(STREAM))]) == EXPECTED


def test_header_fields_are_read_case_insensitively_and_repeated_ones_joined():
    parser = mb.ResponseParser()
    parser.feed(b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\n")
    response = parser.next_response()
    assert (response.status, response.reason) == (503, "Busy")
    assert response.field(b"retry-after") == b"2" and response.field(b"x-a") == b"1, 2"
    assert response.field(b"date") is None
    parser.feed(b"HTTP/1.1 429 Slow Down\r\nRetry-After:\r\n  7\r\nContent-Length: 0\r\n\r\n")
    assert parser.next_response().field(b"retry-after") == b"7"  # an obs-fold, unfolded


@pytest.mark.parametrize("data, complaint", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "where an HTTP/1.x status line should be"),
    (b"HTTP/2 200\r\n\r\n", "where an HTTP/1.x status line should be"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "where an HTTP/1.x status line should be"),
    (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}", "malformed header field line"),
    (b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 2\r\n\r\n{}", "malformed header field line"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\n{}", "malformed header field line"),
    (b"HTTP/1.1 200 OK\r\n folded-first: x\r\n\r\n", "malformed header field line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding with"),
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding with HTTP/1.0"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "transfer coding other than chunked"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "Content-Length over"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "Switching Protocols"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", "chunk longer"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n", "malformed trailer"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * (mb.MAX_RESPONSE_HEAD + 10), "head longer than"),
])
def test_what_is_not_http_fails_loudly_however_it_arrives(data, complaint):
    for pieces in ([data], [data[n:n + 1] for n in range(min(len(data), 300))] + [data[300:]]):
        with pytest.raises(mb.ProtocolError, match=complaint):
            parse(pieces)


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 201 Crea",
    b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\n{",
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
])
def test_a_response_cut_by_the_close_is_a_lost_connection(data):
    with pytest.raises(mb.ConnectionLost):
        parse([data])


def test_plugin_address_gives_the_host_header_and_path_prefix():
    assert mb.parse_plugin_address("http://bücher.example:9100/x/") == mb.PluginAddress(
        "bücher.example", 9100, False, "/x", "xn--bcher-kva.example:9100")
    assert mb.parse_plugin_address("https://[::1]/") == mb.PluginAddress("::1", 443, True, "", "[::1]")
    assert mb.parse_plugin_address("http://localhost:80").host_header == "localhost"


def test_connection_layout_spreads_concurrency_over_pipelined_connections():
    assert mb.connection_depths(1) == [1]
    assert mb.connection_depths(8) == [4, 4]
    assert mb.connection_depths(6) == [3, 3]
    assert mb.connection_depths(9) == [3, 3, 3]
    assert mb.connection_depths(16) == [4, 4, 4, 4]
    assert all(sum(mb.connection_depths(n)) == n and max(mb.connection_depths(n)) <= mb.PIPELINE_DEPTH
               for n in range(1, 100))


# --- the writer against a scripted server -----------------------------------------

@pytest.fixture
def rows(legacy):
    """40 rows, and their ids in the read order."""
    legacy.create_schema()
    legacy.many(legacy.workspace(), 40)
    return [r[0] for r in legacy.db.run(
        "SELECT id::text FROM agent_memories ORDER BY created_at NULLS FIRST, id")]


@pytest.fixture
def scripted():
    servers = []

    def start(script=lambda write: Reply(), **options):
        servers.append(ScriptedPlugin(script, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def apply(server, legacy, rows, tmp_path, *options):
    """Run -apply against the server, with the checkpoint watched; return the status."""
    checkpoint = tmp_path / "cp.json"
    server.watch_checkpoint(checkpoint, rows)
    status = mb.main(["-apply", "-q", "--database-url", legacy.url, "--plugin-url", server.url,
                      "--checkpoint", str(checkpoint), *options])
    time.sleep(0.01)  # one more look at the final checkpoint
    assert server.violations == []
    return status


def assert_every_row_once(server, legacy, rows):
    contents = dict(legacy.db.run("SELECT id::text, content FROM agent_memories"))
    assert sorted(server.records) == sorted(rows)
    assert {i: r["content"] for i, r in server.records.items()} == contents


def test_responses_arriving_byte_by_byte_and_chunked(scripted, legacy, rows, tmp_path):
    server = scripted(lambda w: Reply(byte_by_byte=w.number < 12, chunked=w.number % 3 == 0))
    assert apply(server, legacy, rows, tmp_path) == 0
    assert_every_row_once(server, legacy, rows)
    assert max(server.acks.values()) == 1 and server.connections == 3  # 1 for urllib3, 2 pipelined


def test_connection_close_after_k_of_n_pipelined_requests(scripted, legacy, rows, tmp_path):
    server = scripted(lambda w: Reply(close=w.index == 2))  # every connection closes after 3 answers
    assert apply(server, legacy, rows, tmp_path, "--retries", "0") == 0  # an orderly close is no failure
    assert_every_row_once(server, legacy, rows)
    assert max(server.acks.values()) == 1 and server.connections >= 1 + 40 // 3


def test_connection_reset_after_k_responses(scripted, legacy, rows, tmp_path):
    server = scripted(lambda w: Reply(reset=w.index == 3 and w.attempt == 0))
    assert apply(server, legacy, rows, tmp_path) == 0
    assert_every_row_once(server, legacy, rows)
    assert server.connections > 3


def test_a_reset_counts_as_a_retry_of_every_unanswered_write(scripted, legacy, rows, tmp_path, capsys):
    server = scripted(lambda w: Reply(reset=w.index == 3 and w.attempt == 0))
    assert apply(server, legacy, rows, tmp_path, "--retries", "0") == 3
    err = capsys.readouterr().err
    assert err.startswith("memory-backfill: Cannot reach the memory plugin at %s" % server.url)
    assert err.count("\n") == 1
    assert len(server.records) < 40


def test_a_503_with_retry_after_in_the_middle_of_a_pipeline(scripted, legacy, rows, tmp_path):
    server = scripted(lambda w: Reply(503, headers=(("Retry-After", "1"),))
                      if w.id == rows[10] and w.attempt == 0 else Reply())
    started = time.monotonic()
    assert apply(server, legacy, rows, tmp_path) == 0
    assert time.monotonic() - started >= 1.0
    assert_every_row_once(server, legacy, rows)
    assert server.arrivals[rows[10]] == 2 and server.arrivals[rows[11]] == 1


def test_a_400_for_one_row_fails_that_row_only(scripted, legacy, rows, tmp_path, capsys):
    server = scripted(lambda w: Reply(400) if w.id == rows[10] else Reply())
    assert apply(server, legacy, rows, tmp_path) == 1
    out = capsys.readouterr().out
    assert "  %s: HTTP 400: scripted 400\n" % rows[10] in out
    assert out.rstrip().endswith("copied=39 skipped=0 errors=1")
    assert sorted(server.records) == sorted(set(rows) - {rows[10]})
    checkpoint = json.loads((tmp_path / "cp.json").read_text())
    assert rows.index(checkpoint["position"]["id"]) < 10 and not checkpoint["complete"]  # a resume retries it


def test_an_answer_that_never_comes_times_out_and_is_sent_again(scripted, legacy, rows, tmp_path):
    server = scripted(lambda w: Reply(hang=w.id == rows[5] and w.attempt == 0))
    started = time.monotonic()
    assert apply(server, legacy, rows, tmp_path, "--timeout", "1") == 0
    assert time.monotonic() - started >= 1.0
    assert_every_row_once(server, legacy, rows)
    assert server.arrivals[rows[5]] == 2


def test_garbage_instead_of_a_status_line_stops_the_run(scripted, legacy, rows, tmp_path, capsys):
    server = scripted(lambda w: Reply(raw=b"SSH-2.0-OpenSSH_9.6\r\n") if w.number == 10 else Reply())
    assert apply(server, legacy, rows, tmp_path) == 3
    captured = capsys.readouterr()
    assert captured.err == (
        "memory-backfill: The memory plugin at %s sent a response that is not valid HTTP/1.1 "
        "(b'SSH-2.0-OpenSSH_9.6\\r\\n' where an HTTP/1.x status line should be); stopped. Check that "
        "MEMORY_PLUGIN_URL points at the memory plugin, then re-run to resume.\n" % server.url)
    assert "STOPPED EARLY" in captured.out
    assert len(server.records) < 40


@pytest.mark.parametrize("options", [{"close_every": True}, {"http10": True}])
def test_a_server_that_answers_once_per_connection_still_gets_every_row(scripted, legacy, rows, tmp_path,
                                                                        options):
    server = scripted(**options)
    assert apply(server, legacy, rows, tmp_path, "--retries", "0") == 0
    assert_every_row_once(server, legacy, rows)
    assert max(server.acks.values()) == 1 and server.connections >= 40


# --- https ---------------------------------------------------------------------------

TLS_FILE = str(__import__("pathlib").Path(__file__).with_name("plugin-tls.pem"))


@pytest.fixture
def tls_plugin(plugin):
    """The test plugin (same store as `plugin`) behind TLS, with a certificate for 127.0.0.1."""
    import ssl

    from plugin_server import PluginServer

    server = PluginServer(plugin.connect_kwargs, connections=2)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS_FILE)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    yield server.start(), server.url.replace("http://", "https://")
    server.stop()


def test_an_https_plugin_gets_every_row_through_tls(legacy, rows, plugin, tls_plugin, monkeypatch, capsys):
    server, url = tls_plugin
    monkeypatch.setenv("SSL_CERT_FILE", TLS_FILE)  # the only certificate trusted
    status = mb.main(["-apply", "-q", "--database-url", legacy.url, "--plugin-url", url])
    assert status == 0, capsys.readouterr()
    assert sorted(plugin.records()) == sorted(rows)
    assert server.requests["write_memory"] == 40


def test_an_https_plugin_with_an_untrusted_certificate_is_refused(legacy, rows, plugin, tls_plugin, capsys):
    _, url = tls_plugin
    assert mb.main(["-apply", "-q", "--database-url", legacy.url, "--plugin-url", url]) == 3
    err = capsys.readouterr().err
    assert "Cannot reach the memory plugin at %s" % url in err and "CERTIFICATE_VERIFY_FAILED" in err
    assert plugin.count() == 0
