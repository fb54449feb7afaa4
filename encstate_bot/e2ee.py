"""Whether the bot can do its job at all: end-to-end encryption, and what the admin must do when
it cannot. Imports nothing that needs python-olm, so the plugin loads (and says this) without it.

Three ways an instance ends up without encryption:

- python-olm is missing (maubot installed without its ``[encryption]`` extra): the plugin refuses
  to start and says so;
- the client has no device ID: the bot runs, records what it sees, and tells the admin (log and
  every command reply) to add one;
- the admin adds or changes the device ID in the manager after the instance started: maubot
  swaps in a new client with encryption but does not restart the plugins, so this instance keeps
  the old client. The bot notices (at start and on every sync) and restarts its own instance, or,
  when it cannot, says what to do.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

INSTALL_ENCRYPTION = (
    "encstate needs end-to-end encryption, and python-olm is not installed: install maubot "
    "with its encryption extra (pip install 'maubot[encryption]', or the official Docker "
    "image), then restart maubot"
)
NO_DEVICE = (
    "encstate has no end-to-end encryption: the bot's client has no device ID. Log in with a "
    "device (mbc auth --update-client, or the client's page in the manager), then restart "
    "this instance. Until then it only records what it sees: no keys are shared or withheld"
)
CHANGED = (
    "encstate: the client changed (device ID or access token edited in the manager); restarting "
    "this instance so it takes up the new client"
)
NOT_SET_UP = (
    "encstate has no end-to-end encryption: the bot's client has a device ID, but maubot did not "
    "set up encryption for it (see maubot's log: python-olm or the crypto database). Until then "
    "it only records what it sees: no keys are shared or withheld"
)
RESTART_BY_HAND = (
    "encstate: the client changed (device ID or access token edited in the manager), and this "
    "instance still holds the old one. Restart the instance (stop and start it in the manager) "
    "so it takes up the new client"
)


def olm_missing(error: ImportError) -> bool:
    """Whether an ImportError means python-olm (libolm's bindings) is not installed."""
    name = getattr(error, "name", None) or ""
    return name.split(".")[0] == "olm" or name.endswith("libolm")  # the bindings' C module


def maubot_client(client: Any) -> Any:
    """maubot's record of the bot account (``maubot.client.Client``), whose ``client`` is the
    Matrix client maubot syncs with now; None in standalone mode or if maubot changed."""
    try:
        from maubot.client import Client
    except ImportError:
        return None
    cache = getattr(Client, "cache", None)
    if not isinstance(cache, dict):
        return None
    return cache.get(getattr(client, "mxid", None))


def instance_of(instance_id: str) -> Any:
    """maubot's ``PluginInstance`` for this plugin; None in standalone mode."""
    try:
        from maubot.instance import PluginInstance
    except ImportError:
        return None
    cache = getattr(PluginInstance, "cache", None)
    return cache.get(instance_id) if isinstance(cache, dict) else None


class Encryption:
    """Tells whether the instance's client is the one maubot syncs with and has encryption,
    and acts on a swapped client (once)."""

    def __init__(
        self,
        client: Any,
        instance_id: str,
        log: logging.Logger,
        find_client: Callable[[Any], Any] = maubot_client,
        find_instance: Callable[[str], Any] = instance_of,
    ) -> None:
        self.client = client
        self.instance_id = instance_id
        self.log = log
        self._find_client = find_client
        self._find_instance = find_instance
        self.stale = False
        self._restart: asyncio.Task | None = None

    @property
    def on(self) -> bool:
        return self.client.crypto is not None and not self.stale

    def problem(self) -> str | None:
        """What the admin must do, or None when encryption works."""
        if self.stale:
            return RESTART_BY_HAND
        if self.client.crypto is None:
            return NOT_SET_UP if getattr(self.client, "device_id", None) else NO_DEVICE
        return None

    def check(self) -> bool:
        """Whether maubot swapped the client under this instance; if so, restart the instance
        (or say, once, that the admin must). Cheap: called on every sync."""
        if self.stale:
            return True
        current = self._find_client(self.client)
        live = getattr(current, "client", None)
        if live is None or live is self.client:
            return False
        self.stale = True
        instance = self._find_instance(self.instance_id)
        if instance is None or not hasattr(instance, "stop") or not hasattr(instance, "start"):
            self.log.error(RESTART_BY_HAND)
            return True
        self.log.warning(CHANGED)
        # Not one of the plugin's own tasks: stopping the plugin must not cancel its restart.
        self._restart = asyncio.get_running_loop().create_task(
            self._restart_instance(instance), name="encstate-restart"
        )
        return True

    async def _restart_instance(self, instance: Any) -> None:
        await asyncio.sleep(0)  # let the sync handler that noticed return first
        try:
            await instance.stop()
            await instance.start()
        except Exception:
            self.log.exception(RESTART_BY_HAND)
