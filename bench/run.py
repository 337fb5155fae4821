"""`make bench`: what the write path and -verify cost, as ratios measured in one run.

Starts a throwaway PostgreSQL, seeds legacy rows over a realistic tree (60
workspaces: 6 roots, 18 teams, 36 leaves; all three scopes; 1 % of the rows
hold a secret) and the test plugin (two processes behind one port, one per
core as the Go plugin uses them, its connections handed to them in turn; the
real plugin's indexes), then measures, each -apply against an emptied plugin:

- CPU seconds (user + system, from the OS: wait4) of -dry-run and of -apply
  at the default concurrency over the same 100,000 rows, start-up (-dry-run
  -limit 1) subtracted; target: -apply per row <= 3 x -dry-run per row;
- -apply rows/s on 20,000 rows against the plugin's ceiling: a raw client on
  sockets that POSTs the very memories -apply writes, read and planned before
  its clock starts, pipelined over the same connections as the tool, reading
  answers every millisecond; target >= 95 %;
- -verify -verify-sample 0 of those 20,000 rows against -apply's wall time;
  target <= 1.5 x;
- peak RSS (VmHWM) at 1,000, 20,000 and 100,000 rows; target <= 40 MB, flat.

The 20,000-row runs go three rounds (medians reported); the rest once, or
three times where a run is short (start-up, -dry-run).

    python bench/run.py [--quick] [--record]

--quick: 1,000 and 20,000 rows, one round, the CPU ratio on 20,000 rows
(under a minute); --record appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import namedtuple
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import memory_backfill as mb  # noqa: E402

TOOL = [sys.executable, str(ROOT / "memory_backfill.py")]
ROUNDS = 3
RAW_PAUSE = 0.001  # the raw client reads answers every millisecond: its least CPU, its best rate
PLUGIN_PROCESSES = 2  # one per core
PLUGIN_CONNECTIONS = 4  # database connections per plugin process
CONTENT = ("Deploys for the %s service go through staging first; rollback with the "
           "previous image tag if error rates rise above two percent (note %s).")
SECRET = " The CI token is GITHUB_TOKEN=ghp_%s." % ("x" * 36)
Run = namedtuple("Run", "wall cpu rss status out")  # seconds, CPU seconds, peak RSS MB


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

def run_measured(argv, env) -> Run:
    """Wall seconds, CPU seconds and peak RSS of one fresh process.

    CPU comes from wait4(), for that process alone.  The peak is the kernel's
    high-water mark of its memory (VmHWM), sampled until it exits: rusage's
    ru_maxrss can count pages of this (large) process that a fork shares.
    """
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = [0]

    def sample():
        while process.returncode is None:
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
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    sampler.join()
    return Run(wall, usage.ru_utime + usage.ru_stime, peak[0] / 1024.0, process.returncode, out.decode())


def raw_client(url: str, database_url: str, concurrency: int, pause: float) -> None:
    """POST the very memories -apply writes, planned and encoded before the clock starts,
    pipelined over raw sockets laid out as the tool's (memory_backfill.connection_depths),
    reading answers as they come (pause 0) or every `pause` seconds; print the seconds."""
    address = mb.parse_plugin_address(url)
    with mb.LegacyDatabase(mb.parse_database_url(database_url)) as database:
        tree = database.read_workspaces()
        planned = [mb.plan_row(row, tree) for row in database.rows()]
    setup = http.client.HTTPConnection(address.host, address.port)
    for target in {p.target for p in planned}:
        setup.request("PUT", "/v1/namespaces/%s" % target.namespace, body=json.dumps({"kind": target.kind}))
        setup.getresponse().read()
    requests = []
    for p in planned:
        body = mb.JSON_ENCODER.encode(p.body).encode()
        requests.append(b"%s%d\r\n\r\n%s" % (mb.write_request_head(address, p.target.namespace),
                                                len(body), body))
    rows = len(requests)
    connections = [(socket.create_connection((address.host, address.port)), depth)
                   for depth in mb.connection_depths(concurrency)]
    in_flight = {sock: 0 for sock, _ in connections}
    received = {sock: b"" for sock, _ in connections}
    sent = answered = 0
    started = time.perf_counter()
    while answered < rows:
        for sock, depth in connections:
            count = min(depth - in_flight[sock], rows - sent)
            if count > 0:
                sock.sendall(b"".join(requests[sent:sent + count]))
                sent += count
                in_flight[sock] += count
        if pause:
            time.sleep(pause)
        for sock in select.select([s for s, _ in connections if in_flight[s]], [], [], 10)[0]:
            data = received[sock] + sock.recv(65536)
            while True:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    break
                start = data.find(b"Content-Length: ", 0, end) + 16
                length = int(data[start:data.find(b"\r\n", start)])
                if len(data) < end + 4 + length:
                    break
                assert data[9:12] == b"201", data[:80]
                data = data[end + 4 + length:]
                in_flight[sock] -= 1
                answered += 1
            received[sock] = data
    print(json.dumps({"seconds": time.perf_counter() - started}))


def bench(quick: bool) -> dict:
    from pg_cluster import start_cluster
    from plugin_server import PluginProcesses

    cluster = start_cluster()
    plugin = None
    results: dict = {"rss": {}}
    try:
        plugin = PluginProcesses(dict(user=cluster.user, password=cluster.password, host=cluster.host,
                                      port=cluster.port, database=cluster.create_database("bench_plugin")),
                                 PLUGIN_PROCESSES, PLUGIN_CONNECTIONS)
        sizes = (1000, 20000) if quick else (1000, 20000, 100000)
        urls = {rows: cluster.url(seed(cluster, rows)) for rows in sizes}
        largest = sizes[-1]

        def env(rows):
            return {**os.environ, "DATABASE_URL": urls[rows], "MEMORY_PLUGIN_URL": plugin.url}

        def apply(rows) -> Run:
            plugin.reset()
            done = run_measured(TOOL + ["-apply", "-q"], env(rows))
            assert done.status == 0 and plugin.count() == rows, (done.status, plugin.count())
            results["rss"][rows] = max(results["rss"].get(rows, 0), done.rss)
            return done

        def raw() -> Run:
            plugin.reset()
            done = run_measured([sys.executable, __file__, "--raw-client", plugin.url, urls[20000],
                                 str(mb.DEFAULT_CONCURRENCY), str(RAW_PAUSE)], env(20000))
            assert done.status == 0, "the raw client failed"
            return done

        startups = [run_measured(TOOL + ["-dry-run", "-q", "-limit", "1"], env(largest)).cpu
                    for _ in range(3)]
        dry = [run_measured(TOOL + ["-dry-run", "-q"], env(largest)).cpu for _ in range(3)]
        apply(1000)
        rounds = []
        for number in range(1 if quick else ROUNDS):
            applied = apply(20000)
            checked = run_measured(TOOL + ["-verify", "-verify-sample", "0", "-q"], env(20000))
            assert checked.status == 0, checked.out
            ceiling = raw()
            rounds.append((applied, checked, 20000 / json.loads(ceiling.out)["seconds"], ceiling.cpu))
            print("round %d: -apply %.0f rows/s (%.1f µs CPU/row), -verify %.1f s vs -apply %.1f s, "
                  "raw ceiling %.0f rows/s" % (number + 1, 20000 / applied.wall, applied.cpu / 20000 * 1e6,
                                               checked.wall, applied.wall, rounds[-1][2]), flush=True)
        big = apply(largest) if largest > 20000 else rounds[0][0]
        # For information: -dry-run while the plugin is as busy as during -apply (beside the
        # raw client), to tell the write path's cost from what a busy machine adds to any work.
        plugin.reset()
        beside = subprocess.Popen([sys.executable, __file__, "--raw-client", plugin.url, urls[20000],
                                   str(mb.DEFAULT_CONCURRENCY), str(RAW_PAUSE)], env=env(20000),
                                  stdout=subprocess.DEVNULL)
        time.sleep(1.5)  # its rows planned, its writes under way
        busy_dry = run_measured(TOOL + ["-dry-run", "-q"], env(largest)).cpu
        beside.wait()
        results.update(
            largest=largest, startup=median(startups), dry=median(dry), apply_cpu=big.cpu,
            rate=20000 / median(r[0].wall for r in rounds), ceiling=median(r[2] for r in rounds),
            apply_wall=median(r[0].wall for r in rounds), verify_wall=median(r[1].wall for r in rounds),
            verify_ratio=median(r[1].wall / r[0].wall for r in rounds),
            rates=[20000 / r[0].wall for r in rounds], ceilings=[r[2] for r in rounds],
            busy_dry=busy_dry, apply_cpu_20000=median(r[0].cpu for r in rounds),
            raw_cpu=median(r[3] for r in rounds))
    finally:
        if plugin is not None:
            plugin.stop()
        cluster.stop()
    return results


def report(r: dict, quick: bool) -> list:
    machine = "%s, %d cores, Python %s, %s" % (platform.machine(), os.cpu_count(),
                                              platform.python_version(), platform.platform(terse=True))
    rows = r["largest"]
    dry = (r["dry"] - r["startup"]) / rows * 1e6
    applied = (r["apply_cpu"] - r["startup"]) / rows * 1e6
    share = r["rate"] / r["ceiling"]
    peak = max(r["rss"].values())
    flat = peak - min(r["rss"].values())
    rss = " / ".join("%.1f" % r["rss"][n] for n in sorted(r["rss"]))
    busy = (r["busy_dry"] - r["startup"]) / rows * 1e6
    sizes = " / ".join(f"{n:,}" for n in sorted(r["rss"]))

    def met(ok):
        return "yes" if ok else "**no**"

    return [
        "## %s — %s%s" % (datetime.date.today().isoformat(), machine, " (--quick)" if quick else ""), "",
        "| measure | value | target | met |", "|---|---|---|---|",
        "| CPU per row, {:,} rows: -dry-run / -apply at concurrency {} (start-up {:.0f} ms "
        "subtracted) | {:.1f} / {:.1f} µs | | |".format(rows, mb.DEFAULT_CONCURRENCY, r["startup"] * 1e3,
                                                      dry, applied),
        "| -apply CPU per row ÷ -dry-run CPU per row | %.2f | ≤ 3 | %s |"
        % (applied / dry, met(applied <= 3 * dry)),
        "| -apply rows/s, 20,000 rows (rounds) | %.0f (%s) | | |"
        % (r["rate"], ", ".join("%.0f" % x for x in r["rates"])),
        "| test plugin's ceiling: raw POST client rows/s (rounds) | %.0f (%s) | | |"
        % (r["ceiling"], ", ".join("%.0f" % x for x in r["ceilings"])),
        "| -apply ÷ ceiling | %.0f %% | ≥ 95 %% | %s |" % (100 * share, met(share >= 0.95)),
        "| -verify -verify-sample 0 ÷ -apply, wall, 20,000 rows | %.1f s ÷ %.1f s = %.2f | ≤ 1.5 | %s |"
        % (r["verify_wall"], r["apply_wall"], r["verify_ratio"], met(r["verify_ratio"] <= 1.5)),
        "| peak RSS at %s rows | %s MB | ≤ 40 MB, flat | %s |"
        % (sizes, rss, met(peak <= 40 and flat <= 5)),
        "| (information) -dry-run CPU per row beside the raw client, and the ratio against it "
        "| %.1f µs, %.2f | | |" % (busy, applied / busy),
        "| (information) CPU per row, 20,000 rows, reading and planning included: -apply / raw "
        "client | %.1f / %.1f µs | | |" % ((r["apply_cpu_20000"] - r["startup"]) / 20000 * 1e6,
                                           (r["raw_cpu"] - r["startup"]) / 20000 * 1e6),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 20,000 rows, one round")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--raw-client", nargs=4, metavar=("URL", "DATABASE_URL", "CONCURRENCY", "PAUSE"))
    args = parser.parse_args()
    if args.raw_client:
        url, database_url, concurrency, pause = args.raw_client
        raw_client(url, database_url, int(concurrency), float(pause))
        return 0
    started = time.monotonic()
    lines = report(bench(args.quick), args.quick)
    lines.append("")
    lines.append("(the whole bench took %.0f s)" % (time.monotonic() - started))
    print("\n".join(lines))
    if args.record:
        with open(HERE / "RESULTS.md", "a") as results:
            results.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
