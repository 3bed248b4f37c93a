"""Game modules for the fault suite (``tests/test_faults*.py``), run by a real server process.

They are named in the server's environment as ``GRIDSERVER_GAME_MODULE=tests.fault_games:Counter``
(the working directory, the repository root, is on the import path) and read their settings
from ``GRIDSERVER_TESTS_FAULT_GAMES_<CLASS>_<KEY>``.
"""

from __future__ import annotations

import threading
import time
import uuid

from gridserver import EntityCreate, EntityMoves, EntityUpdate, TickResult


class Counter:
    """Every zone's world is a function of one number, its *step*, so any saved state can be
    checked for being one that existed.

    Each tick of a zone: ``step`` becomes the step stored in its entities plus one, and every
    entity is moved to ``x = (step + i) % width``, ``y = (i // width) % height`` with metadata
    ``{"i": i, "step": step, ...}`` (``i`` is fixed per entity). All rows of a zone written by
    one flush therefore carry one step; a half-written flush would show two. An intent
    ``{"spawn": k}`` creates one more entity (metadata ``born`` = step, ``k`` = k), moved like
    the others from then on.

    Every call appends ``"<zone> <step> <entity count> <spawned k,...>"`` to the ``trace``
    file (line-buffered), so a test knows the last step the module computed even after a
    SIGKILL. Settings: ``zones`` (number of ``counter-N`` zones, default 2), ``entities``
    (per zone, default 100), ``size`` (zone width and height, default 128), ``pad`` (bytes of
    padding in every tick's state, default 0), ``slow_zone`` and ``slow_ms`` (that zone's
    calls sleep that long), ``trace`` (file path).
    """

    def on_init(self, framework):
        self.fw = framework
        self.entities = framework.setting("entities", 100, int)
        self.pad = "x" * framework.setting("pad", 0, int)
        self.slow_zone = framework.setting("slow_zone", "")
        self.slow = framework.setting("slow_ms", 0, int) / 1000
        size = framework.setting("size", 128, int)
        trace = framework.setting("trace")
        self.trace = open(trace, "a", buffering=1, encoding="utf-8") if trace else None
        self.lock = threading.Lock()
        names = {z.name for z in framework.list_zones()}
        for n in range(framework.setting("zones", 2, int)):
            if f"counter-{n}" not in names:
                framework.create_zone(f"counter-{n}", size, size, {"game": "counter"})

    def on_tick(self, zone_id, entities, intents, tick_number):
        zone = self.fw.get_zone(zone_id)
        if not zone.name.startswith("counter-"):
            return TickResult(broadcast_state={"tick": tick_number})
        if zone.name == self.slow_zone and self.slow:
            time.sleep(self.slow)
        w, h = zone.width, zone.height
        step = (max(e.metadata["step"] for e in entities) if entities else 0) + 1

        def place(i: int) -> tuple[int, int]:
            return (step + i) % w, (i // w) % h

        updates = []
        for e in entities:
            x, y = place(e.metadata["i"])
            meta = dict(e.metadata)
            meta["step"] = step
            updates.append(EntityUpdate(e.id, x=x, y=y, metadata=meta))
        creates = []
        next_i = (max(e.metadata["i"] for e in entities) + 1) if entities else 0
        if not entities:
            for i in range(self.entities):
                x, y = place(i)
                creates.append(EntityCreate(x, y, 1, 1, {"i": i, "step": step, "born": step}))
            next_i = self.entities
        spawned = []
        for intent in intents:
            k = intent.data.get("spawn")
            if isinstance(k, int) and not isinstance(k, bool):
                x, y = place(next_i)
                creates.append(EntityCreate(x, y, 1, 1, {"i": next_i, "step": step, "born": step, "k": k,
                                                         "player": str(intent.player_id)}))
                spawned.append(k)
                next_i += 1
        count = len(entities) + len(creates)
        if self.trace is not None:
            with self.lock:
                self.trace.write(f"{zone.name} {step} {count} {','.join(map(str, spawned))}\n")
        state = {"zone": zone.name, "step": step, "n": count, "spawned": spawned}
        if self.pad:
            state["pad"] = self.pad
        return TickResult(entity_creates=creates, entity_updates=updates, broadcast_state=state)

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


class _Unserializable:
    def __repr__(self):
        return "<unserializable>"


class Faulty:
    """A module whose zones misbehave on command, for the module-fault promises.

    Zones: ``healthy``, ``victim`` and ``control`` (created at start). An intent sent to the
    ``control`` zone, ``{"zone": "victim", "mode": MODE}``, sets how that zone's next ticks
    go: ``ok`` (one 1x1 entity whose metadata counts steps), ``raise``, ``hang`` (the call
    blocks until the mode changes), ``oob`` (moves the entity outside the zone), or a kind of
    garbage (see ``GARBAGE``). ``healthy`` always behaves.
    """

    ZONES = ("healthy", "victim", "control")

    def on_init(self, framework):
        self.fw = framework
        self.modes: dict[str, str] = {}
        self.released = threading.Condition()
        names = {z.name for z in framework.list_zones()}
        for name in self.ZONES:
            if name not in names:
                framework.create_zone(name, 16, 16, {"game": "faulty"})

    def _set_mode(self, zone: str, mode: str) -> None:
        with self.released:
            self.modes[zone] = mode
            self.released.notify_all()

    def on_tick(self, zone_id, entities, intents, tick_number):
        zone = self.fw.get_zone(zone_id)
        if zone.name == "control":
            for intent in intents:
                if isinstance(intent.data.get("zone"), str) and isinstance(intent.data.get("mode"), str):
                    self._set_mode(intent.data["zone"], intent.data["mode"])
            return TickResult(broadcast_state={"zone": "control", "modes": dict(self.modes)})
        mode = self.modes.get(zone.name, "ok")
        if zone.name == "healthy":
            mode = "ok"
        if mode == "hang":
            with self.released:
                self.released.wait_for(lambda: self.modes.get(zone.name) != "hang", timeout=60)
            mode = self.modes.get(zone.name, "ok")
        if mode == "raise":
            raise RuntimeError(f"module fault in {zone.name} at tick {tick_number}")
        if mode in self.GARBAGE:
            return self.GARBAGE[mode](self, zone, entities)
        if not entities:
            return TickResult(entity_creates=[EntityCreate(0, 0, 1, 1, {"step": 1})],
                              broadcast_state={"zone": zone.name, "step": 1})
        e = entities[0]
        step = e.metadata["step"] + 1
        if mode == "oob":
            return TickResult(entity_updates=[EntityUpdate(e.id, x=zone.width, metadata={"step": step})],
                              broadcast_state={"zone": zone.name, "step": step})
        return TickResult(entity_updates=[EntityUpdate(e.id, x=step % zone.width, metadata={"step": step})],
                          broadcast_state={"zone": zone.name, "step": step})

    def get_player_state(self, zone_id, player_id, full_state):
        if full_state.get("player_state") == "raise":
            raise ValueError("get_player_state fault")
        if full_state.get("player_state") == "garbage":
            return {"unserializable": _Unserializable()}
        return full_state

    # Each garbage kind: what the zone's tick returns instead of a proper result.
    def _meta(self, zone, entities, metadata):
        e = entities[0] if entities else None
        if e is None:
            return TickResult(entity_creates=[EntityCreate(1, 1, 1, 1, metadata)])
        return TickResult(entity_updates=[EntityUpdate(e.id, metadata=metadata)])

    GARBAGE = {
        "not_a_result": lambda self, zone, entities: 42,
        "string_lists": lambda self, zone, entities: TickResult(entity_creates="abc", entity_updates="def"),
        "state_not_dict": lambda self, zone, entities: TickResult(broadcast_state=[1, 2, 3]),
        "bool_coordinates": lambda self, zone, entities: TickResult(entity_creates=[EntityCreate(True, 0, 1, 1)]),
        "huge_coordinates": lambda self, zone, entities: TickResult(entity_creates=[EntityCreate(2 ** 70, 0)]),
        "negative_size": lambda self, zone, entities: TickResult(entity_creates=[EntityCreate(1, 1, -1, 1)]),
        "unknown_update": lambda self, zone, entities: TickResult(
            entity_updates=[EntityUpdate("00000000-0000-0000-0000-000000000000", x=1)]),
        "bad_id": lambda self, zone, entities: TickResult(entity_deletes=["not-a-uuid"]),
        "set_metadata": lambda self, zone, entities: self._meta(zone, entities, {"s": {1, 2}}),
        "nan_metadata": lambda self, zone, entities: self._meta(zone, entities, {"v": float("nan")}),
        "list_metadata": lambda self, zone, entities: self._meta(zone, entities, [1, 2]),
        "surrogate_metadata": lambda self, zone, entities: self._meta(zone, entities, {"s": "\ud800"}),
        "nul_metadata": lambda self, zone, entities: self._meta(zone, entities, {"s": "a\x00b"}),
        "nul_key_metadata": lambda self, zone, entities: self._meta(zone, entities, {"a\x00": 1}),
        "deep_metadata": lambda self, zone, entities: self._meta(zone, entities, nested_dict(990)),
        "too_deep_to_encode": lambda self, zone, entities: self._meta(zone, entities, nested_dict(1500)),
        "player_state_raises": lambda self, zone, entities: TickResult(broadcast_state={"player_state": "raise"}),
        "player_state_garbage": lambda self, zone, entities: TickResult(broadcast_state={"player_state": "garbage"}),
    }


def nested_dict(depth: int) -> dict:
    root: dict = {}
    node = root
    for _ in range(depth - 1):
        node["d"] = {}
        node = node["d"]
    return root


class Traveller:
    """One entity with a fixed id that travels between zones the only way the protocol
    allows: deleted by the zone it leaves and created, with the same id, by the zone it
    enters, usually in the same tick (at most the next one).

    Zones ``a`` and ``b`` are created at start. Intents: ``{"spawn": true}`` creates the
    traveller in the zone the intent was sent to when it exists nowhere; ``{"to": NAME}``
    sets the goal (module-wide, kept in memory only: after a restart nothing moves until a
    goal is set again). Each zone tick, with a goal set: a zone holding the traveller that is
    not the goal deletes it; the goal zone creates it when it exists nowhere (deleted earlier
    in this tick, or in the last one, by the zone it left).
    """

    ID = uuid.UUID("5d1c0c2e-7a3b-4c1e-9f00-7a7e11e70001")
    ZONES = ("a", "b")

    def on_init(self, framework):
        self.fw = framework
        self.goal: str | None = None
        names = {z.name for z in framework.list_zones()}
        for name in self.ZONES:
            if name not in names:
                framework.create_zone(name, 16, 16, {"game": "traveller"})

    def _create(self) -> EntityCreate:
        return EntityCreate(3, 4, 1, 1, {"kind": "traveller"}, self.ID)

    def on_tick(self, zone_id, entities, intents, tick_number):
        zone = self.fw.get_zone(zone_id)
        creates, deletes = [], []
        for intent in intents:
            to = intent.data.get("to")
            if isinstance(to, str):
                self.goal = to
            if intent.data.get("spawn") is True and not creates and self.fw.get_entity(self.ID) is None:
                creates.append(self._create())
        here = any(e.id == self.ID for e in entities)
        goal = self.goal
        if goal is not None:
            if here and zone.name != goal:
                deletes.append(self.ID)
            elif zone.name == goal and not here and not creates and self.fw.get_entity(self.ID) is None:
                creates.append(self._create())
        return TickResult(entity_creates=creates, entity_deletes=deletes,
                          broadcast_state={"zone": zone.name, "tick": tick_number, "here": here, "goal": goal})

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


class Drifter:
    """A deterministic game for the journal's crash test: every tick of every ``drift-N`` zone
    moves, creates and deletes entities by ``framework.random``, and an intent
    ``{"spawn": k}`` adds an entity with ``k`` in its metadata. Nothing is kept in memory: a
    tick depends only on the zone's entities and the tick's inputs, so a replay after a crash
    computes exactly the ticks the players saw. The broadcast state is the whole zone, sorted
    (``[id, x, y, w, h, metadata]`` per entity), so a client's last state can be compared with
    the restored zone entity for entity. Settings: ``zones`` (default 2), ``size`` (16).
    """

    def on_init(self, framework):
        self.fw = framework
        size = framework.setting("size", 16, int)
        names = {z.name for z in framework.list_zones()}
        for n in range(framework.setting("zones", 2, int)):
            if f"drift-{n}" not in names:
                framework.create_zone(f"drift-{n}", size, size, {"game": "drifter"})

    def on_tick(self, zone_id, entities, intents, tick_number):
        zone = self.fw.get_zone(zone_id)
        r = self.fw.random
        w, h = zone.width, zone.height
        creates, updates, deletes = [], [], []
        for e in sorted(entities, key=lambda e: str(e.id)):
            roll = r.random()
            if roll < 0.05:
                deletes.append(e.id)
            elif roll < 0.7:
                updates.append(EntityUpdate(e.id, x=r.randrange(w), y=r.randrange(h),
                                            metadata={**e.metadata, "moves": e.metadata.get("moves", 0) + 1}))
        if len(entities) - len(deletes) < 12 or r.random() < 0.3:
            creates.append(EntityCreate(r.randrange(w), r.randrange(h), 1, 1, {"born": tick_number, "moves": 0}))
        for intent in intents:
            k = intent.data.get("spawn")
            if isinstance(k, int) and not isinstance(k, bool):
                creates.append(EntityCreate(r.randrange(w), r.randrange(h), 0, 0,
                                            {"k": k, "player": str(intent.player_id), "born": tick_number}))
        return TickResult(entity_creates=creates, entity_updates=updates, entity_deletes=deletes,
                          broadcast_state={"zone": zone.name, "tick": tick_number})

    def get_player_state(self, zone_id, player_id, full_state):
        # the zone as this tick left it (get_player_state runs after the apply)
        world = sorted([str(e.id), e.x, e.y, e.width, e.height, dict(e.metadata)]
                       for e in self.fw.list_entities(zone_id))
        return {**full_state, "entities": world}


class Stepper:
    """A small deterministic game for the journal's time line: each tick moves every entity one
    cell right (wrapping), and an intent ``{"add": k}`` creates an entity at a row drawn from
    ``framework.random``. The broadcast state is the zone, sorted."""

    def on_init(self, framework):
        self.fw = framework

    def on_tick(self, zone_id, entities, intents, tick_number):
        zone = self.fw.get_zone(zone_id)
        updates = [EntityUpdate(e.id, x=(e.x + 1) % zone.width) for e in entities]
        creates = [EntityCreate(0, self.fw.random.randrange(zone.height), 1, 1, {"k": i.data["add"]})
                   for i in intents if isinstance(i.data.get("add"), int)]
        return TickResult(entity_creates=creates, entity_updates=updates, broadcast_state={"tick": tick_number})

    def get_player_state(self, zone_id, player_id, full_state):
        world = sorted([str(e.id), e.x, e.y, e.width, e.height, dict(e.metadata)]
                       for e in self.fw.list_entities(zone_id))
        return {**full_state, "entities": world}


class Census:
    """Each tick of a zone creates one entity whose ``n`` is what ``framework.list_entities``
    counted in the zone, plus one: a world read as every tick's input. The state lists every
    ``n``: ``1, 2, ... count`` exactly when each tick read the world as it was. A tick replayed
    against another world (an empty one) would write a 1 again. Settings: ``zones`` (number of
    ``census-N`` zones, default 2)."""

    def on_init(self, framework):
        self.fw = framework
        names = {z.name for z in framework.list_zones()}
        for n in range(framework.setting("zones", 2, int)):
            if f"census-{n}" not in names:
                framework.create_zone(f"census-{n}", 64, 64, {"game": "census"})

    def on_tick(self, zone_id, entities, intents, tick_number):
        seen = len(self.fw.list_entities(zone_id))
        n = seen + 1
        ns = sorted(e.metadata["n"] for e in entities) + [n]
        return TickResult(entity_creates=[EntityCreate(n % 64, n // 64 % 64, 0, 0, {"n": n})],
                          broadcast_state={"count": len(ns), "ns": ns})

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


class BulkStepper(Stepper):
    """``Stepper`` handing in its moves as one ``EntityMoves`` (the bulk form) instead of an
    ``EntityUpdate`` per entity: the same world, tick by tick."""

    def on_tick(self, zone_id, entities, intents, tick_number):
        result = super().on_tick(zone_id, entities, intents, tick_number)
        width = self.fw.get_zone(zone_id).width
        result.entity_updates = []
        result.entity_moves = EntityMoves([e.id for e in entities], [(e.x + 1) % width for e in entities],
                                          [e.y for e in entities])
        return result
