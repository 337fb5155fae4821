"""A stand-in for the memory plugin, faithful to contract §4 (test fixture only).

Same routes, validation, status codes and error envelope as the real plugin,
including its awkward parts: namespaces are not auto-created (a write to one
that was never PUT is a 500), an id that exists is replaced (upsert), search
returns at most 100 rows and sends {"memories": null} when nothing matched.
Records live in a PostgreSQL database of their own, so newest-first listing,
full-text search and substring search behave as they do in production, with
the same indexes: a stored tsvector column with a GIN index, and one on the
namespace.

It also counts requests, for tests that assert how the backfill used it, and
can behave as an older plugin that ignores the ids it is given.

Load shapes, for the benchmark: `wait` seconds spent on every request (as
when the plugin's PostgreSQL commits to a slow disk), and a `capacity` (at
most K requests worked on at once, the others queue in the order they came,
as at a database pool that hands a freed connection to the oldest waiter:
CapacityGate, shared by every process of the plugin).  PluginProcesses serves the
same plugin from several processes behind one port: one Python process
cannot use both cores of this machine, while the real (Go) plugin does.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pg8000.native

NAMESPACE_NAME = re.compile(r"^[a-z]+:[A-Za-z0-9_:.\-]+$")
NAMESPACE_KINDS = {"workspace", "team", "org", "custom"}
MEMORY_KINDS = {"fact", "summary", "checkpoint"}
SOURCES = {"agent", "runtime", "user"}
SEARCH_CAP = 100

SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name text PRIMARY KEY, kind text NOT NULL, expires_at timestamptz,
    metadata jsonb, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS memories (
    id uuid PRIMARY KEY, namespace text NOT NULL REFERENCES namespaces(name),
    content text NOT NULL, kind text NOT NULL, source text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz, propagation jsonb, pin boolean NOT NULL DEFAULT false,
    embedding jsonb,
    content_tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED);
CREATE INDEX IF NOT EXISTS memories_content_tsv ON memories USING gin (content_tsv);
CREATE INDEX IF NOT EXISTS memories_namespace ON memories (namespace);
"""

MEMORY_COLUMNS = (
    "id::text, namespace, content, kind, source, created_at, expires_at, propagation, pin"
)


class BadRequest(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 refuses bursts of concurrent connects

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-request (as a stopped run does) is no server error; anything
        else is printed as socketserver prints it."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class PluginServer:
    """Serve the plugin API on 127.0.0.1:<free port>, storing into PostgreSQL."""

    def __init__(
        self, connect_kwargs: dict, connections: int = 8, wait: float = 0.0, capacity: str = None
    ):
        self.connect_kwargs = connect_kwargs
        self.wait = wait  # seconds every request takes, at least
        self.capacity = capacity  # the CapacityGate's socket path, or None
        self.pool: queue.Queue[pg8000.native.Connection] = queue.Queue()
        for _ in range(connections):
            self.pool.put(pg8000.native.Connection(**connect_kwargs))
        with self.connection() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.run(statement)
        self.requests: Counter = Counter()  # (method, route) -> count
        self.namespace_puts: Counter = Counter()  # namespace -> PUT count
        self.first_writes: list = []  # row ids in the order they first arrived
        self.written: set = set()
        self.reject_ids: set = set()  # writes and deletes of these ids get a 400
        self.ignore_ids = False  # as a plugin from before idempotent upsert: every write a new id
        self.open_connections: set = set()
        self.clear_faults()
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _handler_for(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return "http://%s:%d" % (host, port)

    def start(self) -> PluginServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
        self._close_store()

    def _close_store(self) -> None:
        while not self.pool.empty():
            db = self.pool.get()
            if db is not None:
                with suppress(Exception):
                    db.close()

    def kill(self) -> None:
        """Die like a killed sidecar: refuse new connections, cut the open ones."""
        self.down = True
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for sock in list(self.open_connections):
                try:
                    sock.shutdown(2)
                except OSError:
                    pass
        self._close_store()

    def reset(self) -> None:
        """Empty the store and the counters (between tests)."""
        with self.connection() as db:
            db.run("TRUNCATE memories, namespaces")
        self.requests.clear()
        self.namespace_puts.clear()
        self.first_writes.clear()
        self.written.clear()
        self.reject_ids.clear()
        self.ignore_ids = False
        self.clear_faults()

    def clear_faults(self) -> None:
        """Fault injection, for the fault-tolerance tests (all off)."""
        self.degraded = False  # /v1/health answers 503 degraded
        self.fail_every = 0  # every Nth request gets a 503
        self.throttle_every = 0  # every Nth request gets a 429 with Retry-After: 1
        self.reset_every = 0  # every Nth connection is closed in the middle of its first response
        self.delay = 0.0  # seconds before each answer
        self.down = False  # every connection is closed at once, unanswered
        self.refuse_searches = False  # every search answers 400
        self.lose_namespaces: set = set()  # a PUT of one of these answers 200 and stores nothing
        self.request_count = 0
        self.connection_count = 0

    @contextmanager
    def connection(self):
        """A pooled connection to the store; one that failed is replaced (its database may have
        restarted), and the error goes on to the caller: a 500, as the real plugin answers while its
        database is down."""
        db = self.pool.get()
        try:
            if db is None:
                db = pg8000.native.Connection(**self.connect_kwargs)
            yield db
        except (pg8000.native.InterfaceError, pg8000.native.DatabaseError, OSError) as exc:
            if isinstance(exc, pg8000.native.DatabaseError) and not _connection_lost(exc):
                raise
            with suppress(Exception):
                db.close()
            db = None
            raise
        finally:
            self.pool.put(db)

    # --- helpers for tests ---------------------------------------------------

    def execute(self, sql: str, **params):
        with self.connection() as db:
            return db.run(sql, **params)

    def records(self) -> dict:
        """Every stored memory by id, as the plugin holds it."""
        return stored_records(self.execute)

    def count(self) -> int:
        return self.execute("SELECT count(*) FROM memories")[0][0]

    def namespaces(self) -> dict:
        return dict(self.execute("SELECT name, kind FROM namespaces"))

    # --- the API -------------------------------------------------------------

    def health(self):
        try:
            with self.connection() as db:
                db.run("SELECT 1")
        except Exception:  # noqa: BLE001 - its store is down, whatever the error
            return 503, {"status": "degraded", "version": "test", "capabilities": []}
        if self.degraded:
            return 503, {"status": "degraded", "version": "test", "capabilities": []}
        return 200, {
            "status": "ok",
            "version": "test-plugin",
            "capabilities": ["fts", "embeddings"],
        }

    def put_namespace(self, name: str, body):
        _check_namespace_name(name)
        if not isinstance(body, dict) or body.get("kind") not in NAMESPACE_KINDS:
            raise BadRequest("kind must be one of workspace, team, org, custom")
        expires_at = _optional(body, "expires_at", str)
        metadata = _optional(body, "metadata", dict)
        with self.lock:
            self.namespace_puts[name] += 1
        with self.connection() as db:
            if name not in self.lose_namespaces:  # lost: as if deleted right after the PUT
                db.run(
                    "INSERT INTO namespaces (name, kind, expires_at, metadata) VALUES (:name, "
                    ":kind, CAST(:expires_at AS timestamptz), CAST(:metadata AS jsonb)) ON "
                    "CONFLICT (name) DO UPDATE SET kind = excluded.kind, expires_at = "
                    "excluded.expires_at, metadata = excluded.metadata, updated_at = "
                    "clock_timestamp()",
                    name=name,
                    kind=body["kind"],
                    expires_at=expires_at,
                    metadata=None if metadata is None else json.dumps(metadata),
                )
        return 200, {
            "name": name,
            "kind": body["kind"],
            "expires_at": expires_at,
            "metadata": metadata,
        }

    def write_memory(self, namespace: str, body):
        _check_namespace_name(namespace)
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        content = body.get("content")
        if not isinstance(content, str) or not content.strip():
            raise BadRequest("content is required and must not be empty")
        if body.get("kind") not in MEMORY_KINDS:
            raise BadRequest("kind must be one of fact, summary, checkpoint")
        if body.get("source") not in SOURCES:
            raise BadRequest("source must be one of agent, runtime, user")
        memory_id = _optional(body, "id", str)
        if self.ignore_ids:
            memory_id = None
        if memory_id is not None:
            try:
                memory_id = str(uuid.UUID(memory_id))
            except ValueError:
                raise BadRequest("id must be a UUID") from None
        else:
            memory_id = str(uuid.uuid4())
        if memory_id in self.reject_ids:
            raise BadRequest("rejected by the test")
        expires_at = _optional(body, "expires_at", str)
        propagation = _optional(body, "propagation", dict)
        pin = _optional(body, "pin", bool) or False
        embedding = _optional(body, "embedding", list)
        if embedding is not None and not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in embedding
        ):
            raise BadRequest("embedding must be an array of numbers")
        with self.connection() as db:
            try:
                db.run(
                    "INSERT INTO memories (id, namespace, content, kind, source, expires_at, "
                    "propagation, pin, embedding) VALUES (CAST(:id AS uuid), :namespace, :content, "
                    ":kind, :source, CAST(:expires_at AS timestamptz), CAST(:propagation AS "
                    "jsonb), :pin, CAST(:embedding AS jsonb)) ON CONFLICT (id) DO UPDATE SET "
                    "namespace = excluded.namespace, content = excluded.content, kind = "
                    "excluded.kind, source = excluded.source, expires_at = excluded.expires_at, "
                    "propagation = excluded.propagation, pin = excluded.pin, embedding = "
                    "excluded.embedding",
                    id=memory_id,
                    namespace=namespace,
                    content=content,
                    kind=body["kind"],
                    source=body["source"],
                    expires_at=expires_at,
                    propagation=None if propagation is None else json.dumps(propagation),
                    pin=pin,
                    embedding=None if embedding is None else json.dumps(embedding),
                )
            except pg8000.native.DatabaseError as exc:
                if _connection_lost(exc):
                    raise
                # The real plugin does not auto-create namespaces: a foreign-key
                # failure surfaces as an internal error.
                return 500, {
                    "code": "internal",
                    "message": "store write failed: %s" % exc.args[0].get("M", ""),
                }
        with self.lock:
            if memory_id not in self.written:
                self.written.add(memory_id)
                self.first_writes.append(memory_id)
        return 201, {"id": memory_id, "namespace": namespace}

    def delete_memory(self, memory_id: str, body):
        namespace = body.get("requested_by_namespace") if isinstance(body, dict) else None
        if not isinstance(namespace, str):
            raise BadRequest("requested_by_namespace is required")
        _check_namespace_name(namespace)
        try:
            memory_id = str(uuid.UUID(memory_id))
        except ValueError:
            raise BadRequest("id must be a UUID") from None
        if memory_id in self.reject_ids:
            raise BadRequest("rejected by the test")
        with self.connection() as db:
            deleted = db.run(
                "DELETE FROM memories WHERE id = CAST(:id AS uuid) AND namespace = :ns "
                "RETURNING id",
                id=memory_id,
                ns=namespace,
            )
        if not deleted:
            return 404, {"code": "not_found", "message": "memory not found"}
        return 204, None

    def delete_namespace(self, name: str):
        _check_namespace_name(name)
        with self.connection() as db:
            db.run("DELETE FROM memories WHERE namespace = :name", name=name)
            deleted = db.run("DELETE FROM namespaces WHERE name = :name RETURNING name", name=name)
        if not deleted:
            return 404, {"code": "not_found", "message": "namespace not found"}
        return 204, None

    def search(self, body):
        if self.refuse_searches:
            raise BadRequest("searches are refused by the test")
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        namespaces = body.get("namespaces")
        if (
            not isinstance(namespaces, list)
            or not namespaces
            or not all(isinstance(n, str) for n in namespaces)
        ):
            raise BadRequest("namespaces must be a non-empty array of names")
        limit = body.get("limit") or 20
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= SEARCH_CAP:
            raise BadRequest("limit must be between 1 and 100")
        query = _optional(body, "query", str) or ""
        kinds = _optional(body, "kinds", list)
        where = [
            "namespace = ANY(CAST(:namespaces AS text[]))",
            "(expires_at IS NULL OR expires_at > now())",
        ]
        params = {"namespaces": namespaces, "limit": limit}
        if kinds:
            where.append("kind = ANY(CAST(:kinds AS text[]))")
            params["kinds"] = kinds
        score = "NULL"
        order = "pin DESC, created_at DESC"
        if len(query) >= 2:
            where.append("content_tsv @@ plainto_tsquery('english', :q)")
            score = "ts_rank(content_tsv, plainto_tsquery('english', :q))"
            order = "score DESC, created_at DESC"
            params["q"] = query
        elif query:
            where.append("strpos(lower(content), lower(:q)) > 0")
            order = "created_at DESC"
            params["q"] = query
        with self.connection() as db:
            rows = db.run(
                "SELECT %s, %s AS score FROM memories WHERE %s ORDER BY %s LIMIT :limit"
                % (MEMORY_COLUMNS, score, " AND ".join(where), order),
                **params,
            )
        memories = [_memory(row[:-1], score=row[-1]) for row in rows]
        return 200, {"memories": memories or None}


def stored_records(execute) -> dict:
    """Every memory in a plugin's store by id, as the plugin holds it (`execute` runs SQL there)."""
    rows = execute("SELECT %s, embedding FROM memories" % MEMORY_COLUMNS)
    return {row[0]: _memory(row[:-1]) | {"embedding": row[-1]} for row in rows}


def _failure(exc: Exception) -> str:
    """An error as a Go plugin on pgx words it: a server's error with its SQLSTATE."""
    details = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else None
    if details:
        return "%s: %s (SQLSTATE %s)" % (
            details.get("S", "ERROR"),
            details.get("M", ""),
            details.get("C", ""),
        )
    return str(exc)


def _connection_lost(exc: Exception) -> bool:
    """A database error that ends the session (class 08, 57P0x: shutdown, crash, starting up)."""
    code = exc.args[0].get("C", "") if exc.args and isinstance(exc.args[0], dict) else ""
    return code.startswith(("08", "57P"))


def _memory(row, score=None) -> dict:
    memory_id, namespace, content, kind, source, created_at, expires_at, propagation, pin = row
    memory = {
        "id": memory_id,
        "namespace": namespace,
        "content": content,
        "kind": kind,
        "source": source,
        "created_at": created_at.isoformat(),
        "pin": pin,
    }
    if expires_at is not None:
        memory["expires_at"] = expires_at.isoformat()
    if propagation is not None:
        memory["propagation"] = propagation
    if score is not None:
        memory["score"] = float(score)
    return memory


def _optional(body: dict, key: str, kind: type):
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise BadRequest("%s has the wrong type" % key)
    return value


def _reject_constant(name: str):
    raise ValueError("%s is not JSON" % name)  # strict JSON, as Go's decoder


def _check_namespace_name(name: str) -> None:
    if len(name) > 256 or not NAMESPACE_NAME.match(name):
        raise BadRequest("invalid namespace name")


def _handler_for(plugin: PluginServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real plugin
        disable_nagle_algorithm = True  # headers and body go out as two writes

        def log_message(self, *args):
            pass

        def setup(self):
            super().setup()
            with plugin.lock:
                plugin.open_connections.add(self.connection)
                plugin.connection_count += 1
                self.reset_me = (
                    bool(plugin.reset_every) and plugin.connection_count % plugin.reset_every == 0
                )

        def finish(self):
            with plugin.lock:
                plugin.open_connections.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def _fault(self):
            """An injected fault's (status, payload, headers), or None; may drop the connection."""
            if plugin.down:
                self.close_connection = True
                self.connection.shutdown(2)
                return "dropped"
            with plugin.lock:
                plugin.request_count += 1
                count = plugin.request_count
            if plugin.delay:
                time.sleep(plugin.delay)
            if plugin.fail_every and count % plugin.fail_every == 0:
                return 503, {"code": "unavailable", "message": "injected failure"}, {}
            if plugin.throttle_every and count % plugin.throttle_every == 0:
                return 429, {"code": "unavailable", "message": "slow down"}, {"Retry-After": "1"}
            return None

        def _send(self, status: int, payload, headers=()) -> None:
            if self.reset_me:  # the work is done, the answer is lost half-way
                self.reset_me = False
                self.wfile.write(b"HTTP/1.1 %d X\r\nContent-Length: 100\r\n\r\n{" % status)
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.send_response(status)
            for name, value in dict(headers).items():
                self.send_header(name, value)
            if status == 204:  # no body, and no Content-Length (as Go's net/http)
                self.end_headers()
                return
            data = json.dumps(payload).encode("utf-8")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return (
                    json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
                    if raw
                    else None
                )
            except ValueError:
                raise BadRequest("body is not valid JSON") from None

        def _dispatch(self, method: str) -> None:
            if plugin.capacity is None:
                self._serve(method)
                return
            with socket.socket(socket.AF_UNIX) as gate:  # in the queue ...
                gate.connect(plugin.capacity)
                gate.recv(1)  # ... until it is one of the K worked on; closing it frees the place
                self._serve(method)

        def _serve(self, method: str) -> None:
            if plugin.wait:
                time.sleep(plugin.wait)
            path = self.path.split("?", 1)[0]
            parts = path.split("/")
            fault = self._fault() if path != "/v1/health" or plugin.down else None
            if fault == "dropped":
                return
            if fault is not None:
                self._body()
                self._send(*fault)
                return
            try:
                if method == "GET" and path == "/v1/health":
                    route, call = "health", plugin.health
                elif method == "PUT" and len(parts) == 4 and parts[:3] == ["", "v1", "namespaces"]:
                    body = self._body()
                    route, call = (
                        "put_namespace",
                        lambda: plugin.put_namespace(unquote(parts[3]), body),
                    )
                elif (
                    method == "POST"
                    and len(parts) == 5
                    and parts[:3] == ["", "v1", "namespaces"]
                    and parts[4] == "memories"
                ):
                    body = self._body()
                    route, call = (
                        "write_memory",
                        lambda: plugin.write_memory(unquote(parts[3]), body),
                    )
                elif method == "POST" and path == "/v1/search":
                    body = self._body()
                    route, call = "search", lambda: plugin.search(body)
                elif method == "DELETE" and len(parts) == 4 and parts[:3] == ["", "v1", "memories"]:
                    body = self._body()
                    route, call = (
                        "delete_memory",
                        lambda: plugin.delete_memory(unquote(parts[3]), body),
                    )
                elif (
                    method == "DELETE" and len(parts) == 4 and parts[:3] == ["", "v1", "namespaces"]
                ):
                    self._body()
                    route, call = (
                        "delete_namespace",
                        lambda: plugin.delete_namespace(unquote(parts[3])),
                    )
                else:
                    self._body()
                    self._send(404, {"code": "not_found", "message": "no such route"})
                    return
                with plugin.lock:
                    plugin.requests[route] += 1
                status, payload = call()
            except BadRequest as exc:
                status, payload = 400, {"code": "bad_request", "message": str(exc)}
            except Exception as exc:  # noqa: BLE001 - the envelope of any failure
                status, payload = 500, {"code": "internal", "message": _failure(exc)[:200]}
            self._send(status, payload)

        def do_GET(self):
            self._dispatch("GET")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_POST(self):
            self._dispatch("POST")

        def do_DELETE(self):
            self._dispatch("DELETE")

    return Handler


class PluginProcesses:
    """The plugin served by `workers` processes behind one port (for the
    benchmark), each a threaded server with `connections` database connections.

    This process accepts the connections and hands them to the workers in
    turn, so that 8 connections are served 4 and 4, as one Go process would
    serve them. Workers sharing a port through SO_REUSEPORT get connections
    by a hash of the client's address: a split such as 6 and 2 can leave a
    core idle, and the bench's rounds at 2 connections varied by 30 %.
    """

    def __init__(
        self,
        connect_kwargs: dict,
        workers: int = 2,
        connections: int = 4,
        wait: float = 0.0,
        capacity: int = 0,
    ):
        self.store = PluginServer(connect_kwargs, connections=1)  # schema, count, reset
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        env = {**os.environ, "PLUGIN_STORE": json.dumps(connect_kwargs)}
        self.gate = CapacityGate(capacity) if capacity else None
        self.channels, self.processes = [], []
        for _ in range(workers):
            ours, theirs = socket.socketpair()
            self.channels.append(ours)
            shape = [str(wait), self.gate.path if self.gate else "-"]
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, __file__, str(connections), str(theirs.fileno()), *shape],
                    env=env,
                    stdout=subprocess.PIPE,
                    pass_fds=[theirs.fileno()],
                )
            )
            theirs.close()
        for process in self.processes:  # each says so once it serves
            if process.stdout.readline() != b"serving\n":
                self.stop()
                raise RuntimeError("a plugin process did not start")
        threading.Thread(target=self._hand_out, daemon=True).start()

    def _hand_out(self) -> None:
        for channel in itertools.cycle(self.channels):
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed by stop()
                return
            with connection:
                socket.send_fds(channel, [b"c"], [connection.fileno()])

    def count(self) -> int:
        return self.store.count()

    def reset(self) -> None:
        self.store.reset()

    def stop(self) -> None:
        self.listener.close()
        for process in self.processes:
            process.terminate()
            process.wait()
        for channel in self.channels:
            channel.close()
        self.store.stop()


class CapacityGate:
    """At most `capacity` requests worked on at once, in all the plugin's processes; the others
    wait in the order they came.  A request connects to the gate's Unix socket, is worked on once
    the gate writes a byte back, and frees its place by closing the connection."""

    def __init__(self, capacity: int):
        import tempfile

        self.capacity = capacity
        self.path = os.path.join(tempfile.mkdtemp(prefix="plugin-gate-"), "gate")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1024)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import collections
        import select

        waiting, working = collections.deque(), set()
        while True:
            readable, _, _ = select.select([self.listener, *working], [], [])
            for sock in readable:
                if sock is self.listener:
                    waiting.append(self.listener.accept()[0])
                elif not sock.recv(1):  # closed: its place is free
                    working.discard(sock)
                    sock.close()
            while waiting and len(working) < self.capacity:
                sock = waiting.popleft()
                sock.send(b"g")
                working.add(sock)


def serve_handed_connections(connections: int, channel_fd: int, wait: float, capacity) -> None:
    """A worker of PluginProcesses: serve each connection handed over the channel
    (the server's own listening socket stays unused); end when the channel closes,
    as it does when the process that started this one ends."""
    server = PluginServer(json.loads(os.environ["PLUGIN_STORE"]), connections, wait, capacity)
    channel = socket.socket(fileno=channel_fd)
    print("serving", flush=True)
    while True:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
        if not fds:
            return
        connection = socket.socket(fileno=fds[0])
        try:
            address = connection.getpeername()
        except OSError:  # the client reset the connection before it was handed over
            connection.close()
            continue
        server.httpd.process_request(connection, address)


if __name__ == "__main__":
    serve_handed_connections(
        int(sys.argv[1]),
        int(sys.argv[2]),
        float(sys.argv[3]),
        None if sys.argv[4] == "-" else sys.argv[4],
    )


# --- the Go stand-in (plugin.go)
# -------------------------------------------------------------------

GO_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.go")
GO_PATHS = ("/usr/share/gocode",)  # Debian's golang-github-lib-pq-dev puts github.com/lib/pq here


def build_go_plugin(directory: str) -> str:
    """plugin.go built into `directory`, from packages alone: Debian's golang-go and
    golang-github-lib-pq-dev (.ci/run installs them)."""
    go = shutil.which("go") or next(iter(sorted(glob.glob("/usr/lib/go-*/bin/go"))[-1:]), None)
    gopath = next(
        (path for path in GO_PATHS if os.path.isdir(path + "/src/github.com/lib/pq")), None
    )
    if go is None or gopath is None:
        raise RuntimeError(
            "the Go stand-in needs Go and lib/pq: apt-get install golang-go "
            "golang-github-lib-pq-dev (.ci/run does)"
        )
    cache = os.environ.get("GOCACHE") or os.path.join(
        tempfile.gettempdir(), "memory-backfill-go-cache"
    )
    binary = os.path.join(directory, "memory-plugin")
    built = subprocess.run(
        [go, "build", "-o", binary, GO_SOURCE],
        capture_output=True,
        text=True,
        env={**os.environ, "GO111MODULE": "off", "GOPATH": gopath, "GOCACHE": cache, "GOFLAGS": ""},
    )
    if built.returncode:
        raise RuntimeError("go build failed: " + built.stderr[-2000:])
    return binary


class GoPlugin:
    """The Go stand-in serving a database of its own: `wait` seconds each write holds its database
    connection before it commits, `capacity` requests worked on at once (0: no limit), `sleep`
    seconds each request worked on takes.  Records, counts and resets read the store directly."""

    def __init__(
        self,
        binary: str,
        connect_kwargs: dict,
        wait: float = 0.0,
        capacity: int = 0,
        sleep: float = 0.0,
        pool: int = 25,
    ):
        from urllib.parse import quote

        self.connect_kwargs = connect_kwargs
        dsn = "postgres://%s:%s@%s:%d/%s?sslmode=disable" % (
            quote(connect_kwargs["user"], safe=""),
            quote(connect_kwargs["password"], safe=""),
            connect_kwargs["host"],
            connect_kwargs["port"],
            connect_kwargs["database"],
        )
        self.process = subprocess.Popen(
            [
                binary,
                "-dsn",
                dsn,
                "-pool",
                str(pool),
                "-wait",
                "%gs" % wait,
                "-capacity",
                str(capacity),
                "-sleep",
                "%gs" % sleep,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.process.kill()
            raise RuntimeError(
                "the Go stand-in did not start: %s %s" % (line, self.process.stderr.read())
            )
        self.url = "http://" + line.split()[-1]
        self.store = pg8000.native.Connection(**connect_kwargs)

    @property
    def pid(self) -> int:
        return self.process.pid

    def execute(self, sql: str, **params):
        return self.store.run(sql, **params)

    def records(self) -> dict:
        return stored_records(self.execute)

    def count(self) -> int:
        return self.execute("SELECT count(*) FROM memories")[0][0]

    def reset(self) -> None:
        self.execute("TRUNCATE memories, namespaces")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.store.close()
