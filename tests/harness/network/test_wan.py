"""WAN profiles and the Network facade in loopback mode (runs anywhere, no privileges)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.harness.network import netns as netns_mod
from tests.harness.network.echo import EchoServer, exchange, roundtrip_time
from tests.harness.network.netns import NetnsUnavailable
from tests.harness.network.network import Network
from tests.harness.network.wan import LAN, LOSSY, METRO, PROFILES, WAN, WanProfile, profile


def test_named_profiles_say_what_they_are() -> None:
    assert set(PROFILES) == {"lan", "metro", "wan", "lossy"}
    assert (LAN.delay_ms, LAN.rate_mbit, LAN.stall_probability) == (0, 0, 0)
    assert (METRO.delay_ms, METRO.rate_mbit) == (5, 120)
    assert (WAN.delay_ms, WAN.jitter_ms, WAN.rate_mbit) == (100, 20, 10)
    assert WAN.stall_probability == 0.01 and WAN.stall_ms == 3 * WAN.rtt_ms == 600
    assert LOSSY.burst_probability > 0 and LOSSY.reset_per_mib > 0
    assert WAN.rate_bytes == 1_250_000
    assert all(p.description for p in PROFILES.values())
    assert profile("metro") is METRO
    with pytest.raises(ValueError, match="known: lan, metro, wan, lossy"):
        profile("satellite")


def test_profiles_are_frozen_and_validated() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        WAN.delay_ms = 1  # type: ignore[misc]
    assert WAN.replace(rate_mbit=100).rate_mbit == 100 and WAN.rate_mbit == 10
    with pytest.raises(ValueError, match="delay_ms"):
        WanProfile(name="bad", delay_ms=-1)
    with pytest.raises(ValueError, match="stall_probability"):
        WanProfile(name="bad", stall_probability=1.5)


def test_loopback_network_links_shapes_and_breaks(echo: EchoServer) -> None:
    with Network.create("loopback") as net:
        assert net.mode == "loopback"
        assert net.broker_host() == net.agent_host("a") == net.agent_host("b") == "127.0.0.1"
        assert net.command(["true"], "a") == ["true"]
        host, port = net.link("a", "b", *echo.address)
        with socket.create_connection((host, port), timeout=20) as sock:
            roundtrip_time(sock)
            net.apply(LAN.replace(name="slow", delay_ms=100))
            assert net.profile.name == "slow"
            assert roundtrip_time(sock) >= 0.2
            net.apply(LAN)
            net.partition()
            assert exchange(sock, b"x")[0] == b""
        net.heal()
        with socket.create_connection((host, port), timeout=20) as sock:
            roundtrip_time(sock)
        with pytest.raises(ValueError, match="namespace mode"):
            net.partition(isolate="b")
        assert net.stats.partitions == 1 and net.stats.dropped == 1
        assert net.bytes_moved() > 0
        with pytest.raises(KeyError):
            net.link("a", "c", *echo.address)


def test_loopback_network_runs_processes_and_kills_survivors_at_teardown() -> None:
    with Network.create("loopback") as net:
        done = net.run("a", [sys.executable, "-c", "print('hi')"], capture_output=True, text=True)
        assert done.stdout.strip() == "hi"
        proc = net.popen("broker", [sys.executable, "-c", "import time; time.sleep(60)"])
        port = net.free_port("b")
        assert 0 < port < 65536
    assert proc.wait(5) != 0  # killed by the teardown


def test_netns_mode_says_clearly_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = netns_mod.netns_unavailable_reason()
    assert reason is not None and "root" in reason
    with (
        pytest.raises(NetnsUnavailable, match=r"namespace mode is unavailable: .*root"),
        Network.create("netns"),
    ):
        pass
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "iproute2" in (netns_mod.netns_unavailable_reason() or "")


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="loopback' or 'netns'"), Network.create("vlan"):  # type: ignore[arg-type]
        pass


def test_ip_commands_fail_loudly() -> None:
    with pytest.raises(netns_mod.NetnsError, match="exit"):
        netns_mod._run(["ip", "link", "show", "dev", "no-such-device-x"])
    assert subprocess.run(["true"]).returncode == 0
