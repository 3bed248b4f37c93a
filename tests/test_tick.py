"""The zone tick without I/O: ``run_zone_tick`` over an in-memory ``World`` and a clock the test
controls. No sockets, no database, no threads, no sleeping.

A zone's tick runs the join and leave hooks, ``on_tick``, checks and applies the merged
result all or nothing, then builds one frame per subscriber (one serialization per distinct
state). Every way a tick can be lost is tried here: each kind of invalid result (the list
of ``tests/test_world.py``), a module that raises in any of its calls, hooks that return
garbage, a state that cannot be sent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest

import gridserver
from gridserver import (Entity, EntityCreate, EntityUpdate, TickResult, World, Zone, ZoneInputs, ZoneOutcome,
                        run_zone_tick)
from test_world import H, W, _bad_cases, make_world, snapshot


class Clock:
    """Seconds since the epoch, moved by the test (each reading is one second later)."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class Scripted:
    """A game whose calls do what the test put in it: ``result`` (or a function of the tick's
    arguments), hooks that return ``join``/``leave`` results, states per player."""

    def __init__(self, result=None, join=None, leave=None, states=None):
        self.result, self.join, self.leave, self.states = result, join, leave, states or {}
        self.calls: list = []

    def on_init(self, framework):  # pragma: no cover - never called here
        pass

    def on_tick(self, zone_id, entities, intents, tick_number):
        self.calls.append(("tick", tick_number, sorted(str(e.id) for e in entities), [i.data for i in intents]))
        r = self.result
        return r(zone_id, entities, intents, tick_number) if callable(r) else r

    def on_player_join(self, zone_id, player_id):
        self.calls.append(("join", player_id))
        return self.join(player_id) if callable(self.join) else self.join

    def on_player_leave(self, zone_id, player_id):
        self.calls.append(("leave", player_id))
        return self.leave(player_id) if callable(self.leave) else self.leave

    def get_player_state(self, zone_id, player_id, full_state):
        state = self.states.get(player_id, full_state)
        if isinstance(state, Exception):
            raise state
        return state


def tick(world, game, zone, n=1, intents=(), events=(), subscribers=(), clock=None, seed=7, at=3000.0) -> ZoneOutcome:
    inputs = ZoneInputs(n, list(intents), list(events), list(subscribers), seed=seed, at=at)
    return run_zone_tick(world, game, world.zones[zone.id], inputs, clock or Clock())


def frames_json(outcome: ZoneOutcome) -> dict:
    """Each subscriber's frame, parsed (after the 2-byte or 4-byte WebSocket header)."""
    out = {}
    for player_id, frame in outcome.frames:
        assert frame[0] == 0x81  # a final text frame
        n = frame[1]
        payload = frame[2:] if n < 126 else frame[4:] if n == 126 else frame[10:]
        out[player_id] = json.loads(payload)
    return out


def intent(player_id, data, seq=1):
    return gridserver.Intent(player_id, uuid.uuid4(), data, 0.0, seq)


# -- a good tick ------------------------------------------------------------------------------

def test_a_good_tick_applies_everything_and_frames_every_subscriber():
    world, zone, a, b, c = make_world()
    p, q = uuid.uuid4(), uuid.uuid4()
    result = TickResult(entity_creates=[EntityCreate(1, 1, 1, 1, {"new": True})],
                        entity_updates=[EntityUpdate(a.id, x=5)], entity_deletes=[c.id],
                        broadcast_state={"hello": "world"})
    clock = Clock(5000.0)
    outcome = tick(world, Scripted(result), zone, n=7, intents=[intent(p, {"go": 1})], subscribers=[p, q],
                   clock=clock, at=4000.0)
    assert outcome.error is None and outcome.kind == "" and outcome.exception is None
    assert a.x == 5 and a.updated_at == 4000.0 and world.get_entity(c.id) is None  # the tick's time
    assert world.zones[zone.id].tick_number == 7
    assert len(world.entities_of(zone.id)) == 3
    frames = frames_json(outcome)
    assert set(frames) == {p, q}
    for msg in frames.values():
        assert msg == {"type": "tick", "zone_id": str(zone.id), "tick_number": 7, "sent_at": 5001.0,
                       "state": {"hello": "world"}}  # sent_at: the clock, when the frame was built


def test_players_given_one_state_object_share_one_frame_others_get_their_own():
    world, zone, a, b, c = make_world()
    p, q, r = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    outcome = tick(world, Scripted(TickResult(broadcast_state={"all": 1}), states={r: {"mine": 1}}), zone,
                   subscribers=[p, q, r])
    by_player = dict(outcome.frames)
    assert by_player[p] is by_player[q] and by_player[r] is not by_player[p]
    assert frames_json(outcome)[r]["state"] == {"mine": 1}


def test_no_subscribers_no_frames_and_none_is_an_empty_result():
    world, zone, a, b, c = make_world()
    before = snapshot(world, zone)
    outcome = tick(world, Scripted(None), zone)
    assert outcome == ZoneOutcome(applied=True) and snapshot(world, zone) == before


def test_the_module_sees_the_zone_entities_and_the_intents_in_order():
    world, zone, a, b, c = make_world()
    p = uuid.uuid4()
    game = Scripted(TickResult())
    tick(world, game, zone, n=3, intents=[intent(p, {"i": 1}, 1), intent(p, {"i": 2}, 2)])
    assert game.calls == [("tick", 3, sorted(str(e.id) for e in (a, b, c)), [{"i": 1}, {"i": 2}])]


def test_hooks_run_in_order_before_on_tick_and_their_results_apply_with_it():
    world, zone, a, b, c = make_world()
    p, q = uuid.uuid4(), uuid.uuid4()
    avatar = uuid.uuid4()
    game = Scripted(lambda z, ents, i, n: TickResult(entity_updates=[EntityUpdate(avatar, x=9)]),
                    join=lambda pid: TickResult(entity_creates=[EntityCreate(2, 2, 1, 1, {"p": str(pid)}, avatar)]),
                    leave=lambda pid: TickResult(entity_deletes=[b.id]))
    outcome = tick(world, game, zone, events=[("join", p), ("leave", q)])
    assert outcome.error is None
    assert [call[0] for call in game.calls] == ["join", "leave", "tick"]
    assert world.get_entity(avatar).x == 9 and world.get_entity(b.id) is None


# -- every way a tick is lost: nothing of it applied, no frames --------------------------------

@pytest.mark.parametrize("name, build", _bad_cases(), ids=[n for n, _ in _bad_cases()])
def test_every_invalid_result_loses_the_tick_whole(name, build):
    world, zone, a, b, c = make_world()
    before = snapshot(world, zone)
    outcome = tick(world, Scripted(build(a, b, c)), zone, subscribers=[uuid.uuid4()])
    assert outcome.kind == "invalid_result" and outcome.error and outcome.frames == []
    assert outcome.exception is None
    assert snapshot(world, zone) == before


def test_a_hook_result_that_breaks_a_rule_loses_the_hooks_and_on_tick_together():
    world, zone, a, b, c = make_world()
    before = snapshot(world, zone)
    game = Scripted(TickResult(entity_updates=[EntityUpdate(a.id, x=1)]),
                    join=TickResult(entity_creates=[EntityCreate(W + 1, 0)]))
    outcome = tick(world, game, zone, events=[("join", uuid.uuid4())])
    assert outcome.kind == "invalid_result" and "out of bounds" in outcome.error
    assert snapshot(world, zone) == before


@pytest.mark.parametrize("garbage", [{"entity_creates": []}, [EntityCreate(0, 0)], "TickResult()", 42])
def test_a_hook_returning_garbage_loses_the_tick(garbage):
    world, zone, a, b, c = make_world()
    before = snapshot(world, zone)
    outcome = tick(world, Scripted(TickResult(entity_deletes=[c.id]), leave=garbage), zone,
                   events=[("leave", uuid.uuid4())])
    assert outcome.kind == "invalid_result" and "hook" in outcome.error
    assert snapshot(world, zone) == before


@pytest.mark.parametrize("where", ["on_tick", "on_player_join", "on_player_leave"])
def test_a_module_that_raises_loses_the_tick_and_the_exception_is_handed_back(where):
    world, zone, a, b, c = make_world()
    before = snapshot(world, zone)
    boom = KeyError("boom")

    def raiser(*args):
        raise boom

    game = Scripted(TickResult(entity_deletes=[c.id]), join=TickResult(entity_deletes=[b.id]))
    setattr(game, where, raiser)
    outcome = tick(world, game, zone, events=[("join", uuid.uuid4()), ("leave", uuid.uuid4())],
                   subscribers=[uuid.uuid4()])
    assert outcome.kind == "exception" and outcome.exception is boom and outcome.frames == []
    assert outcome.error == "KeyError: 'boom'"
    assert snapshot(world, zone) == before


@pytest.mark.parametrize("bad_state", [ValueError("no state"), {"s": {1, 2}}, {"v": float("nan")}, {"o": object()}])
def test_a_state_that_cannot_be_built_or_sent_loses_the_frames_not_the_applied_tick(bad_state):
    """``get_player_state`` runs after the apply (it may read the world as the tick left it):
    when it fails, or gives something JSON cannot carry, nobody gets a frame of that tick."""
    world, zone, a, b, c = make_world()
    p, q = uuid.uuid4(), uuid.uuid4()
    outcome = tick(world, Scripted(TickResult(entity_updates=[EntityUpdate(a.id, x=3)]), states={q: bad_state}),
                   zone, subscribers=[p, q])
    assert outcome.kind == "exception" and outcome.error.startswith("get_player_state: ")
    assert outcome.frames == [] and isinstance(outcome.exception, Exception)
    assert a.x == 3


def test_max_entities_per_zone_loses_the_tick():
    world, zone, a, b, c = make_world()
    world.max_entities = 4
    before = snapshot(world, zone)
    outcome = tick(world, Scripted(TickResult(entity_creates=[EntityCreate(0, 0), EntityCreate(1, 0)])), zone)
    assert outcome.kind == "invalid_result" and "max_entities_per_zone" in outcome.error
    assert snapshot(world, zone) == before


def test_a_lost_tick_changes_nothing_and_the_next_one_works():
    world, zone, a, b, c = make_world()
    p = uuid.uuid4()
    game = Scripted(TickResult(entity_creates=[EntityCreate(-1, 0)]))
    assert tick(world, game, zone, n=1, subscribers=[p]).kind == "invalid_result"
    game.result = TickResult(entity_updates=[EntityUpdate(a.id, y=7)], broadcast_state={"ok": True})
    outcome = tick(world, game, zone, n=2, subscribers=[p])
    assert outcome.error is None and a.y == 7 and frames_json(outcome)[p]["tick_number"] == 2


# -- the house around the tick ---------------------------------------------------------------

def test_every_error_code_has_an_http_status():
    """Codes are raised inside the server; only the edge knows their statuses (one table)."""
    with open(gridserver.__file__, encoding="utf-8") as fh:
        source = fh.read()
    raised = set(re.findall(r'GridError\(\s*"([a-z_]+)"', source))
    answered = set(re.findall(r'_error_response\(\d+, "([a-z_]+)"', source))
    assert raised and raised <= set(gridserver.HTTP_STATUS), raised - set(gridserver.HTTP_STATUS)
    assert answered <= set(gridserver.HTTP_STATUS), answered - set(gridserver.HTTP_STATUS)


def test_the_table_of_contents_is_what_grep_prints():
    doc = gridserver.__doc__
    listed = doc[doc.index("gridserver.py``):") + len("gridserver.py``):"):doc.index("Threads.")].split("\n")
    listed = [line.strip() for line in listed if line.strip()]
    out = subprocess.run(["grep", "-n", "^# [A-Z]", gridserver.__file__], capture_output=True, text=True, check=True)
    assert listed == [line.split(":", 1)[1][2:] for line in out.stdout.splitlines()]


def test_importing_gridserver_changes_no_process_wide_setting():
    """gc tuning and the import path are the command line's business, not a library's."""
    code = ("import gc, sys; before = (gc.get_threshold(), gc.get_freeze_count(), list(sys.path)); "
            "import gridserver; assert (gc.get_threshold(), gc.get_freeze_count(), list(sys.path)) == before")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=gridserver.__file__.rsplit("/", 1)[0])


def test_an_aiohttp_without_the_internals_gridserver_needs_stops_start_up(monkeypatch):
    class Old:
        pass
    monkeypatch.setattr(gridserver, "_AIOHTTP_INTERNALS", [*gridserver._AIOHTTP_INTERNALS, (Old, "_gone")])
    with pytest.raises(gridserver.ConfigError, match="Old._gone"):
        gridserver._check_aiohttp()
    monkeypatch.undo()
    gridserver._check_aiohttp()  # the installed one has them all


# -- determinism: the same inputs give the same tick ------------------------------------------

class Dice:
    """Draws from ``framework.random`` in every call and lets the server name what it creates."""

    def __init__(self):
        self.fw = gridserver.FrameworkAPI(None, {}, section="dice", tick_interval=1.0,
                                          create_zone=None, usernames={})

    def on_tick(self, zone_id, entities, intents, tick_number):
        r = self.fw.random
        creates = [EntityCreate(r.randrange(W), r.randrange(H), 1, 1, {"roll": r.random()}) for _ in range(3)]
        return TickResult(entity_creates=creates, broadcast_state={"rolls": [r.randrange(6) for _ in range(4)]})

    def on_player_join(self, zone_id, player_id):
        return TickResult(entity_creates=[EntityCreate(self.fw.random.randrange(W), 0)])

    def get_player_state(self, zone_id, player_id, full_state):
        return {**full_state, "mine": self.fw.random.randrange(1000)}


def _world_after(seed: int, at: float = 3000.0):
    """What a tick of ``Dice`` made (ids, places, metadata, times) and the state a player got."""
    world, zone, a, b, c = make_world()
    p = uuid.UUID(int=1)
    outcome = tick(world, Dice(), zone, events=[("join", p)], subscribers=[p], seed=seed, at=at)
    made = sorted((str(e.id), e.x, e.y, e.width, e.height, gridserver.json_dumps(e.metadata), e.created_at)
                  for e in world.entities_of(zone.id) if e.id not in (a.id, b.id, c.id))
    return made, frames_json(outcome)[p]["state"]


def test_the_same_seed_gives_the_same_world_ids_and_states():
    made, state = _world_after(11)
    assert len(made) == 4 and all(row[6] == 3000.0 for row in made)  # created at the tick's time
    assert _world_after(11) == (made, state)                          # the same seed: the same tick
    other_made, other_state = _world_after(12)
    assert state != other_state and not {r[0] for r in made} & {r[0] for r in other_made}


def test_framework_random_outside_a_tick_is_a_generator_of_its_own():
    fw = Dice().fw
    assert isinstance(fw.random, __import__("random").Random)
    assert fw.random is fw.random  # the same one each time outside a tick


# -- a module cannot change the world behind the server's back -------------------------------

def test_entities_handed_to_a_module_cannot_be_changed():
    world, zone, a, b, c = make_world()
    seen = []

    def meddle(zone_id, entities, intents, n):
        for e in entities:
            for change in (lambda: setattr(e, "x", 1), lambda: e.metadata.update(x=1),
                           lambda: e.metadata.__setitem__("kind", "z"), lambda: e.metadata.pop("kind")):
                try:
                    change()
                except (AttributeError, TypeError) as exc:
                    seen.append(type(exc).__name__)
        return TickResult()

    before = snapshot(world, zone)
    assert tick(world, Scripted(meddle), zone).error is None
    assert seen == ["FrozenInstanceError", "TypeError", "TypeError", "TypeError"] * 3
    assert snapshot(world, zone) == before


def test_metadata_nested_inside_is_read_only_too_and_a_deep_copy_is_a_plain_one():
    import copy
    world, zone, a, b, c = make_world()
    e = gridserver.World.apply(world, zone.id, TickResult(entity_creates=[
        EntityCreate(1, 1, 1, 1, {"bag": [1, {"gem": 2}]})]))[0][0]
    with pytest.raises(TypeError):
        e.metadata["bag"].append(3)
    with pytest.raises(TypeError):
        e.metadata["bag"][1]["gem"] = 5
    mine = copy.deepcopy(e.metadata)
    mine["bag"][1]["gem"] = 5
    mine["bag"].append(3)
    assert e.metadata == {"bag": [1, {"gem": 2}]} and mine == {"bag": [1, {"gem": 5}, 3]}
    assert gridserver.json_dumps(e.metadata) == '{"bag":[1,{"gem":2}]}'


def test_applying_that_fails_half_way_is_undone_whole(monkeypatch):
    world, zone, a, b, c = make_world()
    before = snapshot(world, zone)
    real_remove, calls = gridserver.SpatialIndex.remove, []

    def failing_remove(index, e):  # the delete, last of all the changes, fails (once)
        calls.append(e)
        if len(calls) == 1:
            raise MemoryError("out of memory")
        real_remove(index, e)

    monkeypatch.setattr(gridserver.SpatialIndex, "remove", failing_remove)
    result = TickResult(entity_creates=[EntityCreate(1, 1, 2, 2, {"new": 1})],
                        entity_updates=[EntityUpdate(a.id, x=50, metadata={"moved": True}), EntityUpdate(b.id, y=9)],
                        entity_deletes=[c.id])
    with pytest.raises(gridserver.TickRejected, match="MemoryError"):
        world.apply(zone.id, result, 99.0)
    assert calls[0] is c and snapshot(world, zone) == before


def test_username_during_a_tick_is_the_journaled_one():
    """``framework.username`` in a tick answers from the tick's inputs (journaled, so a replay
    after a restart, with nobody connected, answers the same), not from who is connected now."""
    world, zone, a, b, c = make_world()
    p, q = uuid.uuid4(), uuid.uuid4()
    live = {p: "now-connected", q: "also-connected"}
    fw = gridserver.FrameworkAPI(world, {}, section="t", tick_interval=1.0, create_zone=None, usernames=live)
    seen = []

    def on_tick(zone_id, entities, intents, n):
        seen.extend([fw.username(p), fw.username(q)])
        return TickResult()

    inputs = ZoneInputs(1, [intent(p, {})], [], [], seed=1, at=1.0, names={p: "as-journaled"})
    run_zone_tick(world, Scripted(on_tick), world.zones[zone.id], inputs, Clock())
    assert seen == ["as-journaled", None]
    assert fw.username(p) == "now-connected"  # outside a tick: who is connected
