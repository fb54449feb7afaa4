"""Security findings, each reproduced through the real homeserver with real E2EE clients.

Every test asserts what a client device ends up holding (or is refused), or what the bot's
database records; none reads the bot's log."""

from __future__ import annotations

import asyncio
from typing import Any

from mautrix.api import Method, Path
from mautrix.types import DeviceID, EventType, UserID
import olm

from encstate_bot.ledger import MessageStatus
from encstate_bot.store import Store
from harness.client import TestUser, eventually
from tests.integration.test_links import restricted_room, space

NO_PUSH = {"push_on_join": False, "duplicate_window_seconds": 0}
UNAUTHORISED = "m.unauthorised"


# Helpers --------------------------------------------------------------------------------------


async def answered(user: TestUser, room_id: str, session_id: str, timeout: float = 20) -> None:
    """Wait until the device got a withheld notice for the session, or holds it."""

    async def done() -> bool:
        return bool(user.withheld_for(session_id)) or await user.has_session(room_id, session_id)

    await eventually(done, timeout=timeout)


async def refused(user: TestUser, bot, room_id: str, session_id: str, leak: str) -> None:
    """The user asks the bot for the session: it must answer m.unauthorised and never give it
    (``leak``: what it means if it did)."""
    await user.request_key(room_id, session_id, bot.user_id, [bot.device_id])
    await answered(user, room_id, session_id)
    assert not await user.has_session(room_id, session_id), leak
    withheld = user.withheld_for(session_id)
    assert withheld and withheld[0]["code"] == UNAUTHORISED, withheld


async def message_recorded(
    store: Store, event_id: str, status: MessageStatus | None = None, timeout: float = 20
) -> Any:
    """Wait until the bot's database has this timeline message (with ``status``, if given)."""

    async def found() -> Any:
        for rec in await store.load_messages():
            if rec.event_id == event_id and (status is None or rec.status == status):
                return rec
        return None

    return await eventually(found, timeout=timeout)


async def mixed_name(world, admin: TestUser, bot, room_id: str, name: str) -> Any:
    """Set the room name in a fresh session, then chat in that same session (a mixed session
    the bot has seen decrypt a message)."""
    await admin.new_session(room_id)
    sent = await world.set_name(admin, bot, room_id, name)
    chat = await admin.send_message(room_id, f"chat in the session of {name!r}")
    assert chat.session_id == sent.session_id
    await message_recorded(await world.store(bot), chat.event_id, MessageStatus.MESSAGE)
    return sent


async def state_event_id(user: TestUser, room_id: str, outer_key: str) -> str | None:
    """The event ID of the room's current m.room.encrypted state event for ``outer_key``."""
    state = await user.client.api.request(Method.GET, Path.v3.rooms[room_id].state)
    for evt in state:
        if evt.get("type") == "m.room.encrypted" and evt.get("state_key") == outer_key:
            return evt["event_id"]
    return None


async def bot_message_sessions(user: TestUser, room_id: str, bot_user: str) -> set[str]:
    """The megolm sessions of the bot's timeline messages (replies, edits) in this room."""
    resp = await user.client.api.request(
        Method.GET,
        Path.v3.rooms[room_id].messages,
        query_params={"dir": "b", "limit": "1000"},
    )
    return {
        evt["content"].get("session_id")
        for evt in resp.get("chunk", [])
        if evt.get("sender") == bot_user
        and evt.get("type") == "m.room.encrypted"
        and "state_key" not in evt
    }


async def bot_identity_key(user: TestUser, bot) -> str:
    device = await user.crypto.get_or_fetch_device(UserID(bot.user_id), DeviceID(bot.device_id))
    assert device is not None, "the bot's device keys are not on the homeserver"
    return str(device.identity_key)


# Finding 02 -----------------------------------------------------------------------------------


async def restart(bot) -> None:
    """world.restart, but also when the start-up rescan dies (the bot then serves anyway)."""
    bot.stop()
    bot.start()
    await bot.wait_for_log(r"Rescanned \d+ room|Start-up rescan failed", 60)
    try:  # as BotProcess.wait_ready: the first sync after a restart may need a nudge
        await bot.wait_for_log(r"Sync running", 2)
    except TimeoutError:
        await asyncio.get_running_loop().run_in_executor(None, bot._nudge)
        await bot.wait_for_log(r"Sync running", 60)


def poison_plaintext(room_id: str, depth: int = 5000) -> str:
    """A megolm plaintext that is valid JSON, but nested deeper than Python's recursion limit."""
    return (
        '{"type":"m.room.message","room_id":"'
        + room_id
        + '","content":{"body":"x","deep":'
        + "[" * depth
        + "]" * depth
        + "}}"
    )


async def test_finding_02_a_poison_message_cannot_erase_mixed_evidence(world) -> None:
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await admin.new_session(room)
    name = await world.set_name(admin, bot, room, "Nightingale")
    # A timeline message in the name's own session: it decrypts, so the session is mixed.
    poison = await admin.send_raw_plaintext(room, poison_plaintext(room))
    assert poison.session_id == name.session_id

    # Until a later message is in the bot's database, the sync that carried the poison may not
    # have been processed. (Retried: a control in the same sync batch may be lost with it.)
    store = await world.store(bot)
    await admin.new_session(room)
    for attempt in range(5):
        await asyncio.sleep(1)
        control = await admin.send_message(room, f"control {attempt}")
        try:
            await message_recorded(store, control.event_id, timeout=5)
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("the bot recorded none of the control messages")

    await restart(bot)
    newcomer = await world.member("newcomer", admin, room)
    await refused(
        newcomer,
        bot,
        room,
        name.session_id,
        "the newcomer holds the name's session, which also encrypts a timeline message",
    )


# Finding 03 -----------------------------------------------------------------------------------


async def test_finding_03_banned_from_the_restricted_room_gets_nothing_through_the_allowed_room(
    world,
) -> None:
    bot = await world.bot(config=NO_PUSH, sealing=True)
    admin = await world.user("admin")
    room_a = await space(world, admin, bot)
    room_b = await restricted_room(world, admin, bot, room_a)
    carol = await world.user("carol")
    await carol.join(room_a)
    await carol.join(room_b)  # admitted through A
    dave = await world.user("dave")  # member of A only: the control
    await dave.join(room_a)
    await admin.client.ban_user(room_b, UserID(carol.user_id), "banned")
    await world.wait_joined(admin, room_a, carol.user_id)  # still in A

    # 1. Pushes: B's name seal goes to A's members (links work), not to the banned Carol.
    await world.set_name(admin, bot, room_b, "Back office")
    seal = await world.seal(bot, room_b)
    await eventually(lambda: dave.has_session(room_b, seal.session_id))
    await asyncio.sleep(1)  # a push to Carol would be in the same batch
    assert not await carol.has_session(room_b, seal.session_id), (
        "B's name seal was pushed to Carol, who is banned from B"
    )

    # 2. Asking: refused, although she is still a member of the allowed room.
    await refused(
        carol, bot, room_b, seal.session_id, "Carol, banned from B, got B's name seal through A"
    )

    # 3. A new value: sealed again, to Dave, never to Carol.
    await world.set_name(admin, bot, room_b, "Back office, renamed")

    async def resealed() -> Any:
        newer = await world.seal(bot, room_b)
        return newer if newer.session_id != seal.session_id else None

    renamed = await eventually(resealed, timeout=30)
    await eventually(lambda: dave.has_session(room_b, renamed.session_id))
    await asyncio.sleep(1)
    assert not await carol.has_session(room_b, renamed.session_id)
    assert carol.olm_plaintexts == [] and carol.forwarded == []


# Finding 05 -----------------------------------------------------------------------------------


async def test_finding_05_a_stranger_cannot_flag_a_session_as_shared_history(world) -> None:
    bot = await world.bot(
        config={
            "allow_mixed_shared_history": True,
            "push_on_join": False,
            "duplicate_window_seconds": 0,
        }
    )
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)  # history_visibility "shared"
    await admin.new_session(room)
    name = await world.set_name(admin, bot, room, "Nightingale")
    chat = await admin.send_message(room, "a message in the name's session")
    assert chat.session_id == name.session_id
    store = await world.store(bot)
    await message_recorded(store, chat.event_id, MessageStatus.MESSAGE)
    # The admin's client never flags its sessions shared-history: S is mixed and unflagged...
    assert (room, name.session_id) not in await store.shared_history_sessions()
    # ...so a newcomer is refused it.
    early = await world.member("early", admin, room)
    await early.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await answered(early, room, name.session_id)
    assert not await early.has_session(room, name.session_id)

    # A user who is not even in the room forwards "S" to the bot, flagged shared-history.
    stranger = await world.user("stranger")
    bot_device = await stranger.crypto.get_or_fetch_device(
        UserID(bot.user_id), DeviceID(bot.device_id)
    )
    own = olm.OutboundGroupSession()  # a session the stranger created himself
    own_export = olm.InboundGroupSession(own.session_key).export_session(0)
    as_admin = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": room,
        "sender_key": admin.crypto.account.identity_key,
        "sender_claimed_ed25519_key": admin.crypto.account.signing_key,
        "forwarding_curve25519_key_chain": [],
        "shared_history": True,
    }
    forwards = [
        # S with a garbage key
        {**as_admin, "session_id": name.session_id, "session_key": "junk" * 40},
        # S with real key material (of another session)
        {**as_admin, "session_id": name.session_id, "session_key": own_export},
        # the stranger's own session, valid, for this room
        {
            **as_admin,
            "session_id": own.id,
            "session_key": own_export,
            "sender_key": stranger.crypto.account.identity_key,
            "sender_claimed_ed25519_key": stranger.crypto.account.signing_key,
        },
    ]
    for content in forwards:
        await stranger.crypto.send_encrypted_to_device(
            bot_device, EventType.FORWARDED_ROOM_KEY, content
        )
    # Barrier: the stranger's own key request, sent after the forwards, is answered (refused:
    # not a member), so the bot has read the to-device stream past them.
    await stranger.request_key(room, name.session_id, bot.user_id, [bot.device_id])
    await answered(stranger, room, name.session_id)
    await asyncio.sleep(1)

    assert (room, name.session_id) not in await store.shared_history_sessions()
    late = await world.member("late", admin, room)
    await refused(
        late,
        bot,
        room,
        name.session_id,
        "a stranger's forward made the mixed session S count as shared history",
    )


# Finding 07 -----------------------------------------------------------------------------------


async def set_policy(world, admin: TestUser, bot, room_id: str, args: str, **expected) -> None:
    """Run ``!encstate policy <args>`` and wait until the bot's database has the policy."""
    await admin.command(room_id, f"!encstate policy {args}", bot.user_id)
    store = await world.store(bot)

    async def applied() -> bool:
        for row in await store.rooms():
            if row.room_id == room_id:
                return all(getattr(row, key) == value for key, value in expected.items())
        return False

    await eventually(applied, timeout=10)


async def test_finding_07_sealing_follows_the_policy(world) -> None:
    """Sealing off in the config; the admin seals by hand with the old name, ``reseal``."""
    bot = await world.bot(config=NO_PUSH)
    admin = await world.user("admin")
    # cross-signed, so that its commands still count under the cross-signed policy
    await admin.cross_sign()
    room = await world.room_with_bot(admin, bot)
    bob = await world.member("bob", admin, room)  # an ordinary device, not cross-signed
    carol = await world.user("carol")
    await carol.cross_sign()
    await admin.invite(room, carol.user_id)
    await carol.join(room)
    bot_key = await bot_identity_key(admin, bot)
    users = {"admin": admin, "bob": bob, "carol": carol}

    async def seals() -> dict[str, set[str]]:
        """Per user, the sessions of this room the device holds that the bot made, other than
        those of its replies."""
        replies = await bot_message_sessions(admin, room, bot.user_id)
        return {label: u.sessions_from(room, bot_key) - replies for label, u in users.items()}

    assert await seals() == {"admin": set(), "bob": set(), "carol": set()}

    async def seals_of(label: str) -> set[str]:
        return (await seals())[label]

    # 1. cross-signed: a reseal may share its new sessions only with cross-signed devices
    # (the admin's and Carol's), never with Bob's.
    await mixed_name(world, admin, bot, room, "Nightingale")
    await set_policy(world, admin, bot, room, "cross-signed", mode="cross-signed")
    await admin.command(room, "!encstate reseal", bot.user_id)
    try:  # once Carol's cross-signed device has a seal, the keys went out
        await eventually(lambda: seals_of("carol"), timeout=10)
    except TimeoutError:
        pass
    await asyncio.sleep(1)
    got = await seals()
    assert got["bob"] == set(), (
        f"Bob's device, not cross-signed, got the bot's resealed sessions: {got}"
    )

    async def reseal_changes_nothing(policy: str, **expected: Any) -> None:
        await mixed_name(world, admin, bot, room, f"Name under {policy}")
        await set_policy(world, admin, bot, room, policy, **expected)
        before_seals = await seals()
        before_event = await state_event_id(admin, room, "m.room.name:")
        try:  # the bot may not answer at all
            await admin.command(room, "!encstate reseal", bot.user_id, timeout=10)
        except TimeoutError:
            pass

        async def changed() -> bool:
            return (
                await seals() != before_seals
                or await state_event_id(admin, room, "m.room.name:") != before_event
            )

        try:
            await eventually(changed, timeout=5)
        except TimeoutError:
            pass
        await asyncio.sleep(1)
        gained = {label: held - before_seals[label] for label, held in (await seals()).items()}
        assert not any(gained.values()), f"keys sent under policy {policy!r}: {gained}"
        assert await state_event_id(admin, room, "m.room.name:") == before_event, (
            f"the room's encrypted name was replaced under policy {policy!r}"
        )

    # 2. off: nothing is shared, nothing resealed.
    await reseal_changes_nothing("off", mode="off")
    # 3. dry run: decide and record, send nothing.
    await reseal_changes_nothing("members --dry-run on", mode="members", dry_run=True)


async def test_finding_06_decrypted_values_reach_only_the_asking_admins_devices(world) -> None:
    bot = await world.bot(config={"push_on_join": False})
    admin = await world.user("admin")
    room = await world.room_with_bot(admin, bot)
    await world.set_name(admin, bot, room, "Nightingale")
    bob = await world.member("bob", admin, room)
    since = len(bob.messages)
    reply = await admin.command(room, "!encstate state", bot.user_id)
    assert "Nightingale" in reply
    # Bob saw the reply arrive but holds no key for it: give his sync time, then look.
    refusal = await bob.command(room, "!encstate state", bot.user_id)
    assert refusal.startswith("Sorry, state is for room admins")
    seen = [getattr(e.content, "body", "") for e in bob.messages[since:]]
    assert not any("Nightingale" in body for body in seen), seen
