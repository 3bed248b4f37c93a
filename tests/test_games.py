"""The example game modules, ``game_modules/walkers.py`` and ``game_modules/echo.py``, driven
through ``gridserver.run_zone_tick`` over an in-memory ``World``: no sockets, no database, no
threads.

First walkers' gameplay, then replay: after a crash the server reloads each zone from its
last saved state and runs the journaled ticks (intents, join/leave events, seed, time)
through a freshly started module. A scripted session of 60 ticks is recorded; then a copy of
the world as it was after tick 20, with a freshly loaded and initialised module, is given
ticks 21 to 60 again, and every tick must leave the same world (entity for entity: ids,
places, sizes, metadata, times) and give the same states. A module that keeps a fact in
memory is shown to fail that comparison, so it can fail.

Every test loads its own copy of a module from its file (``load_module``): module globals
start empty, as in a server that has just started, and the copy the server tests import is
left alone.
"""

from __future__ import annotations

import copy
import itertools
import json
import pathlib
import random
import types
import uuid

import pytest

import gridserver
from gridserver import Entity, Intent, World, Zone, ZoneInputs, run_zone_tick

GAMES = pathlib.Path(__file__).resolve().parent.parent / "game_modules"
WALKERS = GAMES / "walkers.py"
ECHO = GAMES / "echo.py"

_copies = itertools.count()


def load_module(path: pathlib.Path | None = None, source: str | None = None) -> types.ModuleType:
    """A new module object from a file (or from source text): its globals as after an import."""
    name = f"_game_under_test_{next(_copies)}"
    text = path.read_text() if source is None else source
    module = types.ModuleType(name)
    module.__file__ = str(path) if path is not None else f"<{name}>"
    exec(compile(text, module.__file__, "exec"), module.__dict__)
    return module


def framework(world: World, settings: dict, section: str = "game_modules.walkers",
              usernames: dict | None = None) -> gridserver.FrameworkAPI:
    def create_zone(name: str, width: int, height: int, metadata: dict) -> Zone:
        zone = Zone(uuid.uuid5(uuid.NAMESPACE_URL, f"zone:{name}"), name, width, height, dict(metadata))
        world.add_zone(zone)
        return zone

    return gridserver.FrameworkAPI(world, {k: str(v) for k, v in settings.items()}, section=section,
                                   tick_interval=0.1, create_zone=create_zone, usernames=usernames or {})


def frames_json(outcome) -> dict:
    """Each subscriber's frame, parsed (after the WebSocket header), without ``sent_at``."""
    out = {}
    for player_id, frame in outcome.frames:
        n = frame[1]
        msg = json.loads(frame[2:] if n < 126 else frame[4:] if n == 126 else frame[10:])
        del msg["sent_at"]
        out[str(player_id)] = msg
    return out


def clock() -> float:
    return 5000.0


def avatar_meta(player_id, name="p", score=0) -> dict:
    return {"kind": "avatar", "player_id": str(player_id), "name": name, "score": score, "color": "#2f7ed8",
            "label": name}


# ---------------------------------------------------------------------------------------------
# Walkers: gameplay
# ---------------------------------------------------------------------------------------------

P, Q, R = uuid.UUID(int=0xA1), uuid.UUID(int=0xB2), uuid.UUID(int=0xC3)


class Walkers:
    """One zone of a fresh walkers module; ``things`` are ``(x, y, w, h, metadata)`` already in it."""

    def __init__(self, width=8, height=8, things=(), usernames=None, **settings):
        self.world = World()
        self.zone = Zone(uuid.uuid4(), "lobby", width, height, {"game": "walkers"})
        self.world.add_zone(self.zone, [Entity(uuid.uuid4(), self.zone.id, x, y, w, h, meta, 1.0, 1.0)
                                        for x, y, w, h, meta in things])
        self.game = load_module(WALKERS)
        self.game.on_init(framework(self.world, {"walls": 0, "items": 0, **settings}, usernames=usernames))
        self.usernames = usernames or {}
        self.n = 0
        self.seq = itertools.count(1)
        self.present: list = []
        self.state: dict | None = None

    def tick(self, *moves, events=(), seed=None, game=None):
        """One tick; ``moves`` are ``(player_id, data)`` in arrival order. Returns the outcome."""
        self.n += 1
        for kind, p in events:
            if kind == "join":
                self.present.append(p)
            elif p in self.present:
                self.present.remove(p)
        intents = [Intent(p, self.zone.id, data, 0.0, next(self.seq)) for p, data in moves]
        names = {p: self.usernames[p] for p in [*(p for p, _ in moves), *(p for _, p in events)] if p in self.usernames}
        inputs = ZoneInputs(self.n, intents, list(events), list(self.present), seed=self.n if seed is None else seed,
                            at=2000.0 + self.n, names=names)  # as the server journals them
        outcome = run_zone_tick(self.world, game or self.game, self.world.zones[self.zone.id], inputs, clock)
        self.frames = frames_json(outcome)
        return outcome

    def entities(self, kind: str) -> list[Entity]:
        return [e for e in self.world.entities_of(self.zone.id) if e.metadata.get("kind") == kind]

    def avatar(self, player_id) -> Entity | None:
        found = [e for e in self.entities("avatar") if e.metadata["player_id"] == str(player_id)]
        assert len(found) <= 1, found
        return found[0] if found else None

    def at(self, player_id) -> tuple[int, int] | None:
        e = self.avatar(player_id)
        return None if e is None else (e.x, e.y)

    def seen(self, player_id) -> dict:
        """What the player's last frame showed: ``{entity id: entry}``."""
        return {e["id"]: e for e in self.frames[str(player_id)]["state"]["entities"]}


def test_a_join_spawns_an_avatar_on_a_free_cell():
    wall = {"kind": "wall", "color": "#555555"}
    item = {"kind": "item", "value": 1, "color": "#e8b000"}
    w = Walkers(3, 1, [(0, 0, 1, 1, wall), (1, 0, 0, 0, item)], usernames={P: "alice"}, items=1)
    outcome = w.tick(events=[("join", P)])
    assert outcome.error is None
    a = w.avatar(P)
    assert (a.x, a.y, a.width, a.height) == (2, 0, 1, 1)  # the only cell with neither wall nor item
    assert a.metadata == avatar_meta(P, "alice")
    assert a.created_at == 2001.0  # the tick's time
    assert w.seen(P) == {}  # the state shows what the hooks did from the next tick on (fog: no avatar yet)
    w.tick()
    mine = w.seen(P)[str(a.id)]
    assert mine == {"id": str(a.id), "x": 2, "y": 0, "w": 1, "h": 1, "kind": "avatar", "color": "#2f7ed8",
                    "label": "alice", "player_id": str(P), "name": "alice", "score": 0}
    assert len(w.entities("item")) == 1 and len(w.entities("avatar")) == 1


def test_players_joining_in_one_tick_get_different_cells_and_a_full_zone_gives_none():
    w = Walkers(2, 1)
    outcome = w.tick(events=[("join", P), ("join", Q), ("join", R)])
    assert outcome.error is None
    assert {w.at(P), w.at(Q)} == {(0, 0), (1, 0)}
    assert w.avatar(R) is None  # no room: R watches
    w.tick()
    assert w.frames[str(R)]["state"]["entities"] == []
    assert {e["player_id"] for e in w.frames[str(P)]["state"]["entities"]} == {str(P), str(Q)}


def test_a_fresh_module_finds_avatars_kept_in_the_zone_and_moves_them():
    # The module's memory is empty (a restart, a replay): P's avatar is found by its metadata.
    w = Walkers(5, 5, [(2, 2, 1, 1, avatar_meta(P)), (1, 3, 1, 1, avatar_meta(Q))])
    kept = w.avatar(P)
    w.tick(events=[("join", P)])
    assert len(w.entities("avatar")) == 2 and w.avatar(P) is kept  # no second avatar
    w.tick((P, {"move": "right"}))
    assert w.at(P) == (3, 2)
    w.tick((P, {"dx": 0, "dy": 1}))
    assert w.at(P) == (3, 3)
    w.tick((P, {"move": "up"}), (Q, {"move": "up"}), (P, {"move": "left"}))  # P's last move counts
    assert w.at(P) == (2, 3) and w.at(Q) == (1, 2)
    w.tick((P, {"dx": 2}), (P, {"move": "jump"}), (P, {"dx": "1"}), (P, {"dx": 0, "dy": 0}))
    assert w.at(P) == (2, 3)  # nothing valid
    w.tick((Q, {"move": "down"}), (P, {"move": "left"}))  # Q moves first, into the cell P wanted
    assert w.at(Q) == (1, 3) and w.at(P) == (2, 3)  # two avatars never share a cell
    w.tick((P, {"move": "down"}))
    w.tick((P, {"move": "down"}))
    assert w.at(P) == (2, 4)  # the zone's edge
    assert kept.updated_at == 2000.0 + w.n - 1  # the last tick that moved it


def test_walls_block_moves():
    wall = {"kind": "wall", "color": "#555555"}
    w = Walkers(6, 6, [(3, 1, 1, 3, wall), (2, 2, 1, 1, avatar_meta(P))])
    w.tick((P, {"move": "right"}), events=[("join", P)])
    assert w.at(P) == (2, 2)
    w.tick((P, {"dx": 1, "dy": 1}))
    assert w.at(P) == (2, 2)  # (3, 3) is the wall's too
    w.tick((P, {"move": "down"}))
    w.tick((P, {"move": "down"}))
    w.tick((P, {"move": "right"}))
    assert w.at(P) == (3, 4)  # below the wall
    w.tick((P, {"move": "up"}))
    assert w.at(P) == (3, 4)


def test_stepping_on_an_item_picks_it_up_raises_the_score_and_another_appears():
    item = {"kind": "item", "value": 2, "color": "#e8b000"}
    w = Walkers(6, 6, [(2, 2, 1, 1, avatar_meta(P)), (3, 2, 0, 0, item)], items=1)
    (old_item,) = w.entities("item")
    w.tick(events=[("join", P)])
    w.tick((P, {"move": "right"}))
    a = w.avatar(P)
    assert (a.x, a.y) == (3, 2) and a.metadata["score"] == 2
    assert w.world.get_entity(old_item.id) is None
    (new_item,) = w.entities("item")  # ``items = 1``: one is kept in the zone
    assert (new_item.x, new_item.y) != (3, 2) and new_item.metadata == {"kind": "item", "value": 1,
                                                                         "color": "#e8b000"}
    seen = w.seen(P)
    assert seen[str(a.id)]["score"] == 2 and str(old_item.id) not in seen and str(new_item.id) in seen
    w.tick((P, {"move": "left"}))
    assert w.avatar(P).metadata["score"] == 2


def test_a_leave_removes_the_avatar_even_for_a_fresh_module():
    w = Walkers(6, 6)
    w.tick(events=[("join", P), ("join", Q)])
    gone = w.avatar(P)
    w.tick((P, {"move": "up"}), events=[("leave", P)])
    assert w.avatar(P) is None and w.world.get_entity(gone.id) is None and w.avatar(Q) is not None
    assert w.seen(Q)[str(gone.id)]["x"] == gone.x  # unmoved, shown a last time
    w.tick()
    assert str(gone.id) not in w.seen(Q)
    # A module started after Q's avatar was made knows it only from the zone.
    w.game = load_module(WALKERS)
    w.game.on_init(framework(w.world, {"walls": 0, "items": 0}))
    w.tick(events=[("leave", Q)])
    assert w.entities("avatar") == []


def test_fog_of_war_shows_each_player_what_is_near_their_avatar():
    wall = {"kind": "wall", "color": "#555555"}
    things = [(1, 1, 1, 1, avatar_meta(P)), (15, 1, 1, 1, avatar_meta(Q)), (3, 0, 1, 4, wall), (5, 0, 1, 4, wall)]
    w = Walkers(20, 4, things, fog_radius=2)
    w.tick(events=[("join", P), ("join", Q)])
    p_sees, q_sees = w.seen(P), w.seen(Q)
    assert {e["kind"] for e in p_sees.values()} == {"avatar", "wall"} and len(p_sees) == 2  # not the far wall
    assert [e["player_id"] for e in p_sees.values() if e["kind"] == "avatar"] == [str(P)]
    assert [e["player_id"] for e in q_sees.values() if e["kind"] == "avatar"] == [str(Q)]
    assert w.frames[str(P)]["state"]["fog_radius"] == 2
    # The same answer for a state that is not the one on_tick just made (a copy of it).
    state = w.game._positions[w.zone.id][0]
    again = w.game.get_player_state(w.zone.id, P, json.loads(json.dumps(state)))
    assert again == w.frames[str(P)]["state"]
    # A player with no avatar sees nothing; with no fog everyone shares the zone's state.
    assert w.game.get_player_state(w.zone.id, R, state) == {"tick": 1, "entities": [], "scores": state["scores"],
                                                            "fog_radius": 2, "view": []}
    clear = Walkers(20, 4, things, fog_radius=0)
    outcome = clear.tick(events=[("join", P), ("join", Q)])
    assert len(clear.seen(P)) == 4 and dict(outcome.frames)[P] is dict(outcome.frames)[Q]


def test_a_new_zone_gets_walls_and_items_once_whatever_the_module_remembers():
    w = Walkers(16, 16, walls=4, items=3)
    w.tick(events=[("join", P)])
    walls = sorted(str(e.id) for e in w.entities("wall"))
    assert 1 <= len(walls) <= 4 and len(w.entities("item")) == 3
    assert not any(w.at(P) in {(e.x + i, e.y + j) for i in range(e.width) for j in range(e.height)}
                   for e in w.entities("wall"))  # walls are not put over avatars
    w.tick()
    w.game = load_module(WALKERS)  # a zone with walls has been seeded: a fresh module knows it
    w.game.on_init(framework(w.world, {"walls": 4, "items": 3}))
    w.tick()
    assert sorted(str(e.id) for e in w.entities("wall")) == walls and len(w.entities("item")) == 3


def test_a_tick_lost_after_its_hooks_leaves_nothing_behind():
    """The hooks' work waits in memory for on_tick; a tick that fails in between must not hand
    it to the next tick (here it would keep the zone's only cell for a player who got nothing)."""
    w = Walkers(1, 1)

    class Failing:
        on_player_join = staticmethod(w.game.on_player_join)
        get_player_state = staticmethod(w.game.get_player_state)

        def on_tick(self, *args):
            raise RuntimeError("lost")

    outcome = w.tick(events=[("join", P)], game=Failing())
    assert outcome.kind == "exception" and w.entities("avatar") == []
    outcome = w.tick(events=[("join", Q)])
    assert outcome.error is None and w.at(Q) == (0, 0)
    w.tick()
    assert [e["player_id"] for e in w.frames[str(Q)]["state"]["entities"]] == [str(Q)]


# ---------------------------------------------------------------------------------------------
# Replay: the same inputs from a saved world, through a fresh module, give the same ticks
# ---------------------------------------------------------------------------------------------

PLAYERS = [uuid.UUID(int=n << 64 | 0x1D) for n in range(1, 6)]
P1, P2, P3, P4, P5 = PLAYERS
NAMES = {p: f"player{i}" for i, p in enumerate(PLAYERS, 1)}
#: Joins and leaves by tick: four players come early, P2 leaves and comes back, P5 comes and
#: goes within the replayed ticks, P1 and P3 leave, P1 comes back.
EVENTS = {1: [("join", P1), ("join", P2)], 2: [("join", P3)], 8: [("join", P4)], 25: [("leave", P2)],
          30: [("join", P5)], 35: [("leave", P5)], 40: [("join", P2)], 45: [("leave", P1), ("leave", P3)],
          50: [("join", P1)]}
MOVES = [{"move": "up"}, {"move": "down"}, {"move": "left"}, {"move": "right"}, {"dx": 1, "dy": 1},
         {"dx": -1, "dy": 1}, {"dx": 0, "dy": -1}, {"dx": 3}, {"say": "hi"}]
WALKERS_SETTINGS = {"fog_radius": 3, "walls": 6, "items": 24, "lobby_size": 12}


def script(zone_id, ticks: int = 60, seed: int = 2024) -> list[ZoneInputs]:
    """A session's inputs, tick by tick: events, intents (from present players mostly, some from
    absent ones), subscribers, seed and time, as the journal keeps them."""
    rng = random.Random(seed)
    present: list = []
    seq = itertools.count(1)
    out = []
    for n in range(1, ticks + 1):
        events = EVENTS.get(n, [])
        for kind, p in events:
            if kind == "join":
                present.append(p)
            else:
                present.remove(p)
        intents = []
        for _ in range(rng.randrange(8)):
            p = rng.choice(present) if present and rng.random() < 0.9 else rng.choice(PLAYERS)
            intents.append(Intent(p, zone_id, rng.choice(MOVES), 1_000_000.0 + n * 0.1, next(seq)))
        names = {p: NAMES[p] for p in [*(i.player_id for i in intents), *(p for _, p in events)] if p in NAMES}
        out.append(ZoneInputs(n, intents, list(events), list(present), seed=rng.getrandbits(63),
                              at=1_000_000.0 + n * 0.1, names=names))
    return out


class Recorder:
    """Passes every call on to the game and keeps each tick's broadcast state, as JSON."""

    def __init__(self, game):
        self.game = game
        self.state: str | None = None

    def __getattr__(self, name):
        return getattr(self.game, name)  # the hooks, when the game has them

    def on_tick(self, zone_id, entities, intents, tick_number):
        result = self.game.on_tick(zone_id, entities, intents, tick_number)
        self.state = gridserver.json_dumps(result.broadcast_state)
        return result


def world_rows(world: World, zone_id) -> dict:
    return {str(e.id): (e.zone_id, e.x, e.y, e.width, e.height, copy.deepcopy(e.metadata), e.created_at,
                        e.updated_at) for e in world.entities_of(zone_id)}


def run_ticks(world: World, game, zone_id, inputs: list[ZoneInputs]) -> list[dict]:
    """Each tick's outcome: its error, the world after it, the broadcast state, the frames."""
    recorder = Recorder(game)
    records = []
    for tick_inputs in inputs:
        recorder.state = None
        outcome = run_zone_tick(world, recorder, world.zones[zone_id], tick_inputs, clock)
        records.append({"tick": tick_inputs.tick_number, "error": outcome.error, "world": world_rows(world, zone_id),
                        "state": recorder.state, "frames": frames_json(outcome)})
    return records


def copy_world(world: World, zone_id, shuffle: bool = False) -> World:
    """The zone as a restart loads it: new objects, the same values (in another order, if asked:
    a database returns rows in no particular order)."""
    zs = world.zones[zone_id]
    z = zs.zone
    entities = [Entity(e.id, e.zone_id, e.x, e.y, e.width, e.height, copy.deepcopy(e.metadata), e.created_at,
                       e.updated_at) for e in zs.entities.values()]
    if shuffle:
        random.Random(7).shuffle(entities)
    saved = World()
    saved.add_zone(Zone(z.id, z.name, z.width, z.height, copy.deepcopy(z.metadata), z.created_at, z.updated_at),
                   entities)
    saved.zones[zone_id].tick_number = zs.tick_number
    return saved


def start(load, world: World, settings: dict, section: str):
    game = load()
    game.on_init(framework(world, settings, section, usernames=NAMES))
    return game


def session_and_replay(load, settings: dict, section: str, saved_after: int = 20, ticks: int = 60,
                       shuffle: bool = False):
    """Record a scripted session of ``ticks`` ticks; replay those after ``saved_after`` from a copy
    of the world as it was then, through a fresh module. Returns (recorded, replayed)."""
    world = World()
    game = start(load, world, settings, section)
    if not world.zones:
        framework(world, {}).create_zone("arena", 12, 12, {})
    (zone_id,) = world.zones
    inputs = script(zone_id, ticks)
    recorded = run_ticks(world, game, zone_id, inputs[:saved_after])
    saved = copy_world(world, zone_id, shuffle)
    recorded += run_ticks(world, game, zone_id, inputs[saved_after:])
    replayed = run_ticks(saved, start(load, saved, settings, section), zone_id, inputs[saved_after:])
    return recorded, replayed


def sorted_entities(state):
    """A state with its entity lists in id order (the order a module lists them in follows the
    zone's, which a restart does not keep)."""
    if isinstance(state, dict):
        return {k: (sorted(map(sorted_entities, v), key=lambda e: e["id"]) if k == "entities" else sorted_entities(v))
                for k, v in state.items()}
    return state


def differences(recorded: list[dict], replayed: list[dict], any_order: bool = False) -> list[str]:
    """Where the replayed ticks differ from the recorded ones, tick by tick."""
    found = []
    for was, now in zip(recorded[-len(replayed):], replayed, strict=True):
        n = was["tick"]
        for key in ("error", "world", "state", "frames"):
            a, b = was[key], now[key]
            if any_order and key in ("state", "frames"):
                a, b = sorted_entities(json.loads(a) if key == "state" else a), \
                    sorted_entities(json.loads(b) if key == "state" else b)
            if a != b:
                found.append(f"tick {n}: {key}" + (f" ({sum(a.get(k) != b.get(k) for k in a.keys() | b.keys())} "
                                                   f"entities)" if key == "world" else ""))
    return found


def walkers_session(shuffle: bool = False):
    return session_and_replay(lambda: load_module(WALKERS), WALKERS_SETTINGS, "game_modules.walkers",
                              shuffle=shuffle)


@pytest.mark.parametrize("shuffle", [False, True], ids=["as-saved", "loaded-in-another-order"])
def test_walkers_replays_exactly_from_a_saved_world(shuffle):
    recorded, replayed = walkers_session(shuffle)
    assert all(r["error"] is None for r in recorded)
    # The session plays: walls, items picked up, avatars that move, join and leave after the save.
    kinds = [[meta["kind"] for (_, _, _, _, _, meta, _, _) in r["world"].values()] for r in recorded]
    assert all(k.count("wall") >= 1 and k.count("item") == 24 for k in kinds)
    owners = [{meta["player_id"] for (*_, meta, _, _) in r["world"].values() if meta["kind"] == "avatar"}
              for r in recorded]
    assert owners[19] == {str(p) for p in (P1, P2, P3, P4)} and str(P5) in owners[29]
    assert owners[34] == {str(p) for p in (P1, P3, P4)} and owners[-1] == {str(p) for p in (P1, P2, P4)}
    assert max(meta.get("score", 0) for r in recorded for (*_, meta, _, _) in r["world"].values()) > 0
    moved = {eid: row for eid, row in recorded[19]["world"].items() if row[5]["kind"] == "avatar"}
    assert any(recorded[-1]["world"].get(eid, row)[1:3] != row[1:3] for eid, row in moved.items())
    assert any(len({json.dumps(f["state"]) for f in r["frames"].values()}) > 1 for r in recorded)  # fog
    assert differences(recorded, replayed, any_order=shuffle) == []


def test_echo_replays_exactly_from_a_saved_world():
    recorded, replayed = session_and_replay(lambda: load_module(ECHO), {}, "game_modules.echo")
    assert all(r["error"] is None and r["world"] == {} for r in recorded)
    assert sum(len(json.loads(r["state"])["intents"]) for r in replayed) > 40
    assert differences(recorded, replayed) == []


#: Modules that are not deterministic: one keeps a count in memory and writes it into an
#: entity, one draws from a generator of its own.
FORGETFUL = {
    "counts ticks in memory": '''
from gridserver import EntityCreate, EntityUpdate, TickResult

_ticks = 0

def on_init(framework):
    pass

def on_tick(zone_id, entities, intents, tick_number):
    global _ticks
    _ticks += 1
    meta = {"kind": "board", "ticks": _ticks}
    boards = [e for e in entities if e.metadata.get("kind") == "board"]
    if not boards:
        return TickResult(entity_creates=[EntityCreate(0, 0, 1, 1, meta)], broadcast_state=meta)
    return TickResult(entity_updates=[EntityUpdate(boards[0].id, metadata=meta)], broadcast_state=meta)

def get_player_state(zone_id, player_id, full_state):
    return full_state
''',
    "draws from its own generator": '''
import random
from gridserver import EntityCreate, TickResult

_rng = random.Random()

def on_init(framework):
    pass

def on_tick(zone_id, entities, intents, tick_number):
    return TickResult(entity_creates=[EntityCreate(0, 0, 0, 0, {"roll": _rng.random()})])

def get_player_state(zone_id, player_id, full_state):
    return full_state
'''}


@pytest.mark.parametrize("name", list(FORGETFUL))
def test_the_replay_comparison_catches_a_module_that_is_not_deterministic(name):
    source = FORGETFUL[name]
    recorded, replayed = session_and_replay(lambda: load_module(source=source), {}, "forgetful")
    assert all(r["error"] is None for r in recorded + replayed)
    assert differences(recorded, replayed) != []
