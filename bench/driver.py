"""One load-driver process: connects its share of players, subscribes them, plays, reports.

Run by ``bench/run.py``, not by hand. Protocol on stdin/stdout, one line each:
it prints ``READY <n> <failed>`` once every client is subscribed, waits for
``GO <seconds> <linger>``, plays for that long (each player sends one move intent a second,
at its own phase), keeps receiving for ``linger`` more seconds, then writes its results as
one JSON line and exits.
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
    for c in clients:
        try:
            while True:
                msg = await asyncio.wait_for(c.control.get(), 30)
                if msg.get("type") == "subscribed":
                    break
        except asyncio.TimeoutError:
            failures += 1
    print(f"READY {len(clients)} {failures}", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    duration, linger = float(line.split()[1]), float(line.split()[2])
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    record_from[0] = t0
    slots = 100
    phase = [random.randrange(slots) for _ in clients]
    sent = 0
    step = 0
    period = 1.0 / intents_per_second if intents_per_second > 0 else None
    while time.time() - t0 < duration:
        if period is not None:
            slot = step % slots
            for c, ph in zip(clients, phase):
                if ph == slot:
                    c.send_raw(random.choice(_MOVES))
                    sent += 1
            step += 1
            await asyncio.sleep(max(0.0, t0 + step * period / slots - time.time()))
        else:
            await asyncio.sleep(0.1)
    t1 = time.time()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    await asyncio.sleep(linger)  # ticks counted by the server at the window's end are still on their way
    out = {
        "clients": len(clients), "connect_failures": failures, "alive": sum(1 for c in clients if not c.closed),
        "close_codes": [c.close_code for c in clients if c.closed], "intents_sent": sent,
        "window": [t0, t1], "cpu_seconds": cpu,
        "ticks": [sorted(c.ticks.items()) for c in clients],
    }
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    for c in clients:
        c.transport.close()


if __name__ == "__main__":
    import os
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    asyncio.run(main())
