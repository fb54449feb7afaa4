"""The room policy: what encstate does in one room, in one place.

Its type (``RoomPolicy``), where it comes from (the config's defaults with the room's own
overrides, kept in the ``encstate_room`` table), how it changes (``!encstate policy`` and
``!encstate seal on|off``) and how it reads back to an admin.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Protocol

from attr import dataclass, evolve


class Mode(str, Enum):
    MEMBERS = "members"  # every current member's devices
    CROSS_SIGNED = "cross-signed"  # only devices their owner cross-signed
    OFF = "off"  # share nothing

    @classmethod
    def parse(cls, value: object) -> Mode:
        try:
            return cls(str(value))
        except ValueError as e:
            raise ValueError(f"unknown policy {value!r}; use members, cross-signed or off") from e


@dataclass(frozen=True)
class RoomPolicy:
    """The settings in force in one room."""

    mode: Mode = Mode.MEMBERS
    share_with_invited: bool = False
    allow_mixed_shared_history: bool = False
    dry_run: bool = False
    seal: bool = False


@dataclass(frozen=True)
class Overrides:
    """A room's own settings (None: the config's default applies)."""

    mode: str | None = None
    share_invited: bool | None = None
    dry_run: bool | None = None
    seal: bool | None = None


class PolicyStore(Protocol):
    async def set_room_policy(
        self, room_id: str, mode: str | None, share_invited: bool | None, dry_run: bool | None
    ) -> None: ...

    async def set_room_seal(self, room_id: str, seal: bool | None) -> None: ...


class RoomPolicies:
    """Every room's policy: the config's defaults, each room's overrides, and changing them."""

    def __init__(self, config: Any, store: PolicyStore, log: Any) -> None:
        self.config = config
        self.store = store
        self.log = log
        self.overrides: dict[str, Overrides] = {}

    def load(self, rows: Any) -> None:
        """The rooms' overrides, from the database's room rows."""
        self.overrides = {
            r.room_id: Overrides(r.mode, r.share_invited, r.dry_run, r.seal) for r in rows
        }

    def get(self, room_id: str) -> RoomPolicy:
        own = self.overrides.get(room_id, Overrides())
        mode = self.config.default_mode
        if own.mode:
            try:
                mode = Mode.parse(own.mode)
            except ValueError:
                pass
        return RoomPolicy(
            mode=mode,
            share_with_invited=_either(own.share_invited, self.config["share_with_invited"]),
            allow_mixed_shared_history=bool(self.config["allow_mixed_shared_history"]),
            dry_run=_either(own.dry_run, self.config["dry_run"]),
            seal=_either(own.seal, self.config["seal.enabled"]),
        )

    def seal_on(self, room_id: str) -> bool:
        return self.get(room_id).seal

    async def change(self, room_id: str, words: list[str], who: str) -> bool:
        """Apply ``!encstate policy`` arguments; False if there were none (just show it).
        Raises ValueError with a message for the admin on a bad word."""
        if not words:
            return False
        changed = parse_policy_words(words, self.overrides.get(room_id, Overrides()))
        await self.store.set_room_policy(
            room_id, changed.mode, changed.share_invited, changed.dry_run
        )
        self.overrides[room_id] = changed
        self.log.info(
            f"{who} set the policy of {room_id}: {changed.mode} {changed.share_invited} "
            f"{changed.dry_run}"
        )
        return True

    async def set_seal(self, room_id: str, on: bool, who: str) -> None:
        await self.store.set_room_seal(room_id, on)
        self.overrides[room_id] = evolve(self.overrides.get(room_id, Overrides()), seal=on)
        self.log.info(f"{who} turned sealing {'on' if on else 'off'} in {room_id}")


def parse_policy_words(words: list[str], own: Overrides) -> Overrides:
    """``[members|cross-signed|off] [--invited on|off] [--dry-run on|off]`` over a room's
    overrides."""
    mode, invited, dry_run = own.mode, own.share_invited, own.dry_run
    words = list(words)
    while words:
        word = words.pop(0).lower()
        if word in ("--invited", "--dry-run"):
            if not words:
                raise ValueError(f"{word} needs on or off")
            value = on_off(words.pop(0).lower(), word)
            if word == "--invited":
                invited = value
            else:
                dry_run = value
        else:
            mode = Mode.parse(word).value
    return evolve(own, mode=mode, share_invited=invited, dry_run=dry_run)


def on_off(value: str, flag: str) -> bool:
    if value in ("on", "true", "yes"):
        return True
    if value in ("off", "false", "no"):
        return False
    raise ValueError(f"{flag} takes on or off, not {value!r}")


def describe(policy: RoomPolicy) -> list[tuple[str, str]]:
    """The policy in force, for an admin."""
    return [
        ("Shares with", MODE_TEXT[policy.mode]),
        (
            "Invited users",
            "get every seal, as members do"
            if policy.share_with_invited
            else "get the preview seals (name, topic, avatar)",
        ),
        ("Dry run", "on: decides and records, sends nothing" if policy.dry_run else "off"),
    ]


def summary(policy: RoomPolicy) -> str:
    """The policy on one line (status)."""
    return (
        f"{policy.mode.value}; invited {'on' if policy.share_with_invited else 'off'}"
        f"; dry run {'on' if policy.dry_run else 'off'}; mixed sessions "
        + ("shared as history" if policy.allow_mixed_shared_history else "never")
    )


MODE_TEXT = {
    Mode.MEMBERS: "every current member's devices (members)",
    Mode.CROSS_SIGNED: "only cross-signed devices (cross-signed)",
    Mode.OFF: "nobody (off)",
}


def _either(own: bool | None, default: Any) -> bool:
    return bool(default) if own is None else own
