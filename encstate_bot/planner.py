"""The planner: every decision for a batch, from facts already gathered. Pure.

``policy.decide`` and ``policy.decide_seal`` judge one (device, session); the planner applies
them to a batch of queued items and adds the rules about batches: which devices and sessions an
item stands for, never the bot's own account, nothing to someone not joined that nobody asked
for except the seals within their reach, never the same (device, session, index) pushed twice
unasked, and a dry run turning every share into an ignore. ``approve`` says which devices may
hold the bot's own sessions (the sealer, private replies); ``bundle`` what a room key bundle
for someone the bot invited carries.
"""

from __future__ import annotations

from attr import dataclass

from . import protocol
from .ledger import SessionFacts, SessionKind
from .policy import (
    PREVIEW,
    Decision,
    HeldSession,
    Ignore,
    Requester,
    RoomFacts,
    SealFacts,
    Share,
    Withhold,
    admit_device,
    decide,
    decide_seal,
    reach,
)
from .store import OutboxItem
from .triggers import UNASKED, Trigger


@dataclass(frozen=True)
class DeviceFacts:
    device_id: str
    known: bool = True  # the homeserver lists it
    deleted: bool = False  # listed once, gone now
    blacklisted: bool = False
    cross_signed: bool = False  # read only where the room's policy asks for it
    identity_changed: bool = False


@dataclass(frozen=True)
class UserFacts:
    membership: str | None  # None: never a member
    removed: bool = False  # banned, or kicked by someone else
    admitted_via: str | None = None  # a room the join rule admits them through, now
    devices: tuple[DeviceFacts, ...] = ()


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    seal: SealFacts | None = None  # one of the bot's seals
    facts: SessionFacts | None = None  # anyone else's session, as the ledger sees it
    held: HeldSession | None = None  # and as the bot holds it (None: not held)


@dataclass(frozen=True)
class RoomBatch:
    """What the decisions in one room depend on, read for one batch."""

    room: RoomFacts
    users: dict[str, UserFacts]
    sessions: dict[str, SessionInfo]
    shareable: tuple[str, ...]  # what an item naming no session stands for


@dataclass(frozen=True)
class Planned:
    item: OutboxItem
    device_id: str
    session_id: str
    decision: Decision


@dataclass(frozen=True)
class Approval:
    user_id: str
    device_id: str
    decision: Withhold | Ignore | None  # None: approved
    reach: str  # policy.ALL or policy.PREVIEW (for an approved device)
    membership: str


def requester(
    user_id: str, user: UserFacts, device: DeviceFacts, invited_by_bot: bool = False
) -> Requester:
    return Requester(
        user_id=user_id,
        device_id=device.device_id,
        membership=user.membership,
        admitted_via=user.admitted_via,
        invited_by_bot=invited_by_bot,
        device_known=device.known,
        blacklisted=device.blacklisted,
        cross_signed=device.cross_signed,
        identity_changed=device.identity_changed,
        removed=user.removed,
    )


def unknown_session(session_id: str) -> SessionInfo:
    return SessionInfo(session_id, facts=SessionFacts(session_id, SessionKind.UNKNOWN))


def plan(
    own_user: str,
    batch: RoomBatch,
    items: list[OutboxItem],
    delivered: set[tuple[str, str, str, int]],
    dry_run: bool = False,
) -> list[Planned]:
    """One decision per (user, device, session) the items stand for, in item order: the first
    item that decides a key keeps it, but a request (or an admin's share) after a push that
    refused the same key takes the refusal over, since only a request is told why."""
    room = batch.room
    planned: list[Planned] = []
    # key -> its decision's place in ``planned``, and whether an asked item may take it over
    # (an unasked item refused it: only a request is told why, with a withheld notice)
    seen: dict[tuple[str, str, str], tuple[int, bool]] = {}
    for item in items:
        if item.user_id == own_user:
            continue  # the bot's own devices: mautrix's own key sharing serves those
        user = batch.users.get(item.user_id, UserFacts(None))
        if item.device_id:
            found = [d for d in user.devices if d.device_id == item.device_id]
            targets = found[:1] or [DeviceFacts(item.device_id, known=False)]
        else:
            targets = [d for d in user.devices if not d.deleted]
        sessions = [item.session_id] if item.session_id else list(batch.shareable)
        unasked = item.trigger in UNASKED
        for session_id in sessions:
            info = batch.sessions.get(session_id) or unknown_session(session_id)
            for device in targets:
                key = (item.user_id, device.device_id, session_id)
                earlier, replaceable = seen.get(key, (None, False))
                if earlier is not None and (unasked or not replaceable):
                    continue  # decided already in this batch
                who = requester(item.user_id, user, device, item.trigger == Trigger.BOT_INVITE)
                if unasked and who.membership != "join":
                    # Unasked, someone not joined gets the seals within their reach and hears
                    # nothing about the rest.
                    if info.seal is None or not (info.seal.preview or reach(room, who) != PREVIEW):
                        continue
                if info.seal is not None:
                    decision = decide_seal(room, who, info.seal)
                else:
                    facts = info.facts or SessionFacts(session_id, SessionKind.UNKNOWN)
                    decision = decide(room, who, facts, info.held)
                if (
                    isinstance(decision, Share)
                    and unasked
                    and (item.user_id, device.device_id, session_id, decision.index) in delivered
                ):
                    continue  # never push the same (device, session, index) twice unasked
                replaceable = unasked and not isinstance(decision, Share)
                if isinstance(decision, Share) and (dry_run or room.policy.dry_run):
                    decision = Ignore(
                        f"dry run: would share from index {decision.index} ({decision.reason})"
                    )
                # Seen only once decided: an unasked item's silence never hides a later asked
                # item for the same key in the batch.
                if earlier is not None:
                    planned[earlier] = Planned(item, device.device_id, session_id, decision)
                    seen[key] = (earlier, False)
                    continue
                seen[key] = (len(planned), replaceable)
                planned.append(Planned(item, device.device_id, session_id, decision))
    return planned


def approve(
    own: tuple[str, str], room: RoomFacts, users: dict[str, UserFacts], user_ids: list[str]
) -> list[Approval]:
    """Which devices of these users may hold the bot's own sessions in this room (the room and
    device checks of the policy), with which seals; the others with the refusal. ``own``: the
    bot's (user, device), which never needs its own keys."""
    approvals: list[Approval] = []
    for user_id in dict.fromkeys(user_ids):
        user = users.get(user_id, UserFacts(None))
        for device in user.devices:
            if device.deleted or (user_id, device.device_id) == own:
                continue
            who = requester(user_id, user, device)
            refusal = admit_device(room, who)
            approvals.append(
                Approval(
                    user_id,
                    device.device_id,
                    refusal,
                    reach(room, who) if refusal is None else PREVIEW,
                    who.membership or "",
                )
            )
    return approvals


def bundle(batch: RoomBatch, user_id: str) -> list[tuple[str, Decision]]:
    """What a room key bundle for someone the bot invited carries, per shareable session: a
    bundle goes only to cross-signed devices, for the membership the homeserver reports now.
    With dry run on it carries no keys."""
    user = batch.users.get(user_id, UserFacts(None))
    who = requester(user_id, user, DeviceFacts("", cross_signed=True), invited_by_bot=True)
    decisions: list[tuple[str, Decision]] = []
    for session_id in batch.shareable:
        info = batch.sessions.get(session_id) or unknown_session(session_id)
        if info.seal is not None:
            decision = decide_seal(batch.room, who, info.seal)
        else:
            facts = info.facts or SessionFacts(session_id, SessionKind.UNKNOWN)
            decision = decide(batch.room, who, facts, info.held)
        if isinstance(decision, Share) and batch.room.policy.dry_run:
            decision = Withhold(
                protocol.UNAUTHORISED, f"dry run: would share from index {decision.index}"
            )
        decisions.append((session_id, decision))
    return decisions


# What waits for a key: asked for, or pushed to a joined member, while the bot cannot read the
# state the session carries (it lacks the key). Sessions nobody's state names are never kept.
# Invitees and members of admitting rooms get only the bot's seals, which it always holds, so
# only requests and joins can find a key missing.
WAIT_TRIGGERS = frozenset({Trigger.REQUEST, Trigger.JOIN})


def waiting_for_keys(batch: RoomBatch, planned: list[Planned]) -> list[OutboxItem]:
    """The deliveries to try again when a session's key arrives: one per (device, session)
    refused only because the bot does not hold the key yet."""
    waits: list[OutboxItem] = []
    for p in planned:
        info = batch.sessions.get(p.session_id)
        if (
            p.item.trigger not in WAIT_TRIGGERS
            or not isinstance(p.decision, Withhold)
            or p.decision.code != protocol.UNAVAILABLE
            or info is None
            or info.facts is None
            or info.facts.kind != SessionKind.PENDING
        ):
            continue
        waits.append(
            OutboxItem(
                room_id=p.item.room_id,
                user_id=p.item.user_id,
                trigger=p.item.trigger,
                device_id=p.device_id,
                session_id=p.session_id,
                request_id=p.item.request_id,
                via=p.item.via,
            )
        )
    return waits
