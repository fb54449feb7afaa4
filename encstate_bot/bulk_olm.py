"""Olm for many devices at once: one key query, one one-time-key claim, encryption in process,
each batch's crypto-store writes in one transaction.

mautrix-python's own paths do one HTTP call and one commit per device and check ed25519
signatures in pure Python (about 1 ms each); here the signatures go through python-olm's C
implementation (0.1 ms) and the store writes are batched. What is stored is what mautrix would
store (device identities, cross-signing keys and signatures, Olm sessions), through its own
crypto-store methods, so the shared Olm machine keeps working on it. The libolm calls and the
raw access to mautrix's crypto store are in glue.py.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime
import json
from json.encoder import encode_basestring_ascii as _json_str
import logging
from typing import Any, Iterable

from mautrix.api import Method, Path
from mautrix.crypto.sessions import Session
from mautrix.types import CrossSigner, CrossSigningUsage, DeviceIdentity, TrustState
import olm

from .glue import BulkOlmStore, ed25519_verify, keys_fetched, olm_encrypt
from .tasks import settle

OLM_ALGORITHM = "m.olm.v1.curve25519-aes-sha2"
QUERY_CHUNK = 250  # users per /keys/query
QUERIES_AT_ONCE = 4
CLAIM_CHUNK = 1000  # devices per /keys/claim
# Encryption yields to the event loop after this many messages (about 10 ms of work), so a
# big push never holds up a newcomer's answer for long.
ENCRYPT_YIELD_EVERY = 100
# Olm sessions are created in worker threads, this many per thread (about 0.1 s of work): a
# group of 250 devices uses both cores of a small machine.
SESSIONS_PER_THREAD_CALL = 125


def canonical_json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def verify_json(data: Any, user_id: str, key_name: str, key: str) -> bool:
    """Check an ed25519 signature on a signed JSON object with libolm (through glue)."""
    try:
        signature = data["signatures"][user_id][f"ed25519:{key_name}"]
        unsigned = {k: v for k, v in data.items() if k not in ("signatures", "unsigned")}
        return ed25519_verify(key, canonical_json(unsigned), signature)
    except (KeyError, TypeError, AttributeError, ValueError):
        return False


def _first_ed25519(key: Any) -> str | None:
    keys = key.get("keys") if isinstance(key, dict) else None
    if not isinstance(keys, dict):
        return None
    for key_id, value in keys.items():
        if isinstance(key_id, str) and key_id.startswith("ed25519:") and isinstance(value, str):
            return value
    return None


class BulkOlm:
    def __init__(self, client: Any, log: logging.Logger) -> None:
        self.client = client
        self.log = log
        # The bot's own device keys as the homeserver serves them (with the cross-signing
        # signature once there is one), sent in every Olm message as MSC4147 asks.
        self.own_device_keys: dict[str, Any] | None = None

    async def refresh_own_device_keys(self) -> dict[str, Any] | None:
        me, device_id = self.client.mxid, self.client.device_id
        resp = await self.client.api.request(
            Method.POST, Path.v3.keys.query, {"device_keys": {me: [device_id]}}
        )
        keys = ((resp.get("device_keys") or {}).get(me) or {}).get(device_id)
        if isinstance(keys, dict) and verify_json(
            keys, me, device_id, self.crypto.account.signing_key
        ):
            keys.pop("unsigned", None)
            self.own_device_keys = keys
        else:
            self.log.warning("The homeserver does not serve this device's own keys")
        return self.own_device_keys

    @property
    def crypto(self) -> Any:
        return self.client.crypto

    @property
    def store(self) -> BulkOlmStore:
        return BulkOlmStore(self.crypto.crypto_store)

    # Devices ------------------------------------------------------------------------------------

    async def devices(self, user_ids: Iterable[str]) -> dict[str, dict[str, DeviceIdentity]]:
        """Device identities; users the store does not track are queried in bulk."""
        known = await self.store.devices(user_ids)
        found = {u: d for u, d in known.items() if d is not None}
        unknown = [u for u, d in known.items() if d is None]
        chunks = [unknown[i : i + QUERY_CHUNK] for i in range(0, len(unknown), QUERY_CHUNK)]
        # The queries go out together (a few at a time); each answer is validated and stored
        # while the homeserver works on the next.
        limit = asyncio.Semaphore(QUERIES_AT_ONCE)

        async def query(chunk: list[str]) -> Any:
            async with limit:
                return await self.client.api.request(
                    Method.POST,
                    Path.v3.keys.query,
                    {"device_keys": {u: [] for u in chunk}, "timeout": 10000},
                )

        queries = [asyncio.ensure_future(query(chunk)) for chunk in chunks]
        try:
            for chunk, answer in zip(chunks, queries, strict=True):
                resp = await answer
                for server, error in (resp.get("failures") or {}).items():
                    self.log.warning(f"Key query failure for {server}: {error}")
                stored = await self._store_devices(chunk, resp)
                found.update(stored)
                keys_fetched(self.crypto, stored)
        finally:
            settle(queries)
        for user_id in unknown:
            found.setdefault(user_id, {})
        return found

    async def _store_devices(
        self, users: list[str], resp: dict[str, Any]
    ) -> dict[str, dict[str, DeviceIdentity]]:
        """Validate and store the queried devices of users the store did not track. They were
        never part of one of the bot's outbound megolm sessions (mautrix tracks everyone it
        shares with), so there is nothing to rotate. The signatures (about three per device)
        are checked in a worker thread: libolm releases the GIL, so the event loop keeps
        encrypting and sending meanwhile (a seal's next wave is looked up while this one's
        keys go out)."""
        result, keys, signatures = await asyncio.to_thread(self._validate_all, users, resp)
        async with self.store.transaction():
            await self.store.put_devices(result)
            await self.store.put_cross_signing(keys, signatures)
        return result

    def _validate_all(
        self, users: list[str], resp: dict[str, Any]
    ) -> tuple[
        dict[str, dict[str, DeviceIdentity]],
        list[tuple[str, CrossSigningUsage, str]],
        list[tuple[CrossSigner, CrossSigner, str]],
    ]:
        """The valid devices of these users in a key query's answer, and the cross-signing
        keys and valid signatures to store (in a worker thread: it only reads ``resp``)."""
        result: dict[str, dict[str, DeviceIdentity]] = {}
        keys: list[tuple[str, CrossSigningUsage, str]] = []
        signatures: list[tuple[CrossSigner, CrossSigner, str]] = []
        for user_id in users:
            raw = (resp.get("device_keys") or {}).get(user_id)
            if not isinstance(raw, dict):
                continue
            devices = {}
            for device_id, device_keys in raw.items():
                device = self._validate(user_id, device_id, device_keys)
                if device is not None:
                    devices[device_id] = device
            result[user_id] = devices
            self._cross_signing(user_id, raw, devices, resp, keys, signatures)
        return result, keys, signatures

    def _validate(self, user_id: str, device_id: str, keys: Any) -> DeviceIdentity | None:
        if not isinstance(keys, dict):
            return None
        if keys.get("user_id") != user_id or keys.get("device_id") != device_id:
            self.log.warning(f"Device {user_id}/{device_id} has mismatching IDs in its keys")
            return None
        key_map = keys.get("keys") if isinstance(keys.get("keys"), dict) else {}
        signing_key = key_map.get(f"ed25519:{device_id}")
        identity_key = key_map.get(f"curve25519:{device_id}")
        if not isinstance(signing_key, str) or not isinstance(identity_key, str):
            self.log.warning(f"Device {user_id}/{device_id} lacks its keys")
            return None
        if not verify_json(keys, user_id, device_id, signing_key):
            self.log.warning(f"Device {user_id}/{device_id} has an invalid self-signature")
            return None
        unsigned = keys.get("unsigned") if isinstance(keys.get("unsigned"), dict) else {}
        name = unsigned.get("device_display_name")
        return DeviceIdentity(
            user_id=user_id,
            device_id=device_id,
            identity_key=identity_key,
            signing_key=signing_key,
            trust=TrustState.UNVERIFIED,
            deleted=False,
            name=name if isinstance(name, str) else device_id,
        )

    @staticmethod
    def _cross_signing(
        user_id: str,
        raw_devices: dict[str, Any],
        devices: dict[str, DeviceIdentity],
        resp: dict[str, Any],
        keys: list[tuple[str, CrossSigningUsage, str]],
        signatures: list[tuple[CrossSigner, CrossSigner, str]],
    ) -> None:
        """Collect what mautrix's trust resolution reads: the master and self-signing keys, the
        master's signature on the self-signing key, and the self-signing key's signatures on
        devices. Only valid signatures are kept."""
        master = (resp.get("master_keys") or {}).get(user_id)
        self_signing = (resp.get("self_signing_keys") or {}).get(user_id)
        msk, ssk = _first_ed25519(master), _first_ed25519(self_signing)
        if not msk or not ssk:
            return
        keys += [(user_id, CrossSigningUsage.MASTER, msk), (user_id, CrossSigningUsage.SELF, ssk)]
        user_signing = _first_ed25519((resp.get("user_signing_keys") or {}).get(user_id))
        if user_signing:
            keys.append((user_id, CrossSigningUsage.USER, user_signing))
        if verify_json(self_signing, user_id, msk, msk):
            signature = self_signing["signatures"][user_id][f"ed25519:{msk}"]
            signatures.append((CrossSigner(user_id, ssk), CrossSigner(user_id, msk), signature))
        for device_id, device in devices.items():
            device_keys = raw_devices[device_id]
            if verify_json(device_keys, user_id, ssk, ssk):
                signature = device_keys["signatures"][user_id][f"ed25519:{ssk}"]
                signatures.append(
                    (
                        CrossSigner(user_id, device.signing_key),
                        CrossSigner(user_id, ssk),
                        signature,
                    )
                )

    # Olm sessions -------------------------------------------------------------------------------

    async def claim(self, devices: list[DeviceIdentity]) -> dict[str, Any]:
        """Claim one one-time key for each device (the HTTP part, so a caller can overlap it
        with other work). Returns the claimed keys as user -> device -> {key id: key}.

        mautrix serialises its own claims with a lock to avoid claiming twice for one device;
        this one does not take it, so a big push cannot hold up mautrix or a newcomer's answer.
        The worst case, a second Olm session with a device, is harmless."""
        claimed: dict[str, Any] = defaultdict(dict)
        for start in range(0, len(devices), CLAIM_CHUNK):
            request: dict[str, dict[str, str]] = defaultdict(dict)
            for device in devices[start : start + CLAIM_CHUNK]:
                request[device.user_id][device.device_id] = "signed_curve25519"
            resp = await self.client.api.request(
                Method.POST,
                Path.v3.keys.claim,
                {"one_time_keys": request, "timeout": 10000},
            )
            for server, error in (resp.get("failures") or {}).items():
                self.log.warning(f"Key claim failure for {server}: {error}")
            for user_id, keys in (resp.get("one_time_keys") or {}).items():
                if isinstance(keys, dict):
                    claimed[user_id].update(keys)
        return claimed

    async def sessions_from_claim(
        self, devices: list[DeviceIdentity], claimed: dict[str, Any]
    ) -> dict[str, Session]:
        """Create and store Olm sessions from claimed one-time keys (verified with libolm).

        The signature checks and the curve25519 work run in worker threads: libolm releases
        the GIL, so the event loop keeps sending and receiving (the previous group's
        sendToDevice calls, the next claims, newcomers' answers) while the sessions are made.
        The new sessions belong to nobody else until they are stored, and creating one only
        reads the account's identity keys, so nothing here races mautrix's own Olm work."""
        candidates: list[tuple[DeviceIdentity, dict[str, Any]]] = []
        for device in devices:
            keys = claimed.get(device.user_id, {}).get(device.device_id)
            if isinstance(keys, dict) and keys:
                candidates.append((device, next(iter(keys.values()))))
        new: list[tuple[str, Session]] = []
        chunks = [
            candidates[start : start + SESSIONS_PER_THREAD_CALL]
            for start in range(0, len(candidates), SESSIONS_PER_THREAD_CALL)
        ]
        for made, problems in await asyncio.gather(
            *(asyncio.to_thread(self._new_sessions, chunk) for chunk in chunks)
        ):
            new += made
            for problem in problems:
                self.log.warning(problem)
        await self.store.add_sessions(new)
        if len(new) < len(devices):
            self.log.info(f"{len(devices) - len(new)} device(s) had no one-time key to claim")
        return dict(new)

    def _new_sessions(
        self, candidates: list[tuple[DeviceIdentity, Any]]
    ) -> tuple[list[tuple[str, Session]], list[str]]:
        """Verify each claimed key and create an outbound Olm session (in a worker thread)."""
        account = self.crypto.account
        made: list[tuple[str, Session]] = []
        problems: list[str] = []
        for device, key in candidates:
            who = f"{device.user_id}/{device.device_id}"
            if not verify_json(key, device.user_id, device.device_id, device.signing_key):
                problems.append(f"Invalid one-time key signature: {who}")
                continue
            try:
                session = account.new_outbound_session(device.identity_key, key["key"])
            except (olm.OlmSessionError, KeyError, TypeError, ValueError) as e:
                problems.append(f"No Olm session with {who}: {e}")
                continue
            made.append((device.identity_key, session))
        return made, problems

    # Encryption ---------------------------------------------------------------------------------

    async def encrypt(
        self,
        items: list[tuple[DeviceIdentity, str, Any]],
        sessions: dict[str, Session],
        encoded: dict[int, str] | None = None,
    ) -> list[dict[str, Any] | None]:
        """Olm-encrypt (device, event type, content) for each device, in order; None where the
        device has no session. The sessions' new ratchet states are stored in one transaction.

        ``encoded`` caches each content's JSON by ``id(content)``, so the caller may share it
        between calls only while it keeps every content it passed alive (an id is unique only
        among live objects): a delivery encodes a content once for all its devices."""
        crypto = self.crypto
        account = crypto.account
        sender = {
            "sender": self.client.mxid,
            "sender_device": self.client.device_id,
            "keys": {"ed25519": account.signing_key},
        }
        if self.own_device_keys is not None:
            sender["sender_device_keys"] = self.own_device_keys
        # The plaintext is assembled from JSON pieces: the sender part is the same for every
        # message and each content is the same for many devices, so each is encoded once.
        head = json.dumps(sender)[:-1]
        if encoded is None:
            encoded = {}
        used: dict[str, Session] = {}
        out: list[dict[str, Any] | None] = []
        for count, (device, event_type, content) in enumerate(items):
            if count and count % ENCRYPT_YIELD_EVERY == 0:
                await asyncio.sleep(0)
            session = sessions.get(device.identity_key)
            if session is None:
                out.append(None)
                continue
            body = encoded.get(id(content))
            if body is None:
                value = content.serialize() if hasattr(content, "serialize") else content
                body = encoded[id(content)] = json.dumps(value)
            plaintext = (
                f'{head}, "recipient": {_json_str(device.user_id)}, "recipient_keys": '
                f'{{"ed25519": {_json_str(device.signing_key)}}}, "type": '
                f'{_json_str(str(event_type))}, "content": {body}}}'
            )
            message_type, ciphertext = olm_encrypt(session, plaintext)
            used[device.identity_key] = session
            out.append(
                {
                    "algorithm": OLM_ALGORITHM,
                    "sender_key": account.identity_key,
                    "ciphertext": {
                        device.identity_key: {"type": message_type, "body": ciphertext}
                    },
                }
            )
        now = datetime.now()
        for session in used.values():
            session.last_encrypted = now
        await self.store.update_sessions(list(used.items()))
        return out
