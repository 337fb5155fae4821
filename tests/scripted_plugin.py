"""A plugin on raw sockets that answers each write exactly as a test's script says.

The write stream's faults are about bytes on a connection (a response cut
anywhere, a reset after k answers, garbage, an answer that never comes), which
an HTTP server library would not produce; this server writes them itself.
Health checks and namespace upserts get plain, correct answers.  Writes are
stored by id, as the real plugin stores them (an id that exists is replaced).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Write:
    """One POST of a memory, as the script sees it."""

    number: int  # of all writes this server received, from 0
    connection: int  # which connection, from 0
    index: int  # which request on that connection, from 0
    id: str
    attempt: int  # how many times this id arrived before


@dataclass(frozen=True)
class Reply:
    status: int = 201
    headers: tuple = ()
    store: bool = True  # a 2xx reply stores the write
    chunked: bool = False  # the body in chunks, with a chunk extension and a trailer
    close: bool = False  # "Connection: close" on this reply, then the connection ends
    reset: bool = False  # no reply: the connection is reset (RST)
    hang: bool = False  # no reply, ever (the connection stays open)
    raw: Optional[bytes] = None  # these bytes instead of a reply, then the connection ends
    byte_by_byte: bool = False  # each byte in its own segment, a moment apart
    interim_forever: bool = False  # "100 Continue" every 50 ms, never a final answer
    drip: bool = (
        False  # the head, then the body a byte every 200 ms (slower than any --timeout here)
    )


class ScriptedPlugin:
    def __init__(
        self,
        script: Callable[[Write], Reply] = lambda write: Reply(),
        http10: bool = False,
        close_every: bool = False,
        ignore_ids: bool = False,
    ):
        self.script = script
        self.ignore_ids = ignore_ids  # an old plugin: each write stored under a new random id
        self.http10 = http10  # answer as an HTTP/1.0 server: one request per connection
        self.close_every = close_every  # HTTP/1.1, but "Connection: close" on every reply
        self.records: dict = {}  # id -> the memory as written
        self.arrivals: Counter = Counter()  # id -> writes received
        self.acks: Counter = Counter()  # id -> 2xx replies sent
        self.writes = 0
        self.log: list = []  # every Write, in the order they arrived
        self.connections = 0
        self.busy = 0  # connections working on a request now (one at a time each, as Go's net/http)
        self.busy_most = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.violations: list = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()

    def watch_checkpoint(self, path, order: list) -> None:
        """Check, while the run goes on, that the checkpoint never passes a row not acknowledged."""

        def watch():
            while not self.stopped.is_set():
                try:
                    with open(path) as fh:
                        position = json.load(fh)["position"]
                except (OSError, ValueError):
                    position = None
                if position is not None:
                    with self.lock:
                        unacked = [
                            i for i in order[: order.index(position["id"]) + 1] if not self.acks[i]
                        ]
                    if unacked:
                        self.violations.append(unacked)
                time.sleep(0.002)

        threading.Thread(target=watch, daemon=True).start()

    # --- serving --------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                number = self.connections
                self.connections += 1
            threading.Thread(target=self._serve, args=(connection, number), daemon=True).start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = connection.makefile("rb")
        try:
            for index in range(1 << 30):
                request = _read_request(reader)
                if request is None:
                    return
                with self.lock:
                    self.busy += 1
                    self.busy_most = max(self.busy_most, self.busy)
                try:
                    if not self._answer(connection, number, index, *request):
                        return
                finally:
                    with self.lock:
                        self.busy -= 1
        except OSError:
            return
        finally:
            reader.close()
            connection.close()

    def _answer(
        self, connection, number: int, index: int, method: str, path: str, body: bytes
    ) -> bool:
        """Answer one request; False when the connection is to end."""
        memory_id = None
        if method == "POST" and path.endswith("/memories"):
            memory_id = json.loads(body)["id"]
            with self.lock:
                write = Write(self.writes, number, index, memory_id, self.arrivals[memory_id])
                self.writes += 1
                self.log.append(write)
                self.arrivals[memory_id] += 1
            reply = self.script(write)
            stored = str(uuid.uuid4()) if self.ignore_ids else memory_id
            payload = {"id": stored, "namespace": path.split("/")[3]}
        elif method == "GET" and path == "/v1/health":
            reply, payload = Reply(200), {"status": "ok", "version": "scripted", "capabilities": []}
        else:
            reply, payload = Reply(200), {"name": path.split("/")[-1], "kind": "workspace"}
        if reply.hang:
            self.stopped.wait()
            return False
        if reply.interim_forever or reply.drip:
            data = self._render(reply, json.dumps(payload).encode(), False)
            start = data.index(b"\r\n\r\n") + 4
            if reply.drip:
                connection.sendall(data[:start])
            while not self.stopped.wait(0.2 if reply.drip else 0.05):
                connection.sendall(
                    data[start : start + 1] if reply.drip else b"HTTP/1.1 100 Continue\r\n\r\n"
                )
                start += 1
            return False
        if reply.reset:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if reply.raw is not None:
            connection.sendall(reply.raw)
            return False
        if 200 <= reply.status < 300 and memory_id is not None:
            with self.lock:
                if reply.store:
                    self.records[memory_id] = json.loads(body)
                self.acks[memory_id] += 1
        if reply.status >= 400:
            payload = {"code": "bad_request", "message": "scripted %d" % reply.status}
        closing = reply.close or self.close_every or self.http10
        data = self._render(reply, json.dumps(payload).encode(), closing)
        if reply.byte_by_byte:
            for n in range(len(data)):
                connection.sendall(data[n : n + 1])
                time.sleep(0.001)
        else:
            connection.sendall(data)
        if closing:  # as Go does: stop sending, let the client close first
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(5)
            while connection.recv(65536):
                pass
        return not closing

    def _render(self, reply: Reply, body: bytes, closing: bool) -> bytes:
        version = b"HTTP/1.0" if self.http10 else b"HTTP/1.1"
        head = [b"%s %d Scripted" % (version, reply.status), b"Content-Type: application/json"]
        head += [b"%s: %s" % (name.encode(), value.encode()) for name, value in reply.headers]
        if closing and not self.http10:
            head.append(b"Connection: close")
        if reply.chunked:
            head.append(b"Transfer-Encoding: chunked")
            middle = len(body) // 2
            body = b"%x;part=one\r\n%s\r\n%X\r\n%s\r\n0\r\nX-Trailer: done\r\n\r\n" % (
                middle,
                body[:middle],
                len(body) - middle,
                body[middle:],
            )
        elif not self.http10:  # an HTTP/1.0 body ends when the connection closes
            head.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(head) + b"\r\n\r\n" + body


def _read_request(reader) -> Optional[tuple]:
    """(method, path, body) of the next request, or None at the end of the connection."""
    line = reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    length = 0
    while True:
        field = reader.readline()
        if field in (b"\r\n", b""):
            break
        name, _, value = field.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return method, path, reader.read(length)
