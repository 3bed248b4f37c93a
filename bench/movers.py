"""Benchmark game module: many zones full of entities that all move every tick, no players.

Used by ``bench/run.py --scenario world``. Settings (section ``[bench.movers]``, or
``GRIDSERVER_BENCH_MOVERS_<KEY>``): ``zones`` (created at start when missing), ``entities``
per zone, ``size`` of each zone, ``bulk`` (1: the moves go in one ``EntityMoves``; 0: one
``EntityUpdate`` per entity, the form before ``EntityMoves`` existed).
"""

from __future__ import annotations

import random

from gridserver import EntityCreate, EntityMoves, EntityUpdate, TickResult

_cfg = {"zones": 1000, "entities": 100, "size": 64, "bulk": 1}
_rng = random.Random(1)
_fw = None
_STEPS = [(1, 0), (-1, 0), (0, 1), (0, -1)]


def on_init(framework):
    global _fw
    _fw = framework
    for key in _cfg:
        _cfg[key] = framework.setting(key, _cfg[key], int)
    have = len(framework.list_zones())
    for i in range(have, _cfg["zones"]):
        framework.create_zone(f"movers-{i}", _cfg["size"], _cfg["size"])


def on_tick(zone_id, entities, intents, tick_number):
    size = _cfg["size"]
    if not entities:
        return TickResult(entity_creates=[
            EntityCreate(_rng.randrange(size), _rng.randrange(size), 1, 1, {"n": i})
            for i in range(_cfg["entities"])])
    rand = _rng.random
    xs, ys = [], []
    for e in entities:
        dx, dy = _STEPS[int(rand() * 4)]
        x, y = e.x + dx, e.y + dy
        if not 0 <= x < size:
            x = e.x - dx
        if not 0 <= y < size:
            y = e.y - dy
        xs.append(x)
        ys.append(y)
    if not _cfg["bulk"]:
        updates = [EntityUpdate(e.id, x, y) for e, x, y in zip(entities, xs, ys)]
        return TickResult(entity_updates=updates, broadcast_state={"tick": tick_number})
    moves = EntityMoves([e.id for e in entities], xs, ys)
    return TickResult(entity_moves=moves, broadcast_state={"tick": tick_number})


def get_player_state(zone_id, player_id, full_state):
    return full_state
