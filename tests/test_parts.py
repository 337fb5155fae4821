"""The units that keep state, each on its own: Pacing, LoadStatistics, row_groups, the checkpoint
and its low-water mark, and the record finder (against the stand-in plugin and a real database).
One scenario per test."""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

import memory_backfill as mb

# --- Pacing -----------------------------------------------------------------------


@pytest.mark.parametrize("now", [0.0, 0.0, 1e-9, 5.0])
def test_without_a_rate_cap_every_request_may_go_at_once(now):
    pacing = mb.Pacing(0)
    assert [pacing.send_delay(now) for _ in range(100)] == [0.0] * 100


def test_a_capped_request_waits_for_its_slot_then_takes_it():
    pacing = mb.Pacing(10)  # a slot every 0.1 s
    assert [pacing.send_delay(1.0) for _ in range(2)] == [0.0, 0.0]  # the first, one slot early
    assert pacing.send_delay(1.0) == pytest.approx(0.1)
    assert pacing.send_delay(1.04) == pytest.approx(0.06)
    assert pacing.send_delay(1.1) == 0.0
    assert pacing.send_delay(1.1) == pytest.approx(0.1)


def test_a_late_loop_catches_up_one_slot_never_more():
    pacing = mb.Pacing(10)
    assert pacing.send_delay(0.0) == 0.0
    # woke 0.25 s after the slot at 0.1: one request makes up for it, the next waits
    assert [pacing.send_delay(0.35) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


@given(st.lists(st.floats(min_value=0.0, max_value=0.3), min_size=200, max_size=200))
def test_lateness_never_adds_up_to_more_than_the_rate(wakeups):
    """However late the loop wakes, n seconds carry at most rate * n + 2 requests."""
    pacing, now, sent = mb.Pacing(20), 0.0, []
    for late in wakeups:
        delay = pacing.send_delay(now)
        if delay == 0.0:
            sent.append(now)
        now += delay + late * (delay > 0)
    for start in sent:
        window = [t for t in sent if start <= t < start + 1.0]
        assert len(window) <= 20 + 2


def test_a_wait_for_the_cap_is_reported_as_capping_for_two_seconds():
    pacing = mb.Pacing(1)
    now = time.monotonic()
    assert [pacing.send_delay(now) for _ in range(2)] == [0.0, 0.0] and not pacing.capping()
    assert pacing.send_delay(now) > 0 and pacing.capping()


def test_answers_are_read_at_once_while_the_window_has_room():
    pacing = mb.Pacing(0)
    pacing.read(1.0, answers=32, window=64, full=True)
    assert pacing.read_pause(1.0, full=False) == 0.0


def test_with_the_window_full_reads_wait_for_half_a_window_of_answers():
    pacing = mb.Pacing(0)
    pacing.read(0.0, answers=0, window=8, full=True)
    pacing.read(0.01, answers=32, window=8, full=True)  # 3,200 answers a second
    assert pacing.read_pause(0.01, full=True) == pytest.approx(0.00125)  # 4 answers' time
    assert pacing.read_pause(0.0105, full=True) == pytest.approx(0.00075)
    assert pacing.read_pause(0.02, full=True) == 0.0


def test_a_slow_plugin_never_pauses_reads_longer_than_the_bound():
    pacing = mb.Pacing(0)
    pacing.read(0.0, answers=0, window=64, full=True)
    pacing.read(10.0, answers=1, window=64, full=True)  # one answer in 10 s
    assert pacing.read_pause(10.0, full=True) == pytest.approx(mb.MAX_PACE_SECONDS)


# --- LoadStatistics -----------------------------------------------------------------


def test_statistics_of_a_stream_that_sent_nothing():
    assert mb.LoadStatistics().to_json() == {
        "answered": 0,
        "in_flight_min": 0,
        "in_flight_max": 0,
        "seconds": 0.0,
        "latency_p50_ms": None,
        "latency_p99_ms": None,
    }


@pytest.mark.parametrize("q, expected_ms", [(0.5, 50.0), (0.9, 90.0), (0.99, 99.0), (1.0, 100.0)])
def test_latency_percentiles_are_within_a_bucket_of_the_truth(q, expected_ms):
    statistics = mb.LoadStatistics()
    for ms in range(1, 101):
        statistics.answered(10.0 + ms / 1e3, 10.0)
    assert expected_ms <= statistics.latency_ms(q) <= expected_ms * 1.05


@pytest.mark.parametrize("seconds", [5e-6, 2e3])  # below the first edge, beyond the last
def test_a_latency_off_the_scale_lands_in_the_end_buckets(seconds):
    statistics = mb.LoadStatistics()
    statistics.answered(seconds, 0.0)
    assert statistics.latency_ms(0.5) in (
        round(mb.LoadStatistics.EDGES[0] * 1e3, 2),
        round(mb.LoadStatistics.EDGES[-1] * 1e3, 2),
    )


def test_in_flight_counts_only_while_there_was_more_to_send():
    statistics = mb.LoadStatistics()
    statistics.sent(1.0, 4, more=True)
    statistics.sent(1.1, 9, more=True)
    statistics.sent(1.2, 1, more=False)  # the tail: nothing left to send
    report = statistics.to_json()
    assert (report["in_flight_min"], report["in_flight_max"]) == (4, 9)


def test_seconds_run_from_the_first_request_to_the_last_answer():
    statistics = mb.LoadStatistics()
    statistics.sent(3.0, 0, more=True)  # nothing in flight yet
    statistics.sent(4.0, 1, more=True)
    statistics.answered(4.5, 4.0)
    statistics.answered(6.25, 4.0)
    assert (statistics.to_json()["seconds"], statistics.answers) == (2.25, 2)


# --- row_groups -----------------------------------------------------------------------


def rows_of(workspaces: str) -> list:
    """One row per letter, the letter naming its workspace ("aab": two rows of a, one of b)."""
    return [mb.LegacyRow("%d" % n, w, "x", "LOCAL", {}) for n, w in enumerate(workspaces)]


def shape(groups) -> list:
    return [("".join(row.workspace_id for row in rows), "".join(done)) for rows, done in groups]


@pytest.mark.parametrize(
    "workspaces, size, groups",
    [
        ("", 4, [("", "")]),
        ("aaabbbccc", 4, [("aaabbb", "ab"), ("ccc", "c")]),  # cut only between workspaces
        ("abcdef", 1, [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d"), ("e", "e"), ("f", "f")]),
        ("aaaaaaaaaa", 2, [("aaaaaaaa", ""), ("aa", "a")]),  # one far bigger: cut at 4 x size
        ("abbbbbbbbbbc", 2, [("abbbbbbb", "a"), ("bbb", "b"), ("c", "c")]),
    ],
)
def test_rows_go_in_groups_cut_between_workspaces(workspaces, size, groups):
    assert shape(mb.row_groups(rows_of(workspaces), size)) == groups


@given(st.text(alphabet="abcd", max_size=60).map(sorted), st.integers(1, 8))
def test_every_row_once_in_order_and_each_workspace_finished_where_its_last_row_is(letters, size):
    rows = rows_of("".join(letters))
    groups = list(mb.row_groups(rows, size))
    assert [row for group, _ in groups for row in group] == rows
    finished = [w for _, done in groups for w in done]
    assert finished == sorted(set(letters))
    for index, (group, done) in enumerate(groups):
        later = {row.workspace_id for rows, _ in groups[index + 1 :] for row in rows}
        assert not set(done) & later and len(group) <= 4 * size


# --- the checkpoint -----------------------------------------------------------------------


def apply_settings(path, workspace=None) -> mb.Settings:
    argv = ["-apply", "--checkpoint", str(path)] + (["-workspace", workspace] if workspace else [])
    return mb.parse_settings(argv, {"DATABASE_URL": "postgresql://app@db.internal/platform"})


def test_a_new_checkpoint_is_written_at_once_and_locked(tmp_path):
    path = tmp_path / "run.ckpt"
    with mb.Checkpoint.open(apply_settings(path)) as checkpoint:
        saved = json.loads(path.read_text())
        assert (saved["position"], saved["rows_done"], saved["complete"]) == (None, 0, False)
        assert (tmp_path / "run.ckpt.lock").read_text() == "%d\n" % os.getpid()
        assert checkpoint.position is None
    assert not (tmp_path / "run.ckpt.lock").exists()


def test_a_checkpoint_resumes_where_the_last_run_saved_it(tmp_path):
    path, row_id = tmp_path / "run.ckpt", "0b1c2d3e-0000-4000-8000-000000000001"
    with mb.Checkpoint.open(apply_settings(path)) as checkpoint:
        checkpoint.advance(("2024-01-01 00:00:00+00", row_id), 7)
        checkpoint.save(complete=True)
    with mb.Checkpoint.open(apply_settings(path)) as resumed:
        assert resumed.position == {"created_at": "2024-01-01 00:00:00+00", "id": row_id}
        assert resumed.complete
    assert json.loads(path.read_text())["rows_done"] == 7


def test_advancing_saves_at_most_once_a_second(tmp_path):
    path = tmp_path / "run.ckpt"
    with mb.Checkpoint.open(apply_settings(path)) as checkpoint:
        checkpoint.advance((None, "0b1c2d3e-0000-4000-8000-000000000001"), 1)
        checkpoint.advance((None, "0b1c2d3e-0000-4000-8000-000000000002"), 1)
        assert json.loads(path.read_text())["position"] is None  # saved at open, under 1 s ago
        checkpoint.save()
        assert json.loads(path.read_text())["rows_done"] == 2


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"[]",
        b'{"tool": "something-else", "position": null, "rows_done": 0, "complete": false}',
        b'{"tool": "memory-backfill", "position": {"id": "not a uuid", "created_at": null}}',
        b'{"tool": "memory-backfill", "position": null, "rows_done": "7", "complete": false}',
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / "run.ckpt"
    path.write_bytes(content)
    with pytest.raises(mb.UsageError, match="is not a memory-backfill checkpoint"):
        mb.Checkpoint.open(apply_settings(path))
    assert path.read_bytes() == content and not (tmp_path / "run.ckpt.lock").exists()


def test_a_checkpoint_of_another_workspace_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    mb.Checkpoint.open(apply_settings(path)).close()
    other = apply_settings(path, workspace="0b1c2d3e-0000-4000-8000-00000000000a")
    with pytest.raises(mb.UsageError, match=r"belongs to another run \(different workspace\)"):
        mb.Checkpoint.open(other)


def test_a_held_checkpoint_is_refused_naming_the_process_that_holds_it(tmp_path):
    path = tmp_path / "run.ckpt"
    holder = r"in use by another -apply run \(process %d, which holds" % os.getpid()
    with mb.Checkpoint.open(apply_settings(path)), pytest.raises(mb.UsageError, match=holder):
        mb.Checkpoint.open(apply_settings(path))


def test_a_temporary_file_a_killed_run_left_is_removed(tmp_path):
    path = tmp_path / "run.ckpt"
    (tmp_path / "run.ckpt.tmp").write_text("half a checkp")
    mb.Checkpoint.open(apply_settings(path)).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_a_checkpoint_that_cannot_be_written_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "gone" / "run.ckpt"
    with pytest.raises(mb.UsageError, match=r"^Cannot write the checkpoint .*; choose a writable"):
        mb.Checkpoint.open(apply_settings(path))


# --- the low-water mark ---------------------------------------------------------------------


def numbered(mark: mb.LowWaterMark, count: int) -> list:
    ids = ["0b1c2d3e-0000-4000-8000-%012d" % n for n in range(count)]
    return [mark.number(mb.LegacyRow(i, None, "x", "LOCAL", {"created_at": None})) for i in ids]


@pytest.fixture
def checkpoint(tmp_path):
    with mb.Checkpoint.open(apply_settings(tmp_path / "run.ckpt")) as checkpoint:
        yield checkpoint


def saved(checkpoint) -> tuple:
    checkpoint.save()
    data = json.loads(open(checkpoint.path).read())
    return data["position"] and data["position"]["id"][-2:], data["rows_done"]


@pytest.mark.parametrize(
    "done_order, mark",
    [
        ([0, 1, 2], ("02", 3)),
        ([2, 1], (None, 0)),  # row 0 not done: the mark has not moved
        ([1, 2, 0], ("02", 3)),  # the gap filled: the mark jumps over what was done above it
        ([0, 2, 3], ("00", 1)),
        ([3, 0, 1], ("01", 2)),
    ],
)
def test_the_mark_is_the_longest_prefix_of_rows_done(checkpoint, done_order, mark):
    water = mb.LowWaterMark(checkpoint)
    numbers = numbered(water, 5)
    for n in done_order:
        water.done(numbers[n])
    assert saved(checkpoint) == mark


def test_a_frozen_mark_moves_no_more(checkpoint):
    water = mb.LowWaterMark(checkpoint)
    numbers = numbered(water, 3)
    water.done(numbers[0])
    water.freeze()  # row 1 was refused: a resume starts again there
    water.done(numbers[1])
    water.done(numbers[2])
    assert saved(checkpoint) == ("00", 1)


def test_a_mark_without_a_checkpoint_counts_nothing_and_fails_nothing():
    water = mb.LowWaterMark(None)
    for number in numbered(water, 3):
        water.done(number)


# --- the record finder ------------------------------------------------------------------------


@pytest.fixture
def written(legacy, plugin, env):
    """Six workspaces of 12 rows each, written by -apply; yields a function that finds rows."""
    legacy.create_schema()
    workspaces = [legacy.workspace() for _ in range(6)]
    ids = {w: legacy.many(w, 12, words=("finder", "w%d" % n)) for n, w in enumerate(workspaces)}
    assert mb.main(["-apply", "-q"]) == 0
    return {"workspaces": workspaces, "ids": ids}


@pytest.fixture
def finder(written):
    """find(ids) -> ({row id: Place}, {row id: the found record's namespace}, searches made)."""
    settings = mb.parse_settings(["-verify"], dict(os.environ))
    plugin = mb.PluginClient(settings.plugin)
    with mb.LegacyDatabase(settings.database) as database, ThreadPoolExecutor(4) as pool:
        tree = database.read_workspaces()
        record_finder = mb.RecordFinder(plugin, database, tree, written["workspaces"], pool)

        def find(ids=None):
            rows = [r for r in database.rows(written["workspaces"], tree=tree)]
            rows = [r for r in rows if ids is None or r.id in ids]
            planned = [mb.plan_row(row, tree) for row in rows]
            before = plugin.searches
            lookups = record_finder.find([mb.sought_for(p, True) for p in planned])
            places = {p.row.id: lookups[p.row.id].place(p.target.namespace) for p in planned}
            found_in = {
                row_id: lookup.record["namespace"]
                for row_id, lookup in lookups.items()
                if lookup.record
            }
            return places, found_in, plugin.searches - before

        find.done_with = record_finder.done_with
        yield find


def test_rows_in_their_namespaces_are_found_by_reading_them_whole(written, finder):
    places, _, searches = finder()
    assert set(places.values()) == {mb.Place.IN_PLACE} and len(places) == 72
    assert searches <= 3  # 72 rows: two batches under the listing room, nothing searched alone


def test_a_row_not_in_its_namespace_read_whole_is_absent(written, plugin, finder):
    gone = written["ids"][written["workspaces"][2]][4]
    plugin.execute("DELETE FROM memories WHERE id = CAST(:id AS uuid)", id=gone)
    places, _, searches = finder()
    assert places[gone] == mb.Place.ABSENT
    assert sum(place == mb.Place.IN_PLACE for place in places.values()) == 71
    assert searches <= 6  # its namespace, and its own words in the tenant (fewer than reading it)


def test_a_record_moved_to_another_namespace_is_found_there(written, plugin, finder):
    moved = written["ids"][written["workspaces"][0]][0]
    elsewhere = "workspace:" + written["workspaces"][5]
    plugin.execute(
        "UPDATE memories SET namespace = :ns WHERE id = CAST(:id AS uuid)", ns=elsewhere, id=moved
    )
    places, found_in, _ = finder([moved])
    assert (places[moved], found_in[moved]) == (mb.Place.ELSEWHERE, elsewhere)


def test_a_refused_search_leaves_its_rows_refused_never_absent(written, plugin, finder):
    plugin.refuse_searches = True
    places, _, _ = finder()
    assert set(places.values()) == {mb.Place.REFUSED}


def test_namespaces_read_once_are_not_read_again_until_their_workspaces_are_done(written, finder):
    first = written["ids"][written["workspaces"][0]][:6]
    second = written["ids"][written["workspaces"][0]][6:]
    assert finder(first)[2] > 0
    assert finder(second)[2] == 0  # its namespace is still held
    finder.done_with(written["workspaces"])
    assert finder(second)[2] > 0  # forgotten: read again


def test_a_namespace_over_the_cap_is_searched_beyond_its_newest_100(legacy, plugin, env):
    legacy.create_schema()
    workspace = legacy.workspace()
    ids = legacy.many(workspace, 130, words=("overflow",))
    assert mb.main(["-apply", "-q"]) == 0
    settings = mb.parse_settings(["-verify"], dict(os.environ))
    plugin_client = mb.PluginClient(settings.plugin)
    with mb.LegacyDatabase(settings.database) as database, ThreadPoolExecutor(4) as pool:
        tree = database.read_workspaces()
        rows = list(database.rows([workspace], tree=tree))
        planned = [mb.plan_row(row, tree) for row in rows]
        finder = mb.RecordFinder(plugin_client, database, tree, [workspace], pool)
        lookups = finder.find([mb.sought_for(p, True) for p in planned])
    places = {p.row.id: lookups[p.row.id].place(p.target.namespace) for p in planned}
    assert set(places.values()) == {mb.Place.IN_PLACE} and set(places) == set(ids)
    assert plugin_client.searches <= 1 + 30 + 3  # the newest 100 read, the 30 older by their words
