from __future__ import annotations

from mautrix.util.config import RecursiveDict
import pytest
from ruamel.yaml import YAML

from encstate_bot.config import BASE_CONFIG, KEYS, Config, ConfigError


def load(overrides: dict) -> Config:
    with open(BASE_CONFIG) as fh:
        base = YAML().load(fh)
    config = Config(
        load=lambda: overrides, load_base=lambda: RecursiveDict(base), save=lambda c: None
    )
    config.load_and_update()
    return config


def test_defaults_are_valid_and_documented() -> None:
    config = load({})
    assert config["push_on_join"] is True and config["rate_limits.per_device.burst"] == 200
    with open(BASE_CONFIG) as fh:
        text = fh.read()
    for key in KEYS:
        assert key.split(".")[-1] + ":" in text


def test_standalone_mode_falls_back_to_the_packaged_base() -> None:
    # maubot's standalone mode hands plugins an empty base config
    config = Config(load=lambda: {"dry_run": True}, load_base=lambda: None, save=lambda c: None)
    config.load_and_update()
    assert config["dry_run"] is True and config["backfill_limit"] == 2000


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"admins": "@a:x"}, "admins"),
        ({"admins": ["not-a-user"]}, "admins"),
        ({"push_on_join": "yes"}, "push_on_join"),
        ({"read_only_commands": "everyone"}, "read_only_commands"),
        ({"rate_limits": {"per_device": {"burst": -1}}}, "rate_limits.per_device.burst"),
        ({"rate_limits": {"per_user": {"per_second": "fast"}}}, "rate_limits.per_user.per_second"),
        ({"audit_room": "#alias:x"}, "audit_room"),
        ({"backfill_limit": 1.5}, "backfill_limit"),
    ],
)
def test_bad_values_name_their_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load(overrides)
