"""encstate in maubot's standalone mode, as a child process, against a test Synapse."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any
import urllib.request
import uuid

from ruamel.yaml import YAML

from .synapse import Synapse, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plugin_defaults() -> dict[str, Any]:
    with open(os.path.join(ROOT, "base-config.yaml")) as fh:
        return dict(YAML(typ="safe").load(fh))


def stop_group(proc: subprocess.Popen | None, kill: bool, timeout: float) -> None:
    """Stop a child started in its own session: SIGINT (clean) or SIGKILL (abrupt), SIGKILL
    after ``timeout`` seconds if SIGINT was not enough."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class BotProcess:
    """Runs ``python -m maubot.standalone -c config.yaml -m maubot.yaml`` for one bot account."""

    def __init__(
        self,
        synapse: Synapse,
        user_id: str,
        access_token: str,
        device_id: str,
        database: str | None = None,
        plugin_config: dict[str, Any] | None = None,
        workdir: str | None = None,
        log_level: str = "DEBUG",
        homeserver: str | None = None,
        ignore_first_sync: bool = True,
        database_opts: dict[str, Any] | None = None,
        schema: str | None = None,
    ) -> None:
        """``ignore_first_sync``: maubot's default skips the first sync after a start; false
        lets the client's Olm machine take the room keys in it (README, standalone).
        ``database_opts``: more of the standalone config's ``database_opts`` (asyncpg's pool
        arguments), merged into the defaults. ``schema``: the PostgreSQL schema the bot keeps
        all its tables in, set as the README tells standalone operators to
        (``server_settings: {search_path: <schema>}``); the schema must exist."""
        self.synapse = synapse
        self.ignore_first_sync = ignore_first_sync
        self.homeserver = homeserver or synapse.url
        self.user_id = user_id
        self.access_token = access_token
        self.device_id = device_id
        self.workdir = workdir or tempfile.mkdtemp(prefix="encstate-bot-")
        self.database = database or f"sqlite:{os.path.join(self.workdir, 'bot.db')}"
        self.plugin_config = merge(plugin_defaults(), plugin_config or {})
        self.schema = schema
        self.database_opts = merge({"min_size": 1, "max_size": 10}, database_opts or {})
        if schema is not None:
            self.database_opts = merge(
                self.database_opts, {"server_settings": {"search_path": schema}}
            )
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0
        self.port = free_port()  # the plugin's web app: health and metrics

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> str:
        return os.path.join(self.workdir, "config.yaml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "bot.log")

    def write_config(self) -> None:
        config = {
            "user": {
                "credentials": {
                    "id": self.user_id,
                    "homeserver": self.homeserver,
                    "access_token": self.access_token,
                    "device_id": self.device_id,
                },
                "sync": True,
                "appservice": False,
                "hs_token": None,
                "autojoin": True,
                "displayname": "disable",
                "avatar_url": "disable",
                "ignore_initial_sync": True,
                "ignore_first_sync": self.ignore_first_sync,
            },
            "server": {
                "hostname": "127.0.0.1",
                "port": self.port,
                "base_path": "/",
                "public_url": "http://127.0.0.1",
            },
            "database": self.database,
            "crypto_db_pickle_key": "encstate-test",
            "database_opts": self.database_opts,
            "plugin_config": self.plugin_config,
            "logging": {
                "version": 1,
                "formatters": {
                    "plain": {"format": "[%(asctime)s] [%(levelname)s@%(name)s] %(message)s"}
                },
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "formatter": "plain",
                        "filename": self.log_path,
                    }
                },
                "loggers": {
                    "maubot": {"level": self.log_level},
                    "maubot.client": {"level": "INFO"},
                    "mau": {"level": "INFO"},
                    "aiohttp": {"level": "WARNING"},
                },
                "root": {"level": self.log_level, "handlers": ["file"]},
            },
        }
        with open(self.config_path, "w") as fh:
            YAML().dump(config, fh)

    def start(self) -> None:
        self.write_config()
        self._log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        out = open(os.path.join(self.workdir, "stdout.log"), "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "maubot.standalone",
                "-c",
                self.config_path,
                "-m",
                os.path.join(ROOT, "maubot.yaml"),
            ],
            cwd=self.workdir,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )

    def stop(self, kill: bool = False) -> None:
        """Stop the bot: SIGINT (clean) or SIGKILL (abrupt)."""
        stop_group(self.proc, kill, timeout=20)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, since_start: bool = True) -> str:
        if not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as fh:
            if since_start:
                fh.seek(self._log_offset)
            return fh.read()

    async def wait_for_log(self, pattern: str, timeout: float = 60) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bot exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"bot log never matched {pattern!r}:\n{self.tail()}")
            await asyncio.sleep(0.1)

    async def wait_ready(self, timeout: float = 60) -> None:
        """Until the start-up rescan is done and the first sync was seen (maubot ignores that
        one, invites included, so a test must not invite the bot before it)."""
        await self.wait_for_log(r"Rescanned \d+ room", timeout)
        try:
            await self.wait_for_log(r"Sync running", 2)
        except TimeoutError:
            # After a restart the first sync is a long poll that returns only when something
            # happens: make something happen (a to-device message to the bot itself).
            await asyncio.get_running_loop().run_in_executor(None, self._nudge)
            await self.wait_for_log(r"Sync running", timeout)

    def _nudge(self) -> None:
        body = json.dumps({"messages": {self.user_id: {self.device_id: {}}}}).encode()
        req = urllib.request.Request(
            f"{self.synapse.url}/_matrix/client/v3/sendToDevice/org.encstate.test.nudge/"
            f"{uuid.uuid4()}",
            data=body,
            method="PUT",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.access_token}",
            },
        )
        urllib.request.urlopen(req, timeout=10).close()

    def tail(self, lines: int = 60) -> str:
        text = self.log_text(since_start=False).splitlines()[-lines:]
        out_path = os.path.join(self.workdir, "stdout.log")
        extra = ""
        if os.path.exists(out_path):
            with open(out_path, errors="replace") as fh:
                extra = "".join(fh.readlines()[-20:])
        return "\n".join(text) + ("\n--- stdout\n" + extra if extra else "")
