"""-apply's write stream: the response parser at every byte boundary, and the
writer against a scripted server that answers in every way HTTP/1.x allows
(and some it does not).  In every scenario each row ends up in the plugin
exactly once, and the checkpoint never passes a row that was not acknowledged.
"""

import json
import re
import time

import pytest
from conftest import assert_each_row_once, said
from scripted_plugin import Reply, ScriptedPlugin

import memory_backfill as mb

# --- the response parser (pure) --------------------------------------------------

# A pipelined stream with every framing a response may have, and what each is.
RESPONSES = [
    (
        b"HTTP/1.1 100 Continue\r\n\r\n"  # interim: skipped
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
        b'{"id":"a"}\n',
        (201, b'{"id":"a"}\n', True),
    ),
    (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\ncontent-length: 0\r\n\r\n",
        (503, b"", True),
    ),
    (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: "
        b"chunked\r\n\r\n4;part=one\r\n{\"id\r\nA\r\n\":\"b\"}\n...\r\n0\r\nX-Trailer: t\r\n\r\n",
        (201, b'{"id":"b"}\n...', True),
    ),
    (
        b"HTTP/1.1 400 Bad Request\r\nX-Folded: one\r\n two\r\nContent-Length: 2, 2\r\n\r\n{}",
        (400, b"{}", True),
    ),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", (204, b"", True)),
    (b"HTTP/1.2 201 Created\r\nContent-Length: 0000000000000000002\r\n\r\n{}", (201, b"{}", True)),
    (
        b"HTTP/1.1 599 Odd\r\nTransfer-Encoding: "
        b"chunked\r\n\r\n00000000000000000001\r\nx\r\n0\r\nX-Folded: a\r\n\tb\r\n\r\n",
        (599, b"x", True),
    ),
    # final, never interim
    (
        b"HTTP/1.1 099 Oops\r\nContent-Length: 3\r\n\r\nnot",
        (99, b"not", True),
    ),
    (
        # until close
        b"HTTP/1.0 201 Created\r\nContent-Type: application/json\r\n\r\n{\"id\":\"c\"}",
        (201, b'{"id":"c"}', False),
    ),
]
STREAM = b"".join(data for data, _ in RESPONSES)
EXPECTED = [expected for _, expected in RESPONSES]


def parse(pieces, found=None):
    """(status, body, persistent) of each response the pieces hold, in `found` as they come."""
    parser, found = mb.ResponseParser(), [] if found is None else found
    for piece in pieces:
        parser.feed(piece)
        response = parser.next_response()
        while response is not None:
            found.append((response.head.status, response.body, response.head.persistent))
            response = parser.next_response()
    final = parser.end_of_stream()
    if final is not None:
        found.append((final.head.status, final.body, final.head.persistent))
    return found


def test_a_pipelined_stream_parses_the_same_split_at_every_byte_boundary():
    assert parse([STREAM]) == EXPECTED
    for cut in range(1, len(STREAM)):
        assert parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
    assert parse([STREAM[n : n + 1] for n in range(len(STREAM))]) == EXPECTED


def test_a_response_that_closes_the_connection_ends_the_reading_whatever_follows():
    closing = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok"
    for after in (b"\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"garbage\x00"):
        data = closing + after
        assert parse([data]) == [(200, b"ok", False)]
        for cut in range(1, len(data)):
            assert parse([data[:cut], data[cut:]]) == [(200, b"ok", False)], cut


def test_a_status_below_100_is_a_final_answer_never_an_interim_one():
    """The fuzzer's repro: 099 skipped as interim made its body read as the next response."""
    data = (
        b"HTTP/1.1 099 Oops\r\nContent-Length: 38\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: "
        b"0\r\n\r\n"
    )
    assert parse([data]) == [(99, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True)]
    rule = mb.RetryRule(3)
    assert all(rule.retryable(status) for status in (0, 99, 600, 999, 429, 502, 503, 504))
    assert not any(rule.retryable(status) for status in (100, 200, 201, 400, 404, 500, 599))


def test_header_fields_are_read_case_insensitively_and_repeated_ones_joined():
    parser = mb.ResponseParser()
    parser.feed(
        b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\n"
    )
    head = parser.next_response().head
    assert (head.status, head.reason) == (503, "Busy")
    assert head.field(b"retry-after") == b"2" and head.field(b"x-a") == b"1, 2"
    assert head.field(b"date") is None
    parser.feed(b"HTTP/1.1 429 Slow Down\r\nRetry-After:\r\n  7\r\nContent-Length: 0\r\n\r\n")
    assert parser.next_response().head.field(b"retry-after") == b"7"  # an obs-fold, unfolded


@pytest.mark.parametrize(
    "data, complaint",
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "where an HTTP/1.x status line should be"),
        (b"HTTP/2 200\r\n\r\n", "where an HTTP/1.x status line should be"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "where an HTTP/1.x status line should be"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}", "malformed header field line"),
        (b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 2\r\n\r\n{}", "malformed header field line"),
        (
            b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
            "malformed header field line",
        ),
        (b"HTTP/1.1 200 OK\r\n folded-first: x\r\n\r\n", "malformed header field line"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding with",
        ),
        (
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding with HTTP/1.0",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "transfer coding other than chunked",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "Content-Length over"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "Switching Protocols"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            "chunk longer",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
            "malformed trailer",
        ),
        (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * (mb.MAX_RESPONSE_HEAD + 10), "head longer than"),
    ],
)
def test_what_is_not_http_fails_loudly_however_it_arrives(data, complaint):
    for pieces in ([data], [data[n : n + 1] for n in range(min(len(data), 300))] + [data[300:]]):
        with pytest.raises(mb.ProtocolError, match=complaint):
            parse(pieces)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 201 Crea",
        b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\n{",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ],
)
def test_a_response_cut_by_the_close_is_a_lost_connection(data):
    with pytest.raises(mb.ConnectionLost):
        parse([data])


@pytest.mark.parametrize(
    "data, complaint",
    [
        (
            b"HTTP/1.1 200 OK\r\nX: " + b"y" * (mb.MAX_RESPONSE_HEAD - 23) + b"\r\n\r\n",
            "head longer than 65536",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;"
            + b"e" * mb.MAX_CHUNK_LINE
            + b"\r\n",
            "chunk size line longer than 4096",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: "
            + b"t" * mb.MAX_TRAILERS
            + b"\r\n\r\n",
            "trailer section longer than 65536",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"80000\r\n"
            + b"b" * 0x80000
            + b"\r\n"
            + b"80001\r\n",
            "a body longer than 1048576",
        ),
        (
            b"HTTP/1.0 200 OK\r\n\r\n" + b"u" * (mb.MAX_RESPONSE_BODY + 1),
            "a body longer than 1048576",
        ),
    ],
    ids=["head", "chunk line", "trailers", "chunked body", "body until close"],
)
def test_each_limit_holds_the_same_however_the_bytes_are_split_and_says_which(data, complaint):
    at_limit = {
        "head longer": (
            b"HTTP/1.1 204 OK\r\nX: "
            + b"y" * (mb.MAX_RESPONSE_HEAD - 24)
            + b"\r\n\r\n"
            + b"HTTP/1.1 204 No\r\n\r\n"
        )
    }
    for size in (1, 7, 1024, 65536, len(data)):
        with pytest.raises(mb.ProtocolError, match=complaint):
            parse(
                [data[n : n + size] for n in range(0, len(data), size)]
                + [b"HTTP/1.1 200 OK\r\n\r\n"]
            )
    for name, ok in at_limit.items():  # one byte shorter: accepted, however split
        if name in complaint:
            for size in (1, 1000, len(ok)):
                assert [
                    status
                    for status, _, _ in parse([ok[n : n + size] for n in range(0, len(ok), size)])
                ] == [204, 204]


def scanned(data: bytes, size: int) -> int:
    parser = mb.ResponseParser()
    for n in range(0, len(data), size):
        parser.feed(data[n : n + size])
        while parser.next_response() is not None:
            pass
    assert parser.closed or parser.end_of_stream() is None
    return parser.scanned


def test_the_parsers_work_is_linear_in_the_bytes_fed_however_they_are_split():
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"1\r\nx\r\n" * (1 << 20)
        + b"0\r\nT: 1\r\n\r\n"
    )
    assert scanned(chunked, 1024) <= 2 * len(chunked)  # 1 MiB in 1-byte chunks, fed 1 KiB at a time
    head = b"HTTP/1.1 204 No Content\r\nX: " + b"h" * (64 * 1024 - 40) + b"\r\n\r\n"
    assert scanned(head, 1) <= 4 * len(head)  # a 64 KiB head fed a byte at a time


def test_leading_zeros_and_later_minor_versions_are_read_as_http_1_1():
    data = (
        b"HTTP/1.9 201 Created\r\nContent-Length: " + b"0" * 40 + b"2\r\n\r\n{}"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"0" * 30
        + b"3\r\nabc\r\n0\r\n\r\n"
    )
    assert parse([data]) == [(201, b"{}", True), (200, b"abc", True)]


# --- the parser against h11 (the oracle) ------------------------------------------

h11 = pytest.importorskip("h11")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(
    lambda text: text.strip().encode()
)
NAMES = st.sampled_from([b"X-A", b"Server", b"Date", b"x-b", b"Content-Type", b"Cache-Control"])
# Where the two may answer differently, and the rule that makes ours the stricter (or,
# for a status outside 100-599, the one RFC 9110 asks for).
RULES = {
    "te_and_cl": "RFC 9112 §6.3: Transfer-Encoding with Content-Length ought to be handled as an "
    "error",
    "te_on_1.0": "RFC 9112 §6.1: no Transfer-Encoding in an HTTP/1.0 response",
    "control": "RFC 9110 §5.5: a field value holds no control character",
    "bare_lf": "RFC 9112 §2.2: only CRLF ends a line (a bare LF MAY be accepted; we do not)",
    "status_below_100": "RFC 9110 §15: a status outside 100-599 is a final answer, a server error",
}
STRICTER = {"te_and_cl", "te_on_1.0", "control", "bare_lf"}


@st.composite
def responses(draw, last: bool):
    """One response as (bytes, the rules it touches, whether it ends the connection)."""
    rules = set()
    version = draw(st.sampled_from([b"1.1"] * 6 + [b"1.0", b"1.2", b"1.9"]))
    status = draw(
        st.sampled_from([200, 201, 204, 304, 400, 404, 429, 500, 503, 599, 600, 999, 99, 0, 42])
    )
    if status < 100:
        rules.add("status_below_100")
    reason = draw(st.one_of(st.none(), TEXT, st.just(b"caf\xe9")))
    head = [b"HTTP/%s %03d%s" % (version, status, b"" if reason is None else b" " + reason)]
    interim = b"".join(
        draw(
            st.lists(
                st.sampled_from(
                    [
                        b"HTTP/1.1 100 Continue\r\n\r\n",
                        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                    ]
                ),
                max_size=2,
            )
        )
    )
    for _ in range(draw(st.integers(0, 3))):
        value = draw(TEXT)
        if draw(st.integers(0, 9)) == 0:
            value += b"\x01"
            rules.add("control")
        head.append(draw(NAMES) + b":" + draw(st.sampled_from([b"", b" ", b"\t"])) + value)
        if draw(st.integers(0, 5)) == 0:
            head.append(b" \t" + draw(TEXT) + b"x")  # obs-fold
    close = draw(st.integers(0, 5)) == 0
    if close:
        head.append(
            b"Connection: " + draw(st.sampled_from([b"close", b"Close", b"keep-alive, close"]))
        )
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "chunked"] + (["close"] if last else [])))
    no_body = status in (204, 304)
    if framing == "length" or (framing == "chunked" and no_body):
        value = b"0" * draw(st.integers(0, 3)) + b"%d" % len(body)
        head.append(b"Content-Length: " + value + (b", " + value if draw(st.booleans()) else b""))
        data = b"" if no_body else body
    elif framing == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        if draw(st.integers(0, 9)) == 0:
            head.append(b"Content-Length: %d" % len(body))
            rules.add("te_and_cl")
        if version == b"1.0":
            rules.add("te_on_1.0")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        parts = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)], strict=True) if b > a]
        data = b"".join(
            b"%s%x%s\r\n%s\r\n"
            % (
                b"0" * draw(st.integers(0, 2)),
                len(part),
                draw(st.sampled_from([b"", b";a=b", b";x"])),
                part,
            )
            for part in parts
        )
        data += (
            b"0\r\n"
            + b"".join(
                draw(NAMES) + b": " + draw(TEXT) + b"\r\n" for _ in range(draw(st.integers(0, 2)))
            )
            + b"\r\n"
        )
    else:  # until close
        data = b"" if no_body else body
        close = True
    text = b"\r\n".join(head) + b"\r\n\r\n"
    if draw(st.integers(0, 19)) == 0:
        text = text.replace(b"\r\n", b"\n", 1)
        rules.add("bare_lf")
    return interim + text + data, rules, close or version == b"1.0" or framing == "close"


@st.composite
def streams(draw):
    count = draw(st.integers(1, 4))
    made = [draw(responses(last=n == count - 1)) for n in range(count)]
    data = b"".join(response for response, _, _ in made)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)], strict=True)]
    return data, pieces, [rules for _, rules, _ in made]


def ours(pieces):
    """(status, body, persistent) of each response, and how the stream ended."""
    found = []
    try:
        return parse(pieces, found), "clean"
    except mb.ProtocolError:
        return found, "error"
    except mb.ConnectionLost:
        return found, "lost"


def theirs(pieces):
    """The same, from h11 as a client that sent one POST per response."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=mb.MAX_RESPONSE_HEAD)

    def ask():
        connection.send(
            h11.Request(method="POST", target="/", headers=[("Host", "p"), ("Content-Length", "0")])
        )
        connection.send(h11.EndOfMessage())

    ask()
    # waiting: in the middle of a response
    found, head, body, waiting = (
        [],
        None,
        bytearray(),
        False,
    )
    for piece in [piece for piece in pieces if piece] + [b""]:  # b"": the end of the stream
        if piece == b"" and not waiting and not connection.trailing_data[0]:
            return found, "clean"  # (h11 would fault the close of a connection we asked more of)
        try:
            connection.receive_data(piece)
            while True:
                event = connection.next_event()
                if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                    break
                waiting = True
                if isinstance(event, h11.Response):
                    head, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    # not ended by the close
                    persistent = connection.their_state is h11.DONE and piece != b""
                    found.append((head.status_code, bytes(body), persistent))
                    waiting = False
                    if not persistent:
                        return found, "clean"
                    connection.start_next_cycle()
                    ask()
                else:  # an interim response: a final one must follow
                    waiting = True
        except h11.RemoteProtocolError:
            return found, "lost" if piece == b"" else "error"
    return found, "lost" if waiting or connection.trailing_data[0] else "clean"


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(streams())
def test_the_parser_agrees_with_h11_or_is_stricter_by_a_named_rule(stream):
    data, pieces, rules = stream
    mine, h11s = ours(pieces), theirs(pieces)
    assert ours([data]) == mine  # the split never changes our answer
    if mine == h11s:
        return
    first = next((n for n, touched in enumerate(rules) if touched), None)
    assert first is not None, "differs from h11 with no rule to name: %r %r %r" % (data, mine, h11s)
    named = sorted(rules[first])
    assert all(rule in RULES for rule in named)
    assert mine[0][:first] == h11s[0][:first], named
    if set(named) & STRICTER:  # ours refuses what h11 lets through
        assert len(mine[0]) == first and mine[1] in ("error", "lost"), (named, mine, h11s)
    else:  # a status below 100: a final answer (h11 refuses it)
        assert mine[0][first][0] < 100 and (len(h11s[0]), h11s[1]) == (first, "error"), (mine, h11s)


# --- the limiter and the retry rule (pure) -----------------------------------------


def drive(limit, rate_of, seconds=3.0, start=0.0, events=()):
    """Feed the limiter the answers of a plugin that serves rate_of(c) answers a second at c
    connections, each answered c / rate_of(c) after it was sent (Little's law); `events`: (time,
    call) to make on the way.  Returns the connections in use, sampled every 10 ms."""
    now, sampled, pending = start, [], sorted(events, key=lambda event: event[0])
    while now < start + seconds:
        while pending and pending[0][0] <= now:
            pending.pop(0)[1](now)
        c = limit.connections
        rate = rate_of(c)
        step = 1.0 / rate
        for _ in range(max(1, int(0.01 / step))):  # about 10 ms of answers
            now += step
            limit.answered(now, now - c / rate)
        sampled.append(c)
    return sampled


def share(sampled, level):
    return sampled.count(level) / len(sampled)


# A write waits on its database: twice the connections, twice the rate.
WAITING = lambda c: 50.0 * c  # noqa: E731
KNEE_AT_8 = {1: 1000, 2: 2000, 4: 3600, 8: 4600, 16: 4900, 32: 4700, 64: 4500}.get  # CPU bound
FOUR_AT_ONCE = lambda c: 200.0 * min(c, 4)  # noqa: E731 - at its capacity, 4 worked on at once


def test_the_limiter_doubles_while_doubling_pays_up_to_the_ceiling():
    limit = mb.ConcurrencyLimit(64)
    sampled = drive(limit, WAITING, seconds=6)
    climb = [level for n, level in enumerate(sampled) if n == 0 or level != sampled[n - 1]][:4]
    assert climb == [8, 16, 32, 64] and sampled[-1] == 64 and share(sampled[-300:], 64) > 0.75
    assert max(drive(mb.ConcurrencyLimit(16), WAITING)) == 16


def test_the_limiter_holds_the_knee_the_fewest_that_serve_about_the_most():
    sampled = drive(mb.ConcurrencyLimit(64), KNEE_AT_8, seconds=30)
    # 16 gives 6.5 % more: not worth twice
    assert share(sampled[100:], 8) > 0.9 and max(sampled) <= 16
    assert share(drive(mb.ConcurrencyLimit(64), FOUR_AT_ONCE, seconds=30)[300:], 4) > 0.9


def test_the_limiter_probes_now_and_then_and_comes_back():
    sampled = drive(mb.ConcurrencyLimit(64), KNEE_AT_8, seconds=60)
    tries = [
        level for n, level in enumerate(sampled) if n and level != sampled[n - 1] and level != 8
    ]
    assert set(tries) >= {4, 16} and 4 <= len(tries) <= 30 and share(sampled[-1000:], 8) > 0.9


def test_a_plugin_serving_more_later_is_climbed_to_and_one_serving_as_much_with_fewer_is_left():
    curve = {"now": FOUR_AT_ONCE}
    limit = mb.ConcurrencyLimit(64)
    drive(limit, lambda c: curve["now"](c), seconds=5)
    assert limit.connections == 4
    curve["now"] = WAITING  # the live tenant went home
    assert drive(limit, lambda c: curve["now"](c), seconds=30, start=5)[-1] == 64
    curve["now"] = FOUR_AT_ONCE  # and came back: as much with fewer
    assert drive(limit, lambda c: curve["now"](c), seconds=60, start=35)[-1] == 4


@pytest.mark.parametrize(
    "second_window, level_after",
    [(1350.0, 32), (1060.0, 8)],  # the mean pays (1200 >= 1100): climb on; it does not: go back
)
def test_a_doubling_is_given_up_only_after_two_windows(second_window, level_after):
    limit = mb.ConcurrencyLimit(64)
    limit.decide(1000.0, 1.0)  # 8 connections
    assert limit.connections == 16
    limit.decide(1040.0, 1.3)  # one window says 16 does not pay: measured again
    assert limit.connections == 16
    limit.decide(second_window, 1.6)
    assert limit.connections == level_after


@pytest.mark.parametrize(
    "second_window, level_after",
    [(1180.0, 8), (900.0, 32)],  # the mean serves as much: keep fewer; it does not: try more
)
def test_fewer_connections_are_kept_only_after_two_windows(second_window, level_after):
    limit = mb.ConcurrencyLimit(64)
    for now, rate in [(1.0, 1000.0), (1.3, 1200.0), (1.6, 1210.0), (1.9, 1190.0)]:
        limit.decide(rate, now)  # 8, 16, 32 (no better, twice): held at 16
    assert limit.connections == 16
    limit.decide(1200.0, 1.9 + mb.PROBE_FIRST_SECONDS)  # held long enough: probe half
    assert limit.connections == 8
    limit.decide(1200.0, 4.3)  # one window says 8 serves as much: measured again
    assert limit.connections == 8
    limit.decide(second_window, 4.6)
    assert limit.connections == level_after


def test_overload_and_a_stall_halve_at_once_never_below_one_nor_above_the_ceiling():
    limit = mb.ConcurrencyLimit(64)
    drive(limit, WAITING, seconds=6)
    assert limit.connections == 64
    limit.overloaded(10.0)
    assert limit.connections == 32
    limit.overloaded(10.01)  # the same overload, answered on several requests: once per window
    assert limit.connections == 32
    limit.stalled(10.02)
    assert limit.connections == 16
    assert drive(limit, WAITING, seconds=30, start=10.02)[-1] == 64  # and climbs back
    one = mb.ConcurrencyLimit(1)
    one.stalled(0.0)
    one.overloaded(1.0)
    assert one.connections == 1 and set(drive(one, WAITING)) == {1}


def test_the_retry_rule_backs_off_doubling_and_follows_retry_after():
    rule = mb.RetryRule(4)
    assert rule.delay(1) == 0.0
    assert (
        0.4 <= rule.delay(2) <= 0.5 and 0.8 <= rule.delay(3) <= 0.9 and 1.6 <= rule.delay(4) <= 1.7
    )
    assert rule.delay(5) is None and rule.delay(5, b"1") is None
    assert rule.delay(2, b"3") == 3.0 and rule.delay(2, b" 7 ") == 7.0
    assert rule.delay(2, b"86400") == mb.RETRY_AFTER_MAX
    assert rule.delay(2, b"Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    assert 0.4 <= rule.delay(2, b"soon") <= 0.5  # not a Retry-After: the backoff
    assert mb.RetryRule(0).delay(1) is None


# --- the writer against a scripted server -----------------------------------------


@pytest.fixture
def rows(legacy, root):
    """40 rows, and their ids in the read order."""
    legacy.many(root, 40)
    return legacy.ids_in_read_order()


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
    status = mb.main(
        [
            "-apply",
            "-q",
            "--database-url",
            legacy.url,
            "--plugin-url",
            server.url,
            "--checkpoint",
            str(checkpoint),
            *options,
        ]
    )
    time.sleep(0.01)  # one more look at the final checkpoint
    assert server.violations == []
    return status


def test_responses_arriving_byte_by_byte_and_chunked(scripted, legacy, rows, tmp_path):
    server = scripted(lambda w: Reply(byte_by_byte=w.number < 12, chunked=w.number % 3 == 0))
    assert apply(server, legacy, rows, tmp_path) == 0
    assert_each_row_once(server.records, legacy, rows)
    assert max(server.acks.values()) == 1 and sum(server.arrivals.values()) == 40  # none sent twice


def test_connection_close_after_k_of_n_pipelined_requests(scripted, legacy, rows, tmp_path):
    # every connection closes after 3 answers
    server = scripted(lambda w: Reply(close=w.index == 2))
    # an orderly close is no failure
    assert apply(server, legacy, rows, tmp_path, "--retries", "0") == 0
    assert_each_row_once(server.records, legacy, rows)
    assert max(server.acks.values()) == 1 and server.connections >= 1 + 40 // 3


def test_connection_reset_after_k_responses(scripted, legacy, rows, tmp_path):
    server = scripted(lambda w: Reply(reset=w.index == 3 and w.attempt == 0))
    assert apply(server, legacy, rows, tmp_path) == 0
    assert_each_row_once(server.records, legacy, rows)
    assert server.connections > 3


def test_a_reset_counts_as_a_retry_of_every_unanswered_write(
    scripted, legacy, rows, tmp_path, capsys
):
    server = scripted(lambda w: Reply(reset=w.index == 3 and w.attempt == 0))
    assert apply(server, legacy, rows, tmp_path, "--retries", "0") == 3
    err = said(capsys.readouterr().err)
    assert err.startswith("memory-backfill: Cannot reach the memory plugin at %s" % server.url)
    assert err.count("\n") == 1
    assert len(server.records) < 40


def test_a_503_with_retry_after_in_the_middle_of_a_pipeline(scripted, legacy, rows, tmp_path):
    server = scripted(
        lambda w: (
            Reply(503, headers=(("Retry-After", "1"),))
            if w.id == rows[10] and w.attempt == 0
            else Reply()
        )
    )
    started = time.monotonic()
    assert apply(server, legacy, rows, tmp_path) == 0
    assert time.monotonic() - started >= 1.0
    assert_each_row_once(server.records, legacy, rows)
    assert server.arrivals[rows[10]] == 2 and server.arrivals[rows[11]] == 1


def test_a_400_for_one_row_fails_that_row_only(scripted, legacy, rows, tmp_path, capsys):
    server = scripted(lambda w: Reply(400) if w.id == rows[10] else Reply())
    assert apply(server, legacy, rows, tmp_path) == 1
    out = capsys.readouterr().out
    assert "  %s: HTTP 400: scripted 400\n" % rows[10] in out
    assert out.rstrip().endswith("copied=39 skipped=0 errors=1")
    assert sorted(server.records) == sorted(set(rows) - {rows[10]})
    checkpoint = json.loads((tmp_path / "cp.json").read_text())
    # a resume retries it
    assert rows.index(checkpoint["position"]["id"]) < 10 and not checkpoint["complete"]


def test_garbage_instead_of_a_status_line_stops_the_run(scripted, legacy, rows, tmp_path, capsys):
    server = scripted(
        lambda w: Reply(raw=b"SSH-2.0-OpenSSH_9.6\r\n") if w.number == 10 else Reply()
    )
    assert apply(server, legacy, rows, tmp_path) == 3
    captured = capsys.readouterr()
    assert said(captured.err) == (
        "memory-backfill: The memory plugin at %s sent a response that is not valid HTTP/1.1 "
        "(b'SSH-2.0-OpenSSH_9.6\\r\\n' where an HTTP/1.x status line should be); stopped. Check "
        "that MEMORY_PLUGIN_URL points at the memory plugin, then re-run to resume.\n" % server.url
    )
    assert "STOPPED EARLY" in captured.out
    assert len(server.records) < 40


@pytest.mark.parametrize("options", [{"close_every": True}, {"http10": True}])
def test_a_server_that_answers_once_per_connection_still_gets_every_row(
    scripted, legacy, rows, tmp_path, options
):
    server = scripted(**options)
    assert apply(server, legacy, rows, tmp_path, "--retries", "0") == 0
    assert_each_row_once(server.records, legacy, rows)
    assert max(server.acks.values()) == 1 and server.connections >= 40


@pytest.mark.parametrize(
    "reply",
    [Reply(hang=True), Reply(interim_forever=True), Reply(drip=True)],
    ids=["never", "interim responses forever", "a byte at a time"],
)
def test_an_answer_that_is_not_whole_in_time_times_out_and_is_sent_again(
    scripted, legacy, rows, tmp_path, reply
):
    """--timeout bounds the time from sending a request to its whole answer, however bytes keep
    coming.
    """
    server = scripted(lambda w: reply if w.id == rows[5] and w.attempt == 0 else Reply())
    started = time.monotonic()
    assert apply(server, legacy, rows, tmp_path, "--timeout", "1") == 0
    assert time.monotonic() - started >= 1.0
    assert_each_row_once(server.records, legacy, rows)
    assert server.arrivals[rows[5]] == 2


def test_a_plugin_that_serves_a_connection_one_request_at_a_time_gets_more_connections(
    scripted, legacy, root, tmp_path
):
    legacy.many(root, 300)
    order = legacy.ids_in_read_order()
    # 10 ms each, one at a time per connection
    server = scripted(lambda w: time.sleep(0.01) or Reply())
    assert apply(server, legacy, order, tmp_path) == 0
    assert_each_row_once(server.records, legacy, order)
    writers = {write.connection for write in server.log}
    assert len(writers) > 1 and sum(server.arrivals.values()) == 300


@pytest.mark.parametrize("ceiling", [2, 4, 8])
def test_concurrency_n_is_n_requests_at_the_plugin_at_once_never_more(
    scripted, legacy, root, tmp_path, ceiling
):
    """A plugin that waits 20 ms a request (its database), one request per connection at a time:
    --concurrency N keeps N of them busy, and never more."""
    legacy.many(root, 100 * ceiling)
    order = legacy.ids_in_read_order()
    server = scripted(lambda w: time.sleep(0.02) or Reply())
    assert apply(server, legacy, order, tmp_path, "--concurrency", str(ceiling)) == 0
    assert_each_row_once(server.records, legacy, order)
    assert sum(server.arrivals.values()) == len(order)  # none sent twice
    assert server.busy_most == ceiling
    assert len({write.connection for write in server.log}) == ceiling


def test_concurrency_1_is_one_request_at_a_time(scripted, legacy, rows, tmp_path):
    server = scripted(lambda w: time.sleep(0.002) or Reply())
    assert apply(server, legacy, rows, tmp_path, "--concurrency", "1") == 0
    assert_each_row_once(server.records, legacy, rows)
    # the health check's, and one for the writes
    assert server.busy_most == 1 and server.connections == 2


def test_a_plugin_that_ignores_ids_stops_the_run_at_the_first_answer(
    scripted, legacy, rows, tmp_path, capsys
):
    server = scripted(ignore_ids=True)
    for _ in range(2):  # and a re-run does the same
        before = server.writes
        assert apply(server, legacy, rows, tmp_path, "--concurrency", "8") == 3
        captured = capsys.readouterr()
        err = said(captured.err)
        named = re.match(
            r"memory-backfill: The memory plugin at (\S+) ignores the ids it is given \(row (\S+) "
            r"was stored as ",
            err,
        )
        # one in flight
        assert named and named.group(1) == server.url and named.group(2) in rows[:32]
        assert err.endswith(
            ", so every run would duplicate every row; stopped. Do not run -apply again until the "
            "plugin is upgraded to one with idempotent upsert by id; then delete the records it "
            "stored under ids of its own (listed above, in --json and in --failures) as the "
            "README's \"A plugin that ignores ids\" shows.\n"
        )
        assert err.count("\n") == 1 and "STOPPED EARLY" in captured.out
        assert server.writes - before <= 32  # at most what was in flight: 8 connections, 4 each
        assert json.loads((tmp_path / "cp.json").read_text())["position"] is None


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


def test_an_https_plugin_gets_every_row_through_tls(
    legacy, rows, plugin, tls_plugin, monkeypatch, capsys
):
    server, url = tls_plugin
    monkeypatch.setenv("SSL_CERT_FILE", TLS_FILE)  # the only certificate trusted
    status = mb.main(["-apply", "-q", "--database-url", legacy.url, "--plugin-url", url])
    assert status == 0, capsys.readouterr()
    assert sorted(plugin.records()) == sorted(rows)
    assert server.requests["write_memory"] == 40


def test_an_https_plugin_with_an_untrusted_certificate_is_refused(
    legacy, rows, plugin, tls_plugin, capsys
):
    _, url = tls_plugin
    assert mb.main(["-apply", "-q", "--database-url", legacy.url, "--plugin-url", url]) == 3
    err = said(capsys.readouterr().err)
    assert err == (
        "memory-backfill: Cannot reach the memory plugin at %s (its TLS certificate was not "
        "accepted: self-signed certificate); check that it is running and that --plugin-url is "
        "right.\n" % url
    )
    assert plugin.count() == 0
