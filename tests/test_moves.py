"""``EntityMoves``, the bulk form of moves: its checks (each rejection names the entry and
applies nothing of the result), applying it with creates, updates and deletes, the spatial
index after it, the flush that saves it (SQLite and PostgreSQL, read back after a restart),
and zones that move in bulk ticked twice from the same inputs.

The journal's rewind and ``gridserver replay`` of a zone moving in bulk are in
``tests/test_journal.py`` (``BulkStepper``).
"""

from __future__ import annotations

import array
import copy
import uuid
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gridserver
from gridserver import (Entity, EntityCreate, EntityMoves, EntityUpdate, SpatialIndex, TickRejected, TickResult,
                        World, Zone, ZoneSim)
from helpers import Passive, make_config, stop_server

W, H = 64, 40


def make_world():
    """One zone, loaded (so nothing dirty): ``p`` a point, ``q`` a cell, ``r`` a 3x2 rectangle,
    ``s`` a cell, ``t`` a point, ``u`` a cell, ``v`` a point."""
    world = World()
    zone = Zone(uuid.uuid4(), "z", W, H)
    es = [Entity(uuid.uuid4(), zone.id, x, y, w, h, {"n": i}, 1.0, 1.0)
          for i, (x, y, w, h) in enumerate([(5, 5, 0, 0), (15, 15, 1, 1), (30, 20, 3, 2), (40, 1, 1, 1),
                                            (50, 30, 0, 0), (60, 2, 1, 1), (3, 33, 0, 0)])]
    world.add_zone(zone, es)
    return world, zone, *es


def snapshot(world: World, zone: Zone):
    """Everything a rejected result must leave as it was."""
    zs = world.zones[zone.id]
    ents = {eid: (e.x, e.y, e.width, e.height, copy.deepcopy(e.metadata), e.updated_at)
            for eid, e in zs.entities.items()}
    return (ents, index_view(zs.index), {e.id for e in world.dirty}, set(world.deleted))


def index_view(index: SpatialIndex) -> dict:
    """Each bucket's entity ids, and whether the index holds anything larger than a cell."""
    return {"buckets": {k: sorted(str(e.id) for e in b) for k, b in index._buckets.items()},
            "cells_only": index.cells_only()}


def fresh_index_view(zs) -> dict:
    """The index the zone's entities would have if they were inserted where they are now."""
    index = SpatialIndex()
    for e in zs.entities.values():
        index.insert(e)
    return index_view(index)


def area_ids(world, zone, x, y, w, h):
    return {e.id for e in world.query_area(zone.id, x, y, w, h)}


# -- checks: each bad move rejects the whole result -----------------------------------------

def _bad_moves():
    """(name, build(e) -> EntityMoves or what stands for one, the error's start), ``e`` the
    entities by name. The bad entry comes after two good ones, in a result that also creates,
    updates ``s`` and deletes ``t``."""
    stranger = uuid.uuid4()

    def moves(entry):
        def build(e):
            rows = [(e["p"].id, 6, 6), (e["q"].id, 16, 14), entry(e)]
            return EntityMoves([i for i, _, _ in rows], [x for _, x, _ in rows], [y for _, _, y in rows])
        return build

    return [
        ("unknown id", moves(lambda e: (stranger, 1, 1)), f"entity_moves.ids[2]: move of unknown entity {stranger}"),
        ("id also deleted", moves(lambda e: (e["t"].id, 1, 1)),
         "entity_moves.ids[2]: entity {t} is also in entity_deletes"),
        ("id also updated", moves(lambda e: (e["s"].id, 2, 2)),
         "entity_moves.ids[2]: entity {s} is also in entity_updates (one change per entity"),
        ("id given twice", moves(lambda e: (e["p"].id, 7, 7)),
         "entity_moves.ids[2]: entity {p} is moved twice (first at entity_moves.ids[0])"),
        ("malformed id", moves(lambda e: ("not-a-uuid", 1, 1)), "entity_moves.ids[2]: invalid id 'not-a-uuid'"),
        ("unhashable id", moves(lambda e: ([1], 1, 1)), "entity_moves.ids[2]: invalid id [1]"),
        ("float x", moves(lambda e: (e["u"].id, 1.0, 1)), "entity_moves.xs[2] must be an integer, got 1.0"),
        ("bool y", moves(lambda e: (e["r"].id, 1, True)), "entity_moves.ys[2] must be an integer, got True"),
        ("str x", moves(lambda e: (e["v"].id, "1", 1)), "entity_moves.xs[2] must be an integer, got '1'"),
        ("None y", moves(lambda e: (e["r"].id, 1, None)), "entity_moves.ys[2] must be an integer, got None"),
        ("negative x", moves(lambda e: (e["r"].id, -1, 1)),
         "entity_moves[2]: out of bounds of the 64x40 zone: entity {r} (3x2) moved to (-1, 1)"),
        ("negative y of a point", moves(lambda e: (e["v"].id, 1, -1)),
         "entity_moves[2]: out of bounds of the 64x40 zone: entity {v} (0x0) moved to (1, -1)"),
        ("rectangle past the right edge", moves(lambda e: (e["r"].id, W - 2, 0)),
         "entity_moves[2]: out of bounds of the 64x40 zone: entity {r} (3x2) moved to (62, 0)"),
        ("rectangle past the bottom edge", moves(lambda e: (e["r"].id, 0, H - 1)),
         "entity_moves[2]: out of bounds of the 64x40 zone: entity {r} (3x2) moved to (0, 39)"),
        ("point at x == zone width", moves(lambda e: (e["v"].id, W, 0)),
         "entity_moves[2]: out of bounds of the 64x40 zone: entity {v} (0x0) moved to (64, 0)"),
        ("cell at y == zone height", moves(lambda e: (e["u"].id, 0, H)),
         "entity_moves[2]: out of bounds of the 64x40 zone: entity {u} (1x1) moved to (0, 40)"),
        ("far beyond the zone", moves(lambda e: (e["u"].id, 10 ** 30, 0)), "entity_moves[2]: out of bounds"),
        ("fewer xs than ids", lambda e: EntityMoves([e["p"].id, e["q"].id], [1], [1, 2]),
         "entity_moves has 2 ids, 1 xs and 2 ys: each id needs one x and one y"),
        ("more ys than ids", lambda e: EntityMoves([e["p"].id], [1], [1, 2]),
         "entity_moves has 1 ids, 1 xs and 2 ys"),
        ("not an EntityMoves", lambda e: {"ids": [e["p"].id], "xs": [1], "ys": [1]},
         "entity_moves must be an EntityMoves, got dict"),
        ("ids as a generator", lambda e: EntityMoves((i for i in [e["p"].id]), [1], [1]),
         "entity_moves.ids must be a list or tuple, got generator"),
        ("xs as a set", lambda e: EntityMoves([e["p"].id], {1}, [1]),
         "entity_moves.xs must be a list, tuple or array.array, got set"),
        ("ids as an array", lambda e: EntityMoves(array.array("i", [1]), [1], [1]),
         "entity_moves.ids must be a list or tuple, got array"),
        ("ys as an array of floats", lambda e: EntityMoves([e["p"].id, e["q"].id], array.array("i", [1, 2]),
                                                          array.array("d", [1, 2.5])),
         "entity_moves.ys[0] must be an integer, got 1.0"),
    ]


@pytest.mark.parametrize("name, build, error", _bad_moves(), ids=[n for n, _, _ in _bad_moves()])
def test_a_bad_move_rejects_the_whole_result_naming_the_entry(name, build, error):
    world, zone, *es = make_world()
    e = dict(zip("pqrstuv", es))
    world.apply(zone.id, TickResult(entity_creates=[EntityCreate(0, 0, 1, 1)]))  # something waiting for a flush
    before = snapshot(world, zone)
    result = TickResult(entity_creates=[EntityCreate(1, 1, 2, 2, {"new": 1})],
                        entity_updates=[EntityUpdate(e["s"].id, x=41, metadata={"up": 1})],
                        entity_deletes=[e["t"].id], entity_moves=build(e))
    with pytest.raises(TickRejected) as caught:
        world.apply(zone.id, result, now=99.0)
    want = error.format(**{k: v.id for k, v in e.items()})
    assert str(caught.value).startswith(want), (str(caught.value), want)
    assert snapshot(world, zone) == before
    # and the zone takes a good result afterwards
    p = e["p"]
    world.apply(zone.id, TickResult(entity_moves=EntityMoves([p.id], [7], [8])), now=100.0)
    assert (p.x, p.y, p.updated_at) == (7, 8, 100.0)


def test_an_entity_created_by_the_same_result_or_deleted_before_is_unknown_to_moves():
    world, zone, p, q, r, s, t, *_ = make_world()
    new = uuid.uuid4()
    with pytest.raises(TickRejected, match=rf"entity_moves.ids\[0\]: move of unknown entity {new} \(created by this "
                                           r"same result: give it its place in its EntityCreate\)"):
        world.apply(zone.id, TickResult(entity_creates=[EntityCreate(1, 1, 0, 0, {}, new)],
                                        entity_moves=EntityMoves([new], [2], [2])))
    world.apply(zone.id, TickResult(entity_deletes=[t.id]))
    with pytest.raises(TickRejected, match=rf"entity_moves.ids\[1\]: move of unknown entity {t.id}$"):
        world.apply(zone.id, TickResult(entity_moves=EntityMoves([p.id, t.id], [1, 2], [1, 2])))


def test_an_entity_of_another_zone_is_unknown_to_moves():
    world, zone, p, *_ = make_world()
    other = Zone(uuid.uuid4(), "other", W, H)
    world.add_zone(other)
    with pytest.raises(TickRejected, match=rf"move of unknown entity {p.id}"):
        world.apply(other.id, TickResult(entity_moves=EntityMoves([p.id], [1], [1])))


# -- applying them -------------------------------------------------------------------------

def test_moves_apply_with_creates_updates_and_deletes_and_the_index_follows():
    world, zone, p, q, r, s, t, *_ = make_world()
    result = TickResult(entity_creates=[EntityCreate(60, 35, 2, 2, {"new": 1})],
                        entity_updates=[EntityUpdate(s.id, x=41, width=2, metadata={"up": 1})],
                        entity_deletes=[t.id],
                        entity_moves=EntityMoves([p.id, q.id, r.id], [17, 16, 61], [33, 15, 0]))
    created, updated, deleted = world.apply(zone.id, result, now=5.0)
    assert (len(created), updated, deleted) == (1, 4, 1)  # the moves count as updates
    assert [(e.x, e.y, e.width, e.height) for e in (p, q, r, s)] == [(17, 33, 0, 0), (16, 15, 1, 1), (61, 0, 3, 2),
                                                                     (41, 1, 2, 1)]
    assert p.updated_at == q.updated_at == r.updated_at == s.updated_at == 5.0 and p.metadata == {"n": 0}
    assert {e.id for e in world.dirty} == {p.id, q.id, r.id, s.id, created[0].id} and world.deleted == {t.id}
    zs = world.zones[zone.id]
    assert index_view(zs.index) == fresh_index_view(zs)
    assert area_ids(world, zone, 17, 33, 1, 1) == {p.id} and area_ids(world, zone, 5, 5, 1, 1) == set()
    assert area_ids(world, zone, 63, 1, 1, 1) == {r.id} and area_ids(world, zone, 30, 20, 3, 2) == set()
    assert {e.id for e in world.query_overlap(zone.id, 60, 0, 2, 1)} == {r.id}


def test_every_entity_in_the_order_on_tick_had_them_and_any_other_order_give_the_same_world():
    worlds = []
    for order in (lambda es: es, lambda es: es[::-1]):
        world = World()
        zone = Zone(UUID(int=1), "z", 100, 100)
        es = [Entity(UUID(int=10 + i), zone.id, i, 2 * i, 1, 1, {}, 1.0, 1.0) for i in range(40)]
        world.add_zone(zone, es)
        chosen = order(world.entities_of(zone.id))
        world.apply(zone.id, TickResult(entity_moves=EntityMoves([e.id for e in chosen], [e.y for e in chosen],
                                                                 [e.x + 15 for e in chosen])), now=2.0)
        zs = world.zones[zone.id]
        assert index_view(zs.index) == fresh_index_view(zs)
        worlds.append(sorted((e.id, e.x, e.y, e.updated_at) for e in zs.entities.values()))
    assert worlds[0] == worlds[1] and worlds[0][3][1:] == (6, 18, 2.0)


def test_ids_as_text_tuples_and_integer_arrays_are_taken():
    world, zone, p, q, *_ = make_world()
    world.apply(zone.id, TickResult(entity_moves=EntityMoves((str(p.id), str(q.id)), array.array("i", [1, 2]),
                                                             array.array("q", [3, 4]))))
    assert (p.x, p.y, q.x, q.y) == (1, 3, 2, 4) and type(p.x) is int
    world.apply(zone.id, TickResult(entity_moves=EntityMoves([], [], [])))  # nothing to move
    world.apply(zone.id, TickResult(entity_moves=EntityMoves()))
    assert (p.x, p.y) == (1, 3)


def test_a_rectangle_and_points_share_one_result_and_both_edges_hold():
    """The quick bound takes the widest entity at the largest x; entries it is too strict for
    are checked one by one and pass."""
    world, zone, p, q, r, s, *_ = make_world()
    world.apply(zone.id, TickResult(entity_moves=EntityMoves([r.id, p.id, s.id], [0, W - 1, W - 1],
                                                             [H - 2, H - 1, 0])))
    assert (r.x, r.y, p.x, p.y, s.x, s.y) == (0, H - 2, W - 1, H - 1, W - 1, 0)
    zs = world.zones[zone.id]
    assert index_view(zs.index) == fresh_index_view(zs)


def test_the_index_knows_when_it_holds_only_cells():
    world, zone, p, q, r, *_ = make_world()
    zs = world.zones[zone.id]
    assert not zs.index.cells_only()
    world.apply(zone.id, TickResult(entity_updates=[EntityUpdate(r.id, width=1, height=1)]))
    assert zs.index.cells_only()
    # with only cells, a point at the zone's width is still out
    with pytest.raises(TickRejected, match="out of bounds"):
        world.apply(zone.id, TickResult(entity_moves=EntityMoves([p.id], [W], [0])))
    created, _, _ = world.apply(zone.id, TickResult(entity_creates=[EntityCreate(0, 0, 2, 1)]))
    assert not zs.index.cells_only()
    world.apply(zone.id, TickResult(entity_deletes=[created[0].id]))
    assert zs.index.cells_only()


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-3, W + 3), st.integers(-3, H + 3)), max_size=8),
       st.booleans())
def test_moves_do_what_the_same_updates_do(entries, cells):
    """Bulk moves against the same moves as ``EntityUpdate``s: the same world, or both rejected."""
    outcomes = []
    for bulk in (True, False):
        world = World()
        zone = Zone(UUID(int=1), "z", W, H)
        sizes = [(0, 0), (1, 1), (1, 1), (0, 0), (1, 0), (1, 1)] if cells else [(0, 0), (1, 1), (3, 2), (0, 4),
                                                                               (1, 0), (5, 5)]
        es = [Entity(UUID(int=10 + i), zone.id, 2 * i, i, w, h, {}, 1.0, 1.0) for i, (w, h) in enumerate(sizes)]
        world.add_zone(zone, es)
        ids = [UUID(int=10 + k) for k, _, _ in entries]
        result = (TickResult(entity_moves=EntityMoves(ids, [x for _, x, _ in entries], [y for _, _, y in entries]))
                  if bulk else TickResult(entity_updates=[EntityUpdate(i, x, y) for i, (_, x, y) in zip(ids, entries)]))
        try:
            world.apply(zone.id, result, now=3.0)
            error = False
        except TickRejected:
            error = True
        zs = world.zones[zone.id]
        assert index_view(zs.index) == fresh_index_view(zs)
        outcomes.append((error, sorted((e.id, e.x, e.y, e.updated_at) for e in zs.entities.values()),
                         {e.id for e in world.dirty}))
    twice = len({k for k, _, _ in entries}) != len(entries)
    if twice:  # updates may move an entity twice, moves may not
        assert outcomes[0][0]
    else:
        assert outcomes[0] == outcomes[1]


# -- applying that fails half way is undone whole ------------------------------------------

class _FailingDict(dict):
    """Buckets that run out of memory once, when ``get`` is first asked for the key ``fail_at``."""

    def __init__(self, buckets, fail_at):
        super().__init__(buckets)
        self.fail_at = fail_at

    def get(self, key, default=None):
        if key == self.fail_at:
            self.fail_at = None
            raise MemoryError("out of memory")
        return super().get(key, default)


def test_moves_that_fail_half_way_are_undone_with_the_rest_of_the_result():
    world, zone, p, q, r, s, t, *_ = make_world()
    zs = world.zones[zone.id]
    world.apply(zone.id, TickResult(entity_updates=[EntityUpdate(r.id, width=1, height=1)]), now=2.0)
    assert zs.index.cells_only()
    world.take_changes()
    before = snapshot(world, zone)
    # every move crosses a bucket edge; the second one's new bucket runs out of memory
    zs.index._buckets = _FailingDict(zs.index._buckets, fail_at=(35 // 16) << 32 | (35 // 16))
    result = TickResult(entity_creates=[EntityCreate(1, 1, 2, 2, {"new": 1})],
                        entity_updates=[EntityUpdate(s.id, y=9)], entity_deletes=[t.id],
                        entity_moves=EntityMoves([p.id, q.id, r.id], [20, 35, 50], [20, 35, 5]))
    with pytest.raises(TickRejected, match="MemoryError"):
        world.apply(zone.id, result, now=99.0)
    assert zs.index._buckets.fail_at is None  # it did fail, in the moves
    assert snapshot(world, zone) == before
    assert index_view(zs.index) == fresh_index_view(zs)


def test_moves_of_rectangles_that_fail_half_way_are_undone_too(monkeypatch):
    world, zone, p, q, r, *_ = make_world()
    before = snapshot(world, zone)
    real_move, calls = gridserver.SpatialIndex.move, []

    def failing_move(index, e, *rect):
        calls.append(e)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        real_move(index, e, *rect)

    monkeypatch.setattr(gridserver.SpatialIndex, "move", failing_move)
    with pytest.raises(TickRejected, match="MemoryError"):
        world.apply(zone.id, TickResult(entity_moves=EntityMoves([r.id, p.id, q.id], [50, 60, 1], [30, 30, 1])))
    monkeypatch.undo()
    assert snapshot(world, zone) == before
    zs = world.zones[zone.id]
    assert index_view(zs.index) == fresh_index_view(zs)


# -- modules that move in bulk -------------------------------------------------------------

class Herd:
    """Tokens and sheep, moved in bulk. A join's hook creates the player's token and moves every
    other token one row down (wrapping), in an ``EntityMoves`` joined to the tick's; each tick
    moves every sheep one column right (wrapping), and every token too when ``greedy`` (the
    hook's moves then clash with the tick's). ``{"spawn": n}`` makes n sheep at rows drawn
    from ``framework.random``."""

    def __init__(self, greedy=False):
        self.greedy = greedy

    def on_init(self, framework):
        self.fw = framework

    def on_player_join(self, zone_id, player_id):
        tokens = [e for e in self.fw.list_entities(zone_id) if "owner" in e.metadata]
        return TickResult(entity_creates=[EntityCreate(0, 0, 1, 1, {"owner": str(player_id)})],
                          entity_moves=EntityMoves([e.id for e in tokens], [e.x for e in tokens],
                                                   [(e.y + 1) % 8 for e in tokens]))

    def on_tick(self, zone_id, entities, intents, tick_number):
        spawned = [EntityCreate(0, self.fw.random.randrange(8), 1, 1, {"sheep": n})
                   for i in intents for n in range(i.data.get("spawn", 0))]
        herd = [e for e in entities if self.greedy or "sheep" in e.metadata]
        moves = EntityMoves([e.id for e in herd], [(e.x + 1) % 8 for e in herd], [e.y for e in herd])
        return TickResult(entity_creates=spawned, entity_moves=moves, broadcast_state={"tick": tick_number})

    def get_player_state(self, zone_id, player_id, full_state):
        return {**full_state, "entities": sorted([str(e.id), e.x, e.y] for e in self.fw.list_entities(zone_id))}


def world_of(sim: ZoneSim) -> list:
    return sorted((str(e.id), e.x, e.y, e.width, e.height, dict(e.metadata), e.updated_at)
                  for e in sim.entities)


def test_a_hook_and_the_tick_moving_the_same_entity_lose_the_tick():
    sim = ZoneSim(Herd(greedy=True), 8, 8, seed=3)
    sim.join(uuid.uuid4())
    sim.tick()
    assert sim.last_error is None and len(sim.entities) == 1
    before = world_of(sim)
    sim.join(uuid.uuid4())  # its hook moves the first token, and so does the tick
    sim.tick()
    assert "is moved twice" in sim.last_error and world_of(sim) == before


def test_two_sims_of_a_bulk_moving_zone_with_one_seed_make_the_same_world_and_verify_finds_nothing():
    worlds = []
    for _ in range(2):
        sim = ZoneSim(Herd, 8, 8, seed=11, verify=True)
        p, q = UUID(int=0xA1), UUID(int=0xB2)
        sim.join(p)
        for n in range(8):
            if n == 4:
                sim.join(q)  # the hook moves p's token while the tick moves the sheep
            sim.intent(p, {"spawn": n % 3})
            sim.tick()
            assert sim.last_error is None, sim.last_error
        worlds.append([row[1:] for row in world_of(sim)])
    assert worlds[0] == worlds[1]
    tokens = [row for row in worlds[0] if "owner" in row[4]]
    assert len(worlds[0]) == 2 + 7 and sorted(row[1] for row in tokens) == [0, 1]


# -- the flush saves them (SQLite and PostgreSQL) ---------------------------------------------

async def test_moves_are_flushed_and_loaded_back(dsn, start_server):
    from test_persistence import assert_same_entity, db_entities, world_entities
    cfg = make_config(dsn, server_debug=True, persistence_interval=60.0)
    running = await start_server(cfg, Passive())
    srv = running.srv
    p = await running.player()
    zone = await running.zone(p["token"], width=W, height=H)
    zid = UUID(zone["id"])
    world = srv.world
    created, _, _ = world.apply(zid, TickResult(entity_creates=[
        EntityCreate(i % W, i % H, 1 if i % 3 else 0, 1 if i % 3 else 0, {"i": i}) for i in range(300)]
        + [EntityCreate(0, 0, 4, 3, {"wide": True})]))
    assert await srv.persister.flush() is True
    moved = created[::2]
    world.apply(zid, TickResult(entity_moves=EntityMoves([e.id for e in moved], [(e.x + 7) % (W - 4) for e in moved],
                                                         [(e.y + 3) % (H - 3) for e in moved])), now=1234.5)
    assert len(world.dirty) == len(moved)
    assert await srv.persister.flush() is True
    rows, want = db_entities(dsn), world_entities(srv)
    assert set(rows) == set(want)
    for eid, entity in want.items():
        assert_same_entity(rows[eid], entity)
    assert rows[str(moved[0].id)]["updated_at"] == pytest.approx(1234.5)
    # and once more, saved by the graceful stop alone, then loaded by a fresh server
    world.apply(zid, TickResult(entity_moves=EntityMoves([e.id for e in created[:50]], [3] * 50, [4] * 50)))
    want = world_entities(srv)
    await stop_server(running)
    running = await start_server(make_config(dsn, server_debug=True, persistence_interval=60.0), Passive())
    got = world_entities(running.srv)
    assert set(got) == set(want)
    for eid, entity in want.items():
        assert_same_entity(got[eid], entity)
    assert {str(e.id) for e in running.srv.world.query_area(zid, 3, 4, 1, 1)} >= {str(e.id) for e in created[:50]
                                                                                  if e.width or e.height}
