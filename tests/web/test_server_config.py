"""``[dashboard]`` in broker.toml: what ``init`` writes, and settings refused with clear errors."""

from __future__ import annotations

import pytest

from broker import config as config_mod
from broker.config import DashboardConfig
from sitepair.errors import ConfigError


def _render() -> str:
    return config_mod.render(
        "vault", enrollment="127.0.0.1:8444", control="127.0.0.1:8443", names=("localhost",)
    )


def _with(settings: str) -> str:
    return f'vault = "v"\n[dashboard]\n{settings}\n'


def test_init_writes_the_section_turned_off_with_its_defaults() -> None:
    cfg = config_mod.parse(_render())
    assert cfg.dashboard == DashboardConfig()
    assert not cfg.dashboard.enabled
    assert cfg.dashboard.listen == "127.0.0.1:9443"
    assert cfg.dashboard.session_lifetime == 8 * 3600
    assert config_mod.parse('vault = "v"\n').dashboard == DashboardConfig()  # section optional


def test_settings_are_read() -> None:
    text = _render().replace('session_lifetime = "8h"', 'session_lifetime = "30m"')
    text = text.replace('listen = "127.0.0.1:9443"', 'listen = "[::1]:0"')
    cfg = config_mod.parse(
        text.replace('enabled = false\nlisten = "[::1]', 'enabled = true\nlisten = "[::1]')
    )
    assert cfg.dashboard.enabled and cfg.dashboard.listen == "[::1]:0"
    assert cfg.dashboard.session_lifetime == 1800


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('tls_cert = "a.crt"', r"\[dashboard\] tls_cert and tls_key go together"),
        ('session_lifetime = "2d"', r"session_lifetime must be between 1m and 24h, not 2d"),
        ('session_lifetime = "10s"', r"session_lifetime must be between 1m and 24h"),
        ('session_lifetime = "soon"', r"session_lifetime"),
        ('enabled = "yes"', r"\[dashboard\]\.enabled must be true or false"),
        ('password = "x"', r"unknown setting\(s\) in .*\[dashboard\]: password"),
    ],
)
def test_bad_settings_are_refused_naming_them(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_mod.parse(_with(text))


def test_a_listen_address_that_is_not_host_port_is_refused() -> None:
    text = _render().replace('listen = "127.0.0.1:9443"', 'listen = "dashboard"')
    with pytest.raises(ConfigError, match=r"\[dashboard\] listen") as err:
        config_mod.parse(text)
    assert err.value.hint
