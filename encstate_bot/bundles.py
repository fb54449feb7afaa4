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
import logging
from typing import Any

from attr import dataclass
from mautrix.crypto.attachments import encrypt_attachment
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import EventType

from . import protocol
from .courier import Courier
from .gather import Gatherer
from .identity import Identity
from .links import RoomLinks
from .members import Members
from .planner import bundle
from .policy import Share
from .room_keys import bundle_entry
from .store import AuditRow, OutboxItem, Store
from .tracker import Tracker
from .triggers import Trigger

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
    def __init__(
        self,
        client: Any,
        config: Any,
        store: Store,
        tracker: Tracker,
        courier: Courier,
        gather: Gatherer,
        identity: Identity,
        members: Members,
        links: RoomLinks,
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.config = config
        self.store = store
        self.tracker = tracker
        self.courier = courier
        self.gather = gather
        self.identity = identity
        self.members = members
        self.links = links
        self.log = log

    async def invite(self, room_id: str, user_id: str) -> BundleReport | None:
        """Invite a user, then send them the bundle and queue forwarded keys for clients that
        take those."""
        await self.client.invite_user(room_id, user_id)
        self.log.info(f"Invited {user_id} to {room_id}")
        await self.courier.submit(
            [OutboxItem(room_id=room_id, user_id=user_id, trigger=Trigger.BOT_INVITE)]
        )
        if not self.config["send_bundles"]:
            return None
        return await self.send(room_id, user_id)

    async def contents(self, room_id: str, user_id: str) -> tuple[list[dict], list[dict]]:
        """The bundle for someone the bot invited: (room keys, withheld), as the planner
        decides it for the membership the homeserver reports now."""
        if (
            self.tracker.ledgers.get(room_id) is None
            or not self.tracker.complete(room_id)
            or self.tracker.being_read(room_id)
        ):
            # a room whose latest events are not recorded (or whose timeline is being read
            # back) may hide messages in its sessions
            return [], []
        item = OutboxItem(room_id=room_id, user_id=user_id, trigger=Trigger.BOT_INVITE)
        context = await self.gather.room(room_id, [item])
        batch, groups = await self.gather.batch(
            context, [item], {}, self.tracker.session_source(), hold_seals=True
        )
        room_keys: list[dict] = []
        withheld: list[dict] = []
        for session_id, decision in bundle(batch, user_id):
            group_session = groups.get(session_id)
            if isinstance(decision, Share):
                if group_session is not None:
                    room_keys.append(
                        bundle_entry(group_session, room_id, session_id, decision.index)
                    )
                continue
            sender_key = group_session.sender_key if group_session is not None else ""
            code = getattr(decision, "code", protocol.UNAUTHORISED)
            withheld.append(
                protocol.withheld_content(room_id, session_id, sender_key, code, decision.reason)
            )
        return room_keys, withheld

    async def send(self, room_id: str, user_id: str) -> BundleReport:
        room_keys, withheld = await self.contents(room_id, user_id)
        blob = json.dumps({"room_keys": room_keys, "withheld": withheld}).encode()
        ciphertext, file = encrypt_attachment(blob)
        file.url = await self.client.upload_media(
            ciphertext, mime_type="application/octet-stream", filename="bundle"
        )
        content = {"room_id": room_id, "file": file.serialize()}
        devices = (await self.gather.devices({user_id})).get(user_id, {})
        targets = []
        for device in devices.values():
            if device.deleted:
                continue
            cross_signed, _ = await self.identity.trust(device)
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
                sent, _, _, _ = await self.courier.transport.olm_send(plan)
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
                trigger=str(Trigger.BUNDLE),
            )
            for device in targets
        ]
        skipped = len([d for d in devices.values() if not d.deleted]) - len(targets)
        if skipped:
            why = f"no bundle for {skipped} device(s) not cross-signed by their owner"
            rows.append(AuditRow.user_ignored(room_id, user_id, why, str(Trigger.BUNDLE)))
        await self.store.add_audit(rows)
        self.log.info(
            f"Sent {user_id} a room key bundle for {room_id}: {len(room_keys)} session(s), "
            f"{len(withheld)} withheld, {len(reached)} device(s)"
        )
        return BundleReport(len(room_keys), len(withheld), len(reached), skipped)

    # Knocks -------------------------------------------------------------------------------------

    async def on_knock(self, room_id: str, user_id: str) -> None:
        if not self.config["approve_knocks"]:
            return
        view = self.tracker.view(room_id)
        rule = view.join_rule
        if rule not in ("knock", "knock_restricted"):
            return
        invite_level = view.invite_level
        if view.user_level(self.client.mxid) < invite_level:
            self.log.info(f"Not approving {user_id}'s knock on {room_id}: bot cannot invite")
            return
        if rule == "knock_restricted":
            via = None
            for allowed in self.links.admitting_rooms(room_id):
                member = await self.members.memberships(allowed, {user_id})
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
