"""encstate in a full maubot server (``python -m maubot``), driven through the management API.

:class:`MaubotServer` writes a maubot config (from the installed maubot's example config) for a
test Synapse, with SQLite or PostgreSQL for maubot, the crypto store and the plugin databases,
starts the server as a child process in its own session, and speaks the management API: log in,
upload the ``.mbp`` built by :func:`build_plugin`, create or update clients and instances.
:class:`ServerBot` is one bot account on it (a client plus an encstate instance), shaped like
:class:`~harness.botproc.BotProcess` where World's helpers need it (``user_id``,
``device_id``, ``database``, ``wait_for_log``, ``tail``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any
import urllib.error
from urllib.parse import quote
import urllib.request
import uuid

from aiohttp import ClientSession
from ruamel.yaml import YAML

from .botproc import ROOT, merge, plugin_defaults, stop_group
from .synapse import SHARED_SECRET, Synapse, free_port

PLUGIN_ID = "org.encstate.bot"
API = "/_matrix/maubot/v1"
LOG_FORMAT = "[%(asctime)s] [%(levelname)s@%(name)s] %(message)s"
_HEADER = re.compile(r"^\[[^\]]+\] \[[A-Z]+@([^\]]+)\] ")


def _mbc() -> str:
    """The dev venv's ``mbc``, else the build venv's (``make build``), else one on PATH."""
    for venv in (".venv", ".venv-build"):
        path = os.path.join(ROOT, venv, "bin", "mbc")
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("mbc")
    if found is None:
        raise RuntimeError("no mbc: not in .venv/bin, .venv-build/bin or on PATH")
    return found


def build_plugin(out_dir: str, source: str = ROOT) -> str:
    """``mbc build`` the plugin in ``source`` (the repository root) into ``out_dir``; returns
    the path of the ``.mbp``."""
    path = os.path.join(out_dir, "encstate.mbp")
    if os.path.exists(path):
        os.remove(path)  # mbc would ask whether to overwrite it
    done = subprocess.run(
        [_mbc(), "build", "-o", path],
        cwd=source,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"mbc build failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return path


def instance_config(overrides: dict[str, Any] | None = None, sealing: bool = False) -> str:
    """A full encstate config as YAML: base-config.yaml with ``overrides`` merged in. Sealing
    is off unless asked for, as World.bot has it."""
    config = merge(plugin_defaults(), {"seal": {"enabled": sealing}, **(overrides or {})})
    buf = io.StringIO()
    YAML().dump(config, buf)
    return buf.getvalue()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


class MaubotAPIError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body!r}")
        self.status = status
        self.body = body


class MaubotServer:
    """One ``python -m maubot`` process. ``database`` is a maubot database URL: None for a
    SQLite file in ``workdir``, or a ``postgresql://`` URL (plugins then get schemas in it)."""

    def __init__(
        self,
        synapse: Synapse,
        workdir: str | None = None,
        database: str | None = None,
        log_level: str = "DEBUG",
    ) -> None:
        self.synapse = synapse
        self.workdir = workdir or tempfile.mkdtemp(prefix="encstate-maubot-")
        os.makedirs(self.workdir, exist_ok=True)
        self.database = database or f"sqlite:{os.path.join(self.workdir, 'maubot.db')}"
        self.postgres = self.database.startswith(("postgres://", "postgresql://"))
        self.log_level = log_level
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_user = "encstate-admin"
        self.admin_password = f"pw-{uuid.uuid4().hex}"
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None
        self.bots: list[ServerBot] = []  # made by bot(), for the fixture to remove
        self._log_offset = 0
        for sub in ("plugins", "trash", "plugin-dbs"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)

    # Config and process -------------------------------------------------------------------------

    @property
    def config_path(self) -> str:
        return os.path.join(self.workdir, "config.yaml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "maubot.log")

    @property
    def plugin_db_dir(self) -> str:
        return os.path.join(self.workdir, "plugin-dbs")

    def write_config(self) -> None:
        yaml = YAML()
        maubot_dir = importlib.util.find_spec("maubot").submodule_search_locations[0]
        example = os.path.join(maubot_dir, "example-config.yaml")
        with open(example) as fh:
            config = yaml.load(fh)
        config["database"] = self.database
        config["crypto_database"] = "default"
        config["crypto_db_pickle_key"] = "encstate-test"
        config["database_opts"] = {"min_size": 1, "max_size": 10}
        config["plugin_directories"] = {
            "upload": os.path.join(self.workdir, "plugins"),
            "load": [os.path.join(self.workdir, "plugins")],
            "trash": os.path.join(self.workdir, "trash"),
        }
        config["plugin_databases"]["sqlite"] = self.plugin_db_dir
        config["plugin_databases"]["postgres"] = "default" if self.postgres else None
        server = config["server"]
        server["hostname"] = "127.0.0.1"
        server["port"] = self.port
        server["public_url"] = self.url
        server["unshared_secret"] = f"encstate-test-{uuid.uuid4().hex}"  # fixed: tokens survive
        config["homeservers"] = {
            self.synapse.server_name: {"url": self.synapse.url, "secret": SHARED_SECRET}
        }
        config["admins"] = {"root": "", self.admin_user: self.admin_password}
        config["logging"] = {
            "version": 1,
            "formatters": {"normal": {"format": LOG_FORMAT}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "normal",
                    "filename": self.log_path,
                }
            },
            "loggers": {
                "maubot": {"level": self.log_level},
                "maubot.client": {"level": "INFO"},
                "maubot.server": {"level": "INFO"},
                "mau": {"level": "INFO"},
                "aiohttp": {"level": "WARNING"},
            },
            "root": {"level": self.log_level, "handlers": ["file"]},
        }
        with open(self.config_path, "w") as fh:
            yaml.dump(config, fh)

    def start(self, timeout: float = 60) -> None:
        """Start the server (again, if it was stopped) and wait until the management API
        answers. The config is written once; maubot rewrites it (bcrypts the password)."""
        if not os.path.exists(self.config_path):
            self.write_config()
        self._log_offset = self.log_size()
        out = open(os.path.join(self.workdir, "stdout.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "maubot", "-c", self.config_path],
            cwd=self.workdir,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"maubot exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}{API}/features", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(
                    f"maubot's API did not answer within {timeout}s:\n{self.tail()}"
                )
            time.sleep(0.1)

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGINT (maubot stops its clients and instances) or SIGKILL."""
        stop_group(self.proc, kill, timeout=30)
        self.proc = None

    async def restart(self, kill: bool = False) -> None:
        """Stop (if running) and start again, without blocking the test's event loop; the
        bots' logs are read from the new start on (then ``await bot.wait_ready()``)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.stop, kill)
        for bot in self.bots:
            bot.mark()
        await loop.run_in_executor(None, self.start)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # Logs ---------------------------------------------------------------------------------------

    def log_size(self) -> int:
        return os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0

    def log_text(self, since: int | None = None, logger: str | None = None) -> str:
        """The log from byte ``since`` (default: since the last start); with ``logger``, only
        the records of loggers whose name contains it (with their continuation lines)."""
        if not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_offset if since is None else since)
            text = fh.read().decode(errors="replace")
        if logger is None:
            return text
        out, keep = [], False
        for line in text.splitlines(keepends=True):
            header = _HEADER.match(line)
            if header:
                keep = logger in header.group(1)
            if keep:
                out.append(line)
        return "".join(out)

    async def wait_for_log(
        self,
        pattern: str,
        timeout: float = 60,
        since: int | None = None,
        logger: str | None = None,
    ) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text(since, logger))
            if match:
                return match
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"maubot exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"maubot log never matched {pattern!r}:\n{self.tail()}")
            await asyncio.sleep(0.1)

    def tail(self, lines: int = 80) -> str:
        text = self.log_text(since=0).splitlines()[-lines:]
        out_path = os.path.join(self.workdir, "stdout.log")
        extra = ""
        if os.path.exists(out_path):
            with open(out_path, errors="replace") as fh:
                extra = "".join(fh.readlines()[-20:])
        return "\n".join(text) + ("\n--- stdout\n" + extra if extra.strip() else "")

    # Management API -----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        data: bytes | None = None,
        auth: bool = True,
        ok: tuple[int, ...] = (200, 201, 204),
    ) -> tuple[int, Any]:
        """One management API call; returns (status, JSON body). Raises MaubotAPIError for a
        status outside ``ok`` (maubot answers errors as JSON with ``error`` and ``errcode``)."""
        headers = {}
        if auth:
            if self.token is None:
                await self.login()
            headers["Authorization"] = f"Bearer {self.token}"
        if data is not None:
            headers["Content-Type"] = "application/zip"
        async with (
            ClientSession() as http,
            http.request(
                method, f"{self.url}{API}{path}", json=json, data=data, headers=headers
            ) as resp,
        ):
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = await resp.text()
            if resp.status not in ok:
                raise MaubotAPIError(method, path, resp.status, body)
            return resp.status, body

    async def login(self) -> str:
        """POST /auth/login with the configured admin; keeps and returns the token."""
        _, body = await self.request(
            "POST",
            "/auth/login",
            json={"username": self.admin_user, "password": self.admin_password},
            auth=False,
        )
        self.token = body["token"]
        return self.token

    async def upload_plugin(self, path: str) -> dict[str, Any]:
        """Upload an .mbp, replacing a plugin of the same ID (its instances restart)."""
        content = await asyncio.get_running_loop().run_in_executor(None, _read_bytes, path)
        _, body = await self.request("POST", "/plugins/upload?allow_override=true", data=content)
        return body

    async def plugins(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/plugins"))[1]

    async def put_client(
        self,
        user_id: str,
        access_token: str,
        homeserver: str | None = None,
        device_id: str | None = None,
        autojoin: bool = True,
        sync: bool = True,
        enabled: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """Create or update the client of ``user_id`` (PUT /client/{id}). Without a
        ``device_id`` the client has no end-to-end encryption."""
        payload: dict[str, Any] = {
            "homeserver": homeserver or self.synapse.url,
            "access_token": access_token,
            "autojoin": autojoin,
            "sync": sync,
            "enabled": enabled,
            "online": True,
            "displayname": "disable",
            "avatar_url": "disable",
            **extra,
        }
        if device_id is not None:
            payload["device_id"] = device_id
        return (await self.request("PUT", f"/client/{quote(user_id, safe='')}", json=payload))[1]

    async def get_client(self, user_id: str) -> dict[str, Any]:
        return (await self.request("GET", f"/client/{quote(user_id, safe='')}"))[1]

    async def delete_client(self, user_id: str) -> None:
        await self.request("DELETE", f"/client/{quote(user_id, safe='')}")

    async def put_instance(
        self,
        instance_id: str,
        primary_user: str | None = None,
        type: str | None = PLUGIN_ID,
        config: str | dict[str, Any] | None = None,
        enabled: bool | None = True,
        started: bool | None = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """Create or update an instance (PUT /instance/{id}); ``config`` as YAML text, or a
        dict of overrides for :func:`instance_config`. None leaves a field unchanged."""
        if isinstance(config, dict):
            config = instance_config(config)
        payload = {
            "primary_user": primary_user,
            "type": type,
            "config": config,
            "enabled": enabled,
            "started": started,
            **extra,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        return (await self.request("PUT", f"/instance/{quote(instance_id, safe='')}", payload))[1]

    async def get_instance(self, instance_id: str) -> dict[str, Any]:
        return (await self.request("GET", f"/instance/{quote(instance_id, safe='')}"))[1]

    async def delete_instance(self, instance_id: str) -> None:
        await self.request("DELETE", f"/instance/{quote(instance_id, safe='')}")

    # Bots ---------------------------------------------------------------------------------------

    async def new_account(self, localpart: str | None = None) -> tuple[str, str, str]:
        """Register a bot account on the test Synapse and log in: (user_id, token, device)."""
        loop = asyncio.get_running_loop()
        localpart = localpart or f"encstate-{uuid.uuid4().hex[:6]}"
        user_id = await loop.run_in_executor(None, self.synapse.register, localpart)
        token, device_id = await loop.run_in_executor(None, self.synapse.login, user_id)
        return user_id, token, device_id

    async def bot(
        self,
        config: dict[str, Any] | None = None,
        sealing: bool = False,
        with_device: bool = True,
        wait: bool = True,
    ) -> ServerBot:
        """A fresh bot account with a client (E2EE unless ``with_device`` is False) and a
        started encstate instance, ready (rescan done, first sync seen) unless ``wait`` is
        False."""
        user_id, token, device_id = await self.new_account()
        bot = ServerBot(self, user_id, token, device_id)
        bot.overrides = {"seal": {"enabled": sealing}, **(config or {})}
        self.bots.append(bot)
        await self.put_client(user_id, token, device_id=device_id if with_device else None)
        await self.put_instance(
            bot.instance_id, primary_user=user_id, config=instance_config(bot.overrides)
        )
        if wait:
            await bot.wait_ready()
        return bot


class ServerBot:
    """One bot account on a MaubotServer: its client and its encstate instance. Its log is
    the server log's records of this instance (``maubot.instance.<id>``) since ``mark()``."""

    def __init__(
        self, server: MaubotServer, user_id: str, access_token: str, device_id: str
    ) -> None:
        self.server = server
        self.user_id = user_id
        self.access_token = access_token
        self.device_id = device_id
        self.instance_id = f"encstate-{uuid.uuid4().hex[:8]}"
        self.overrides: dict[str, Any] = {}  # what its config changes of base-config.yaml
        self._offset = server.log_size()

    @property
    def logger(self) -> str:
        return f"maubot.instance.{self.instance_id}"

    @property
    def database(self) -> str:
        """The instance's own database, as a URL for World.store: maubot's SQLite file for
        it, or its schema (``mbp_<id>``) in maubot's PostgreSQL database."""
        if self.server.postgres:
            joiner = "&" if "?" in self.server.database else "?"
            return f"{self.server.database}{joiner}search_path=mbp_{self.instance_id}"
        return f"sqlite:{os.path.join(self.server.plugin_db_dir, self.instance_id + '.db')}"

    @property
    def running(self) -> bool:
        return self.server.running

    def mark(self) -> None:
        """Read this bot's log from here on (after a restart or a change)."""
        self._offset = self.server.log_size()

    def log_text(self, since_mark: bool = True, everything: bool = False) -> str:
        """This instance's log records (``everything``: all of the server's) since mark()."""
        return self.server.log_text(
            self._offset if since_mark else 0, logger=None if everything else self.logger
        )

    async def wait_for_log(
        self, pattern: str, timeout: float = 60, everything: bool = False
    ) -> re.Match:
        return await self.server.wait_for_log(
            pattern, timeout, since=self._offset, logger=None if everything else self.logger
        )

    async def wait_ready(self, timeout: float = 60) -> None:
        """As BotProcess.wait_ready: the start-up rescan is done and the instance saw a sync
        (an idle client's sync is a long poll: a to-device message to itself ends it)."""
        await self.wait_for_log(r"Rescanned \d+ room", timeout)
        try:
            await self.wait_for_log(r"Sync running", 0.3)
        except TimeoutError:
            await self.nudge()
            await self.wait_for_log(r"Sync running", timeout)

    async def nudge(self) -> None:
        async with ClientSession() as http:
            resp = await http.put(
                f"{self.server.synapse.url}/_matrix/client/v3/sendToDevice/"
                f"org.encstate.test.nudge/{uuid.uuid4()}",
                json={"messages": {self.user_id: {self.device_id: {}}}},
                headers={"Authorization": f"Bearer {self.access_token}"},
            )
            resp.raise_for_status()

    async def instance(self) -> dict[str, Any]:
        return await self.server.get_instance(self.instance_id)

    def config_text(self, changes: dict[str, Any] | None = None) -> str:
        """The YAML of the config it was created with, plus ``changes``."""
        return instance_config(merge(self.overrides, changes or {}))

    async def put_config(self, changes: dict[str, Any] | str) -> dict[str, Any]:
        """Replace the instance's config: YAML text, or changes on top of the config it was
        created with."""
        config = changes if isinstance(changes, str) else self.config_text(changes)
        return await self.server.put_instance(self.instance_id, config=config, type=None)

    async def remove(self) -> None:
        """Delete the instance (and its database) and the client, as far as they exist."""
        if self in self.server.bots:
            self.server.bots.remove(self)
        for method, path in (
            ("DELETE", f"/instance/{quote(self.instance_id, safe='')}"),
            ("DELETE", f"/client/{quote(self.user_id, safe='')}"),
        ):
            await self.server.request(method, path, ok=(200, 204, 404))

    def tail(self, lines: int = 80) -> str:
        return self.server.tail(lines)
