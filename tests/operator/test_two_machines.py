"""Two machines, not one: ``init`` and ``register`` take the addresses to listen on and to
advertise, refuse bad ones before they write anything, and what they advertise is what the
broker's certificate names, what credentials files and agents are told, and what a source host
dials to reach a replica host.

The end-to-end test runs on this one machine: everything listens on 0.0.0.0 and each component
advertises its own loopback address (127.0.0.2, .3, .4), so a component reached at all was
reached at the address it advertised, not at the one it listens on.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent.cli import main as agent_main
from agent.hosts.directory import DirectoryBackend
from broker.cli import main as broker_main
from broker.client import AdminClient, wait_job
from broker.home import BrokerHome
from sitepair import addresses, credentials, pki
from sitepair.errors import InvalidArgument
from sitepair.v1 import admin_pb2
from tests.protection.conftest import eventually, inventory_has
from tests.support.agents import AgentThread
from tests.support.brokers import BrokerThread, tune_timings

# -- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("0.0.0.0:8443", "0.0.0.0", 8443),
        ("192.0.2.10:1", "192.0.2.10", 1),
        ("[2001:db8::10]:8444", "2001:db8::10", 8444),
        ("DR-Broker.example.com:65535", "dr-broker.example.com", 65535),
        ("localhost:0", "localhost", 0),
    ],
)
def test_host_port_accepted(text: str, host: str, port: int) -> None:
    assert addresses.check_host_port(text, "--control", allow_zero=True) == (host, port)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8443", "is not HOST:PORT"),
        ("broker:", "is not HOST:PORT"),
        ("broker:http", "not a port number"),
        ("broker:65536", "65536 is not a port"),
        ("broker:0", "0 is not a port"),
        ("2001:db8::10:8443", "IPv6 address in brackets"),
        ("256.1.1.1:8443", "not an IP address or DNS name"),
        ("under_score:8443", "not an IP address or DNS name"),
        ("-dash.example:8443", "not an IP address or DNS name"),
    ],
)
def test_host_port_refused_naming_the_option(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        addresses.check_host_port(text, "--control")
    assert caught.value.message.startswith("--control")


def test_wildcard_and_loopback() -> None:
    assert addresses.is_wildcard("0.0.0.0") and addresses.is_wildcard("::")
    assert not addresses.is_wildcard("192.0.2.1")
    assert addresses.is_loopback("localhost") and addresses.is_loopback("127.0.0.5")
    assert addresses.join("2001:db8::1", 8084) == "[2001:db8::1]:8084"


# -- init ---------------------------------------------------------------------------------------


def run_broker(*args: str, capsys: pytest.CaptureFixture[str], status: int = 0) -> str:
    try:
        got = broker_main(list(args))
    except SystemExit as exc:
        got = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert got == status, (args, out, err)
    return out if status == 0 else err


def sans(home: BrokerHome) -> tuple[set[str], set[str]]:
    """The serving certificate's DNS names and IP addresses, read with ``cryptography``."""
    cert = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(ext.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_init_advertises_and_the_certificate_names_what_it_advertises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = BrokerHome(tmp_path / "broker")
    out = run_broker(
        *("init", "--home", str(home.root), "--vault", "v1"),
        *("--enrollment", "0.0.0.0:18444", "--control", "0.0.0.0:18443"),
        *("--advertise", "192.0.2.10", "--advertise", "DR-Broker.example.com"),
        *("--advertise", "2001:db8::10", "--server-name", "broker.internal"),
        capsys=capsys,
    )
    assert "agents enroll  192.0.2.10:18444, dr-broker.example.com:18444, [2001" in out, out
    dns, ips = sans(home)
    assert dns == {pki.BROKER_DNS_NAME, "localhost", "dr-broker.example.com", "broker.internal"}
    assert ips == {"127.0.0.1", "192.0.2.10", "2001:db8::10"}
    cfg = tomllib.loads(home.config.read_text())
    assert cfg["listen"] == {"enrollment": "0.0.0.0:18444", "control": "0.0.0.0:18443"}
    assert cfg["advertise"]["enrollment"] == [
        "192.0.2.10:18444",
        "dr-broker.example.com:18444",
        "[2001:db8::10]:18444",
    ]
    assert cfg["advertise"]["control"][0] == "192.0.2.10:18443"
    # The home's own operator dials this machine, not the wildcard.
    profile = json.loads((home.admin_dir / "profile.json").read_text())
    assert profile["addresses"] == ["127.0.0.1:18443"]


def test_init_without_advertise_keeps_the_one_machine_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = BrokerHome(tmp_path / "broker")
    run_broker("init", "--home", str(home.root), "--vault", "v1", capsys=capsys)
    assert sans(home) == ({pki.BROKER_DNS_NAME, "localhost"}, {"127.0.0.1"})
    # A specific listen address is what agents dial, so the certificate names it too.
    other = BrokerHome(tmp_path / "other")
    run_broker(
        *("init", "--home", str(other.root), "--vault", "v1"),
        *("--enrollment", "192.0.2.20:8444", "--control", "192.0.2.20:8443"),
        capsys=capsys,
    )
    assert "192.0.2.20" in sans(other)[1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--enrollment", "0.0.0.0:8444"], "--enrollment listens on 0.0.0.0, which agents"),
        (["--control", "[::]:8443"], "--control listens on ::, which agents cannot dial"),
        (["--control", "127.0.0.1:70000"], "--control: 70000 is not a port"),
        (["--enrollment", "broker"], "--enrollment 'broker' is not HOST:PORT"),
        (["--advertise", "0.0.0.0"], "--advertise 0.0.0.0 is not an address"),
        (["--advertise", "dr_broker"], "--advertise 'dr_broker' is not an IP address or DNS"),
        (["--control", "127.0.0.1:0", "--advertise", "192.0.2.1"], "fixed ports"),
        (["--server-name", "a..b"], "--server-name 'a..b' is not an IP address or DNS name"),
    ],
)
def test_init_refuses_a_bad_address_before_making_the_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    root = tmp_path / "broker"
    err = run_broker(
        "init", "--home", str(root), "--vault", "v1", *options, capsys=capsys, status=1
    )
    assert message in err, err
    assert "Traceback" not in err
    assert not root.exists()


def test_serve_refuses_a_wildcard_listen_address_with_nothing_advertised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker.toml edited by hand to listen on every interface would hand 0.0.0.0 to agents."""
    home = BrokerHome(tmp_path / "broker")
    run_broker("init", "--home", str(home.root), "--vault", "v1", capsys=capsys)
    text = home.config.read_text().replace('"127.0.0.1:8444"', '"0.0.0.0:8444"')
    home.config.write_text(text)
    err = run_broker("serve", "--home", str(home.root), capsys=capsys, status=1)
    assert "[listen] enrollment is on 0.0.0.0, which agents cannot dial" in err, err
    assert "[advertise] enrollment" in err


# -- register -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--listen", "0.0.0.0"], "--listen 0.0.0.0 (every interface) needs --advertise"),
        (["--listen", "10.0.0.999"], "--listen '10.0.0.999' is not an IP address or DNS name"),
        (["--advertise", "::"], "--advertise :: is not an address other hosts can dial"),
        (["--advertise", "host name"], "--advertise 'host name' is not an IP address"),
    ],
)
def test_register_refuses_a_bad_address_before_making_the_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    creds = tmp_path / "key.json"  # never read: the options are refused first
    home = tmp_path / "agent"
    argv = ["register", "--credentials", str(creds), "--name", "hv-x", "--home", str(home)]
    assert agent_main([*argv, *options]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert not home.exists()


def test_register_refuses_an_advertised_port_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["register", "--credentials", "k", "--name", "hv-x", "--home", str(tmp_path / "a")]
    with pytest.raises(SystemExit) as caught:
        agent_main([*argv, "--advertise-ticket-port", "65536"])
    assert caught.value.code == 2
    assert "65536 is not a port" in capsys.readouterr().err


# -- end to end ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def advertised_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[BrokerThread, int, int]]:
    """A broker on every interface that advertises 127.0.0.2, made with ``init``'s options."""
    enroll, control = free_port(), free_port()
    home = BrokerHome(tmp_path / "broker")
    run_broker(
        *("init", "--home", str(home.root), "--vault", "test"),
        *("--enrollment", f"0.0.0.0:{enroll}", "--control", f"0.0.0.0:{control}"),
        *("--advertise", "127.0.0.2"),
        capsys=capsys,
    )
    tune_timings(home)
    broker = BrokerThread(home)
    try:
        yield broker, enroll, control
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("replica_listen", "replica_advertise"),
    [("0.0.0.0", "127.0.0.4"), ("::", "::1")],
    ids=["ipv4", "ipv6"],
)
def test_hosts_registered_with_listen_and_advertise_replicate_through_advertised_addresses(
    advertised_broker: tuple[BrokerThread, int, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    replica_listen: str,
    replica_advertise: str,
) -> None:
    broker, enroll, control = advertised_broker
    admin = broker.admin()
    agents: list[AgentThread] = []
    try:
        hosts = {
            "hv-a1": ("site-a", "0.0.0.0", "127.0.0.3"),
            "hv-b1": ("site-b", replica_listen, replica_advertise),
        }
        for name, (site, listen, advertised) in hosts.items():
            creds = tmp_path / f"{name}.json"
            run_broker(
                *("--home", str(broker.home.root), "keys", "create", "--site", site),
                *("--out", str(creds)),
                capsys=capsys,
            )
            # keys create writes the advertised enrollment address, not the wildcard.
            assert credentials.load(creds).enrollment_addresses == (f"127.0.0.2:{enroll}",)
            home = tmp_path / name
            net = "corp-a" if site == "site-a" else "corp-b"
            got = agent_main(
                [
                    *("register", "--credentials", str(creds), "--name", name),
                    *("--home", str(home), "--vm-root", "gold/vms"),
                    *("--storage", f"gold={home / 'gold'}", "--network", f"{net}=10.0.0.0/24"),
                    *("--certificate-port", "0", "--ticket-port", "0"),
                    *("--listen", listen, "--advertise", advertised),
                ]
            )
            assert got == 0, capsys.readouterr()
            cfg = tomllib.loads((home / "agent.toml").read_text())["replication"]
            assert (cfg["listen_host"], cfg["advertise_host"]) == (listen, advertised)
            agent = AgentThread(home)
            agents.append(agent)
            agent.wait_connected()
            # The broker told the agent where to reach it: the advertised control address.
            assert agent.daemon.identity.get().control_addresses == (f"127.0.0.2:{control}",)

        # Each host reports the address it advertised in its facts.
        servers = {
            s.name: s
            for s in admin.call(admin.stub.ListServers, admin_pb2.ListServersRequest()).servers
        }
        for name, (_, _, advertised) in hosts.items():
            assert servers[name].facts.replication_host == advertised

        pair(admin)
        source = agents[0]
        home_a = tmp_path / "hv-a1"
        DirectoryBackend(home_a / "gold" / "vms", storage=(("gold", home_a / "gold"),)).create_vm(
            "web01", disks=[("os", "vhdx", 4 << 20)], cpu=1, memory_mb=256, nics=[("n", "corp-a")]
        )
        eventually(lambda: inventory_has(admin, "web01"), what="VM in inventory")
        job = admin.call(admin.stub.ProtectVm, admin_pb2.ProtectVmRequest(vm="web01"))
        done = wait_job(admin, job.id)
        assert done.state == "succeeded", (done.error, [(s.name, s.message) for s in done.steps])
        # ConfigureSource named the replica host's advertised address (an IPv6 one in
        # brackets), and the initial replication above went through it.
        (relationship,) = source.daemon.replication.sources.values()
        assert relationship.config.address == addresses.join(
            replica_advertise, servers["hv-b1"].facts.certificate_port
        )
        host, port = addresses.check_host_port(relationship.config.address, "address")
        assert host == replica_advertise
        assert port == servers["hv-b1"].facts.certificate_port
        assert ipaddress.ip_address(host).is_loopback  # this machine, through the wildcard
    finally:
        for agent in agents:
            agent.stop()
        admin.close()


def pair(admin: AdminClient) -> None:
    """cloud-a (hv-a1) protected to cloud-b (hv-b1), certificate authentication."""
    for cloud, site, host in (("cloud-a", "site-a", "hv-a1"), ("cloud-b", "site-b", "hv-b1")):
        admin.call(admin.stub.CreateCloud, admin_pb2.CreateCloudRequest(name=cloud, site=site))
        admin.call(admin.stub.AddCloudHost, admin_pb2.CloudHostRequest(cloud=cloud, server=host))
    policy = admin_pb2.Policy(
        copy_frequency_seconds=300, recovery_points=0, authentication="certificate"
    )
    job = admin.call(
        admin.stub.PairClouds,
        admin_pb2.PairCloudsRequest(primary="cloud-a", recovery="cloud-b", policy=policy),
    )
    assert wait_job(admin, job.id).state == "succeeded"
    admin.call(
        admin.stub.Map, admin_pb2.MapRequest(kind="network", source="corp-a", target="corp-b")
    )
    admin.call(admin.stub.Map, admin_pb2.MapRequest(kind="storage", source="gold", target="gold"))


def test_a_broker_behind_nat_is_reached_on_the_ports_its_config_advertises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NAT maps other ports (and another address) onto the broker's: the operator writes the
    outside addresses into ``[advertise]`` (docs/operator-guide.md), and registration and the
    control stream both go through the mapping, although the broker's certificate does not
    name the outside address (agents verify ``broker.sitepair``)."""
    from tests.harness.network.proxy import FaultProxy

    enroll, control = free_port(), free_port()
    home = BrokerHome(tmp_path / "broker")
    run_broker(
        *("init", "--home", str(home.root), "--vault", "test"),
        *("--enrollment", f"127.0.0.1:{enroll}", "--control", f"127.0.0.1:{control}"),
        capsys=capsys,
    )
    nat = FaultProxy(name="nat", listen_host="127.0.0.5")
    try:
        outside_enroll = nat.add_route(f"127.0.0.1:{enroll}")
        outside_control = nat.add_route(f"127.0.0.1:{control}")
        assert outside_enroll.listen[1] != enroll and outside_control.listen[1] != control
        text = home.config.read_text()
        for key, route in (("enrollment", outside_enroll), ("control", outside_control)):
            text = text.replace(f"{key} = []", f'{key} = ["{route.address}"]', 1)
        home.config.write_text(text)
        assert "127.0.0.5" not in sans(home)[1]
        tune_timings(home)
        broker = BrokerThread(home)
        agent: AgentThread | None = None
        try:
            creds = tmp_path / "hv-a1.json"
            run_broker(
                *("--home", str(home.root), "keys", "create", "--site", "east"),
                *("--out", str(creds)),
                capsys=capsys,
            )
            assert credentials.load(creds).enrollment_addresses == (outside_enroll.address,)
            agent_home = tmp_path / "hv-a1"
            got = agent_main(
                [
                    *("register", "--credentials", str(creds), "--name", "hv-a1"),
                    *("--home", str(agent_home), "--certificate-port", "0", "--ticket-port", "0"),
                ]
            )
            assert got == 0, capsys.readouterr()
            registered = nat.stats.snapshot().connections
            assert registered >= 1  # the registration went through the NAT
            agent = AgentThread(agent_home)
            agent.wait_connected()
            assert agent.daemon.identity.get().control_addresses == (outside_control.address,)
            assert nat.stats.snapshot().connections > registered  # and so does the stream
        finally:
            if agent is not None:
                agent.stop()
            broker.stop()
    finally:
        nat.close()
