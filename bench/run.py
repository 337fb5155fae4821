"""`make bench`: how fast -apply and -dry-run are, as ratios measured in one run.

Starts a throwaway PostgreSQL, seeds legacy rows over a realistic tree (60
workspaces: 6 roots, 18 teams, 36 leaves; all three scopes; 1 % of the rows
hold a secret), starts the test plugin (two processes behind one port, one
per core as the Go plugin uses them, each a threaded HTTP server with 4 of
the 8 database connections; connections are handed to them in turn) and
measures, each against a fresh plugin database:

- -apply at several sizes and --concurrency values: wall seconds, rows/s and
  the peak RSS of the backfill process (from the OS: its VmHWM); the
  20,000-row sweep is run three times, round-robin over the concurrencies
  (tool and raw client alternately), and the median of each reported, with
  the tool's range: one run on this shared 2-core machine varies by 10 % or
  more;
- the plugin's own ceiling: a minimal client (bench/run.py --raw-client) that
  only POSTs pre-built memories with the same concurrency;
- -dry-run over the largest size against a bare SELECT of the same rows
  through pg8000, both as fresh processes.

    python bench/run.py [--quick] [--record]

--quick leaves out 100,000 rows; --record appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

TOOL = [sys.executable, str(ROOT / "memory_backfill.py")]
SWEEP = (1, 2, 4, 8, 16)
ROUNDS = 3  # of the 20,000-row sweep; the median of each reported: this machine is noisy
PLUGIN_PROCESSES = 2  # one per core
PLUGIN_CONNECTIONS = 4  # database connections per plugin process
DEFAULT_CONCURRENCY = 8
# One line of the table: wall and rates of the tool (median, slowest and fastest
# round), its peak RSS, and the raw client's rate (median).
Result = namedtuple("Result", "rows concurrency wall rate slowest fastest rss ceiling")
CONTENT = ("Deploys for the %s service go through staging first; rollback with the "
           "previous image tag if error rates rise above two percent (note %s).")
SECRET = " The CI token is GITHUB_TOKEN=ghp_%s." % ("x" * 36)


# --- setup -----------------------------------------------------------------------

def seed(cluster, rows: int) -> str:
    """A legacy database with `rows` rows over a 60-workspace tree."""
    name = cluster.create_database("bench_legacy_%d" % rows)
    db = cluster.connect(name)
    db.run("CREATE TABLE workspaces (id uuid PRIMARY KEY, name text NOT NULL, "
           "parent_id uuid REFERENCES workspaces(id), status text NOT NULL DEFAULT 'active')")
    db.run("CREATE TABLE agent_memories (id uuid PRIMARY KEY, workspace_id uuid, content text NOT NULL, "
           "scope varchar(10) NOT NULL, namespace varchar(50) NOT NULL DEFAULT 'general', "
           "created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now())")
    workspaces = []
    for _ in range(6):
        root = str(uuid.uuid4())
        workspaces.append((root, None))
        for _ in range(3):
            team = str(uuid.uuid4())
            workspaces.append((team, root))
            workspaces += [(str(uuid.uuid4()), team) for _ in range(2)]
    for workspace, parent in workspaces:
        db.run("INSERT INTO workspaces VALUES (CAST(:id AS uuid), 'w', CAST(:parent AS uuid))",
               id=workspace, parent=parent)
    roots = [w for w, parent in workspaces if parent is None]
    db.run("CREATE TEMP TABLE ws AS SELECT row_number() OVER () - 1 AS n, id FROM unnest("
           "CAST(:ids AS uuid[])) id", ids=[w for w, _ in workspaces])
    db.run("CREATE TEMP TABLE roots AS SELECT row_number() OVER () - 1 AS n, id FROM unnest("
           "CAST(:ids AS uuid[])) id", ids=roots)
    # 60 % LOCAL, 30 % TEAM on any workspace; 10 % GLOBAL on a root.
    db.run("INSERT INTO agent_memories (id, workspace_id, content, scope, created_at) "
           "SELECT gen_random_uuid(), CASE WHEN g % 10 = 9 THEN (SELECT id FROM roots WHERE n = g % 6) "
           "ELSE (SELECT id FROM ws WHERE n = g % 60) END, "
           "format(:content, 'svc' || (g % 97), g) || CASE WHEN g % 100 = 0 THEN :secret ELSE '' END, "
           "CASE WHEN g % 10 = 9 THEN 'GLOBAL' WHEN g % 10 >= 6 THEN 'TEAM' ELSE 'LOCAL' END, "
           "timestamptz '2024-01-01' + g * interval '1 second' "
           "FROM generate_series(1, CAST(:rows AS int)) g",
           content=CONTENT, secret=SECRET, rows=rows)
    db.run("ANALYZE")
    db.close()
    return name


# --- measuring -------------------------------------------------------------------

def run_measured(argv, env) -> tuple:
    """(wall seconds, peak RSS MB, exit status, stdout) of one fresh process.

    The peak is the kernel's high-water mark of the process's own memory
    (VmHWM), sampled until it exits: rusage's ru_maxrss would also count the
    memory of this (large) process, which a forked child inherits.
    """
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = [0]

    def sample():
        while process.poll() is None:
            try:
                with open("/proc/%d/status" % process.pid) as status_file:
                    for line in status_file:
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = process.stdout.read()
    process.wait()
    sampler.join()
    wall = time.perf_counter() - started
    return wall, peak[0] / 1024.0, process.returncode, out.decode()


def raw_client(url: str, rows: int, concurrency: int) -> None:
    """Only POST pre-built memories: the plugin's ceiling at this concurrency."""
    import urllib3

    pool = urllib3.connection_from_url(url, maxsize=concurrency, block=True,
                                       headers={"Content-Type": "application/json"})
    namespaces = ["workspace:%s" % uuid.uuid4() for _ in range(60)]
    for name in namespaces:
        pool.urlopen("PUT", "/v1/namespaces/%s" % name, body=b'{"kind":"workspace"}')
    bodies = [(namespaces[n % 60], json.dumps({
        "id": str(uuid.uuid4()), "content": CONTENT % ("svc%d" % (n % 97), n), "kind": "fact",
        "source": "agent", "propagation": {"legacy": {"scope": "LOCAL"}}}).encode()) for n in range(rows)]

    def post(item):
        namespace, body = item
        response = pool.urlopen("POST", "/v1/namespaces/%s/memories" % namespace, body=body)
        assert response.status == 201, response.status

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as executor:
        list(executor.map(post, bodies))
    print(json.dumps({"seconds": time.perf_counter() - started}))


def bare_select(url: str, own_query: bool) -> None:
    """The rows -dry-run reads, through pg8000, doing nothing with them: a plain
    SELECT * (pg8000 converts every column), or the tool's own query (which has
    the server format timestamps as text)."""
    sys.path.insert(0, str(ROOT))
    import memory_backfill as mb
    config = mb.parse_database_url(url)
    with mb.LegacyDatabase(config) as database:
        sql, params = database._row_query(None, None)
        if not own_query:
            sql = "SELECT * FROM agent_memories ORDER BY created_at ASC NULLS FIRST, id"
        rows = database.connection.run(sql, **params)
    print(len(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="leave out 100,000 rows")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--raw-client", nargs=3, metavar=("URL", "ROWS", "CONCURRENCY"))
    parser.add_argument("--bare-select", metavar="URL")
    parser.add_argument("--own-query", action="store_true")
    args = parser.parse_args()
    if args.raw_client:
        raw_client(args.raw_client[0], int(args.raw_client[1]), int(args.raw_client[2]))
        return 0
    if args.bare_select:
        bare_select(args.bare_select, args.own_query)
        return 0

    from pg_cluster import start_cluster
    from plugin_server import PluginProcesses

    cluster = start_cluster()
    plugin = None
    try:
        plugin = PluginProcesses(dict(user=cluster.user, password=cluster.password, host=cluster.host,
                                      port=cluster.port, database=cluster.create_database("bench_plugin")),
                                 PLUGIN_PROCESSES, PLUGIN_CONNECTIONS)
        sizes = (1000, 20000) if args.quick else (1000, 20000, 100000)
        plan = [(1000, DEFAULT_CONCURRENCY)] + [(20000, c) for c in SWEEP]
        if not args.quick:
            plan.append((100000, DEFAULT_CONCURRENCY))
        legacy_urls = {rows: cluster.url(seed(cluster, rows)) for rows in sizes}
        runs = {key: ([], [], []) for key in plan}  # (rows, concurrency) -> walls, peaks, raw seconds
        for round_number in range(ROUNDS):
            for rows, concurrency in plan:
                if round_number and rows != 20000:
                    continue
                env = {**os.environ, "DATABASE_URL": legacy_urls[rows], "MEMORY_PLUGIN_URL": plugin.url}
                walls, peaks, raw = runs[(rows, concurrency)]
                plugin.reset()
                wall, rss, status, _ = run_measured(
                    TOOL + ["-apply", "-q", "--concurrency", str(concurrency)], env)
                assert status == 0 and plugin.count() == rows, (status, plugin.count())
                walls.append(wall)
                peaks.append(rss)
                plugin.reset()
                _, _, status, out = run_measured(
                    [sys.executable, __file__, "--raw-client", plugin.url, str(rows), str(concurrency)],
                    env)
                raw.append(json.loads(out)["seconds"])
                print("round %d, rows=%d concurrency=%d: %.0f rows/s, peak RSS %.1f MB, raw ceiling "
                      "%.0f rows/s" % (round_number + 1, rows, concurrency, rows / wall, rss,
                                       rows / raw[-1]), flush=True)
        table = [Result(rows, concurrency, median(walls), rows / median(walls), rows / max(walls),
                        rows / min(walls), max(peaks), rows / median(raw))
                 for (rows, concurrency), (walls, peaks, raw) in runs.items()]
        largest = max(sizes)
        env = {**os.environ, "DATABASE_URL": legacy_urls[largest]}
        dry, _, status, _ = run_measured(TOOL + ["-dry-run", "-q"], env)
        assert status == 0
        bare, _, status, _ = run_measured([sys.executable, __file__, "--bare-select",
                                           legacy_urls[largest]], env)
        own, _, status, _ = run_measured([sys.executable, __file__, "--bare-select",
                                          legacy_urls[largest], "--own-query"], env)
    finally:
        if plugin is not None:
            plugin.stop()
        cluster.stop()

    lines = report(table, largest, dry, bare, own)
    print("\n".join(lines))
    if args.record:
        with open(HERE / "RESULTS.md", "a") as results:
            results.write("\n" + "\n".join(lines) + "\n")
    return 0


def report(table, largest, dry, bare, own) -> list:
    machine = "%s, %d cores, Python %s, %s" % (platform.machine(), os.cpu_count(),
                                              platform.python_version(), platform.platform(terse=True))
    lines = ["## %s — %s" % (datetime.date.today().isoformat(), machine), "",
             "Medians of %d rounds for 20,000 rows, one run otherwise." % ROUNDS, "",
             "| rows | concurrency | wall s | rows/s | range rows/s | peak RSS MB "
             "| raw POST ceiling rows/s | ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append("| %d | %d | %.1f | %.0f | %.0f–%.0f | %.1f | %.0f | %.2f |"
                     % (r.rows, r.concurrency, r.wall, r.rate, r.slowest, r.fastest, r.rss, r.ceiling,
                        r.rate / r.ceiling))
    by_key = {(r.rows, r.concurrency): r for r in table}
    default = by_key[(20000, DEFAULT_CONCURRENCY)]
    best = max((r for r in table if r.rows == 20000), key=lambda r: r.rate)
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines.append("| -apply rows/s at default concurrency >= 85 %% of raw ceiling (20,000 rows) "
                 "| %.0f %% | %s |" % (100 * default.rate / default.ceiling,
                                      default.rate >= 0.85 * default.ceiling))
    lines.append("| default concurrency (%d) is the best of the sweep (within 5 %%) | best: %d "
                 "(%.0f rows/s vs %.0f) | %s |" % (DEFAULT_CONCURRENCY, best.concurrency, best.rate,
                                                  default.rate, default.rate >= 0.95 * best.rate))
    if (100000, DEFAULT_CONCURRENCY) in by_key:
        small, large = by_key[(1000, DEFAULT_CONCURRENCY)], by_key[(100000, DEFAULT_CONCURRENCY)]
        lines.append("| peak RSS at 100,000 rows within 10 MB of 1,000 rows | %.1f MB vs %.1f MB "
                     "| %s |" % (large.rss, small.rss, large.rss - small.rss <= 10))
    lines.append("| -dry-run over %d rows <= 2 x bare pg8000 `SELECT *` | %.2f s vs %.2f s (%.2fx) | %s |"
                 % (largest, dry, bare, dry / bare, dry <= 2 * bare))
    lines.append("| (for information) -dry-run vs the tool's own query alone, timestamps as text "
                 "| %.2f s vs %.2f s (%.2fx) | - |" % (dry, own, dry / own))
    return lines


if __name__ == "__main__":
    sys.exit(main())
