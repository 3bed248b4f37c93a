"""One load-driver process: connects its share of players, subscribes them, plays, reports.

Run by ``bench/run.py``, not by hand. Protocol on stdin/stdout, one line each:
it prints ``READY <n> <failed>`` once every client is subscribed, waits for
``GO <seconds> <linger>``, plays for that long (each player sends one move intent a second,
at its own phase), keeps playing and receiving for ``linger`` more seconds, then writes that
window's results as one JSON line and waits for the next ``GO`` (a soak is a series of
windows); it exits at the end of its input.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time

from wsclient import client_frame, connect

_MOVES = [client_frame(json.dumps({"type": "intent", "data": {"move": m}}, separators=(",", ":")).encode())
          for m in ("up", "down", "left", "right")]


async def main() -> None:
    spec = json.loads(sys.stdin.readline())
    host, port, players = spec["host"], spec["port"], spec["players"]
    intents_per_second = spec.get("intents_per_second", 1.0)
    record_from = [None]
    clients = []
    zones = []  # each client's zone
    failures = 0
    for start in range(0, len(players), 200):
        batch = players[start:start + 200]
        results = await asyncio.gather(*(connect(host, port, p["token"], record_from) for p in batch),
                                       return_exceptions=True)
        for p, c in zip(batch, results):
            if isinstance(c, BaseException):
                failures += 1
                continue
            c.send_json({"type": "subscribe", "zone_id": p["zone_id"]})
            clients.append(c)
            zones.append(p["zone_id"])
    for c in clients:
        try:
            while True:
                msg = await asyncio.wait_for(c.control.get(), 30)
                if msg.get("type") == "subscribed":
                    break
        except asyncio.TimeoutError:
            failures += 1
    print(f"READY {len(clients)} {failures}", flush=True)
    play = Player(clients, intents_per_second)
    while True:
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if not line.startswith("GO"):
            break
        duration, linger = float(line.split()[1]), float(line.split()[2])
        for c in clients:
            c.ticks.clear()
        record_from[0] = time.time()
        out = await play.window(duration, linger)
        out.update({"clients": len(clients), "connect_failures": failures,
                    "alive": sum(1 for c in clients if not c.closed),
                    "close_codes": [c.close_code for c in clients if c.closed], "zones": zones,
                    # [tick_number, latency from sent_at, receipt time] per tick, per client
                    "ticks": [[[n, round(lat, 6), round(at, 6)] for n, (lat, at) in sorted(c.ticks.items())]
                              for c in clients]})
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    for c in clients:
        c.transport.close()


class Player:
    """Sends each client's move intents, one per ``1 / intents_per_second`` at its own phase,
    from one window to the next (they go on while a window's last ticks are awaited)."""

    def __init__(self, clients: list, intents_per_second: float = 1.0):
        self.clients = clients
        self.slots = 100
        self.phase = [random.randrange(self.slots) for _ in clients]
        self.period = 1.0 / intents_per_second if intents_per_second > 0 else None
        self.sent = 0

    async def play(self, until: float) -> None:
        if self.period is None:
            await asyncio.sleep(max(0.0, until - time.time()))
            return
        tick = self.period / self.slots
        step = 0
        start = time.time()
        while time.time() < until:
            slot = step % self.slots
            for c, ph in zip(self.clients, self.phase):
                if ph == slot:
                    c.send_raw(random.choice(_MOVES))
                    self.sent += 1
            step += 1
            await asyncio.sleep(max(0.0, min(until, start + step * tick) - time.time()))

    async def window(self, duration: float, linger: float) -> dict:
        """Play ``duration`` seconds (measured), then ``linger`` more while the ticks counted by
        the server at the window's end are still on their way."""
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.time()
        sent0 = self.sent
        await self.play(t0 + duration)
        t1 = time.time()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        sent = self.sent - sent0
        await self.play(t1 + linger)
        return {"intents_sent": sent, "window": [t0, t1],
                "cpu_seconds": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}

if __name__ == "__main__":
    import os
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    asyncio.run(main())
