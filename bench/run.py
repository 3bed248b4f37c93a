"""gridserver benchmarks: ``python bench/run.py [--quick] [--scenario NAME ...]``.

Starts a real server process (``python gridserver.py``) per scenario, drives it from thin
load-driver processes (``bench/driver.py``) over real sockets on 127.0.0.1, prints one
table row per run and writes the rows to ``bench/results/<scenario>.json``. Every process
it starts is stopped before it exits. Scenarios: grid-walk, grid-walk-fog, world, logins,
queries (``bench/bench_queries.py``), baseline (the thinnest Python fan-out, for comparison;
after grid-walk, at the counts grid-walk ran), memory (grid-walk and the baseline at two
counts, the server's RSS read from /proc; ``--soak MINUTES`` plays the last count that long).
``--plot FILE.png`` draws the grid-walk and baseline rows into a picture (matplotlib, the
``[bench]`` extra).

PostgreSQL is used when ``GRIDSERVER_BENCH_PG_DSN`` (default
``postgresql://root@127.0.0.1:5432/test``) answers; each run gets a fresh schema.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
import uuid

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
#: [journal] mode of the servers started (``--journal``).
JOURNAL_MODE = "replay"
#: [server] event_loop of the servers started (``--event-loop``).
EVENT_LOOP = "asyncio"
#: How ``bench/movers.py`` hands in its moves in the world scenario (``--moves``): "bulk"
#: (one ``EntityMoves`` per zone) or "updates" (one ``EntityUpdate`` per entity).
MOVES = "bulk"
PG_DSN = os.environ.get("GRIDSERVER_BENCH_PG_DSN", "postgresql://root@127.0.0.1:5432/test")
HOST = "127.0.0.1"


# -- helpers -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pg_ok() -> bool:
    try:
        import psycopg2
        psycopg2.connect(PG_DSN, connect_timeout=3).close()
        return True
    except Exception:  # noqa: BLE001
        return False


def pg_exec(sql: str) -> None:
    import psycopg2
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


class Database:
    """A fresh schema on PostgreSQL (or a temporary SQLite file) for one run."""

    def __init__(self, use_pg: bool):
        self.use_pg = use_pg
        self.name = "bench_" + uuid.uuid4().hex[:10]
        if use_pg:
            pg_exec(f"CREATE SCHEMA {self.name}")
            sep = "&" if "?" in PG_DSN else "?"
            self.dsn = f"{PG_DSN}{sep}options=-csearch_path%3D{self.name}"
        else:
            self.path = os.path.join("/tmp", self.name + ".db")
            self.dsn = f"sqlite:///{self.path}"

    def drop(self) -> None:
        if self.use_pg:
            pg_exec(f"DROP SCHEMA {self.name} CASCADE")
        else:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.remove(self.path + suffix)


class ServerProcess:
    """``python gridserver.py`` with settings given as GRIDSERVER_* environment variables."""

    def __init__(self, dsn: str, settings: dict[str, str]):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
        env.update({"GRIDSERVER_DATABASE_DSN": dsn, "GRIDSERVER_SERVER_PORT": str(self.port),
                    "GRIDSERVER_SERVER_DEBUG": "true", "GRIDSERVER_AUTH_BCRYPT_ROUNDS": "4",
                    "GRIDSERVER_DEBUG_LOG_LEVEL": "warning",
                    # every simulated player comes from 127.0.0.1: lift the per-address limits
                    "GRIDSERVER_SERVER_MAX_CONNECTIONS_PER_ADDRESS": "1000000",
                    "GRIDSERVER_AUTH_MAX_PENDING_HASHES": "8192",
                    "GRIDSERVER_JOURNAL_MODE": JOURNAL_MODE,
                    "GRIDSERVER_SERVER_EVENT_LOOP": EVENT_LOOP,
                    # debug is on for the debug routes; its replay check would run ticks twice
                    "GRIDSERVER_JOURNAL_VERIFY_EVERY": "0"})
        env.update(settings)
        self.log = open(os.path.join("/tmp", f"gridserver-bench-{self.port}.log"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "gridserver.py")], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://{HOST}:{self.port}"

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                async with http.get(self.url + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def metrics(http: aiohttp.ClientSession, server: ServerProcess) -> dict[str, float]:
    async with http.get(server.url + "/metrics") as r:
        return parse_metrics(await r.text())


def hist_quantile(m0: dict, m1: dict, name: str, q: float) -> float | None:
    """The q-quantile of a histogram's observations between two scrapes (linear in a bucket)."""
    pattern = re.compile(re.escape(name) + r'_bucket\{le="([^"]+)"\}')
    buckets = []
    for key, v1 in m1.items():
        m = pattern.fullmatch(key)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((le, v1 - m0.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            span = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / span if span else 1.0)
        prev_le, prev_count = le, count
    return prev_le


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def make_players(http: aiohttp.ClientSession, server: ServerProcess, n: int, prefix: str,
                       concurrency: int = 64) -> list[dict]:
    """Register and log in ``n`` players over REST."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict:
        name = f"{prefix}{i}"
        body = {"username": name, "password": "bench-password"}
        async with sem:
            async with http.post(server.url + "/api/auth/register", json=body) as r:
                if r.status not in (201, 409):
                    raise RuntimeError(f"register {name}: {r.status} {await r.text()}")
            async with http.post(server.url + "/api/auth/login", json=body) as r:
                login = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"login {name}: {r.status} {login}")
        return {"username": name, "token": login["token"]}

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def make_zones(http, server, token: str, n: int, size: int) -> list[str]:
    ids = []
    for i in range(n):
        async with http.post(server.url + "/api/zones", headers={"Authorization": f"Bearer {token}"},
                             json={"name": f"bench-{i}-{uuid.uuid4().hex[:6]}", "width": size, "height": size}) as r:
            zone = await r.json()
            if r.status != 201:
                raise RuntimeError(f"zone: {r.status} {zone}")
            ids.append(zone["id"])
    return ids


class Drivers:
    """Driver processes, each with its share of the players."""

    def __init__(self, server_port: int, players: list[dict], processes: int, intents_per_second: float = 1.0):
        self.procs = []
        shares = [players[i::processes] for i in range(processes)]
        for share in shares:
            p = subprocess.Popen([sys.executable, os.path.join(HERE, "driver.py")], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=HERE)
            p.stdin.write(json.dumps({"host": HOST, "port": server_port, "players": share,
                                      "intents_per_second": intents_per_second}) + "\n")
            p.stdin.flush()
            self.procs.append(p)

    async def ready(self) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        connected = failed = 0
        for p in self.procs:
            line = await loop.run_in_executor(None, p.stdout.readline)
            if not line.startswith("READY"):
                raise RuntimeError(f"driver failed: {line!r}")
            _, n, f = line.split()
            connected += int(n)
            failed += int(f)
        return connected, failed

    def go(self, seconds: float, linger: float = 3.0) -> None:
        for p in self.procs:
            p.stdin.write(f"GO {seconds} {linger}\n")
            p.stdin.flush()

    async def results(self) -> list[dict]:
        loop = asyncio.get_running_loop()
        out = []
        for p in self.procs:
            line = await loop.run_in_executor(None, p.stdout.readline)
            out.append(json.loads(line))
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def summarize(name: str, m0: dict, m1: dict, window: float, results: list[dict], extra: dict | None = None,
              starts: dict[tuple[str, int], float] | None = None, interval: float = 1.0) -> dict:
    """A row from two scrapes and the drivers' results. ``starts`` maps (zone id, tick number) to
    the tick's start (seconds since the epoch): latency is then also measured from it."""
    clients = sum(r["clients"] for r in results)
    alive = sum(r["alive"] for r in results)
    expected = m1["gridserver_tick_number"] - m0["gridserver_tick_number"]
    latencies, from_start, gaps, received = [], [], [], 0
    starts = starts or {}
    first_tick = m0["gridserver_tick_number"] + 1
    last_tick = m1["gridserver_tick_number"]
    for r in results:
        for zone, ticks in zip(r["zones"], r["ticks"]):
            prev = None
            for tick, lat, at in ticks:
                if first_tick <= tick <= last_tick:
                    received += 1
                    latencies.append(lat)
                    start = starts.get((zone, tick))
                    if start is not None:
                        from_start.append(at - start)
                    if prev is not None and prev[0] == tick - 1:
                        gaps.append(abs(at - prev[1] - interval))  # jitter: off the tick interval
                    prev = (tick, at)
    cpu = (m1["gridserver_process_cpu_seconds"] - m0["gridserver_process_cpu_seconds"]) / window
    driver_cpu = sum(r["cpu_seconds"] for r in results) / window
    ms = _ms

    row = {
        "scenario": name, "clients": clients + sum(r["connect_failures"] for r in results),
        "connected": clients, "alive": alive, "window_s": round(window, 1), "ticks": int(expected),
        "ticks_received_pct": round(100.0 * received / (clients * expected), 2) if clients and expected else None,
        "server_cpu_s_per_s": round(cpu, 3),
        "cpu_us_per_player_tick": round(cpu / clients / (expected / window) * 1e6, 1) if clients and expected else None,
        "rss_mib": round(m1["gridserver_process_resident_bytes"] / 2**20, 1),
        "lateness_p50_ms": ms(hist_quantile(m0, m1, "gridserver_tick_lateness_seconds", 0.5)),
        "lateness_p99_ms": ms(hist_quantile(m0, m1, "gridserver_tick_lateness_seconds", 0.99)),
        "work_p50_ms": ms(hist_quantile(m0, m1, "gridserver_tick_work_seconds", 0.5)),
        "work_p99_ms": ms(hist_quantile(m0, m1, "gridserver_tick_work_seconds", 0.99)),
        "broadcast_p50_ms": ms(hist_quantile(m0, m1, "gridserver_tick_broadcast_seconds", 0.5)),
        "broadcast_p99_ms": ms(hist_quantile(m0, m1, "gridserver_tick_broadcast_seconds", 0.99)),
        "zone_tick_p99_ms": ms(hist_quantile(m0, m1, "gridserver_zone_tick_seconds", 0.99)),
        "zone_tick_sum_s_per_tick": round((m1.get("gridserver_zone_tick_seconds_sum", 0)
                                           - m0.get("gridserver_zone_tick_seconds_sum", 0)) / max(1.0, expected), 4),
        "latency_p50_ms": ms(percentile(latencies, 0.5)), "latency_p99_ms": ms(percentile(latencies, 0.99)),
        "start_latency_p50_ms": ms(percentile(from_start, 0.5)),
        "start_latency_p99_ms": ms(percentile(from_start, 0.99)),
        "jitter_p50_ms": ms(percentile(gaps, 0.5)), "jitter_p99_ms": ms(percentile(gaps, 0.99)),
        "driver_cpu_s_per_s": round(driver_cpu, 3),
        "driver_cpu_max_process": round(max(r["cpu_seconds"] for r in results) / window, 3),
        "overruns": int(m1.get("gridserver_tick_overruns_total", 0) - m0.get("gridserver_tick_overruns_total", 0)),
        "intents_sent": sum(r["intents_sent"] for r in results),
        "intents_accepted": int(m1["gridserver_intents_accepted_total"] - m0["gridserver_intents_accepted_total"]),
    }
    if extra:
        row.update(extra)
    return row


COLUMNS = [("scenario", 16), ("journal", 7), ("loop", 7), ("clients", 7), ("alive", 6), ("ticks_received_pct", 7), ("server_cpu_s_per_s", 7),
           ("cpu_us_per_player_tick", 8), ("rss_mib", 7), ("lateness_p50_ms", 7), ("lateness_p99_ms", 7),
           ("work_p99_ms", 7), ("broadcast_p99_ms", 8), ("latency_p50_ms", 7), ("latency_p99_ms", 7),
           ("start_latency_p50_ms", 7), ("start_latency_p99_ms", 7), ("jitter_p99_ms", 7), ("driver_cpu_s_per_s", 7)]
#: lat: client latency from the frame's ``sent_at``; tlat: from the tick's start; jit99: how far
#: apart a client's consecutive ticks arrive, off the tick interval (p99)
HEADERS = ["scenario", "journal", "loop", "clients", "alive", "recv%", "cpu/s", "us/p/t", "RSS MiB", "late50", "late99",
           "work99", "bcast99", "lat50", "lat99", "tlat50", "tlat99", "jit99", "drvcpu"]


def print_header() -> None:
    print(" | ".join(h.rjust(w) for h, (_, w) in zip(HEADERS, COLUMNS)), flush=True)


def print_row(row: dict) -> None:
    print(" | ".join(str(row.get(k, "-") if row.get(k) is not None else "-").rjust(w) for k, w in COLUMNS), flush=True)


def save(name: str, rows: list[dict]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as fh:
        json.dump({"machine": machine(), "rows": rows}, fh, indent=1)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -- the picture -----------------------------------------------------------------------------

#: What ``--plot`` draws, one panel each: (title, [(row key, line style)], log scale).
PANELS = [
    ("server CPU, s per s (1 = one core)", [("server_cpu_s_per_s", "-")], False),
    ("tick start → client receipt, ms (p50 dashed, p99 solid)",
     [("start_latency_p50_ms", "--"), ("start_latency_p99_ms", "-")], True),
    ("jitter: arrival gap off 1 s, p99 ms (gridserver's tick lateness p99 dotted)",
     [("jitter_p99_ms", "-"), ("lateness_p99_ms", ":")], True),
    ("RSS, MiB", [("rss_mib", "-")], False),
]


def plot_series(walk: list[dict], base: list[dict]) -> dict[str, list[dict]]:
    """The lines of the picture: grid-walk's rows without fog (one line per journal mode and
    event loop, if the run had several) and the baseline's, each sorted by players."""
    lines: dict[str, list[dict]] = {}
    groups = sorted({(r.get("journal", "replay"), r.get("loop", "asyncio")) for r in walk if not r.get("fog_radius")})
    for journal, loop in groups:
        label = "gridserver" if len(groups) == 1 else f"gridserver (journal {journal}, {loop})"
        lines[label] = sorted((r for r in walk if not r.get("fog_radius") and r.get("journal", "replay") == journal
                               and r.get("loop", "asyncio") == loop), key=lambda r: r["clients"])
    if base:
        lines["baseline fan-out"] = sorted(base, key=lambda r: r["clients"])
    return lines


def plot(results: str, out: str) -> str:
    """Draw ``grid-walk.json`` and ``baseline.json`` of ``results`` into the PNG ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    def rows(name: str) -> tuple[list[dict], dict]:
        path = os.path.join(results, f"{name}.json")
        if not os.path.exists(path):
            return [], {}
        with open(path) as fh:
            data = json.load(fh)
        return data["rows"], data.get("machine", {})

    walk, where = rows("grid-walk")
    base, _ = rows("baseline")
    lines = plot_series(walk, base)
    if not lines:
        raise SystemExit(f"nothing to draw: no grid-walk or baseline rows in {results}")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, (title, keys, log) in zip(axes.flat, PANELS):
        for i, (label, series) in enumerate(lines.items()):
            color = f"C{i}"
            for key, style in keys:
                points = [(r["clients"], r[key]) for r in series if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=color, marker="o", markersize=4,
                            label=label if style == "-" else None)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        if keys[0][0] == "server_cpu_s_per_s":
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("players")
    axes.flat[0].legend(fontsize=9)
    fig.suptitle("grid-walk (fog off, 50 players a zone, 1 s tick) beside the thinnest fan-out, one run"
                 + (f" ({where.get('cpus')} CPUs, Python {where.get('python')}, {where.get('time', '')[:10]})"
                    if where else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


PROFILE_DIR: str | None = None


def profile(server: ServerProcess, seconds: float) -> subprocess.Popen | None:
    """With ``--profile DIR``: py-spy samples the server for the window (collapsed stacks, a
    line per thread and stack): only the thread holding the GIL, so the samples split the
    interpreter's time between the event loop, the game thread and the flush."""
    if not PROFILE_DIR:
        return None
    os.makedirs(PROFILE_DIR, exist_ok=True)
    out = os.path.join(PROFILE_DIR, f"server-{server.port}.txt")
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen([spy, "record", "-p", str(server.proc.pid), "-d", str(int(seconds)), "-f", "raw",
                             "-o", out, "--nonblocking", "--threads", "--gil"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: Each process may hold 20,000 descriptors here: the server needs one per client and a few more.
KNEE_LIMIT = 19_000


def meets_targets(row: dict) -> bool:
    """The grid-walk bars of the benchmark issue."""
    return (row["alive"] == row["clients"] and (row["ticks_received_pct"] or 0) >= 99.5 and not row["overruns"]
            and (row["lateness_p99_ms"] or 0) <= 25 and (row["latency_p99_ms"] or 1e9) <= 250
            and row["rss_mib"] <= 1536)


# -- scenarios -----------------------------------------------------------------------------

async def grid_walk(players_total: int, per_zone: int, fog: int, window: float, use_pg: bool,
                    drivers: int, soak: float = 0) -> dict:
    db = Database(use_pg)
    server = ServerProcess(db.dsn, {"GRIDSERVER_GAME_MODULES_WALKERS_FOG_RADIUS": str(fog),
                                    "GRIDSERVER_WEBSOCKET_HEARTBEAT": "30"})
    drv = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            await server.wait_ready(http)
            players = await make_players(http, server, players_total, "walker")
            zones = await make_zones(http, server, players[0]["token"], max(1, players_total // per_zone), 64)
            for i, p in enumerate(players):
                p["zone_id"] = zones[i % len(zones)]
            drv = Drivers(server.port, players, drivers)
            await drv.ready()
            await asyncio.sleep(3)  # joins processed, avatars spawned
            name = "grid-walk-fog" if fog else "grid-walk"

            async def one_window(length: float, first: bool) -> dict:
                m0 = await metrics(http, server)
                t0 = time.monotonic()
                spy = profile(server, length) if first else None
                drv.go(length)
                await asyncio.sleep(length)
                m1 = await metrics(http, server)
                elapsed = time.monotonic() - t0  # the window the scrapes span, not the collection after it
                results = await drv.results()
                if spy:
                    spy.wait()
                starts = await journal_starts(http, server, players[0]["token"], results)
                return summarize(name, m0, m1, elapsed, results, {"zones": len(zones), "fog_radius": fog,
                                                                  "journal": JOURNAL_MODE, "loop": EVENT_LOOP}, starts)

            return await play_windows(server.proc.pid, window, soak, one_window)
    finally:
        if drv:
            drv.stop()
        server.stop()
        db.drop()


def machine_cpu() -> float:
    """CPU seconds every process on the machine has used since boot (user, nice, system...)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


async def journal_starts(http: aiohttp.ClientSession, server: ServerProcess, token: str,
                         results: list[dict]) -> dict[tuple[str, int], float]:
    """Each zone tick's start (seconds since the epoch) as the journal holds it: the ``at`` of
    ``GET /api/debug/zones/{id}/history``, the time the tick's inputs were taken. Read after
    the window, so the measurement is not disturbed; none with the journal off."""
    if JOURNAL_MODE != "replay":
        return {}
    span: dict[str, tuple[int, int]] = {}
    for r in results:
        for zone, ticks in zip(r["zones"], r["ticks"]):
            if ticks:
                lo, hi = span.get(zone, (ticks[0][0], ticks[-1][0]))
                span[zone] = (min(lo, ticks[0][0]), max(hi, ticks[-1][0]))
    starts: dict[tuple[str, int], float] = {}
    sem = asyncio.Semaphore(8)

    async def one(zone: str, lo: int, hi: int) -> None:
        async with sem, http.get(f"{server.url}/api/debug/zones/{zone}/history", params={"from": lo, "to": hi},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(f"history: {r.status} {body}")
        for t in body["ticks"]:
            starts[zone, t["tick_number"]] = datetime.datetime.fromisoformat(t["at"]).timestamp()

    await asyncio.gather(*(one(zone, lo, hi) for zone, (lo, hi) in span.items()))
    return starts


class RssSampler:
    """A process's resident size, read from /proc every ``every`` seconds until ``stop``."""

    def __init__(self, pid: int, every: float = 5.0):
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self._task = asyncio.ensure_future(self._run())

    def sample(self) -> None:
        self.samples.append((time.time(), proc_cpu_rss(self.pid)[1]))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)

    def stop(self) -> dict:
        self._task.cancel()
        self.sample()
        rss = [b for _, b in self.samples]
        return {"rss_start_mib": _mib(rss[0]), "rss_end_mib": _mib(rss[-1]), "rss_max_mib": _mib(max(rss)),
                "rss_samples": [[round(t - self.samples[0][0], 1), _mib(b)] for t, b in self.samples]}


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


#: What a soak keeps of each of its windows.
SERIES = ["window_s", "ticks", "ticks_received_pct", "alive", "server_cpu_s_per_s", "rss_mib", "lateness_p99_ms",
          "latency_p50_ms", "latency_p99_ms", "start_latency_p50_ms", "start_latency_p99_ms", "jitter_p99_ms"]


async def play_windows(pid: int, window: float, soak: float, one_window) -> dict:
    """One measured window; with ``soak`` (seconds), back-to-back windows of about a minute
    through it instead. The server's RSS is read from /proc every 5 s throughout: its start is
    once every player is connected and subscribed. The row is the last window's, with the
    RSS figures and (soak) each window's main figures."""
    count = max(2, round(soak / 60)) if soak else 1
    length = soak / count if soak else window
    sampler = RssSampler(pid)
    series = []
    try:
        for i in range(count):
            series.append(await one_window(length, i == 0))
            if soak:
                print_row(dict(series[-1], scenario=f"{series[-1]['scenario'][:11]} {i + 1}/{count}"))
    finally:
        rss = sampler.stop()
    row = dict(series[-1], **rss)
    if soak:
        row.update({"soak_s": round(soak), "series": [{k: r.get(k) for k in SERIES} for r in series]})
    return row


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and resident bytes of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


async def baseline(players_total: int, per_zone: int, window: float, drivers: int, soak: float = 0) -> dict:
    """The same workload against ``bench/baseline_fanout.py``: what the thinnest fan-out costs."""
    port = free_port()
    starts_file = os.path.join("/tmp", f"baseline-starts-{port}.txt")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "baseline_fanout.py"), str(port), str(per_zone),
                             starts_file], stdout=subprocess.PIPE, text=True)
    drv = None
    try:
        assert proc.stdout.readline().startswith("READY")
        zones = [str(uuid.uuid4()) for _ in range(max(1, players_total // per_zone))]
        players = [{"token": "none", "zone_id": zones[i % len(zones)]} for i in range(players_total)]
        drv = Drivers(port, players, drivers)
        await drv.ready()
        await asyncio.sleep(2)

        async def one_window(length: float, first: bool) -> dict:
            cpu0, _ = proc_cpu_rss(proc.pid)
            t0 = time.monotonic()
            drv.go(length)
            await asyncio.sleep(length)
            cpu1, rss = proc_cpu_rss(proc.pid)
            elapsed = time.monotonic() - t0
            results = await drv.results()
            seen = [t for r in results for ticks in r["ticks"] for t, _, _ in ticks]
            first_tick, last_tick = min(seen) + 1, min(seen) + round(elapsed)  # the ticks due in the window
            with open(starts_file) as fh:
                started = dict(line.split() for line in fh)
            starts = {(zone, n): float(started[str(n)]) for zone in zones
                      for n in range(first_tick, last_tick + 1) if str(n) in started}
            zero = {"gridserver_intents_accepted_total": 0}
            m0 = dict(zero, gridserver_tick_number=first_tick - 1, gridserver_process_cpu_seconds=cpu0)
            m1 = dict(zero, gridserver_tick_number=last_tick, gridserver_process_cpu_seconds=cpu1,
                      gridserver_process_resident_bytes=rss)
            return summarize("baseline", m0, m1, elapsed, results, {"zones": len(zones)}, starts)

        return await play_windows(proc.pid, window, soak, one_window)
    finally:
        if drv:
            drv.stop()
        proc.kill()
        proc.wait()
        if os.path.exists(starts_file):
            os.remove(starts_file)


async def world(zones: int, per_zone: int, window: float, use_pg: bool) -> dict:
    """1,000 zones of entities the module moves every tick, no players: tick cost and flush cost."""
    db = Database(use_pg)
    server = ServerProcess(db.dsn, {"GRIDSERVER_GAME_MODULE": "bench.movers",
                                    "GRIDSERVER_BENCH_MOVERS_ZONES": str(zones),
                                    "GRIDSERVER_BENCH_MOVERS_ENTITIES": str(per_zone),
                                    "GRIDSERVER_BENCH_MOVERS_BULK": "1" if MOVES == "bulk" else "0",
                                    "GRIDSERVER_TICK_ZONE_TIMEOUT": "5"})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            await server.wait_ready(http, timeout=300)
            await asyncio.sleep(8)  # entities created and a first flush of all of them done
            m0 = await metrics(http, server)
            busy0 = machine_cpu()
            t0 = time.monotonic()
            spy = profile(server, window)
            await asyncio.sleep(window)
            m1 = await metrics(http, server)
            busy1 = machine_cpu()
            if spy:
                spy.wait()
            elapsed = time.monotonic() - t0

        ticks = m1["gridserver_tick_number"] - m0["gridserver_tick_number"]
        server_cpu = m1["gridserver_process_cpu_seconds"] - m0["gridserver_process_cpu_seconds"]
        flushes = m1["gridserver_flushes_total"] - m0["gridserver_flushes_total"]
        rows = m1["gridserver_entities_flushed_total"] - m0["gridserver_entities_flushed_total"]
        row = summarize_server_only("world", m0, m1, elapsed)
        row.update({
            "clients": 0, "alive": 0, "zones": zones, "entities": int(m1["gridserver_entities"]),
            "work_p50_ms": _ms(hist_quantile(m0, m1, "gridserver_tick_work_seconds", 0.5)),
            "zone_tick_sum_s_per_tick": round((m1["gridserver_zone_tick_seconds_sum"]
                                               - m0["gridserver_zone_tick_seconds_sum"]) / max(1.0, ticks), 4),
            "flushes": int(flushes), "rows_per_flush": int(rows / flushes) if flushes else 0,
            "flush_p50_ms": _ms(hist_quantile(m0, m1, "gridserver_flush_duration_seconds", 0.5)),
            "flush_max_ms": _ms(hist_quantile(m0, m1, "gridserver_flush_duration_seconds", 1.0)),
            "overruns": int(m1["gridserver_tick_overruns_total"] - m0["gridserver_tick_overruns_total"]),
            "database": "PostgreSQL" if use_pg else "SQLite",
            # what the rest of the machine (PostgreSQL included) used meanwhile: on a shared
            # machine, other work takes the cores the server's threads wait for
            "other_cpu_s_per_s": round((busy1 - busy0 - server_cpu) / elapsed, 3),
        })
        return row
    finally:
        server.stop()
        db.drop()


async def logins(players_total: int, burst: int, use_pg: bool, drivers: int) -> dict:
    """A burst of concurrent logins at the default bcrypt cost (12) while players play."""
    db = Database(use_pg)
    accounts = 20
    server = ServerProcess(db.dsn, {"GRIDSERVER_GAME_MODULES_WALKERS_FOG_RADIUS": "0"})
    drv = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            await server.wait_ready(http)
            players = await make_players(http, server, players_total, "walker")
            zones = await make_zones(http, server, players[0]["token"], max(1, players_total // 50), 64)
            server.stop()  # again at the default cost: the burst's accounts get cost-12 hashes
            server = ServerProcess(db.dsn, {"GRIDSERVER_GAME_MODULES_WALKERS_FOG_RADIUS": "0",
                                            "GRIDSERVER_AUTH_BCRYPT_ROUNDS": "12",
                                            # one address may hold an eighth of the queue
                                            "GRIDSERVER_AUTH_MAX_PENDING_HASHES": str(8 * (burst + accounts))})
            await server.wait_ready(http)
            await make_players(http, server, accounts, "slow", concurrency=accounts)
            for i, p in enumerate(players):  # sessions survive the restart
                p["zone_id"] = zones[i % len(zones)]
            drv = Drivers(server.port, players, drivers)
            await drv.ready()
            await asyncio.sleep(3)
            m0 = await metrics(http, server)
            t0 = time.monotonic()
            drv.go(600)
            times = []

            async def login(i: int) -> None:
                body = {"username": f"slow{i % accounts}", "password": "bench-password"}
                start = time.monotonic()
                async with http.post(server.url + "/api/auth/login", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"login: {r.status}")
                times.append(time.monotonic() - start)

            await asyncio.gather(*(login(i) for i in range(burst)))
            elapsed = time.monotonic() - t0
            m1 = await metrics(http, server)
            row = summarize_server_only("logins", m0, m1, elapsed)
            row.update({"clients": players_total, "burst": burst, "bcrypt_rounds": 12,
                        "burst_seconds": round(elapsed, 1), "logins_per_s": round(burst / elapsed, 1),
                        "login_p50_ms": round(1000 * percentile(times, 0.5)),
                        "login_p99_ms": round(1000 * percentile(times, 0.99))})
            return row
    finally:
        if drv:
            drv.stop()
        server.stop()
        db.drop()


def summarize_server_only(name: str, m0: dict, m1: dict, elapsed: float) -> dict:
    """A row from two /metrics scrapes, for scenarios measured on the server alone."""
    ms = _ms
    return {
        "scenario": name, "window_s": round(elapsed, 1),
        "ticks": int(m1["gridserver_tick_number"] - m0["gridserver_tick_number"]),
        "server_cpu_s_per_s": round((m1["gridserver_process_cpu_seconds"] - m0["gridserver_process_cpu_seconds"])
                                    / elapsed, 3),
        "rss_mib": round(m1["gridserver_process_resident_bytes"] / 2**20, 1),
        "lateness_p50_ms": ms(hist_quantile(m0, m1, "gridserver_tick_lateness_seconds", 0.5)),
        "lateness_p99_ms": ms(hist_quantile(m0, m1, "gridserver_tick_lateness_seconds", 0.99)),
        "lateness_max_ms": ms(hist_quantile(m0, m1, "gridserver_tick_lateness_seconds", 1.0)),
        "work_p99_ms": ms(hist_quantile(m0, m1, "gridserver_tick_work_seconds", 0.99)),
        "broadcast_p99_ms": ms(hist_quantile(m0, m1, "gridserver_tick_broadcast_seconds", 0.99)),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, short smoke run (what CI runs)")
    parser.add_argument("--scenario", action="append", help="run only these (repeatable)")
    parser.add_argument("--clients", type=int, action="append", help="grid-walk client counts")
    parser.add_argument("--window", type=float, help="seconds measured per run")
    parser.add_argument("--drivers", type=int, default=2, help="driver processes")
    parser.add_argument("--sqlite", action="store_true", help="use SQLite even when PostgreSQL answers")
    parser.add_argument("--profile", metavar="DIR", help="sample the server with py-spy into DIR")
    parser.add_argument("--out", metavar="DIR", help="where the JSON results go (default bench/results)")
    parser.add_argument("--journal", choices=["replay", "off", "both"], default="replay",
                        help="[journal] mode of the server; both: grid-walk and world run twice, off then replay, "
                             "so the journal's cost is measured in one run")
    parser.add_argument("--event-loop", choices=["asyncio", "uvloop", "auto", "both"], default="asyncio",
                        help="[server] event_loop of the server; both: grid-walk and world run twice, asyncio then "
                             "uvloop (pip install -e '.[fast]'), so what uvloop saves is measured in one run")
    parser.add_argument("--moves", choices=["bulk", "updates", "both"], default="bulk",
                        help="world: how the movers hand in their moves (one EntityMoves per zone, or one "
                             "EntityUpdate per entity); both: world runs twice, updates then bulk, in one run")
    parser.add_argument("--knee", action="store_true",
                        help="grid-walk: past the last count, add 2,500 players a run until a target breaks")
    parser.add_argument("--soak", type=float, metavar="MINUTES",
                        help="memory: the last count plays this long (gridserver, then the baseline), in windows "
                             "of about a minute, its RSS read every 5 s")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw the grid-walk and baseline rows of the results (--out) into this PNG after "
                             "the run (pip install -e '.[bench]')")
    parser.add_argument("--no-run", action="store_true", help="run nothing: with --plot, draw the rows already there")
    args = parser.parse_args()
    global PROFILE_DIR, RESULTS, JOURNAL_MODE, EVENT_LOOP, MOVES
    PROFILE_DIR = args.profile
    RESULTS = args.out or RESULTS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.no_run:
        if not args.plot:
            parser.error("--no-run draws the rows already written: give --plot")
        plot(RESULTS, args.plot)
        return 0
    if args.plot:
        import matplotlib  # noqa: F401 - fail now, not after the run
    use_pg = not args.sqlite and pg_ok()
    window = args.window or (4.0 if args.quick else 30.0)
    scenarios = args.scenario or ["grid-walk", "grid-walk-fog", "world", "queries", "logins", "baseline"]
    WALKED.clear()
    print(f"database: {'PostgreSQL' if use_pg else 'SQLite'}; window {window:.0f} s; {os.cpu_count()} CPUs")
    print_header()
    modes = ["off", "replay"] if args.journal == "both" else [args.journal]
    loops = ["asyncio", "uvloop"] if args.event_loop == "both" else [args.event_loop]
    for scenario in scenarios:
        rows = []
        twice = scenario in ("grid-walk", "grid-walk-fog", "world")
        forms = (["updates", "bulk"] if args.moves == "both" else [args.moves]) if scenario == "world" else [MOVES]
        for mode in modes if twice else [modes[-1]]:
            for loop in loops if twice else [loops[-1]]:
                for moves in forms:
                    JOURNAL_MODE, EVENT_LOOP, MOVES = mode, loop, moves
                    code = await _run_scenario(scenario, args, window, use_pg, rows)
                    if code is not None:
                        return code
        if scenario != "queries":
            save(scenario, rows)
    if args.plot:
        print(f"plot: {plot(RESULTS, args.plot)}")
    return 0


#: The grid-walk counts (fog off) this run has measured: the baseline's, when it runs after.
WALKED: list[int] = []


async def memory(counts: list[int], soak: float, window: float, use_pg: bool, drivers: int) -> list[dict]:
    """grid-walk (fog off) and the baseline at each count; the last count for ``soak`` seconds
    if given. RSS per 1,000 players: the RSS's rise from the first count to the last, both
    read once every player is connected and subscribed."""
    rows: list[dict] = []
    for i, n in enumerate(counts):
        last = i == len(counts) - 1
        for kind in ("gridserver", "baseline"):
            if kind == "gridserver":
                row = await grid_walk(n, 50 if n >= 50 else n, 0, window, use_pg, drivers, soak if last else 0)
            else:
                row = await baseline(n, 50 if n >= 50 else n, window, drivers, soak if last else 0)
            row["server"] = kind
            print_row(row)
            rows.append(row)
    summary: dict = {"scenario": "memory", "counts": counts, "soak_s": round(soak)}
    for kind in ("gridserver", "baseline"):
        mine = [r for r in rows if r["server"] == kind]
        lo, hi = mine[0], mine[-1]
        per_1000 = ((hi["rss_start_mib"] - lo["rss_start_mib"]) / (hi["clients"] - lo["clients"]) * 1000
                    if hi["clients"] != lo["clients"] else None)
        summary[kind] = {"rss_per_1000_players_mib": None if per_1000 is None else round(per_1000, 1),
                         "rss_mib_at": {str(r["clients"]): r["rss_start_mib"] for r in mine},
                         "last": {k: hi[k] for k in ("clients", "rss_start_mib", "rss_end_mib", "rss_max_mib")}}
        at = ", ".join(f"{r['rss_start_mib']} MiB at {r['clients']:,}" for r in mine)
        per = f"; {per_1000:.1f} MiB per 1,000 players" if per_1000 is not None else ""
        span = round(soak) if soak else hi["window_s"]
        line = (f"memory, {kind}: RSS {at} players{per}; at {hi['clients']:,} over {span} s: start "
                f"{hi['rss_start_mib']}, end {hi['rss_end_mib']}, max {hi['rss_max_mib']} MiB")
        print(line, flush=True)
    rows.append(summary)
    return rows


async def _run_scenario(scenario: str, args: argparse.Namespace, window: float, use_pg: bool,
                        rows: list[dict]) -> int | None:
    """One scenario at the current ``JOURNAL_MODE``; its rows go into ``rows``."""
    if scenario in ("grid-walk", "grid-walk-fog"):
        counts = args.clients or ([40] if args.quick else ([1000, 5000, 10000] if scenario == "grid-walk" else [5000]))
        counts = list(counts)
        while counts:
            n = counts.pop(0)
            row = await grid_walk(n, 50 if n >= 50 else n, 8 if scenario.endswith("fog") else 0, window,
                                  use_pg, 1 if args.quick else args.drivers)
            print_row(row)
            rows.append(row)
            if scenario == "grid-walk" and n not in WALKED:
                WALKED.append(n)
            if args.knee and not counts and meets_targets(row) and n + 2500 <= KNEE_LIMIT:
                counts.append(n + 2500)
    elif scenario == "world":
        zones, per_zone = (20, 50) if args.quick else (1000, 100)
        row = await world(zones, per_zone, window if not args.quick else 4.0, use_pg)
        row["journal"], row["loop"], row["moves"] = JOURNAL_MODE, EVENT_LOOP, MOVES
        print("world: " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("scenario", "clients", "alive")),
              flush=True)
        rows.append(row)
    elif scenario == "logins":
        n, burst = (40, 10) if args.quick else ((args.clients or [2000])[0], 500)
        row = await logins(n, burst, use_pg, 1 if args.quick else args.drivers)
        print("logins: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "scenario"), flush=True)
        rows.append(row)
    elif scenario == "queries":
        cmd = [sys.executable, os.path.join(HERE, "bench_queries.py")] + (["--quick"] if args.quick else [])
        code = subprocess.call(cmd)
        if code:
            return code
    elif scenario == "baseline":
        # at the counts grid-walk ran in this run (--knee adds some), so each has its baseline beside it
        for n in WALKED or args.clients or ([40] if args.quick else [1000, 5000, 10000]):
            row = await baseline(n, 50 if n >= 50 else n, window, 1 if args.quick else args.drivers)
            print_row(row)
            rows.append(row)
    elif scenario == "memory":
        rows.extend(await memory(args.clients or ([20, 40] if args.quick else [2000, 10000]),
                                 60 * (args.soak or 0), window, use_pg, 1 if args.quick else args.drivers))
    else:
        print(f"unknown scenario {scenario}", file=sys.stderr)
        return 2
    return None


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
