"""The maubot plugin: lifecycle and wiring, nothing else.

The pieces are built in dependency order, each given exactly what it uses; data flows one way:
sync intake -> tracker/ledger -> triggers -> queue -> gather -> planner -> transport -> audit.
docs/architecture.md draws it.
"""

from __future__ import annotations

import asyncio
import time

from maubot import Plugin
from mautrix.client import InternalEventType
from mautrix.util.async_db import UpgradeTable
from mautrix.util.config import BaseProxyConfig

from .config import Config, refusal
from .e2ee import INSTALL_ENCRYPTION, Encryption, olm_missing
from .migrations import upgrade_table

try:  # all of this needs python-olm, which only maubot[encryption] installs
    from . import glue
    from .audit import Audit
    from .bulk_olm import BulkOlm
    from .bundles import Bundles
    from .commands import Commands
    from .courier import Courier
    from .gate import Gate
    from .gather import Gatherer
    from .health import Counts, Health, LastError
    from .identity import Identity
    from .intake import Intake, Origins
    from .keyrequests import KeyRequests
    from .links import RoomLinks
    from .members import Members
    from .pushes import Pushes
    from .ratelimit import RequestGate
    from .room_policy import RoomPolicies
    from .sealer import Sealer
    from .seals import SealBook
    from .store import Store
    from .supply import SelfSupply
    from .tasks import stop_all
    from .tracker import Tracker
    from .transport import Transport
except ImportError as e:
    if not olm_missing(e):
        raise
    CRYPTO_MISSING: ImportError | None = e
else:
    CRYPTO_MISSING = None

MAINTENANCE_TICK = 15
# Settings that change what the seals are or who gets them: the rooms are sealed again.
RESEAL_ON_CHANGE = {
    "seal.enabled",
    "seal.preview_types",
    "share_with_invited",
    "require_cross_signed",
    "allow_mixed_shared_history",
    "dry_run",
}
PRUNE_EVERY_SECONDS = 3600
# How long a delivery waits for a key the bot does not hold: a key request (its client stops
# waiting), a push to a member who joined before the key came.
REQUEST_WAITS_KEPT_SECONDS = 3600
PUSH_WAITS_KEPT_SECONDS = 30 * 86400


def owner_refusal(owner: str, since_ms: int, user_id: str) -> str:
    """Why a bot account may not use a database another encstate account claimed, and what to
    do instead."""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since_ms / 1000))
    return (
        f"encstate will not start: its tables in this database belong to the encstate bot "
        f"{owner} (since {since}), and this bot is {user_id}. They have no account column, so two "
        "bot accounts on one database and schema would send keys from the wrong account and "
        f"undo each other's work. If {user_id} is to replace {owner} here (say this maubot "
        "instance's primary user was changed: the instance keeps its schema mbp_<instance id> "
        "or its file <instance id>.db), hand the data over on purpose: run DELETE FROM "
        "encstate_owner in this instance's schema or database and start it again; "
        f"{user_id} then takes over {owner}'s queue, seals and audit (it delivers what "
        f"{owner} queued, shares the keys of {owner}'s seals, and its audit goes on from "
        f"{owner}'s). Otherwise give each bot account its own database or its own schema: in a "
        "full maubot server every instance has its own schema or SQLite file, so run an "
        "instance per account; in standalone mode on PostgreSQL, create a schema (CREATE "
        "SCHEMA <schema>) and set database_opts: {server_settings: {search_path: <schema>}} in "
        "this bot's config; on SQLite, give it a database file of its own"
    )


class EncStateBot(Plugin):
    config: Config

    @classmethod
    def get_config_class(cls) -> type[BaseProxyConfig]:
        return Config

    @classmethod
    def get_db_upgrade_table(cls) -> UpgradeTable:
        return upgrade_table

    async def start(self) -> None:
        if CRYPTO_MISSING is not None:
            self.log.critical(f"{INSTALL_ENCRYPTION} ({CRYPTO_MISSING})")
            raise RuntimeError(INSTALL_ENCRYPTION)
        self.config.load_and_update()
        client, config, log = self.client, self.config, self.log
        self.encryption = Encryption(client, self.id, log)
        self._tasks: list[asyncio.Task] = []
        self._pruned_at = 0.0
        self.store = Store(self.database)
        self.counts = Counts()
        self.store.audit_observers.append(self.counts.audited)
        self.sending = False
        self.tracker = Tracker(self.store, client.crypto, log, client.mxid)
        self.seals = SealBook()
        self.policies = RoomPolicies(config, self.store, log)
        try:
            # First: the tables have no account column, so nothing may read them for a bot
            # account that does not own them (another bot's queue, seals and links).
            owner, since = await self.store.claim_owner(client.mxid)
            if owner != client.mxid:
                refused = owner_refusal(owner, since, client.mxid)
                log.critical(refused)
                raise RuntimeError(refused)
            self.policies.load(await self.store.rooms())
            await self.tracker.load()
            self.seals.load(await self.store.seals())
        except (OSError, ConnectionError) as e:
            log.critical(f"encstate cannot read its database: {type(e).__name__}: {e}")
            raise
        self.last_error = LastError()
        log.addHandler(self.last_error)  # removed in stop()
        self.identity = Identity(client, log)
        self.links = RoomLinks(self.tracker, client.mxid, log)
        members = Members(client)
        bulk = BulkOlm(client, log.getChild("olm"))
        gather = Gatherer(
            client,
            self.tracker,
            self.seals,
            self.policies,
            members,
            self.links,
            self.identity,
            bulk,
            config,
            log.getChild("gather"),
        )
        self.transport = Transport(client, bulk, log.getChild("transport"))
        self.audit = Audit(client, config, log.getChild("audit"))
        self.courier = Courier(
            client,
            self.store,
            self.tracker,
            self.seals,
            gather,
            self.transport,
            self.audit,
            log.getChild("courier"),
        )
        self.sealer = Sealer(
            client,
            self.store,
            self.tracker,
            self.courier,
            self.seals,
            self.policies,
            members,
            config,
            log.getChild("sealer"),
        )
        self.pushes = Pushes(
            client.mxid,
            self.store,
            self.tracker,
            self.courier,
            self.policies,
            self.links,
            members,
            self.seals,
            config,
            log.getChild("pushes"),
        )
        self.requests = KeyRequests(
            self.courier,
            self.store,
            RequestGate.from_config(config),
            client.mxid,
            client.device_id,
            log.getChild("requests"),
            self.links,
        )
        self.bundles = Bundles(
            client,
            config,
            self.store,
            self.tracker,
            self.courier,
            gather,
            self.identity,
            members,
            self.links,
            log.getChild("bundles"),
        )
        self.origins = Origins()
        self.intake = Intake(
            client,
            config,
            self.store,
            self.tracker,
            self.links,
            self.pushes,
            self.sealer,
            self.requests,
            self.courier,
            self.bundles,
            self.origins,
            log,
            self.encryption,
        )
        self.ready = self.intake.ready  # set once the start-up rescan is done
        self.supply = SelfSupply(client, self.tracker, config, log.getChild("supply"))
        self.gate = Gate(client, config, self.tracker, self.policies, self.origins)
        if problem := self.encryption.problem():
            log.error(problem)
        elif problems := glue.check(client.crypto):
            for problem in problems:
                log.critical(problem)
            log.critical(
                f"encstate sends no keys until a mautrix {glue.MAUTRIX_RANGE} is installed; "
                "it only records what it sees"
            )
        else:
            self.intake.install()
            self.courier.start()
            self.sealer.start()
            self.sending = True
        self.health = Health(
            self.store,
            self.tracker,
            self.links,
            self.transport,
            self.encryption,
            self.counts,
            self.last_error,
            self.identity.status,
            self.ready.is_set,
            lambda: self.intake.last_sync,
            lambda: self.sending,
            lambda: self.config["web_token"],
        )
        if self.webapp is not None:  # maubot.yaml's webapp: the health and metrics endpoints
            self.register_handler_class(self.health)
        self.commands = Commands(
            client,
            config,
            self.store,
            self.tracker,
            self.courier,
            self.sealer,
            self.seals,
            self.policies,
            self.links,
            members,
            self.bundles,
            self.identity,
            self.gate,
            log,
            self.problem,
        )
        self.register_handler_class(self.commands)
        client.add_event_handler(
            InternalEventType.SYNC_SUCCESSFUL, self.intake.on_sync, wait_sync=True
        )
        self._tasks.append(asyncio.create_task(self._startup(), name="encstate-startup"))

    async def stop(self) -> None:
        self.log.removeHandler(self.last_error)
        self.client.remove_event_handler(InternalEventType.SYNC_SUCCESSFUL, self.intake.on_sync)
        await self.intake.stop()
        await stop_all(self._tasks)
        await self.sealer.stop()
        await self.courier.stop()

    def problem(self) -> str | None:
        """What stops the bot from doing its job, for the log, health and every command reply."""
        if problem := self.encryption.problem():
            return problem
        if not self.sending:
            return (
                f"encstate sends no keys: it needs mautrix {glue.MAUTRIX_RANGE} (see the log at "
                "start); it only records what it sees"
            )
        return None

    def on_external_config_update(self) -> None:
        """The admin saved the instance's config in the manager. A bad edit is refused: the old
        config stays (and goes back into maubot's copy, so a restart does not disable the
        instance), and one log line names the key. A good one is applied now."""
        try:
            proposed = self.config.proposed()
        except Exception as e:
            self.log.error(f"encstate kept its previous config: {refusal(e)}")
            self.config.save()
            return
        changed = self.config.changed_keys(proposed)
        self.config.load_and_update()
        if changed:
            self.reconfigure(changed)

    def reconfigure(self, changed: list[str]) -> None:
        """Apply changed settings to a running instance (all of them apply live)."""
        if any(k.startswith("rate_limits.") or k == "duplicate_window_seconds" for k in changed):
            self.requests.gate.configure(self.config)
        if any(k.startswith("cross_signing.") for k in changed) and self.encryption.on:
            self._tasks.append(
                asyncio.create_task(self._set_up_identity(), name="encstate-cross-signing")
            )
        if set(changed) & RESEAL_ON_CHANGE and self.ready.is_set():
            for room_id in self.tracker.ledgers:
                if self.links.is_joined(room_id):
                    self.sealer.mark(room_id)
        self.log.info(f"encstate applied config changes live: {', '.join(changed)}")

    async def _set_up_identity(self) -> None:
        try:
            await self.identity.set_up(
                self.config["cross_signing.recovery_key"],
                self.config["cross_signing.bootstrap"],
            )
            await self.courier.gather.bulk.refresh_own_device_keys()
        except Exception:
            self.log.exception("Could not set up cross-signing")

    async def _startup(self) -> None:
        if self.client.crypto is not None:
            await self._set_up_identity()
        try:
            await self.intake.rescan()
        except Exception:
            self.log.exception("Start-up rescan failed")
        # Ready: every room rescanned (state, then the timelines that changed), the ledger
        # current, the pushes it owes queued, and every rescanned room's seals current (one
        # sealing pass here; a room that cannot be sealed now says why and is tried later).
        # Key requests are answered all along.
        started, sealed = time.monotonic(), 0
        for room_id in self.intake.to_seal if self.sending else []:
            sealed += await self.sealer.seal_now(room_id)
        self.intake.ready.set()
        self.log.info(
            f"Ready: {len(self.intake.to_seal)} room(s) looked at for seals in "
            f"{time.monotonic() - started:.2f} s ({sealed} value(s) sealed)"
        )
        while True:
            try:
                await self.maintain()
            except Exception:
                self.log.exception("Maintenance round failed")
            await asyncio.sleep(MAINTENANCE_TICK)

    async def maintain(self) -> None:
        """The periodic chores: write what could not be written, drop old audit rows and queue
        items past their limits, ask for missing sessions."""
        await self.tracker.flush_all()
        await self.intake.react()
        now = time.time()
        if now - self._pruned_at > PRUNE_EVERY_SECONDS:
            self._pruned_at = now
            await self.store.drop_waits(
                int((now - PUSH_WAITS_KEPT_SECONDS) * 1000),
                int((now - REQUEST_WAITS_KEPT_SECONDS) * 1000),
            )
            days = self.config["audit_retention_days"]
            if days:
                removed = await self.store.prune_audit(int((now - days * 86400) * 1000))
                if removed:
                    self.log.info(f"Dropped {removed} audit row(s) older than {days} day(s)")
        if self.client.crypto is not None and self.config["self_supply.enabled"]:
            await self.supply.ask()
