"""Cluster benchmarks: ``python bench/cluster.py [--quick] [--scenario NAME ...] [--clients N ...]``.

Every run starts its own ``nats-server`` on a free port and real ``python gridserver.py``
nodes on a fresh PostgreSQL schema (cluster mode needs it), drives players from the thin
load drivers of ``bench/run.py`` (``bench/driver.py``) over real sockets on 127.0.0.1, and
stops every process it started. Each figure has its baseline in the same run:

* ``knee``: grid-walk (the example game, fog off, 50 players per 64x64 zone) on one node,
  then on two nodes of one cluster (as ``--workers 2`` starts them, but on two ports so that
  each node's ``/metrics`` can be read), players split evenly over the two nodes whatever
  node ticks their zone (half of them play a zone of the other node).
* ``remote``: two nodes, every player connected to the node that ticks its zone, then every
  player connected to the other node: what relaying over NATS costs per player-tick.
* ``world``: ``bench/movers.py`` (1,000 zones, 100,000 moving entities, no players) on one
  node, then over two.
* ``failover``: two nodes with players; the node ticking a watched zone is killed with
  SIGKILL; the time until a player connected to the other node receives that zone's next
  tick.

Server CPU is the sum over the nodes (from each node's ``/metrics``), the drivers' CPU is
reported beside it; lateness and "tick start to last frame" are the worst node's p99.
Results go to ``bench/results/cluster-<scenario>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402 - bench/run.py's processes, drivers and metrics

LEASE = 5.0


class Nats:
    """``nats-server`` on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not os.path.exists(exe):
            raise SystemExit("bench/cluster.py needs nats-server (Debian: apt-get install nats-server)")
        self.port = run.free_port()
        self.url = f"nats://{run.HOST}:{self.port}"
        self.proc = subprocess.Popen([exe, "-a", run.HOST, "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Cluster:
    """A fresh schema, NATS, and ``nodes`` gridserver processes (one: no cluster mode)."""

    def __init__(self, nodes: int, settings: dict[str, str]):
        self.db = run.Database(True)
        self.nats = Nats() if nodes > 1 else None
        self.settings = dict(settings)
        if self.nats:
            self.settings.update({"GRIDSERVER_CLUSTER_NATS_URL": self.nats.url,
                                  "GRIDSERVER_CLUSTER_LEASE": str(LEASE)})
        self.count = nodes
        self.nodes: list[run.ServerProcess] = []

    async def start(self, http: aiohttp.ClientSession, timeout: float = 120) -> None:
        # one after the other: a module creating its zones in on_init finds the first node's
        for _ in range(self.count):
            node = run.ServerProcess(self.db.dsn, self.settings)
            self.nodes.append(node)
            await node.wait_ready(http, timeout)

    async def settle(self, http: aiohttp.ClientSession, token: str, timeout: float = 60) -> dict[str, int]:
        """Wait until every zone is owned and the nodes hold even shares; zone id -> node index."""
        if self.count == 1:
            async with http.get(self.nodes[0].url + "/api/zones", headers=_auth(token)) as r:
                return {z["id"]: 0 for z in (await r.json())["zones"]}
        ports = {}
        for i, node in enumerate(self.nodes):
            async with http.get(node.url + "/healthz") as r:
                ports[(await r.json())["node"]] = i
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with http.get(self.nodes[0].url + "/api/debug/cluster", headers=_auth(token)) as r:
                view = await r.json()
            counts = [n["zones"] for n in view["nodes"] if n["alive"]]
            if (len(counts) == self.count and all(z["node"] for z in view["zones"])
                    and max(counts) - min(counts) <= 1):
                return {z["zone_id"]: ports[z["node"]] for z in view["zones"]}
            await asyncio.sleep(0.5)
        raise RuntimeError("the cluster did not settle")

    async def metrics(self, http: aiohttp.ClientSession) -> list[dict]:
        return [await run.metrics(http, node) for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.nats:
            self.nats.stop()
        self.db.drop()


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def summarize(name: str, m0s: list[dict], m1s: list[dict], window: float, results: list[dict],
              extra: dict) -> dict:
    """One row over every node: CPU summed, the worst node's percentiles. A player's ticks
    count as received when they arrived between the first and the last tick it saw (a
    player that saw none: none of the window's)."""
    clients = sum(r["clients"] for r in results)
    alive = sum(r["alive"] for r in results)
    interval = extra.get("interval", 1.0)
    received = expected = 0
    latencies: list[float] = []
    for r in results:
        for ticks in r["ticks"]:  # [tick number, latency from sent_at, receipt time]
            numbers = [t[0] for t in ticks]
            received += len(set(numbers))
            expected += (max(numbers) - min(numbers) + 1) if numbers else int(window / interval)
            latencies += [t[1] for t in ticks]
    cpu = sum(m1["gridserver_process_cpu_seconds"] - m0["gridserver_process_cpu_seconds"]
              for m0, m1 in zip(m0s, m1s)) / window
    ticks_per_s = 1.0 / interval

    def worst(metric: str, q: float) -> float | None:
        values = [run.hist_quantile(m0, m1, metric, q) for m0, m1 in zip(m0s, m1s)]
        values = [v for v in values if v is not None]
        return run._ms(max(values)) if values else None
    row = {
        "scenario": name, "nodes": len(m0s), "clients": clients + sum(r["connect_failures"] for r in results),
        "connected": clients, "alive": alive, "window_s": round(window, 1),
        "ticks_received_pct": round(100.0 * received / expected, 2) if expected else None,
        "server_cpu_s_per_s": round(cpu, 3),
        "cpu_us_per_player_tick": round(cpu / clients / ticks_per_s * 1e6, 1) if clients else None,
        "rss_mib": round(sum(m["gridserver_process_resident_bytes"] for m in m1s) / 2**20, 1),
        "lateness_p99_ms": worst("gridserver_tick_lateness_seconds", 0.99),
        "work_p99_ms": worst("gridserver_tick_work_seconds", 0.99),
        "broadcast_p99_ms": worst("gridserver_tick_broadcast_seconds", 0.99),
        "latency_p50_ms": run._ms(run.percentile(latencies, 0.5)),
        "latency_p99_ms": run._ms(run.percentile(latencies, 0.99)),
        "driver_cpu_s_per_s": round(sum(r["cpu_seconds"] for r in results) / window, 3),
        "overruns": int(sum(m1.get("gridserver_tick_overruns_total", 0) - m0.get("gridserver_tick_overruns_total", 0)
                            for m0, m1 in zip(m0s, m1s))),
        "relay_messages_per_s": round(sum(m1.get("gridserver_relay_messages_total", 0)
                                          - m0.get("gridserver_relay_messages_total", 0)
                                          for m0, m1 in zip(m0s, m1s)) / window, 1),
    }
    row.update(extra)
    return row


def meets_bars(row: dict) -> bool:
    """bench/run.py's grid-walk bars."""
    return (row["alive"] == row["clients"] and (row["ticks_received_pct"] or 0) >= 99.5 and not row["overruns"]
            and (row["lateness_p99_ms"] or 0) <= 25 and (row["latency_p99_ms"] or 1e9) <= 250)


async def grid_walk(players_total: int, nodes: int, placement: str, window: float, drivers: int) -> dict:
    """``placement``: ``spread`` (players split evenly over the nodes), ``local`` (each on the
    node ticking its zone) or ``remote`` (each on another node)."""
    cluster = Cluster(nodes, {"GRIDSERVER_GAME_MODULES_WALKERS_FOG_RADIUS": "0",
                              "GRIDSERVER_WEBSOCKET_HEARTBEAT": "30"})
    drvs: list[run.Drivers] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            await cluster.start(http)
            first = cluster.nodes[0]
            players = await run.make_players(http, first, players_total, "walker")
            zones = await run.make_zones(http, first, players[0]["token"], max(1, players_total // 50), 64)
            owner = await cluster.settle(http, players[0]["token"])
            by_node: list[list[dict]] = [[] for _ in cluster.nodes]
            for i, p in enumerate(players):
                p["zone_id"] = zones[i % len(zones)]
                home = owner[p["zone_id"]]
                at = {"spread": i % nodes, "local": home, "remote": (home + 1) % nodes}[placement]
                by_node[at].append(p)
            for node, share in zip(cluster.nodes, by_node):
                if share:
                    drvs.append(run.Drivers(node.port, share, max(1, drivers // nodes)))
            for d in drvs:
                await d.ready()
            await asyncio.sleep(3)
            m0 = await cluster.metrics(http)
            t0 = time.monotonic()
            for d in drvs:
                d.go(window)
            await asyncio.sleep(window)
            m1 = await cluster.metrics(http)
            results = [r for d in drvs for r in await d.results()]
            elapsed = time.monotonic() - t0
            return summarize("grid-walk", m0, m1, elapsed, results,
                             {"placement": placement, "zones": len(zones), "interval": 1.0})
    finally:
        for d in drvs:
            d.stop()
        cluster.stop()


async def world(nodes: int, zones: int, per_zone: int, window: float) -> dict:
    cluster = Cluster(nodes, {"GRIDSERVER_GAME_MODULE": "bench.movers",
                              "GRIDSERVER_BENCH_MOVERS_ZONES": str(zones),
                              "GRIDSERVER_BENCH_MOVERS_ENTITIES": str(per_zone),
                              "GRIDSERVER_TICK_ZONE_TIMEOUT": "5"})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            await cluster.start(http, timeout=300)
            token = (await run.make_players(http, cluster.nodes[0], 1, "admin"))[0]["token"]
            await cluster.settle(http, token, timeout=120)
            await asyncio.sleep(8)  # entities created and flushed on their nodes
            m0 = await cluster.metrics(http)
            t0 = time.monotonic()
            await asyncio.sleep(window)
            m1 = await cluster.metrics(http)
            elapsed = time.monotonic() - t0
            row = summarize("world", m0, m1, elapsed, [], {"zones": zones, "interval": 1.0})
            row.update({"entities": int(sum(m["gridserver_entities"] for m in m1)), "clients": 0, "alive": 0,
                        "work_p50_ms": max(run._ms(run.hist_quantile(a, b, "gridserver_tick_work_seconds", 0.5)) or 0
                                           for a, b in zip(m0, m1))})
            return row
    finally:
        cluster.stop()


async def failover(players_total: int, window: float, drivers: int) -> dict:
    """SIGKILL of the node ticking a watched zone, the watcher being connected to the other
    node: seconds from the kill to the zone's next tick at the watcher."""
    cluster = Cluster(2, {"GRIDSERVER_WEBSOCKET_HEARTBEAT": "30"})
    drvs: list[run.Drivers] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            await cluster.start(http)
            first = cluster.nodes[0]
            players = await run.make_players(http, first, players_total + 1, "walker")
            watcher, players = players[0], players[1:]
            zones = await run.make_zones(http, first, watcher["token"], max(2, players_total // 50), 64)
            owner = await cluster.settle(http, watcher["token"])
            for i, p in enumerate(players):
                p["zone_id"] = zones[i % len(zones)]
            for node in cluster.nodes:
                share = [p for i, p in enumerate(players) if i % 2 == cluster.nodes.index(node)]
                drvs.append(run.Drivers(node.port, share, max(1, drivers // 2)))
            for d in drvs:
                await d.ready()
            doomed = 1
            zone = next(z for z, n in owner.items() if n == doomed)
            ticks: list[tuple[float, int]] = []
            ws = await http.ws_connect(cluster.nodes[0].url.replace("http", "ws") + f"/ws?token={watcher['token']}")
            await ws.send_json({"type": "subscribe", "zone_id": zone})

            async def watch() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data.get("type") == "tick":
                            ticks.append((time.monotonic(), data["tick_number"]))
            reader = asyncio.ensure_future(watch())
            for d in drvs:
                d.go(window + LEASE + 10)
            await asyncio.sleep(window / 2)
            cluster.nodes[doomed].proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            last_before = ticks[-1][1] if ticks else None
            deadline = killed + LEASE * 3 + 20
            while time.monotonic() < deadline and not [t for t in ticks if t[0] > killed]:
                await asyncio.sleep(0.05)
            after = [t for t in ticks if t[0] > killed]
            reader.cancel()
            await ws.close()
            return {"scenario": "failover", "nodes": 2, "clients": players_total, "lease_s": LEASE,
                    "failover_s": round(after[0][0] - killed, 2) if after else None,
                    "last_tick_before": last_before, "first_tick_after": after[0][1] if after else None}
    finally:
        for d in drvs:
            d.stop()
        cluster.stop()


def show(row: dict) -> None:
    print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, short smoke run (what CI runs)")
    parser.add_argument("--scenario", action="append", choices=["knee", "remote", "world", "failover"])
    parser.add_argument("--clients", type=int, action="append", help="player counts (knee, remote)")
    parser.add_argument("--window", type=float, help="seconds measured per run")
    parser.add_argument("--drivers", type=int, default=2, help="driver processes")
    parser.add_argument("--knee", action="store_true", help="knee: past the last count, add 2,500 players a run "
                                                            "until a bar breaks, for one node and for two")
    parser.add_argument("--out", metavar="DIR", help="where the JSON results go (default bench/results)")
    args = parser.parse_args()
    if not run.pg_ok():
        print("bench/cluster.py: cluster mode needs PostgreSQL (GRIDSERVER_BENCH_PG_DSN)", file=sys.stderr)
        return 2
    run.RESULTS = args.out or run.RESULTS
    soft, hard = run.resource.getrlimit(run.resource.RLIMIT_NOFILE)
    run.resource.setrlimit(run.resource.RLIMIT_NOFILE, (hard, hard))
    window = args.window or (4.0 if args.quick else 30.0)
    drivers = 1 if args.quick else args.drivers
    for scenario in args.scenario or ["knee", "remote", "world", "failover"]:
        rows: list[dict] = []
        if scenario == "knee":
            for nodes in (1, 2):
                counts = list(args.clients or ([40] if args.quick else [5000, 10000]))
                while counts:
                    n = counts.pop(0)
                    row = await grid_walk(n, nodes, "spread", window, drivers)
                    show(row)
                    rows.append(row)
                    if args.knee and not counts and meets_bars(row) and n + 2500 <= run.KNEE_LIMIT * nodes:
                        counts.append(n + 2500)
        elif scenario == "remote":
            n = (args.clients or ([40] if args.quick else [4000]))[0]
            for placement in ("local", "remote"):
                row = await grid_walk(n, 2, placement, window, drivers)
                show(row)
                rows.append(row)
            if rows[0]["cpu_us_per_player_tick"] and rows[1]["cpu_us_per_player_tick"]:
                print(f"remote / local cost per player-tick: "
                      f"{rows[1]['cpu_us_per_player_tick'] / rows[0]['cpu_us_per_player_tick']:.2f}x", flush=True)
        elif scenario == "world":
            zones, per_zone = (20, 50) if args.quick else (1000, 100)
            for nodes in (1, 2):
                row = await world(nodes, zones, per_zone, window)
                show(row)
                rows.append(row)
        elif scenario == "failover":
            row = await failover(40 if args.quick else 2000, window, drivers)
            show(row)
            rows.append(row)
        os.makedirs(run.RESULTS, exist_ok=True)
        with open(os.path.join(run.RESULTS, f"cluster-{scenario}.json"), "w") as fh:
            json.dump({"machine": run.machine(), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
