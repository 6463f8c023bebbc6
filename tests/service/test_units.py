"""The systemd units `service install` writes: their settings, and `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent import cli as agent_cli
from agent import config as agent_config
from broker import cli as broker_cli
from broker.app import init_home
from sitepair.service.systemd import UnitSpec, render, write_unit
from tests.service.conftest import exec_start, setting

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package systemd; .ci/run installs it)",
)


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True
    )


def agent_home(root: Path, *, backend: str = "directory") -> Path:
    root.mkdir(parents=True)
    toml = agent_config.render(
        storage={"gold": str(root.parent / "gold")}, backend=backend, accel="tcg"
    )
    (root / "agent.toml").write_text(toml)
    return root


def test_broker_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = init_home(tmp_path / "broker", vault="v1")
    units = tmp_path / "units"
    args = ["service", "install", "--home", str(home.root), "--unit-dir", str(units)]
    assert broker_cli.main([*args, "--no-enable", "--user", "daemon"]) == 0
    out = capsys.readouterr().out
    # The home belongs to whoever runs the test, not to the service's account.
    assert f"chown -R daemon: {home.root}" in out
    assert "systemctl daemon-reload" in out
    unit = units / "sitepair-broker.service"
    assert setting(unit, "Type") == "notify"
    assert setting(unit, "NotifyAccess") == "main"
    assert setting(unit, "Restart") == "on-failure"
    assert setting(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert setting(unit, "User") == "daemon"
    assert setting(unit, "ReadWritePaths") == f"-{home.root.absolute()}"
    assert setting(unit, "EnvironmentFile") == "-/etc/sitepair/sitepair-broker.env"
    argv = exec_start(unit)
    assert Path(argv[0]).is_absolute()
    assert argv[-3:] == ["serve", "--home", str(home.root.absolute())]


def test_agent_unit_opens_its_storage_only(tmp_path: Path) -> None:
    home = agent_home(tmp_path / "agent")
    units = tmp_path / "units"
    args = ["service", "install", "--home", str(home), "--unit-dir", str(units), "--no-enable"]
    assert agent_cli.main(args) == 0
    unit = units / "sitepair-agent.service"
    paths = setting(unit, "ReadWritePaths").split()
    assert paths == [
        f"-{home}",
        f"-{home / 'vms'}",
        f"-{tmp_path / 'gold'}",
        f"-{home / 'replicas'}",
    ]
    assert setting(unit, "PrivateDevices") == "yes"
    assert setting(unit, "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    assert exec_start(unit)[-3:] == ["run", "--home", str(home)]


def test_qemu_agent_keeps_host_devices(tmp_path: Path) -> None:
    home = agent_home(tmp_path / "agent", backend="qemu")
    args = ["service", "install", "--home", str(home), "--unit-dir", str(tmp_path / "u")]
    assert agent_cli.main([*args, "--no-enable"]) == 0
    unit = tmp_path / "u" / "sitepair-agent.service"
    assert setting(unit, "PrivateDevices") == "no"
    # ProtectClock= closes the device list: KVM and taps are named.
    assert "DeviceAllow=/dev/kvm rw" in unit.read_text()
    assert "DeviceAllow=/dev/net/tun rw" in unit.read_text()
    assert "AF_NETLINK" in setting(unit, "RestrictAddressFamilies")


def test_install_refuses_an_unknown_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = init_home(tmp_path / "broker", vault="v1")
    args = ["service", "install", "--home", str(home.root), "--unit-dir", str(tmp_path / "u")]
    assert broker_cli.main([*args, "--no-enable", "--user", "no-such-sitepair-user"]) == 1
    err = capsys.readouterr().err
    assert "there is no user 'no-such-sitepair-user'" in err
    assert "useradd --system" in err
    assert not (tmp_path / "u").exists()


def test_install_on_a_folder_that_is_no_home_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["service", "install", "--home", str(tmp_path), "--unit-dir", str(tmp_path / "u")]
    assert broker_cli.main([*args, "--no-enable"]) == 1
    err = capsys.readouterr().err
    assert "no broker configuration" in err
    assert not (tmp_path / "u").exists()


def test_remove_and_status_without_systemd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = agent_home(tmp_path / "agent")
    base = ["--home", str(home), "--unit-dir", str(tmp_path / "u")]
    assert agent_cli.main(["service", "install", *base, "--no-enable"]) == 0
    if not Path("/run/systemd/system").is_dir():
        assert agent_cli.main(["service", "status", *base]) == 0
        out = capsys.readouterr().out
        assert "systemd is not running" in out
        assert f"run --home {home}" in out
    assert agent_cli.main(["service", "remove", *base, "--no-enable"]) == 0
    assert not (tmp_path / "u" / "sitepair-agent.service").exists()


@needs_analyze
@pytest.mark.parametrize("backend", ["directory", "qemu"])
def test_agent_units_verify(tmp_path: Path, backend: str) -> None:
    home = agent_home(tmp_path / "agent", backend=backend)
    args = ["service", "install", "--home", str(home), "--unit-dir", str(tmp_path / "u")]
    assert agent_cli.main([*args, "--no-enable", "--user", "root"]) == 0
    done = verify(tmp_path / "u" / "sitepair-agent.service")
    assert done.returncode == 0, done.stderr


@needs_analyze
def test_broker_unit_verifies(tmp_path: Path) -> None:
    home = init_home(tmp_path / "broker", vault="v1")
    args = ["service", "install", "--home", str(home.root), "--unit-dir", str(tmp_path / "u")]
    assert broker_cli.main([*args, "--no-enable"]) == 0
    done = verify(tmp_path / "u" / "sitepair-broker.service")
    assert done.returncode == 0, done.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit whose program does not exist is refused."""
    spec = UnitSpec(
        name="broken",
        description="x",
        exec_start=(str(tmp_path / "no-such-program"), "run"),
        writable=(tmp_path,),
    )
    done = verify(write_unit(spec, tmp_path / "u"))
    assert done.returncode != 0


def test_arguments_are_quoted_for_systemd(tmp_path: Path) -> None:
    spec = UnitSpec(
        name="q", description="x", exec_start=("/bin/prog", "a b", "50%", "$HOME"), writable=()
    )
    line = next(x for x in render(spec).splitlines() if x.startswith("ExecStart="))
    assert line == 'ExecStart=/bin/prog "a b" 50%% $$HOME'
