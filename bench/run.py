"""`make bench`: what -apply, -verify and -rollback cost, as ratios measured in one run.

Starts a throwaway PostgreSQL, seeds legacy rows over a realistic tree (60
workspaces: 6 roots, 18 teams, 36 leaves; all three scopes; 1 % of the rows
hold a secret) and runs the test plugin (two processes behind one port, its
connections handed to them in turn; the real plugin's indexes; a connection's
requests served one at a time, as Go's net/http does) in each shape a real
plugin takes.  Each -apply runs at its defaults against an emptied plugin,
beside a lean raw client on sockets that POSTs the very memories -apply writes
(read and planned before its clock starts) in a fixed shape of connections x
requests pipelined on each.

- CPU bound (the plugin as it is, sharing the two cores): -apply >= 90 % of the
  best raw shape tried, and its CPU per row <= 1.25 x that client's (both with
  their reading and planning counted, start-up subtracted);
- waiting (20 ms per request, no limit on how many at once): -apply >= 85 %
  of 16 raw connections with one request each;
- at capacity (at most 4 requests worked on at once, 5 ms each, the others
  queue): -apply >= 80 % of 4 raw connections, and a probe (one small search
  every 20 ms on its own connection: the live tenant) keeps its median latency
  <= 2.5 x its median with no -apply running;
- -rollback of 20,000 rows <= 2 x the wall time of -apply of the same rows;
- peak RSS (VmHWM) <= 40 MB and flat at 1,000 / 20,000 / 100,000 rows, and
  -dry-run's flat however many rows are skipped (1,000 vs 100,000 of a missing
  workspace);
- for information: CPU per row of -dry-run and -apply on 100,000 rows and their
  ratio, -verify's wall time against -apply's.

Rounds of -apply against its raw client alternate (medians of 3 reported).

    python bench/run.py [--quick] [--record]

--quick: one round each, 100,000-row runs left out (about two minutes);
--record appends the table to bench/RESULTS.md.
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
RAW_PAUSE = 0.001  # a pipelining raw client reads answers every millisecond: its least CPU, its best rate
PLUGIN_PROCESSES = 2  # one per core
PLUGIN_CONNECTIONS = 4  # database connections per plugin process
CPU_SHAPES = ((4, 4), (8, 4), (16, 4), (8, 1))  # raw clients tried where the plugin is CPU bound
REGIMES = {  # name: (wait per request, capacity, rows, raw shape to beat, target share)
    "waiting": (0.020, 0, 4000, (16, 1), 0.85),
    "at capacity": (0.005, 4, 4000, (4, 1), 0.80),
}
PROBE_SECONDS = 0.02
CONTENT = ("Deploys for the %s service go through staging first; rollback with the "
           "previous image tag if error rates rise above two percent (note %s).")
SECRET = " The CI token is GITHUB_TOKEN=ghp_%s." % ("x" * 36)
Run = namedtuple("Run", "wall cpu rss status out")  # seconds, CPU seconds, peak RSS MB


def writing(run: Run) -> float:
    """Seconds -apply (or -rollback) spent writing: from its first request to its last answer, as
    its --json report says (the raw client's clock, too, runs only while it writes)."""
    return json.loads(run.out)["stream"]["seconds"]


# --- setup -----------------------------------------------------------------------

def seed(cluster, rows: int, skipped: bool = False) -> str:
    """A legacy database with `rows` rows over a 60-workspace tree (skipped: all of a
    workspace that does not exist)."""
    name = cluster.create_database("bench_legacy_%d%s" % (rows, "_skipped" if skipped else ""))
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
    if skipped:  # every row in a workspace that does not exist
        roots = [str(uuid.uuid4())] * 6
        workspaces = [(roots[0], None)]
    db.run("CREATE TEMP TABLE ws AS SELECT row_number() OVER () - 1 AS n, id FROM unnest("
           "CAST(:ids AS uuid[])) id", ids=[w for w, _ in workspaces])
    db.run("CREATE TEMP TABLE roots AS SELECT row_number() OVER () - 1 AS n, id FROM unnest("
           "CAST(:ids AS uuid[])) id", ids=roots)
    # 60 % LOCAL, 30 % TEAM on any workspace; 10 % GLOBAL on a root.
    db.run("INSERT INTO agent_memories (id, workspace_id, content, scope, created_at) "
           "SELECT gen_random_uuid(), CASE WHEN g % 10 = 9 THEN (SELECT id FROM roots WHERE n = g % 6) "
           "ELSE (SELECT id FROM ws WHERE n = g % CAST(:workspaces AS int)) END, "
           "format(:content, 'svc' || (g % 97), g) || CASE WHEN g % 100 = 0 THEN :secret ELSE '' END, "
           "CASE WHEN g % 10 = 9 THEN 'GLOBAL' WHEN g % 10 >= 6 THEN 'TEAM' ELSE 'LOCAL' END, "
           "timestamptz '2024-01-01' + g * interval '1 second' "
           "FROM generate_series(1, CAST(:rows AS int)) g",
           content=CONTENT, secret=SECRET, rows=rows, workspaces=len(workspaces))
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


def raw_client(url: str, database_url: str, connections: int, depth: int) -> None:
    """POST the very memories -apply writes, planned and encoded before the clock starts,
    over `connections` raw sockets with up to `depth` requests pipelined on each (reading
    answers every RAW_PAUSE when pipelining, as they come otherwise); print the seconds."""
    address = mb.parse_plugin_url(url)
    with mb.LegacyDatabase(mb.parse_database_url(database_url)) as database:
        tree = database.read_workspaces()
        planned = [mb.plan_row(row, tree) for row in database.rows()]
    setup = http.client.HTTPConnection(address.host, address.port)
    for target in {p.target for p in planned}:
        setup.request("PUT", "/v1/namespaces/%s" % target.namespace, body=json.dumps({"kind": target.kind}))
        setup.getresponse().read()
    heads: dict = {}
    requests = [mb.write_request(address, p, heads) for p in planned]
    rows = len(requests)
    socks = [socket.create_connection((address.host, address.port)) for _ in range(connections)]
    in_flight = {sock: 0 for sock in socks}
    received = {sock: b"" for sock in socks}
    sent = answered = 0
    started = time.perf_counter()
    while answered < rows:
        for sock in socks:
            count = min(depth - in_flight[sock], rows - sent)
            if count > 0:
                sock.sendall(b"".join(requests[sent:sent + count]))
                sent += count
                in_flight[sock] += count
        if depth > 1:
            time.sleep(RAW_PAUSE)
        for sock in select.select([s for s in socks if in_flight[s]], [], [], 10)[0]:
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


class Probe:
    """The live tenant: one small search every PROBE_SECONDS on its own connection."""

    def __init__(self, url: str):
        address = mb.parse_plugin_url(url)
        self.connection = http.client.HTTPConnection(address.host, address.port)
        self.latencies: list = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()
        self.connection.close()

    def _run(self) -> None:
        body = json.dumps({"namespaces": ["workspace:probe"], "limit": 1})
        while not self.stopped.wait(PROBE_SECONDS):
            started = time.perf_counter()
            self.connection.request("POST", "/v1/search", body=body)
            self.connection.getresponse().read()
            self.latencies.append(time.perf_counter() - started)

    def median(self) -> float:
        return median(self.latencies)


class Bench:
    def __init__(self, cluster, urls: dict):
        self.cluster = cluster
        self.urls = urls
        self.plugin = None
        self.rss: dict = {}

    def start_plugin(self, wait: float = 0.0, capacity: int = 0) -> None:
        from plugin_server import PluginProcesses

        if self.plugin is not None:
            self.plugin.stop()
        cluster = self.cluster
        store = dict(user=cluster.user, password=cluster.password, host=cluster.host, port=cluster.port,
                     database="bench_plugin")
        self.plugin = PluginProcesses(store, PLUGIN_PROCESSES, PLUGIN_CONNECTIONS, wait, capacity)

    def env(self, rows) -> dict:
        return {**os.environ, "DATABASE_URL": self.urls[rows], "MEMORY_PLUGIN_URL": self.plugin.url}

    def tool(self, rows, *args, reset: bool = False) -> Run:
        if reset:
            self.plugin.reset()
        done = run_measured(TOOL + list(args) + ["-q", "--json"], self.env(rows))
        assert done.status == 0, (args, done.status, done.out[-600:])
        return done

    def apply(self, rows) -> Run:
        done = self.tool(rows, "-apply", reset=True)
        assert self.plugin.count() == rows, self.plugin.count()
        self.rss[rows] = max(self.rss.get(rows, 0), done.rss)
        return done

    def raw(self, rows, shape) -> Run:
        self.plugin.reset()
        done = run_measured([sys.executable, __file__, "--raw-client", self.plugin.url, self.urls[rows],
                             str(shape[0]), str(shape[1])], self.env(rows))
        assert done.status == 0 and self.plugin.count() == rows, "the raw client failed"
        return done._replace(wall=json.loads(done.out)["seconds"])

    def stop(self) -> None:
        if self.plugin is not None:
            self.plugin.stop()


def bench(quick: bool) -> dict:
    from pg_cluster import start_cluster

    cluster = start_cluster()
    rounds = 1 if quick else ROUNDS
    r: dict = {"rounds": rounds}
    try:
        cluster.create_database("bench_plugin")
        sizes = (1000, 4000, 20000) if quick else (1000, 4000, 20000, 100000)
        urls = {rows: cluster.url(seed(cluster, rows)) for rows in sizes}
        for rows in (1000, 100000):
            urls[("skipped", rows)] = cluster.url(seed(cluster, rows, skipped=True))
        b = Bench(cluster, urls)
        largest = sizes[-1]

        # CPU bound: the plugin as it is.
        b.start_plugin()
        r["startup"] = median(run_measured(TOOL + ["-dry-run", "-q", "-limit", "1"], b.env(largest)).cpu
                              for _ in range(3))
        r["dry_cpu"] = median(b.tool(largest, "-dry-run").cpu for _ in range(1 if quick else 3))
        r["skipped_rss"] = {rows: b.tool(("skipped", rows), "-dry-run").rss for rows in (1000, 100000)}
        b.apply(1000)
        sweep = {shape: 20000 / b.raw(20000, shape).wall for shape in CPU_SHAPES}
        best = max(sweep, key=sweep.get)
        applies, raws, rollbacks = [], [], []
        for number in range(rounds):
            applies.append(b.apply(20000))
            if number == 0:
                r["verify_wall"] = b.tool(20000, "-verify", "-verify-sample", "0").wall
            rollbacks.append(b.tool(20000, "-rollback", "--yes"))
            assert b.plugin.count() == 0, "-rollback left records"
            raws.append(b.raw(20000, best))
            print("cpu bound round %d: -apply %.0f rows/s (%.0f with its start), raw %s %.0f rows/s, "
                  "-rollback %.1f s" % (number + 1, 20000 / writing(applies[-1]), 20000 / applies[-1].wall,
                                        "x".join(map(str, best)), 20000 / raws[-1].wall, rollbacks[-1].wall),
                  flush=True)
        r.update(sweep=sweep, best=best, apply_rates=[20000 / writing(x) for x in applies],
                 apply_whole_rates=[20000 / x.wall for x in applies],
                 raw_rates=[20000 / x.wall for x in raws],
                 apply_cpu=median(x.cpu for x in applies), raw_cpu=median(x.cpu for x in raws),
                 apply_wall=median(x.wall for x in applies),
                 rollback_ratio=median(x.wall / y.wall for x, y in zip(rollbacks, applies, strict=True)),
                 rollback_wall=median(x.wall for x in rollbacks))
        if largest > 20000:
            r["big_apply_cpu"] = b.apply(largest).cpu
        r["largest"] = largest

        # Waiting on its database, and at its capacity with the live tenant beside it.
        for name, (wait, capacity, rows, shape, _) in REGIMES.items():
            b.start_plugin(wait, capacity)
            probe = None
            if capacity:
                b.plugin.reset()
                with Probe(b.plugin.url) as alone:
                    time.sleep(3)
                probe = {"alone": alone.median(), "beside": []}
            applied, raw = [], []
            for _ in range(rounds):
                if probe is None:
                    applied.append(b.apply(rows))
                else:
                    with Probe(b.plugin.url) as beside:
                        applied.append(b.apply(rows))
                    probe["beside"].append(beside.median())
                raw.append(b.raw(rows, shape))
                print("%s: -apply %.0f rows/s, raw %s %.0f rows/s%s" % (
                    name, rows / writing(applied[-1]), "x".join(map(str, shape)), rows / raw[-1].wall,
                    ", probe %.1f ms (alone %.1f ms)" % (probe["beside"][-1] * 1e3, probe["alone"] * 1e3)
                    if probe else ""), flush=True)
            r[name] = {"apply": [rows / writing(x) for x in applied], "raw": [rows / x.wall for x in raw],
                       "probe": probe}
        r["rss"] = b.rss
        b.stop()
    finally:
        cluster.stop()
    return r


def report(r: dict, quick: bool) -> list:
    machine = "%s, %d cores, Python %s, %s" % (platform.machine(), os.cpu_count(),
                                              platform.python_version(), platform.platform(terse=True))

    def met(ok):
        return "yes" if ok else "**no**"

    def rates(values):
        return "%.0f (%s)" % (median(values), ", ".join("%.0f" % x for x in values))

    def per_row(cpu, rows):
        return (cpu - r["startup"]) / rows * 1e6

    best = "x".join(map(str, r["best"]))
    share = median(r["apply_rates"]) / median(r["raw_rates"])
    apply_cpu, raw_cpu = per_row(r["apply_cpu"], 20000), per_row(r["raw_cpu"], 20000)
    lines = [
        "## %s — %s%s" % (datetime.date.today().isoformat(), machine, " (--quick)" if quick else ""), "",
        "Medians of %d rounds (the rounds in brackets); -apply at its defaults throughout." % r["rounds"], "",
        "| measure | value | target | met |", "|---|---|---|---|",
        "| CPU bound: raw clients tried, rows/s (connections x pipelined) | %s | | |"
        % ", ".join("%s: %.0f" % ("x".join(map(str, shape)), rate) for shape, rate in r["sweep"].items()),
        "| CPU bound: -apply rows/s while writing, 20,000 rows (with its start-up: %s) | %s | | |"
        % (rates(r["apply_whole_rates"]), rates(r["apply_rates"])),
        "| CPU bound: raw %s rows/s | %s | | |" % (best, rates(r["raw_rates"])),
        "| CPU bound: -apply ÷ raw %s | %.0f %% | ≥ 90 %% | %s |" % (best, 100 * share, met(share >= 0.90)),
        "| CPU bound: CPU per row, reading and planning counted: -apply / raw %s | %.1f / %.1f µs = %.2f "
        "| ≤ 1.25 | %s |" % (best, apply_cpu, raw_cpu, apply_cpu / raw_cpu, met(apply_cpu <= 1.25 * raw_cpu)),
    ]
    for name, (wait, capacity, rows, shape, target) in REGIMES.items():
        got = r[name]
        share = median(got["apply"]) / median(got["raw"])
        what = "%g ms a request%s" % (wait * 1e3, ", %d at once" % capacity if capacity else "")
        lines += [
            "| %s (%s): -apply rows/s while writing, %s rows | %s | | |"
            % (name, what, f"{rows:,}", rates(got["apply"])),
            "| %s: raw %s rows/s | %s | | |" % (name, "x".join(map(str, shape)), rates(got["raw"])),
            "| %s: -apply ÷ raw %s | %.0f %% | ≥ %.0f %% | %s |"
            % (name, "x".join(map(str, shape)), 100 * share, 100 * target, met(share >= target))]
        if got["probe"]:
            probe = got["probe"]
            ratio = median(probe["beside"]) / probe["alone"]
            lines.append("| %s: the live tenant's probe, median latency beside -apply ÷ alone "
                         "| %.1f ms ÷ %.1f ms = %.2f | ≤ 2.5 | %s |"
                         % (name, median(probe["beside"]) * 1e3, probe["alone"] * 1e3, ratio,
                            met(ratio <= 2.5)))
    peak = max(r["rss"].values())
    flat = peak - min(r["rss"].values())
    skipped = r["skipped_rss"]
    lines += [
        "| -rollback --yes ÷ -apply, wall, 20,000 rows | %.1f s ÷ %.1f s = %.2f | ≤ 2 | %s |"
        % (r["rollback_wall"], r["apply_wall"], r["rollback_ratio"], met(r["rollback_ratio"] <= 2)),
        "| peak RSS of -apply at %s rows | %s MB | ≤ 40 MB, flat | %s |"
        % (" / ".join(f"{n:,}" for n in sorted(r["rss"])),
           " / ".join("%.1f" % r["rss"][n] for n in sorted(r["rss"])), met(peak <= 40 and flat <= 5)),
        "| peak RSS of -dry-run, 1,000 / 100,000 rows all skipped | %.1f / %.1f MB | flat (≤ 3 MB apart) "
        "| %s |"
        % (skipped[1000], skipped[100000], met(skipped[100000] - skipped[1000] <= 3)),
        "| (information) -verify -verify-sample 0 ÷ -apply, wall, 20,000 rows | %.1f s ÷ %.1f s = %.2f | | |"
        % (r["verify_wall"], r["apply_wall"], r["verify_wall"] / r["apply_wall"]),
    ]
    if "big_apply_cpu" in r:
        rows = r["largest"]
        dry, applied = per_row(r["dry_cpu"], rows), per_row(r["big_apply_cpu"], rows)
        lines.append("| (information) CPU per row, {:,} rows: -dry-run / -apply (start-up {:.0f} ms "
                     "subtracted) | {:.1f} / {:.1f} µs = {:.2f} | | |".format(
                         rows, r["startup"] * 1e3, dry, applied, applied / dry))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round each, no 100,000-row runs")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--raw-client", nargs=4, metavar=("URL", "DATABASE_URL", "CONNECTIONS", "DEPTH"))
    args = parser.parse_args()
    if args.raw_client:
        url, database_url, connections, depth = args.raw_client
        raw_client(url, database_url, int(connections), int(depth))
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
