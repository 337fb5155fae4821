"""`make bench`: what -apply, -verify and -rollback cost, as ratios measured in one run.

Starts a throwaway PostgreSQL, seeds legacy rows over a realistic tree (60
workspaces: 6 roots, 18 teams, 36 leaves; all three scopes; 1 % of the rows
hold a secret) and runs the test plugin (two processes behind one port, its
connections handed to them in turn; the real plugin's indexes; a connection's
requests served one at a time, as Go's net/http does) in each shape a real
plugin takes.  Each -apply runs against an emptied plugin, beside a lean raw
client on sockets that POSTs the very memories -apply writes (read and planned
before its clock starts) in a fixed shape of connections x requests pipelined
on each.

- CPU bound (the plugin as it is, sharing the two cores): -apply at its
  defaults >= 90 % of the best raw shape tried, and its CPU per row <= 1.25 x
  that client's (both with their reading and planning counted, start-up
  subtracted);
- the --concurrency sweep, in each regime (CPU bound; waiting: 20 ms per
  request, no limit on how many at once; at capacity: at most 4 requests worked
  on at once, 5 ms each, the others queue), with a probe beside every run (one
  small search every 20 ms on its own connection: the live tenant): -apply at
  --concurrency 1, 2, 4, 8, 16 and its default, and the raw client with as many
  connections (1x1, 2x4, 4x4, 8x4, 16x4; 16x1 where it waits).  Targets: the
  rate never falls as the ceiling rises and the probe's latency never rises as
  it falls, beyond noise (a tenth, or 1 ms of the probe: single runs vary that
  much here); each
  ceiling >= 85 % of the raw client with as many connections; waiting,
  --concurrency 16 >= 85 % of 16x1; at capacity, the default keeps the probe's
  median <= 2.5 x its median alone; --max-rate 100 and 200 within 5 % of the
  rate asked, the probe's latency falling with it;
- -rollback of 10,000 rows <= 2 x the wall time of -apply of the same rows;
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
ROWS = 10000  # -apply at its defaults against the best raw client, -rollback, -verify
# The --concurrency sweep: regime -> (wait per request, capacity, rows for one connection, for two, for more).
REGIMES = {"CPU bound": (0.0, 0, 2000, 5000, 6000), "waiting": (0.020, 0, 150, 300, 2400),
           "at capacity": (0.005, 4, 400, 800, 2400)}
CEILINGS = (1, 2, 4, 8, 16, None)  # None: the default
NOISE = 0.10  # single runs of one client vary this much here ...
PROBE_NOISE = 0.001  # ... and the probe's median by this much, in seconds, however small it is
MAX_RATES = (100, 200)  # --max-rate, at capacity (where the plugin does about 400 rows/s)
PROBE_SECONDS = 0.02
CONTENT = ("Deploys for the %s service go through staging first; rollback with the "
           "previous image tag if error rates rise above two percent (note %s).")
SECRET = " The CI token is GITHUB_TOKEN=ghp_%s." % ("x" * 36)
Run = namedtuple("Run", "wall cpu rss status out")  # seconds, CPU seconds, peak RSS MB


def writing(run: Run) -> float:
    """Seconds a client spent writing: from its first request to its last answer, as -apply's (or
    -rollback's) --json report says, or as the raw client prints it."""
    report = json.loads(run.out)
    return report["stream"]["seconds"] if "stream" in report else report["seconds"]


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


def shape_name(shape) -> str:
    return "x".join(map(str, shape))


def ceiling_name(ceiling) -> str:
    return "default (%d)" % mb.DEFAULT_WRITE_CONNECTIONS if ceiling is None else str(ceiling)


def sweep_rows(regime: str, connections) -> int:
    _, _, one, two, more = REGIMES[regime]
    return one if connections == 1 else two if connections == 2 else more


def raw_shape(ceiling: int) -> tuple[int, int]:
    """The raw client with as many connections as -apply may use at this ceiling."""
    return (1, 1) if ceiling == 1 else (ceiling, 4)


def beside_probe(b: Bench, client, rows: int, *args, **options) -> tuple[float, float]:
    """(rows/s while writing, the probe's median) of client(rows, *args), the live tenant's probe
    beside it."""
    with Probe(b.plugin.url) as probe:
        done = client(rows, *args, **options)
    return rows / writing(done), probe.median()


def sweep(b: Bench, regime: str) -> dict:
    """--concurrency 1, 2, 4, 8, 16 and the default, each beside the raw client with as many
    connections (and, where the plugin waits, 16 plain threads), the probe beside every run."""
    wait, capacity = REGIMES[regime][:2]
    b.start_plugin(wait, capacity)
    b.raw(sweep_rows(regime, 2), (2, 4))  # the plugin's first requests are slow: not measured
    with Probe(b.plugin.url) as alone:
        time.sleep(3)
    result = {"alone": alone.median(), "apply": {}, "raw": {}}
    for ceiling in CEILINGS:
        rows = sweep_rows(regime, ceiling)
        raw = ""
        if ceiling:
            shape = raw_shape(ceiling)
            result["raw"][shape] = beside_probe(b, b.raw, rows, shape)
            raw = ", raw %s %.0f rows/s (probe %.1f ms)" % (shape_name(shape), result["raw"][shape][0],
                                                            result["raw"][shape][1] * 1e3)
        concurrency = ["--concurrency", str(ceiling)] if ceiling else []
        result["apply"][ceiling] = beside_probe(b, b.tool, rows, "-apply", *concurrency, reset=True)
        assert b.plugin.count() == rows
        rate, probe = result["apply"][ceiling]
        print("%s, --concurrency %s: -apply %.0f rows/s (probe %.1f ms)%s"
              % (regime, ceiling_name(ceiling), rate, probe * 1e3, raw), flush=True)
    if regime == "waiting":
        rows = sweep_rows(regime, 16)
        result["raw"][(16, 1)] = beside_probe(b, b.raw, rows, (16, 1))
    return result


def max_rates(b: Bench) -> dict:
    """--max-rate at capacity (the plugin started by the last sweep), the probe beside it."""
    result = {}
    for rate in MAX_RATES:
        rows = rate * 4  # about four seconds
        result[rate] = beside_probe(b, b.tool, rows, "-apply", "--max-rate", str(rate), reset=True)
        print("at capacity, --max-rate %d: %.0f rows/s (probe %.1f ms)" % (rate, result[rate][0],
                                                                          result[rate][1] * 1e3), flush=True)
    return result


def bench(quick: bool) -> dict:
    from pg_cluster import start_cluster

    cluster = start_cluster()
    rounds = 1 if quick else ROUNDS
    r: dict = {"rounds": rounds}
    try:
        cluster.create_database("bench_plugin")
        sizes = {1000, 4000, ROWS} | {sweep_rows(regime, n) for regime in REGIMES for n in (1, 2, 4)}
        sizes |= {rate * 4 for rate in MAX_RATES}
        largest = 20000 if quick else 100000
        urls = {rows: cluster.url(seed(cluster, rows)) for rows in sorted(sizes | {largest})}
        for rows in (1000, 100000):
            urls[("skipped", rows)] = cluster.url(seed(cluster, rows, skipped=True))
        b = Bench(cluster, urls)

        # The --concurrency sweep in each regime, with the live tenant's probe; then --max-rate.
        r["sweep"] = {regime: sweep(b, regime) for regime in REGIMES}
        r["max_rate"] = max_rates(b)

        # CPU bound: -apply at its defaults against the best raw client, -rollback, -verify, memory.
        b.start_plugin()
        r["startup"] = median(run_measured(TOOL + ["-dry-run", "-q", "-limit", "1"], b.env(largest)).cpu
                              for _ in range(3))
        r["dry_cpu"] = median(b.tool(largest, "-dry-run").cpu for _ in range(1 if quick else 3))
        r["skipped_rss"] = {rows: b.tool(("skipped", rows), "-dry-run").rss for rows in (1000, 100000)}
        b.apply(1000)
        b.apply(4000)
        raws = r["sweep"]["CPU bound"]["raw"]
        best = max(raws, key=lambda shape: raws[shape][0])
        applies, raw_runs, rollbacks = [], [], []
        for number in range(rounds):
            applies.append(b.apply(ROWS))
            if number == 0:
                r["verify_wall"] = b.tool(ROWS, "-verify", "-verify-sample", "0").wall
            rollbacks.append(b.tool(ROWS, "-rollback", "--yes"))
            assert b.plugin.count() == 0, "-rollback left records"
            raw_runs.append(b.raw(ROWS, best))
            print("cpu bound round %d: -apply %.0f rows/s (%.0f with its start), raw %s %.0f rows/s, "
                  "-rollback %.1f s" % (number + 1, ROWS / writing(applies[-1]), ROWS / applies[-1].wall,
                                        shape_name(best), ROWS / raw_runs[-1].wall, rollbacks[-1].wall),
                  flush=True)
        r.update(best=best, apply_rates=[ROWS / writing(x) for x in applies],
                 apply_whole_rates=[ROWS / x.wall for x in applies],
                 raw_rates=[ROWS / x.wall for x in raw_runs],
                 apply_cpu=median(x.cpu for x in applies), raw_cpu=median(x.cpu for x in raw_runs),
                 apply_wall=median(x.wall for x in applies),
                 rollback_ratio=median(x.wall / y.wall for x, y in zip(rollbacks, applies, strict=True)),
                 rollback_wall=median(x.wall for x in rollbacks))
        r["big_apply_cpu"] = b.apply(largest).cpu
        r["largest"] = largest
        r["rss"] = b.rss
        b.stop()
    finally:
        cluster.stop()
    return r


def sweep_lines(r: dict, met) -> list:
    """The sweep's table, and whether each of its targets is met."""
    lines = ["", "The --concurrency sweep: rows/s while writing, and the live tenant's probe (median latency "
             "beside the run ÷ alone); the raw client with as many connections beside each ceiling.", "",
             "| regime | client | rows/s | probe | -apply ÷ raw |", "|---|---|---|---|---|"]
    targets = []
    for regime, got in r["sweep"].items():
        alone = got["alone"]
        previous = None
        for ceiling in CEILINGS:
            rate, probe = got["apply"][ceiling]
            shape = raw_shape(ceiling) if ceiling else None
            raw = got["raw"].get(shape)
            share = rate / raw[0] if raw else None
            lines.append("| %s | -apply --concurrency %s | %.0f | %.1f ms = %.2f | %s |" % (
                regime, ceiling_name(ceiling), rate, probe * 1e3, probe / alone,
                "%.0f %%" % (100 * share) if share else ""))
            if raw:
                lines.append("| %s | raw %s | %.0f | %.1f ms = %.2f | |" % (
                    regime, shape_name(shape), raw[0], raw[1] * 1e3, raw[1] / alone))
                targets.append(("%s: --concurrency %s ≥ 85 %% of raw %s"
                                % (regime, ceiling_name(ceiling), shape_name(shape)),
                                "%.0f %%" % (100 * share), share >= 0.85))
            if previous is not None:
                before, after = got["apply"][previous], got["apply"][ceiling]
                targets.append(("%s: --concurrency %s → %s, rate does not fall (beyond a tenth)"
                                 % (regime, ceiling_name(previous), ceiling_name(ceiling)),
                                 "%.0f → %.0f" % (before[0], after[0]), after[0] >= (1 - NOISE) * before[0]))
                targets.append(("%s: --concurrency %s → %s, the probe does not fall (beyond a tenth)"
                                 % (regime, ceiling_name(ceiling), ceiling_name(previous)),
                                 "%.1f → %.1f ms" % (after[1] * 1e3, before[1] * 1e3),
                                 before[1] <= max((1 + NOISE) * after[1], after[1] + PROBE_NOISE)))
            previous = ceiling
        if regime == "waiting":
            plain = got["raw"][(16, 1)]
            share = got["apply"][16][0] / plain[0]
            lines.append("| waiting | raw 16x1 (16 plain threads) | %.0f | %.1f ms = %.2f | |"
                         % (plain[0], plain[1] * 1e3, plain[1] / alone))
            targets.append(("waiting: --concurrency 16 ≥ 85 % of raw 16x1", "%.0f %%" % (100 * share),
                            share >= 0.85))
        if regime == "at capacity":
            probe = got["apply"][None][1] / alone
            targets.append(("at capacity: the default's probe ≤ 2.5 x alone (%.1f ms)" % (alone * 1e3),
                            "%.2f" % probe, probe <= 2.5))
            previous = got["apply"][None]
            for rate in sorted(r["max_rate"], reverse=True):
                got_rate, probe = r["max_rate"][rate]
                lines.append("| at capacity | -apply --max-rate %d | %.0f | %.1f ms = %.2f | |"
                             % (rate, got_rate, probe * 1e3, probe / alone))
                targets.append(("at capacity: --max-rate %d within 5 %%" % rate, "%.0f rows/s" % got_rate,
                                abs(got_rate - rate) <= 0.05 * rate))
                targets.append(("at capacity: --max-rate %d's probe ≤ the faster run's (beyond a tenth)"
                                % rate,
                                "%.1f ≤ %.1f ms" % (probe * 1e3, previous[1] * 1e3),
                                probe <= max((1 + NOISE) * previous[1], previous[1] + PROBE_NOISE)))
                previous = (got_rate, probe)
    lines += ["", "| sweep target | measured | met |", "|---|---|---|"]
    lines += ["| %s | %s | %s |" % (name, value, met(ok)) for name, value, ok in targets]
    return lines


def report(r: dict, quick: bool) -> list:
    machine = "%s, %d cores, Python %s, %s" % (platform.machine(), os.cpu_count(),
                                              platform.python_version(), platform.platform(terse=True))

    def met(ok):
        return "yes" if ok else "**no**"

    def rates(values):
        return "%.0f (%s)" % (median(values), ", ".join("%.0f" % x for x in values))

    def per_row(cpu, rows):
        return (cpu - r["startup"]) / rows * 1e6

    best = shape_name(r["best"])
    share = median(r["apply_rates"]) / median(r["raw_rates"])
    apply_cpu, raw_cpu = per_row(r["apply_cpu"], ROWS), per_row(r["raw_cpu"], ROWS)
    lines = [
        "## %s — %s%s" % (datetime.date.today().isoformat(), machine, " (--quick)" if quick else ""), "",
        "Medians of %d rounds (the rounds in brackets); -apply at its defaults." % r["rounds"], "",
        "| measure | value | target | met |", "|---|---|---|---|",
        "| CPU bound: -apply rows/s while writing, %s rows (with its start-up: %s) | %s | | |"
        % (f"{ROWS:,}", rates(r["apply_whole_rates"]), rates(r["apply_rates"])),
        "| CPU bound: raw %s rows/s (the best of the sweep's raw clients) | %s | | |"
        % (best, rates(r["raw_rates"])),
        "| CPU bound: -apply ÷ raw %s | %.0f %% | ≥ 90 %% | %s |" % (best, 100 * share, met(share >= 0.90)),
        "| CPU bound: CPU per row, reading and planning counted: -apply / raw %s | %.1f / %.1f µs = %.2f "
        "| ≤ 1.25 | %s |" % (best, apply_cpu, raw_cpu, apply_cpu / raw_cpu, met(apply_cpu <= 1.25 * raw_cpu)),
    ]
    peak = max(r["rss"].values())
    flat = peak - min(r["rss"].values())
    skipped = r["skipped_rss"]
    lines += [
        "| -rollback --yes ÷ -apply, wall, %s rows | %.1f s ÷ %.1f s = %.2f | ≤ 2 | %s |"
        % (f"{ROWS:,}", r["rollback_wall"], r["apply_wall"], r["rollback_ratio"],
           met(r["rollback_ratio"] <= 2)),
        "| peak RSS of -apply at %s rows | %s MB | ≤ 40 MB, flat | %s |"
        % (" / ".join(f"{n:,}" for n in sorted(r["rss"])),
           " / ".join("%.1f" % r["rss"][n] for n in sorted(r["rss"])), met(peak <= 40 and flat <= 5)),
        "| peak RSS of -dry-run, 1,000 / 100,000 rows all skipped | %.1f / %.1f MB | flat (≤ 3 MB apart) "
        "| %s |"
        % (skipped[1000], skipped[100000], met(skipped[100000] - skipped[1000] <= 3)),
        "| (information) -verify -verify-sample 0 ÷ -apply, wall, %s rows | %.1f s ÷ %.1f s = %.2f | | |"
        % (f"{ROWS:,}", r["verify_wall"], r["apply_wall"], r["verify_wall"] / r["apply_wall"]),
    ]
    rows = r["largest"]
    dry, applied = per_row(r["dry_cpu"], rows), per_row(r["big_apply_cpu"], rows)
    lines.append("| (information) CPU per row, {:,} rows: -dry-run / -apply (start-up {:.0f} ms "
                 "subtracted) | {:.1f} / {:.1f} µs = {:.2f} | | |".format(
                     rows, r["startup"] * 1e3, dry, applied, applied / dry))
    return lines + sweep_lines(r, met)


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
