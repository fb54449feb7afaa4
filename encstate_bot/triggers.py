"""Why the bot is sending (or refusing) something: every queued item and audit row names one.

The values are what the database and the audit show, so they never change spelling.
"""

from __future__ import annotations

from enum import Enum


class Trigger(str, Enum):
    REQUEST = "request"  # a device asked (m.room_key_request)
    JOIN = "join"  # push on join
    INVITE = "invite"  # push on invite (the preview seals, or all where invitees count)
    LINK = "link"  # a member of a room that a restricted room's join rule admits through
    BOT_INVITE = "bot-invite"  # someone the bot invited (!encstate invite, an approved knock)
    SEAL = "seal"  # a seal's key, before or after its event
    COMMAND = "command"  # an admin's !encstate share, or the bot's own reply session
    OWN = "own"  # a check of who may hold the bot's own sessions
    BUNDLE = "bundle"  # a room key bundle (MSC4268)

    def __str__(self) -> str:
        return self.value


# Someone is waiting: these go ahead of bulk pushes, their calls at once.
FAST = frozenset({Trigger.REQUEST, Trigger.JOIN, Trigger.INVITE, Trigger.BOT_INVITE})
# Nobody asked: never the same (device, session, index) twice, and nothing to someone not
# joined except the seals within their reach. Requests and an admin's share are always answered.
UNASKED = frozenset({Trigger.JOIN, Trigger.INVITE, Trigger.LINK, Trigger.BOT_INVITE, Trigger.SEAL})


def is_fast(trigger: str) -> bool:
    """Whether someone waits for work with this trigger (a plain string, as read back from the
    database, counts the same)."""
    return trigger in FAST


# The courier's lanes, each drained by a task of its own. An answer to a request has a lane to
# itself, so a join storm's batches (thousands of newcomers) never stand between it and the
# courier; a newcomer's keys go through the fast lane; bulk pushes pause for both. The outbox
# has indexes for exactly these trigger sets (migrations.upgrade_v8): moving a trigger to
# another lane needs new ones (tests/unit/test_outbox_lanes.py checks each lane uses its own).
REQUEST_LANE = "request"
FAST_LANE = "fast"
PUSH_LANE = "push"
LANES = (REQUEST_LANE, FAST_LANE, PUSH_LANE)
# the triggers of the two lanes someone waits for; the push lane takes every other
LANE_TRIGGERS = {REQUEST_LANE: frozenset({Trigger.REQUEST}), FAST_LANE: FAST - {Trigger.REQUEST}}


def lane(trigger: str) -> str:
    """The lane work with this trigger goes through."""
    for name, triggers in LANE_TRIGGERS.items():
        if trigger in triggers:
            return name
    return PUSH_LANE
