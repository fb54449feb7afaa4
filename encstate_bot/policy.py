"""One decision per (device, session): share from an index, withhold with a code, or ignore.

Pure: every input is a value, the output is a value with a reason a human can read. This is the
decision tree (the only drawing of it; the README and docs/architecture.md point here), in the
order of the checks:

    bot's power level does not exceed users_default ........... Ignore (silent, logged)
    room policy "off" ......................................... Ignore
    requester banned or kicked from the room .................. Withhold m.unauthorised
    requester not joined, invited, nor admitted through a room  Withhold m.unauthorised
    device unknown to the homeserver .......................... Ignore
    device blacklisted ........................................ Withhold m.blacklisted
    policy "cross-signed" and device not cross-signed ......... Withhold m.unverified
      (cross-signed: by an identity trusted on first use; a changed identity does not count)
  a seal (the bot's own one-value session, decide_seal):
    its value is no longer current ............................ Withhold m.unauthorised
    not a preview type, and the requester is not joined
      (nor invited by the bot, nor an invitee where
      share_with_invited is on) ............................... Withhold m.unauthorised
    otherwise ................................................. Share from index 0 (m.room_key)
  anyone else's session (decide):
    requester not joined ...................................... Withhold m.unauthorised
    session unknown, or named only by state the bot
      cannot read yet ......................................... Withhold m.unavailable
    session only encrypts messages ............................ Withhold m.unauthorised
    session also encrypts messages (unless shared history) .... Withhold m.unauthorised
    the bot does not hold the session ......................... Withhold m.unavailable
    session holds only superseded state ....................... Withhold m.unauthorised
    indices after the safe index the bot never saw decrypt .... Withhold m.unauthorised
    otherwise ................................................. Share from the safe index

The planner (``planner.py``) applies the tree to a batch and adds the batch rules: never the
bot's own account; unasked pushes to someone not joined carry only the seals within their reach
and say nothing of the rest; never the same (device, session, index) twice unasked; a request
after a push that refused the same key gets the refusal itself; a dry run turns every share into
an ignore.
"""

from __future__ import annotations

from attr import dataclass

from . import protocol
from .ledger import SessionFacts, SessionKind
from .room_policy import Mode, RoomPolicy

__all__ = ["Mode", "RoomPolicy"]  # re-exported: the policy's inputs


# The words every refusal for a changed cross-signing identity carries (the audit counts them).
IDENTITY_CHANGED = "cross-signing identity changed"


@dataclass(frozen=True)
class RoomFacts:
    room_id: str
    bot_level: int
    users_default: int
    history_visibility: str | None = None
    policy: RoomPolicy = RoomPolicy()
    # part of the timeline since the bot first read it is not read yet (a cut read, resumed at
    # the next start): a message of any session may lie there
    history_unread: bool = False

    @property
    def empowered(self) -> bool:
        return self.bot_level > self.users_default


def counts_as_member(policy: RoomPolicy, membership: str | None) -> bool:
    """Joined, or invited where the room's policy counts invitees as members: who gets every
    seal, and whose membership in an admitting room admits them."""
    return membership == "join" or (membership == "invite" and policy.share_with_invited)


@dataclass(frozen=True)
class Requester:
    user_id: str
    device_id: str
    # "join", "invite", "leave", "ban", "knock" or None (never a member)
    membership: str | None
    # a room whose membership a restricted join rule of this room admits the user through
    admitted_via: str | None = None
    # the bot itself invited them (an admin's `!encstate invite`, or an approved knock)
    invited_by_bot: bool = False
    device_known: bool = True
    blacklisted: bool = False
    # cross-signed by the owner's identity, trusted on first use (or verified)
    cross_signed: bool = False
    # the owner cross-signed it, but with an identity that changed since the bot first saw it
    identity_changed: bool = False
    # banned from this room, or kicked (left by someone else's hand): beats every admission
    removed: bool = False


@dataclass(frozen=True)
class HeldSession:
    first_known_index: int
    shared_history: bool = False


@dataclass(frozen=True)
class SealFacts:
    """One of the bot's own seals, as the policy sees it."""

    event_type: str
    preview: bool  # name, topic, avatar (or the configured preview types)
    live: bool  # it opens the current value of its key


ALL = "all"
PREVIEW = "preview"


@dataclass(frozen=True)
class Share:
    index: int
    reason: str
    exposed: tuple[str, ...] = ()  # superseded events still readable from this index


@dataclass(frozen=True)
class Withhold:
    code: str
    reason: str


@dataclass(frozen=True)
class Ignore:
    reason: str


Decision = Share | Withhold | Ignore


def admit_device(room: RoomFacts, who: Requester) -> Withhold | Ignore | None:
    """The checks about the room and the device, whatever the session: None if this device may
    hold the room's state keys. Also decides who gets the bot's own sessions."""
    if not room.empowered:
        return Ignore(
            f"the bot's power level {room.bot_level} does not exceed users_default "
            f"{room.users_default} in {room.room_id}"
        )
    if room.policy.mode == Mode.OFF:
        return Ignore("the room's policy is off")

    if who.membership == "ban" or who.removed:
        how = "banned from" if who.membership == "ban" else "removed from"
        state = who.membership or "not joined"
        return Withhold(
            protocol.UNAUTHORISED,
            f"{who.user_id} is not a member ({state}): {how} this room, which no admission "
            "through another room overrides",
        )
    if who.membership == "join":
        pass
    elif who.membership == "invite":
        pass  # the preview seals at least (see reach)
    elif who.admitted_via:
        pass
    else:
        state = who.membership or "not joined"
        return Withhold(protocol.UNAUTHORISED, f"{who.user_id} is not a member ({state})")

    if not who.device_known:
        return Ignore(f"device {who.device_id} of {who.user_id} is unknown to the homeserver")
    if who.blacklisted:
        return Withhold(protocol.BLACKLISTED, "this device is blacklisted")
    if room.policy.mode == Mode.CROSS_SIGNED and not who.cross_signed:
        if who.identity_changed:
            return Withhold(
                protocol.UNVERIFIED,
                f"{who.user_id}'s {IDENTITY_CHANGED} since the bot first saw it",
            )
        return Withhold(
            protocol.UNVERIFIED, "this room shares state keys only with cross-signed devices"
        )
    return None


def reach(room: RoomFacts, who: Requester) -> str:
    """Which seals a device that passed ``admit_device`` may hold: ALL of them (a joined
    member, someone the bot invited, an invitee where invitees count as members) or the
    PREVIEW ones (name, topic, avatar: any other invitee, a member of an admitting room)."""
    if counts_as_member(room.policy, who.membership):
        return ALL
    if who.membership == "invite" and who.invited_by_bot:
        return ALL
    return PREVIEW


def decide_seal(room: RoomFacts, who: Requester, seal: SealFacts) -> Decision:
    """One of the bot's seals: it opens exactly one event, so it may go to anyone who may read
    that value, from index 0."""
    refused = admit_device(room, who)
    if refused is not None:
        return refused
    if not seal.live:
        return Withhold(protocol.UNAUTHORISED, "this seal's value is no longer current")
    if not seal.preview and reach(room, who) == PREVIEW:
        return Withhold(
            protocol.UNAUTHORISED,
            f"{who.user_id} is not a member ({who.membership or 'not joined'}): before joining, "
            "only the preview state (name, topic, avatar) is shared",
        )
    return Share(index=0, reason=f"seal of {seal.event_type}, the current value")


def decide(
    room: RoomFacts,
    who: Requester,
    session: SessionFacts,
    held: HeldSession | None,
) -> Decision:
    refused = admit_device(room, who)
    if refused is not None:
        return refused
    if who.membership != "join":
        # Another user's session may encrypt anything later (Element mixes state and
        # messages): only joined members, who read what it encrypts anyway, get it.
        return Withhold(
            protocol.UNAUTHORISED,
            f"{who.user_id} is not a member ({who.membership or 'not joined'}): sessions the "
            "bot did not create go only to joined members; others get its seals",
        )

    if session.kind == SessionKind.UNKNOWN:
        return Withhold(protocol.UNAVAILABLE, "no encrypted state in this room uses this session")
    if room.history_unread:
        return Withhold(
            protocol.UNAVAILABLE,
            "part of this room's timeline is not read yet (a read cut short by backfill_limit, "
            "resumed at the next start): it may hold messages of this session",
        )
    if session.kind == SessionKind.PENDING:
        return Withhold(protocol.UNAVAILABLE, "the bot does not hold this session yet")
    if session.kind == SessionKind.MESSAGE:
        return Withhold(protocol.UNAUTHORISED, "this session encrypts messages, not state")
    if session.kind == SessionKind.MIXED:
        visible = room.history_visibility in protocol.HISTORY_VISIBLE_TO_NEWCOMERS
        flagged = held is not None and held.shared_history
        if not (room.policy.allow_mixed_shared_history and flagged and visible):
            return Withhold(
                protocol.UNAUTHORISED,
                "this session also encrypts messages "
                f"(at indices {_indices(session.message_indices)})",
            )
    if held is None:
        return Withhold(protocol.UNAVAILABLE, "the bot does not hold this session")
    if session.safe_index is None:
        return Withhold(protocol.UNAUTHORISED, "this session holds only superseded state")
    if session.gaps:
        return Withhold(
            protocol.UNAUTHORISED,
            f"indices {_indices(session.gaps)} of this session were never seen to decrypt; "
            "they may hold messages",
        )
    index = max(session.safe_index, held.first_known_index)
    exposed = tuple(rec.event_id for rec in session.exposed if (rec.msg_index or 0) >= index)
    reason = f"state session, {len(session.current)} current event(s), safe index {index}"
    if exposed:
        reason += f"; {len(exposed)} superseded value(s) above it stay readable"
    if session.kind == SessionKind.MIXED:
        reason += "; mixed session shared as shared history"
    return Share(index=index, reason=reason, exposed=exposed)


def _indices(values: frozenset[int] | tuple[int, ...]) -> str:
    ordered = sorted(values)
    shown = ", ".join(str(i) for i in ordered[:8])
    return shown + (f" and {len(ordered) - 8} more" if len(ordered) > 8 else "")
