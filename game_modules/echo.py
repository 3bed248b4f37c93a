"""Echo: the smallest game module. It keeps no entities and shows each tick's intents.

Deterministic, as the server's replay of journaled ticks after a crash needs: a tick's state
is made from that tick's intents alone; it keeps nothing in memory and draws no random
numbers.

Swap it in with one line of INI::

    [game]
    module = game_modules.echo
"""

from gridserver import TickResult


def on_init(framework):
    framework.logger.info("echo game ready")


def on_tick(zone_id, entities, intents, tick_number):
    seen = [{"player_id": str(i.player_id), "seq": i.seq, "data": i.data} for i in intents]
    return TickResult(broadcast_state={"game": "echo", "tick": tick_number, "intents": seen})


def get_player_state(zone_id, player_id, full_state):
    return full_state  # everyone sees the same: the server serializes it once per zone
