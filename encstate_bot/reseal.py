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
import olm

from . import protocol
from .ledger import SessionKind, StateRecord
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

    def missing_power(self, room_id: str, plan: list[tuple[StateRecord, str]]) -> str | None:
        view = self.bot.tracker.view(room_id)
        level = view.user_level(self.bot.client.mxid)
        needed = max(
            [view.state_level("m.room.encrypted")]
            + [view.state_level(rec.inner_type or "") for rec, _ in plan]
        )
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
        reply = Reply(f"{'Would reseal' if dry_run else 'Resealing'} {len(plan)} current value(s)")
        reply.table(
            ["type", "state key", "session", "index", "why"],
            [
                (r.inner_type, r.inner_key or '""', short_id(r.session_id), r.msg_index, why)
                for r, why in plan
            ],
        )
        problem = self.missing_power(room, plan)
        if problem:
            reply.line(f"Cannot reseal: {problem}.")
            await commands.reply(evt, reply)
            return
        if dry_run:
            reply.line("Dry run: nothing was sent.")
            await commands.reply(evt, reply)
            return
        progress = await commands.reply(evt, reply)
        sealed, keys_sent, devices = await self.reseal(room, [rec for rec, _ in plan])
        done = Reply(f"Resealed {sealed} value(s) in {sealed} fresh session(s)")
        done.line(
            f"Shared them with {devices} member device(s) ({keys_sent} key(s)). Newcomers now get "
            "only the new sessions; the old ones hold only superseded state."
        )
        await commands.reply(evt, done, edits=progress)

    async def reseal(self, room_id: str, records: list[StateRecord]) -> tuple[int, int, int]:
        """Re-encrypt each record's content in a fresh session; returns (values, keys, devices)."""
        crypto = self.bot.client.crypto
        source = self.bot.tracker.session_source()
        keys: list[dict[str, Any]] = []
        for rec in records:
            result = await source.decrypt(room_id, rec.session_id, rec.ciphertext)
            if not isinstance(result, Decrypted):
                self.bot.log.warning(f"Cannot reseal {rec.event_id}: it no longer decrypts")
                continue
            payload = json.loads(result.plaintext)
            outbound = olm.OutboundGroupSession()
            session_key = outbound.session_key  # exported at index 0, before any use
            inbound = InboundGroupSession(
                session_key=session_key,
                signing_key=crypto.account.signing_key,
                sender_key=crypto.account.identity_key,
                room_id=RoomID(room_id),
            )
            await crypto.crypto_store.put_group_session(
                RoomID(room_id), crypto.account.identity_key, SessionID(outbound.id), inbound
            )
            ciphertext = outbound.encrypt(
                json.dumps(
                    {
                        "type": rec.inner_type,
                        "state_key": rec.inner_key,
                        "content": payload["content"],
                        "room_id": room_id,
                    }
                )
            )
            content = {
                "algorithm": protocol.MEGOLM_ALGORITHM,
                "sender_key": crypto.account.identity_key,
                "device_id": self.bot.client.device_id,
                "session_id": outbound.id,
                "ciphertext": ciphertext,
            }
            await self.bot.client.api.request(
                Method.PUT,
                Path.v3.rooms[room_id].state["m.room.encrypted"][rec.outer_key],
                content,
            )
            keys.append(
                {
                    "algorithm": protocol.MEGOLM_ALGORITHM,
                    "room_id": room_id,
                    "session_id": outbound.id,
                    "session_key": session_key,
                }
            )
            self.bot.log.info(
                f"Resealed {rec.inner_type} {rec.inner_key!r} of {room_id} from session "
                f"{rec.session_id} into {outbound.id}"
            )
        members = await self.bot.pushes.joined_members(room_id)
        keys_sent, devices = await self.bot.courier.send_room_keys(
            room_id, keys, members, trigger="reseal"
        )
        return len(keys), keys_sent, devices
