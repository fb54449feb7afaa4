"""A throwaway Synapse on 127.0.0.1 with SQLite, for tests, the demo and the benchmark.

Start it with :func:`start_synapse` (or the ``Synapse`` context manager); it lives in a
temporary directory, listens on a free loopback port, has its rate limits relaxed and no
outbound federation, and is stopped and removed on exit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any
import urllib.error
import urllib.request

import yaml

SERVER_NAME = "encstate.test"
SHARED_SECRET = "encstate-test-registration-secret"

# Generous limits: the tests drive floods on purpose and must reach the bot.
_RELAXED = {"per_second": 10000, "burst_count": 100000}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(workdir: str, port: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server_name": SERVER_NAME,
        "pid_file": os.path.join(workdir, "homeserver.pid"),
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {
            "name": "sqlite3",
            "args": {"database": os.path.join(workdir, "homeserver.db")},
        },
        "log_config": os.path.join(workdir, "log.yaml"),
        "media_store_path": os.path.join(workdir, "media"),
        "signing_key_path": os.path.join(workdir, "signing.key"),
        "report_stats": False,
        "enable_metrics": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "url_preview_enabled": False,
        "registration_shared_secret": SHARED_SECRET,
        "enable_registration": False,
        "presence": {"enabled": False},
        "bcrypt_rounds": 4,
        "use_frozen_dicts": False,
        "macaroon_secret_key": "encstate-test-macaroon",
        "form_secret": "encstate-test-form",
        "rc_message": _RELAXED,
        "rc_registration": _RELAXED,
        "rc_login": {"address": _RELAXED, "account": _RELAXED, "failed_attempts": _RELAXED},
        "rc_joins": {"local": _RELAXED, "remote": _RELAXED},
        "rc_joins_per_room": _RELAXED,
        "rc_invites": {"per_room": _RELAXED, "per_user": _RELAXED, "per_issuer": _RELAXED},
        "rc_key_requests": _RELAXED,
        "rc_room_creation": _RELAXED,
        "rc_3pid_validation": _RELAXED,
        "rc_admin_redaction": _RELAXED,
        "rc_media_create": _RELAXED,
        "rc_presence": {"per_user": _RELAXED},
        "rc_delayed_event_mgmt": _RELAXED,
        "max_event_delay_duration": "24h",
    }
    if extra:
        config.update(extra)
    return config


def _log_config(workdir: str) -> dict[str, Any]:
    return {
        "version": 1,
        "formatters": {"precise": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": os.path.join(workdir, "homeserver.log"),
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
        "root": {"level": "WARNING", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


class Synapse:
    """One Synapse process. ``url`` is its client API base URL."""

    def __init__(
        self,
        extra_config: dict[str, Any] | None = None,
        keep: bool = False,
        parent: str | None = None,
    ) -> None:
        """``parent``: where its working directory goes (the system's temporary directory by
        default; the scale benchmark uses memory, /dev/shm, to build big fixtures fast)."""
        self.workdir = tempfile.mkdtemp(prefix="encstate-synapse-", dir=parent)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server_name = SERVER_NAME
        self.extra_config = extra_config
        self.keep = keep
        self.proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def config_path(self) -> str:
        return os.path.join(self.workdir, "homeserver.yaml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "homeserver.log")

    def _write_config(self) -> None:
        os.makedirs(os.path.join(self.workdir, "media"), exist_ok=True)
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(_config(self.workdir, self.port, self.extra_config), fh)
        with open(os.path.join(self.workdir, "log.yaml"), "w") as fh:
            yaml.safe_dump(_log_config(self.workdir), fh)

    def start(self, timeout: float = 90) -> None:
        """Start the server (again, if it was stopped) and wait until it answers."""
        cmd = [sys.executable, "-m", "synapse.app.homeserver", "-c", self.config_path]
        if not os.path.exists(os.path.join(self.workdir, "signing.key")):
            subprocess.run(
                cmd + ["--generate-keys"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        stderr = open(os.path.join(self.workdir, "stderr.log"), "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, stdout=stderr, stderr=stderr, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Synapse exited early:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_matrix/client/versions", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError(f"Synapse did not answer within {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def tail(self, lines: int = 40) -> str:
        out = []
        for name in ("stderr.log", "homeserver.log"):
            path = os.path.join(self.workdir, name)
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    out.append(f"--- {name}\n" + "".join(fh.readlines()[-lines:]))
        return "\n".join(out)

    def __enter__(self) -> Synapse:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Accounts -------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def register(self, localpart: str, password: str = "password", admin: bool = False) -> str:
        """Register a user with the shared secret; returns the full user ID."""
        with urllib.request.urlopen(f"{self.url}/_synapse/admin/v1/register", timeout=10) as r:
            nonce = json.loads(r.read())["nonce"]
        mac = hmac.new(SHARED_SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join(p.encode() for p in (nonce, localpart, password)))
        mac.update(b"\x00" + (b"admin" if admin else b"notadmin"))
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        return self._post("/_synapse/admin/v1/register", body)["user_id"]

    def login(self, user_id: str, password: str = "password", device_id: str | None = None):
        """Log in; returns ``(access_token, device_id)``."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": password,
        }
        if device_id:
            body["device_id"] = device_id
        resp = self._post("/_matrix/client/v3/login", body)
        return resp["access_token"], resp["device_id"]
