"""Room key bundles (MSC4268): how Element's clients accept another user's room keys.

Element Web and Element X take room keys from another user only as a bundle from the user who
invited them: the inviter uploads an encrypted blob of exported sessions, then sends each of the
invitee's devices an Olm message pointing at it, from a cross-signed device whose Olm messages
carry its device keys (MSC4147). So the bot invites (`!encstate invite`, approved knocks) and
sends a bundle of the room's seals (the bot's own sessions for the current values), with the
sessions the policy refuses listed as withheld: sessions the bot did not create go only to
joined members, never into a bundle for an invitee.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from attr import dataclass
from mautrix.crypto.attachments import encrypt_attachment
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import EventType

from . import protocol
from .courier import BOT_INVITE
from .policy import Requester, Share, Withhold, decide, decide_seal
from .seals import seal_facts
from .store import AuditRow, OutboxItem

if TYPE_CHECKING:
    from .bot import EncStateBot

BUNDLE_TYPES = (
    EventType.find("m.room_key_bundle", EventType.Class.TO_DEVICE),
    EventType.find("io.element.msc4268.room_key_bundle", EventType.Class.TO_DEVICE),
)


@dataclass(frozen=True)
class BundleReport:
    room_keys: int
    withheld: int
    devices: int
    skipped_devices: int  # devices not cross-signed by their owner, which get no bundle


class Bundles:
    def __init__(self, bot: EncStateBot) -> None:
        self.bot = bot

    @property
    def log(self) -> Any:
        return self.bot.log

    async def invite(self, room_id: str, user_id: str) -> BundleReport | None:
        """Invite a user, then send them the bundle and queue forwarded keys for clients that
        take those."""
        await self.bot.client.invite_user(room_id, user_id)
        self.log.info(f"Invited {user_id} to {room_id}")
        await self.bot.courier.submit(
            [OutboxItem(room_id=room_id, user_id=user_id, trigger=BOT_INVITE)]
        )
        if not self.bot.config["send_bundles"]:
            return None
        return await self.send(room_id, user_id)

    async def contents(self, room_id: str, user_id: str) -> tuple[list[dict], list[dict]]:
        """The bundle for someone the bot invited: (room keys, withheld), from the policy, for
        the membership the homeserver reports now (not the one the invite assumed), as a
        cross-signed device (bundles go to no other). With dry run on it carries no keys."""
        bot = self.bot
        ledger = bot.tracker.ledgers.get(room_id)
        if ledger is None or not bot.tracker.complete(room_id):
            # a room whose latest events are not recorded may hide messages in its sessions
            return [], []
        item = OutboxItem(room_id=room_id, user_id=user_id, trigger=BOT_INVITE)
        context = await bot.courier.room_context(room_id, [item])
        source = bot.tracker.session_source()
        who = Requester(
            user_id=user_id,
            device_id="",
            membership=context.memberships.get(user_id),
            invited_by_bot=True,
            cross_signed=True,
            removed=user_id in context.removed,
        )
        room_keys: list[dict] = []
        withheld: list[dict] = []
        seals = bot.courier.seals
        live, others = seals.shareable(ledger)
        preview = bot.courier.preview_types()
        for session_id in list(live) + others:
            seal = live.get(session_id)
            group_session, held = await bot.courier.held(source, room_id, session_id)
            if seal is not None:
                decision = decide_seal(
                    context.facts,
                    who,
                    seal_facts(seal, True, preview),
                )
            else:
                decision = decide(context.facts, who, ledger.facts(session_id), held)
            if isinstance(decision, Share) and context.policy.dry_run:
                decision = Withhold(
                    protocol.UNAUTHORISED, f"dry run: would share from index {decision.index}"
                )
            sender_key = group_session.sender_key if group_session is not None else ""
            if isinstance(decision, Share) and group_session is not None:
                room_keys.append(
                    {
                        "algorithm": protocol.MEGOLM_ALGORITHM,
                        "room_id": room_id,
                        "sender_key": sender_key,
                        "session_id": session_id,
                        "session_key": group_session.export_session(decision.index),
                        "sender_claimed_keys": {"ed25519": group_session.signing_key},
                        "forwarding_curve25519_key_chain": list(
                            group_session.forwarding_chain or []
                        ),
                        "shared_history": True,
                    }
                )
            elif not isinstance(decision, Share):
                code = getattr(decision, "code", protocol.UNAUTHORISED)
                withheld.append(
                    protocol.withheld_content(
                        room_id, session_id, sender_key, code, decision.reason
                    )
                )
        return room_keys, withheld

    async def send(self, room_id: str, user_id: str) -> BundleReport:
        bot = self.bot
        room_keys, withheld = await self.contents(room_id, user_id)
        blob = json.dumps({"room_keys": room_keys, "withheld": withheld}).encode()
        ciphertext, file = encrypt_attachment(blob)
        file.url = await bot.client.upload_media(
            ciphertext, mime_type="application/octet-stream", filename="bundle"
        )
        content = {"room_id": room_id, "file": file.serialize()}
        devices = (await bot.courier.bulk.devices({user_id})).get(user_id, {})
        targets = []
        for device in devices.values():
            if device.deleted:
                continue
            cross_signed, _ = await bot.courier.trust(device)
            if cross_signed:
                targets.append(device)
        plan = [
            (device, event_type, content, (device, event_type))
            for device in targets
            for event_type in BUNDLE_TYPES
        ]
        sent: list[Any] = []
        if plan:
            try:
                sent, _, _, _ = await bot.courier.olm_send(plan)
            except (MatrixRequestError, MatrixConnectionError) as e:
                self.log.warning(f"Could not send the room key bundle to {user_id}: {e}")
        reached = {device.device_id for device, _ in sent}
        reason = f"room key bundle: {len(room_keys)} session(s), {len(withheld)} withheld" + (
            f" ({'; '.join(w['reason'] for w in withheld[:3])})" if withheld else ""
        )
        rows = [
            AuditRow(
                room_id=room_id,
                user_id=user_id,
                device_id=device.device_id,
                session_id=None,
                decision="share" if device.device_id in reached else "ignore",
                reason=reason if device.device_id in reached else f"{reason}; not delivered",
                trigger="bundle",
            )
            for device in targets
        ]
        skipped = len([d for d in devices.values() if not d.deleted]) - len(targets)
        if skipped:
            why = f"no bundle for {skipped} device(s) not cross-signed by their owner"
            rows.append(AuditRow.user_ignored(room_id, user_id, why, "bundle"))
        await bot.store.add_audit(rows)
        self.log.info(
            f"Sent {user_id} a room key bundle for {room_id}: {len(room_keys)} session(s), "
            f"{len(withheld)} withheld, {len(reached)} device(s)"
        )
        return BundleReport(len(room_keys), len(withheld), len(reached), skipped)

    # Knocks -------------------------------------------------------------------------------------

    async def on_knock(self, room_id: str, user_id: str) -> None:
        bot = self.bot
        if not bot.config["approve_knocks"]:
            return
        view = bot.tracker.view(room_id)
        rule = view.join_rule
        if rule not in ("knock", "knock_restricted"):
            return
        invite_level = view.invite_level
        if view.user_level(bot.client.mxid) < invite_level:
            self.log.info(f"Not approving {user_id}'s knock on {room_id}: bot cannot invite")
            return
        if rule == "knock_restricted":
            via = None
            for allowed in bot.pushes.admitting_rooms(room_id):
                member = await bot.courier.memberships(allowed, {user_id})
                if member.get(user_id) == "join":
                    via = allowed
                    break
            if via is None:
                self.log.info(
                    f"Not approving {user_id}'s knock on {room_id}: not a member of a room its "
                    "join rule allows (or the bot is not in one)"
                )
                return
        self.log.info(f"Approving {user_id}'s knock on {room_id}")
        try:
            await self.invite(room_id, user_id)
        except (MatrixRequestError, MatrixConnectionError) as e:
            self.log.warning(f"Could not approve {user_id}'s knock on {room_id}: {e}")
