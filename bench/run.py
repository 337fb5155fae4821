"""`make bench`: what -apply, -verify and -rollback cost, as ratios measured in one run.

Everything runs on the Go stand-in of the plugin (tests/plugin.go: net/http, a pool of 25 PostgreSQL
connections, the §4 table with its GIN index) over a PostgreSQL that commits to disk (fsync on), on
the same two cores as the client.  Each contender runs against an emptied plugin, with a live
tenant's probe beside it (one small search every 20 ms on its own connection), and rounds alternate
between contenders: medians are compared, every round is reported.  CPU comes from the OS: the
client's own from wait4(), the plugin's and PostgreSQL's from /proc (PostgreSQL: the postmaster and
its children, live or reaped), the whole machine's from /proc/stat.

The regimes (shapes a real plugin takes):
- CPU bound: the plugin as it is.  -apply at its default and at --concurrency 1, 2, 4, 8, 16,
  against a lean raw client on sockets that POSTs the very bodies -apply writes (planned before its
  clock starts) over C connections with D requests pipelined on each (C = 1, 2, 4, 8, 16; D = 1, 4).
- waiting: each write holds its database connection 20 ms before it commits (a slow disk).
- at capacity: at most 4 requests worked on at once, 5 ms each, the others queued (live traffic).

Targets (issue 26): CPU bound, the default >= 95 % of the best lean shape's rows/s, its
whole-machine CPU per row <= 1.05 x that shape's, the probe <= 1.5 x its latency alone;
--concurrency N (2, 4, 8) >= 90 % of the lean N x 4, and a lower N never harder on the probe (beyond
a tenth, or 1 ms); waiting, the default >= 90 % of 16 plain threads (16 x 1); at capacity, the
default's probe <= 2.5 x; --max-rate within 5 % and gentler.  Issue 27: -verify of every row <= 1.5
x -apply right after -apply and once the plugin's index has settled (VACUUM), the -rollback preview
<= 1.5 x, a second -rollback --yes <= 1 x, searches per row <= 0.1 where no namespace holds more
than 100 records, peak RSS of -verify flat (100,000 rows within 10 MB of 1,000).

    python bench/run.py [--quick] [--record]

--quick: one round each, small runs (a smoke run, about three minutes); --record appends the tables
to bench/RESULTS.md.
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
import tempfile
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
RAW_PAUSE = (
    0.001  # a pipelining raw client reads answers every millisecond: its least CPU, its best rate
)
ROWS = 20000
TICK = os.sysconf("SC_CLK_TCK")
NOISE = 0.10  # single runs of one client vary this much here ...
PROBE_NOISE = 0.001  # ... and the probe's median by this much, in seconds, however small it is
PROBE_SECONDS = 0.02
CEILINGS = (None, 1, 2, 4, 8, 16)  # None: the default
SHAPES = [(c, d) for c in (1, 2, 4, 8, 16) for d in (1, 4)]
# regime -> the Go stand-in's shape, and the rows of a run at 1, 2 and more connections
REGIMES = {
    "CPU bound": ({}, 5000, 10000, ROWS),
    "waiting": ({"wait": 0.020}, 150, 300, 4000),
    "at capacity": ({"capacity": 4, "sleep": 0.005}, 400, 800, 3000),
}
PARTS = ("write", "modes")
MAX_RATES = (200, 100)  # --max-rate, at capacity (where the plugin does about 800 rows/s)
CONTENT = (
    "Deploys for the %s service go through staging first; rollback with the previous image tag if "
    "error rates rise above two percent (note %s)."
)
SECRET = " The CI token is GITHUB_TOKEN=ghp_%s." % ("x" * 36)
Run = namedtuple("Run", "wall cpu rss status out")  # seconds, CPU seconds, peak RSS MB
# rows/s; CPU per row: own µs, machine, plugin and postgres ms; the probe's median ms; wall s
Measured = namedtuple("Measured", "rate own machine plugin postgres probe seconds")


# --- setup -----------------------------------------------------------------------


def seed(cluster, rows: int, roots: int = 6, skipped: bool = False) -> str:
    """A legacy database with `rows` rows over a tree of `roots` roots, each with 3 teams of 2
    leaves (60 % LOCAL and 30 % TEAM on any workspace, 10 % GLOBAL on a root, 1 % holding a secret);
    skipped: every row in a workspace that does not exist."""
    name = cluster.create_database(
        "bench_legacy_%d_%d%s" % (rows, roots, "_skipped" if skipped else "")
    )
    db = cluster.connect(name)
    db.run(
        "CREATE TABLE workspaces (id uuid PRIMARY KEY, name text NOT NULL, parent_id uuid "
        "REFERENCES workspaces(id), status text NOT NULL DEFAULT 'active')"
    )
    db.run(
        "CREATE TABLE agent_memories (id uuid PRIMARY KEY, workspace_id uuid, content text NOT "
        "NULL, scope varchar(10) NOT NULL, namespace varchar(50) NOT NULL DEFAULT 'general', "
        "created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now())"
    )
    workspaces = []
    for _ in range(roots):
        root = str(uuid.uuid4())
        workspaces.append((root, None))
        for _ in range(3):
            team = str(uuid.uuid4())
            workspaces.append((team, root))
            workspaces += [(str(uuid.uuid4()), team) for _ in range(2)]
    db.run(
        "INSERT INTO workspaces SELECT id, 'w', parent FROM unnest(CAST(:ids AS uuid[]), "
        "CAST(:parents AS uuid[])) AS t(id, parent)",
        ids=[w for w, _ in workspaces],
        parents=[p for _, p in workspaces],
    )
    top = [w for w, parent in workspaces if parent is None]
    if skipped:
        top = [str(uuid.uuid4())] * roots
        workspaces = [(top[0], None)]
    db.run(
        "CREATE TEMP TABLE ws AS SELECT row_number() OVER () - 1 AS n, id FROM unnest(CAST(:ids AS "
        "uuid[])) id",
        ids=[w for w, _ in workspaces],
    )
    db.run(
        "CREATE TEMP TABLE roots AS SELECT row_number() OVER () - 1 AS n, id FROM unnest(CAST(:ids "
        "AS uuid[])) id",
        ids=top,
    )
    db.run(
        "INSERT INTO agent_memories (id, workspace_id, content, scope, created_at) SELECT "
        "gen_random_uuid(), CASE WHEN g % 10 = 9 THEN (SELECT id FROM roots WHERE n = g % :roots) "
        "ELSE (SELECT id FROM ws WHERE n = g % CAST(:workspaces AS int)) END, format(:content, "
        "'svc' || (g % 97), g) || CASE WHEN g % 100 = 0 THEN :secret ELSE '' END, CASE WHEN g % 10 "
        "= 9 THEN 'GLOBAL' WHEN g % 10 >= 6 THEN 'TEAM' ELSE 'LOCAL' END, timestamptz '2024-01-01' "
        "+ g * interval '1 second' FROM generate_series(1, CAST(:rows AS int)) g",
        content=CONTENT,
        secret=SECRET,
        rows=rows,
        roots=roots,
        workspaces=len(workspaces),
    )
    db.run("ANALYZE")
    db.close()
    return name


# --- measuring -------------------------------------------------------------------


def run_measured(argv, env) -> Run:
    """Wall seconds, CPU seconds and peak RSS of one fresh process.

    CPU comes from wait4(), for that process alone.  The peak is the kernel's high-water mark of its
    memory (VmHWM), sampled until it exits: rusage's ru_maxrss can count pages that a fork shares.
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
    return Run(
        wall, usage.ru_utime + usage.ru_stime, peak[0] / 1024.0, process.returncode, out.decode()
    )


def process_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of a live process (and of its children it has reaped)."""
    try:
        with open("/proc/%d/stat" % pid) as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = (
        int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    )
    return ticks / TICK


class MachineCPU:
    """CPU seconds so far: the machine's (busy, from /proc/stat), the plugin's, PostgreSQL's."""

    def __init__(self, postmaster: int):
        self.postmaster = postmaster

    def postgres(self) -> float:
        total = process_cpu(self.postmaster, children=True)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open("/proc/%s/stat" % entry) as stat_file:
                        if int(stat_file.read().rsplit(")", 1)[1].split()[1]) == self.postmaster:
                            total += process_cpu(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        return total

    def snapshot(self, plugin_pid: int) -> tuple[float, float, float]:
        with open("/proc/stat") as stat_file:
            ticks = [int(x) for x in stat_file.readline().split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / TICK  # all but idle and iowait
        return busy, process_cpu(plugin_pid), self.postgres()


def raw_client(url: str, database_url: str, connections: int, depth: int) -> None:
    """POST the very memories -apply writes, planned and encoded before the clock starts, over
    `connections` raw sockets with up to `depth` requests pipelined on each (reading answers every
    RAW_PAUSE when pipelining, as they come otherwise); print the seconds."""
    address = mb.parse_plugin_url(url)
    with mb.LegacyDatabase(mb.parse_database_url(database_url)) as database:
        tree = database.read_workspaces()
        planned = [mb.plan_row(row, tree) for row in database.rows()]
    setup = http.client.HTTPConnection(address.host, address.port)
    for target in {(p.target.namespace, p.target.kind) for p in planned}:
        setup.request("PUT", "/v1/namespaces/%s" % target[0], body=json.dumps({"kind": target[1]}))
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
                sock.sendall(b"".join(requests[sent : sent + count]))
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
                length = int(data[start : data.find(b"\r\n", start)])
                if len(data) < end + 4 + length:
                    break
                assert data[9:12] == b"201", data[:80]
                data = data[end + 4 + length :]
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
    """The cluster, the legacy databases by size, and the Go stand-in in one regime at a time."""

    def __init__(self, cluster, binary: str):
        from plugin_server import GoPlugin

        self.cluster = cluster
        self.binary = binary
        self.urls: dict = {}
        self.plugin: GoPlugin | None = None
        with open(cluster.workdir / "data" / "postmaster.pid") as pid_file:
            self.cpu = MachineCPU(int(pid_file.readline()))

    def database(self, rows: int, roots: int = 6) -> str:
        if (rows, roots) not in self.urls:
            self.urls[rows, roots] = self.cluster.url(seed(self.cluster, rows, roots))
        return self.urls[rows, roots]

    def start_plugin(self, **shape) -> float:
        """The Go stand-in in this shape; returns the probe's median latency with nothing else
        running.
        """
        from plugin_server import GoPlugin

        self.stop()
        self.plugin = GoPlugin(self.binary, self.cluster.login("bench_plugin"), **shape)
        with Probe(self.plugin.url) as alone:
            time.sleep(3)
        return alone.median()

    def env(self, database_url: str) -> dict:
        return {**os.environ, "DATABASE_URL": database_url, "MEMORY_PLUGIN_URL": self.plugin.url}

    def measure(self, contender, rows: int, roots: int = 6) -> Measured:
        """One run of a contender (a tool option list, or a raw shape) against an emptied plugin,
        the probe beside it: rows/s while writing, CPU per row (its own, µs; the machine's, the
        plugin's and PostgreSQL's, ms) and the probe's median latency."""
        url = self.database(rows, roots)
        self.plugin.reset()
        before = self.cpu.snapshot(self.plugin.pid)
        with Probe(self.plugin.url) as probe:
            if isinstance(contender, tuple):
                argv = [
                    sys.executable,
                    __file__,
                    "--raw-client",
                    self.plugin.url,
                    url,
                    *map(str, contender),
                ]
                done = run_measured(argv, self.env(url))
            else:
                done = run_measured(TOOL + ["-apply", "-q", "--json", *contender], self.env(url))
        after = self.cpu.snapshot(self.plugin.pid)
        assert done.status == 0, (contender, done.status, done.out[-600:])
        assert self.plugin.count() == rows, (contender, self.plugin.count())
        report = json.loads(done.out)
        seconds = report["stream"]["seconds"] if "stream" in report else report["seconds"]
        machine, plugin, postgres = (b - a for a, b in zip(before, after, strict=True))
        return Measured(
            rows / seconds,
            done.cpu / rows * 1e6,
            machine / rows * 1e3,
            plugin / rows * 1e3,
            postgres / rows * 1e3,
            probe.median(),
            done.wall,
        )

    def tool(self, rows: int, *args, roots: int = 6, reset: bool = False) -> Run:
        """One run of the tool (on an emptied plugin only with `reset`), its searches counted."""
        if reset:
            self.plugin.reset()
        done = run_measured(
            TOOL + list(args) + ["-q", "--json"], self.env(self.database(rows, roots))
        )
        assert done.status in (0, 2), (args, done.status, done.out[-600:])
        return done

    def stop(self) -> None:
        if self.plugin is not None:
            self.plugin.stop()
            self.plugin = None


def name_of(contender) -> str:
    if isinstance(contender, tuple):
        return "raw %dx%d" % contender
    return "-apply " + (
        " ".join(contender) if contender else "default (%d)" % mb.DEFAULT_WRITE_CONNECTIONS
    )


def ceiling_args(ceiling) -> list:
    return [] if ceiling is None else ["--concurrency", str(ceiling)]


def rows_for(regime: str, contender) -> int:
    """Rows of a run: fewer where one or two connections make it slow (the default's: the most)."""
    _, one, two, more = REGIMES[regime]
    connections = (
        contender[0]
        if isinstance(contender, tuple)
        else (int(contender[1]) if contender[:1] == ["--concurrency"] else None)
    )
    return one if connections == 1 else two if connections == 2 else more


def alternate(b: Bench, regime: str, contenders: list, rounds: int) -> dict:
    """Every contender once per round, the rounds one after another; name -> the runs."""
    runs: dict = {name_of(c): [] for c in contenders}
    for number in range(rounds):
        for contender in contenders:
            got = b.measure(contender, rows_for(regime, contender))
            runs[name_of(contender)].append(got)
            print(
                "%s round %d: %-26s %6.0f rows/s  own %5.1f µs/row  machine %.3f ms/row (plugin "
                "%.3f, PostgreSQL %.3f)  probe %.1f ms"
                % (
                    regime,
                    number + 1,
                    name_of(contender),
                    got.rate,
                    got.own,
                    got.machine,
                    got.plugin,
                    got.postgres,
                    got.probe * 1e3,
                ),
                flush=True,
            )
    return runs


def medians(runs: list) -> Measured:
    return Measured(*(median(getattr(run, field) for run in runs) for field in Measured._fields))


# --- the write path: issue 26 ------------------------------------------------------


def write_path(b: Bench, rounds: int) -> dict:
    """The three regimes: each its contenders, alternating, the probe beside every run."""
    result = {}
    contenders = [ceiling_args(c) for c in CEILINGS] + SHAPES
    alone = b.start_plugin()
    result["CPU bound"] = (alone, alternate(b, "CPU bound", contenders, rounds))
    alone = b.start_plugin(wait=0.020)
    result["waiting"] = (
        alone,
        alternate(b, "waiting", [[], ["--concurrency", "16"], (16, 1), (16, 4)], rounds),
    )
    alone = b.start_plugin(capacity=4, sleep=0.005)
    runs = alternate(b, "at capacity", [[], ["--concurrency", "4"], (4, 4)], rounds)
    for rate in MAX_RATES:
        args = ["--max-rate", str(rate)]
        runs[name_of(args)] = [b.measure(args, rate * 4) for _ in range(1 if rounds == 1 else 2)]
    result["at capacity"] = (alone, runs)
    b.stop()
    return result


def write_path_lines(result: dict) -> tuple[list, list]:
    """The tables of the write path, and its targets (name, measured, met)."""
    lines, targets = [], []
    for regime, (alone, runs) in result.items():
        lines += [
            "",
            "%s (the probe alone: %.2f ms). Medians of the rounds; per row: the client's own CPU, "
            "the whole machine's, the plugin's and PostgreSQL's." % (regime, alone * 1e3),
            "",
            "| contender | rows/s (rounds) | own µs/row | machine ms/row | plugin | PostgreSQL | "
            "probe ÷ alone |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, got in runs.items():
            m = medians(got)
            lines.append(
                "| %s | %.0f (%s) | %.1f | %.3f | %.3f | %.3f | %.2f |"
                % (
                    name,
                    m.rate,
                    ", ".join("%.0f" % run.rate for run in got),
                    m.own,
                    m.machine,
                    m.plugin,
                    m.postgres,
                    m.probe / alone,
                )
            )
    alone, runs = result["CPU bound"]
    m = {name: medians(got) for name, got in runs.items()}
    raws = {name: got for name, got in m.items() if name.startswith("raw")}
    best = max(raws, key=lambda name: raws[name].rate)
    default = m[name_of([])]
    targets += [
        (
            "CPU bound: the default ≥ 95 %% of the best lean shape (%s)" % best,
            "%.0f ÷ %.0f = %.0f %%"
            % (default.rate, raws[best].rate, 100 * default.rate / raws[best].rate),
            default.rate >= 0.95 * raws[best].rate,
        ),
        (
            "CPU bound: the default's whole-machine CPU per row ≤ 1.05 × %s's" % best,
            "%.3f ÷ %.3f = %.2f"
            % (default.machine, raws[best].machine, default.machine / raws[best].machine),
            default.machine <= 1.05 * raws[best].machine,
        ),
        (
            "CPU bound: the default's probe ≤ 1.5 × alone",
            "%.2f" % (default.probe / alone),
            default.probe <= 1.5 * alone,
        ),
    ]
    for ceiling in (2, 4, 8):
        mine, lean = m[name_of(ceiling_args(ceiling))], m["raw %dx4" % ceiling]
        targets.append(
            (
                "CPU bound: --concurrency %d ≥ 90 %% of raw %dx4" % (ceiling, ceiling),
                "%.0f %%" % (100 * mine.rate / lean.rate),
                mine.rate >= 0.90 * lean.rate,
            )
        )
    for lower, higher in ((1, 2), (2, 4), (4, 8), (8, 16)):
        low, high = m[name_of(ceiling_args(lower))].probe, m[name_of(ceiling_args(higher))].probe
        targets.append(
            (
                "CPU bound: --concurrency %d no harder on the probe than %d" % (lower, higher),
                "%.1f ≤ %.1f ms" % (low * 1e3, high * 1e3),
                low <= max((1 + NOISE) * high, high + PROBE_NOISE),
            )
        )
    alone, runs = result["waiting"]
    default, plain = medians(runs[name_of([])]), medians(runs["raw 16x1"])
    targets.append(
        (
            "waiting: the default ≥ 90 % of 16 plain threads (raw 16x1)",
            "%.0f ÷ %.0f = %.0f %%" % (default.rate, plain.rate, 100 * default.rate / plain.rate),
            default.rate >= 0.90 * plain.rate,
        )
    )
    alone, runs = result["at capacity"]
    default = medians(runs[name_of([])])
    targets.append(
        (
            "at capacity: the default's probe ≤ 2.5 × alone",
            "%.2f" % (default.probe / alone),
            default.probe <= 2.5 * alone,
        )
    )
    faster = default.probe
    for rate in MAX_RATES:
        got = medians(runs[name_of(["--max-rate", str(rate)])])
        targets.append(
            (
                "at capacity: --max-rate %d within 5 %%" % rate,
                "%.0f rows/s" % got.rate,
                abs(got.rate - rate) <= 0.05 * rate,
            )
        )
        targets.append(
            (
                "at capacity: --max-rate %d's probe ≤ the faster run's (beyond a tenth)" % rate,
                "%.1f ≤ %.1f ms" % (got.probe * 1e3, faster * 1e3),
                got.probe <= max((1 + NOISE) * faster, faster + PROBE_NOISE),
            )
        )
        faster = got.probe
    return lines, targets


# --- -verify and -rollback: issue 27 --------------------------------------------------


def settle(b: Bench) -> None:
    """The plugin's GIN index, its pending list merged (as autovacuum does in time)."""
    b.plugin.execute("VACUUM ANALYZE memories")


def searches(run: Run) -> int:
    return json.loads(run.out).get("searches", 0)


def other_modes(b: Bench, rounds: int, rows: int, roots: int) -> dict:
    """-apply, then at once -verify of every row; settled, -verify again; the -rollback preview;
    -rollback --yes; a second -rollback --yes on a plugin that holds none of the rows: each round on
    a fresh plugin."""
    b.start_plugin()
    runs: dict = {
        key: []
        for key in ("apply", "verify", "verify settled", "preview", "rollback", "rollback again")
    }
    for number in range(rounds):
        runs["apply"].append(b.tool(rows, "-apply", roots=roots, reset=True))
        assert b.plugin.count() == rows
        runs["verify"].append(b.tool(rows, "-verify", "-verify-sample", "0", roots=roots))
        settle(b)
        runs["verify settled"].append(b.tool(rows, "-verify", "-verify-sample", "0", roots=roots))
        runs["preview"].append(b.tool(rows, "-rollback", roots=roots))
        runs["rollback"].append(b.tool(rows, "-rollback", "--yes", roots=roots))
        assert b.plugin.count() == 0, "-rollback left records"
        runs["rollback again"].append(b.tool(rows, "-rollback", "--yes", roots=roots))
        print(
            "%d rows, %d roots, round %d: %s"
            % (
                rows,
                roots,
                number + 1,
                ", ".join(
                    "%s %.1f s (%d searches)" % (key, got[-1].wall, searches(got[-1]))
                    for key, got in runs.items()
                ),
            ),
            flush=True,
        )
    return runs


def memory_runs(b: Bench, quick: bool) -> dict:
    """Peak RSS of -apply and -verify at 1,000 rows and the largest size, and of -dry-run with every
    row skipped."""
    b.start_plugin()
    largest = 20000 if quick else 100000
    rss: dict = {}
    for rows in (1000, largest):
        rss["apply", rows] = b.tool(rows, "-apply", roots=40, reset=True).rss
        rss["verify", rows] = b.tool(rows, "-verify", "-verify-sample", "0", roots=40).rss
    for rows in (1000, largest):
        url = b.cluster.url(seed(b.cluster, rows, skipped=True))
        done = run_measured(TOOL + ["-dry-run", "-q", "--json"], b.env(url))
        rss["dry-run skipped", rows] = done.rss
    rss["largest"] = largest
    b.stop()
    return rss


def other_mode_lines(modes: dict, rss: dict) -> tuple[list, list]:
    lines, targets = [], []
    for (rows, roots), runs in modes.items():
        apply_wall = median(run.wall for run in runs["apply"])
        lines += [
            "",
            "-verify and -rollback, %s rows over %d workspaces (medians; seconds, and ÷ -apply's; "
            "searches per row):" % (f"{rows:,}", roots * 10),
            "",
            "| mode | seconds (rounds) | ÷ -apply | searches per row |",
            "|---|---|---:|---:|",
        ]
        for key, got in runs.items():
            wall = median(run.wall for run in got)
            lines.append(
                "| %s | %.1f (%s) | %.2f | %.3f |"
                % (
                    key,
                    wall,
                    ", ".join("%.1f" % run.wall for run in got),
                    wall / apply_wall,
                    median(searches(run) for run in got) / rows,
                )
            )
        if roots < 40:
            continue  # namespaces over 100 records: for information
        bounds = (
            ("verify", 1.5),
            ("verify settled", 1.5),
            ("preview", 1.5),
            ("rollback again", 1.0),
        )
        for key, bound in bounds:
            wall = median(run.wall for run in runs[key])
            targets.append(
                (
                    "%s of %s rows ≤ %.1f × -apply" % (key, f"{rows:,}", bound),
                    "%.1f ÷ %.1f s = %.2f" % (wall, apply_wall, wall / apply_wall),
                    wall <= bound * apply_wall,
                )
            )
        per_row = median(searches(run) for run in runs["verify"]) / rows
        targets.append(
            (
                "searches per row of -verify, no namespace over 100 records, ≤ 0.1",
                "%.3f" % per_row,
                per_row <= 0.1,
            )
        )
    largest = rss["largest"]
    lines += [
        "",
        "Peak RSS (MB): "
        + ", ".join(
            "%s %s rows %.1f" % (mode, f"{rows:,}", value)
            for (mode, rows), value in sorted(
                (key, value) for key, value in rss.items() if key != "largest"
            )
        ),
    ]
    grown = rss["verify", largest] - rss["verify", 1000]
    targets.append(
        (
            "peak RSS of -verify at %s rows within 10 MB of 1,000" % f"{largest:,}",
            "%.1f MB more" % grown,
            grown <= 10,
        )
    )
    grown = rss["apply", largest] - rss["apply", 1000]
    targets.append(
        (
            "peak RSS of -apply at %s rows within 5 MB of 1,000" % f"{largest:,}",
            "%.1f MB more" % grown,
            grown <= 5,
        )
    )
    grown = rss["dry-run skipped", largest] - rss["dry-run skipped", 1000]
    targets.append(
        ("peak RSS of -dry-run, every row skipped, within 3 MB", "%.1f MB more" % grown, grown <= 3)
    )
    return lines, targets


# --- the run -----------------------------------------------------------------------


def bench(quick: bool, parts: tuple) -> tuple[list, list]:
    from pg_cluster import start_cluster
    from plugin_server import build_go_plugin

    rounds = 1 if quick else ROUNDS
    if quick:
        REGIMES.update(
            {
                name: (shape, one // 4, two // 4, more // 4)
                for name, (shape, one, two, more) in REGIMES.items()
            }
        )
    cluster = start_cluster(durable=True)
    try:
        cluster.create_database("bench_plugin")
        b = Bench(cluster, build_go_plugin(tempfile.mkdtemp(prefix="bench-go-")))
        lines, targets = write_path_lines(write_path(b, rounds)) if "write" in parts else ([], [])
        if "modes" in parts:
            size = 5000 if quick else ROWS
            modes = {
                (size, 40): other_modes(b, rounds, size, 40),
                (size, 6): other_modes(b, 1, size, 6),
            }
            more_lines, more_targets = other_mode_lines(modes, memory_runs(b, quick))
            lines, targets = lines + more_lines, targets + more_targets
        b.stop()
    finally:
        cluster.stop()
    return lines, targets


def report(lines: list, targets: list, quick: bool, seconds: float) -> list:
    machine = "%s, %d cores, Python %s, %s" % (
        platform.machine(),
        os.cpu_count(),
        platform.python_version(),
        platform.platform(terse=True),
    )
    out = [
        "## %s — %s%s"
        % (datetime.date.today().isoformat(), machine, " (--quick)" if quick else ""),
        "",
        "The Go stand-in over a durable PostgreSQL; %d round%s each, rounds alternating between "
        "contenders." % (1 if quick else ROUNDS, "" if quick else "s"),
    ]
    out += lines
    out += ["", "| target | measured | met |", "|---|---|---|"]
    out += [
        "| %s | %s | %s |" % (name, value, "yes" if ok else "**no**") for name, value, ok in targets
    ]
    out += [
        "",
        "%d of %d targets met (the whole bench took %.0f s)"
        % (sum(ok for _, _, ok in targets), len(targets), seconds),
    ]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round each, small runs")
    parser.add_argument(
        "--record", action="store_true", help="append the tables to bench/RESULTS.md"
    )
    parser.add_argument(
        "--part",
        choices=PARTS,
        action="append",
        help="only this part (write: the write path's regimes; modes: -verify and "
        "-rollback, and memory); all by default",
    )
    parser.add_argument(
        "--raw-client", nargs=4, metavar=("URL", "DATABASE_URL", "CONNECTIONS", "DEPTH")
    )
    args = parser.parse_args()
    if args.raw_client:
        url, database_url, connections, depth = args.raw_client
        raw_client(url, database_url, int(connections), int(depth))
        return 0
    started = time.monotonic()
    lines, targets = bench(args.quick, tuple(args.part or PARTS))
    text = "\n".join(report(lines, targets, args.quick, time.monotonic() - started))
    print(text)
    if args.record:
        with open(HERE / "RESULTS.md", "a") as results:
            results.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
