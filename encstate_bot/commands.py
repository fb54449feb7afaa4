"""The ``!encstate`` command family: what operators see and what they can change."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Awaitable, Callable

from maubot import MessageEvent
from maubot.handlers import command
from mautrix.errors import MatrixRequestError
from mautrix.types import EventID, EventType, RoomID

from . import reports, room_policy
from .audit import Outcome
from .bundles import Bundles
from .courier import Courier
from .gate import Gate
from .identity import Identity
from .ledger import SessionKind, Status
from .links import RoomLinks
from .members import Members
from .policy import Ignore, Share, Withhold
from .render import Reply, cell, short_id
from .reports import Verdict
from .room_keys import encrypt_once
from .room_policy import Mode, RoomPolicies
from .sealer import Sealer
from .seals import SealBook
from .store import OutboxItem, Store
from .tracker import Tracker
from .triggers import Trigger

DAY_MS = 24 * 3600 * 1000
PROGRESS_EVERY = 50  # users per progress update for large shares
WHY = 100  # characters of a "why" cell in the audit's tables of superseded values

HELP = [
    ("help", "this list"),
    ("status", "is encstate doing its job here: encryption, power, ledger, policy, queue"),
    (
        "audit",
        "exposure report: mixed sessions, superseded values (readable, sealed or withheld), "
        "invalid state",
    ),
    ("links", "restricted-room links into and out of this room, and whether the bot can act"),
    ("share @user [device] [--dry-run]", "push this room's state keys now, per device"),
    ("share --members [--dry-run]", "push to every current member (progress shown)"),
    ("log [n]", "the last n decisions in this room, with reasons"),
    (
        "policy [members|cross-signed|off] [--invited on|off] [--dry-run on|off]",
        "show or set this room's policy",
    ),
    ("state", "the room's current encrypted state as the bot decrypts it"),
    ("invite @user", "invite someone and send them a room key bundle (for Element users)"),
    ("seal", "which current values the bot has sealed (re-sent in a session of its own)"),
    ("seal on|off", "turn sealing on or off in this room"),
    ("seal now [--dry-run]", "seal every unsealed current value now (reseal does the same)"),
]


class UsageError(ValueError):
    pass


def ago(ts_ms: int, now_ms: int) -> str:
    seconds = max(0, (now_ms - ts_ms) // 1000)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def describe(decision: Any, failed: bool = False) -> tuple[str, str, str]:
    """(decision, index or code, reason) for a table row."""
    if failed:
        return "failed", "", f"not delivered (sendToDevice failed): {decision.reason}"
    if isinstance(decision, Share):
        return "share", f"from {decision.index}", decision.reason
    if isinstance(decision, Withhold):
        return "withhold", decision.code, decision.reason
    if isinstance(decision, Ignore):
        return "ignore", "", decision.reason
    return str(decision), "", ""


def short_value(event_type: str | None, content: Any) -> str:
    if not isinstance(content, dict):
        return cell(content, 40)
    for key in ("name", "topic", "url", "alias"):
        if isinstance(content.get(key), str):
            return cell(content[key], 40)
    return cell(json.dumps(content, ensure_ascii=False), 40)


class Commands:
    def __init__(
        self,
        client: Any,
        config: Any,
        store: Store,
        tracker: Tracker,
        courier: Courier,
        sealer: Sealer,
        seals: SealBook,
        policies: RoomPolicies,
        links: RoomLinks,
        members: Members,
        bundles: Bundles,
        identity: Identity,
        gate: Gate,
        log: logging.Logger,
        problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.client = client
        self.config = config
        self.store = store
        self.tracker = tracker
        self.courier = courier
        self.sealer = sealer
        self.seals = seals
        self.policies = policies
        self.links = links
        self.members = members
        self.bundles = bundles
        self.identity = identity
        self.gate = gate
        self.log = log
        self.problem = problem  # what stops the bot from working, said atop every reply

    # Entry point --------------------------------------------------------------------------------

    @command.new(name="encstate", help="encrypted room state keys: !encstate help")
    @command.argument("args", pass_raw=True, required=False)
    async def encstate(self, evt: MessageEvent, args: str = "") -> None:
        words = (args or "").split()
        name = words[0].lower() if words else "help"
        handler = self.HANDLERS.get(name)
        if handler is None:
            await self.reply(evt, Reply().line(f"Unknown command {name!r}. Try !encstate help."))
            return
        refusal = await self.gate.refusal(evt.room_id, evt.sender, evt.event_id, name)
        if refusal is not None:
            self.log.info(f"Refused !encstate {name} from {evt.sender} in {evt.room_id}")
            await self.reply(evt, Reply().line(refusal))
            return
        try:
            await handler(self, evt, words[1:])
        except UsageError as e:
            await self.reply(evt, Reply().line(f"{e}. Try !encstate help."))

    async def reply(
        self, evt: MessageEvent, reply: Reply, edits: EventID | None = None
    ) -> EventID:
        if problem := self.problem():
            reply.warn_first(problem)
        return await evt.respond(reply.content(), edits=edits)

    # Read-only ----------------------------------------------------------------------------------

    async def help(self, evt: MessageEvent, args: list[str]) -> None:
        reply = Reply("encstate commands")
        reply.table(
            ["command", "what it does"], [(f"!encstate {c}", h) for c, h in HELP], limit=120
        )
        reply.line(
            "state, share and policy need the room's state_default power level; invite needs "
            "its invite level and seal now the power to send the state. In an encrypted room the "
            "bot obeys only encrypted commands from a device of the sender."
        )
        reply.line(
            "Words: a mixed session encrypted both state and messages (never shared unless the "
            "room shares mixed sessions as history); a superseded value is one a later value "
            "replaced; the safe index is where the bot's export of a session starts. A current "
            "value is sealed once the bot re-sent it in a session of its own; a superseded value "
            "is sealed when no key the bot gives opens it (below the safe index, or in a session "
            "the bot never shares), readable when it sits above the safe index of a session the "
            "bot shares."
        )
        await self.reply(evt, reply)

    async def status(self, evt: MessageEvent, args: list[str]) -> None:
        room = evt.room_id
        view = self.tracker.view(room)
        ledger = self.tracker.ledgers.get(room)
        level, default = view.user_level(self.client.mxid), view.users_default
        reply = Reply(f"encstate in {room}")
        if view.state_encrypted:
            encryption = f"on ({view.state_flag})"
        else:
            encryption = "off: this room does not encrypt its state"
        if level > default:
            power = f"{level} > users_default {default}: empowered"
        else:
            power = (
                f"{level}, not above users_default {default}: NOT empowered. Give the bot a "
                f"power level above {default} in the room settings."
            )
        counts = ledger.counts() if ledger else {}
        missing = self._missing_sessions(room)
        since = int(time.time() * 1000) - DAY_MS
        decided = await self.store.audit_counts(room, since)
        answers = sorted(await self.store.answer_times(room, since))
        policy = self.policies.get(room)
        reply.facts(
            [
                ("State encryption", encryption),
                ("Bot power level", power),
                (
                    "State events",
                    f"{counts.get('current', 0)} current, {counts.get('superseded', 0)} "
                    f"superseded, {counts.get('invalid', 0)} invalid, "
                    f"{counts.get('pending', 0)} not decrypted yet",
                ),
                (
                    "Sessions",
                    f"{counts.get('state_only_sessions', 0)} state-only, "
                    f"{counts.get('mixed_sessions', 0)} mixed, {len(missing)} the bot lacks",
                ),
                ("Pending pushes", str(await self.store.pending_count(room))),
                (
                    "Answer time, 24 hours",
                    f"p50 {answers[len(answers) // 2]} ms, p95 "
                    f"{answers[min(len(answers) - 1, len(answers) * 95 // 100)]} ms "
                    f"over {len(answers)} answer(s)"
                    if answers
                    else "no requests answered",
                ),
                (
                    "Last 24 hours",
                    f"{decided.get('share', 0)} shared, {decided.get('withhold', 0)} withheld, "
                    f"{decided.get('ignore', 0)} ignored",
                ),
                (
                    "Policy",
                    f"{policy.mode.value}; invited {'on' if policy.share_with_invited else 'off'}"
                    f"; dry run {'on' if policy.dry_run else 'off'}; mixed sessions "
                    + ("shared as history" if policy.allow_mixed_shared_history else "never"),
                ),
                ("Bot device", f"{self.client.device_id} ({await self.identity.status()})"),
                (
                    "Identity changes, 24 hours",
                    f"{await self.store.identity_changes(room, since)} refusal(s) because a "
                    "user's cross-signing identity changed since first seen",
                ),
                ("Audit kept", _retention(self.config["audit_retention_days"])),
            ]
        )
        if view.state_encrypted:
            plan = await self.sealer.plan(room)
            reply.heading("Seals")
            reply.facts(self._seal_facts(room, plan))
            reply.heading("How newcomers get the keys")
            reply.facts(self._entry_paths(room, plan))
        unreadable = ledger.unreadable_current() if ledger else []
        if unreadable:
            reply.line(
                "Current values the bot cannot read (nothing older is shared for them): "
                + ", ".join(unreadable)
            )
        if not self.tracker.complete(room):
            reply.line(
                "Recent events of this room could not be recorded yet: the bot shares nothing "
                "from it until they are."
            )
        if self.tracker.history_unread(room):
            reply.line(
                "Part of this room's timeline is still to be read back (a read cut short at "
                "backfill_limit, or the time the bot was out of the room): no session is "
                "forwarded until it is; seals still go out."
            )
        if missing:
            asking = ", ".join(map(short_id, missing))
            reply.line(f"Sessions the bot is still asking for: {asking}")
        gaps = [g for g in self.links.gaps() if room in (g.link.room_id, g.link.via)]
        if gaps:
            reply.line("Links the bot cannot act on:")
            reply.bullets(f"{g.link.via} → {g.link.room_id}: {g.reason}" for g in gaps)
        await self.reply(evt, reply)

    def _entry_paths(self, room_id: str, plan: Any) -> list[tuple[str, str]]:
        """Which clients each way into the room reaches, as things stand."""
        everyone = "every client (the bot's own m.room_key, before the event)"
        mautrix_only = "mautrix-style clients only (forwarded keys; Element drops them): " + (
            plan.problem or "values not sealed yet"
        )
        sealed_all = plan.total > 0 and plan.sealed == plan.total
        joined = everyone if sealed_all else mautrix_only
        preview = (
            "the preview seals (name, topic, avatar), every client"
            if sealed_all
            else "nothing until the values are sealed"
        )
        paths = [
            ("Join (public, restricted, knock)", joined),
            ("Invited by anyone", preview),
        ]
        if self.links.graph.allowed(room_id):
            paths.append(("Member of an admitting room", preview))
        paths.append(
            (
                "!encstate invite, approved knock",
                "a room key bundle with the seals (Element) and the seals as m.room_key",
            )
        )
        paths.append(
            (
                "Invited by an Element user",
                "their own client's bundle carries the seals it holds (shared history)",
            )
        )
        return paths

    def _missing_sessions(self, room_id: str) -> list[str]:
        ledger = self.tracker.ledgers.get(room_id)
        if ledger is None:
            return []
        sessions = ledger.sessions()
        return sorted(s for s in sessions if ledger.facts(s).kind == SessionKind.PENDING)

    async def audit(self, evt: MessageEvent, args: list[str]) -> None:
        room = evt.room_id
        ledger = self.tracker.ledgers.get(room)
        reply = Reply(f"Exposure report for {room}")
        if ledger is None:
            await self.reply(evt, reply.line("The bot has seen no encrypted state here."))
            return
        policy = self.policies.get(room)
        view = self.tracker.view(room)
        decisions = {}
        for session_id in ledger.sessions():
            facts = ledger.facts(session_id)
            if reports.is_state(facts) and not self.seals.is_seal(room, session_id):
                decisions[session_id] = reports.session_decision(
                    facts,
                    policy,
                    view.history_visibility,
                    (room, session_id) in self.tracker.shared_history,
                )
        audited = await self.store.audit(room, limit=reports.AUDIT_SCAN_ROWS)
        values = reports.superseded_values(
            ledger,
            self.seals,
            decisions,
            reports.lowest_of(
                reports.lowest_given(audited), await self.store.lowest_delivered(room)
            ),
        )
        by_verdict: dict[Verdict, list[reports.Superseded]] = {v: [] for v in Verdict}
        for value in values:
            by_verdict[value.verdict].append(value)
        counts = ledger.counts()
        reply.facts(
            [
                (
                    "Sessions",
                    f"{counts['state_only_sessions']} state-only, {counts['mixed_sessions']} "
                    f"mixed; {reports.mixed_policy(policy)}",
                ),
                ("Superseded values", _superseded_summary(counts["superseded"], by_verdict)),
            ]
        )
        if policy.mode == Mode.OFF or not view.empowered(self.client.mxid):
            why = "the room's policy is off" if policy.mode == Mode.OFF else "it is not empowered"
            reply.line(
                f"The bot shares nothing here now ({why}); this report says what it shares "
                "once it does."
            )
        found = False
        mixed = []
        mixed_current = False  # a mixed session still carries a current value: a seal helps
        gaps = []
        for session_id in sorted(ledger.sessions()):
            facts = ledger.facts(session_id)
            if facts.kind == SessionKind.MIXED:
                mixed_current = mixed_current or bool(facts.current)
                types = sorted({r.inner_type or "?" for r in facts.current + facts.superseded})
                decision = decisions.get(session_id)
                mixed.append(
                    (
                        short_id(session_id),
                        ", ".join(types),
                        f"{len(facts.message_indices)} message(s)",
                        reports.mixed_sharing(
                            decision,
                            policy,
                            view.history_visibility,
                            (room, session_id) in self.tracker.shared_history,
                        )
                        if decision is not None
                        else "one of the bot's seals",
                    )
                )
            if facts.gaps:
                gaps.append((short_id(session_id), ", ".join(map(str, facts.gaps[:10]))))
        if mixed:
            found = True
            reply.heading("Sessions that encrypt state and messages (mixed)")
            reply.table(["session", "state", "would expose", "shared"], mixed)
        readable = by_verdict[Verdict.READABLE]
        if readable:
            found = True
            reply.heading("Superseded values still readable from the safe index (exposed)")
            reply.table(
                ["session", "type", "index", "safe index", "event"],
                [_value_row(v)[:5] for v in readable],
            )
        # the exposures set ``found``; the values withheld or sealed show the safety working
        for verdict, heading, exposure in (
            (
                Verdict.GIVEN,
                "Superseded values the bot shares no more, open to keys it gave earlier",
                True,
            ),
            (
                Verdict.WITHHELD,
                "Superseded values withheld with their session (readable if shared)",
                False,
            ),
            (Verdict.SEALED, "Superseded values sealed (no key the bot gives opens them)", False),
        ):
            values = by_verdict[verdict]
            if not values:
                continue
            found = found or exposure
            reply.heading(heading)
            reply.table(
                ["session", "type", "index", "safe index", "event", "why"],
                [_value_row(v) for v in values],
                limit=WHY,
            )
        if by_verdict[Verdict.SEALED]:
            reply.line(
                "Sealed: below the safe index every export of their session starts from, or in a "
                "session the bot never shares; no key it gave earlier opens them either (by its "
                "record of every key it delivered, which is never pruned)."
            )
        invalid = [r for r in ledger.events.values() if r.status == Status.INVALID]
        power = [r for r in invalid if r.reason and "power level" in r.reason]
        other = [r for r in invalid if r not in power]
        if other:
            found = True
            reply.heading("Invalid encrypted state (ignored)")
            reply.table(
                ["event", "outer key", "sender", "why"],
                [(short_id(r.event_id, 12), r.outer_key, r.sender, r.reason) for r in other],
            )
        if power:
            found = True
            reply.heading("Senders who lacked the power level for the inner type")
            reply.table(
                ["event", "type", "sender", "why"],
                [(short_id(r.event_id, 12), r.inner_type, r.sender, r.reason) for r in power],
            )
        pinned = ledger.far_future(int(time.time() * 1000))
        if pinned:
            found = True
            reply.heading("Far-future timestamps pinning a value")
            reply.table(
                ["event", "type", "sender", "origin_server_ts"],
                [(short_id(r.event_id, 12), r.inner_type, r.sender, r.origin_ts) for r in pinned],
            )
        missing = self._missing_sessions(room)
        if missing:
            found = True
            reply.heading("Sessions the bot cannot supply (it does not hold them)")
            reply.bullets(short_id(s) for s in missing)
        if gaps:
            found = True
            reply.heading("Sessions with indices the bot never saw (refused)")
            reply.table(["session", "unseen indices"], gaps)
        if not found:
            reply.line(
                "No exposure found: no mixed session, no readable superseded value, nothing "
                "invalid."
            )
        elif mixed_current or readable:
            reply.line(
                "!encstate seal now re-sends the current state in sessions of the bot's own."
            )
        await self.reply(evt, reply)

    async def links(self, evt: MessageEvent, args: list[str]) -> None:
        room = evt.room_id
        graph = self.links.graph
        rows = []
        for via in graph.allowed(room):
            joined = via in self.links.joined
            acts = joined and self.links.empowered(room)
            rows.append(("admits members of", via, "yes" if joined else "no", "-", _yes(acts)))
        for target in sorted(graph.allowing(room)):
            view = self.tracker.view(target)
            level = view.user_level(self.client.mxid)
            empowered = view.empowered(self.client.mxid)
            joined = target in self.links.joined
            rows.append(
                (
                    "its members may enter",
                    target,
                    "yes" if joined else "no",
                    f"{level} ({'empowered' if empowered else 'not empowered'})",
                    _yes(empowered and room in self.links.joined),
                )
            )
        reply = Reply(f"Restricted-room links around {room}")
        if not rows:
            reply.line("No restricted join rule admits into or out of this room.")
        reply.table(["direction", "room", "bot joined", "bot power there", "bot acts"], rows)
        await self.reply(evt, reply)

    async def log(self, evt: MessageEvent, args: list[str]) -> None:
        try:
            limit = max(1, min(int(args[0]), 100)) if args else 10
        except ValueError as e:
            raise UsageError(f"log takes a number, not {args[0]!r}") from e
        rows = await self.store.audit(evt.room_id, limit=limit)
        now = int(time.time() * 1000)
        reply = Reply(f"Last {len(rows)} decision(s) in this room")
        if not rows:
            reply.line("No decisions yet.")
        reply.table(
            ["when", "user", "device", "session", "decision", "index/code", "trigger", "reason"],
            [
                (
                    ago(r.ts, now),
                    r.user_id,
                    r.device_id or "-",
                    short_id(r.session_id),
                    r.decision,
                    r.code or ("" if r.msg_index is None else f"from {r.msg_index}"),
                    r.trigger,
                    r.reason,
                )
                for r in rows
            ],
        )
        await self.reply(evt, reply)

    async def state(self, evt: MessageEvent, args: list[str]) -> None:
        room = evt.room_id
        ledger = self.tracker.ledgers.get(room)
        reply = Reply(f"Current encrypted state of {room}")
        if ledger is None or not ledger.current_state():
            await self.reply(evt, reply.line("The bot holds no current encrypted state here."))
            return
        source = self.tracker.session_source()
        rows = []
        for rec in ledger.current_state():
            value = "?"
            result = await source.decrypt(room, rec.session_id, rec.ciphertext)
            plaintext = getattr(result, "plaintext", None)
            if plaintext is not None:
                try:
                    value = short_value(rec.inner_type, json.loads(plaintext).get("content"))
                except (ValueError, AttributeError):
                    value = "?"
            rows.append(
                (
                    rec.inner_type,
                    rec.inner_key or '""',
                    value,
                    rec.sender,
                    short_id(rec.session_id),
                    rec.msg_index,
                    "yes" if self.seals.sealed(ledger, rec) else "no",
                )
            )
        reply.table(["type", "state key", "value", "sender", "session", "index", "sealed"], rows)
        await self.private_reply(evt, reply)

    async def private_reply(self, evt: MessageEvent, reply: Reply) -> None:
        """A reply that carries decrypted values: encrypted in a session of its own whose key
        goes only to the asking admin's devices that the room's policy would share state
        with (the room's ordinary session reaches every device in the room)."""
        room = evt.room_id
        crypto = self.client.crypto
        if crypto is None:
            await self.reply(evt, Reply().line("Decrypted values need end-to-end encryption."))
            return
        approved, refused, policy = await self.courier.approved_devices(room, [evt.sender])
        devices = [a.device for a in approved if a.membership == "join"]
        if policy.mode == Mode.OFF or not devices:
            why = (
                "the room's policy is off"
                if policy.mode == Mode.OFF
                else "; ".join(sorted({r.reason for r in refused})) or "you have no devices"
            )
            await self.reply(
                evt,
                Reply().line(
                    f"Not showing decrypted values: none of your devices may read them ({why})."
                ),
            )
            return
        content = reply.content().serialize()
        own = encrypt_once(
            room,
            {"type": "m.room.message", "content": content},
            crypto.account.identity_key,
            self.client.device_id,
        )
        await self.courier.send_room_keys(
            room,
            [(device, own.room_key) for device in devices],
            Trigger.COMMAND,
            "the bot's own session for a reply",
        )
        await self.client.send_message_event(RoomID(room), EventType.ROOM_ENCRYPTED, own.content)

    # Changing -----------------------------------------------------------------------------------

    async def policy(self, evt: MessageEvent, args: list[str]) -> None:
        try:
            changed = await self.policies.change(evt.room_id, args, evt.sender)
        except ValueError as e:
            raise UsageError(str(e)) from e
        reply = Reply("Policy updated" if changed else "Policy in force")
        reply.facts(room_policy.describe(self.policies.get(evt.room_id)))
        await self.reply(evt, reply)

    async def share(self, evt: MessageEvent, args: list[str]) -> None:
        room = evt.room_id
        dry_run = "--dry-run" in args
        words = [a for a in args if a != "--dry-run"]
        if not words:
            raise UsageError("share needs @user [device] or --members")
        if words[0] == "--members":
            users = [u for u in await self.members.joined(room) if u != self.client.mxid]
            device = None
        elif words[0].startswith("@") and ":" in words[0]:
            users, device = [words[0]], (words[1] if len(words) > 1 else None)
        else:
            raise UsageError(f"{words[0]!r} is not a user ID")
        items = [
            OutboxItem(room_id=room, user_id=u, device_id=device, trigger=Trigger.COMMAND)
            for u in users
        ]
        outcomes = await self._with_progress(evt, items, dry_run)
        title = "Dry run: nothing sent" if dry_run else "Shared now"
        reply = Reply(title)
        if not outcomes:
            reply.line("Nothing to decide: no devices, or no state sessions in this room.")
        rows = []
        for o in outcomes[:60]:
            decision, detail, reason = describe(o.decision, o.failed)
            rows.append(
                (o.item.user_id, o.device_id, short_id(o.session_id), decision, detail, reason)
            )
        reply.table(["user", "device", "session", "decision", "index/code", "reason"], rows)
        if len(outcomes) > 60:
            reply.line(f"… and {len(outcomes) - 60} more; see !encstate log.")
        await self.reply(evt, reply)

    async def _with_progress(
        self, evt: MessageEvent, items: list[OutboxItem], dry_run: bool
    ) -> list[Outcome]:
        if len(items) <= PROGRESS_EVERY:
            return await self.courier.deliver(items, dry_run=dry_run)
        progress = await self.reply(evt, Reply().line(f"Sharing with {len(items)} users: 0 done"))
        outcomes: list[Outcome] = []
        for start in range(0, len(items), PROGRESS_EVERY):
            outcomes += await self.courier.deliver(
                items[start : start + PROGRESS_EVERY], dry_run=dry_run
            )
            done = min(start + PROGRESS_EVERY, len(items))
            await self.reply(
                evt, Reply().line(f"Sharing with {len(items)} users: {done} done"), edits=progress
            )
        return outcomes

    async def seal(self, evt: MessageEvent, args: list[str]) -> None:
        room = evt.room_id
        word = args[0].lower() if args else "show"
        if word in ("on", "off"):
            if not self.gate.can_manage(room, evt.sender):
                await self.reply(evt, Reply().line(self.gate.manage_refusal(room, "seal on|off")))
                return
            await self.policies.set_seal(room, word == "on", evt.sender)
            if word == "on":
                self.sealer.mark(room)
            reply = Reply(f"Sealing is {word} in this room")
            reply.line(
                "The bot now re-sends each new value in a session of its own, keys first."
                if word == "on"
                else "The bot no longer re-sends values; seals already sent stay readable. "
                "Newcomers on Element will see the state as ciphertext."
            )
            await self.reply(evt, reply)
            return
        if word == "now":
            await self._seal_now(evt, dry_run="--dry-run" in args)
            return
        if word != "show":
            raise UsageError("seal takes on, off or now [--dry-run]")
        if not self.gate.can_read(room, evt.sender):
            await self.reply(evt, Reply().line(self.gate.manage_refusal(room, "seal")))
            return
        plan = await self.sealer.plan(room)
        reply = Reply(f"Seals in {room}")
        reply.facts(self._seal_facts(room, plan))
        await self.reply(evt, reply)

    def _seal_facts(self, room_id: str, plan: Any) -> list[tuple[str, str]]:
        on = self.policies.get(room_id).seal
        facts = [
            ("Sealing", "on" if on else "off (!encstate seal on turns it on)"),
            ("Sealed", f"{plan.sealed} of {plan.total} current value(s)"),
        ]
        if plan.todo:
            waiting = ", ".join(r.outer_key for r, _ in plan.todo[:8])
            why = plan.problem or ("sealing is off" if not on else "being sealed now")
            facts.append(("Not sealed", f"{len(plan.todo)} ({waiting}): {why}"))
        if plan.same_content:
            facts.append(
                (
                    "Re-sent by someone else",
                    f"{len(plan.same_content)} value(s) the bot sealed were re-sent unchanged by "
                    "another member (another encstate?): not sealed again",
                )
            )
        if plan.unreadable:
            facts.append(
                (
                    "Cannot seal",
                    f"{', '.join(plan.unreadable[:8])}: the bot cannot decrypt the current "
                    "value (it keeps asking for the key); newcomers see ciphertext for these",
                )
            )
        return facts

    async def _seal_now(self, evt: MessageEvent, dry_run: bool) -> None:
        room = evt.room_id
        plan = await self.sealer.plan(room)
        if not plan.todo:
            await self.reply(
                evt,
                Reply().line(
                    f"Nothing to seal: {plan.sealed} of {plan.total} current value(s) are sealed."
                ),
            )
            return
        view = self.tracker.view(room)
        needed = self.sealer.needed_level(room, [r.inner_type or "" for r, _ in plan.todo])
        have = view.user_level(evt.sender)
        if have < needed:
            await self.reply(
                evt,
                Reply().line(
                    f"Sorry, sealing sends this room's state, which takes power level {needed}; "
                    f"you have {have}."
                ),
            )
            return
        reply = Reply(f"{'Would seal' if dry_run else 'Sealing'} {len(plan.todo)} value(s)")
        reply.table(
            ["type", "state key", "value's session", "sender"],
            [
                (r.inner_type, r.inner_key or '""', short_id(r.session_id), r.sender)
                for r, _ in plan.todo
            ],
        )
        if plan.problem:
            reply.line(f"Cannot seal: {plan.problem}.")
            await self.reply(evt, reply)
            return
        if dry_run or self.policies.get(room).dry_run:
            reply.line("Dry run: nothing was sent.")
            await self.reply(evt, reply)
            return
        progress = await self.reply(evt, reply)
        report = await self.sealer.seal_room(room)
        done = Reply(
            f"Sealed {len(report.sealed)} value(s) in {len(report.sealed)} fresh session(s)"
        )
        done.line(
            f"Shared them with {report.devices} device(s) ({report.keys_sent} key(s)) before "
            "sending the new state; each session opens that one value and nothing else."
        )
        if report.refused:
            done.line(f"{report.refused} device(s) the room's policy refuses got nothing.")
        await self.reply(evt, done, edits=progress)

    async def invite(self, evt: MessageEvent, args: list[str]) -> None:
        if not args or not (args[0].startswith("@") and ":" in args[0]):
            raise UsageError("invite needs a user ID")
        user_id = args[0]
        try:
            report = await self.bundles.invite(evt.room_id, user_id)
        except MatrixRequestError as e:
            await self.reply(evt, Reply().line(f"Could not invite {user_id}: {e.message}"))
            return
        reply = Reply(f"Invited {user_id}")
        if report is None:
            reply.line("Room key bundles are off (send_bundles); forwarded keys are queued.")
        else:
            reply.facts(
                [
                    (
                        "Room key bundle",
                        f"{report.room_keys} session(s), {report.withheld} withheld",
                    ),
                    ("Sent to", f"{report.devices} cross-signed device(s)"),
                    ("Not sent to", f"{report.skipped_devices} device(s) not cross-signed"),
                ]
            )
        await self.reply(evt, reply)

    async def seal_now_alias(self, evt: MessageEvent, args: list[str]) -> None:
        """``reseal`` from earlier versions: what ``seal now`` does."""
        await self._seal_now(evt, dry_run="--dry-run" in args)

    HANDLERS: dict[str, Callable[[Commands, MessageEvent, list[str]], Awaitable[None]]] = {
        "help": help,
        "status": status,
        "audit": audit,
        "links": links,
        "log": log,
        "state": state,
        "policy": policy,
        "share": share,
        "seal": seal,
        "reseal": seal_now_alias,
        "invite": invite,
    }


def _value_row(value: reports.Superseded) -> tuple[object, ...]:
    rec = value.record
    return (
        short_id(rec.session_id),
        rec.inner_type,
        "?" if rec.msg_index is None else rec.msg_index,
        "-" if value.safe_index is None else value.safe_index,
        short_id(rec.event_id, 12),
        value.why,
    )


def _superseded_summary(total: int, by_verdict: dict[Verdict, list]) -> str:
    """The superseded values by verdict, adding up to status's count."""
    parts = [
        f"{len(by_verdict[Verdict.READABLE])} readable",
        f"{len(by_verdict[Verdict.SEALED])} sealed",
    ]
    for verdict, words in (
        (Verdict.WITHHELD, "withheld with their session"),
        (Verdict.GIVEN, "open to keys given earlier"),
        (Verdict.OWN_SEAL, "in the bot's own seals"),
        (Verdict.REPLAY, "replays of a current value"),
    ):
        if by_verdict[verdict]:
            parts.append(f"{len(by_verdict[verdict])} {words}")
    return f"{total} (" + ", ".join(parts) + ")"


def _retention(days: int) -> str:
    return f"{days} day(s)" if days else "forever (audit_retention_days is 0)"


def _yes(value: bool) -> str:
    return "yes" if value else "no"
