"""The courier's Olm encryption: what a recipient decrypts is what mautrix would have sent."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import json
import logging
from types import SimpleNamespace

from mautrix.crypto.account import OlmAccount
from mautrix.crypto.store.memory import MemoryCryptoStore
from mautrix.types import DeviceIdentity, EventType, TrustState
import olm
import pytest

from encstate_bot.bulk_olm import BulkOlm, canonical_json, verify_json
from encstate_bot.glue import olm_encrypt


class Peer:
    """A recipient device with its own libolm account."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.account = olm.Account()
        self.account.generate_one_time_keys(1)
        self.identity = DeviceIdentity(
            user_id=user_id,
            device_id=device_id,
            identity_key=self.account.identity_keys["curve25519"],
            signing_key=self.account.identity_keys["ed25519"],
            trust=TrustState.UNVERIFIED,
            deleted=False,
            name=device_id,
        )
        self.inbound: olm.InboundSession | None = None

    def one_time_key(self) -> str:
        return next(iter(self.account.one_time_keys["curve25519"].values()))

    def decrypt(self, message_type: int, body: str, sender_key: str) -> str:
        if message_type == 0:
            message = olm.OlmPreKeyMessage(body)
            if self.inbound is None:
                self.inbound = olm.InboundSession(self.account, message, sender_key)
            return self.inbound.decrypt(message)
        assert self.inbound is not None
        return self.inbound.decrypt(olm.OlmMessage(body))


def test_olm_encrypt_matches_the_session_method() -> None:
    bot = OlmAccount()
    peer = Peer("@p:x", "P")
    session = bot.new_outbound_session(peer.identity.identity_key, peer.one_time_key())
    sender_key = bot.identity_keys["curve25519"]
    for text in ["first", "ünïcode ✓ " * 50, "third"]:
        message_type, body = olm_encrypt(session, text)
        assert message_type == 0  # no reply yet: every message carries the pre-key
        assert peer.decrypt(message_type, body, sender_key) == text
    # After the peer answers, the session moves to normal messages, like Session.encrypt.
    reply = peer.inbound.encrypt("reply")
    assert olm.Session.decrypt(session, reply) == "reply"
    message_type, body = olm_encrypt(session, "after the reply")
    assert message_type == 1 == session.encrypt("x").type.value
    assert peer.decrypt(message_type, body, sender_key) == "after the reply"


@pytest.mark.asyncio
async def test_bulk_encrypt_builds_the_plaintext_mautrix_would() -> None:
    account = OlmAccount()
    store = MemoryCryptoStore("@bot:x", "pickle")
    own_keys = {"user_id": "@bot:x", "device_id": "BOT", "keys": {"ed25519:BOT": "k"}}
    client = SimpleNamespace(
        mxid="@bot:x",
        device_id="BOT",
        crypto=SimpleNamespace(account=account, crypto_store=store),
    )
    bulk = BulkOlm(client, logging.getLogger("test"))
    bulk.own_device_keys = own_keys
    peers = [Peer("@a:x", "A1"), Peer("@a:x", "A2"), Peer('@"quoted\\":x', "Q")]
    sessions = {
        p.identity.identity_key: account.new_outbound_session(
            p.identity.identity_key, p.one_time_key()
        )
        for p in peers
    }
    contents = [{"session_id": "s1", "n": 1}, {"session_id": "s2", "text": "ü ✓"}]
    items = [(p.identity, EventType.FORWARDED_ROOM_KEY, c) for p in peers for c in contents]
    lacking = Peer("@b:x", "B")
    items.append((lacking.identity, EventType.FORWARDED_ROOM_KEY, contents[0]))

    out = await bulk.encrypt(items, sessions)

    assert out[-1] is None  # no Olm session with that device
    for (device, _, content), message in zip(items[:-1], out[:-1], strict=True):
        peer = next(p for p in peers if p.identity is device)
        assert message is not None
        assert message["sender_key"] == account.identity_keys["curve25519"]
        part = message["ciphertext"][device.identity_key]
        plaintext = json.loads(peer.decrypt(part["type"], part["body"], message["sender_key"]))
        assert plaintext == {
            "sender": "@bot:x",
            "sender_device": "BOT",
            "keys": {"ed25519": account.signing_key},
            "sender_device_keys": own_keys,
            "recipient": device.user_id,
            "recipient_keys": {"ed25519": device.signing_key},
            "type": "m.forwarded_room_key",
            "content": content,
        }
    assert all(session.last_encrypted is not None for session in sessions.values())


def signed(account: olm.Account, user_id: str, device_id: str, data: dict) -> dict:
    signature = account.sign(canonical_json(data))
    return {**data, "signatures": {user_id: {f"ed25519:{device_id}": signature}}}


def test_signatures_are_checked_like_python_olm_in_any_thread() -> None:
    account = olm.Account()
    key = account.identity_keys["ed25519"]
    good = signed(account, "@p:x", "P", {"key": "abc", "ü": "✓"})
    assert verify_json(good, "@p:x", "P", key)
    olm.ed25519_verify(
        key,
        canonical_json({"key": "abc", "ü": "✓"}),
        account.sign(canonical_json({"key": "abc", "ü": "✓"})),
    )  # the reference accepts the same
    assert not verify_json({**good, "key": "abd"}, "@p:x", "P", key)
    assert not verify_json(good, "@p:x", "P", olm.Account().identity_keys["ed25519"])
    assert not verify_json(good, "@q:x", "P", key)
    bad_signature = {**good, "signatures": {"@p:x": {"ed25519:P": "not base64!"}}}
    assert not verify_json(bad_signature, "@p:x", "P", key)
    assert not verify_json({**good, "signatures": {"@p:x": {"ed25519:P": 7}}}, "@p:x", "P", key)
    assert not verify_json(good, "@p:x", "P", "short")
    assert not verify_json(["not", "a", "dict"], "@p:x", "P", key)
    assert not verify_json({**good, "bad": "\ud800"}, "@p:x", "P", key)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: verify_json(good, "@p:x", "P", key), range(200)))
    assert all(results)


def test_a_bad_one_time_key_costs_only_its_own_device() -> None:
    bot = OlmAccount()
    client = SimpleNamespace(crypto=SimpleNamespace(account=bot))
    bulk = BulkOlm(client, logging.getLogger("test"))
    good, empty, forged = Peer("@a:x", "A"), Peer("@b:x", "B"), Peer("@c:x", "C")
    candidates = [
        (good.identity, signed(good.account, "@a:x", "A", {"key": good.one_time_key()})),
        (empty.identity, signed(empty.account, "@b:x", "B", {"key": ""})),
        (forged.identity, signed(good.account, "@c:x", "C", {"key": forged.one_time_key()})),
    ]
    made, problems = bulk._new_sessions(candidates)
    assert [key for key, _ in made] == [good.identity.identity_key]
    assert len(problems) == 2
    assert "No Olm session with @b:x/B" in problems[0]
    assert "Invalid one-time key signature: @c:x/C" in problems[1]
