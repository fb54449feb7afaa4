"""The audit report's judgements, in the words ``!encstate help`` and ``status`` use. Pure.

*Mixed*: a session that encrypted state and timeline messages (``SessionKind.MIXED``); the
policy never shares it unless the room shares mixed sessions as history, its creator flagged it
shared history and the room's history is visible to newcomers, and then only from the safe
index. *Superseded*: a valid value a later value of the same key replaced. Each superseded value
gets one verdict:

- *readable*: above the safe index of a session the bot shares (from that index): exposed;
- *sealed*: no key the bot gave (by its delivery records and audit) or would give opens it,
  because it sits below the safe index every export of its session starts from, or its session
  holds no current value, so the bot never shares it (its current value is served elsewhere,
  typically by a seal);
- *withheld*: readable from the safe index, but the policy refuses its session now (a mixed
  session, indices never seen to decrypt): not sealed, since that refusal can lapse;
- *given earlier*: no key the bot shares now opens it, but a key it gave earlier (recorded in
  its audit) does;
- *own seal*: a value of one of the bot's seals, whose key went out only while it was current;
- *replay*: at the index of a current value of its session: the same ciphertext, nothing more.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable

from attr import dataclass, evolve

from . import protocol
from .ledger import RoomLedger, SessionFacts, SessionKind, StateRecord
from .policy import Decision, HeldSession, Requester, RoomFacts, Share, decide
from .room_policy import Mode, RoomPolicy
from .seals import SealBook
from .store import AuditRow

# The audit rows the report reads for keys given earlier (newest first).
AUDIT_SCAN_ROWS = 100_000
# Audit decisions that may have put a key on the wire ("failed": the call failed, but a server
# may have taken it anyway).
GIVING = ("share", "failed")


class Verdict(str, Enum):
    READABLE = "readable"
    SEALED = "sealed"
    WITHHELD = "withheld"
    GIVEN = "given earlier"
    OWN_SEAL = "own seal"
    REPLAY = "replay"


@dataclass(frozen=True)
class Superseded:
    """One superseded value and what keeps it unread, or does not."""

    record: StateRecord
    verdict: Verdict
    why: str
    safe_index: int | None
    given_from: int | None = None  # the lowest index the bot gave its session from


# A joined member's device that the room's policy admits: the session's own checks decide.
_MEMBER = Requester(user_id="@member:audit", device_id="AUDIT", membership="join")


def session_decision(
    facts: SessionFacts,
    policy: RoomPolicy,
    history_visibility: str | None,
    shared_history: bool,
) -> Decision:
    """What the policy does with this session for a joined member's admitted device, as if the
    bot held it from index 0 (whether it holds it is reported apart): ``policy.decide`` itself,
    with the room checks (power, policy off) passed, since those are about the room."""
    room = RoomFacts(
        room_id="",  # named only where the bot lacks power, which this room never does
        bot_level=1,
        users_default=0,
        history_visibility=history_visibility,
        policy=evolve(policy, mode=Mode.MEMBERS),
    )
    held = HeldSession(first_known_index=0, shared_history=shared_history)
    return decide(room, _MEMBER, facts, held)


def mixed_sharing(
    decision: Decision, policy: RoomPolicy, history_visibility: str | None, shared_history: bool
) -> str:
    """What the policy does with a mixed session, in words."""
    if isinstance(decision, Share):
        return f"shared from the safe index {decision.index}, as shared history"
    if not policy.allow_mixed_shared_history:
        return "never shared: this room never shares mixed sessions"
    if not shared_history:
        return "never shared: its creator did not flag it shared history"
    if history_visibility not in protocol.HISTORY_VISIBLE_TO_NEWCOMERS:
        return (
            f"never shared: history visibility {history_visibility or 'unknown'} hides history "
            "from newcomers"
        )
    return f"not shared now: {decision.reason}"


def mixed_policy(policy: RoomPolicy) -> str:
    """The room's rule for mixed sessions, as ``status`` says it."""
    if policy.allow_mixed_shared_history:
        return "mixed sessions shared as history (where flagged and history is visible)"
    return "mixed sessions never shared"


def lowest_given(rows: Iterable[AuditRow]) -> dict[str, int]:
    """Per session, the lowest index the audit records a key going out from."""
    lowest: dict[str, int] = {}
    for row in rows:
        if row.decision not in GIVING or not row.session_id or row.msg_index is None:
            continue
        if row.session_id not in lowest or row.msg_index < lowest[row.session_id]:
            lowest[row.session_id] = row.msg_index
    return lowest


def superseded_values(
    ledger: RoomLedger,
    seals: SealBook,
    decisions: dict[str, Decision],
    given: dict[str, int],
) -> list[Superseded]:
    """Every superseded value of the room with its verdict, by session. ``decisions``: per
    state session (not the bot's seals), ``session_decision``; ``given``: ``lowest_given``."""
    current = {r.outer_key: r for r in ledger.current_state()}
    found: list[Superseded] = []
    for session_id in sorted(ledger.sessions()):
        facts = ledger.facts(session_id)
        if not facts.superseded:
            continue
        own = seals.is_seal(ledger.room_id, session_id)
        decision = decisions.get(session_id)
        low = given.get(session_id)
        for record in facts.superseded:
            verdict, why = _judge(ledger, seals, facts, record, own, decision, low, current)
            found.append(Superseded(record, verdict, why, facts.safe_index, low))
    return found


def _judge(
    ledger: RoomLedger,
    seals: SealBook,
    facts: SessionFacts,
    record: StateRecord,
    own: bool,
    decision: Decision | None,
    low: int | None,
    current: dict[str, StateRecord],
) -> tuple[Verdict, str]:
    index, safe = record.msg_index, facts.safe_index
    if own:
        return Verdict.OWN_SEAL, "one of the bot's seals, given only while its value was current"
    if index is not None and any(r.msg_index == index for r in facts.current):
        return Verdict.REPLAY, "at a current value's index: the same ciphertext"
    opened = low is not None and (index is None or low <= index)
    if safe is None or (index is not None and index < safe):
        if safe is not None:
            why = f"below the safe index {safe}"
        else:
            why = (
                "its session holds no current value, so it is never shared"
                if not facts.current
                else "its session is never shared: no current value in it has an index"
            )
            now = current.get(record.outer_key)
            if now is None:
                why += "; nothing is current for this key"
            elif seals.sealed(ledger, now):
                why += "; the current value is sealed"
            else:
                why += "; the current value is in another session"
        if opened:
            return Verdict.GIVEN, f"a key the bot gave from index {low} opens it; {why}"
        return Verdict.SEALED, why
    if isinstance(decision, Share) and (index is None or decision.index <= index):
        if index is None:
            return Verdict.READABLE, "index unknown: the keys the bot shares may open it"
        return Verdict.READABLE, f"above the safe index {safe}, which the bot shares from"
    if facts.kind == SessionKind.MIXED:
        refusal = "its session is mixed, not shared"
    else:
        refusal = "its session is not shared now: " + (
            decision.reason if decision is not None else "the bot does not judge it"
        )
    if opened:
        return Verdict.GIVEN, f"a key the bot gave from index {low} opens it; {refusal}"
    return Verdict.WITHHELD, refusal


def lowest_of(*given: dict[str, int]) -> dict[str, int]:
    """Per session, the lowest index over several records of keys given."""
    lowest: dict[str, int] = {}
    for record in given:
        for session_id, index in record.items():
            lowest[session_id] = min(index, lowest.get(session_id, index))
    return lowest


def is_state(facts: SessionFacts) -> bool:
    return facts.kind in (SessionKind.STATE, SessionKind.MIXED)
