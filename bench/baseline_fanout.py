"""The thinnest Python fan-out of the grid-walk workload, for comparison with gridserver.

One asyncio process, no auth, no database, no game logic: it accepts WebSocket upgrades,
answers ``subscribe`` with ``subscribed``, reads and drops intents (one JSON parse each, as
any server must), and once a second writes one pre-serialized tick frame per zone to each
of the zone's subscribers, with a state of the same size as the example game's. Run by
``bench/run.py --scenario baseline``; ``python bench/baseline_fanout.py PORT [PER_ZONE
[STARTS_FILE]]`` by hand. With ``STARTS_FILE``, each tick's number and start (seconds since the
epoch) are appended to it, one line a tick, for latency measured from the tick's start.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
import time
import uuid

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B07"


def frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def fake_state(players: int, others: int = 16) -> dict:
    ents = [{"id": str(uuid.uuid4()), "x": i % 64, "y": i // 64, "w": 1, "h": 1, "kind": "avatar",
             "player_id": str(uuid.uuid4()), "name": f"walker{i}", "score": 0} for i in range(players)]
    ents += [{"id": str(uuid.uuid4()), "x": i, "y": 5, "w": 0, "h": 0, "kind": "item"} for i in range(others)]
    return {"tick": 0, "entities": ents}


class Conn(asyncio.Protocol):
    def __init__(self, hub: "Hub"):
        self.hub = hub
        self.buf = bytearray()
        self.open = False
        self.zone = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if self.zone is not None:
            self.hub.zones[self.zone].discard(self)

    def data_received(self, data):
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[:end + 4]
            key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                       if line.lower().startswith("sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
            self.transport.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                  f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
            self.open = True
        while len(buf) >= 6:
            n = buf[1] & 0x7F
            off = 2
            if n == 126:
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + 4 + n:
                return
            mask = bytes(buf[off:off + 4])
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buf[off + 4:off + 4 + n])) if any(mask) \
                else bytes(buf[off + 4:off + 4 + n])
            opcode = buf[0] & 0x0F
            del buf[:off + 4 + n]
            if opcode == 0x1:
                msg = json.loads(payload)
                if msg.get("type") == "subscribe":
                    self.zone = msg["zone_id"]
                    self.hub.zones.setdefault(self.zone, set()).add(self)
                    self.transport.write(frame(json.dumps({"type": "subscribed", "zone_id": self.zone}).encode()))
            elif opcode == 0x8:
                self.transport.close()
                return


class Hub:
    def __init__(self, per_zone: int, starts=None):
        self.zones: dict[str, set[Conn]] = {}
        self.state = json.dumps(fake_state(per_zone), separators=(",", ":"))
        self.starts = starts

    async def ticks(self, interval: float = 1.0):
        n = 0
        start = time.monotonic()
        while True:
            n += 1
            await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
            if self.starts is not None:
                self.starts.write(f"{n} {time.time():.6f}\n")
                self.starts.flush()
            for zone_id, conns in self.zones.items():
                data = frame((f'{{"type":"tick","zone_id":"{zone_id}","tick_number":{n},'
                              f'"sent_at":{time.time():.6f},"state":{self.state}}}').encode())
                for c in conns:
                    c.transport.write(data)
            self.tick_number = n


async def main(port: int, per_zone: int, starts_file: str | None = None) -> None:
    hub = Hub(per_zone, open(starts_file, "a") if starts_file else None)
    hub.tick_number = 0
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(hub), "127.0.0.1", port, backlog=4096)
    asyncio.ensure_future(hub.ticks())
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 50,
                     sys.argv[3] if len(sys.argv) > 3 else None))
