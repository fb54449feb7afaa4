"""The command gate: who may run which ``!encstate`` command, and whether a message counts at
all (in an encrypted room only an encrypted message, in a session made by a device of its
sender)."""

from __future__ import annotations

from typing import Any

from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import IdentityKey, RoomID, SessionID, TrustState, UserID

from .intake import Origins
from .room_policy import Mode, RoomPolicies
from .tracker import Tracker

# Who may run what: "read" (read_only_commands), "manage" (state_default or a configured admin),
# or "own": the power the action itself needs, for everyone (invite: the room's invite level,
# checked in refusal(); seal: read for showing, manage for on/off, and the power to send the
# state for "now", checked by the handler).
ACCESS = {
    "help": "read",
    "status": "read",
    "audit": "read",
    "links": "read",
    "log": "read",
    "state": "manage",
    "policy": "manage",
    "share": "manage",
    "seal": "own",
    "reseal": "own",
    "invite": "own",
}


def origin_refusal(encrypted_room: bool, origin: dict[str, Any] | None, mode: Mode) -> str | None:
    """Why a command's message must not be obeyed, from how it arrived (None: obey it). In an
    encrypted room a command counts only encrypted, in a session made by a device of its sender
    (not forwarded, not an unknown device, not blacklisted); under the cross-signed policy only
    from a device cross-signed by an identity trusted on first use."""
    if not encrypted_room:
        return None
    if not origin or not origin.get("was_encrypted"):
        return "commands in this encrypted room must be sent encrypted"
    trust = origin.get("trust_state")
    if origin.get("forwarded_keys") or trust in (
        TrustState.UNKNOWN_DEVICE,
        TrustState.FORWARDED,
        None,
    ):
        return "the message's session was not made by a device of its sender"
    if trust == TrustState.BLACKLISTED:
        return "the sending device is blacklisted"
    if mode == Mode.CROSS_SIGNED and trust < TrustState.CROSS_SIGNED_TOFU:
        return "this room takes commands only from cross-signed devices"
    return None


class Gate:
    def __init__(
        self,
        client: Any,
        config: Any,
        tracker: Tracker,
        policies: RoomPolicies,
        origins: Origins,
    ) -> None:
        self.client = client
        self.config = config
        self.tracker = tracker
        self.policies = policies
        self.origins = origins

    def can_manage(self, room_id: str, user_id: str) -> bool:
        if user_id in self.config["admins"]:
            return True
        view = self.tracker.view(room_id)
        return view.user_level(user_id) >= view.state_default

    def can_read(self, room_id: str, user_id: str) -> bool:
        if self.config["read_only_commands"] == "members":
            return True
        return self.can_manage(room_id, user_id)

    def manage_refusal(self, room_id: str, name: str) -> str:
        level = self.tracker.view(room_id).state_default
        return (
            f"Sorry, {name} is for room admins (power level {level} or more) and encstate's "
            "configured admins."
        )

    async def refusal(self, room: str, user: str, event_id: str, name: str) -> str | None:
        """Why this sender may not run this command here (None: they may)."""
        view = self.tracker.view(room)
        # Until the room's state is read (a start, a failed read), treat it as encrypted:
        # the gate must fail closed. The client's own state store counts too.
        state_store = getattr(self.client, "state_store", None)
        encrypted = view.encryption is not None or not view.known
        if not encrypted and state_store is not None:
            try:
                encrypted = bool(await state_store.is_encrypted(RoomID(room)))
            except Exception:
                encrypted = True
        origin = origin_refusal(
            encrypted,
            await self.command_origin(room, event_id, user),
            self.policies.get(room).mode,
        )
        if origin is not None:
            return f"encstate did not act on this: {origin}."
        access = ACCESS[name]
        if (access == "read" and not self.can_read(room, user)) or (
            access == "manage" and not self.can_manage(room, user)
        ):
            return self.manage_refusal(room, name)
        if name == "invite" and view.user_level(user) < view.invite_level:
            return (
                f"Sorry, inviting takes this room's invite power level {view.invite_level}; "
                f"you have {view.user_level(user)}."
            )
        return None

    async def command_origin(self, room_id: str, event_id: str, sender: str) -> dict | None:
        """How a command's message arrived: None if not encrypted, else whether its session
        was forwarded and the trust of the device of ``sender`` that made it (UNKNOWN_DEVICE
        when no device of the sender has the session's key)."""
        session_id = self.origins.session_of(event_id)
        crypto = self.client.crypto
        if session_id is None or crypto is None:
            return None
        try:
            session = await crypto.crypto_store.get_group_session(
                RoomID(room_id), SessionID(session_id)
            )
        except Exception:
            session = None
        if session is None:
            return {"was_encrypted": True, "trust_state": TrustState.UNKNOWN_DEVICE}
        try:
            device = await crypto.get_or_fetch_device_by_key(
                UserID(sender), IdentityKey(session.sender_key)
            )
        except (MatrixRequestError, MatrixConnectionError):
            device = None
        if device is None or device.signing_key != session.signing_key:
            trust = TrustState.UNKNOWN_DEVICE
        else:
            trust = await crypto.resolve_trust(device)
        return {
            "was_encrypted": True,
            "trust_state": trust,
            "forwarded_keys": bool(session.forwarding_chain),
        }
