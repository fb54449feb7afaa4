"""Resealing: where no export index can hide superseded values or messages, the bot re-encrypts
the room's *current* state itself, one fresh megolm session per (type, state key), and shares
those sessions with the current members. From then on the old sessions hold only superseded
state, so newcomers get only the new ones (the safe-index rule does that by itself)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from maubot import MessageEvent
from mautrix.api import Method, Path
from mautrix.crypto.sessions import InboundGroupSession
from mautrix.types import RoomID, SessionID

from .ledger import SessionKind, StateRecord
from .own_sessions import OwnEvent, encrypt_once
from .policy import Mode
from .render import Reply, short_id
from .tracker import Decrypted

if TYPE_CHECKING:
    from .bot import EncStateBot
    from .commands import Commands


def reseal_plan(ledger: Any) -> list[tuple[StateRecord, str]]:
    """Current state records that sit in sessions no export index can make safe, with why."""
    plan = []
    for session_id in sorted(ledger.sessions()):
        facts = ledger.facts(session_id)
        why = None
        if facts.kind == SessionKind.MIXED:
            why = "its session also encrypts messages"
        elif facts.exposed:
            why = f"{len(facts.exposed)} superseded value(s) above the safe index"
        elif facts.gaps:
            why = "its session has indices the bot never saw"
        if why:
            plan += [(rec, why) for rec in facts.current]
    return plan


class Resealer:
    def __init__(self, bot: EncStateBot) -> None:
        self.bot = bot

    def needed_level(self, room_id: str, plan: list[tuple[StateRecord, str]]) -> int:
        """The power level it takes to send this state (the outer type and every inner one)."""
        view = self.bot.tracker.view(room_id)
        return max(
            [view.state_level("m.room.encrypted")]
            + [view.state_level(rec.inner_type or "") for rec, _ in plan]
        )

    def missing_power(self, room_id: str, plan: list[tuple[StateRecord, str]]) -> str | None:
        level = self.bot.tracker.view(room_id).user_level(self.bot.client.mxid)
        needed = self.needed_level(room_id, plan)
        if level < needed:
            return f"resealing needs power level {needed} to send this state; the bot has {level}"
        return None

    async def command(self, commands: Commands, evt: MessageEvent, args: list[str]) -> None:
        room = evt.room_id
        dry_run = "--dry-run" in args
        ledger = self.bot.tracker.ledgers.get(room)
        plan = reseal_plan(ledger) if ledger else []
        if not plan:
            await commands.reply(
                evt, Reply().line("Nothing to reseal: every current value is sealed already.")
            )
            return
        needed = self.needed_level(room, plan)
        sender_level = self.bot.tracker.view(room).user_level(evt.sender)
        if sender_level < needed:
            await commands.reply(
                evt,
                Reply().line(
                    f"Sorry, resealing sends this room's state, which takes power level "
                    f"{needed}; you have {sender_level}."
                ),
            )
            return
        policy = self.bot.room_policy(room)
        dry_run = dry_run or policy.dry_run
        reply = Reply(f"{'Would reseal' if dry_run else 'Resealing'} {len(plan)} current value(s)")
        reply.table(
            ["type", "state key", "session", "index", "why"],
            [
                (r.inner_type, r.inner_key or '""', short_id(r.session_id), r.msg_index, why)
                for r, why in plan
            ],
        )
        problem = self.missing_power(room, plan)
        if problem is None and policy.mode == Mode.OFF:
            problem = "the room's policy is off, so the new sessions could go to nobody"
        if problem:
            reply.line(f"Cannot reseal: {problem}.")
            await commands.reply(evt, reply)
            return
        if dry_run:
            reply.line("Dry run: nothing was sent.")
            await commands.reply(evt, reply)
            return
        progress = await commands.reply(evt, reply)
        members = await self.bot.pushes.joined_members(room)
        devices, refused, _ = await self.bot.courier.approved_devices(room, members)
        await self.bot.store.add_audit(refused)
        sealed, keys_sent, reached = await self.reseal(room, [rec for rec, _ in plan], devices)
        done = Reply(f"Resealed {sealed} value(s) in {sealed} fresh session(s)")
        done.line(
            f"Shared them with {reached} member device(s) ({keys_sent} key(s)) before sending "
            "the new state; newcomers now get only the new sessions, and the old ones hold only "
            "superseded state."
        )
        if refused:
            done.line(f"{len(refused)} device(s) the room's policy refuses got nothing.")
        await commands.reply(evt, done, edits=progress)

    async def reseal(
        self, room_id: str, records: list[StateRecord], devices: list[Any]
    ) -> tuple[int, int, int]:
        """Re-encrypt each record's content in a fresh session, hand the new keys to
        ``devices`` first, then send the state; returns (values, keys, devices reached)."""
        crypto = self.bot.client.crypto
        source = self.bot.tracker.session_source()
        made: list[tuple[StateRecord, OwnEvent]] = []
        for rec in records:
            result = await source.decrypt(room_id, rec.session_id, rec.ciphertext)
            if not isinstance(result, Decrypted):
                self.bot.log.warning(f"Cannot reseal {rec.event_id}: it no longer decrypts")
                continue
            content = json.loads(result.plaintext)["content"]
            own = encrypt_once(
                room_id,
                {"type": rec.inner_type, "state_key": rec.inner_key, "content": content},
                crypto.account.identity_key,
                self.bot.client.device_id,
            )
            inbound = InboundGroupSession(
                session_key=own.room_key["session_key"],
                signing_key=crypto.account.signing_key,
                sender_key=crypto.account.identity_key,
                room_id=RoomID(room_id),
            )
            await crypto.crypto_store.put_group_session(
                RoomID(room_id), crypto.account.identity_key, SessionID(own.session_id), inbound
            )
            made.append((rec, own))
        # Keys first: a client that sees the new state before its key cannot read it.
        keys_sent, reached = await self.bot.courier.send_room_keys(
            room_id,
            [own.room_key for _, own in made],
            devices,
            trigger="reseal",
            reason="the bot's own session for resealed state",
        )
        for rec, own in made:
            await self.bot.client.api.request(
                Method.PUT,
                Path.v3.rooms[room_id].state["m.room.encrypted"][rec.outer_key],
                own.content,
            )
            self.bot.log.info(
                f"Resealed {rec.inner_type} {rec.inner_key!r} of {room_id} from session "
                f"{rec.session_id} into {own.session_id}"
            )
        return len(made), keys_sent, reached
