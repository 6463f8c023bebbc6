"""Network namespaces for the cross-site harness: one per site, one for the broker, a router.

For run id ``r1`` and the address block the harness picked (``10.231.0.0/16`` unless the host
already routes part of it)::

    sp-r1-a       eth0 10.231.1.2/24 ──veth── r-a      10.231.1.1/24 ┐
    sp-r1-b       eth0 10.231.2.2/24 ──veth── r-b      10.231.2.1/24 ├─ sp-r1-router
    sp-r1-broker  eth0 10.231.3.2/24 ──veth── r-broker 10.231.3.1/24 ┘   lo 10.231.0.1/32 (service)

* Every leaf namespace (sites, broker) has one route, the run's whole block via the router, and
  no default route: a process inside can reach the other namespaces of its run and its own
  loopback, and nothing else (anything else is "Network is unreachable" at once).
* The router forwards (``net.ipv4.ip_forward=1``, in the router only) and owns a *service
  address* on its loopback where the WAN proxy listens (see :mod:`.wan`).
* Both ends of every veth are created directly inside the namespaces (``ip -n ROUTER link add
  ... peer ... netns LEAF``): no interface ever appears in the host's namespace, and the host's
  own network configuration is never read for anything but choosing a free address block.

Teardown kills whatever still runs inside the run's namespaces (by pid, from ``ip netns pids``:
only processes the harness put there), then deletes the namespaces; deleting a namespace
destroys its veth ends, which destroys the peers. A run that crashed leaves its namespaces
behind; :func:`cleanup_stale` removes them. Each topology writes an *owner record* (its pid and
that process' start time) under ``/run/sitepair-harness`` before creating anything, so
``cleanup_stale("sp-")`` never removes the namespaces of a run that is still alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Every namespace of a run is named ``sp-<run>-<role>``.
NAME_PREFIX = "sp-"
ROUTER = "router"
BROKER = "broker"
#: Owner records of live topologies (pid + process start time), one JSON file per run.
OWNER_DIR = Path("/run/sitepair-harness")
#: Candidate second octets of the run's 10.X.0.0/16 block, tried in this order.
BLOCK_CANDIDATES = (*range(231, 255), *range(200, 231))

_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9]{0,15}$")
_SITE = re.compile(r"^[a-z0-9]{1,8}$")
_CLONE_NEWNET = 0x40000000
_COMMAND_TIMEOUT = 30.0


class NetnsError(RuntimeError):
    """A namespace operation failed; the message carries the command and its stderr."""


class NetnsUnavailable(NetnsError):
    """This machine (or this user) cannot build namespaces; the message says why."""


# -- small process helpers ------------------------------------------------------------------------


def _run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
        check=False,
    )
    if check and proc.returncode != 0:
        shown = " ".join(argv)
        detail = (proc.stderr or proc.stdout).strip()
        raise NetnsError(f"`{shown}` failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def _ip_batch(namespace: str | None, commands: Iterable[str]) -> None:
    """Run ``ip`` commands in one process (``ip -batch -``), stopping at the first failure."""
    argv = ["ip"] + (["-n", namespace] if namespace else []) + ["-batch", "-"]
    _run(argv, stdin="\n".join(commands) + "\n")


def netns_unavailable_reason() -> str | None:
    """Why namespace mode cannot run here, or None when it can (probes with a real namespace)."""
    if not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the harness as root, or use loopback mode)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2, or scripts/setup.sh)"
    probe = f"{NAME_PREFIX}probe{os.getpid():x}"
    try:
        _run(["ip", "netns", "add", probe])
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` does not work here: {exc}"
    with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        _run(["ip", "netns", "del", probe])
    return None


def list_namespaces() -> list[str]:
    """The names of every named network namespace (``ip netns list``)."""
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Processes inside namespace ``name`` (``ip netns pids``); empty when it is gone."""
    out = _run(["ip", "netns", "pids", name], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


# -- entering a namespace from this process -------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc  # noqa: PLW0603 - loaded once, on first use, so importing works off Linux
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with *this thread* inside namespace ``name``, then come back.

    Sockets created inside keep belonging to that namespace after the block, so this is how the
    proxy (and the tests) listen and connect inside namespaces without a subprocess. Keep the
    body short and synchronous: create sockets, nothing that starts threads (a thread started
    inside would stay in the namespace), no ``await``.
    """
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            there = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsError(f"network namespace {name!r} does not exist") from None
        try:
            _setns(there)
        finally:
            os.close(there)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)


# -- owner records --------------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """The process' start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_alive(record: Mapping[str, Any]) -> bool:
    pid = int(record.get("pid", 0))
    return pid > 0 and _start_time(pid) == record.get("start_time")


def _owner_records() -> dict[Path, dict[str, Any]]:
    records: dict[Path, dict[str, Any]] = {}
    if not OWNER_DIR.is_dir():
        return records
    for path in OWNER_DIR.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            records[path] = json.loads(path.read_text())
    return records


def kill_processes(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """SIGKILL each process still running and reap it (5 s each at most)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _kill_inside(name: str) -> list[int]:
    """SIGKILL every process left inside namespace ``name`` (the harness put them there)."""
    killed = []
    for pid in namespace_pids(name):
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    deadline = time.monotonic() + 5
    while killed and namespace_pids(name) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def _delete_namespace(name: str) -> None:
    _kill_inside(name)
    _run(["ip", "netns", "del", name], check=False)
    if name in list_namespaces():
        raise NetnsError(f"network namespace {name} could not be deleted")


def cleanup_stale(prefix: str = NAME_PREFIX) -> list[str]:
    """Remove namespaces named ``prefix*`` left by runs that are no longer alive.

    The harness calls this first (``cleanup_stale("sp-")`` sweeps every crashed run). Namespaces
    of a live run (its owner record names a running process) are kept. Processes still running
    inside a stale namespace (agents of the crashed run) are killed by pid first, since a
    namespace with processes in it outlives its name. Returns the names removed.
    """
    if not prefix.startswith(NAME_PREFIX):
        raise ValueError(f"refusing to clean namespaces outside {NAME_PREFIX!r}: {prefix!r}")
    records = _owner_records()
    alive: set[str] = set()
    for path, record in records.items():
        if _owner_alive(record):
            alive.update(record.get("namespaces", []))
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    removed = []
    for name in list_namespaces():
        if name.startswith(prefix) and name not in alive:
            _delete_namespace(name)
            removed.append(name)
    return removed


# -- the topology ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Namespace:
    """One namespace of the topology and its place on the router."""

    #: Role: a site name, ``"broker"`` or ``"router"``.
    role: str
    #: The namespace's name for ``ip netns``, e.g. ``sp-r1-a``.
    name: str
    #: Where others reach it: its ``eth0`` address (the router: its service address).
    address: str
    #: Its /24 towards the router (the router: the service address as a /32).
    subnet: str
    #: The router's address on this link: the leaf's gateway (the router: same as ``address``).
    gateway: str
    #: The router-side veth of this link (``r-<role>``), where ``tbf`` shapes traffic towards it.
    router_dev: str


def _host_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 destinations the host routes (every table) or has addresses in; default excluded."""
    nets: list[ipaddress.IPv4Network] = []
    for entry in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]"):
        dst = entry.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(_run(["ip", "-j", "-4", "addr", "show"]) or "[]"):
        for info in link.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                nets.append(
                    ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
                )
    return nets


def pick_block() -> ipaddress.IPv4Network:
    """The first 10.X.0.0/16 of :data:`BLOCK_CANDIDATES` that overlaps nothing the host routes.

    The namespaces are not connected to the host, so an overlap could not leak traffic; avoiding
    it keeps ``ip route`` output unambiguous for whoever debugs a run.
    """
    taken = _host_networks()
    for octet in BLOCK_CANDIDATES:
        block = ipaddress.IPv4Network(f"10.{octet}.0.0/16")
        if not any(block.overlaps(net) for net in taken):
            return block
    raise NetnsError("every candidate 10.X.0.0/16 block overlaps a host route")


class Topology:
    """Sites, a broker and a router in namespaces, built by :meth:`create` and torn down after."""

    def __init__(self, run_id: str, sites: Sequence[str], block: ipaddress.IPv4Network) -> None:
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run id must be 1-16 lowercase letters or digits, got {run_id!r}")
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"sites must be distinct and at least one, got {sites!r}")
        for site in sites:
            if not _SITE.match(site) or site in (ROUTER, BROKER):
                raise ValueError(f"site names are 1-8 lowercase letters or digits, got {site!r}")
        self.run_id = run_id
        self.prefix = f"{NAME_PREFIX}{run_id}-"
        self.sites = tuple(sites)
        self.block = block
        subnets = list(block.subnets(new_prefix=24))
        service = str(subnets[0][1])
        self.namespaces: dict[str, Namespace] = {
            ROUTER: Namespace(
                role=ROUTER,
                name=self.prefix + ROUTER,
                address=service,
                subnet=f"{service}/32",
                gateway=service,
                router_dev="lo",
            )
        }
        for index, role in enumerate((*self.sites, BROKER), start=1):
            net = subnets[index]
            self.namespaces[role] = Namespace(
                role=role,
                name=self.prefix + role,
                address=str(net[2]),
                subnet=str(net),
                gateway=str(net[1]),
                router_dev=f"r-{role}",
            )
        self._owner_file = OWNER_DIR / f"{self.prefix}owner.json"
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- building and tearing down ----------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def create(cls, run_id: str, sites: Sequence[str] = ("a", "b")) -> Iterator[Topology]:
        """Build the topology, yield it, and tear it down on exit (also after an exception).

        Leftovers of an earlier, crashed run with the same id are removed first. Raises
        :class:`NetnsUnavailable` when namespaces cannot be used here.
        """
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        topo = cls(run_id, sites, pick_block())
        try:
            topo._build()
            yield topo
        finally:
            topo.close()

    def _build(self) -> None:
        cleanup_stale(self.prefix)
        existing = [n for n in list_namespaces() if n.startswith(self.prefix)]
        if existing:
            raise NetnsError(f"run id {self.run_id!r} is in use by a live run: {existing}")
        self._write_owner()
        for ns in self.namespaces.values():
            _run(["ip", "netns", "add", ns.name])
        router = self.namespaces[ROUTER]
        router_cmds = ["link set lo up", f"addr add {router.subnet} dev lo"]
        for role in (*self.sites, BROKER):
            ns = self.namespaces[role]
            prefixlen = ipaddress.IPv4Network(ns.subnet).prefixlen
            router_cmds += [
                f"link add {ns.router_dev} type veth peer name eth0 netns {ns.name}",
                f"addr add {ns.gateway}/{prefixlen} dev {ns.router_dev}",
                f"link set {ns.router_dev} up",
            ]
        _ip_batch(router.name, router_cmds)
        for role in (*self.sites, BROKER):
            ns = self.namespaces[role]
            prefixlen = ipaddress.IPv4Network(ns.subnet).prefixlen
            _ip_batch(
                ns.name,
                [
                    "link set lo up",
                    f"addr add {ns.address}/{prefixlen} dev eth0",
                    "link set eth0 up",
                    f"route add {self.block} via {ns.gateway} dev eth0",
                ],
            )
            self._sysctl(ns.name, "net/ipv4/ip_forward", "0")
        self._sysctl(router.name, "net/ipv4/ip_forward", "1")

    def _write_owner(self) -> None:
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "run_id": self.run_id,
            "namespaces": [ns.name for ns in self.namespaces.values()],
        }
        tmp = self._owner_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self._owner_file)

    @staticmethod
    def _sysctl(namespace: str, key: str, value: str) -> None:
        """Write ``/proc/sys/<key>`` as seen from inside ``namespace`` (net sysctls are per-ns)."""
        with entered(namespace), open(f"/proc/sys/{key}", "w") as f:
            f.write(value)

    def close(self) -> None:
        """Tear everything down: processes inside, namespaces (and so every veth), owner record.

        Idempotent; safe after a partial build.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs = list(self._procs)
        kill_processes(procs)
        errors = []
        present = set(list_namespaces())
        for ns in self.namespaces.values():
            if ns.name in present:
                try:
                    _delete_namespace(ns.name)
                except NetnsError as exc:
                    errors.append(str(exc))
        with contextlib.suppress(OSError):
            self._owner_file.unlink()
        if errors:
            raise NetnsError("; ".join(errors))

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups ----------------------------------------------------------------------------------

    def ns(self, key: str) -> Namespace:
        """The namespace with role ``key`` (``"a"``, ``"broker"``, ``"router"``) or full name."""
        if key in self.namespaces:
            return self.namespaces[key]
        for ns in self.namespaces.values():
            if ns.name == key:
                return ns
        raise KeyError(f"no namespace {key!r} in run {self.run_id} (have {list(self.namespaces)})")

    def address(self, key: str) -> str:
        return self.ns(key).address

    @property
    def router(self) -> Namespace:
        return self.namespaces[ROUTER]

    # -- running things inside --------------------------------------------------------------------

    def command(self, key: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside namespace ``key`` (``ip netns exec NAME ...``)."""
        return ["ip", "netns", "exec", self.ns(key).name, *argv]

    def run(
        self,
        key: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = _COMMAND_TIMEOUT,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``key`` and wait; text output captured unless overridden.

        With ``check`` a non-zero exit raises :class:`NetnsError` carrying stderr.
        """
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        cmd = self.command(key, argv)
        proc: subprocess.CompletedProcess[str] = subprocess.run(
            cmd, timeout=timeout, check=False, **kwargs
        )
        if check and proc.returncode != 0:
            raise NetnsError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {(proc.stderr or '').strip()}"
            )
        return proc

    def popen(self, key: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside namespace ``key``; its pid is the command's own (``ip`` execs it).

        The process is killed at teardown if it is still running.
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(key, argv), **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    # -- shaping and breaking the links -----------------------------------------------------------

    def _tc(self, *args: str, check: bool = True) -> str:
        """Run ``tc`` inside the router namespace."""
        return _run(["ip", "netns", "exec", self.router.name, "tc", *args], check=check)

    def set_rate(self, rate_mbit: float, *, roles: Sequence[str] | None = None) -> None:
        """Limit traffic *towards* each site to ``rate_mbit`` with ``tbf`` (0 removes the limit).

        The qdisc sits on the router's site-facing veth, so each direction of the inter-site
        path is shaped once, at the router, in the kernel. The broker's link is left alone.
        """
        for role in roles if roles is not None else self.sites:
            dev = self.ns(role).router_dev
            if rate_mbit <= 0:
                self._tc("qdisc", "del", "dev", dev, "root", check=False)
                continue
            rate_bytes = rate_mbit * 1e6 / 8
            burst = max(32 * 1024, int(rate_bytes * 0.01))  # >= 10 ms of traffic, >= rate/HZ
            rate = f"{int(rate_mbit * 1e6)}bit"
            self._tc(
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                str(burst),
                "latency",
                "50ms",
            )

    def qdisc(self, role: str) -> str:
        """``tc qdisc show`` of the router's veth towards ``role``."""
        return self._tc("qdisc", "show", "dev", self.ns(role).router_dev)

    def set_link(self, role: str, up: bool) -> None:
        """Bring the router's veth towards ``role`` down (isolating it from everyone) or up."""
        _ip_batch(
            self.router.name, [f"link set {self.ns(role).router_dev} {'up' if up else 'down'}"]
        )

    def block_intersite(self, blocked: bool) -> None:
        """Make the router refuse (ICMP prohibited) or resume forwarding between site subnets.

        Only packets *forwarded* from one site to another are affected: the broker stays
        reachable from every site, and the router's own sockets (the WAN proxy) are untouched.
        """
        action = "add" if blocked else "del"
        cmds = []
        for src in self.sites:
            for dst in self.sites:
                if src != dst:
                    cmds.append(
                        f"rule {action} priority 100 iif {self.ns(src).router_dev} "
                        f"to {self.ns(dst).subnet} prohibit"
                    )
        if not cmds:
            return
        if blocked:
            _ip_batch(self.router.name, cmds)
        else:
            for cmd in cmds:  # delete each one that is there, whatever state a failure left
                _run(["ip", "-n", self.router.name, *cmd.split()], check=False)
