"""gridserver.World without I/O: the entity registry, its queries, and atomic tick results.

No sockets and no database: a World is built in memory and driven through its methods.
A tick result is checked as a whole before any of it is applied (CONTRACT.md, "Game modules"):
every rejection below raises ``TickRejected`` and must leave the zone exactly as it was.
"""

from __future__ import annotations

import copy
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gridserver
from gridserver import Entity, EntityCreate, EntityUpdate, TickRejected, TickResult, World, Zone
from helpers import create_entity, delete_entity, update_entity

W, H = 100, 50


def make_world(width=W, height=H):
    """A world with one zone and three entities loaded from 'storage' (so not dirty):
    ``a`` a 2x2 rectangle, ``b`` a point, ``c`` a 10x5 rectangle."""
    world = World()
    zone = Zone(uuid.uuid4(), "z", width, height)
    a = Entity(uuid.uuid4(), zone.id, 10, 10, 2, 2, {"kind": "a"}, 1.0, 1.0)
    b = Entity(uuid.uuid4(), zone.id, 20, 20, 0, 0, {"kind": "b"}, 1.0, 1.0)
    c = Entity(uuid.uuid4(), zone.id, 30, 30, 10, 5, {"kind": "c"}, 1.0, 1.0)
    world.add_zone(zone, [a, b, c])
    return world, zone, a, b, c


def snapshot(world: World, zone: Zone):
    """Everything a rejected result must leave untouched."""
    zs = world.zones[zone.id]
    ents = {eid: (e.zone_id, e.x, e.y, e.width, e.height, copy.deepcopy(e.metadata), e.created_at, e.updated_at)
            for eid, e in zs.entities.items()}
    found = sorted(str(e.id) for e in world.query_area(zone.id, 0, 0, zone.width, zone.height))
    overlaps = sorted(str(e.id) for e in world.query_overlap(zone.id, 0, 0, zone.width, zone.height))
    return (ents, found, overlaps, {e.id for e in world.dirty}, set(world.deleted),
            {eid for eid, z in world.entity_zone.items() if z is zs})


def area_ids(world, zone, x, y, w, h):
    return {e.id for e in world.query_area(zone.id, x, y, w, h)}


# -- zones and the simple entity calls ------------------------------------------------------

def test_add_zone_loads_entities_into_registry_and_index_without_marking_them():
    world, zone, a, b, c = make_world()
    assert set(world.zones) == {zone.id}
    assert {e.id for e in world.entities_of(zone.id)} == {a.id, b.id, c.id}
    assert world.get_entity(b.id) is b
    assert area_ids(world, zone, 0, 0, W, H) == {a.id, b.id, c.id}
    assert not world.dirty and world.deleted == set()
    assert world.entities_of(uuid.uuid4()) == [] and world.get_entity(uuid.uuid4()) is None


def test_create_update_delete_entity():
    world, zone, a, b, c = make_world()
    e = create_entity(world, zone.id, 5, 6, 3, 4, {"hp": 3}, now=42.0)
    assert isinstance(e, Entity) and (e.zone_id, e.x, e.y, e.width, e.height) == (zone.id, 5, 6, 3, 4)
    assert e.metadata == {"hp": 3} and e.created_at == e.updated_at == 42.0
    assert world.get_entity(e.id) is e and e in world.dirty
    assert area_ids(world, zone, 7, 9, 1, 1) == {e.id}

    fixed = uuid.uuid4()
    p = create_entity(world, zone.id, W - 1, H - 1, entity_id=fixed)        # a point on the last cell
    assert p.id == fixed and (p.width, p.height, p.metadata) == (0, 0, {})

    moved = update_entity(world, e.id, now=50.0, x=90, width=10, metadata={"hp": 2})
    assert moved is e and (e.x, e.y, e.width, e.height) == (90, 6, 10, 4)
    assert e.metadata == {"hp": 2} and e.updated_at == 50.0 and e.created_at == 42.0
    assert area_ids(world, zone, 5, 6, 3, 4) == set()                       # gone from the old place
    assert area_ids(world, zone, 99, 9, 1, 1) == {e.id}

    update_entity(world, a.id, y=0)
    assert (a.x, a.y) == (10, 0) and a in world.dirty and a.metadata == {"kind": "a"}

    delete_entity(world, e.id)
    assert world.get_entity(e.id) is None and e.id not in world.entities_of(zone.id)
    assert area_ids(world, zone, 0, 0, W, H) == {a.id, b.id, c.id, fixed}
    assert e.id in world.deleted and e not in world.dirty


def test_simple_calls_reject_bad_input_and_change_nothing():
    world, zone, a, b, c = make_world()
    before = snapshot(world, zone)
    with pytest.raises(TickRejected):
        create_entity(world, zone.id, W, 0, 1, 1)
    with pytest.raises(TickRejected):
        create_entity(world, zone.id, 0, 0, 1, 1, entity_id=a.id)             # id taken
    with pytest.raises(TickRejected):
        create_entity(world, uuid.uuid4(), 0, 0)                               # no such zone
    with pytest.raises(TickRejected):
        update_entity(world, uuid.uuid4(), x=1)
    with pytest.raises(TickRejected):
        update_entity(world, a.id, x=W - 1)                                    # 2 wide: spills out
    with pytest.raises(TickRejected):
        update_entity(world, a.id, metadata=["not", "an", "object"])
    with pytest.raises(TickRejected):
        delete_entity(world, uuid.uuid4())
    assert snapshot(world, zone) == before


def test_world_queries_follow_the_geometry_rules():
    world, zone, a, b, c = make_world()
    assert area_ids(world, zone, 20, 20, 1, 1) == {b.id}                      # the point, on the top-left cell
    assert area_ids(world, zone, 19, 19, 1, 1) == set()                       # right/bottom edge: not inside
    assert area_ids(world, zone, 20, 20, 0, 5) == set()                       # no area: nothing
    assert area_ids(world, zone, 12, 10, 5, 2) == set()                       # touches a's right edge only
    assert area_ids(world, zone, 30, 25, 10, 5) == set()                      # touches c's top edge only
    assert {e.id for e in world.query_overlap(zone.id, 0, 0, W, H)} == {a.id, c.id}  # never the point
    assert {e.id for e in world.query_overlap(zone.id, 10, 10, 2, 2, exclude=a.id)} == set()
    assert {e.id for e in world.query_overlap(zone.id, 11, 11, 20, 20, exclude=a.id)} == {c.id}
    assert world.query_overlap(zone.id, 12, 10, 2, 2) == []                   # shares a's right edge only
    assert world.query_area(uuid.uuid4(), 0, 0, W, H) == []
    assert world.query_overlap(uuid.uuid4(), 0, 0, W, H) == []


# -- apply: a valid result ------------------------------------------------------------------

def test_apply_valid_result_applies_everything_and_marks_it():
    world, zone, a, b, c = make_world()
    new_id = uuid.uuid4()
    result = TickResult(
        entity_creates=[EntityCreate(0, 0, W, 1, {"wall": True}, new_id),            # full width: x+w == W
                        EntityCreate(W - 1, H - 1),                                    # point on the last cell
                        EntityCreate(50, 40, 3, 3, {"n": [1, 2]}, str(uuid.uuid4()))],  # id as a string
        entity_updates=[EntityUpdate(a.id, x=60, y=45, width=40, height=5),           # to the corner exactly
                        EntityUpdate(b.id, metadata={"kind": "b2"}),
                        EntityUpdate(new_id, metadata={"wall": False})],               # created this tick
        entity_deletes=[c.id],
        broadcast_state={"anything": 1},
    )
    created, n_updated, n_deleted = world.apply(zone.id, result, now=7.0)
    assert (len(created), n_updated, n_deleted) == (3, 3, 1)
    wall, point, third = created
    assert wall.id == new_id and wall.metadata == {"wall": False} and (wall.x, wall.width) == (0, W)
    assert (point.x, point.y, point.width, point.height, point.metadata) == (W - 1, H - 1, 0, 0, {})
    assert isinstance(third.id, uuid.UUID) and third.metadata == {"n": [1, 2]}
    assert all(e.zone_id == zone.id and e.created_at == e.updated_at == 7.0 for e in created)

    assert (a.x, a.y, a.width, a.height, a.metadata, a.updated_at) == (60, 45, 40, 5, {"kind": "a"}, 7.0)
    assert (b.x, b.y, b.metadata, b.updated_at) == (20, 20, {"kind": "b2"}, 7.0)
    assert world.get_entity(c.id) is None

    assert {e.id for e in world.dirty} == {wall.id, point.id, third.id, a.id, b.id}
    assert world.deleted == {c.id}
    everyone = {wall.id, point.id, third.id, a.id, b.id}
    assert {e.id for e in world.entities_of(zone.id)} == everyone
    assert area_ids(world, zone, 0, 0, W, H) == everyone
    assert area_ids(world, zone, 10, 10, 2, 2) == set()                  # a's old place
    assert area_ids(world, zone, 30, 30, 10, 5) == set()                 # c's
    assert area_ids(world, zone, 99, 49, 1, 1) == {a.id, point.id}


def test_apply_none_or_empty_result_changes_nothing():
    world, zone, *_ = make_world()
    before = snapshot(world, zone)
    assert world.apply(zone.id, TickResult()) == ([], 0, 0)
    assert world.apply(zone.id, None) == ([], 0, 0)
    assert snapshot(world, zone) == before


def test_apply_to_unknown_zone_is_rejected():
    world, zone, *_ = make_world()
    with pytest.raises(TickRejected):
        world.apply(uuid.uuid4(), TickResult(entity_creates=[EntityCreate(0, 0)]))


# -- apply: every rejection rejects the whole result ----------------------------------------

class _Unserializable:
    pass


def _bad_cases():
    """(name, builder) where builder(a, b, c) -> a TickResult or other bad value. The bad part
    comes after valid changes of every kind, so a partial apply would be visible."""
    nan, inf = float("nan"), float("inf")

    def result(creates=(), updates=(), deletes=(), state=None):
        def build(a, b, c):
            return TickResult(
                entity_creates=[EntityCreate(1, 1, 2, 2, {"ok": 1})] + [f(a, b, c) for f in creates],
                entity_updates=[EntityUpdate(a.id, x=0, y=0)] + [f(a, b, c) for f in updates],
                entity_deletes=[c.id] + [f(a, b, c) for f in deletes],
                broadcast_state={} if state is None else state,
            )
        return build

    def create(*args, **kw):
        return result(creates=[lambda a, b, c: EntityCreate(*args, **kw)])

    def update(**kw):
        return result(updates=[lambda a, b, c: EntityUpdate(a.id, **kw)])

    cases = {
        # out of bounds
        "create x+width > zone width": create(W - 5, 0, 6, 1),
        "create y+height > zone height": create(0, H - 1, 1, 2),
        "create point at x == zone width": create(W, 0),
        "create point at y == zone height": create(0, H),
        "create negative x": create(-1, 0, 1, 1),
        "create negative y point": create(0, -1),
        "create beyond the zone": create(W + 10, H + 10),
        "update x+width > zone width": update(x=W - 1),                 # a is 2 wide
        "update point to x == zone width": result(updates=[lambda a, b, c: EntityUpdate(b.id, x=W)]),
        "update negative y": update(y=-1),
        "update grows past the edge": update(x=90, width=11),
        # negative sizes
        "create negative width": create(0, 0, -1, 1),
        "create negative height": create(0, 0, 1, -1),
        "update negative width": update(width=-2),
        "update negative height": update(height=-1),
        # unknown ids
        "update unknown id": result(updates=[lambda a, b, c: EntityUpdate(uuid.uuid4(), x=1)]),
        "delete unknown id": result(deletes=[lambda a, b, c: uuid.uuid4()]),
        "delete the same id twice": result(deletes=[lambda a, b, c: c.id]),
        "update malformed id":
            result(updates=[lambda a, b, c: EntityUpdate("not-a-uuid", x=1)]),
        "delete malformed id": result(deletes=[lambda a, b, c: "not-a-uuid"]),
        # duplicate ids in creates
        "duplicate id in creates": (lambda dup: result(creates=[lambda a, b, c: EntityCreate(3, 3, id=dup),
                                                                lambda a, b, c: EntityCreate(4, 4, id=dup)]))(
            uuid.uuid4()),
        "create with an existing id": result(creates=[lambda a, b, c: EntityCreate(3, 3, id=b.id)]),
        # metadata that is not a JSON object
        "create metadata list": create(0, 0, metadata=[1, 2]),
        "create metadata str": create(0, 0, metadata="x"),
        "create metadata None": create(0, 0, metadata=None),
        "update metadata list": update(metadata=["x"]),
        "update metadata int": update(metadata=3),
        # metadata that JSON cannot carry
        "create metadata NaN": create(0, 0, metadata={"v": nan}),
        "create metadata inf nested": create(0, 0, metadata={"v": [1, {"w": inf}]}),
        "create metadata object()": create(0, 0, metadata={"o": object()}),
        "create metadata custom instance": create(0, 0, metadata={"o": _Unserializable()}),
        "create metadata set": create(0, 0, metadata={"s": {1, 2}}),
        "update metadata NaN": update(metadata={"v": nan}),
        "update metadata object()": update(metadata={"o": object()}),
        # coordinates that are not ints
        "create float x": create(1.0, 0),
        "create float y": create(0, 2.5),
        "create bool x": create(True, 0),
        "create str y": create(0, "1"),
        "create float width": create(0, 0, 1.0, 1),
        "create bool height": create(0, 0, 1, True),
        "create None x": create(None, 0),
        "update float x": update(x=3.0),
        "update bool y": update(y=False),
        "update str width": update(width="2"),
        # the wrong shape altogether
        "not a TickResult: dict": lambda a, b, c: {"entity_creates": [], "entity_updates": [],
                                                   "entity_deletes": [c.id], "broadcast_state": {}},
        "not a TickResult: list": lambda a, b, c: [EntityCreate(0, 0)],
        "not a TickResult: str": lambda a, b, c: "TickResult()",
        "broadcast_state list": result(state=[1, 2]),
        "broadcast_state str": result(state="state"),
        "broadcast_state None": (lambda build: lambda a, b, c: _with(build(a, b, c), broadcast_state=None))(result()),
        "entity_creates holds a dict": result(creates=[lambda a, b, c: {"x": 0, "y": 0}]),
        "entity_updates holds a dict": result(updates=[lambda a, b, c: {"id": a.id, "x": 1}]),
        "entity_deletes is not a list": (lambda build: lambda a, b, c: _with(build(a, b, c), entity_deletes=c.id))(
            result()),
    }
    return list(cases.items())


def _with(result: TickResult, **fields) -> TickResult:
    for k, v in fields.items():
        setattr(result, k, v)
    return result


@pytest.mark.parametrize("name, build", _bad_cases(), ids=[n for n, _ in _bad_cases()])
def test_bad_result_is_rejected_whole_and_changes_nothing(name, build):
    world, zone, a, b, c = make_world()
    create_entity(world, zone.id, 70, 0, 1, 1)              # something already waiting for a flush
    delete_entity(world, create_entity(world, zone.id, 71, 0).id)
    before = snapshot(world, zone)
    bad = build(a, b, c)
    with pytest.raises(TickRejected):
        world.apply(zone.id, bad, now=99.0)
    assert snapshot(world, zone) == before
    # and the same zone still takes a good result afterwards
    world.apply(zone.id, TickResult(entity_updates=[EntityUpdate(a.id, x=0)]), now=100.0)
    assert a.x == 0 and a.updated_at == 100.0


def test_rejection_in_one_zone_leaves_other_zones_alone():
    world, zone, a, b, c = make_world()
    other = Zone(uuid.uuid4(), "other", 10, 10)
    world.add_zone(other)
    world.apply(other.id, TickResult(entity_creates=[EntityCreate(1, 1, 1, 1)]))
    before = snapshot(world, other)
    with pytest.raises(TickRejected):
        world.apply(zone.id, TickResult(entity_creates=[EntityCreate(0, 0), EntityCreate(W, 0)]))
    assert snapshot(world, other) == before
    # an entity id of one zone is unknown to another zone's result
    with pytest.raises(TickRejected):
        world.apply(other.id, TickResult(entity_deletes=[a.id]))
    assert world.get_entity(a.id) is a


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, W + 3), st.integers(-3, H + 3), st.integers(-2, 8), st.integers(-2, 8)),
                min_size=1, max_size=8))
def test_creates_are_all_applied_or_none(rects):
    world, zone, *_ = make_world()
    before = snapshot(world, zone)

    def fits(x, y, w, h):
        if w < 0 or h < 0 or x < 0 or y < 0:
            return False
        if w == 0 and h == 0:
            return x < W and y < H
        return x + w <= W and y + h <= H

    creates = [EntityCreate(x, y, w, h) for x, y, w, h in rects if (w == 0) == (h == 0)]  # points or sized
    if not creates:
        return
    if all(fits(c.x, c.y, c.width, c.height) for c in creates):
        created, _, _ = world.apply(zone.id, TickResult(entity_creates=creates))
        assert [(e.x, e.y, e.width, e.height) for e in created] == [(c.x, c.y, c.width, c.height) for c in creates]
        assert {e.id for e in world.dirty} == {e.id for e in created}
    else:
        with pytest.raises(TickRejected):
            world.apply(zone.id, TickResult(entity_creates=creates))
        assert snapshot(world, zone) == before


# -- what the next flush must write ---------------------------------------------------------

def test_take_changes_then_restore_puts_the_ids_back():
    world, zone, a, b, c = make_world()
    e = create_entity(world, zone.id, 1, 1, 1, 1, {"m": 1}, now=5.0)
    update_entity(world, a.id, x=3, now=6.0)
    delete_entity(world, c.id)

    rows, deleted = world.take_changes()
    assert not world.dirty and world.deleted == set()
    by_id = {r[0]: r for r in rows}
    assert set(by_id) == {e.id, a.id} and deleted == [c.id]
    # (id, entity, x, y, width, height, metadata, updated_at): values as of the snapshot
    assert by_id[e.id] == (e.id, e, 1, 1, 1, 1, {"m": 1}, 5.0)
    assert by_id[e.id][1].zone_id == zone.id and by_id[e.id][1].created_at == 5.0
    assert by_id[a.id][2:6] == (3, 10, 2, 2) and by_id[a.id][7] == 6.0
    update_entity(world, a.id, x=4, now=7.0)                  # later changes leave the snapshot alone
    assert by_id[a.id][2] == 3 and by_id[a.id][7] == 6.0
    update_entity(world, a.id, x=3, now=6.0)

    later = create_entity(world, zone.id, 2, 2)               # a change made while the flush runs
    world.restore_changes(rows, deleted)                    # the flush failed
    assert {e.id for e in world.dirty} == {e.id, a.id, later.id}
    assert world.deleted == {c.id}

    rows2, deleted2 = world.take_changes()
    assert {r[0] for r in rows2} == {e.id, a.id, later.id} and deleted2 == [c.id]
    assert world.take_changes() == ([], [])


def test_restore_does_not_resurrect_what_changed_since():
    world, zone, a, b, c = make_world()
    update_entity(world, a.id, x=1)
    delete_entity(world, c.id)
    rows, deleted = world.take_changes()
    delete_entity(world, a.id)                                # deleted after the snapshot
    create_entity(world, zone.id, 0, 0, 1, 1, entity_id=c.id)  # the deleted id is back, as a new entity
    world.restore_changes(rows, deleted)
    assert a not in world.dirty and a.id in world.deleted
    assert world.get_entity(c.id) in world.dirty and c.id not in world.deleted


def test_created_then_deleted_before_a_flush_ends_only_in_deleted():
    world, zone, *_ = make_world()
    e = create_entity(world, zone.id, 4, 4, 1, 1)
    update_entity(world, e.id, x=5)
    delete_entity(world, e.id)
    assert e not in world.dirty and e.id in world.deleted
    # the same within one result
    fresh = uuid.uuid4()
    world.apply(zone.id, TickResult(entity_creates=[EntityCreate(6, 6, id=fresh)], entity_deletes=[fresh]))
    assert fresh not in {d.id for d in world.dirty} and fresh in world.deleted
    assert world.get_entity(fresh) is None and area_ids(world, zone, 6, 6, 1, 1) == set()
    rows, deleted = world.take_changes()
    assert rows == [] and set(deleted) == {e.id, fresh}


def test_remove_zone_forgets_its_entities_and_their_changes():
    world, zone, a, b, c = make_world()
    update_entity(world, a.id, x=0)
    delete_entity(world, c.id)
    assert world.remove_zone(zone.id).zone is zone
    assert zone.id not in world.zones and world.get_entity(a.id) is None and world.get_entity(b.id) is None
    assert not world.dirty
    assert world.remove_zone(zone.id) is None
    with pytest.raises(TickRejected):
        update_entity(world, a.id, x=1)
    assert gridserver.World().take_changes() == ([], [])


# -- limits ----------------------------------------------------------------------------------

def test_a_zone_holds_at_most_max_entities_per_zone():
    world, zone, a, b, c = make_world()
    world.max_entities = 5
    world.apply(zone.id, TickResult(entity_creates=[EntityCreate(1, 1), EntityCreate(2, 2)]))  # 5: at the cap
    before = snapshot(world, zone)
    with pytest.raises(TickRejected, match="max_entities_per_zone"):
        world.apply(zone.id, TickResult(entity_creates=[EntityCreate(3, 3)]))
    assert snapshot(world, zone) == before
    world.apply(zone.id, TickResult(entity_creates=[EntityCreate(3, 3)], entity_deletes=[a.id]))  # one out, one in


def test_one_huge_entity_costs_one_index_entry_and_is_still_found():
    world = World()
    zone = Zone(uuid.uuid4(), "big", 10000, 10000)
    world.add_zone(zone)
    created, _, _ = world.apply(zone.id, TickResult(entity_creates=[EntityCreate(0, 0, 10000, 10000)]))
    index = world.zones[zone.id].index
    assert len(index._buckets) == 1 and sum(len(b) for b in index._buckets.values()) == 1
    huge = created[0]
    assert area_ids(world, zone, 5000, 5000, 1, 1) == {huge.id}
    assert {e.id for e in world.query_overlap(zone.id, 9999, 9999, 1, 1)} == {huge.id}
    world.apply(zone.id, TickResult(entity_updates=[EntityUpdate(huge.id, width=1, height=1)]))
    assert area_ids(world, zone, 5000, 5000, 1, 1) == set() and area_ids(world, zone, 0, 0, 1, 1) == {huge.id}
    assert len(index._buckets) == 1 and gridserver.LARGE not in index._buckets


def test_an_entity_deleted_in_one_zone_and_created_in_another_is_one_move_for_the_flush():
    world, zone, a, b, c = make_world()
    other = Zone(uuid.uuid4(), "other", W, H)
    world.add_zone(other)
    world.apply(zone.id, TickResult(entity_deletes=[a.id]))
    world.apply(other.id, TickResult(entity_creates=[EntityCreate(5, 5, 2, 2, {"kind": "a"}, a.id)]))
    rows, deleted = world.take_changes()
    assert deleted == [] and [(r[0], r[1].zone_id) for r in rows] == [(a.id, other.id)]
    assert world.get_entity(a.id).zone_id == other.id
    assert {e.id for e in world.entities_of(zone.id)} == {b.id, c.id}


def test_remove_zone_then_restore_zone_puts_everything_back_and_marks_it_for_the_flush():
    world, zone, a, b, c = make_world()
    zs = world.remove_zone(zone.id)
    assert zone.id not in world.zones and world.get_entity(a.id) is None
    world.restore_zone(zs)
    assert world.get_entity(a.id) is a and area_ids(world, zone, 10, 10, 1, 1) == {a.id}
    assert {e.id for e in world.dirty} == {a.id, b.id, c.id}


def test_restore_zone_leaves_an_id_another_zone_took_meanwhile_where_it_is():
    world, zone, a, b, c = make_world()
    other = Zone(uuid.uuid4(), "other", W, H)
    world.add_zone(other)
    zs = world.remove_zone(zone.id)
    world.apply(other.id, TickResult(entity_creates=[EntityCreate(1, 1, 1, 1, {}, a.id)]))
    world.restore_zone(zs)
    assert world.get_entity(a.id).zone_id == other.id
    assert {e.id for e in world.entities_of(zone.id)} == {b.id, c.id}
    assert area_ids(world, zone, 10, 10, 1, 1) == set()
