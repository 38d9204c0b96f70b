"""Peer addresses against allowed networks: one rule for the listener's allow-lists and the
routes' `source_address`."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> list[Network]:
    """Config strings ("10.1.2.0/24", "fd00::7") as networks; checked at start-up already."""
    return [ipaddress.ip_network(value, strict=False) for value in values]


def address_in(address: str, networks: Iterable[Network]) -> bool:
    """Whether a peer address lies in one of the networks. An IPv4 peer seen on an IPv6 socket
    (::ffff:10.1.2.3) counts as its IPv4 address; a scope ("%eth0") is ignored; an address that
    does not parse is in none."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == network.version and ip in network for network in networks)
