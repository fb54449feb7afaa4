"""The plugin config: base-config.yaml, copied over on update and validated on load."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from mautrix.util.config import BaseProxyConfig, ConfigUpdateHelper, RecursiveDict
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from . import protocol
from .room_policy import Mode

KEYS = (
    "admins",
    "read_only_commands",
    "seal.enabled",
    "seal.preview_types",
    "push_on_join",
    "share_with_invited",
    "require_cross_signed",
    "allow_mixed_shared_history",
    "dry_run",
    "rate_limits.per_device.burst",
    "rate_limits.per_device.per_second",
    "rate_limits.per_user.burst",
    "rate_limits.per_user.per_second",
    "duplicate_window_seconds",
    "self_supply.enabled",
    "self_supply.retry_seconds",
    "backfill_limit",
    "audit_room",
    "audit_retention_days",
    "cross_signing.recovery_key",
    "cross_signing.bootstrap",
    "send_bundles",
    "approve_knocks",
    "web_token",
)


class ConfigError(ValueError):
    pass


def refusal(error: Exception) -> str:
    """Why an edited config was refused, in words safe to log: a YAML parser's message quotes
    the broken line (a recovery key, a token), so only its position and problem are told."""
    if isinstance(error, ConfigError):
        return str(error)
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        problem = getattr(error, "problem", None) or "a syntax error"
        return (
            f"the edited config is not valid YAML: {problem} at line {mark.line + 1}, "
            f"column {mark.column + 1}"
        )
    return f"the edited config does not have the expected shape ({type(error).__name__})"


def _need(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} must be {what}, not {value!r}")


def _find_base_config() -> str:
    """The copy inside the package when installed from a wheel (setup.py puts it there), else
    the repository's, one directory above the package (a checkout; maubot's .mbp)."""
    here = os.path.dirname(__file__)
    packaged = os.path.join(here, "base-config.yaml")
    if os.path.exists(packaged):
        return packaged
    return os.path.join(os.path.dirname(here), "base-config.yaml")


BASE_CONFIG = _find_base_config()


def _packaged_base() -> RecursiveDict[CommentedMap]:
    with open(BASE_CONFIG) as fh:
        return RecursiveDict(YAML().load(fh), CommentedMap)


class Config(BaseProxyConfig):
    def __init__(
        self,
        load: Callable[[], CommentedMap],
        load_base: Callable[[], RecursiveDict[CommentedMap] | None],
        save: Callable[[RecursiveDict[CommentedMap]], None],
    ) -> None:
        def base_with_defaults() -> RecursiveDict[CommentedMap] | None:
            # maubot's standalone mode hands plugins an empty base config; use ours then.
            base = load_base()
            if (base is None or "push_on_join" not in base) and os.path.exists(BASE_CONFIG):
                return _packaged_base()
            return base

        super().__init__(load, base_with_defaults, save)

    def do_update(self, helper: ConfigUpdateHelper) -> None:
        for key in KEYS:
            helper.copy(key)

    def load_and_update(self) -> None:
        super().load_and_update()
        self.validate()

    def proposed(self) -> Config:
        """The config as it now reads from maubot (after an edit in the manager), loaded and
        validated apart from this one, which stays as it was: raises ConfigError (or the YAML
        parser's error) if the edit is bad."""
        candidate = Config(self._load_proxy, self._load_base_proxy, lambda _data: None)
        candidate.load_and_update()
        return candidate

    def changed_keys(self, other: Config) -> list[str]:
        """The settings (``KEYS``) whose values differ between this config and ``other``."""
        return [key for key in KEYS if self[key] != other[key]]

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        admins = self["admins"]
        _need(
            isinstance(admins, list)
            and all(isinstance(a, str) and a.startswith("@") and ":" in a for a in admins),
            "admins",
            "a list of Matrix user IDs",
            admins,
        )
        _need(
            self["read_only_commands"] in ("members", "admins"),
            "read_only_commands",
            '"members" or "admins"',
            self["read_only_commands"],
        )
        for key in (
            "seal.enabled",
            "push_on_join",
            "share_with_invited",
            "require_cross_signed",
            "allow_mixed_shared_history",
            "dry_run",
            "self_supply.enabled",
            "cross_signing.bootstrap",
            "send_bundles",
            "approve_knocks",
        ):
            _need(isinstance(self[key], bool), key, "true or false", self[key])
        for key in (
            "rate_limits.per_device.burst",
            "rate_limits.per_user.burst",
            "backfill_limit",
            "audit_retention_days",
        ):
            value = self[key]
            _need(
                isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**9,
                key,
                "a whole number from 0 to 1000000000",
                value,
            )
        for key in (
            "rate_limits.per_device.per_second",
            "rate_limits.per_user.per_second",
            "duplicate_window_seconds",
            "self_supply.retry_seconds",
        ):
            value = self[key]
            _need(
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0,
                key,
                "a number >= 0",
                value,
            )
        preview = self["seal.preview_types"]
        _need(
            isinstance(preview, list)
            and all(isinstance(t, str) and t and t not in protocol.EXEMPT_TYPES for t in preview),
            "seal.preview_types",
            "a list of event types that can be encrypted",
            preview,
        )
        recovery_key = self["cross_signing.recovery_key"]
        _need(
            recovery_key is None or (isinstance(recovery_key, str) and recovery_key.strip()),
            "cross_signing.recovery_key",
            "null or the recovery key text",
            "(hidden)" if isinstance(recovery_key, str) else recovery_key,
        )
        web_token = self["web_token"]
        _need(
            web_token is None or (isinstance(web_token, str) and len(web_token.strip()) >= 16),
            "web_token",
            "null or a secret of at least 16 characters",
            "(hidden)" if isinstance(web_token, str) else web_token,
        )
        audit_room = self["audit_room"]
        _need(
            audit_room is None or (isinstance(audit_room, str) and audit_room.startswith("!")),
            "audit_room",
            "null or a room ID starting with '!'",
            audit_room,
        )

    @property
    def preview_types(self) -> tuple[str, ...]:
        return tuple(self["seal.preview_types"])

    @property
    def default_mode(self) -> Mode:
        return Mode.CROSS_SIGNED if self["require_cross_signed"] else Mode.MEMBERS
