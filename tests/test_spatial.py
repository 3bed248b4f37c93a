"""SpatialIndex against a brute-force oracle written from the contract's geometry rules.

Geometry (CONTRACT.md): an entity covers the cells ``[x, x+width) x [y, y+height)``. A 0x0
entity is a point at (x, y): it covers no cell, overlaps nothing, and is found by an area query
whose area contains the point. Two sized entities overlap when their rectangles share area;
touching edges do not. An area query with zero width or height finds nothing.

The oracle below scans every entity; the index must return exactly the same set (and no
entity twice), before and after any sequence of inserts, moves and removals.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gridserver
from gridserver import BUCKET_SIZE, Entity, SpatialIndex

ZONE_ID = uuid.uuid4()
B = BUCKET_SIZE


# -- the oracle (brute force, straight from the contract) ------------------------------------

def is_point(e) -> bool:
    return e.width == 0 and e.height == 0


def brute_area(entities, x, y, w, h) -> set:
    if w <= 0 or h <= 0:
        return set()
    found = set()
    for e in entities:
        if is_point(e):
            if x <= e.x < x + w and y <= e.y < y + h:
                found.add(e.id)
        elif e.x < x + w and x < e.x + e.width and e.y < y + h and y < e.y + e.height:
            found.add(e.id)
    return found


def brute_overlap(entities, x, y, w, h, exclude=None) -> set:
    if w <= 0 or h <= 0:
        return set()
    return {e.id for e in entities
            if e is not exclude and e.width > 0 and e.height > 0
            and e.x < x + w and x < e.x + e.width and e.y < y + h and y < e.y + e.height}


def ids(found) -> set:
    found = list(found)
    got = {e.id for e in found}
    assert len(got) == len(found), "the index returned an entity more than once"
    return got


def ent(x, y, w=0, h=0) -> Entity:
    return Entity(uuid.uuid4(), ZONE_ID, x, y, w, h)


# -- strategies ------------------------------------------------------------------------------

zone_sizes = st.sampled_from([1, B - 1, B, B + 1, 2 * B, 3 * B + 5, 5 * B, 12 * B + 3])


def coord(limit: int):
    """A coordinate in [0, limit): often 0, the last cell, or next to a bucket boundary."""
    special = sorted({c for k in range(0, limit // B + 2) for c in (k * B - 1, k * B, k * B + 1)
                      if 0 <= c < limit} | {0, limit - 1})
    return st.one_of(st.sampled_from(special), st.integers(0, limit - 1))


def length(limit: int):
    """A size in [1, limit]: small, whole buckets, one off a bucket, or the whole remaining span."""
    special = sorted({v for v in (1, 2, B - 1, B, B + 1, 2 * B, 3 * B + 1, limit) if 1 <= v <= limit})
    return st.one_of(st.sampled_from(special), st.integers(1, limit))


@st.composite
def rects(draw, zw: int, zh: int):
    """An entity rectangle inside a zw x zh zone: a 0x0 point or a sized rectangle."""
    x, y = draw(coord(zw)), draw(coord(zh))
    if draw(st.integers(0, 2)) == 0:
        return x, y, 0, 0
    return x, y, draw(length(zw - x)), draw(length(zh - y))


@st.composite
def queries(draw, zw: int, zh: int):
    """A query rectangle: may start left of/above the zone, spill past it, or have no area."""
    x = draw(st.one_of(coord(zw), st.integers(-B - 2, zw + B)))
    y = draw(st.one_of(coord(zh), st.integers(-B - 2, zh + B)))
    sizes = st.one_of(st.sampled_from([0, 1, B - 1, B, B + 1]), st.integers(-1, max(zw, zh) + 2 * B))
    return x, y, draw(sizes), draw(sizes)


bucket_sizes = st.sampled_from([B, B, B, 1, 3])  # mostly the real one; tiny buckets stress spanning


def check_all(index, entities, q, exclude=None):
    x, y, w, h = q
    assert ids(index.query_area(x, y, w, h)) == brute_area(entities, x, y, w, h), ("area", q)
    assert ids(index.query_overlap(x, y, w, h, exclude)) == brute_overlap(entities, x, y, w, h, exclude), \
        ("overlap", q, exclude)


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- properties ------------------------------------------------------------------------------

@PROPERTY
@given(data=st.data(), zw=zone_sizes, zh=zone_sizes, bucket=bucket_sizes)
def test_queries_match_brute_force(data, zw, zh, bucket):
    entities = [ent(*r) for r in data.draw(st.lists(rects(zw, zh), max_size=30), label="entities")]
    index = SpatialIndex(bucket)
    for e in entities:
        index.insert(e)
    for q in data.draw(st.lists(queries(zw, zh), min_size=1, max_size=10), label="queries"):
        check_all(index, entities, q)
    # an entity's own rectangle, excluding itself: what a module asks for collisions
    for e in entities:
        check_all(index, entities, (e.x, e.y, e.width, e.height), exclude=e)


@pytest.mark.slow  # 200 examples of whole insert, move and remove sequences: about 5 s
@PROPERTY
@given(data=st.data(), zw=zone_sizes, zh=zone_sizes, bucket=bucket_sizes)
def test_index_stays_right_through_insert_move_remove(data, zw, zh, bucket):
    index = SpatialIndex(bucket)
    live: list[Entity] = []
    removed: list[Entity] = []
    steps = data.draw(st.integers(1, 40), label="steps")
    for _ in range(steps):
        op = data.draw(st.sampled_from(["insert", "move", "move", "remove", "query"] if live else ["insert"]),
                       label="op")
        if op == "insert":
            e = ent(*data.draw(rects(zw, zh), label="rect"))
            index.insert(e)
            live.append(e)
        elif op == "move":
            e = data.draw(st.sampled_from(live), label="which")
            x, y, w, h = data.draw(rects(zw, zh), label="to")
            index.move(e, x, y, w, h)
            assert (e.x, e.y, e.width, e.height) == (x, y, w, h)
        elif op == "remove":
            e = data.draw(st.sampled_from(live), label="which")
            index.remove(e)
            live.remove(e)
            removed.append(e)
        else:
            q = data.draw(queries(zw, zh), label="query")
            exclude = data.draw(st.none() | st.sampled_from(live), label="exclude")
            check_all(index, live, q, exclude)
    # after the sequence: every live entity is found at its own place, nothing removed is found
    everything = (-B, -B, zw + 2 * B, zh + 2 * B)
    check_all(index, live, everything)
    for e in live:
        if is_point(e):
            assert e.id in ids(index.query_area(e.x, e.y, 1, 1))
        else:
            assert e.id in ids(index.query_area(e.x, e.y, e.width, e.height))
            assert e.id in ids(index.query_overlap(e.x + e.width - 1, e.y + e.height - 1, 1, 1))
    gone = {e.id for e in removed}
    assert not gone & ids(index.query_area(*everything))
    for q in data.draw(st.lists(queries(zw, zh), max_size=5), label="final queries"):
        check_all(index, live, q)


# -- explicit edge cases ---------------------------------------------------------------------

def index_of(*entities) -> SpatialIndex:
    index = SpatialIndex()
    for e in entities:
        index.insert(e)
    return index


@pytest.mark.parametrize("px, py", [(10, 12), (10, 20), (10, 27), (17, 12), (25, 12), (25, 27)])
def test_point_on_left_or_top_edge_or_inside_is_found(px, py):
    p = ent(px, py)
    assert index_of(p).query_area(10, 12, 16, 16) == [p]


@pytest.mark.parametrize("px, py", [(26, 12), (26, 20), (10, 28), (20, 28), (26, 28), (9, 12), (10, 11)])
def test_point_on_right_or_bottom_edge_or_outside_is_not_found(px, py):
    assert index_of(ent(px, py)).query_area(10, 12, 16, 16) == []


def test_point_on_bucket_boundary_found_only_by_the_area_that_contains_it():
    p = ent(B, B)
    index = index_of(p)
    assert index.query_area(0, 0, B, B) == []            # its right/bottom edge: not inside
    assert index.query_area(0, 0, B + 1, B + 1) == [p]
    assert index.query_area(B, B, 1, 1) == [p]
    assert index.query_area(B - 1, B - 1, 1, 1) == []


@pytest.mark.parametrize("w, h", [(0, 0), (0, 5), (5, 0), (0, 100), (-1, 5)])
def test_area_query_without_area_finds_nothing(w, h):
    index = index_of(ent(2, 2), ent(0, 0, 10, 10), ent(2, 2, 1, 1))
    assert index.query_area(2, 2, w, h) == []
    assert index.query_overlap(2, 2, w, h) == []


@pytest.mark.parametrize("qx, qy", [(4, 0), (-4, 0), (0, 4), (0, -4), (4, 4), (-4, -4), (4, -4)])
def test_rectangles_sharing_only_an_edge_or_corner_do_not_overlap(qx, qy):
    r = ent(20, 20, 4, 4)
    index = index_of(r)
    assert index.query_overlap(20 + qx, 20 + qy, 4, 4) == []
    assert index.query_area(20 + qx, 20 + qy, 4, 4) == []   # touching is not sharing area either
    # one cell further in, they do
    sx = qx - (1 if qx > 0 else -1 if qx < 0 else 0)
    sy = qy - (1 if qy > 0 else -1 if qy < 0 else 0)
    assert index.query_overlap(20 + sx, 20 + sy, 4, 4) == [r]


def test_rectangles_touching_across_a_bucket_boundary_do_not_overlap():
    left, right = ent(0, 0, B, B), ent(B, 0, B, B)
    index = index_of(left, right)
    assert index.query_overlap(left.x, left.y, left.width, left.height, exclude=left) == []
    assert index.query_overlap(right.x, right.y, right.width, right.height, exclude=right) == []
    assert ids(index.query_overlap(B - 1, 0, 2, 1)) == {left.id, right.id}


def test_point_inside_a_rectangle_is_not_an_overlap():
    r, p = ent(0, 0, 8, 8), ent(3, 3)
    index = index_of(r, p)
    assert index.query_overlap(0, 0, 8, 8, exclude=r) == []       # r's own collisions: not the point
    assert index.query_overlap(3, 3, 0, 0, exclude=p) == []       # the point's: nothing
    assert index.query_overlap(3, 3, 1, 1) == [r]                 # a cell there: the rectangle only
    assert ids(index.query_area(3, 3, 1, 1)) == {r.id, p.id}      # but an area query finds both


def test_entity_without_area_overlaps_nothing():
    line, r = ent(2, 0, 0, 10), ent(0, 0, 8, 8)
    index = index_of(line, r)
    assert index.query_overlap(0, 0, 8, 8, exclude=r) == []
    assert index.query_overlap(2, 0, 1, 10) == [r]


def test_exclude_leaves_out_only_that_entity():
    a, b = ent(0, 0, 4, 4), ent(2, 2, 4, 4)
    index = index_of(a, b)
    assert index.query_overlap(0, 0, 4, 4, exclude=a) == [b]
    assert ids(index.query_overlap(0, 0, 4, 4)) == {a.id, b.id}


def test_entity_spanning_many_buckets_is_found_from_each_and_once():
    big = ent(1, 1, 5 * B, 3 * B)
    index = index_of(big)
    for bx in range(6):
        for by in range(4):
            cx, cy = min(bx * B + 3, 5 * B), min(by * B + 3, 3 * B)
            assert index.query_area(cx, cy, 1, 1) == [big], (cx, cy)
    assert index.query_area(0, 0, 10 * B, 10 * B) == [big]
    assert index.query_overlap(0, 0, 10 * B, 10 * B) == [big]
    assert index.query_area(5 * B + 1, 0, B, B) == []   # just past its right edge


def test_move_across_buckets_and_back_and_remove():
    e = ent(B - 1, B - 1, 2, 2)                   # straddles four buckets
    index = index_of(e)
    index.move(e, 3 * B, 0, 0, 0)                 # becomes a point far away
    assert index.query_area(B - 1, B - 1, 2, 2) == []
    assert index.query_area(3 * B, 0, 1, 1) == [e]
    assert index.query_overlap(3 * B, 0, 1, 1) == []
    index.move(e, 3 * B, 0, 1, 1)                 # same bucket, now sized
    assert index.query_overlap(3 * B, 0, 1, 1) == [e]
    index.move(e, 0, 0, 4 * B, 4 * B)             # grows over sixteen buckets
    assert index.query_area(4 * B - 1, 4 * B - 1, 1, 1) == [e]
    index.remove(e)
    assert index.query_area(-B, -B, 10 * B, 10 * B) == []
    assert gridserver.SpatialIndex().query_area(0, 0, 1, 1) == []
