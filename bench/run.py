"""gridserver benchmarks: ``python bench/run.py [--quick] [--scenario NAME ...]``.

Starts a real server process (``python gridserver.py``) per scenario, drives it from thin
load-driver processes (``bench/driver.py``) over real sockets on 127.0.0.1, prints one
table row per run and writes the rows to ``bench/results/<scenario>.json``. Every process
it starts is stopped before it exits. Scenarios: grid-walk, grid-walk-fog, world, logins,
queries (``bench/bench_queries.py``), baseline (the thinnest Python fan-out, for comparison).

PostgreSQL is used when ``GRIDSERVER_BENCH_PG_DSN`` (default
``postgresql://root@127.0.0.1:5432/test``) answers; each run gets a fresh schema.
"""

from __future__ import annotations

import argparse
import asyncio
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


def summarize(name: str, m0: dict, m1: dict, window: float, results: list[dict], extra: dict | None = None) -> dict:
    clients = sum(r["clients"] for r in results)
    alive = sum(r["alive"] for r in results)
    expected = m1["gridserver_tick_number"] - m0["gridserver_tick_number"]
    latencies, received = [], 0
    first_tick = m0["gridserver_tick_number"] + 1
    last_tick = m1["gridserver_tick_number"]
    for r in results:
        for ticks in r["ticks"]:
            for tick, lat in ticks:
                if first_tick <= tick <= last_tick:
                    received += 1
                    latencies.append(lat)
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
           ("driver_cpu_s_per_s", 7)]
HEADERS = ["scenario", "journal", "loop", "clients", "alive", "recv%", "cpu/s", "us/p/t", "RSS MiB", "late50", "late99",
           "work99", "bcast99", "lat50", "lat99", "drvcpu"]


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


PROFILE_DIR: str | None = None


def profile(server: ServerProcess, seconds: float) -> subprocess.Popen | None:
    """With ``--profile DIR``: py-spy samples the server for the window (collapsed stacks)."""
    if not PROFILE_DIR:
        return None
    os.makedirs(PROFILE_DIR, exist_ok=True)
    out = os.path.join(PROFILE_DIR, f"server-{server.port}.txt")
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen([spy, "record", "-p", str(server.proc.pid), "-d", str(int(seconds)), "-f", "raw",
                             "-o", out, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: Each process may hold 20,000 descriptors here: the server needs one per client and a few more.
KNEE_LIMIT = 19_000


def meets_targets(row: dict) -> bool:
    """The grid-walk bars of the benchmark issue."""
    return (row["alive"] == row["clients"] and (row["ticks_received_pct"] or 0) >= 99.5 and not row["overruns"]
            and (row["lateness_p99_ms"] or 0) <= 25 and (row["latency_p99_ms"] or 1e9) <= 250
            and row["rss_mib"] <= 1536)


# -- scenarios -----------------------------------------------------------------------------

async def grid_walk(players_total: int, per_zone: int, fog: int, window: float, use_pg: bool,
                    drivers: int) -> dict:
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
            m0 = await metrics(http, server)
            t0 = time.monotonic()
            spy = profile(server, window)
            drv.go(window)
            await asyncio.sleep(window)
            m1 = await metrics(http, server)
            results = await drv.results()
            if spy:
                spy.wait()
            elapsed = time.monotonic() - t0
            name = "grid-walk-fog" if fog else "grid-walk"
            return summarize(name, m0, m1, elapsed, results, {"zones": len(zones), "fog_radius": fog})
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


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and resident bytes of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


async def baseline(players_total: int, per_zone: int, window: float, drivers: int) -> dict:
    """The same workload against ``bench/baseline_fanout.py``: what the thinnest fan-out costs."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "baseline_fanout.py"), str(port), str(per_zone)],
                            stdout=subprocess.PIPE, text=True)
    drv = None
    try:
        assert proc.stdout.readline().startswith("READY")
        zones = [str(uuid.uuid4()) for _ in range(max(1, players_total // per_zone))]
        players = [{"token": "none", "zone_id": zones[i % len(zones)]} for i in range(players_total)]
        drv = Drivers(port, players, drivers)
        await drv.ready()
        await asyncio.sleep(2)
        cpu0, _ = proc_cpu_rss(proc.pid)
        t0 = time.monotonic()
        drv.go(window)
        await asyncio.sleep(window)
        cpu1, rss = proc_cpu_rss(proc.pid)
        elapsed = time.monotonic() - t0
        results = await drv.results()
        seen = [t for r in results for ticks in r["ticks"] for t, _ in ticks]
        first, last = min(seen) + 1, min(seen) + round(elapsed)  # the ticks due in the window
        zero = {"gridserver_intents_accepted_total": 0}
        m0 = dict(zero, gridserver_tick_number=first - 1, gridserver_process_cpu_seconds=cpu0)
        m1 = dict(zero, gridserver_tick_number=last, gridserver_process_cpu_seconds=cpu1,
                  gridserver_process_resident_bytes=rss)
        return summarize("baseline", m0, m1, elapsed, results, {"zones": len(zones)})
    finally:
        if drv:
            drv.stop()
        proc.kill()
        proc.wait()


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
    args = parser.parse_args()
    global PROFILE_DIR, RESULTS, JOURNAL_MODE, EVENT_LOOP, MOVES
    PROFILE_DIR = args.profile
    RESULTS = args.out or RESULTS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    use_pg = not args.sqlite and pg_ok()
    window = args.window or (4.0 if args.quick else 30.0)
    scenarios = args.scenario or ["grid-walk", "grid-walk-fog", "world", "queries", "logins", "baseline"]
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
    return 0


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
            row["journal"], row["loop"] = JOURNAL_MODE, EVENT_LOOP
            print_row(row)
            rows.append(row)
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
        for n in args.clients or ([40] if args.quick else [1000, 5000, 10000]):
            row = await baseline(n, 50 if n >= 50 else n, window, 1 if args.quick else args.drivers)
            print_row(row)
            rows.append(row)
    else:
        print(f"unknown scenario {scenario}", file=sys.stderr)
        return 2
    return None


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
