"""The example game's own cost, in-process: no sockets, no database.

``python bench/walkers_inproc.py [ZONES] [FOG_RADIUS]`` builds ZONES zones of 64x64 (200 by
default) with 50 players each, lets them join, then runs ticks in which every player sends one
move, each zone through ``gridserver.run_zone_tick`` as the game thread runs it (hooks,
``on_tick``, the checks, the apply, the frames). It prints the thread CPU time of a whole
tick (median and best of 12) and per player. ``--profile`` adds cProfile's top entries of one
more tick.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gridserver  # noqa: E402
from gridserver import Intent, World, Zone, ZoneInputs, run_zone_tick  # noqa: E402

PER_ZONE, TICKS = 50, 12
MOVES = ["up", "down", "left", "right"]


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    zones_count = int(args[0]) if args else 200
    fog = args[1] if len(args) > 1 else "0"
    spec = importlib.util.spec_from_file_location("walkers_inproc",
                                                  os.path.join(HERE, "..", "game_modules", "walkers.py"))
    game = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(game)
    world = World()
    usernames: dict = {}

    def create_zone(name, width, height, metadata):
        zone = Zone(uuid.uuid4(), name, width, height, dict(metadata))
        world.add_zone(zone)
        return zone

    game.on_init(gridserver.FrameworkAPI(world, {"fog_radius": fog}, section="game_modules.walkers",
                                         tick_interval=1.0, create_zone=create_zone, usernames=usernames))
    zones = [Zone(uuid.uuid4(), f"z{i}", 64, 64, {"game": "walkers"}) for i in range(zones_count)]
    for zone in zones:
        world.add_zone(zone)
    players = {zone.id: [uuid.uuid4() for _ in range(PER_ZONE)] for zone in zones}
    for ps in players.values():
        for p in ps:
            usernames[p] = "w" + str(p)[:6]
    rng, seq = random.Random(1), itertools.count(1)

    def tick(n: int, join: bool = False) -> float:
        cpu = 0.0
        for i, zone in enumerate(zones):
            ps = players[zone.id]
            events = [("join", p) for p in ps] if join else []
            intents = [] if join else [Intent(p, zone.id, {"move": rng.choice(MOVES)}, 0.0, next(seq)) for p in ps]
            inputs = ZoneInputs(n, intents, events, ps, seed=n * 100_003 + i, at=1000.0 + n,
                                names={p: usernames[p] for p in ps})
            zs = world.zones[zone.id]
            t0 = time.thread_time()
            outcome = run_zone_tick(world, game, zs, inputs, time.time)
            cpu += time.thread_time() - t0
            if outcome.error is not None:
                raise SystemExit(f"zone {i} tick {n}: {outcome.error}")
        return cpu

    tick(1, join=True)
    tick(2)
    tick(3)
    times = sorted(tick(n) for n in range(4, 4 + TICKS))
    median = times[len(times) // 2]
    print(f"walkers, {zones_count} zones x {PER_ZONE} players, fog radius {fog}: CPU a tick median "
          f"{median * 1000:.1f} ms, best {times[0] * 1000:.1f} ms ({median / (zones_count * PER_ZONE) * 1e6:.2f} "
          f"us a player)")
    if "--profile" in sys.argv:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.runcall(tick, 4 + TICKS)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
