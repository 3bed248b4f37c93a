#!/usr/bin/env python3
"""Spatial query cost does not grow with the size of the zone.

Builds two zones with the same density of entities per spatial bucket: 1,000 entities in
an 800x800 zone and 100,000 entities in an 8,000x8,000 zone (both sides multiples of
``gridserver.BUCKET_SIZE``, 100x the area for 100x the entities). Entities are spread
uniformly: a third are 0x0 points, most of the rest are 1-4 cells a side, a few span several
buckets (up to 40 cells). It then times, through ``gridserver.World`` (what game modules
call), area queries over 16x16 windows and overlap queries of 1-8 cell rectangles at the
same random positions (scaled to each zone), and prints one row per zone and the ratio
100k/1k. The claim: the 100,000-entity zone costs within 2x of the 1,000-entity zone per query.

    python bench/bench_queries.py            # full run; exits 1 if the claim does not hold
    python bench/bench_queries.py --quick    # a few thousand queries: a smoke run for CI (never fails on timing)

Writes the numbers to bench/results/queries.json (``--out`` to change). Standard library only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gridserver  # noqa: E402
from gridserver import Entity, World, Zone  # noqa: E402

ZONES = [(1_000, 800), (100_000, 8_000)]  # (entities, side): 0.4 entities per 16x16 bucket in both
AREA_WINDOW = 16
LIMIT = 2.0


def build_zone(world: World, n: int, side: int, rng: random.Random) -> Zone:
    zone = Zone(uuid.uuid4(), f"bench-{n}", side, side)
    entities = []
    for _ in range(n):
        kind = rng.random()
        if kind < 1 / 3:
            w = h = 0                                       # a point
        elif kind < 0.95:
            w, h = rng.randint(1, 4), rng.randint(1, 4)     # small things
        else:
            w, h = rng.randint(5, 40), rng.randint(5, 40)   # a few span several buckets
        x = rng.randrange(0, side - w) if w else rng.randrange(0, side)
        y = rng.randrange(0, side - h) if h else rng.randrange(0, side)
        entities.append(Entity(uuid.uuid4(), zone.id, x, y, w, h))
    world.add_zone(zone, entities)
    return zone


def make_queries(rng: random.Random, count: int) -> list[tuple[float, float, int, int]]:
    """Positions as fractions of the zone side, so both zones get the same relative positions."""
    return [(rng.random(), rng.random(), rng.randint(1, 8), rng.randint(1, 8)) for _ in range(count)]


def time_round(world: World, zone: Zone, queries) -> tuple[float, float, int, int]:
    """One pass of every query; returns (area seconds, overlap seconds, area hits, overlap hits)."""
    side = zone.width
    area_q = [(int(fx * (side - AREA_WINDOW)), int(fy * (side - AREA_WINDOW))) for fx, fy, _, _ in queries]
    over_q = [(int(fx * (side - w)), int(fy * (side - h)), w, h) for fx, fy, w, h in queries]
    zid, qa, qo = zone.id, world.query_area, world.query_overlap
    area_hits = overlap_hits = 0
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for x, y in area_q:
            area_hits += len(qa(zid, x, y, AREA_WINDOW, AREA_WINDOW))
        t1 = time.perf_counter()
        for x, y, w, h in over_q:
            overlap_hits += len(qo(zid, x, y, w, h))
        t2 = time.perf_counter()
    finally:
        gc.enable()
    return t1 - t0, t2 - t1, area_hits, overlap_hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries: a smoke run for CI; never fails on timing")
    parser.add_argument("--queries", type=int, help="queries per round (default 20000, 2000 with --quick)")
    parser.add_argument("--rounds", type=int, help="timed rounds per zone, best kept (default 15, 3 with --quick)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "queries.json"))
    args = parser.parse_args(argv)
    count = args.queries or (2_000 if args.quick else 20_000)
    rounds = args.rounds or (3 if args.quick else 15)

    rng = random.Random(args.seed)
    world = World()
    t0 = time.perf_counter()
    zones = [(n, build_zone(world, n, side, rng)) for n, side in ZONES]
    build_s = time.perf_counter() - t0
    queries = make_queries(rng, count)

    best = {n: [float("inf"), float("inf"), 0, 0] for n, _ in zones}
    time_round(world, zones[0][1], queries[: min(count, 500)])  # warm-up
    for _ in range(rounds):                                     # interleaved, so drift hits both alike
        for n, zone in zones:
            a, o, ah, oh = time_round(world, zone, queries)
            b = best[n]
            b[0], b[1], b[2], b[3] = min(b[0], a), min(b[1], o), ah, oh

    rows = []
    for n, zone in zones:
        a, o, ah, oh = best[n]
        rows.append({"entities": n, "zone": f"{zone.width}x{zone.height}",
                     "entities_per_bucket": round(n / ((zone.width // gridserver.BUCKET_SIZE) ** 2), 4),
                     "queries": count, "area_us": a / count * 1e6, "overlap_us": o / count * 1e6,
                     "area_hits_per_query": ah / count, "overlap_hits_per_query": oh / count})
    small, large = rows[0], rows[-1]
    ratio = {"area": large["area_us"] / small["area_us"], "overlap": large["overlap_us"] / small["overlap_us"]}
    within = max(ratio.values()) <= LIMIT

    print(f"spatial queries through gridserver.World (bucket {gridserver.BUCKET_SIZE}, "
          f"{AREA_WINDOW}x{AREA_WINDOW} area windows, 1-8 cell overlap rectangles; best of {rounds} rounds)")
    header = (f"{'entities':>9} {'zone':>11} {'per bucket':>10} {'queries':>8} {'area us/q':>10} "
              f"{'overlap us/q':>12} {'area hits/q':>11} {'overlap hits/q':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['entities']:>9} {r['zone']:>11} {r['entities_per_bucket']:>10} {r['queries']:>8} "
              f"{r['area_us']:>10.2f} {r['overlap_us']:>12.2f} {r['area_hits_per_query']:>11.3f} "
              f"{r['overlap_hits_per_query']:>14.3f}")
    print(f"ratio 100k/1k: area {ratio['area']:.2f}x, overlap {ratio['overlap']:.2f}x "
          f"(limit {LIMIT:.0f}x: {'ok' if within else 'EXCEEDED'})")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "spatial_queries", "quick": args.quick, "seed": args.seed, "rounds": rounds,
                   "bucket_size": gridserver.BUCKET_SIZE, "area_window": AREA_WINDOW, "build_seconds": build_s,
                   "python": platform.python_version(), "platform": platform.platform(),
                   "zones": rows, "ratio_large_to_small": ratio, "limit": LIMIT, "within_limit": within},
                  f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.relpath(args.out)}")
    return 0 if (within or args.quick) else 1


if __name__ == "__main__":
    sys.exit(main())
