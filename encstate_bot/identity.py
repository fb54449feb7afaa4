"""The bot's identity and how it judges others': cross-signing set-up at start, whether its own
device is cross-signed, and the one trust check for other users' devices."""

from __future__ import annotations

import logging
from typing import Any

from mautrix.types import CrossSigner, DeviceIdentity, TrustState

from . import glue


class Identity:
    def __init__(self, client: Any, log: logging.Logger) -> None:
        self.client = client
        self.log = log

    async def trust(self, device: DeviceIdentity) -> tuple[bool, bool]:
        """(cross-signed, identity changed) for a device. Cross-signed means by an identity
        the bot trusted on first use (or verified): a cross-signing identity that changed since
        then (CROSS_SIGNED_UNTRUSTED: what a homeserver swapping it in looks like) does not
        count, and is logged."""
        return self._judge(device, await self.client.crypto.resolve_trust(device))

    async def trust_many(
        self, devices: list[DeviceIdentity]
    ) -> dict[tuple[str, str], tuple[bool, bool]]:
        """``trust`` for many devices, by (user, device): mautrix's trust resolution for all
        of them in a few statements where the crypto store is mautrix's SQL store, else one
        device at a time."""
        states = await glue.resolve_trust_many(self.client.crypto, devices, self.log)
        if states is None:
            return {(d.user_id, d.device_id): await self.trust(d) for d in devices}
        return {
            (d.user_id, d.device_id): self._judge(d, states[(d.user_id, d.device_id)])
            for d in devices
        }

    def _judge(self, device: DeviceIdentity, trust: TrustState) -> tuple[bool, bool]:
        if trust == TrustState.CROSS_SIGNED_UNTRUSTED:
            self.log.warning(
                f"{device.user_id}'s cross-signing identity changed since the bot first saw it "
                f"(device {device.device_id}): treated as not cross-signed"
            )
            return False, True
        return trust >= TrustState.CROSS_SIGNED_TOFU, False

    async def own_device_signed(self) -> bool | None:
        """Whether the bot's device is signed by its account's self-signing key (None: the
        account has no cross-signing identity)."""
        crypto = self.client.crypto
        keys = await crypto.get_own_cross_signing_public_keys()
        if keys is None:
            return None
        if not keys.self_signing_key:
            return False
        return bool(
            await crypto.crypto_store.is_key_signed_by(
                target=CrossSigner(self.client.mxid, crypto.account.signing_key),
                signer=CrossSigner(self.client.mxid, keys.self_signing_key),
            )
        )

    async def status(self) -> str:
        """The bot device's cross-signing, in a few words (status)."""
        if self.client.crypto is None:
            return "no end-to-end encryption"
        try:
            signed = await self.own_device_signed()
        except Exception:
            signed = None
        if signed is None:
            return "not cross-signed"
        return "cross-signed" if signed else "cross-signing keys exist, device not signed"

    async def set_up(self, recovery_key: str | None, bootstrap: bool) -> None:
        """Make the bot's device cross-signed: Element takes room key bundles only from such
        devices."""
        crypto = self.client.crypto
        if not crypto.account.shared:
            await crypto.share_keys()
        if recovery_key:
            await crypto.verify_with_recovery_key(recovery_key.strip())
            self.log.info("Signed this device with the configured cross-signing recovery key")
            return
        signed = await self.own_device_signed()
        if signed is not None:
            if signed:
                self.log.info("This device is cross-signed")
            else:
                self.log.warning(
                    "The account has a cross-signing identity but this device is not signed: "
                    "set cross_signing.recovery_key so the bot can sign it (Element users will "
                    "not accept its room key bundles until then)"
                )
            return
        if not bootstrap:
            self.log.info(
                "The account has no cross-signing identity; set cross_signing.bootstrap to "
                "create one (needed to reach Element users with room key bundles)"
            )
            return
        recovery_key = await crypto.generate_recovery_key()
        self.log.warning(
            "Created a cross-signing identity for the bot and signed this device. Store this "
            f"recovery key and put it in the config as cross_signing.recovery_key: {recovery_key}"
        )
