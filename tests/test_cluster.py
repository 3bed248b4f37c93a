"""Cluster mode: one world on several gridserver processes, on a real PostgreSQL and a real NATS.

Every test starts its own ``nats-server`` on a free port and real ``python gridserver.py``
nodes (``tests.fault_games:Counter``) sharing one fresh PostgreSQL schema. Before any node
starts, the schema gets an audit: triggers that record, in write order, the fencing number
(``epoch``) of every journal and entity row written. Whatever a test does to the nodes
(SIGKILL, SIGTERM, SIGSTOP past the lease, cutting one off from PostgreSQL), ``check_fencing``
then shows that no zone was ever written by an older owner after a newer one, and that
each zone's journal goes on tick after tick, with no gap and no tick written twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import aiohttp
import pytest

import gridserver
from faultkit import Client, ServerProcess, figure, free_port, start
from helpers import dsn_with_schema, pg_exec, require_pg, scaled, wait_for

pytestmark = pytest.mark.slow

COUNTER = "tests.fault_games:Counter"
LEASE = 1.5
INTERVAL = 0.1

AUDIT = """
CREATE SEQUENCE audit_seq;
CREATE TABLE audit (n BIGINT, tbl TEXT, zone_id UUID, epoch BIGINT, tick_number BIGINT);
CREATE FUNCTION audit_journal() RETURNS trigger AS $$
BEGIN
    INSERT INTO audit VALUES (nextval('audit_seq'), 'journal', NEW.zone_id, NEW.epoch, NEW.tick_number);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE FUNCTION audit_entities() RETURNS trigger AS $$
BEGIN
    INSERT INTO audit VALUES (nextval('audit_seq'), 'entities', NEW.zone_id, NEW.epoch, NULL);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER audit_journal AFTER INSERT OR UPDATE ON journal FOR EACH ROW EXECUTE FUNCTION audit_journal();
CREATE TRIGGER audit_entities AFTER INSERT OR UPDATE ON entities FOR EACH ROW EXECUTE FUNCTION audit_entities();
"""


class Nats:
    """``nats-server`` on a free port of 127.0.0.1, stopped by its PID."""

    def __init__(self, tmp_path):
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not os.path.exists(exe):
            if os.environ.get("GRIDSERVER_REQUIRE_NATS"):
                pytest.fail("nats-server is not installed (GRIDSERVER_REQUIRE_NATS is set)")
            pytest.skip("nats-server is not installed (Debian: apt-get install nats-server)")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._log = open(tmp_path / f"nats-{self.port}.log", "wb")
        self.proc = subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(self.port)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + scaled(10)
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("nats-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def nats(tmp_path):
    pytest.importorskip("nats", reason="nats-py is the [cluster] extra")
    server = Nats(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def world_schema():
    """A fresh PostgreSQL schema with gridserver's tables and the write audit."""
    require_pg()
    schema = "c_" + uuid.uuid4().hex[:16]
    pg_exec(f"CREATE SCHEMA {schema}")
    dsn = dsn_with_schema(schema)
    pg_exec(gridserver.PG_SCHEMA, dsn=dsn)
    pg_exec(AUDIT, dsn=dsn)
    yield dsn
    pg_exec(f"DROP SCHEMA {schema} CASCADE")


def node(processes, tmp_path, dsn: str, nats_url: str, zones: int = 4, port: int | None = None,
         game: str = COUNTER, **settings) -> ServerProcess:
    env = {"CLUSTER_NATS_URL": nats_url, "CLUSTER_LEASE": LEASE, "TICK_INTERVAL": INTERVAL,
           "PERSISTENCE_INTERVAL": 0.3, **settings}
    game_settings = {"zones": zones, "entities": 20, "size": 32} if game == COUNTER else {"zones": zones}
    return start(processes, tmp_path, dsn, game=game, settings=env, port=port, game_settings=game_settings)


async def cluster_view(http: aiohttp.ClientSession, proc: ServerProcess) -> dict:
    client = Client(proc.url, http)
    if not hasattr(proc, "token"):
        proc.token = (await client.player())["token"]
    status, body = await client.call("GET", "/api/debug/cluster", proc.token)
    assert status == 200, body
    return body


async def settled(http, proc: ServerProcess, nodes: int, zones: int, timeout: float = 20.0) -> dict:
    """Wait until the cluster as ``proc`` sees it has ``nodes`` live nodes sharing ``zones``
    zones evenly (each holds its share, give or take one), every zone owned; the view."""
    view: dict = {}

    async def even() -> bool:
        nonlocal view
        try:
            view = await cluster_view(http, proc)
        except aiohttp.ClientError:  # a kept-alive connection to a node that died: ask again
            return False
        alive = [n for n in view["nodes"] if n["alive"]]
        counts = [n["zones"] for n in alive]
        return (len(alive) == nodes and len(view["zones"]) == zones and all(z["node"] for z in view["zones"])
                and sum(counts) == zones and max(counts) - min(counts) <= 1)
    await wait_for(even, timeout=timeout, interval=0.1, what=f"{nodes} nodes sharing {zones} zones")
    return view


async def pair(http, processes, tmp_path, world_schema: str, nats_url: str, a_dsn: str | None = None,
               **settings) -> tuple[ServerProcess, ServerProcess, list[str]]:
    """Nodes a (started first, on ``a_dsn`` if given) and b sharing 4 zones evenly: (a, b, the
    zones ticking on a)."""
    a = node(processes, tmp_path, a_dsn or world_schema, nats_url, **settings)
    await a.ready(http)
    b = node(processes, tmp_path, world_schema, nats_url)
    await b.ready(http)
    await settled(http, b, nodes=2, zones=4)
    name_a = await node_name(http, a)
    on_a = [z for z in (await zone_ids(http, b)).values() if await owner(http, b, z) == name_a]
    assert on_a
    return a, b, on_a


def check_fencing(dsn: str) -> dict:
    """No zone written by an older owner after a newer one; each zone's journal contiguous."""
    writes = pg_exec("SELECT zone_id, epoch FROM audit ORDER BY n", dsn=dsn)
    assert writes, "the audit saw no write"
    newest: dict = {}
    for zone_id, epoch in writes:
        assert epoch >= newest.get(zone_id, 0), f"zone {zone_id}: a write of epoch {epoch} after epoch {newest[zone_id]}"
        newest[zone_id] = epoch
    journal: dict = {}
    for zone_id, tick, epoch in pg_exec("SELECT zone_id, tick_number, epoch FROM journal ORDER BY zone_id, tick_number",
                                        dsn=dsn):
        journal.setdefault(zone_id, []).append((tick, epoch))
    for zone_id, rows in journal.items():
        ticks = [t for t, _ in rows]
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), f"zone {zone_id}: journal gaps {ticks}"
        epochs = [e for _, e in rows]
        assert epochs == sorted(epochs), f"zone {zone_id}: epochs out of order along its ticks"
    return {"writes": len(writes), "zones": len(journal),
            "epochs": {str(z): sorted({e for _, e in rows}) for z, rows in journal.items()}}


async def zone_ids(http, proc: ServerProcess) -> dict[str, str]:
    view = await cluster_view(http, proc)
    return {z["name"]: z["zone_id"] for z in view["zones"]}


async def owner(http, proc: ServerProcess, zone_id: str) -> str | None:
    view = await cluster_view(http, proc)
    return next(z["node"] for z in view["zones"] if z["zone_id"] == zone_id)


async def node_name(http, proc: ServerProcess) -> str:
    async with http.get(proc.url + "/healthz") as r:
        return (await r.json())["node"]


class Player:
    """One player's socket on one node: every message it receives, in order."""

    def __init__(self, http, proc: ServerProcess):
        self.http, self.proc = http, proc
        self.messages: list[dict] = []
        self.closed: int | None = None

    async def connect(self, token: str | None = None) -> "Player":
        client = Client(self.proc.url, self.http)
        if token is None:
            account = await client.player()
            token, self.name, self.password = account["token"], account["username"], account["password"]
        self.token = token
        self.ws = await self.http.ws_connect(client.ws_url(token), heartbeat=None)
        self.task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.messages.append(json.loads(msg.data))
        self.closed = self.ws.close_code

    def of(self, kind: str, **match) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind and all(m.get(k) == v for k, v in match.items())]

    def ticks(self, zone_id: str | None = None) -> list[int]:
        return [m["tick_number"] for m in self.of("tick") if zone_id is None or m["zone_id"] == zone_id]

    async def send(self, message: dict) -> None:
        await self.ws.send_json(message)

    async def expect(self, kind: str, timeout: float = 10, **match) -> dict:
        await wait_for(lambda: self.of(kind, **match), timeout=timeout, what=f"a {kind} message {match}")
        return self.of(kind, **match)[0]

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()


class Watcher:
    """A player subscribed to one zone on one node, recording the tick numbers it receives
    and the errors it is sent."""

    def __init__(self, http, proc: ServerProcess, zone_id: str):
        self.http, self.proc, self.zone_id = http, proc, zone_id
        self.ticks: list[int] = []
        self.errors: list[dict] = []
        self.subscribed: list[dict] = []
        self.closed: int | None = None

    async def start(self, token: str | None = None) -> "Watcher":
        client = Client(self.proc.url, self.http)
        self.token = token = token or (await client.player())["token"]
        self.ws = await self.http.ws_connect(client.ws_url(token), heartbeat=None)
        await self.ws.send_json({"type": "subscribe", "zone_id": self.zone_id})
        self.task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if data["type"] == "tick":
                self.ticks.append(data["tick_number"])
            elif data["type"] == "error":
                self.errors.append(data)
            elif data["type"] == "subscribed":
                self.subscribed.append(data)
        self.closed = self.ws.close_code

    def contiguous(self) -> bool:
        return self.ticks == list(range(self.ticks[0], self.ticks[0] + len(self.ticks)))

    def increasing(self) -> bool:
        """Every tick after the one before (none twice, none out of order)."""
        return all(b > a for a, b in zip(self.ticks, self.ticks[1:]))

    def skipped(self) -> int:
        """Ticks of the zone this player did not receive between its first and its last."""
        return self.ticks[-1] - self.ticks[0] + 1 - len(self.ticks)

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()


# -- the tests ----------------------------------------------------------------------------

async def test_zones_spread_over_three_nodes_each_ticked_by_exactly_one(world_schema, nats, tmp_path, http,
                                                                        processes):
    a = node(processes, tmp_path, world_schema, nats.url, zones=4)
    await a.ready(http)
    b = node(processes, tmp_path, world_schema, nats.url, zones=4)
    c = node(processes, tmp_path, world_schema, nats.url, zones=4)
    await b.ready(http)
    await c.ready(http)
    view = await settled(http, a, nodes=3, zones=4)  # 4 zones on 3 nodes: 2, 1, 1
    names = {await node_name(http, p) for p in (a, b, c)}
    assert {n["name"] for n in view["nodes"]} == names
    assert sorted(n["zones"] for n in view["nodes"]) == [1, 1, 2]
    # every node sees the same placement (each as of its last round)
    placement = {z["zone_id"]: z["node"] for z in view["zones"]}
    for p in (b, c):
        async def same() -> bool:
            return {z["zone_id"]: z["node"] for z in (await cluster_view(http, p))["zones"]} == placement
        await wait_for(same, timeout=5, what="the same placement on every node")
    # every node lists every zone, wherever it ticks
    token = (await Client(b.url, http).player())["token"]
    listed = await Client(b.url, http).zones(token)
    assert sorted(z["id"] for z in listed.values()) == sorted(z["zone_id"] for z in view["zones"])
    # a zone created on c ticks on c at once, and a player on a plays it
    status, created = await Client(c.url, http).call("POST", "/api/zones", token,
                                                     {"name": "made-on-c", "width": 8, "height": 8})
    assert status == 201, created
    assert await owner(http, c, created["id"]) == await node_name(http, c)
    watcher = await Watcher(http, a, created["id"]).start()
    await wait_for(lambda: len(watcher.ticks) >= 3, timeout=10, what="ticks of the new zone through a")
    await watcher.close()
    await settled(http, a, nodes=3, zones=5)
    # every zone advances: ticked somewhere, by one node only
    before = dict(pg_exec("SELECT name, tick_number FROM zones", dsn=world_schema))
    await asyncio.sleep(scaled(1.5))
    after = dict(pg_exec("SELECT name, tick_number FROM zones", dsn=world_schema))
    assert all(after[name] > before[name] for name in before), (before, after)
    figures = check_fencing(world_schema)
    # a started alone and handed zones over as the others joined: every change of owner a newer
    # epoch (an owner that held a zone for no tick wrote nothing under its epoch)
    assert all(epochs[0] == 1 for epochs in figures["epochs"].values()), figures


async def test_sigkill_of_an_owner_its_zones_tick_again_elsewhere_from_the_last_tick_seen(
        world_schema, nats, tmp_path, http, processes):
    a, b, on_a = await pair(http, processes, tmp_path, world_schema, nats.url)
    watcher = await Watcher(http, a, on_a[0]).start()
    remote = await Watcher(http, b, on_a[0]).start()  # the same zone, played through b
    await wait_for(lambda: len(watcher.ticks) >= 10 and len(remote.ticks) >= 10, timeout=10,
                   what="ticks on the doomed node")
    a.send(signal.SIGKILL)
    killed = time.monotonic()
    await a.wait_exit()
    last_seen = max(watcher.ticks[-1], remote.ticks[-1])
    await wait_for(lambda: watcher.closed is not None, timeout=5, what="the socket to drop")
    # the zone ticks again on b within the lease and a few rounds
    await settled(http, b, nodes=1, zones=4, timeout=LEASE + 10)
    # the dead node's player connects again, to b: its zone is resumed there
    back = await Player(http, b).connect(watcher.token)
    assert (await back.expect("subscribed", zone_id=on_a[0])).get("resumed") is True
    again = await Watcher(http, b, on_a[0]).start()
    await wait_for(lambda: again.ticks and back.ticks(on_a[0]), timeout=10, what="ticks from the new owner")
    assert back.ticks(on_a[0])[0] > last_seen
    assert "taking zone" not in b.log_text() and "Traceback" not in b.log_text(), b.log_text()[-3000:]
    first_tick = pg_exec(f"SELECT min(tick_number) FROM journal WHERE zone_id = '{on_a[0]}' AND epoch = "
                         f"(SELECT max(epoch) FROM journal WHERE zone_id = '{on_a[0]}')", dsn=world_schema)[0][0]
    assert first_tick is not None
    taken = time.monotonic() - killed
    figure("cluster: SIGKILL to the zone ticking on another node, s (lease 1.5)", round(taken, 2))
    # nothing the player saw is lost: the new owner goes on after the last tick seen
    assert first_tick > last_seen, (first_tick, last_seen)
    assert again.ticks[0] > last_seen
    # the player of another node kept its socket and followed the zone to its new owner
    await wait_for(lambda: remote.ticks[-1] > last_seen, timeout=10, what="ticks again through b")
    assert remote.closed is None and len(remote.subscribed) == 2 and not remote.errors
    after = [t for t in remote.ticks if t > last_seen]
    assert after == list(range(after[0], after[0] + len(after)))
    await again.close()
    await remote.close()
    await back.close()
    check_fencing(world_schema)


async def test_sigterm_hands_every_zone_over_with_no_tick_lost_or_repeated(world_schema, nats, tmp_path, http,
                                                                           processes):
    a, b, on_a = await pair(http, processes, tmp_path, world_schema, nats.url)
    watcher = await Watcher(http, a, on_a[0]).start()
    remote = await Watcher(http, b, on_a[0]).start()  # the same zone, played through b
    await wait_for(lambda: len(watcher.ticks) >= 5 and len(remote.ticks) >= 5, timeout=10, what="ticks")
    stopped = time.monotonic()
    a.send(signal.SIGTERM)
    assert await a.wait_exit() == 0
    await wait_for(lambda: watcher.closed is not None, timeout=5, what="the socket to close")
    assert watcher.closed == 1001
    view = await settled(http, b, nodes=1, zones=4, timeout=10)
    # its player connects again, to the node left, and resumes its zone there
    back = await Player(http, b).connect(watcher.token)
    assert (await back.expect("subscribed", zone_id=on_a[0])).get("resumed") is True
    await wait_for(lambda: back.ticks(on_a[0]) and back.ticks(on_a[0])[0] > watcher.ticks[-1], timeout=10,
                   what="ticks after resuming on b")
    await back.close()
    figure("cluster: SIGTERM to every zone ticking on the other node, s", round(time.monotonic() - stopped, 2))
    assert [n["name"] for n in view["nodes"]] == [await node_name(http, b)]  # a's row is gone
    # handed over, not taken over: b went on from a's last flush, with nothing to replay
    assert "0 journaled tick(s) replayed" in b.log_text()
    assert "journaled tick(s) replayed" in b.log_text()
    # the player through b kept its socket and followed the zone: no tick twice or out of order
    await wait_for(lambda: len(remote.subscribed) == 2, timeout=10, what="b's player to follow the zone")
    await asyncio.sleep(scaled(1))
    assert remote.closed is None and not remote.errors and remote.increasing(), remote.ticks
    assert remote.ticks[-1] > watcher.ticks[-1]
    figure("cluster: SIGTERM: ticks a player of another node did not receive (tick 0.1 s)", remote.skipped())
    figures = check_fencing(world_schema)
    for zone_id in on_a:
        assert figures["epochs"][zone_id] == [1, 2]
    await remote.close()


async def test_a_joining_node_takes_its_share_without_a_tick_missed(world_schema, nats, tmp_path, http, processes):
    a = node(processes, tmp_path, world_schema, nats.url, zones=6)
    await a.ready(http)
    await settled(http, a, nodes=1, zones=6)
    watchers = [await Watcher(http, a, z).start() for z in (await zone_ids(http, a)).values()]
    await asyncio.sleep(scaled(1))
    b = node(processes, tmp_path, world_schema, nats.url, zones=6)
    await b.ready(http)
    joined = time.monotonic()
    view = await settled(http, a, nodes=2, zones=6)
    figure("cluster: a node ready to the zones shared evenly, s (lease 1.5)", round(time.monotonic() - joined, 2))
    assert sorted(n["zones"] for n in view["nodes"]) == [3, 3]
    # the players of the zones that went to b follow them: subscribed again, no tick missed
    await wait_for(lambda: len([w for w in watchers if len(w.subscribed) == 2]) == 3, timeout=10,
                   what="the players of three zones to follow them")
    await asyncio.sleep(scaled(1))
    for w in watchers:
        assert w.closed is None and not w.errors and w.increasing(), (w.ticks, w.errors)
    figure("cluster: a node joins: ticks the players of moved zones did not receive (tick 0.1 s)",
           max(w.skipped() for w in watchers))
    figures = check_fencing(world_schema)
    assert sorted(len(e) for e in figures["epochs"].values()) == [1, 1, 1, 2, 2, 2]
    for w in watchers:
        await w.close()


async def test_a_node_paused_past_its_lease_is_fenced_and_the_world_converges(world_schema, nats, tmp_path, http,
                                                                              processes):
    a, b, on_a = await pair(http, processes, tmp_path, world_schema, nats.url)
    watcher = await Watcher(http, a, on_a[0]).start()
    await wait_for(lambda: len(watcher.ticks) >= 5, timeout=10, what="ticks")
    a.send(signal.SIGSTOP)
    try:
        await settled(http, b, nodes=1, zones=4, timeout=LEASE + 10)  # b took a's zones over
        await asyncio.sleep(scaled(1))
    finally:
        a.send(signal.SIGCONT)
    # a wakes up holding zones that are b's now: it must not write them, and it lets them go
    await wait_for(lambda: "no longer ticks here: taken over" in a.log_text(), timeout=10, what="a to drop its zones")
    before = watcher.ticks[-1]
    await wait_for(lambda: len(watcher.subscribed) == 2 and watcher.ticks[-1] > before, timeout=10,
                   what="a's player to follow the zone to b")
    await settled(http, b, nodes=2, zones=4, timeout=20)  # and the two share the world again
    await asyncio.sleep(scaled(1))
    figures = check_fencing(world_schema)
    assert all(max(e) >= 2 for z, e in figures["epochs"].items() if z in on_a)
    await watcher.close()


async def test_a_node_cut_from_postgresql_stops_ticking_and_never_writes_over_the_new_owner(
        world_schema, nats, tmp_path, http, processes, tcp_proxy):
    proxy = await tcp_proxy()
    a_dsn = world_schema.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert a_dsn != world_schema
    a, b, on_a = await pair(http, processes, tmp_path, world_schema, nats.url, a_dsn=a_dsn, DATABASE_TIMEOUT=1)
    watcher = await Watcher(http, a, on_a[0]).start()
    await wait_for(lambda: len(watcher.ticks) >= 5, timeout=10, what="ticks")
    proxy.cut()
    await settled(http, b, nodes=1, zones=4, timeout=LEASE + 10)
    # a cannot renew: it stopped ticking before its leases could lapse
    seen = len(watcher.ticks)
    await asyncio.sleep(scaled(1))
    assert len(watcher.ticks) == seen, "a node cut from the database went on ticking"
    proxy.restore()
    await wait_for(lambda: "no longer ticks here: taken over" in a.log_text(), timeout=15, what="a to drop its zones")
    await settled(http, b, nodes=2, zones=4, timeout=20)
    await asyncio.sleep(scaled(1))
    check_fencing(world_schema)
    await watcher.close()


async def test_a_node_cut_from_nats_still_converges_through_the_database(world_schema, tmp_path, http, processes,
                                                                         tcp_proxy, nats):
    proxy = await tcp_proxy(port=nats.port)
    a = node(processes, tmp_path, world_schema, f"nats://127.0.0.1:{proxy.port}")
    await a.ready(http)
    b = node(processes, tmp_path, world_schema, nats.url)
    await b.ready(http)
    await settled(http, b, nodes=2, zones=4)
    proxy.cut()
    b.send(signal.SIGTERM)
    assert await b.wait_exit() == 0
    await settled(http, a, nodes=1, zones=4, timeout=10)  # no wake-up reached a: its rounds found them
    check_fencing(world_schema)


def test_cluster_mode_needs_postgresql(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    env.update(GRIDSERVER_CLUSTER_NATS_URL="nats://127.0.0.1:4222", GRIDSERVER_DATABASE_DSN=f"sqlite:///{tmp_path}/x.db")
    proc = subprocess.run([gridserver_python(), gridserver.__file__], env=env, capture_output=True, text=True,
                          timeout=scaled(30), cwd=tmp_path)
    assert proc.returncode == 2
    assert "[cluster] nats_url" in proc.stderr and "PostgreSQL" in proc.stderr
    assert not os.path.exists(tmp_path / "x.db")
    env.update(GRIDSERVER_CLUSTER_NATS_URL="", GRIDSERVER_SERVER_WORKERS="2")
    proc = subprocess.run([gridserver_python(), gridserver.__file__], env=env, capture_output=True, text=True,
                          timeout=scaled(30), cwd=tmp_path)
    assert proc.returncode == 2 and "[server] workers" in proc.stderr and "nats_url" in proc.stderr
    pg = dict(env, GRIDSERVER_DATABASE_DSN="postgresql://root@127.0.0.1:5432/test",
              GRIDSERVER_CLUSTER_NATS_URL="nats://127.0.0.1:4222")
    for extra, key in (({"GRIDSERVER_JOURNAL_MODE": "off", "GRIDSERVER_SERVER_WORKERS": "1"}, "[journal] mode"),
                       ({"GRIDSERVER_CLUSTER_NODE_NAME": "n1"}, "[cluster] node_name")):
        proc = subprocess.run([gridserver_python(), gridserver.__file__], env=dict(pg, **extra), capture_output=True,
                              text=True, timeout=scaled(30), cwd=tmp_path)
        assert proc.returncode == 2 and key in proc.stderr, proc.stderr


async def all_renamed(url: str, token: str, names: set[str]) -> bool:
    """Whether the cluster behind ``url`` is two live nodes, one of them not in ``names``
    (a connection the kernel hands to a node just killed or not yet ready counts as no)."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(url + "/api/debug/cluster", headers={"Authorization": f"Bearer {token}"}) as r:
                alive = {n["name"] for n in (await r.json())["nodes"] if n["alive"]}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
        return False
    return len(alive) == 2 and bool(alive - names)


def gridserver_python() -> str:
    import sys
    return sys.executable


async def test_workers_run_nodes_on_one_port_and_stop_together(world_schema, nats, tmp_path, http):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    env.update(GRIDSERVER_DATABASE_DSN=world_schema, GRIDSERVER_SERVER_PORT=str(port), GRIDSERVER_SERVER_DEBUG="true",
               GRIDSERVER_AUTH_BCRYPT_ROUNDS="4", GRIDSERVER_TICK_INTERVAL=str(INTERVAL),
               GRIDSERVER_CLUSTER_NATS_URL=nats.url, GRIDSERVER_CLUSTER_LEASE=str(LEASE),
               GRIDSERVER_GAME_MODULE=COUNTER, GRIDSERVER_TESTS_FAULT_GAMES_COUNTER_ZONES="4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(tmp_path / "workers.log", "wb") as log:
        parent = subprocess.Popen([gridserver_python(), os.path.join(root, "gridserver.py"), "--workers", "2"],
                                  cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            names: set[str] = set()

            async def both_answer() -> bool:
                # each request on a new connection: the kernel spreads them over the two nodes
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                    try:
                        async with s.get(url + "/healthz") as r:
                            names.add((await r.json())["node"])
                    except aiohttp.ClientError:
                        pass
                return len(names) == 2
            await wait_for(both_answer, timeout=30, interval=0.05, what="two nodes behind one port")
            proc = type("P", (), {"url": url})()
            view = await settled(http, proc, nodes=2, zones=4)
            assert {n["name"] for n in view["nodes"]} == names
            # a node that dies is started again, and takes its share
            pid = int(next(n for n in view["nodes"]).get("name").rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            await wait_for(lambda: all_renamed(url, proc.token, names), timeout=LEASE + 30,
                           what="a new node in the dead one's place")
            await settled(http, proc, nodes=2, zones=4, timeout=30)
            parent.send_signal(signal.SIGTERM)
            assert parent.wait(scaled(30)) == 0
            rows = pg_exec("SELECT count(*) FROM zones WHERE owner IS NOT NULL", dsn=world_schema)
            assert rows[0][0] == 0  # both nodes handed their zones back as they stopped
        finally:
            if parent.poll() is None:
                os.killpg(parent.pid, signal.SIGKILL)
                parent.wait()
    check_fencing(world_schema)


async def test_players_on_any_node_play_zones_ticking_on_the_others(world_schema, nats, tmp_path, http, processes):
    procs = [node(processes, tmp_path, world_schema, nats.url, zones=3)]
    await procs[0].ready(http)
    procs += [node(processes, tmp_path, world_schema, nats.url, zones=3) for _ in range(2)]
    for p in procs[1:]:
        await p.ready(http)
    view = await settled(http, procs[0], nodes=3, zones=3)
    names = [await node_name(http, p) for p in procs]
    elsewhere = [next(z["zone_id"] for z in view["zones"] if z["node"] != name) for name in names]
    players = [await Player(http, p).connect() for p in procs]
    # an intent before any subscribe is refused by the player's own node, as on one node
    await players[0].send({"type": "intent", "data": {"spawn": 0}})
    await players[0].expect("error", code="not_subscribed")
    for player, zone_id, k in zip(players, elsewhere, (101, 202, 303)):
        await player.send({"type": "subscribe", "zone_id": zone_id})
        await player.send({"type": "ping"})
        await player.send({"type": "intent", "data": {"spawn": k}})
    for player, zone_id, k in zip(players, elsewhere, (101, 202, 303)):
        await player.expect("subscribed", zone_id=zone_id)
        await player.expect("pong")
        kinds = [m["type"] for m in player.messages if m["type"] in ("subscribed", "pong")]
        assert kinds[-2:] == ["subscribed", "pong"], kinds  # answers in the order asked, across nodes
        # the intent acted in the zone's next tick, on its owner
        await wait_for(lambda: any(k in m["state"]["spawned"] for m in player.of("tick")), timeout=10,
                       what="the intent in a tick's state")
    await asyncio.sleep(scaled(2))
    for player, zone_id in zip(players, elsewhere):
        ticks = player.ticks(zone_id)
        assert len(ticks) >= 10 and ticks == list(range(ticks[0], ticks[0] + len(ticks))), ticks  # none missed
        assert {m["zone_id"] for m in player.of("tick")} == {zone_id}
    # rate limits count on the owner, whichever node the player is on
    burst = players[1]
    await burst.send({"type": "intent", "data": {"spawn": 0}})  # (the burst's first lands in one tick)
    for i in range(25):
        await burst.send({"type": "intent", "data": {"spawn": 1000 + i}})
    error = await burst.expect("error", code="rate_limited")
    assert "intents per tick" in error["message"]
    await asyncio.sleep(scaled(1))
    per_tick = [sum(1 for k in m["state"]["spawned"] if k >= 1000) for m in burst.of("tick")]
    assert max(per_tick) <= 10 and sum(per_tick) < 25, per_tick
    # unsubscribe: the answer, then no tick of that zone
    await players[2].send({"type": "unsubscribe"})
    await players[2].expect("unsubscribed")
    seen = len(players[2].of("tick"))
    await asyncio.sleep(scaled(1))
    assert len(players[2].of("tick")) == seen
    # a zone nobody has is still not found
    await players[2].send({"type": "subscribe", "zone_id": str(uuid.uuid4())})
    await players[2].expect("error", code="zone_not_found")
    for player in players:
        await player.close()
    check_fencing(world_schema)


async def test_a_player_resumes_its_zone_on_another_node_and_sessions_end_everywhere(
        world_schema, nats, tmp_path, http, processes):
    procs = [node(processes, tmp_path, world_schema, nats.url, zones=2, WEBSOCKET_RECONNECT_GRACE=30)]
    await procs[0].ready(http)
    procs += [node(processes, tmp_path, world_schema, nats.url, zones=2, WEBSOCKET_RECONNECT_GRACE=30)
              for _ in range(2)]
    for p in procs[1:]:
        await p.ready(http)
    view = await settled(http, procs[0], nodes=3, zones=2)
    names = {await node_name(http, p): p for p in procs}
    zone_id, owner_name = next((z["zone_id"], z["node"]) for z in view["zones"])
    owner_proc = names.pop(owner_name)
    g1, g2 = names.values()  # two nodes that do not tick the zone
    # subscribed through g1, then the socket drops: the owner holds the zone for the grace period
    first = await Player(http, g1).connect()
    await first.send({"type": "subscribe", "zone_id": zone_id})
    await first.expect("subscribed", zone_id=zone_id)
    await first.expect("tick")
    await first.close()
    # back through g2 within the grace period: resumed, without a subscribe
    second = await Player(http, g2).connect(first.token)
    resumed = await second.expect("subscribed", zone_id=zone_id)
    assert resumed.get("resumed") is True
    await wait_for(lambda: len(second.ticks(zone_id)) >= 3, timeout=10, what="ticks after resuming")
    # the same player connects to the owner itself: g2's socket is replaced (4000), the zone kept
    third = await Player(http, owner_proc).connect(first.token)
    assert (await third.expect("subscribed", zone_id=zone_id)).get("resumed") is True
    await wait_for(lambda: second.closed is not None, timeout=10, what="the replaced socket to close")
    assert second.closed == 4000
    await wait_for(lambda: len(third.ticks(zone_id)) >= 3, timeout=10, what="ticks on the owner")
    # and once more through g1: the owner's own socket is replaced
    fourth = await Player(http, g1).connect(first.token)
    assert (await fourth.expect("subscribed", zone_id=zone_id)).get("resumed") is True
    await wait_for(lambda: third.closed is not None, timeout=10, what="the owner's socket to close")
    assert third.closed == 4000
    await wait_for(lambda: len(fourth.ticks(zone_id)) >= 3, timeout=10, what="ticks through g1 again")
    ticks = fourth.ticks(zone_id)
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    # logging out through g2 ends the session's socket on g1 (4001)
    status, _ = await Client(g2.url, http).call("POST", "/api/auth/logout", first.token)
    assert status == 204
    await wait_for(lambda: fourth.closed is not None, timeout=10, what="the socket of the ended session to close")
    assert fourth.closed == 4001
    for player in (first, second, third, fourth):
        await player.close()


async def test_debug_pause_step_resume_and_connections_act_on_every_node(world_schema, nats, tmp_path, http,
                                                                         processes):
    a = node(processes, tmp_path, world_schema, nats.url, zones=2)
    await a.ready(http)
    b = node(processes, tmp_path, world_schema, nats.url, zones=2)
    await b.ready(http)
    view = await settled(http, a, nodes=2, zones=2)
    name_a, name_b = await node_name(http, a), await node_name(http, b)
    zone_of = {z["node"]: z["zone_id"] for z in view["zones"]}
    on_a = await Watcher(http, b, zone_of[name_a]).start()  # each played through the other node
    on_b = await Watcher(http, a, zone_of[name_b]).start()
    await wait_for(lambda: on_a.ticks and on_b.ticks, timeout=10, what="ticks")
    admin = Client(a.url, http)
    token = (await admin.player())["token"]
    status, body = await admin.call("POST", "/api/debug/tick/pause", token)
    assert status == 200 and body["paused"] is True
    await asyncio.sleep(scaled(0.5))
    seen = (len(on_a.ticks), len(on_b.ticks))
    await asyncio.sleep(scaled(1))
    assert (len(on_a.ticks), len(on_b.ticks)) == seen, "a node went on ticking after the pause"
    async with http.get(b.url + "/healthz") as r:
        assert (await r.json())["paused"] is True
    # one step through a: both nodes run one tick, and the answer comes once both have
    status, body = await admin.call("POST", "/api/debug/tick/step", token)
    assert status == 200
    await wait_for(lambda: (len(on_a.ticks), len(on_b.ticks)) == (seen[0] + 1, seen[1] + 1), timeout=5,
                   what="one tick of each zone")
    await asyncio.sleep(scaled(0.5))
    assert (len(on_a.ticks), len(on_b.ticks)) == (seen[0] + 1, seen[1] + 1)
    # every node's connections, each with its node
    status, body = await admin.call("GET", "/api/debug/connections", token)
    assert status == 200
    assert sorted(c["node"] for c in body["connections"]) == sorted([name_a, name_b])
    # resumed through b: both tick again
    status, body = await Client(b.url, http).call("POST", "/api/debug/tick/resume",
                                                 (await Client(b.url, http).player())["token"])
    assert status == 200 and body["paused"] is False
    await wait_for(lambda: len(on_a.ticks) > seen[0] + 3 and len(on_b.ticks) > seen[1] + 3, timeout=10,
                   what="ticks after the resume")
    await on_a.close()
    await on_b.close()


async def test_a_zone_taken_over_is_replayed_against_its_own_world(world_schema, nats, tmp_path, http, processes):
    """tests.fault_games:Census reads the zone through the framework every tick: the journal's
    replay on the node taking a killed node's zone over must read the zone being replayed."""
    census = "tests.fault_games:Census"
    a = node(processes, tmp_path, world_schema, nats.url, zones=2, game=census, PERSISTENCE_INTERVAL=30)
    await a.ready(http)
    b = node(processes, tmp_path, world_schema, nats.url, zones=2, game=census, PERSISTENCE_INTERVAL=30)
    await b.ready(http)
    view = await settled(http, b, nodes=2, zones=2)
    name_a = await node_name(http, a)
    zone_id = next(z["zone_id"] for z in view["zones"] if z["node"] == name_a)
    player = await Player(http, b).connect()  # through b: it keeps its socket when a dies
    await player.send({"type": "subscribe", "zone_id": zone_id})
    for i in range(5):  # journaled with the ticks b replays (their players' names are looked up)
        await player.send({"type": "intent", "data": {"hello": i}})
    await wait_for(lambda: len(player.ticks(zone_id)) >= 20, timeout=10, what="ticks from a")
    a.send(signal.SIGKILL)  # with flushes 30 s apart, b goes on from the journal alone
    await a.wait_exit()
    seen = len(player.of("tick"))
    await wait_for(lambda: len(player.of("tick")) > seen + 5, timeout=LEASE + 10, what="ticks from b")
    taken = [line for line in b.log_text().splitlines() if zone_id in line and "ticks here now" in line]
    replayed = int(taken[-1].split("journaled tick(s) replayed")[0].rsplit("(", 1)[1].split()[0])
    assert replayed >= 10, taken
    assert "taking zone" not in b.log_text() and "Traceback" not in b.log_text(), b.log_text()[-3000:]
    for tick in player.of("tick"):
        assert tick["state"]["ns"] == list(range(1, tick["state"]["count"] + 1)), tick["state"]
    await player.close()
    check_fencing(world_schema)


async def test_players_of_a_killed_gateway_leave_their_zones_and_intents_never_drop_a_player_in_a_hand_over(
        world_schema, nats, tmp_path, http, processes):
    a = node(processes, tmp_path, world_schema, nats.url, zones=4, WEBSOCKET_RECONNECT_GRACE=1)
    await a.ready(http)
    view = await settled(http, a, nodes=1, zones=4)
    zones = [z["zone_id"] for z in view["zones"]]
    # players on a, each sending an intent every 20 ms, while a hands half its zones to b
    busy = [await Watcher(http, a, z).start() for z in zones]
    stop = asyncio.Event()

    async def chatter(w: Watcher) -> None:
        k = 0
        while not stop.is_set() and w.closed is None:
            k += 1
            await w.ws.send_json({"type": "intent", "data": {"spawn": k}})
            await asyncio.sleep(0.02)
    chatting = [asyncio.ensure_future(chatter(w)) for w in busy]
    b = node(processes, tmp_path, world_schema, nats.url, zones=4, WEBSOCKET_RECONNECT_GRACE=1)
    await b.ready(http)
    await settled(http, a, nodes=2, zones=4)
    await wait_for(lambda: sum(len(w.subscribed) == 2 for w in busy) == 2, timeout=10,
                   what="the players of two zones to follow them to b")
    await asyncio.sleep(scaled(1))
    stop.set()
    await asyncio.gather(*chatting)
    for w in busy:  # nobody dropped out of its zone: every one still gets ticks
        assert not [e for e in w.errors if e["code"] != "rate_limited"], w.errors
        n = len(w.ticks)
        await wait_for(lambda: len(w.ticks) > n + 2, timeout=5, what="ticks after the hand-over")
        await w.close()
    # a player on b playing a zone of a, then b is killed: a lets the player go (grace 1 s)
    name_a = await node_name(http, a)
    zone_id = next(z["zone_id"] for z in (await cluster_view(http, a))["zones"] if z["node"] == name_a)
    orphan = await Watcher(http, b, zone_id).start()
    await wait_for(lambda: orphan.ticks, timeout=10, what="ticks through b")
    token = (await Client(a.url, http).player())["token"]

    async def subscribers() -> int:
        status, body = await Client(a.url, http).call("GET", f"/api/zones/{zone_id}", token)
        return body["subscriber_count"]
    assert await subscribers() == 1
    b.send(signal.SIGKILL)
    await b.wait_exit()
    await wait_for(lambda: subscribers_is(subscribers, 0), timeout=LEASE + 10,
                   what="the dead node's player to leave the zone")


async def subscribers_is(count, expected: int) -> bool:
    return await count() == expected
