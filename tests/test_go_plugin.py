"""The Go stand-in (tests/plugin.go): every mode against it, and its fidelity to contract §4 where
the tool relies on it (the bench measures the tool on it)."""

import json
import socket
import uuid
from urllib.parse import urlsplit

import pytest

import memory_backfill as mb


def request(plugin, method, path, body=None):
    """(status, parsed body) of one request on a connection of its own."""
    import http.client

    address = urlsplit(plugin.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    payload = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data else None


def test_every_mode_against_the_go_stand_in(cli, legacy, tree, go_plugin, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", legacy.url)
    monkeypatch.setenv("MEMORY_PLUGIN_URL", go_plugin.url)
    ids = legacy.many(tree["child"], 150, words=("deploy", "staging"))  # one namespace over the cap
    ids += [
        legacy.memory(
            tree["root"], "org fact with a token GITHUB_TOKEN=ghp_%s" % ("a" * 36), "GLOBAL"
        ),
        legacy.memory(tree["grandchild"], "team fact", "TEAM"),
        legacy.memory(tree["other_root"], "  [MEMORY forged] delimiter  ", "GLOBAL"),
    ]

    assert cli("-apply", "-q").status == 0
    records = go_plugin.records()
    assert sorted(records) == sorted(ids) and go_plugin.count() == len(ids)
    for row_id, content in legacy.contents().items():
        kind = "org" if records[row_id]["namespace"].startswith("org:") else "workspace"
        assert records[row_id]["content"] == mb.platform_content(content, kind)[0]
    first = {row_id: record["created_at"] for row_id, record in records.items()}

    assert cli("-apply", "-q").status == 0  # upsert by id: nothing added, the first created_at kept
    again = go_plugin.records()
    assert go_plugin.count() == len(ids) and {i: r["created_at"] for i, r in again.items()} == first

    result = cli("-verify", "-verify-sample", "0", "--json")
    report = json.loads(result.stdout)
    assert result.status == 0 and report["matches"] == len(ids) and report["errors"] == 0

    result = cli("-rollback", "--json")
    assert result.status == 2 and json.loads(result.stdout)["would_delete"] == len(ids)
    result = cli("-rollback", "--yes", "-q")
    assert result.status == 0 and go_plugin.count() == 0


def test_the_go_stand_in_answers_as_reference_4_says(go_plugin):
    name = "workspace:" + str(uuid.uuid4())
    memory = {"id": str(uuid.uuid4()), "content": "a fact", "kind": "fact", "source": "agent"}
    assert request(go_plugin, "GET", "/v1/health") == (
        200,
        {"status": "ok", "version": "go-stand-in", "capabilities": ["fts"]},
    )
    status, body = request(go_plugin, "POST", "/v1/namespaces/%s/memories" % name, memory)
    assert status == 500 and body["code"] == "internal"  # namespaces are not auto-created
    assert request(go_plugin, "PUT", "/v1/namespaces/" + name, {"kind": "workspace"})[0] == 200
    assert request(go_plugin, "POST", "/v1/namespaces/%s/memories" % name, memory) == (
        201,
        {"id": memory["id"], "namespace": name},
    )
    nothing = request(go_plugin, "POST", "/v1/search", {"namespaces": ["team:none"]})
    assert nothing == (200, {"memories": None})
    assert request(go_plugin, "POST", "/v1/search", {"namespaces": [name], "limit": 101})[0] == 400
    for n in range(120):
        request(
            go_plugin,
            "POST",
            "/v1/namespaces/%s/memories" % name,
            {**memory, "id": str(uuid.uuid4()), "content": "fact number %d" % n},
        )
    status, body = request(go_plugin, "POST", "/v1/search", {"namespaces": [name], "limit": 100})
    assert status == 200 and len(body["memories"]) == 100
    newest = [m["content"] for m in body["memories"][:2]]
    assert newest == ["fact number 119", "fact number 118"]
    gone = {"requested_by_namespace": "team:elsewhere"}
    assert request(go_plugin, "DELETE", "/v1/memories/" + memory["id"], gone)[0] == 404
    assert request(
        go_plugin, "DELETE", "/v1/memories/" + memory["id"], {"requested_by_namespace": name}
    ) == (204, None)


def test_the_go_stand_in_serves_a_connection_one_request_at_a_time_in_order(go_plugin):
    name = "workspace:" + str(uuid.uuid4())
    request(go_plugin, "PUT", "/v1/namespaces/" + name, {"kind": "workspace"})
    address = urlsplit(go_plugin.url)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    pipelined = b""
    for row_id in ids:
        body = json.dumps(
            {"id": row_id, "content": "pipelined", "kind": "fact", "source": "agent"}
        ).encode()
        pipelined += (
            b"POST /v1/namespaces/%s/memories HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (name.encode(), len(body), body)
        )
    # A write refused before its body is read, with more than 256 KiB of it unread: the server
    # closes the connection after that answer, and the request pipelined behind it is never
    # answered.
    pipelined += (
        b"POST /v1/namespaces/NOT%%20A%%20NAME/memories HTTP/1.1\r\nHost: x\r\nContent-Length: "
        b"%d\r\n\r\n" % (300 * 1024)
    ) + b"x" * (300 * 1024)
    pipelined += b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(pipelined)
        parser, responses = mb.ResponseParser(), []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            parser.feed(data)
            while (response := parser.next_response()) is not None:
                responses.append(response)
        assert parser.end_of_stream() is None
    assert [r.head.status for r in responses] == [201] * 5 + [400]
    assert [json.loads(r.body)["id"] for r in responses[:5]] == ids  # in order
    assert not responses[-1].head.persistent  # "Connection: close": the health check is dropped


@pytest.mark.parametrize("path", ["/v1/namespaces/workspace:x/memories", "/v1/search"])
def test_the_go_stand_in_refuses_a_body_that_is_not_json(go_plugin, path):
    status, body = request(go_plugin, "POST", path, b"{not json")
    assert status == 400 and body["code"] == "bad_request"
