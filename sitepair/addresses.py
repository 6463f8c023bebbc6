"""Network addresses an operator gives on the command line or in a configuration file.

A *host* is an IPv4 address, an IPv6 address (with or without ``[...]``) or a DNS name; a *host
and port* is ``HOST:PORT`` (``[V6]:PORT`` for IPv6). Each is checked here, once, with an error
that names the option and shows the expected form, so a typo is refused before ``init`` or
``register`` writes anything.

A *wildcard* host (``0.0.0.0``, ``::``) listens on every interface but cannot be dialled by
another machine: whoever listens there must also say what to advertise.
"""

from __future__ import annotations

import ipaddress
import re

from sitepair.errors import InvalidArgument

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def is_ip(host: str) -> bool:
    """True if ``host`` (already checked) is an IP address, not a DNS name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_wildcard(host: str) -> bool:
    """True for the any-address of IPv4 or IPv6 (listen on every interface)."""
    return is_ip(host) and ipaddress.ip_address(host).is_unspecified


def is_loopback(host: str) -> bool:
    """True for a loopback IP and for ``localhost``: reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    return is_ip(host) and ipaddress.ip_address(host).is_loopback


def check_host(text: str, what: str) -> str:
    """``text`` as a host (an IPv6 address loses its brackets); InvalidArgument otherwise."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if is_ip(host):
        return str(ipaddress.ip_address(host))
    name = host[:-1] if host.endswith(".") else host
    labels_ok = bool(name) and all(_LABEL.match(part) for part in name.split("."))
    # All digits (999.1.1.1) is a bad IP address, not a name.
    if labels_ok and len(name) <= 253 and not name.replace(".", "").isdigit():
        return name.lower()
    raise InvalidArgument(
        f"{what} {text!r} is not an IP address or DNS name",
        hint="for example 192.0.2.10, 2001:db8::10 or dr-broker.example.com",
    )


def check_port(value: int | str, what: str, *, allow_zero: bool = False) -> int:
    """``value`` as a TCP port: 1-65535, or 0 (any free one) when ``allow_zero``."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{what}: {value!r} is not a port number") from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        hint = "use 1-65535, or 0 for any free port" if allow_zero else "use 1-65535"
        raise InvalidArgument(f"{what}: {port} is not a port", hint=hint)
    return port


def check_host_port(text: str, what: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) as (host, port); InvalidArgument naming ``what`` otherwise."""
    value = text.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:  # an IPv6 address without brackets: its port is ambiguous
            raise InvalidArgument(
                f"{what} {text!r}: write an IPv6 address in brackets",
                hint="for example [2001:db8::10]:8443",
            )
    if not sep or not host or not port:
        raise InvalidArgument(
            f"{what} {text!r} is not HOST:PORT", hint="for example 0.0.0.0:8443 or 192.0.2.10:8443"
        )
    return check_host(host, what), check_port(port, what, allow_zero=allow_zero)


def join(host: str, port: int) -> str:
    """``HOST:PORT``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
