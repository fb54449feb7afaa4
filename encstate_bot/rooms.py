"""What the bot knows about each room's plaintext state: encryption flags, power, join rules.

A ``RoomView`` is built from raw state events (from a rescan or from sync) and answers the
questions the policy needs: is state encryption on, who is empowered, which rooms a restricted
join rule admits, who may read history.
"""

from __future__ import annotations

from typing import Any

from mautrix.types import PowerLevelStateEventContent, StateEvent

from . import protocol

# Power level a room creator has before room version 12 when no power_levels event exists.
LEGACY_CREATOR_LEVEL = 100


class RoomView:
    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self.encryption: dict[str, Any] | None = None
        self.power_levels: dict[str, Any] | None = None
        self.create: dict[str, Any] | None = None
        self.join_rules: dict[str, Any] | None = None
        self.history_visibility: str | None = None
        self._pl: PowerLevelStateEventContent | None = None
        self._create_evt: StateEvent | None = None

    # Feeding ------------------------------------------------------------------------------------

    def apply(self, raw: dict[str, Any]) -> bool:
        """Take one raw plaintext state event; True if it changed something the bot uses."""
        event_type = raw.get("type")
        if raw.get("state_key") != "":
            return False
        content = raw.get("content")
        if not isinstance(content, dict):
            content = {}
        if event_type == "m.room.encryption":
            self.encryption = content
        elif event_type == "m.room.power_levels":
            self.power_levels = content
            self._pl = None
        elif event_type == "m.room.create":
            self.create = {"sender": raw.get("sender"), "content": content}
            self._create_evt = None
            self._pl = None
        elif event_type == "m.room.join_rules":
            self.join_rules = content
        elif event_type == "m.room.history_visibility":
            value = content.get("history_visibility")
            self.history_visibility = value if isinstance(value, str) else None
        else:
            return False
        return True

    # Questions ----------------------------------------------------------------------------------

    @property
    def known(self) -> bool:
        """Whether the room's power levels (or its create event) have been seen: until then
        nobody's power can be judged."""
        return self.power_levels is not None or self.create is not None

    @property
    def state_flag(self) -> str | None:
        if self.encryption is None or self.encryption.get("algorithm") != (
            protocol.MEGOLM_ALGORITHM
        ):
            return None
        return protocol.state_encryption_flag(self.encryption)

    @property
    def state_encrypted(self) -> bool:
        return self.state_flag is not None

    def _levels(self) -> PowerLevelStateEventContent:
        if self._pl is None:
            try:
                self._pl = PowerLevelStateEventContent.deserialize(self.power_levels or {})
            except Exception:
                self._pl = PowerLevelStateEventContent()
        return self._pl

    def _create_event(self) -> StateEvent | None:
        if self._create_evt is None and self.create is not None:
            try:
                self._create_evt = StateEvent.deserialize(
                    {
                        "type": "m.room.create",
                        "room_id": self.room_id,
                        "event_id": "$create",
                        "sender": self.create["sender"],
                        "origin_server_ts": 0,
                        "state_key": "",
                        "content": self.create["content"],
                    }
                )
            except Exception:
                return None
        return self._create_evt

    @property
    def users_default(self) -> int:
        return _as_int(self._levels().users_default, 0)

    def user_level(self, user_id: str) -> int:
        create = self._create_event()
        if self.power_levels is None and create is not None:
            # No power_levels event: only the creator is above the default.
            if create.content.supports_creator_power:
                return self._levels().get_user_level(user_id, create)
            return LEGACY_CREATOR_LEVEL if create.sender == user_id else 0
        try:
            return int(self._levels().get_user_level(user_id, create))
        except (TypeError, ValueError, OverflowError):
            return self.users_default

    @property
    def invite_level(self) -> int:
        return _as_int(self._levels().invite, 0)

    @property
    def state_default(self) -> int:
        return _as_int(self._levels().state_default, 50)

    def state_level(self, event_type: str) -> int:
        """The power level needed to send ``event_type`` as state. Read from the raw content:
        mautrix keys ``events`` by EventType objects, so a lookup by a plain string always
        falls back to state_default (a level-0 type would look admin-only, and the reverse)."""
        events = (self.power_levels or {}).get("events")
        if isinstance(events, dict) and event_type in events:
            value = events[event_type]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            # An unreadable level for this type: assume the strictest reading, never a lower one.
            return max(self.state_default, 100)
        return self.state_default

    def empowered(self, user_id: str) -> bool:
        return self.user_level(user_id) > self.users_default

    def empowered_users(self) -> list[str]:
        listed = (self.power_levels or {}).get("users")
        users = {u for u in listed if isinstance(u, str)} if isinstance(listed, dict) else set()
        create = self._create_event()
        if create is not None and create.content.supports_creator_power:
            users.add(create.sender)
            extra = create.content.additional_creators
            users.update(
                u for u in (extra if isinstance(extra, list) else []) if isinstance(u, str)
            )
        return sorted(u for u in users if self.empowered(u))

    @property
    def join_rule(self) -> str | None:
        rule = (self.join_rules or {}).get("join_rule")
        return rule if isinstance(rule, str) else None

    def allowed_rooms(self) -> tuple[list[str], list[str]]:
        return protocol.allowed_rooms(self.join_rules)


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default
